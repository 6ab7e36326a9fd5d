//! Device registration on PostgreSQL, for one device or a batch (a single device is a batch
//! of one). The decisions are `crate::decide`'s; this room reads what they need and writes
//! what they decided, with set-oriented statements (one `= ANY($1)` read, multi-row
//! inserts, one `UPDATE ... FROM (VALUES ...)` per finishing round).
//!
//! Every registration transaction of every replica first takes one advisory lock
//! ([`take_turn`]): registrations are rare next to telemetry, and taking turns keeps each
//! one's decisions (read, decide, write) on a registry no one else changes meanwhile, as
//! SQLite's single writer does.

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, Postgres, QueryBuilder};
use uuid::Uuid;

use super::devices::device_changed;
use super::rows::{category_from_row, device_from_row, CATEGORY_COLS, DEVICE_COLS};
use super::{db, is_unique_violation, jsonb, lock_key, now, retrying, text, PostgresStore};
use crate::decide::{self, BeginPlan};
use crate::model::*;
use crate::store::{StoreError, StoreResult};
use crate::DeviceId;

/// Most rows one statement writes: with 12 bound values per device row, well under
/// PostgreSQL's limit of 65,535 bound parameters.
const ROWS_PER_STATEMENT: usize = 1000;

/// A finish outcome: the device id and `Ok(message)` (Registered) or `Err(message)` (Error).
type Outcome = (DeviceId, Result<Option<String>, String>);

/// Waits for this transaction's turn among the registration transactions of every replica.
pub(super) async fn take_turn(conn: &mut PgConnection) -> StoreResult<()> {
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(lock_key("registry", "registration"))
        .execute(&mut *conn)
        .await
        .map_err(db("waiting for the registration lock"))?;
    Ok(())
}

/// Writes Register/Unregister history rows for these devices, and queues each row's one
/// change event (version 1: a history row never changes) for each sink in `subs` taking
/// registration history.
pub(super) async fn insert_history(
    conn: &mut PgConnection,
    rows: &[(&Device, RegistrationAction)],
    at: DateTime<Utc>,
    subs: &Subscriptions,
) -> StoreResult<()> {
    let sinks = subs.sink_names(ENTITY_HISTORY);
    for chunk in rows.chunks(ROWS_PER_STATEMENT) {
        let ids: Vec<Uuid> = chunk.iter().map(|_| Uuid::now_v7()).collect();
        let mut qb = QueryBuilder::<Postgres>::new(
            "INSERT INTO registration_history (id, device, device_id, name, action, provider_instance, created_at) ",
        );
        qb.push_values(chunk.iter().zip(&ids), |mut b, ((device, action), id)| {
            b.push_bind(*id)
                .push_bind(device.id)
                .push_bind(device.device_id.as_str().to_owned())
                .push_bind(history_name(device, *action))
                .push_bind(action.value())
                .push_bind(device.provider_instance.clone())
                .push_bind(at);
        });
        qb.build()
            .execute(&mut *conn)
            .await
            .map_err(db("writing registration history"))?;
        if !sinks.is_empty() {
            let events = chunk
                .iter()
                .zip(&ids)
                .map(|((device, action), id)| {
                    let row = RegistrationHistory {
                        id: *id,
                        device: device.id,
                        device_id: device.device_id.clone(),
                        name: history_name(device, *action),
                        action: *action,
                        provider_instance: device.provider_instance.clone(),
                        created_at: at,
                    };
                    ChangeEvent::new(ENTITY_HISTORY, &id.to_string(), 1, &row)
                })
                .collect::<StoreResult<Vec<_>>>()?;
            super::outbox::queue_changes(conn, &sinks, &events, false).await?;
        }
    }
    Ok(())
}

/// The name of a history row: the action's label and the device id.
fn history_name(device: &Device, action: RegistrationAction) -> String {
    format!("{} {}", action.label(), device.device_id)
}

