//! Device registration on SQLite, for one device or a batch: the single-device operations
//! are a batch of one, so both run the same statements and their rules cannot drift apart.
//!
//! The statements are set-oriented because a statement, not a row, is what costs: sqlx runs
//! each SQLite statement on the connection's worker thread, and the hand-over there and
//! back (two thread wake-ups) costs more than inserting a row, and every value of every row
//! read back is copied on its way from that thread. So a batch of N devices takes a handful
//! of statements (plus one per category), not four per device, and reads back only what it
//! cannot know:
//! - the devices already stored are read with one `IN (...)` query;
//! - new devices are inserted with multi-row `INSERT`s (their records are built from what
//!   was written, not read back);
//! - an existing Unregistered, Unknown or Error device is updated on its own (re-registering
//!   is the rare case);
//! - finishing is one `UPDATE ... FROM (VALUES ...) RETURNING` plus one multi-row history
//!   insert.
//!
//! Each statement holds at most [`ROWS_PER_STATEMENT`] rows. Devices are decided in batch
//! order, as sequential calls would: a device begun earlier in the batch is In Progress for
//! a later occurrence of its id (a conflict), and a finish outcome repeated for one id is
//! applied after the first one (a later round of statements).
//!
//! A device's refusal (conflict, invalid input, unknown device) is its own result and leaves
//! the others alone; a database failure fails the whole batch, and the caller's transaction
//! is then rolled back.

use std::collections::{BTreeMap, HashMap};

use sqlx::{QueryBuilder, Sqlite, SqliteConnection};
use uuid::Uuid;

use super::{
    db, device_from_row, devices::device_changed, is_unique_violation, json_text, now, parse_ts,
    queue_changes, write_category, SqliteStore, DEVICE_COLS,
};
use crate::decide::BeginPlan;
use crate::model::*;
use crate::store::{StoreError, StoreResult};
use crate::DeviceId;

/// Most rows one statement writes or looks up: with 12 bound values per device row, well
/// under SQLite's limit on bound parameters (32,766).
const ROWS_PER_STATEMENT: usize = 500;

/// A finish outcome: the device id and `Ok(message)` (Registered) or `Err(message)` (Error).
pub(crate) type Outcome = (DeviceId, Result<Option<String>, String>);

