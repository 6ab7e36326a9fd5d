//! Provider instance names: the key of a `[providers.<name>]` table in the config file.

use std::borrow::Borrow;
use std::fmt;
use std::ops::Deref;

use serde::{Deserialize, Serialize};

/// The name of one configured provider instance (`[providers.<name>]`).
///
/// A newtype rather than a bare `&str` so a signature that takes an instance cannot be
/// handed a device id, a topic or a kind by mistake. The config validates the spelling;
/// this type only carries it, so building one never fails.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct InstanceName(String);

impl InstanceName {
    /// Wraps a configured instance name.
    pub fn new(name: impl Into<String>) -> Self {
        Self(name.into())
    }

    /// The name as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The name as an owned string.
    pub fn into_string(self) -> String {
        self.0
    }
}

impl fmt::Display for InstanceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Deref for InstanceName {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl AsRef<str> for InstanceName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl Borrow<str> for InstanceName {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl From<&str> for InstanceName {
    fn from(name: &str) -> Self {
        Self(name.to_owned())
    }
}

impl From<String> for InstanceName {
    fn from(name: String) -> Self {
        Self(name)
    }
}

impl From<&String> for InstanceName {
    fn from(name: &String) -> Self {
        Self(name.clone())
    }
}

impl From<InstanceName> for String {
    fn from(name: InstanceName) -> Self {
        name.0
    }
}

impl PartialEq<str> for InstanceName {
    fn eq(&self, other: &str) -> bool {
        self.0 == other
    }
}

impl PartialEq<&str> for InstanceName {
    fn eq(&self, other: &&str) -> bool {
        self.0 == *other
    }
}

impl PartialEq<String> for InstanceName {
    fn eq(&self, other: &String) -> bool {
        &self.0 == other
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_instance_name_reads_and_serializes_as_its_string() {
        let name = InstanceName::new("plant-a");
        assert_eq!(name.as_str(), "plant-a");
        assert_eq!(name.to_string(), "plant-a");
        assert_eq!(name, "plant-a");
        assert_eq!(
            serde_json::to_string(&name).expect("serializes"),
            "\"plant-a\""
        );
        let back: InstanceName = serde_json::from_str("\"plant-a\"").expect("deserializes");
        assert_eq!(back, name);
    }
}
