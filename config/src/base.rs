//! The two types every config file uses, [`Secret`] and [`Problem`]. A leaf: it imports
//! nothing of this crate, so the provider, sink and store files can all use it without
//! importing one another (and without an import loop through `model` or `load`).

use std::fmt;

use serde::{Deserialize, Serialize};

/// A secret value: never printed; `config show` writes it as `<redacted>`.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret.
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }
    /// The secret itself, for the one place that needs it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("<redacted>")
    }
}

/// One thing wrong with the configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// Dotted key path, e.g. `providers.local.port`.
    pub path: String,
    /// What is wrong.
    pub message: String,
    /// What to do.
    pub fix: String,
    /// Where the value came from (file, environment), when known.
    pub source: Option<String>,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let path = if self.path.is_empty() {
            "(top level)"
        } else {
            &self.path
        };
        write!(f, "{path}: {}", self.message)?;
        if let Some(src) = &self.source {
            write!(f, " [from {src}]")?;
        }
        write!(f, "\n    fix: {}", self.fix)
    }
}

impl Problem {
    /// A problem found by validation (it has no source yet; loading adds it).
    pub(crate) fn new(
        path: impl Into<String>,
        message: impl Into<String>,
        fix: impl Into<String>,
    ) -> Self {
        Self {
            path: path.into(),
            message: message.into(),
            fix: fix.into(),
            source: None,
        }
    }
}
