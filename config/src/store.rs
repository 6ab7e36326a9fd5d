//! The store's settings (`[store]`) and their validation.

use serde::{Deserialize, Serialize};

use crate::base::Problem;

/// Store backend.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// `sqlite` (embedded file, the default) or `postgres` (a shared database, for several
    /// replicas; set `[store.postgres]`).
    pub kind: StoreKind,
    /// SQLite database file; its directory is created when missing.
    pub path: String,
    /// SQLite: `full` (default) syncs every commit to the disk before the events in it are
    /// acknowledged, so an acknowledged reading survives a power loss; `normal` syncs at
    /// checkpoints only (faster on slow disks; a process crash loses nothing, a power loss
    /// can lose the last acknowledged commits). BENCHMARKS.md measures the difference.
    pub sqlite_synchronous: SqliteSynchronous,
    /// The PostgreSQL store (`kind = "postgres"`): URL, pool, timeouts, TLS.
    pub postgres: Option<crate::postgres::PostgresStoreConfig>,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            kind: StoreKind::Sqlite,
            path: "data/iotgw.db".into(),
            sqlite_synchronous: SqliteSynchronous::Full,
            postgres: None,
        }
    }
}

/// SQLite's `synchronous` setting (`store.sqlite_synchronous`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SqliteSynchronous {
    /// Every commit synced before its events are acknowledged.
    #[default]
    Full,
    /// Synced at checkpoints.
    Normal,
}

/// Store kinds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StoreKind {
    /// SQLite file in WAL mode.
    Sqlite,
    /// PostgreSQL, shared by several replicas (`[store.postgres]`).
    Postgres,
}

/// The checks serde cannot express for `[store]`.
pub(crate) fn validate(c: &StoreConfig, out: &mut Vec<Problem>) {
    match (c.kind, &c.postgres) {
        (StoreKind::Sqlite, None) => {}
        (StoreKind::Sqlite, Some(_)) => out.push(Problem::new(
            "store.postgres",
            "[store.postgres] is set but store.kind is `sqlite`, so it would be ignored",
            "set store.kind = \"postgres\" to use it, or remove [store.postgres]",
        )),
        (StoreKind::Postgres, None) => out.push(Problem::new(
            "store.postgres.url",
            "store.kind is `postgres` but no database URL is set",
            "add [store.postgres] with url = \"postgres://USER@HOST:5432/DATABASE\" \
             (or set IOTGW_STORE__POSTGRES__URL)",
        )),
        (StoreKind::Postgres, Some(pg)) => {
            crate::postgres::validate("store.postgres", pg, out);
        }
    }
    if c.kind == StoreKind::Sqlite && c.path.trim().is_empty() {
        out.push(Problem::new(
            "store.path",
            "the SQLite path is empty",
            "give a file path, e.g. data/iotgw.db",
        ));
    }
}