/// The stored devices among `ids`, by id.
pub(super) async fn fetch_devices(
    conn: &mut PgConnection,
    ids: &[&DeviceId],
) -> StoreResult<HashMap<DeviceId, Device>> {
    let ids: Vec<&str> = ids.iter().map(|id| id.as_str()).collect();
    let rows = sqlx::query(&format!(
        "SELECT {DEVICE_COLS} FROM devices WHERE device_id = ANY($1)"
    ))
    .bind(&ids)
    .fetch_all(&mut *conn)
    .await
    .map_err(db("reading devices"))?;
    let mut found = HashMap::with_capacity(rows.len());
    for row in &rows {
        let device = device_from_row(row)?;
        found.insert(device.device_id.clone(), device);
    }
    Ok(found)
}

/// A device's JSON columns as stored.
fn documents(device: &NewDevice) -> StoreResult<(serde_json::Value, Option<serde_json::Value>)> {
    Ok((
        super::json_value(&device.tags, "tags")?,
        device.settings.clone(),
    ))
}

/// Inserts new devices as In Progress and returns them in order.
async fn insert_devices(
    conn: &mut PgConnection,
    devices: &[&NewDevice],
    at: DateTime<Utc>,
) -> StoreResult<Vec<Device>> {
    let mut out = Vec::with_capacity(devices.len());
    for chunk in devices.chunks(ROWS_PER_STATEMENT) {
        let mut rows = Vec::with_capacity(chunk.len());
        for device in chunk {
            rows.push((Uuid::now_v7(), *device, documents(device)?));
        }
        let mut qb = QueryBuilder::<Postgres>::new(
            "INSERT INTO devices (id, device_id, name, provider_instance, category, account, \
             connection_state, settings, tags, registration_status, is_simulated, created_at, updated_at) ",
        );
        qb.push_values(&rows, |mut b, (id, device, (tags, settings))| {
            b.push_bind(*id)
                .push_bind(device.device_id.as_str().to_owned())
                .push_bind(text(&device.name).into_owned())
                .push_bind(text(&device.provider_instance).into_owned())
                .push_bind(device.category.as_deref().map(|c| text(c).into_owned()))
                .push_bind(device.account.as_deref().map(|a| text(a).into_owned()))
                .push_unseparated(", FALSE")
                .push_bind(settings.as_ref().map(jsonb))
                .push_bind(jsonb(tags))
                .push_bind(RegistrationStatus::InProgress.value())
                .push_bind(device.is_simulated.value())
                .push_bind(at)
                .push_bind(at);
        });
        qb.push(format!(" RETURNING {DEVICE_COLS}"));
        let inserted = qb.build().fetch_all(&mut *conn).await.map_err(|e| {
            if is_unique_violation(&e) {
                StoreError::Conflict(
                    "a device of this request is being registered by another request: wait for it, then check its status".into(),
                )
            } else {
                db("inserting devices")(e)
            }
        })?;
        // RETURNING gives the rows of a multi-row VALUES insert in order.
        for row in &inserted {
            out.push(device_from_row(row)?);
        }
    }
    Ok(out)
}

/// Moves an Unregistered, Unknown or Error device back to In Progress with the new fields.
async fn restart_registration(
    conn: &mut PgConnection,
    existing: &Device,
    device: &NewDevice,
    at: DateTime<Utc>,
) -> StoreResult<Device> {
    let (tags, settings) = documents(device)?;
    let row = sqlx::query(&format!(
        "UPDATE devices SET name = $1, provider_instance = $2, category = $3, account = $4, \
         settings = $5, tags = $6, is_simulated = $7, registration_status = $8, \
         registration_message = NULL, updated_at = $9 WHERE id = $10 RETURNING {DEVICE_COLS}"
    ))
    .bind(text(&device.name).as_ref())
    .bind(text(&device.provider_instance).as_ref())
    .bind(device.category.as_deref().map(text).as_deref())
    .bind(device.account.as_deref().map(text).as_deref())
    .bind(settings.as_ref().map(jsonb))
    .bind(jsonb(&tags))
    .bind(device.is_simulated.value())
    .bind(RegistrationStatus::InProgress.value())
    .bind(at)
    .bind(existing.id)
    .fetch_one(&mut *conn)
    .await
    .map_err(db("restarting a registration"))?;
    device_from_row(&row)
}

