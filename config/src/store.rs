//! The store's settings (`[store]`) and their validation.

use serde::{Deserialize, Serialize};

use crate::base::Problem;

/// Store backend.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// `sqlite` (embedded file).
    pub kind: StoreKind,
    /// SQLite database file; its directory is created when missing.
    pub path: String,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            kind: StoreKind::Sqlite,
            path: "data/iotgw.db".into(),
        }
    }
}

/// Store kinds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StoreKind {
    /// SQLite file in WAL mode.
    Sqlite,
}

/// The checks serde cannot express for `[store]`.
pub(crate) fn validate(c: &StoreConfig, out: &mut Vec<Problem>) {
    if c.path.trim().is_empty() {
        out.push(Problem::new(
            "store.path",
            "the SQLite path is empty",
            "give a file path, e.g. data/iotgw.db",
        ));
    }
}
