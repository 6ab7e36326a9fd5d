//! Devices on PostgreSQL: reads, the unknown-device insert, connection state (ordered by
//! event time: `crate::decide::connection_applies`), reported properties, last activity,
//! categories, history and unregistering.

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, Postgres, QueryBuilder};
use uuid::Uuid;

use super::rows::*;
use super::{
    bad_cursor, db, finish_page, get, jsonb, now, page_size, registration, text, ts, PostgresStore,
};
use crate::decide;
use crate::model::*;
use crate::store::{StoreError, StoreResult};
use crate::DeviceId;

/// SQL for "the later of the stored time and $n".
fn later_activity(n: usize) -> String {
    format!("GREATEST(last_activity_time, ${n})")
}

pub(super) async fn fetch_device(
    conn: &mut PgConnection,
    id: &DeviceId,
) -> StoreResult<Option<Device>> {
    sqlx::query(&format!(
        "SELECT {DEVICE_COLS} FROM devices WHERE device_id = $1"
    ))
    .bind(id.as_str())
    .fetch_optional(&mut *conn)
    .await
    .map_err(db("reading a device"))?
    .as_ref()
    .map(device_from_row)
    .transpose()
}

pub(super) async fn require_device(conn: &mut PgConnection, id: &DeviceId) -> StoreResult<Device> {
    fetch_device(conn, id)
        .await?
        .ok_or_else(|| StoreError::NotFound {
            entity: "device",
            key: id.to_string(),
        })
}

/// Applies a connection state unless a newer one is stored; `None` for an unknown device.
/// The row is locked while deciding, so two replicas cannot both apply out of order.
pub(super) async fn write_connection_state(
    conn: &mut PgConnection,
    id: &DeviceId,
    connected: bool,
    at: DateTime<Utc>,
) -> StoreResult<Option<bool>> {
    let at = ts(at);
    let Some(row) = sqlx::query(
        "SELECT connection_state_updated_at FROM devices WHERE device_id = $1 FOR UPDATE",
    )
    .bind(id.as_str())
    .fetch_optional(&mut *conn)
    .await
    .map_err(db("reading a connection state"))?
    else {
        return Ok(None);
    };
    let stored: Option<DateTime<Utc>> = super::get(&row, "connection_state_updated_at")?;
    let applied = decide::connection_applies(stored, at);
    let sql = if applied {
        format!(
            "UPDATE devices SET connection_state = $4, connection_state_updated_at = $1, \
             last_activity_time = {}, updated_at = $2 WHERE device_id = $3",
            later_activity(1)
        )
    } else {
        format!(
            "UPDATE devices SET last_activity_time = {}, updated_at = $2 WHERE device_id = $3",
            later_activity(1)
        )
    };
    let query = sqlx::query(&sql);
    let mut query = query.bind(at).bind(now()).bind(id.as_str());
    if applied {
        query = query.bind(connected);
    }
    query
        .execute(&mut *conn)
        .await
        .map_err(db("writing a connection state"))?;
    if applied {
        sqlx::query(
            "INSERT INTO connection_events (device_id, at, connected) VALUES ($1, $2, $3) \
             ON CONFLICT (device_id, at) DO UPDATE SET connected = excluded.connected",
        )
        .bind(id.as_str())
        .bind(at)
        .bind(connected)
        .execute(&mut *conn)
        .await
        .map_err(db("recording a connection event"))?;
        sqlx::query(
            "DELETE FROM connection_events WHERE device_id = $1 AND at < (SELECT at FROM \
             connection_events WHERE device_id = $1 ORDER BY at DESC LIMIT 1 OFFSET $2)",
        )
        .bind(id.as_str())
        .bind(i64::from(crate::model::CONNECTION_EVENTS_KEPT) - 1)
        .execute(&mut *conn)
        .await
        .map_err(db("trimming connection events"))?;
    }
    Ok(Some(applied))
}

/// See [`crate::Store::connection_history`].
pub(super) async fn connection_events(
    pool: &sqlx::PgPool,
    id: &DeviceId,
    limit: u32,
) -> StoreResult<Vec<(DateTime<Utc>, bool)>> {
    let rows: Vec<(DateTime<Utc>, bool)> = sqlx::query_as(
        "SELECT at, connected FROM connection_events WHERE device_id = $1 \
         ORDER BY at DESC LIMIT $2",
    )
    .bind(id.as_str())
    .bind(i64::from(limit.min(crate::model::CONNECTION_EVENTS_KEPT)))
    .fetch_all(pool)
    .await
    .map_err(db("reading connection events"))?;
    Ok(rows)
}

