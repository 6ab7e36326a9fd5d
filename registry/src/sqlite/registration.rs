//! Device registration on SQLite: the statements of one registration as connection-level
//! helpers, used by the single-device operations and by the batch ones.
//!
//! A batch runs in one `BEGIN IMMEDIATE` transaction and applies, per device, exactly the
//! statements a single call would, so the rules cannot drift apart. What a batch shares:
//! - the devices already stored are read with one query per chunk of ids instead of one
//!   per device (a device begun earlier in the same batch is seen as In Progress, so a
//!   repeated id is a conflict, as it would be in two calls);
//! - each distinct category is upserted once.
//!
//! A per-device refusal (conflict, invalid input, unknown device) is that device's result
//! and leaves the others alone: SQLite undoes only the failed statement, never the
//! transaction. A database failure fails the whole batch and nothing is written.

use std::collections::{BTreeMap, HashMap};

use sqlx::{QueryBuilder, Sqlite, SqliteConnection};
use uuid::Uuid;

use super::{
    db, device_from_row, fetch_device, insert_history, is_unique_violation, json_text, now,
    write_category, SqliteStore, DEVICE_COLS,
};
use crate::model::*;
use crate::store::{StoreError, StoreResult};
use crate::DeviceId;

/// Ids per `IN (...)` lookup: well under SQLite's limit on bound parameters.
const LOOKUP_CHUNK: usize = 500;

/// Starts one registration on `conn`, inside the caller's write transaction. `existing` is
/// the stored device with this id, read in the same transaction.
pub(super) async fn begin_one(
    conn: &mut SqliteConnection,
    device: &NewDevice,
    existing: Option<&Device>,
    at: &str,
) -> StoreResult<Device> {
    let tags = json_text(&device.tags, "tags")?;
    let settings = device
        .settings
        .as_ref()
        .map(|s| json_text(s, "settings"))
        .transpose()?;
    let row = match existing {
        None => sqlx::query(&format!(
            "INSERT INTO devices (id, device_id, name, provider_instance, category, account, \
             connection_state, settings, tags, registration_status, is_simulated, created_at, updated_at) \
             VALUES (?, ?, ?, ?, ?, ?, FALSE, ?, ?, ?, ?, ?, ?) RETURNING {DEVICE_COLS}"
        ))
        .bind(Uuid::now_v7().to_string())
        .bind(device.device_id.as_str())
        .bind(&device.name)
        .bind(&device.provider_instance)
        .bind(&device.category)
        .bind(&device.account)
        .bind(&settings)
        .bind(&tags)
        .bind(RegistrationStatus::InProgress.value())
        .bind(device.is_simulated.value())
        .bind(at)
        .bind(at)
        .fetch_one(&mut *conn)
        .await
        .map_err(|e| {
            if is_unique_violation(&e) {
                StoreError::Conflict(format!(
                    "device {} is being registered by another request: wait for it, then check its status",
                    device.device_id
                ))
            } else {
                db("inserting a device")(e)
            }
        })?,
        Some(existing) => match existing.registration_status {
            RegistrationStatus::Registered | RegistrationStatus::InProgress => {
                return Err(StoreError::Conflict(format!(
                    "device {} is already {} on provider instance {}: unregister it first",
                    existing.device_id,
                    existing.registration_status.label(),
                    existing.provider_instance
                )));
            }
            RegistrationStatus::Unregistered
            | RegistrationStatus::Unknown
            | RegistrationStatus::Error => sqlx::query(&format!(
                "UPDATE devices SET name = ?, provider_instance = ?, category = ?, account = ?, \
                 settings = ?, tags = ?, is_simulated = ?, registration_status = ?, \
                 registration_message = NULL, updated_at = ? WHERE id = ? RETURNING {DEVICE_COLS}"
            ))
            .bind(&device.name)
            .bind(&device.provider_instance)
            .bind(&device.category)
            .bind(&device.account)
            .bind(&settings)
            .bind(&tags)
            .bind(device.is_simulated.value())
            .bind(RegistrationStatus::InProgress.value())
            .bind(at)
            .bind(existing.id.to_string())
            .fetch_one(&mut *conn)
            .await
            .map_err(db("restarting a registration"))?,
        },
    };
    device_from_row(&row)
}

/// Ends one registration on `conn`, inside the caller's write transaction: Registered with
/// a Register history row, or Error with the message. `NotFound` for an unknown device.
pub(super) async fn finish_one(
    conn: &mut SqliteConnection,
    id: &DeviceId,
    outcome: &Result<Option<String>, String>,
    at: &str,
) -> StoreResult<Device> {
    let (status, message) = match outcome {
        Ok(message) => (RegistrationStatus::Registered, message.as_deref()),
        Err(message) => (RegistrationStatus::Error, Some(message.as_str())),
    };
    let row = sqlx::query(&format!(
        "UPDATE devices SET registration_status = ?, registration_message = ?, updated_at = ? \
         WHERE device_id = ? RETURNING {DEVICE_COLS}"
    ))
    .bind(status.value())
    .bind(message)
    .bind(at)
    .bind(id.as_str())
    .fetch_optional(&mut *conn)
    .await
    .map_err(db("finishing a registration"))?
    .ok_or_else(|| StoreError::NotFound {
        entity: "device",
        key: id.to_string(),
    })?;
    let device = device_from_row(&row)?;
    if outcome.is_ok() {
        insert_history(conn, &device, RegistrationAction::Register, at).await?;
    }
    Ok(device)
}

