//! Group commit on PostgreSQL: every write of a batch in one transaction, after the
//! advisory locks of every device and debounce key of the batch (taken in one sorted order,
//! so concurrent batches of several replicas serialize where they overlap and never
//! deadlock on each other).
//!
//! Writes are applied in order with the same statements as the single-event operations,
//! so a later write sees every earlier one. As on SQLite, each device is read once per
//! batch and its last activity bumped once, at the end (in device order).

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::alerts::{insert_alerts, telemetry_locks};
use super::devices::{
    bump_activity, fetch_device, insert_unknown_device, write_connection_state, write_reported,
};
use super::outbox::write_dead_letter;
use super::{db, lock_all, retrying, PostgresStore};
use crate::batch::{BatchOutcome, BatchWrite, IfUnknown};
use crate::model::Device;
use crate::store::{StoreError, StoreResult};
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
        for write in writes {
            if let BatchWrite::Telemetry { commit, .. } = write {
                commit.check()?;
            }
        }
        retrying(|| self.apply_batch_once(writes)).await
    }

    async fn apply_batch_once(&self, writes: &[BatchWrite]) -> StoreResult<Vec<BatchOutcome>> {
        let mut tx = self.write().await?;
        lock_all(&mut tx, telemetry_locks(writes)).await?;
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