/// Starts registrations inside the caller's transaction, by [`decide::plan_begin`].
async fn begin_on(
    conn: &mut PgConnection,
    devices: &[&NewDevice],
    at: DateTime<Utc>,
) -> StoreResult<Vec<StoreResult<Device>>> {
    let ids: Vec<&DeviceId> = devices.iter().map(|d| &d.device_id).collect();
    let stored = fetch_devices(conn, &ids).await?;
    let plans = decide::plan_begin(devices, stored, |d| documents(d).map(|_| ()));
    let mut inserts = Vec::new();
    let mut out: Vec<Option<StoreResult<Device>>> = Vec::with_capacity(plans.len());
    for plan in plans {
        out.push(match plan {
            BeginPlan::Refused(e) => Some(Err(e)),
            BeginPlan::Restart(device, existing) => {
                Some(Ok(restart_registration(conn, &existing, device, at).await?))
            }
            BeginPlan::Insert(device) => {
                inserts.push(device);
                None
            }
        });
    }
    let mut inserted = insert_devices(conn, &inserts, at).await?.into_iter();
    out.into_iter()
        .map(|result| match result {
            Some(r) => Ok(r),
            None => inserted
                .next()
                .map(Ok)
                .ok_or_else(|| StoreError::Database("fewer devices inserted than planned".into())),
        })
        .collect()
}

/// Ends registrations inside the caller's transaction, by [`decide::finish_status`], in
/// the rounds of [`decide::finish_rounds`].
async fn finish_on(
    conn: &mut PgConnection,
    outcomes: &[Outcome],
    at: DateTime<Utc>,
    subs: &Subscriptions,
) -> StoreResult<Vec<StoreResult<Device>>> {
    let mut out: Vec<Option<StoreResult<Device>>> = vec![None; outcomes.len()];
    for round in decide::finish_rounds(outcomes) {
        for chunk in round.chunks(ROWS_PER_STATEMENT) {
            let mut updated = update_statuses(conn, outcomes, chunk, at).await?;
            let mut history = Vec::new();
            for &i in chunk {
                let (id, outcome) = &outcomes[i];
                out[i] = Some(match updated.remove(id) {
                    Some(device) => {
                        if outcome.is_ok() {
                            history.push(i);
                        }
                        Ok(device)
                    }
                    None => Err(StoreError::NotFound {
                        entity: "device",
                        key: id.to_string(),
                    }),
                });
            }
            let rows: Vec<(&Device, RegistrationAction)> = history
                .iter()
                .filter_map(|&i| out[i].as_ref()?.as_ref().ok())
                .map(|d| (d, RegistrationAction::Register))
                .collect();
            insert_history(conn, &rows, at, subs).await?;
        }
    }
    Ok(out
        .into_iter()
        .map(|r| r.expect("every outcome is decided in some round"))
        .collect())
}

/// Sets the status and message of the devices of `chunk` (indexes into `outcomes`, distinct
/// ids); returns the updated devices by id.
async fn update_statuses(
    conn: &mut PgConnection,
    outcomes: &[Outcome],
    chunk: &[usize],
    at: DateTime<Utc>,
) -> StoreResult<HashMap<DeviceId, Device>> {
    let mut qb = QueryBuilder::<Postgres>::new(
        "UPDATE devices SET registration_status = v.status, registration_message = v.message, updated_at = ",
    );
    qb.push_bind(at).push(" FROM (");
    qb.push_values(chunk, |mut b, &i| {
        let (id, outcome) = &outcomes[i];
        let (status, message) = decide::finish_status(outcome);
        b.push_bind(id.as_str().to_owned())
            .push_bind(status.value())
            .push_bind(message.map(|m| text(m).into_owned()));
    });
    qb.push(format!(
        ") AS v (did, status, message) WHERE devices.device_id = v.did RETURNING {}",
        DEVICE_COLS
            .split(", ")
            .map(|c| format!("devices.{c}"))
            .collect::<Vec<_>>()
            .join(", ")
    ));
    let rows = qb
        .build()
        .fetch_all(&mut *conn)
        .await
        .map_err(db("finishing registrations"))?;
    let mut out = HashMap::with_capacity(rows.len());
    for row in &rows {
        let device = device_from_row(row)?;
        out.insert(device.device_id.clone(), device);
    }
    Ok(out)
}

