//! Partition ownership claims on PostgreSQL: plain rows, written only when the version the
//! caller read is still the stored one (under READ COMMITTED a concurrent update of the same
//! row waits for the first and then re-checks `version`, so exactly one of two racing
//! claims changes the row).

use chrono::{DateTime, Utc};

use super::{db, get, text, ts, PostgresStore};
use crate::model::Ownership;
use crate::store::StoreResult;

impl PostgresStore {
    /// See [`crate::Store::list_ownership`].
    pub(super) async fn ownership(&self, scope: &str) -> StoreResult<Vec<Ownership>> {
        let rows = sqlx::query(
            "SELECT partition_id, owner, version, expires_at FROM partition_ownership \
             WHERE scope = $1 ORDER BY partition_id",
        )
        .bind(text(scope).as_ref())
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
                    expires_at: get(r, "expires_at")?,
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
        let expires_at = ts(expires_at);
        let (query, version) = match expected_version {
            None => (
                sqlx::query(
                    "INSERT INTO partition_ownership (scope, partition_id, owner, version, expires_at) \
                     VALUES ($1, $2, $3, 1, $4) ON CONFLICT (scope, partition_id) DO NOTHING",
                )
                .bind(text(scope).into_owned())
                .bind(text(partition).into_owned())
                .bind(text(owner).into_owned())
                .bind(expires_at),
                1,
            ),
            Some(v) => (
                sqlx::query(
                    "UPDATE partition_ownership SET owner = $3, version = version + 1, expires_at = $4 \
                     WHERE scope = $1 AND partition_id = $2 AND version = $5",
                )
                .bind(text(scope).into_owned())
                .bind(text(partition).into_owned())
                .bind(text(owner).into_owned())
                .bind(expires_at)
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
            expires_at,
        }))
    }
}
