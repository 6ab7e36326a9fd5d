//! Group commit on SQLite: every write of a batch in one `BEGIN IMMEDIATE` transaction,
//! applied by the backend-neutral loop (`crate::apply`) through this backend's statements.
//! A batch's alerts, devices and activity bumps are each one statement, their rows passed
//! as one JSON array read with `json_each`: one hand-off to sqlx's SQLite worker thread
//! per statement, whatever the batch's size, and one prepared statement reused.

use std::collections::{HashMap, HashSet};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use uuid::Uuid;

use sqlx::SqliteConnection;

use super::readings::{SeriesCache, TxSeries};
use super::{
    alerts_by_token, bump_activity, db, debounce_matches, insert_alert_rows, insert_command_row,
    insert_unknown_device, queue_outbox, require_device, write_connection_state, write_dead_letter,
    write_reported, SqliteStore,
};
use crate::apply::{self, AlertRow, BatchWriter, OutboxRow};
use crate::batch::{BatchOutcome, BatchWrite};
use crate::decide::DebounceMatch;
use crate::fold::Probe;
use crate::model::{
    Alert, Command, CommittedAlert, Device, NewAlertCommand, NewDeadLetter, Subscriptions,
    TelemetryCommit,
};
use crate::readings::{ReadingRow, RollupRow};
use crate::store::StoreResult;
use crate::DeviceId;

impl SqliteStore {
    /// See [`crate::Store::commit_batch`].
    pub(super) async fn apply_batch(
        &self,
        writes: &[BatchWrite],
    ) -> StoreResult<Vec<BatchOutcome>> {
        if writes.is_empty() {
            return Ok(Vec::new());
        }
        apply::check(writes)?;
        let mut tx = self.write().await?;
        let subs = self.subs();
        let mut w = Writer(&mut tx, &self.series, Default::default());
        let out = apply::apply(&mut w, writes, &subs).await?;
        let series = w.2;
        tx.commit().await.map_err(db("committing a batch"))?;
        self.series.remember(series);
        Ok(out)
    }

    /// See [`crate::Store::commit_telemetry`]: a batch of one reading, whose device must be
    /// registered.
    pub(super) async fn telemetry(
        &self,
        commit: &TelemetryCommit,
    ) -> StoreResult<Vec<CommittedAlert>> {
        commit.check()?;
        let mut tx = self.write().await?;
        let device = require_device(&mut tx, &commit.device_id).await?;
        let mut w = Writer(&mut tx, &self.series, Default::default());
        let out = apply::telemetry(&mut w, &device, commit, &self.subs()).await?;
        let series = w.2;
        tx.commit().await.map_err(db("committing telemetry"))?;
        self.series.remember(series);
        Ok(out)
    }
}

/// This backend's statements for [`apply::apply`], on the batch's transaction, with the
/// store's reading series and those this transaction adds.
struct Writer<'c>(&'c mut SqliteConnection, &'c SeriesCache, TxSeries);

#[async_trait]
impl BatchWriter for Writer<'_> {
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
        subs: &Subscriptions,
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
    async fn device_changed(
        &mut self,
        id: &DeviceId,
        connection: bool,
        subs: &Subscriptions,
    ) -> StoreResult<()> {
        super::devices::device_changed(self.0, id, connection, subs).await
    }
    async fn bump_activity(&mut self, devices: &[(Uuid, DateTime<Utc>)]) -> StoreResult<()> {
        bump_activity(self.0, devices).await
    }
    async fn stored_readings(
        &mut self,
        rows: &[ReadingRow],
    ) -> StoreResult<HashSet<crate::readings::ReadingKey>> {
        super::readings::stored_readings(self.0, self.1, &mut self.2, rows).await
    }
    async fn insert_readings(&mut self, rows: &[ReadingRow]) -> StoreResult<()> {
        super::readings::insert_readings(self.0, self.1, &mut self.2, rows)
            .await
            .map(drop)
    }
    async fn insert_readings_if_all_new(&mut self, rows: &[ReadingRow]) -> StoreResult<bool> {
        super::readings::insert_if_all_new(self.0, self.1, &mut self.2, rows).await
    }
    async fn add_rollups(&mut self, rows: &[RollupRow]) -> StoreResult<()> {
        super::readings::add_rollups(self.0, self.1, &mut self.2, rows).await
    }
}