/// Replaces the reported properties; false for an unknown device.
pub(super) async fn write_reported(
    conn: &mut PgConnection,
    id: &DeviceId,
    reported: &serde_json::Value,
    at: DateTime<Utc>,
) -> StoreResult<bool> {
    let done = sqlx::query(&format!(
        "UPDATE devices SET reported_properties = $1, last_activity_time = {}, \
         updated_at = $3 WHERE device_id = $4",
        later_activity(2)
    ))
    .bind(jsonb(reported))
    .bind(ts(at))
    .bind(now())
    .bind(id.as_str())
    .execute(&mut *conn)
    .await
    .map_err(db("writing reported properties"))?;
    Ok(done.rows_affected() > 0)
}

/// Replaces the settings of device `id`; `None` when there is no such device.
pub(super) async fn write_settings(
    conn: &mut PgConnection,
    id: &DeviceId,
    settings: &serde_json::Value,
) -> StoreResult<Option<Device>> {
    sqlx::query(&format!(
        "UPDATE devices SET settings = $1, updated_at = $2 WHERE device_id = $3 RETURNING {DEVICE_COLS}"
    ))
    .bind(jsonb(settings))
    .bind(now())
    .bind(id.as_str())
    .fetch_optional(&mut *conn)
    .await
    .map_err(db("writing device settings"))?
    .as_ref()
    .map(device_from_row)
    .transpose()
}

/// Inserts a device seen only in telemetry (status Unknown) unless it exists.
pub(super) async fn insert_unknown_device(
    conn: &mut PgConnection,
    id: &DeviceId,
    provider_instance: &str,
) -> StoreResult<bool> {
    let at = now();
    let inserted = sqlx::query(
        "INSERT INTO devices (id, device_id, name, provider_instance, connection_state, tags, \
         registration_status, is_simulated, created_at, updated_at) \
         VALUES ($1, $2, $2, $3, FALSE, '{}', $4, $5, $6, $6) ON CONFLICT (device_id) DO NOTHING",
    )
    .bind(Uuid::now_v7())
    .bind(id.as_str())
    .bind(super::text(provider_instance).as_ref())
    .bind(RegistrationStatus::Unknown.value())
    .bind(IsSimulated::No.value())
    .bind(at)
    .execute(&mut *conn)
    .await
    .map_err(db("inserting an unknown device"))?
    .rows_affected();
    Ok(inserted > 0)
}

/// Moves each device's last activity to its time unless a later one is stored; one
/// statement for the whole batch.
pub(super) async fn bump_activity(
    conn: &mut PgConnection,
    devices: &[(Uuid, DateTime<Utc>)],
) -> StoreResult<()> {
    let ids: Vec<Uuid> = devices.iter().map(|(id, _)| *id).collect();
    let times: Vec<DateTime<Utc>> = devices.iter().map(|(_, at)| ts(*at)).collect();
    sqlx::query(
        "UPDATE devices d SET last_activity_time = GREATEST(d.last_activity_time, v.at), \
         updated_at = $3 FROM unnest($1::uuid[], $2::timestamptz[]) AS v (id, at) \
         WHERE d.id = v.id",
    )
    .bind(ids)
    .bind(times)
    .bind(now())
    .execute(&mut *conn)
    .await
    .map_err(db("bumping last activity"))?;
    Ok(())
}

impl PostgresStore {
    /// See [`crate::Store::mark_unregistered`].
    pub(super) async fn unregister(
        &self,
        id: &DeviceId,
        message: Option<String>,
    ) -> StoreResult<Device> {
        let mut tx = self.write().await?;
        registration::take_turn(&mut tx).await?;
        let existing = require_device(&mut tx, id).await?;
        if let Some(refused) = decide::unregister_refusal(&existing) {
            return Err(refused);
        }
        let at = now();
        let row = sqlx::query(&format!(
            "UPDATE devices SET registration_status = $1, registration_message = $2, updated_at = $3 \
             WHERE id = $4 RETURNING {DEVICE_COLS}"
        ))
        .bind(RegistrationStatus::Unregistered.value())
        .bind(message.as_deref().map(super::text).as_deref())
        .bind(at)
        .bind(existing.id)
        .fetch_one(&mut *tx)
        .await
        .map_err(db("unregistering a device"))?;
        let device = device_from_row(&row)?;
        let subs = self.subs();
        registration::insert_history(
            &mut tx,
            &[(&device, RegistrationAction::Unregister)],
            at,
            &subs,
        )
        .await?;
        device_changed(&mut tx, id, false, &subs).await?;
        tx.commit()
            .await
            .map_err(db("committing an unregistration"))?;
        Ok(device)
    }

