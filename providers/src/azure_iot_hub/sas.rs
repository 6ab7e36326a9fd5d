//! Shared access signature (SAS) tokens, as IoT Hub's security documentation defines them
//! and as the official service SDKs build them:
//!
//! ```text
//! SharedAccessSignature sr={quote_plus(resource)}&sig={quote(base64(HMAC-SHA256(key, quote_plus(resource) + "\n" + expiry)))}&se={expiry}&skn={policy}
//! ```
//!
//! `key` is the policy's base64-decoded key, `expiry` seconds since the Unix epoch. The
//! signature is percent-encoded the way Python's `urllib.parse.quote` does it (`/` kept),
//! which is what the Python service SDK sends; the differential tests compare our tokens
//! with the SDK's byte for byte.
//!
//! [`TokenCache`] signs a token once and reuses it until a fifth of its lifetime is left.

use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The key could not be used to sign.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the shared access key is not valid base64: copy the policy's key again")]
pub struct BadKey;

/// Percent-encodes like Python's `urllib.parse.quote_plus(s)`: letters, digits and
/// `_.-~` stay, a space becomes `+`, everything else `%XX`.
pub fn quote_plus(s: &str) -> String {
    encode(s, b"", true)
}

/// Percent-encodes like Python's `urllib.parse.quote(s, safe)`: letters, digits, `_.-~`
/// and the bytes in `safe` stay, everything else becomes `%XX`.
pub fn quote(s: &str, safe: &[u8]) -> String {
    encode(s, safe, false)
}

fn encode(s: &str, safe: &[u8], plus: bool) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for &b in s.as_bytes() {
        if b.is_ascii_alphanumeric() || b"_.-~".contains(&b) || safe.contains(&b) {
            out.push(char::from(b));
        } else if plus && b == b' ' {
            out.push('+');
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Builds a SAS token for `resource` (e.g. the hub's host name) valid until `expiry`
/// (seconds since the Unix epoch), signed with the base64 `key` of policy `key_name`
/// (`None` builds a device token without `skn`).
pub fn token(
    resource: &str,
    key: &str,
    key_name: Option<&str>,
    expiry: u64,
) -> Result<String, BadKey> {
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(key.trim())
        .map_err(|_| BadKey)?;
    let sr = quote_plus(resource);
    let mut mac = Hmac::<Sha256>::new_from_slice(&decoded).map_err(|_| BadKey)?;
    mac.update(format!("{sr}\n{expiry}").as_bytes());
    let sig = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
    let sig = quote(&sig, b"/");
    Ok(match key_name {
        Some(name) => format!("SharedAccessSignature sr={sr}&sig={sig}&se={expiry}&skn={name}"),
        None => format!("SharedAccessSignature sr={sr}&sig={sig}&se={expiry}"),
    })
}

/// Seconds since the Unix epoch.
pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Signs tokens for one resource and policy, reusing each until a fifth of its lifetime
/// is left (so a request never leaves with a token about to expire).
pub struct TokenCache {
    resource: String,
    key: String,
    key_name: String,
    ttl: Duration,
    current: Mutex<Option<(String, u64)>>,
}

impl std::fmt::Debug for TokenCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenCache")
            .field("resource", &self.resource)
            .field("key_name", &self.key_name)
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

impl TokenCache {
    /// A cache for `resource` signed with policy `key_name`'s base64 `key`; checks the key.
    pub fn new(resource: &str, key: &str, key_name: &str, ttl: Duration) -> Result<Self, BadKey> {
        token(resource, key, Some(key_name), 0)?;
        Ok(Self {
            resource: resource.to_owned(),
            key: key.to_owned(),
            key_name: key_name.to_owned(),
            ttl,
            current: Mutex::new(None),
        })
    }

    /// A token valid for at least a fifth of the TTL.
    pub fn get(&self) -> String {
        self.get_at(now_secs())
    }

    /// [`TokenCache::get`] at time `now` (seconds since the epoch).
    pub fn get_at(&self, now: u64) -> String {
        let mut cur = self
            .current
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let ttl = self.ttl.as_secs().max(1);
        let renew_margin = ttl / 5;
        if let Some((tok, expiry)) = cur.as_ref() {
            if now + renew_margin < *expiry {
                return tok.clone();
            }
        }
        let expiry = now + ttl;
        // The key was checked in `new`, so signing cannot fail here.
        let tok =
            token(&self.resource, &self.key, Some(&self.key_name), expiry).unwrap_or_default();
        *cur = Some((tok.clone(), expiry));
        tok
    }

    /// The resource tokens are signed for.
    pub fn resource(&self) -> &str {
        &self.resource
    }

    /// The policy name (`skn`).
    pub fn key_name(&self) -> &str {
        &self.key_name
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoding_follows_python_quote_and_quote_plus() {
        assert_eq!(
            quote_plus("myhub.azure-devices.net"),
            "myhub.azure-devices.net"
        );
        assert_eq!(quote_plus("127.0.0.1:8443/a b"), "127.0.0.1%3A8443%2Fa+b");
        assert_eq!(quote("ab+/c=", b"/"), "ab%2B/c%3D");
    }

    #[test]
    fn a_token_has_the_documented_shape_and_verifies_with_the_key() {
        let key = base64::engine::general_purpose::STANDARD.encode(b"0123456789abcdef");
        let t = token(
            "myhub.azure-devices.net",
            &key,
            Some("iothubowner"),
            1_700_000_000,
        )
        .expect("valid key");
        let rest = t.strip_prefix("SharedAccessSignature ").expect("prefix");
        let parts: Vec<(&str, &str)> = rest
            .split('&')
            .map(|p| p.split_once('=').expect("k=v"))
            .collect();
        let names: Vec<&str> = parts.iter().map(|(k, _)| *k).collect();
        assert_eq!(names, ["sr", "sig", "se", "skn"]);
        assert_eq!(parts[0].1, "myhub.azure-devices.net");
        assert_eq!(parts[2].1, "1700000000");
        assert_eq!(parts[3].1, "iothubowner");
        let mut mac = Hmac::<Sha256>::new_from_slice(b"0123456789abcdef").expect("key");
        mac.update(b"myhub.azure-devices.net\n1700000000");
        let want = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
        assert_eq!(parts[1].1, quote(&want, b"/"));
        assert!(token("h", "not base64!", None, 1).is_err());
    }

    #[test]
    fn the_cache_reuses_a_token_until_a_fifth_of_its_lifetime_is_left() {
        let key = base64::engine::general_purpose::STANDARD.encode(b"k");
        let c = TokenCache::new("h", &key, "p", Duration::from_secs(1000)).expect("key");
        let first = c.get_at(10_000);
        assert!(first.contains("se=11000"), "{first}");
        assert_eq!(c.get_at(10_700), first, "still 300 s of 1000 left");
        let renewed = c.get_at(10_801);
        assert!(renewed.contains("se=11801"), "{renewed}");
    }
}