/// A per-device refusal, kept as that device's result; anything else fails the batch.
fn per_device<T>(result: StoreResult<T>) -> StoreResult<StoreResult<T>> {
    match result {
        Err(e @ StoreError::Database(_)) => Err(e),
        other => Ok(other),
    }
}

/// The one result of a batch of one.
fn only(results: Vec<StoreResult<Device>>) -> StoreResult<Device> {
    results
        .into_iter()
        .next()
        .unwrap_or_else(|| Err(StoreError::Database("a batch of one gave no result".into())))
}

/// The change feed of every device a batch changed.
async fn changed_all(
    conn: &mut PgConnection,
    results: &[StoreResult<Device>],
    subs: &Subscriptions,
) -> StoreResult<()> {
    for device in results.iter().flatten() {
        super::devices::device_changed(conn, &device.device_id, false, subs).await?;
    }
    Ok(())
}

impl PostgresStore {
    /// See [`crate::Store::begin_registration`]: a batch of one, without categories.
    pub(super) async fn begin_single(&self, device: &NewDevice) -> StoreResult<Device> {
        retrying(|| async {
            let mut tx = self.write().await?;
            take_turn(&mut tx).await?;
            let begun = only(begin_on(&mut tx, &[device], now()).await?)?;
            device_changed(&mut tx, &begun.device_id, false, &self.subs()).await?;
            tx.commit().await.map_err(db("committing a registration"))?;
            Ok(begun)
        })
        .await
    }

    /// See [`crate::Store::finish_registration`]: a batch of one.
    pub(super) async fn finish_single(
        &self,
        id: &DeviceId,
        outcome: Result<Option<String>, String>,
    ) -> StoreResult<Device> {
        let outcomes = [(id.clone(), outcome)];
        retrying(|| async {
            let mut tx = self.write().await?;
            take_turn(&mut tx).await?;
            let subs = self.subs();
            let device = only(finish_on(&mut tx, &outcomes, now(), &subs).await?)?;
            device_changed(&mut tx, id, false, &subs).await?;
            tx.commit().await.map_err(db("committing a registration"))?;
            Ok(device)
        })
        .await
    }

    /// See [`crate::Store::begin_registrations`].
    pub(super) async fn begin_batch(
        &self,
        devices: &[NewDevice],
    ) -> StoreResult<Vec<StoreResult<Device>>> {
        if devices.is_empty() {
            return Ok(Vec::new());
        }
        retrying(|| self.begin_batch_once(devices)).await
    }

    async fn begin_batch_once(
        &self,
        devices: &[NewDevice],
    ) -> StoreResult<Vec<StoreResult<Device>>> {
        let mut tx = self.write().await?;
        take_turn(&mut tx).await?;
        let at = now();
        let mut categories: BTreeMap<&str, Option<StoreError>> = devices
            .iter()
            .filter_map(|d| d.category.as_deref())
            .map(|c| (c, None))
            .collect();
        let subs = self.subs();
        for (name, refused) in &mut categories {
            if let Err(e) = per_device(write_category(&mut tx, name, None, &subs).await)? {
                *refused = Some(e);
            }
        }
        // Devices naming a category that could not be created are not begun.
        let refused = |d: &NewDevice| {
            d.category
                .as_deref()
                .and_then(|c| categories.get(c))
                .and_then(Option::as_ref)
        };
        let accepted: Vec<&NewDevice> = devices.iter().filter(|d| refused(d).is_none()).collect();
        let mut begun = begin_on(&mut tx, &accepted, at).await?.into_iter();
        let mut out = Vec::with_capacity(devices.len());
        for device in devices {
            out.push(match refused(device) {
                Some(e) => Err(e.clone()),
                None => begun.next().unwrap_or_else(|| {
                    Err(StoreError::Database(
                        "begin gave fewer results than devices".into(),
                    ))
                }),
            });
        }
        changed_all(&mut tx, &out, &subs).await?;
        tx.commit()
            .await
            .map_err(db("committing a batch of registrations"))?;
        Ok(out)
    }