    /// See [`crate::Store::move_device`].
    pub(super) async fn relocate(
        &self,
        id: &DeviceId,
        from: &str,
        to: &str,
    ) -> StoreResult<(Device, u64)> {
        let mut tx = self.write().await?;
        registration::take_turn(&mut tx).await?;
        let existing = require_device(&mut tx, id).await?;
        if let Some(refused) = decide::move_refusal(&existing, from, to) {
            return Err(refused);
        }
        let at = now();
        let row = sqlx::query(&format!(
            "UPDATE devices SET provider_instance = $1, updated_at = $2 WHERE id = $3 RETURNING {DEVICE_COLS}"
        ))
        .bind(super::text(to).as_ref())
        .bind(at)
        .bind(existing.id)
        .fetch_one(&mut *tx)
        .await
        .map_err(db("moving a device"))?;
        let device = device_from_row(&row)?;
        let subs = self.subs();
        registration::insert_history(
            &mut tx,
            &[
                (&existing, RegistrationAction::Deactivate),
                (&device, RegistrationAction::Register),
            ],
            at,
            &subs,
        )
        .await?;
        let failed = sqlx::query(&format!(
            "UPDATE commands SET status = $1, status_reason = $2, updated_at = $3, \
             claim_holder = NULL, claimed_until = NULL, change_version = change_version + 1 \
             WHERE device = $4 AND status = $5 RETURNING {COMMAND_COLS}, change_version"
        ))
        .bind(CommandStatus::Error.value())
        .bind(decide::moved_command_reason(from, to))
        .bind(at)
        .bind(existing.id)
        .bind(CommandStatus::InProgress.value())
        .fetch_all(&mut *tx)
        .await
        .map_err(db("ending the commands of a moved device"))?;
        let failed = super::commands::commands_changed(&mut tx, &failed, &subs)
            .await?
            .len() as u64;
        device_changed(&mut tx, id, false, &subs).await?;
        tx.commit().await.map_err(db("committing a move"))?;
        Ok((device, failed))
    }

    /// See [`crate::Store::list_devices`].
    pub(super) async fn devices_page(
        &self,
        filter: &DeviceFilter,
        page: &PageRequest,
    ) -> StoreResult<Page<Device>> {
        let size = page_size(page);
        let mut qb =
            QueryBuilder::<Postgres>::new(format!("SELECT {DEVICE_COLS} FROM devices WHERE 1 = 1"));
        if let Some(after) = &page.after {
            let after = DeviceId::parse(after).map_err(|_| bad_cursor(after))?;
            qb.push(" AND device_id > ")
                .push_bind(after.as_str().to_owned());
        }
        if let Some(p) = &filter.provider_instance {
            qb.push(" AND provider_instance = ")
                .push_bind(text(p).into_owned());
        }
        if let Some(c) = &filter.category {
            qb.push(" AND category = ").push_bind(text(c).into_owned());
        }
        if let Some(s) = filter.registration_status {
            qb.push(" AND registration_status = ").push_bind(s.value());
        }
        if let Some(connected) = filter.connected {
            qb.push(" AND connection_state = ").push_bind(connected);
        }
        qb.push(" ORDER BY device_id LIMIT ")
            .push_bind(size as i64 + 1);
        let rows = qb
            .build()
            .fetch_all(&self.pool)
            .await
            .map_err(db("listing devices"))?;
        let items = rows
            .iter()
            .map(device_from_row)
            .collect::<StoreResult<Vec<_>>>()?;
        Ok(finish_page(items, size, |d| d.device_id.to_string()))
    }

    /// See [`crate::Store::history`].
    pub(super) async fn device_history(
        &self,
        id: &DeviceId,
    ) -> StoreResult<Vec<RegistrationHistory>> {
        let mut conn = self.conn().await?;
        let device = require_device(&mut conn, id).await?;
        let rows = sqlx::query(&format!(
            "SELECT {HISTORY_COLS} FROM registration_history WHERE device = $1 ORDER BY created_at, id"
        ))
        .bind(device.id)
        .fetch_all(&mut *conn)
        .await
        .map_err(db("reading registration history"))?;
        rows.iter().map(history_from_row).collect()
    }

