//! Devices on SQLite: reads, the unknown-device insert, connection state (ordered by event
//! time: `crate::decide::connection_applies`), reported properties, last activity,
//! categories, history and unregistering.

use super::*;

/// SQL for "the later of the stored time and this one".
pub(super) const LATER_ACTIVITY: &str =
    "CASE WHEN last_activity_time IS NULL OR last_activity_time < ? THEN ? ELSE last_activity_time END";

pub(super) async fn fetch_device(
    conn: &mut SqliteConnection,
    id: &DeviceId,
) -> StoreResult<Option<Device>> {
    sqlx::query(&format!(
        "SELECT {DEVICE_COLS} FROM devices WHERE device_id = ?"
    ))
    .bind(id.as_str())
    .fetch_optional(&mut *conn)
    .await
    .map_err(db("reading a device"))?
    .as_ref()
    .map(device_from_row)
    .transpose()
}

pub(super) async fn require_device(
    conn: &mut SqliteConnection,
    id: &DeviceId,
) -> StoreResult<Device> {
    fetch_device(conn, id)
        .await?
        .ok_or_else(|| StoreError::NotFound {
            entity: "device",
            key: id.to_string(),
        })
}

/// Creates the category or updates its description (a missing one keeps the stored one).
/// A creation or a description change bumps its change version (1 at creation) and queues
/// its change event for each sink in `subs` taking categories; while none does, this is the
/// one upsert it always was.
pub(super) async fn write_category(
    conn: &mut SqliteConnection,
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
    let changed =
        "excluded.description IS NOT NULL AND excluded.description IS NOT categories.description";
    let sql = if sinks.is_empty() {
        format!(
            "INSERT INTO categories (id, name, description, created_at, change_version) \
             VALUES (?, ?, ?, ?, 1) ON CONFLICT (name) DO UPDATE SET \
             description = COALESCE(excluded.description, categories.description), \
             change_version = categories.change_version + CASE WHEN {changed} THEN 1 ELSE 0 END \
             RETURNING {CATEGORY_COLS}, change_version"
        )
    } else {
        // No row back: the category is stored as asked already, nothing changed.
        format!(
            "INSERT INTO categories (id, name, description, created_at, change_version) \
             VALUES (?, ?, ?, ?, 1) ON CONFLICT (name) DO UPDATE SET \
             description = excluded.description, change_version = categories.change_version + 1 \
             WHERE {changed} RETURNING {CATEGORY_COLS}, change_version"
        )
    };
    let row = sqlx::query(&sql)
        .bind(Uuid::now_v7().to_string())
        .bind(name)
        .bind(description)
        .bind(now())
        .fetch_optional(&mut *conn)
        .await
        .map_err(db("writing a category"))?;
    let Some(row) = row else {
        let row = sqlx::query(&format!(
            "SELECT {CATEGORY_COLS} FROM categories WHERE name = ?"
        ))
        .bind(name)
        .fetch_one(&mut *conn)
        .await
        .map_err(db("reading a category"))?;
        return category_from_row(&row);
    };
    let category = category_from_row(&row)?;
    if !sinks.is_empty() {
        let version: i64 = get(&row, "change_version")?;
        let event = ChangeEvent::new(
            ENTITY_CATEGORY,
            &category.id.to_string(),
            version,
            &category,
        )?;
        queue_changes(conn, &sinks, &[event], false).await?;
    }
    Ok(category)
}

