//! Group commit on SQLite: every write of a batch in one `BEGIN IMMEDIATE` transaction.
//!
//! Writes are applied in order with the same statements as the single-event operations,
//! so a later write sees every earlier one. Two things are shared across the batch, and
//! neither changes a result:
//! - each device is read once per batch (a cache of the rows read or inserted here; the
//!   columns telemetry uses, the row id and the provider instance, do not change inside a
//!   batch);
//! - each device's last activity is bumped once, at the end, to the latest reception time
//!   of its readings in the batch (the stored value is "the later of", so the order of the
//!   bumps does not matter).

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::{
    bump_activity, db, fetch_device, insert_alerts, insert_unknown_device, write_connection_state,
    write_dead_letter, write_reported, SqliteStore,
};
use crate::batch::{BatchOutcome, BatchWrite, IfUnknown};
use crate::model::Device;
use crate::store::{StoreError, StoreResult};
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
        for write in writes {
            if let BatchWrite::Telemetry { commit, .. } = write {
                commit.check()?;
            }
        }
        let mut tx = self.write().await?;
        let mut devices: HashMap<DeviceId, Option<Device>> = HashMap::new();
        let mut activity: BTreeMap<Uuid, DateTime<Utc>> = BTreeMap::new();
        let mut out = Vec::with_capacity(writes.len());
        for write in writes {
            let outcome = match write {
                BatchWrite::Telemetry { commit, if_unknown } => {
                    let id = &commit.device_id;
                    if !devices.contains_key(id) {
                        let found = fetch_device(&mut tx, id).await?;
                        devices.insert(id.clone(), found);
                    }
                    let mut registered = false;
                    if devices.get(id).is_some_and(Option::is_none) {
                        match if_unknown {
                            IfUnknown::DeadLetter(letter) => {
                                write_dead_letter(&mut tx, letter).await?;
                                out.push(BatchOutcome::DeadLettered);
                                continue;
                            }
                            IfUnknown::Register { provider_instance } => {
                                insert_unknown_device(&mut tx, id, provider_instance).await?;
                                let device = fetch_device(&mut tx, id).await?.ok_or_else(|| {
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
                    let alerts = insert_alerts(&mut tx, &device, commit).await?;
                    BatchOutcome::Telemetry { alerts, registered }
                }
                BatchWrite::DeadLetter(letter) => {
                    write_dead_letter(&mut tx, letter).await?;
                    BatchOutcome::DeadLettered
                }
                BatchWrite::Connection {
                    device_id,
                    connected,
                    at,
                } => match write_connection_state(&mut tx, device_id, *connected, *at).await? {
                    Some(applied) => BatchOutcome::Connection { applied },
                    None => BatchOutcome::UnknownDevice,
                },
                BatchWrite::Reported {
                    device_id,
                    properties,
                    at,
                } => {
                    if write_reported(&mut tx, device_id, properties, *at).await? {
                        BatchOutcome::Reported
                    } else {
                        BatchOutcome::UnknownDevice
                    }
                }
            };
            out.push(outcome);
        }
        for (device, at) in activity {
            bump_activity(&mut tx, &device, at).await?;
        }
        tx.commit().await.map_err(db("committing a batch"))?;
        Ok(out)
    }
}