    /// See [`crate::Store::finish_registrations`].
    pub(super) async fn finish_batch(
        &self,
        outcomes: &[Outcome],
    ) -> StoreResult<Vec<StoreResult<Device>>> {
        if outcomes.is_empty() {
            return Ok(Vec::new());
        }
        retrying(|| async {
            let mut tx = self.write().await?;
            take_turn(&mut tx).await?;
            let subs = self.subs();
            let out = finish_on(&mut tx, outcomes, now(), &subs).await?;
            changed_all(&mut tx, &out, &subs).await?;
            tx.commit()
                .await
                .map_err(db("committing a batch of registrations"))?;
            Ok(out)
        })
        .await
    }
}

/// Creates the category or updates its description (a missing one keeps the stored one).
/// A creation or a description change bumps its change version (1 at creation) and queues
/// its change event for each sink in `subs` taking categories; while none does, this is the
/// one upsert it always was.
pub(super) async fn write_category(
    conn: &mut PgConnection,
    name: &str,
    description: Option<&str>,
    subs: &Subscriptions,
) -> StoreResult<Category> {
    if name.trim().is_empty() {
        return Err(StoreError::Invalid {
            field: "name",
            message: "a category needs a name: give one".into(),
        });
    }
    let sinks = subs.sink_names(ENTITY_CATEGORY);
    let changed = "excluded.description IS NOT NULL \
                   AND excluded.description IS DISTINCT FROM categories.description";
    let sql = if sinks.is_empty() {
        format!(
            "INSERT INTO categories (id, name, description, created_at, change_version) \
             VALUES ($1, $2, $3, $4, 1) ON CONFLICT (name) DO UPDATE SET \
             description = COALESCE(excluded.description, categories.description), \
             change_version = categories.change_version + CASE WHEN {changed} THEN 1 ELSE 0 END \
             RETURNING {CATEGORY_COLS}, change_version"
        )
    } else {
        // No row back: the category is stored as asked already, nothing changed.
        format!(
            "INSERT INTO categories (id, name, description, created_at, change_version) \
             VALUES ($1, $2, $3, $4, 1) ON CONFLICT (name) DO UPDATE SET \
             description = excluded.description, change_version = categories.change_version + 1 \
             WHERE {changed} RETURNING {CATEGORY_COLS}, change_version"
        )
    };
    let name = text(name);
    let row = sqlx::query(&sql)
        .bind(Uuid::now_v7())
        .bind(name.as_ref())
        .bind(description.map(text).as_deref())
        .bind(now())
        .fetch_optional(&mut *conn)
        .await
        .map_err(db("writing a category"))?;
    let Some(row) = row else {
        let row = sqlx::query(&format!(
            "SELECT {CATEGORY_COLS} FROM categories WHERE name = $1"
        ))
        .bind(name.as_ref())
        .fetch_one(&mut *conn)
        .await
        .map_err(db("reading a category"))?;
        return category_from_row(&row);
    };
    let category = category_from_row(&row)?;
    if !sinks.is_empty() {
        let version: i64 = super::get(&row, "change_version")?;
        let event = ChangeEvent::new(
            ENTITY_CATEGORY,
            &category.id.to_string(),
            version,
            &category,
        )?;
        super::outbox::queue_changes(conn, &sinks, &[event], false).await?;
    }
    Ok(category)
}