/// Writes Register/Unregister history rows for these devices (one statement per
/// [`ROWS_PER_STATEMENT`] rows), and queues each row's one change event (version 1: a
/// history row never changes) for each sink in `subs` taking registration history.
pub(super) async fn insert_history(
    conn: &mut SqliteConnection,
    rows: &[(&Device, RegistrationAction)],
    at: &str,
    subs: &Subscriptions,
) -> StoreResult<()> {
    let sinks = subs.sink_names(ENTITY_HISTORY);
    for chunk in rows.chunks(ROWS_PER_STATEMENT) {
        let ids: Vec<Uuid> = chunk.iter().map(|_| Uuid::now_v7()).collect();
        let mut qb = QueryBuilder::<Sqlite>::new(
            "INSERT INTO registration_history (id, device, device_id, name, action, provider_instance, created_at) ",
        );
        qb.push_values(chunk.iter().zip(&ids), |mut b, ((device, action), id)| {
            b.push_bind(id.to_string())
                .push_bind(device.id.to_string())
                .push_bind(device.device_id.as_str())
                .push_bind(history_name(device, *action))
                .push_bind(action.value())
                .push_bind(device.provider_instance.as_str())
                .push_bind(at);
        });
        qb.build()
            .execute(&mut *conn)
            .await
            .map_err(db("writing registration history"))?;
        if !sinks.is_empty() {
            let created_at = parse_ts(at, "created_at")?;
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
                        created_at,
                    };
                    ChangeEvent::new(ENTITY_HISTORY, &id.to_string(), 1, &row)
                })
                .collect::<StoreResult<Vec<_>>>()?;
            queue_changes(conn, &sinks, &events, false).await?;
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
    conn: &mut SqliteConnection,
    ids: &[&DeviceId],
) -> StoreResult<HashMap<DeviceId, Device>> {
    let mut found = HashMap::with_capacity(ids.len());
    for chunk in ids.chunks(ROWS_PER_STATEMENT) {
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

/// A device's JSON columns as stored.
struct Texts {
    tags: String,
    settings: Option<String>,
}

fn texts(device: &NewDevice) -> StoreResult<Texts> {
    Ok(Texts {
        tags: json_text(&device.tags, "tags")?,
        settings: device
            .settings
            .as_ref()
            .map(|s| json_text(s, "settings"))
            .transpose()?,
    })
}

/// Inserts new devices as In Progress and returns them in order. Every column of a new row
/// is known before it is written, so the records are built here rather than read back.
async fn insert_devices(
    conn: &mut SqliteConnection,
    devices: &[(&NewDevice, Texts)],
    at: &str,
) -> StoreResult<Vec<Device>> {
    let created = parse_ts(at, "created_at")?;
    let mut out = Vec::with_capacity(devices.len());
    for chunk in devices.chunks(ROWS_PER_STATEMENT) {
        let ids: Vec<Uuid> = chunk.iter().map(|_| Uuid::now_v7()).collect();
        let mut qb = QueryBuilder::<Sqlite>::new(
            "INSERT INTO devices (id, device_id, name, provider_instance, category, account, \
             connection_state, settings, tags, registration_status, is_simulated, created_at, updated_at) ",
        );
        qb.push_values(chunk.iter().zip(&ids), |mut b, ((device, texts), id)| {
            b.push_bind(id.to_string())
                .push_bind(device.device_id.as_str())
                .push_bind(device.name.as_str())
                .push_bind(device.provider_instance.as_str())
                .push_bind(device.category.as_deref())
                .push_bind(device.account.as_deref())
                .push_unseparated(", FALSE")
                .push_bind(texts.settings.as_deref())
                .push_bind(texts.tags.as_str())
                .push_bind(RegistrationStatus::InProgress.value())
                .push_bind(device.is_simulated.value())
                .push_bind(at)
                .push_bind(at);
        });
        qb.build().execute(&mut *conn).await.map_err(|e| {
            if is_unique_violation(&e) {
                // The write lock is held since the devices were read, so only a writer
                // outside this transaction's rules can get here.
                StoreError::Conflict(
                    "a device of this request is being registered by another request: wait for it, then check its status".into(),
                )
            } else {
                db("inserting devices")(e)
            }
        })?;
        out.extend(chunk.iter().zip(ids).map(|((device, _), id)| Device {
            id,
            name: device.name.clone(),
            device_id: device.device_id.clone(),
            provider_instance: device.provider_instance.clone(),
            category: device.category.clone(),
            account: device.account.clone(),
            connection_state: false,
            connection_state_updated_at: None,
            last_activity_time: None,
            reported_properties: None,
            settings: device.settings.clone(),
            tags: device.tags.clone(),
            registration_status: RegistrationStatus::InProgress,
            registration_message: None,
            is_simulated: device.is_simulated,
            created_at: created,
            updated_at: created,
        }));
    }
    Ok(out)
}

/// Moves an Unregistered, Unknown or Error device back to In Progress with the new fields.
async fn restart_registration(
    conn: &mut SqliteConnection,
    existing: &Device,
    device: &NewDevice,
    texts: &Texts,
    at: &str,
) -> StoreResult<Device> {
    let row = sqlx::query(&format!(
        "UPDATE devices SET name = ?, provider_instance = ?, category = ?, account = ?, \
         settings = ?, tags = ?, is_simulated = ?, registration_status = ?, \
         registration_message = NULL, updated_at = ? WHERE id = ? RETURNING {DEVICE_COLS}"
    ))
    .bind(&device.name)
    .bind(&device.provider_instance)
    .bind(&device.category)
    .bind(&device.account)
    .bind(&texts.settings)
    .bind(&texts.tags)
    .bind(device.is_simulated.value())
    .bind(RegistrationStatus::InProgress.value())
    .bind(at)
    .bind(existing.id.to_string())
    .fetch_one(&mut *conn)
    .await
    .map_err(db("restarting a registration"))?;
    device_from_row(&row)
}

/// Starts registrations on `conn`, inside the caller's write transaction: each device is
/// inserted as In Progress, or an Unregistered, Unknown or Error one moved back to In
/// Progress with the new fields; a Registered or In Progress one is a conflict naming its
/// provider instance.
async fn begin_on(
    conn: &mut SqliteConnection,
    devices: &[&NewDevice],
    at: &str,
) -> StoreResult<Vec<StoreResult<Device>>> {
    let ids: Vec<&DeviceId> = devices.iter().map(|d| &d.device_id).collect();
    let stored = fetch_devices(conn, &ids).await?;
    let plans = crate::decide::plan_begin(devices, stored, |d| texts(d).map(|_| ()));
    let mut inserts = Vec::new();
    let mut out: Vec<Option<StoreResult<Device>>> = Vec::with_capacity(plans.len());
    for plan in plans {
        out.push(match plan {
            BeginPlan::Refused(e) => Some(Err(e)),
            BeginPlan::Restart(device, existing) => Some(Ok(restart_registration(
                conn,
                &existing,
                device,
                &texts(device)?,
                at,
            )
            .await?)),
            BeginPlan::Insert(device) => {
                inserts.push((device, texts(device)?));
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

/// Ends registrations on `conn`, inside the caller's write transaction: `Ok(message)` sets
/// Registered and writes a Register history row, `Err(message)` sets Error with the message
/// (no history row); an unknown device is `NotFound`.
async fn finish_on(
    conn: &mut SqliteConnection,
    outcomes: &[Outcome],
    at: &str,
    subs: &Subscriptions,
) -> StoreResult<Vec<StoreResult<Device>>> {
    let mut out: Vec<Option<StoreResult<Device>>> = vec![None; outcomes.len()];
    // Rounds of distinct ids: an id repeated in the batch is applied after its first one.
    for round in crate::decide::finish_rounds(outcomes) {
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
    conn: &mut SqliteConnection,
    outcomes: &[Outcome],
    chunk: &[usize],
    at: &str,
) -> StoreResult<HashMap<DeviceId, Device>> {
    let mut qb = QueryBuilder::<Sqlite>::new("WITH v (did, status, message) AS (");
    qb.push_values(chunk, |mut b, &i| {
        let (id, outcome) = &outcomes[i];
        let (status, message) = crate::decide::finish_status(outcome);
        b.push_bind(id.as_str())
            .push_bind(status.value())
            .push_bind(message);
    });
    qb.push(
        ") UPDATE devices SET registration_status = v.status, registration_message = v.message, updated_at = ",
    )
    .push_bind(at)
    .push(format!(
        " FROM v WHERE devices.device_id = v.did RETURNING {DEVICE_COLS}"
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

/// The change feed of every device a batch changed.
async fn changed_all(
    conn: &mut SqliteConnection,
    results: &[StoreResult<Device>],
    subs: &Subscriptions,
) -> StoreResult<()> {
    for device in results.iter().flatten() {
        device_changed(conn, &device.device_id, false, subs).await?;
    }
    Ok(())
}

/// The one result of a batch of one.
fn only(results: Vec<StoreResult<Device>>) -> StoreResult<Device> {
    results
        .into_iter()
        .next()
        .unwrap_or_else(|| Err(StoreError::Database("a batch of one gave no result".into())))
}

impl SqliteStore {
    /// See [`crate::Store::begin_registration`]: a batch of one, without categories.
    pub(super) async fn begin_single(&self, device: &NewDevice) -> StoreResult<Device> {
        let _turn = self.registration_gate.lock().await;
        let mut tx = self.write().await?;
        let begun = only(begin_on(&mut tx, &[device], &now()).await?)?;
        device_changed(&mut tx, &begun.device_id, false, &self.subs()).await?;
        tx.commit().await.map_err(db("committing a registration"))?;
        Ok(begun)
    }

    /// See [`crate::Store::finish_registration`]: a batch of one.
    pub(super) async fn finish_single(
        &self,
        id: &DeviceId,
        outcome: Result<Option<String>, String>,
    ) -> StoreResult<Device> {
        let _turn = self.registration_gate.lock().await;
        let mut tx = self.write().await?;
        let subs = self.subs();
        let device = only(finish_on(&mut tx, &[(id.clone(), outcome)], &now(), &subs).await?)?;
        device_changed(&mut tx, id, false, &subs).await?;
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
        let _turn = self.registration_gate.lock().await;
        let mut tx = self.write().await?;
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
        let mut begun = begin_on(&mut tx, &accepted, &at).await?.into_iter();
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
        changed_all(&mut tx, &out, &self.subs()).await?;
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
        let _turn = self.registration_gate.lock().await;
        let mut tx = self.write().await?;
        let subs = self.subs();
        let out = finish_on(&mut tx, outcomes, &now(), &subs).await?;
        changed_all(&mut tx, &out, &subs).await?;
        tx.commit()
            .await
            .map_err(db("committing a batch of registrations"))?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::Store;

    fn device(n: usize) -> NewDevice {
        NewDevice {
            name: format!("dev {n}"),
            device_id: DeviceId::parse(&format!("dev-{n:05}")).expect("id"),
            provider_instance: "local".into(),
            category: Some(["meters", "pumps"][n % 2].into()),
            account: None,
            settings: None,
            tags: BTreeMap::from([("n".to_owned(), n.to_string())]),
            is_simulated: IsSimulated::No,
        }
    }

    /// What registration returns is what `get_device` reads, for a new device (built, not
    /// read back) as for a re-registered one whose connection state, activity and reported
    /// properties were set meanwhile.
    #[tokio::test]
    async fn registration_returns_devices_exactly_as_get_device_reads_them() {
        let store = SqliteStore::memory().await.expect("store");
        let mut new = device(7);
        new.name = "Pümp \"seven\"\n\\ ☃".into();
        new.account = Some("contoso".into());
        new.settings = Some(
            serde_json::json!({"interval": 30, "ratio": 1.5, "big": 12345678901234_i64, "list": [true, null, "x"]}),
        );
        new.tags.insert("quote\"d".into(), "ünïcode, ☃".into());
        new.is_simulated = IsSimulated::Yes;
        let id = new.device_id.clone();
        let begun = store.begin_registration(&new).await.expect("begin");
        assert_eq!(store.get_device(&id).await.expect("get"), Some(begun));
        let done = store
            .finish_registration(&id, Ok(Some("line\nbreak".into())))
            .await
            .expect("finish");
        assert_eq!(store.get_device(&id).await.expect("get"), Some(done));
        let at = chrono::DateTime::parse_from_rfc3339("2024-05-01T12:00:00.123456Z")
            .expect("time")
            .with_timezone(&chrono::Utc);
        store
            .set_connection_state(&id, true, at)
            .await
            .expect("connected");
        store
            .set_reported_properties(&id, &serde_json::json!({"fw": "2.1", "temp": -4.25}), at)
            .await
            .expect("reported");
        store
            .mark_unregistered(&id, None)
            .await
            .expect("unregister");
        let again = store.begin_registration(&new).await.expect("begin again");
        assert!(again.connection_state);
        assert_eq!(again.last_activity_time, Some(at));
        assert_eq!(store.get_device(&id).await.expect("get"), Some(again));
    }

    /// More devices than one statement holds: the chunks together register every one, and
    /// a repeat of the batch is refused device by device.
    #[tokio::test]
    async fn a_batch_larger_than_a_statement_registers_every_device() {
        let store = SqliteStore::memory().await.expect("store");
        let n = 2 * ROWS_PER_STATEMENT + 7;
        let devices: Vec<NewDevice> = (0..n).map(device).collect();
        let begun = store.begin_registrations(&devices).await.expect("begin");
        assert_eq!(begun.len(), n);
        for (d, b) in devices.iter().zip(&begun) {
            let b = b.as_ref().expect("begun");
            assert_eq!(b.device_id, d.device_id, "results are in request order");
            assert_eq!(b.tags, d.tags);
        }
        let outcomes: Vec<Outcome> = devices
            .iter()
            .map(|d| (d.device_id.clone(), Ok(None)))
            .collect();
        let finished = store.finish_registrations(&outcomes).await.expect("finish");
        assert!(finished.iter().all(|f| f
            .as_ref()
            .is_ok_and(|d| d.registration_status == RegistrationStatus::Registered)));
        let history: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM registration_history")
            .fetch_one(store.pool())
            .await
            .expect("count");
        assert_eq!(history, n as i64, "one Register row per device");
        let again = store.begin_registrations(&devices).await.expect("again");
        assert!(again.iter().all(
            |r| matches!(r, Err(StoreError::Conflict(m)) if m.contains("already Registered"))
        ));
    }
}
