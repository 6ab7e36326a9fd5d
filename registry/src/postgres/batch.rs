//! Group commit on PostgreSQL: every write of a batch in one transaction, after the
//! advisory locks of every device and debounce key of the batch (taken in one sorted order,
//! so concurrent batches of several replicas serialize where they overlap and never
//! deadlock on each other). The writes are applied by the backend-neutral loop
//! (`crate::apply`), as on SQLite; a batch's alerts, devices and activity bumps are one
//! statement each, their rows passed as arrays (`unnest`).

use std::collections::{HashMap, HashSet};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use uuid::Uuid;

use sqlx::PgConnection;

use super::alerts::{
    alerts_by_token, commit_locks, debounce_matches, insert_alert_rows, queue_outbox,
    telemetry_locks,
};
use super::commands::insert_command_row;
use super::devices::{
    bump_activity, insert_unknown_device, require_device, write_connection_state, write_reported,
};
use super::outbox::write_dead_letter;
use super::{db, lock_all, retrying, PostgresStore};
use crate::apply::{self, AlertRow, BatchWriter, OutboxRow};
use crate::batch::{BatchOutcome, BatchWrite};
use crate::decide::DebounceMatch;
use crate::fold::Probe;
use crate::model::{
    Alert, Command, CommittedAlert, Device, NewAlertCommand, NewDeadLetter, TelemetryCommit,
};
use crate::readings::{ReadingRow, RollupRow};
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

    /// See [`crate::Store::commit_telemetry`]: a batch of one reading, whose device must be
    /// registered.
    pub(super) async fn telemetry(
        &self,
        commit: &TelemetryCommit,
    ) -> StoreResult<Vec<CommittedAlert>> {
        commit.check()?;
        let mut keys = Vec::new();
        commit_locks(commit, &mut keys);
        let subs = self.subs();
        retrying(|| async {
            let mut tx = self.write().await?;
            lock_all(&mut tx, keys.clone()).await?;
            let device = require_device(&mut tx, &commit.device_id).await?;
            let out = apply::telemetry(&mut Writer(&mut tx), &device, commit, &subs).await?;
            tx.commit().await.map_err(db("committing telemetry"))?;
            Ok(out)
        })
        .await
    }

    async fn apply_batch_once(&self, writes: &[BatchWrite]) -> StoreResult<Vec<BatchOutcome>> {
        let mut tx = self.write().await?;
        lock_all(&mut tx, telemetry_locks(writes)).await?;
        let out = apply::apply(&mut Writer(&mut tx), writes, &self.subs()).await?;
        tx.commit().await.map_err(db("committing a batch"))?;
        Ok(out)
    }
}

/// This backend's statements for [`apply::apply`], on the batch's transaction.
struct Writer<'c>(&'c mut PgConnection);

#[async_trait]
impl BatchWriter for Writer<'_> {
    fn stored_text<'s>(&self, s: &'s str) -> std::borrow::Cow<'s, str> {
        super::text(s)
    }
    async fn fetch_devices(&mut self, ids: &[&DeviceId]) -> StoreResult<HashMap<DeviceId, Device>> {
        super::registration::fetch_devices(self.0, ids).await
    }
    async fn insert_unknown_device(
        &mut self,
        id: &DeviceId,
        provider_instance: &str,
    ) -> StoreResult<()> {
        insert_unknown_device(self.0, id, provider_instance)
            .await
            .map(drop)
    }
    async fn device_changed(
        &mut self,
        id: &DeviceId,
        connection: bool,
        subs: &crate::model::Subscriptions,
    ) -> StoreResult<()> {
        super::devices::device_changed(self.0, id, connection, subs).await
    }
    async fn write_dead_letter(&mut self, letter: &NewDeadLetter) -> StoreResult<()> {
        write_dead_letter(self.0, letter).await.map(drop)
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
    async fn alerts_by_token(&mut self, tokens: &[&str]) -> StoreResult<Vec<Alert>> {
        alerts_by_token(self.0, tokens).await
    }
    async fn debounce_matches(
        &mut self,
        probes: &[Probe<'_>],
    ) -> StoreResult<Vec<Option<DebounceMatch>>> {
        debounce_matches(self.0, probes).await
    }
    async fn insert_alerts(&mut self, rows: &[AlertRow<'_>]) -> StoreResult<Vec<Alert>> {
        insert_alert_rows(self.0, rows).await
    }
    async fn insert_alert_command(
        &mut self,
        device: &Device,
        command: &NewAlertCommand,
        alert: Uuid,
        subs: &crate::model::Subscriptions,
    ) -> StoreResult<Command> {
        insert_command_row(
            self.0,
            device,
            &command.name,
            &command.message,
            Some(alert),
            &command.correlation_id,
            None,
            subs,
        )
        .await
    }
    async fn queue_outbox(&mut self, items: &[OutboxRow<'_>]) -> StoreResult<()> {
        queue_outbox(self.0, items).await
    }
    async fn bump_activity(&mut self, devices: &[(Uuid, DateTime<Utc>)]) -> StoreResult<()> {
        bump_activity(self.0, devices).await
    }
    async fn stored_readings(
        &mut self,
        rows: &[ReadingRow],
    ) -> StoreResult<HashSet<crate::readings::ReadingKey>> {
        super::readings::stored_readings(self.0, rows).await
    }
    async fn insert_readings(&mut self, rows: &[ReadingRow]) -> StoreResult<()> {
        super::readings::insert_readings(self.0, rows)
            .await
            .map(drop)
    }
    async fn insert_readings_if_all_new(&mut self, rows: &[ReadingRow]) -> StoreResult<bool> {
        super::readings::insert_if_all_new(self.0, rows).await
    }
    async fn add_rollups(&mut self, rows: &[RollupRow]) -> StoreResult<()> {
        super::readings::add_rollups(self.0, rows).await
    }
}
