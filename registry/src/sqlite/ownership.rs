//! Partition ownership claims on SQLite: plain rows, written only when the version the
//! caller read is still the stored one.

use super::*;

impl SqliteStore {
    /// See [`crate::Store::list_ownership`].
    pub(super) async fn ownership(&self, scope: &str) -> StoreResult<Vec<Ownership>> {
        let rows = sqlx::query(
            "SELECT partition_id, owner, version, expires_at FROM partition_ownership \
             WHERE scope = ? ORDER BY partition_id",
        )
        .bind(scope)
        .fetch_all(&self.pool)
        .await
        .map_err(db("listing partition ownership"))?;
        rows.iter()
            .map(|r| {
                Ok(Ownership {
                    scope: scope.to_owned(),
                    partition: get(r, "partition_id")?,
                    owner: get(r, "owner")?,
                    version: get(r, "version")?,
                    expires_at: get_ts(r, "expires_at")?,
                })
            })
            .collect()
    }

    /// See [`crate::Store::claim_ownership`]: an insert that does nothing on a conflict
    /// (a first claim), or an update conditional on the version (every later one); one row
    /// changed means the claim won.
    pub(super) async fn claim_partition(
        &self,
        scope: &str,
        partition: &str,
        owner: &str,
        expected_version: Option<i64>,
        expires_at: DateTime<Utc>,
    ) -> StoreResult<Option<Ownership>> {
        let stored_expiry = ts(expires_at);
        let (query, version) = match expected_version {
            None => (
                sqlx::query(
                    "INSERT INTO partition_ownership (scope, partition_id, owner, version, expires_at) \
                     VALUES (?, ?, ?, 1, ?) ON CONFLICT (scope, partition_id) DO NOTHING",
                )
                .bind(scope)
                .bind(partition)
                .bind(owner)
                .bind(&stored_expiry),
                1,
            ),
            Some(v) => (
                sqlx::query(
                    "UPDATE partition_ownership SET owner = ?, version = version + 1, expires_at = ? \
                     WHERE scope = ? AND partition_id = ? AND version = ?",
                )
                .bind(owner)
                .bind(&stored_expiry)
                .bind(scope)
                .bind(partition)
                .bind(v),
                v + 1,
            ),
        };
        let done = query
            .execute(&self.pool)
            .await
            .map_err(db("claiming a partition"))?;
        if done.rows_affected() != 1 {
            return Ok(None);
        }
        Ok(Some(Ownership {
            scope: scope.to_owned(),
            partition: partition.to_owned(),
            owner: owner.to_owned(),
            version,
            expires_at: parse_ts(&stored_expiry, "expires_at")?,
        }))
    }
}