    /// See [`crate::Store::list_categories`].
    pub(super) async fn categories(&self) -> StoreResult<Vec<Category>> {
        let rows = sqlx::query(&format!(
            "SELECT {CATEGORY_COLS} FROM categories ORDER BY name COLLATE \"C\""
        ))
        .fetch_all(&self.pool)
        .await
        .map_err(db("listing categories"))?;
        rows.iter().map(category_from_row).collect()
    }
}

/// The change feed of a device: bumps its change version and queues its change event for
/// each sink in `subs` taking devices, in the caller's transaction. The event names the id
/// of the device's category when that category exists (`refs.msdyn_category`, read in the
/// same statement). Connection churn is coalesced per sink (unless its interval is 0): a
/// connection-state change is queued due only once the sink's interval has passed, and
/// while that item waits (not leased, the device's latest item) every later change of the
/// device takes its place (new state, version and key) instead of queueing another; a
/// change other than a connection state makes it due at once. The replaced item's lease
/// token moves on, so a holder whose lease ran out cannot mark the new state delivered.
/// Nothing happens for an unknown device.
pub(super) async fn device_changed(
    conn: &mut PgConnection,
    id: &DeviceId,
    connection: bool,
    subs: &Subscriptions,
) -> StoreResult<()> {
    // Without a sink taking devices there is nothing to queue and the version stays: it
    // only has to grow from one queued event to the next, and the hot paths (a batch of
    // registrations, connection changes) pay no statement for a feed nobody reads.
    let sinks: Vec<_> = subs.sinks_taking(ENTITY_DEVICE).collect();
    if sinks.is_empty() {
        return Ok(());
    }
    let Some(row) = sqlx::query(&format!(
        "UPDATE devices SET change_version = change_version + 1 WHERE device_id = $1 \
         RETURNING {DEVICE_COLS}, change_version, \
         (SELECT c.id FROM categories c WHERE c.name = devices.category) AS category_ref"
    ))
    .bind(id.as_str())
    .fetch_optional(&mut *conn)
    .await
    .map_err(db("bumping a device's change version"))?
    else {
        return Ok(());
    };
    let device = device_from_row(&row)?;
    let version: i64 = get(&row, "change_version")?;
    let category: Option<Uuid> = get(&row, "category_ref")?;
    let key = device.device_id.as_str();
    let event = ChangeEvent {
        change_of: format!("{ENTITY_DEVICE}:{key}"),
        key: change_key(ENTITY_DEVICE, key, version),
        payload: device_change_payload(&device, version, category)?,
    };
    let payload = jsonb(&event.payload);
    let at = now();
    let mut queue = Vec::with_capacity(sinks.len());
    for (sink, sub) in sinks {
        if sub.coalesce_connection <= chrono::Duration::zero() {
            queue.push(sink);
            continue;
        }
        // As on SQLite: a waiting connection state of the record takes the change in place.
        let replaced = sqlx::query(
            "UPDATE outbox SET payload = $1, idempotency_key = $2, lease_token = lease_token + 1, \
             connection_only = $3, \
             next_attempt_at = CASE WHEN $3 THEN next_attempt_at ELSE LEAST(next_attempt_at, $6) END \
             WHERE id = (SELECT id FROM outbox WHERE sink = $4 AND change_of = $5 \
             ORDER BY id DESC LIMIT 1) \
             AND connection_only AND (leased_until IS NULL OR leased_until <= $6)",
        )
        .bind(&payload)
        .bind(&event.key)
        .bind(connection)
        .bind(text(sink).as_ref())
        .bind(&event.change_of)
        .bind(at)
        .execute(&mut *conn)
        .await
        .map_err(db("coalescing a connection-state change"))?
        .rows_affected();
        if replaced > 0 {
            continue;
        }
        if connection {
            sqlx::query(
                "INSERT INTO outbox (sink, payload, idempotency_key, attempts, next_attempt_at, \
                 created_at, change_of, connection_only) VALUES ($1, $2, $3, 0, $4, $5, $6, TRUE) \
                 ON CONFLICT (sink, idempotency_key) DO NOTHING",
            )
            .bind(text(sink).as_ref())
            .bind(&payload)
            .bind(&event.key)
            .bind(at + sub.coalesce_connection)
            .bind(at)
            .bind(&event.change_of)
            .execute(&mut *conn)
            .await
            .map_err(db("queueing a connection-state change"))?;
            continue;
        }
        queue.push(sink);
    }
    super::outbox::queue_changes(conn, &queue, &[event], connection).await
}
