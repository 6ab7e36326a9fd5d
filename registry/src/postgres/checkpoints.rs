//! Stream checkpoints on PostgreSQL.

use super::{db, now, text, PostgresStore};
use crate::store::StoreResult;

impl PostgresStore {
    /// See [`crate::Store::load_checkpoint`].
    pub(super) async fn checkpoint(&self, scope: &str, key: &str) -> StoreResult<Option<String>> {
        sqlx::query_scalar("SELECT value FROM checkpoints WHERE scope = $1 AND key = $2")
            .bind(text(scope).as_ref())
            .bind(text(key).as_ref())
            .fetch_optional(&self.pool)
            .await
            .map_err(db("reading a checkpoint"))
    }

    /// See [`crate::Store::save_checkpoint`]: the upsert's `WHERE` keeps a stored position
    /// from moving backwards, and no row changed means a newer checkpoint is stored.
    pub(super) async fn put_checkpoint(
        &self,
        scope: &str,
        key: &str,
        value: &str,
        position: i64,
    ) -> StoreResult<bool> {
        let done = sqlx::query(
            "INSERT INTO checkpoints (scope, key, value, position, updated_at) VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT (scope, key) DO UPDATE SET value = excluded.value, position = excluded.position, \
             updated_at = excluded.updated_at \
             WHERE checkpoints.position IS NULL OR checkpoints.position <= excluded.position",
        )
        .bind(text(scope).as_ref())
        .bind(text(key).as_ref())
        .bind(text(value).as_ref())
        .bind(position)
        .bind(now())
        .execute(&self.pool)
        .await
        .map_err(db("saving a checkpoint"))?;
        Ok(done.rows_affected() == 1)
    }
}
