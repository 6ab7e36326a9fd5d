//! Group commit on PostgreSQL: every write of a batch in one transaction, after the
//! advisory locks of every device and debounce key of the batch (taken in one sorted order,
//! so concurrent batches of several replicas serialize where they overlap and never
//! deadlock on each other). The writes are applied in order by the backend-neutral loop
//! (`crate::apply`), as on SQLite.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use uuid::Uuid;

use sqlx::PgConnection;

use super::alerts::{insert_alerts, telemetry_locks};
use super::devices::{
    bump_activity, fetch_device, insert_unknown_device, write_connection_state, write_reported,
};
use super::outbox::write_dead_letter;
use super::{db, lock_all, retrying, PostgresStore};
use crate::apply::{self, BatchWriter};
use crate::batch::{BatchOutcome, BatchWrite};
use crate::model::{CommittedAlert, Device, NewDeadLetter, TelemetryCommit};
use crate::store::StoreResult;
use crate::DeviceId;

impl PostgresStore {
    /// See [`crate::Store::commit_batch`].
    pub(super) async fn apply_batch(
        &self,
        writes: &[BatchWrite],
    ) -> StoreResult<Vec<BatchOutcome>> {
        if writes.is_empty() {
            return Ok(Vec::new());
        }
        apply::check(writes)?;
        retrying(|| self.apply_batch_once(writes)).await
    }

    async fn apply_batch_once(&self, writes: &[BatchWrite]) -> StoreResult<Vec<BatchOutcome>> {
        let mut tx = self.write().await?;
        lock_all(&mut tx, telemetry_locks(writes)).await?;
        let out = apply::apply(&mut Writer(&mut tx), writes).await?;
        tx.commit().await.map_err(db("committing a batch"))?;
        Ok(out)
    }
}

/// This backend's statements for [`apply::apply`], on the batch's transaction.
struct Writer<'c>(&'c mut PgConnection);

#[async_trait]
impl BatchWriter for Writer<'_> {
    async fn fetch_device(&mut self, id: &DeviceId) -> StoreResult<Option<Device>> {
        fetch_device(self.0, id).await
    }
    async fn insert_unknown_device(
        &mut self,
        id: &DeviceId,
        provider_instance: &str,
    ) -> StoreResult<()> {
        insert_unknown_device(self.0, id, provider_instance).await
    }
    async fn write_dead_letter(&mut self, letter: &NewDeadLetter) -> StoreResult<()> {
        write_dead_letter(self.0, letter).await.map(drop)
    }
    async fn insert_alerts(
        &mut self,
        device: &Device,
        commit: &TelemetryCommit,
    ) -> StoreResult<Vec<CommittedAlert>> {
        insert_alerts(self.0, device, commit).await
    }
    async fn write_connection_state(
        &mut self,
        id: &DeviceId,
        connected: bool,
        at: DateTime<Utc>,
    ) -> StoreResult<Option<bool>> {
        write_connection_state(self.0, id, connected, at).await
    }
    async fn write_reported(
        &mut self,
        id: &DeviceId,
        reported: &serde_json::Value,
        at: DateTime<Utc>,
    ) -> StoreResult<bool> {
        write_reported(self.0, id, reported, at).await
    }
    async fn bump_activity(&mut self, device: &Uuid, at: DateTime<Utc>) -> StoreResult<()> {
        bump_activity(self.0, device, at).await
    }
}