/// The stored devices among `ids`, by id (one query per [`LOOKUP_CHUNK`] ids).
async fn fetch_devices(
    conn: &mut SqliteConnection,
    ids: &[&DeviceId],
) -> StoreResult<HashMap<DeviceId, Device>> {
    let mut found = HashMap::new();
    for chunk in ids.chunks(LOOKUP_CHUNK) {
        let mut qb = QueryBuilder::<Sqlite>::new(format!(
            "SELECT {DEVICE_COLS} FROM devices WHERE device_id IN ("
        ));
        let mut list = qb.separated(", ");
        for id in chunk {
            list.push_bind(id.as_str());
        }
        qb.push(")");
        let rows = qb
            .build()
            .fetch_all(&mut *conn)
            .await
            .map_err(db("reading devices"))?;
        for row in &rows {
            let device = device_from_row(row)?;
            found.insert(device.device_id.clone(), device);
        }
    }
    Ok(found)
}

/// A per-device refusal, kept as that device's result; anything else fails the batch.
fn per_device<T>(result: StoreResult<T>) -> StoreResult<StoreResult<T>> {
    match result {
        Err(e @ StoreError::Database(_)) => Err(e),
        other => Ok(other),
    }
}

impl SqliteStore {
    /// See [`crate::Store::begin_registration`]; the device is read in the transaction.
    pub(super) async fn begin_single(&self, device: &NewDevice) -> StoreResult<Device> {
        let mut tx = self.write().await?;
        let existing = fetch_device(&mut tx, &device.device_id).await?;
        let stored = begin_one(&mut tx, device, existing.as_ref(), &now()).await?;
        tx.commit().await.map_err(db("committing a registration"))?;
        Ok(stored)
    }

    /// See [`crate::Store::finish_registration`].
    pub(super) async fn finish_single(
        &self,
        id: &DeviceId,
        outcome: Result<Option<String>, String>,
    ) -> StoreResult<Device> {
        let mut tx = self.write().await?;
        let device = finish_one(&mut tx, id, &outcome, &now()).await?;
        tx.commit().await.map_err(db("committing a registration"))?;
        Ok(device)
    }

    /// See [`crate::Store::begin_registrations`].
    pub(super) async fn begin_batch(
        &self,
        devices: &[NewDevice],
    ) -> StoreResult<Vec<StoreResult<Device>>> {
        if devices.is_empty() {
            return Ok(Vec::new());
        }
        let mut tx = self.write().await?;
        let at = now();
        let mut categories: BTreeMap<&str, Option<StoreError>> = devices
            .iter()
            .filter_map(|d| d.category.as_deref())
            .map(|c| (c, None))
            .collect();
        for (name, refused) in &mut categories {
            if let Err(e) = per_device(write_category(&mut tx, name, None).await)? {
                *refused = Some(e);
            }
        }
        let ids: Vec<&DeviceId> = devices.iter().map(|d| &d.device_id).collect();
        let mut stored = fetch_devices(&mut tx, &ids).await?;
        let mut out = Vec::with_capacity(devices.len());
        for device in devices {
            let refused = device
                .category
                .as_deref()
                .and_then(|c| categories.get(c))
                .and_then(Option::as_ref);
            if let Some(e) = refused {
                out.push(Err(e.clone()));
                continue;
            }
            let existing = stored.get(&device.device_id);
            let begun = per_device(begin_one(&mut tx, device, existing, &at).await)?;
            if let Ok(d) = &begun {
                stored.insert(d.device_id.clone(), d.clone());
            }
            out.push(begun);
        }
        tx.commit()
            .await
            .map_err(db("committing a batch of registrations"))?;
        Ok(out)
    }

    /// See [`crate::Store::finish_registrations`].
    pub(super) async fn finish_batch(
        &self,
        outcomes: &[(DeviceId, Result<Option<String>, String>)],
    ) -> StoreResult<Vec<StoreResult<Device>>> {
        if outcomes.is_empty() {
            return Ok(Vec::new());
        }
        let mut tx = self.write().await?;
        let at = now();
        let mut out = Vec::with_capacity(outcomes.len());
        for (id, outcome) in outcomes {
            out.push(per_device(finish_one(&mut tx, id, outcome, &at).await)?);
        }
        tx.commit()
            .await
            .map_err(db("committing a batch of registrations"))?;
        Ok(out)
    }
}
