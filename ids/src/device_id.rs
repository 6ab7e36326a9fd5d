//! Canonical device ids: one id that is valid on every provider and fits `msdyn_deviceid`.
//!
//! The rule is the intersection of what the clouds accept (AWS thing names
//! `[a-zA-Z0-9:_-]{1,128}`, Azure's wider ASCII set up to 128, MQTT topic levels without
//! `+ # /`, Pub/Sub attribute values) cut to Field Service's 100-character column:
//! `[A-Za-z0-9:_-]{1,100}`.

use std::fmt;

use serde::{Deserialize, Serialize};

/// The longest id `msdyn_deviceid` can hold.
pub const MAX_DEVICE_ID_LEN: usize = 100;

/// A validated device id. Built only through [`DeviceId::parse`], so holding one means the
/// id is valid on every provider.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct DeviceId(String);

/// Why a device id was refused, with what to do about it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeviceIdError {
    /// The id is empty.
    #[error("device id is empty: give 1 to {MAX_DEVICE_ID_LEN} characters from A-Z a-z 0-9 : _ -")]
    Empty,
    /// The id is longer than Field Service can store.
    #[error("device id is {len} characters long; msdyn_deviceid holds at most {MAX_DEVICE_ID_LEN}: shorten it")]
    TooLong {
        /// Its length in characters.
        len: usize,
    },
    /// The id holds a character some provider refuses.
    #[error("device id {id:?} has {ch:?} at position {pos}; only A-Z a-z 0-9 : _ - are valid on every provider (AWS thing names are the narrowest): replace it")]
    BadChar {
        /// The id as given.
        id: String,
        /// The first refused character.
        ch: char,
        /// Its position (0-based, in characters).
        pos: usize,
    },
}

impl DeviceId {
    /// Validates `raw` against the canonical rules.
    pub fn parse(raw: &str) -> Result<Self, DeviceIdError> {
        if raw.is_empty() {
            return Err(DeviceIdError::Empty);
        }
        let len = raw.chars().count();
        if len > MAX_DEVICE_ID_LEN {
            return Err(DeviceIdError::TooLong { len });
        }
        if let Some((pos, ch)) = raw
            .chars()
            .enumerate()
            .find(|(_, c)| !(c.is_ascii_alphanumeric() || matches!(c, ':' | '_' | '-')))
        {
            return Err(DeviceIdError::BadChar {
                id: raw.to_owned(),
                ch,
                pos,
            });
        }
        Ok(Self(raw.to_owned()))
    }

    /// The id as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for DeviceId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl std::str::FromStr for DeviceId {
    type Err = DeviceIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl<'de> Deserialize<'de> for DeviceId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(d)?;
        Self::parse(&raw).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_ids_valid_on_every_provider() {
        for ok in ["a", "pump-01", "site:7_pump-3", &"x".repeat(100)] {
            assert_eq!(DeviceId::parse(ok).expect("valid").as_str(), ok);
        }
    }

    #[test]
    fn refuses_empty_too_long_and_foreign_characters_with_a_fix() {
        assert_eq!(DeviceId::parse(""), Err(DeviceIdError::Empty));
        assert_eq!(
            DeviceId::parse(&"x".repeat(101)),
            Err(DeviceIdError::TooLong { len: 101 })
        );
        for (bad, ch) in [
            ("a/b", '/'),
            ("a+b", '+'),
            ("a#", '#'),
            ("a.b", '.'),
            ("é", 'é'),
            ("a b", ' '),
        ] {
            match DeviceId::parse(bad) {
                Err(DeviceIdError::BadChar { ch: got, .. }) => assert_eq!(got, ch, "{bad}"),
                other => panic!("{bad}: {other:?}"),
            }
        }
        let msg = DeviceId::parse("a/b").expect_err("bad").to_string();
        assert!(
            msg.contains("replace it") && msg.contains("position 1"),
            "{msg}"
        );
    }

    #[test]
    fn deserializing_validates() {
        assert!(serde_json::from_str::<DeviceId>("\"ok-1\"").is_ok());
        assert!(serde_json::from_str::<DeviceId>("\"not ok\"").is_err());
    }
}
