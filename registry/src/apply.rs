//! Group commit's one loop, written once for every backend: the order of the writes, the
//! per-batch device cache, what an unknown device means (a dead letter, or a registration)
//! and the once-per-device last-activity bump. A backend opens its transaction, hands this
//! loop its statements through [`BatchWriter`], and commits.
//!
//! Two things are shared across a batch, and neither changes a result:
//! - each device is read once per batch (a cache of the rows read or inserted here; the
//!   columns telemetry uses, the row id and the provider instance, do not change inside a
//!   batch);
//! - each device's last activity is bumped once, at the end, in device order, to the latest
//!   reception time of its readings in the batch (the stored value is "the later of", so
//!   the order of the bumps does not matter).

use std::collections::{BTreeMap, HashMap};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::batch::{BatchOutcome, BatchWrite, IfUnknown};
use crate::error::{StoreError, StoreResult};
use crate::model::{CommittedAlert, Device, NewDeadLetter, TelemetryCommit};
use crate::DeviceId;

/// The statements of one backend, inside the transaction of one batch.
#[async_trait]
pub(crate) trait BatchWriter: Send {
    /// The device row, if registered.
    async fn fetch_device(&mut self, id: &DeviceId) -> StoreResult<Option<Device>>;
    /// Registers a device first seen in telemetry (`auto_register`).
    async fn insert_unknown_device(
        &mut self,
        id: &DeviceId,
        provider_instance: &str,
    ) -> StoreResult<()>;
    /// Keeps a dead letter.
    async fn write_dead_letter(&mut self, letter: &NewDeadLetter) -> StoreResult<()>;
    /// Inserts a reading's alerts (dedupe, debounce, commands, outbox).
    async fn insert_alerts(
        &mut self,
        device: &Device,
        commit: &TelemetryCommit,
    ) -> StoreResult<Vec<CommittedAlert>>;
    /// Applies a connection state unless a newer one is stored; `None`: unknown device.
    async fn write_connection_state(
        &mut self,
        id: &DeviceId,
        connected: bool,
        at: DateTime<Utc>,
    ) -> StoreResult<Option<bool>>;
    /// Stores reported properties; `false`: unknown device.
    async fn write_reported(
        &mut self,
        id: &DeviceId,
        reported: &serde_json::Value,
        at: DateTime<Utc>,
    ) -> StoreResult<bool>;
    /// Moves a device's last activity to `at` unless it is already later.
    async fn bump_activity(&mut self, device: &Uuid, at: DateTime<Utc>) -> StoreResult<()>;
}

/// What a backend refuses for one write alone, checked before its transaction opens.
pub(crate) fn check(writes: &[BatchWrite]) -> StoreResult<()> {
    for write in writes {
        if let BatchWrite::Telemetry { commit, .. } = write {
            commit.check()?;
        }
    }
    Ok(())
}

/// Applies `writes` in order through `w`; the caller commits the transaction after.
pub(crate) async fn apply<W: BatchWriter + ?Sized>(
    w: &mut W,
    writes: &[BatchWrite],
) -> StoreResult<Vec<BatchOutcome>> {
    let mut devices: HashMap<DeviceId, Option<Device>> = HashMap::new();
    let mut activity: BTreeMap<Uuid, DateTime<Utc>> = BTreeMap::new();
    let mut out = Vec::with_capacity(writes.len());
    for write in writes {
        let outcome = match write {
            BatchWrite::Telemetry { commit, if_unknown } => {
                let id = &commit.device_id;
                if !devices.contains_key(id) {
                    let found = w.fetch_device(id).await?;
                    devices.insert(id.clone(), found);
                }
                let mut registered = false;
                if devices.get(id).is_some_and(Option::is_none) {
                    match if_unknown {
                        IfUnknown::DeadLetter(letter) => {
                            w.write_dead_letter(letter).await?;
                            out.push(BatchOutcome::DeadLettered);
                            continue;
                        }
                        IfUnknown::Register { provider_instance } => {
                            w.insert_unknown_device(id, provider_instance).await?;
                            let device = w.fetch_device(id).await?.ok_or_else(|| {
                                StoreError::Database(format!(
                                    "device {id} was inserted but cannot be read back"
                                ))
                            })?;
                            devices.insert(id.clone(), Some(device));
                            registered = true;
                        }
                    }
                }
                let device = devices
                    .get(id)
                    .and_then(Option::as_ref)
                    .ok_or_else(|| StoreError::NotFound {
                        entity: "device",
                        key: id.to_string(),
                    })?
                    .clone();
                activity
                    .entry(device.id)
                    .and_modify(|t| *t = (*t).max(commit.received_at))
                    .or_insert(commit.received_at);
                let alerts = w.insert_alerts(&device, commit).await?;
                BatchOutcome::Telemetry { alerts, registered }
            }
            BatchWrite::DeadLetter(letter) => {
                w.write_dead_letter(letter).await?;
                BatchOutcome::DeadLettered
            }
            BatchWrite::Connection {
                device_id,
                connected,
                at,
            } => match w.write_connection_state(device_id, *connected, *at).await? {
                Some(applied) => BatchOutcome::Connection { applied },
                None => BatchOutcome::UnknownDevice,
            },
            BatchWrite::Reported {
                device_id,
                properties,
                at,
            } => {
                if w.write_reported(device_id, properties, *at).await? {
                    BatchOutcome::Reported
                } else {
                    BatchOutcome::UnknownDevice
                }
            }
        };
        out.push(outcome);
    }
    for (device, at) in activity {
        w.bump_activity(&device, at).await?;
    }
    Ok(out)
}
