//! Stream checkpoints on SQLite.

use super::*;

impl SqliteStore {
    /// See [`crate::Store::load_checkpoint`].
    pub(super) async fn checkpoint(&self, scope: &str, key: &str) -> StoreResult<Option<String>> {
        let row = sqlx::query("SELECT value FROM checkpoints WHERE scope = ? AND key = ?")
            .bind(scope)
            .bind(key)
            .fetch_optional(&self.pool)
            .await
            .map_err(db("reading a checkpoint"))?;
        row.map(|r| r.try_get("value").map_err(db("reading a checkpoint")))
            .transpose()
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
            "INSERT INTO checkpoints (scope, key, value, position, updated_at) VALUES (?, ?, ?, ?, ?) \
             ON CONFLICT (scope, key) DO UPDATE SET value = excluded.value, position = excluded.position, \
             updated_at = excluded.updated_at \
             WHERE checkpoints.position IS NULL OR checkpoints.position <= excluded.position",
        )
        .bind(scope)
        .bind(key)
        .bind(value)
        .bind(position)
        .bind(now())
        .execute(&self.pool)
        .await
        .map_err(db("saving a checkpoint"))?;
        Ok(done.rows_affected() == 1)
    }
}
