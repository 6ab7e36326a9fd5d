//! [`StoreError`], what went wrong in the store. A leaf: both the [`crate::Store`] trait
//! and the group-commit types of [`crate::batch`] use it, and it imports neither, so they
//! do not import each other.

/// What went wrong in the store, classified so the gateway and the API can answer well.
#[derive(Clone, Debug, thiserror::Error)]
pub enum StoreError {
    /// The record does not exist.
    #[error("{entity} {key} not found")]
    NotFound {
        /// Entity name, e.g. "device".
        entity: &'static str,
        /// The key looked up.
        key: String,
    },
    /// The change conflicts with the record's current state.
    #[error("{0}")]
    Conflict(String),
    /// The input cannot be stored as given.
    #[error("invalid {field}: {message}")]
    Invalid {
        /// The offending field.
        field: &'static str,
        /// What is wrong and what to do.
        message: String,
    },
    /// The database failed; retrying may help.
    #[error("database error: {0}")]
    Database(String),
}

/// Result alias for store calls.
pub type StoreResult<T> = Result<T, StoreError>;