pub(super) async fn write_connection_state(
    conn: &mut SqliteConnection,
    id: &DeviceId,
    connected: bool,
    at: DateTime<Utc>,
) -> StoreResult<Option<bool>> {
    let at = ts(at);
    let Some(row) =
        sqlx::query("SELECT connection_state_updated_at FROM devices WHERE device_id = ?")
            .bind(id.as_str())
            .fetch_optional(&mut *conn)
            .await
            .map_err(db("reading a connection state"))?
    else {
        return Ok(None);
    };
    let stored = get::<Option<String>>(&row, "connection_state_updated_at")?
        .map(|raw| parse_ts(&raw, "connection_state_updated_at"))
        .transpose()?;
    let applied = crate::decide::connection_applies(stored, parse_ts(&at, "at")?);
    let sql = if applied {
        format!(
            "UPDATE devices SET connection_state = ?, connection_state_updated_at = ?, \
             last_activity_time = {LATER_ACTIVITY}, updated_at = ? WHERE device_id = ?"
        )
    } else {
        format!(
            "UPDATE devices SET last_activity_time = {LATER_ACTIVITY}, updated_at = ? WHERE device_id = ?"
        )
    };
    let mut query = sqlx::query(&sql);
    if applied {
        query = query.bind(connected).bind(&at);
    }
    query
        .bind(&at)
        .bind(&at)
        .bind(now())
        .bind(id.as_str())
        .execute(&mut *conn)
        .await
        .map_err(db("writing a connection state"))?;
    if applied {
        sqlx::query(
            "INSERT INTO connection_events (device_id, at, connected) VALUES (?, ?, ?) \
             ON CONFLICT DO UPDATE SET connected = excluded.connected",
        )
        .bind(id.as_str())
        .bind(&at)
        .bind(connected)
        .execute(&mut *conn)
        .await
        .map_err(db("recording a connection event"))?;
        sqlx::query(
            "DELETE FROM connection_events WHERE device_id = ?1 AND at < (SELECT at FROM \
             connection_events WHERE device_id = ?1 ORDER BY at DESC LIMIT 1 OFFSET ?2)",
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
    pool: &sqlx::SqlitePool,
    id: &DeviceId,
    limit: u32,
) -> StoreResult<Vec<(DateTime<Utc>, bool)>> {
    let rows = sqlx::query(
        "SELECT at, connected FROM connection_events WHERE device_id = ? \
         ORDER BY at DESC LIMIT ?",
    )
    .bind(id.as_str())
    .bind(i64::from(limit.min(crate::model::CONNECTION_EVENTS_KEPT)))
    .fetch_all(pool)
    .await
    .map_err(db("reading connection events"))?;
    rows.iter()
        .map(|r| Ok((get_ts(r, "at")?, get(r, "connected")?)))
        .collect()
}

pub(super) async fn write_reported(
    conn: &mut SqliteConnection,
    id: &DeviceId,
    reported: &serde_json::Value,
    at: DateTime<Utc>,
) -> StoreResult<bool> {
    let reported = json_text(reported, "reported_properties")?;
    let at = ts(at);
    let done = sqlx::query(&format!(
        "UPDATE devices SET reported_properties = ?, last_activity_time = {LATER_ACTIVITY}, \
         updated_at = ? WHERE device_id = ?"
    ))
    .bind(&reported)
    .bind(&at)
    .bind(&at)
    .bind(now())
    .bind(id.as_str())
    .execute(&mut *conn)
    .await
    .map_err(db("writing reported properties"))?;
    Ok(done.rows_affected() > 0)
}

/// Replaces the settings of device `id`; `None` when there is no such device.
pub(super) async fn write_settings(
    conn: &mut SqliteConnection,
    id: &DeviceId,
    settings: &serde_json::Value,
) -> StoreResult<Option<Device>> {
    let settings = json_text(settings, "settings")?;
    sqlx::query(&format!(
        "UPDATE devices SET settings = ?, updated_at = ? WHERE device_id = ? RETURNING {DEVICE_COLS}"
    ))
    .bind(&settings)
    .bind(now())
    .bind(id.as_str())
    .fetch_optional(&mut *conn)
    .await
    .map_err(db("writing device settings"))?
    .as_ref()
    .map(device_from_row)
    .transpose()
}

pub(super) async fn insert_unknown_device(
    conn: &mut SqliteConnection,
    id: &DeviceId,
    provider_instance: &str,
) -> StoreResult<bool> {
    let at = now();
    let inserted = sqlx::query(
        "INSERT INTO devices (id, device_id, name, provider_instance, connection_state, tags, \
         registration_status, is_simulated, created_at, updated_at) \
         VALUES (?, ?, ?, ?, FALSE, '{}', ?, ?, ?, ?) ON CONFLICT (device_id) DO NOTHING",
    )
    .bind(Uuid::now_v7().to_string())
    .bind(id.as_str())
    .bind(id.as_str())
    .bind(provider_instance)
    .bind(RegistrationStatus::Unknown.value())
    .bind(IsSimulated::No.value())
    .bind(&at)
    .bind(&at)
    .execute(&mut *conn)
    .await
    .map_err(db("inserting an unknown device"))?
    .rows_affected();
    Ok(inserted > 0)
}

/// Moves each device's last activity to its time unless a later one is stored; one
/// statement for the whole batch.
pub(super) async fn bump_activity(
    conn: &mut SqliteConnection,
    devices: &[(Uuid, DateTime<Utc>)],
) -> StoreResult<()> {
    let at = now();
    for chunk in devices.chunks(1000) {
        let mut qb = QueryBuilder::<Sqlite>::new("WITH v (id, at) AS (");
        qb.push_values(chunk, |mut b, (id, time)| {
            b.push_bind(id.to_string()).push_bind(ts(*time));
        });
        qb.push(
            ") UPDATE devices SET last_activity_time = CASE WHEN last_activity_time IS NULL \
             OR last_activity_time < v.at THEN v.at ELSE last_activity_time END, updated_at = ",
        )
        .push_bind(&at)
        .push(" FROM v WHERE devices.id = v.id");
        qb.build()
            .execute(&mut *conn)
            .await
            .map_err(db("bumping last activity"))?;
    }
    Ok(())
}

impl SqliteStore {
    /// See [`crate::Store::mark_unregistered`].
    pub(super) async fn unregister(
        &self,
        id: &DeviceId,
        message: Option<String>,
    ) -> StoreResult<Device> {
        let mut tx = self.write().await?;
        let existing = require_device(&mut tx, id).await?;
        if let Some(refused) = crate::decide::unregister_refusal(&existing) {
            return Err(refused);
        }
        let at = now();
        let row = sqlx::query(&format!(
            "UPDATE devices SET registration_status = ?, registration_message = ?, updated_at = ? \
             WHERE id = ? RETURNING {DEVICE_COLS}"
        ))
        .bind(RegistrationStatus::Unregistered.value())
        .bind(&message)
        .bind(&at)
        .bind(existing.id.to_string())
        .fetch_one(&mut *tx)
        .await
        .map_err(db("unregistering a device"))?;
        let device = device_from_row(&row)?;
        let subs = self.subs();
        registration::insert_history(
            &mut tx,
            &[(&device, RegistrationAction::Unregister)],
            &at,
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
        let existing = require_device(&mut tx, id).await?;
        if let Some(refused) = crate::decide::move_refusal(&existing, from, to) {
            return Err(refused);
        }
        let at = now();
        let row = sqlx::query(&format!(
            "UPDATE devices SET provider_instance = ?, updated_at = ? WHERE id = ? RETURNING {DEVICE_COLS}"
        ))
        .bind(to)
        .bind(&at)
        .bind(existing.id.to_string())
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
            &at,
            &subs,
        )
        .await?;
        let failed = sqlx::query(&format!(
            "UPDATE commands SET status = ?, status_reason = ?, updated_at = ?, \
             claim_holder = NULL, claimed_until = NULL, change_version = change_version + 1 \
             WHERE device = ? AND status = ? RETURNING {COMMAND_COLS}, change_version"
        ))
        .bind(CommandStatus::Error.value())
        .bind(crate::decide::moved_command_reason(from, to))
        .bind(&at)
        .bind(existing.id.to_string())
        .bind(CommandStatus::InProgress.value())
        .fetch_all(&mut *tx)
        .await
        .map_err(db("ending the commands of a moved device"))?;
        let failed = commands_changed(&mut tx, &failed, &subs).await?.len() as u64;
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
            QueryBuilder::<Sqlite>::new(format!("SELECT {DEVICE_COLS} FROM devices WHERE 1 = 1"));
        if let Some(after) = &page.after {
            let after = DeviceId::parse(after).map_err(|_| bad_cursor(after))?;
            qb.push(" AND device_id > ")
                .push_bind(after.as_str().to_owned());
        }
        if let Some(p) = &filter.provider_instance {
            qb.push(" AND provider_instance = ").push_bind(p.clone());
        }
        if let Some(c) = &filter.category {
            qb.push(" AND category = ").push_bind(c.clone());
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
            "SELECT {HISTORY_COLS} FROM registration_history WHERE device = ? ORDER BY created_at, id"
        ))
        .bind(device.id.to_string())
        .fetch_all(&mut *conn)
        .await
        .map_err(db("reading registration history"))?;
        rows.iter().map(history_from_row).collect()
    }

    /// See [`crate::Store::list_categories`].
    pub(super) async fn categories(&self) -> StoreResult<Vec<Category>> {
        let rows = sqlx::query(&format!(
            "SELECT {CATEGORY_COLS} FROM categories ORDER BY name"
        ))
        .fetch_all(&self.pool)
        .await
        .map_err(db("listing categories"))?;
        rows.iter().map(category_from_row).collect()
    }

    // --- telemetry and alerts ------------------------------------------------------------
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
    conn: &mut SqliteConnection,
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
        "UPDATE devices SET change_version = change_version + 1 WHERE device_id = ? \
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
    let category = get_opt_uuid(&row, "category_ref")?;
    let key = device.device_id.as_str();
    let event = ChangeEvent {
        change_of: format!("{ENTITY_DEVICE}:{key}"),
        key: change_key(ENTITY_DEVICE, key, version),
        payload: device_change_payload(&device, version, category)?,
    };
    let payload = json_text(&event.payload, "change event")?;
    let now_at = Utc::now();
    let mut queue = Vec::with_capacity(sinks.len());
    for (sink, sub) in sinks {
        if sub.coalesce_connection <= chrono::Duration::zero() {
            queue.push(sink);
            continue;
        }
        // The record's newest item for the sink, when it is a connection state still
        // waiting (not leased), takes this change in place: the state is the whole record,
        // so nothing is lost. A change other than a connection state makes it due now.
        let replaced = sqlx::query(
            "UPDATE outbox SET payload = ?, idempotency_key = ?, lease_token = lease_token + 1, \
             connection_only = ?, \
             next_attempt_at = CASE WHEN ? THEN next_attempt_at ELSE MIN(next_attempt_at, ?) END \
             WHERE id = (SELECT id FROM outbox WHERE sink = ? AND change_of = ? \
             ORDER BY id DESC LIMIT 1) \
             AND connection_only = 1 AND (leased_until IS NULL OR leased_until <= ?)",
        )
        .bind(&payload)
        .bind(&event.key)
        .bind(connection)
        .bind(connection)
        .bind(ts(now_at))
        .bind(sink)
        .bind(&event.change_of)
        .bind(ts(now_at))
        .execute(&mut *conn)
        .await
        .map_err(db("coalescing a connection-state change"))?
        .rows_affected();
        if replaced > 0 {
            continue;
        }
        if connection {
            // Held for the interval, gathering the changes that follow it.
            let due = ts(now_at + sub.coalesce_connection);
            sqlx::query(
                "INSERT INTO outbox (sink, payload, idempotency_key, attempts, next_attempt_at, \
                 created_at, change_of, connection_only) VALUES (?, ?, ?, 0, ?, ?, ?, 1) \
                 ON CONFLICT (sink, idempotency_key) DO NOTHING",
            )
            .bind(sink)
            .bind(&payload)
            .bind(&event.key)
            .bind(&due)
            .bind(ts(now_at))
            .bind(&event.change_of)
            .execute(&mut *conn)
            .await
            .map_err(db("queueing a connection-state change"))?;
            continue;
        }
        queue.push(sink);
    }
    queue_changes(conn, &queue, &[event], connection).await
}
