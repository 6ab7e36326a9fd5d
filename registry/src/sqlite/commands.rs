//! Commands on SQLite.

use super::*;

/// The commands of these rows (read with [`COMMAND_COLS`] and `change_version`), after
/// queueing each one's change event for each sink in `subs` taking commands, in the
/// caller's transaction. Every statement that changes what a command shows (creation,
/// status, status reason, publication) bumps its change version in the same statement, so
/// versions count its changes from 1 at creation; lease bookkeeping alone does not.
pub(super) async fn commands_changed(
    conn: &mut SqliteConnection,
    rows: &[SqliteRow],
    subs: &Subscriptions,
) -> StoreResult<Vec<Command>> {
    let commands = rows
        .iter()
        .map(command_from_row)
        .collect::<StoreResult<Vec<_>>>()?;
    let sinks = subs.sink_names(ENTITY_COMMAND);
    if !sinks.is_empty() {
        let events = commands
            .iter()
            .zip(rows)
            .map(|(c, row)| {
                ChangeEvent::new(
                    ENTITY_COMMAND,
                    &c.id.to_string(),
                    get(row, "change_version")?,
                    c,
                )
            })
            .collect::<StoreResult<Vec<_>>>()?;
        queue_changes(conn, &sinks, &events, false).await?;
    }
    Ok(commands)
}

/// Inserts a command (In Progress, change version 1) for a known device and queues its
/// change event for the sinks in `subs` taking commands.
#[allow(clippy::too_many_arguments)]
pub(super) async fn insert_command_row(
    conn: &mut SqliteConnection,
    device: &Device,
    name: &str,
    message: &str,
    parent_alert: Option<Uuid>,
    correlation_id: &str,
    request_id: Option<Uuid>,
    subs: &Subscriptions,
) -> StoreResult<Command> {
    let at = now();
    let row = sqlx::query(&format!(
        "INSERT INTO commands (id, name, message, status, status_reason, device, device_id, \
         parent_alert, correlation_id, provider_instance, created_at, updated_at, request_id, \
         change_version) \
         VALUES (?, ?, ?, ?, NULL, ?, ?, ?, ?, ?, ?, ?, ?, 1) \
         RETURNING {COMMAND_COLS}, change_version"
    ))
    .bind(Uuid::now_v7().to_string())
    .bind(name)
    .bind(message)
    .bind(CommandStatus::InProgress.value())
    .bind(device.id.to_string())
    .bind(device.device_id.as_str())
    .bind(parent_alert.map(|u| u.to_string()))
    .bind(correlation_id)
    .bind(&device.provider_instance)
    .bind(&at)
    .bind(&at)
    .bind(request_id.map(|u| u.to_string()))
    .fetch_one(&mut *conn)
    .await
    .map_err(|e| {
        if is_unique_violation(&e) {
            StoreError::Conflict(format!(
                "a command with correlation id {correlation_id:?} already exists: use a new correlation id"
            ))
        } else {
            db("inserting a command")(e)
        }
    })?;
    let mut commands = commands_changed(conn, std::slice::from_ref(&row), subs).await?;
    commands
        .pop()
        .ok_or_else(|| StoreError::Database("an inserted command was not read back".into()))
}

impl SqliteStore {
    /// See [`crate::Store::insert_command`].
    pub(super) async fn new_command(&self, command: &NewCommand) -> StoreResult<Command> {
        check_command_message(&command.message)?;
        let mut tx = self.write().await?;
        let device = require_device(&mut tx, &command.device_id).await?;
        if let Some(parent) = command.parent_alert {
            let found = sqlx::query("SELECT id FROM alerts WHERE id = ?")
                .bind(parent.to_string())
                .fetch_optional(&mut *tx)
                .await
                .map_err(db("looking up a parent alert"))?;
            if found.is_none() {
                return Err(StoreError::NotFound {
                    entity: "alert",
                    key: parent.to_string(),
                });
            }
        }
        let stored = insert_command_row(
            &mut tx,
            &device,
            &command.name,
            &command.message,
            command.parent_alert,
            &command.correlation_id,
            command.request_id,
            &self.subs(),
        )
        .await?;
        tx.commit().await.map_err(db("committing a command"))?;
        Ok(stored)
    }

    /// See [`crate::Store::set_command_status`].
    pub(super) async fn command_status(
        &self,
        id: Uuid,
        status: CommandStatus,
        reason: Option<String>,
    ) -> StoreResult<Command> {
        let mut tx = self.write().await?;
        let row = sqlx::query(&format!(
            "UPDATE commands SET status = ?, status_reason = ?, updated_at = ?, \
             change_version = change_version + 1 WHERE id = ? \
             RETURNING {COMMAND_COLS}, change_version"
        ))
        .bind(status.value())
        .bind(&reason)
        .bind(now())
        .bind(id.to_string())
        .fetch_optional(&mut *tx)
        .await
        .map_err(db("setting a command status"))?
        .ok_or_else(|| StoreError::NotFound {
            entity: "command",
            key: id.to_string(),
        })?;
        let command = commands_changed(&mut tx, std::slice::from_ref(&row), &self.subs())
            .await?
            .pop();
        tx.commit()
            .await
            .map_err(db("committing a command status"))?;
        command.ok_or_else(|| StoreError::Database("an updated command was not read back".into()))
    }

    /// See [`crate::Store::get_command`].
    pub(super) async fn command(&self, id: Uuid) -> StoreResult<Option<Command>> {
        sqlx::query(&format!("SELECT {COMMAND_COLS} FROM commands WHERE id = ?"))
            .bind(id.to_string())
            .fetch_optional(&self.pool)
            .await
            .map_err(db("reading a command"))?
            .as_ref()
            .map(command_from_row)
            .transpose()
    }

    /// See [`crate::Store::get_command_by_correlation`].
    pub(super) async fn command_by_correlation(
        &self,
        correlation_id: &str,
    ) -> StoreResult<Option<Command>> {
        sqlx::query(&format!(
            "SELECT {COMMAND_COLS} FROM commands WHERE correlation_id = ?"
        ))
        .bind(correlation_id)
        .fetch_optional(&self.pool)
        .await
        .map_err(db("reading a command"))?
        .as_ref()
        .map(command_from_row)
        .transpose()
    }

    /// See [`crate::Store::list_commands`].
    pub(super) async fn commands_page(
        &self,
        filter: &CommandFilter,
        page: &PageRequest,
    ) -> StoreResult<Page<Command>> {
        let size = page_size(page);
        let mut qb =
            QueryBuilder::<Sqlite>::new(format!("SELECT {COMMAND_COLS} FROM commands WHERE 1 = 1"));
        if let Some(after) = &page.after {
            let (time, id) = parse_time_cursor(after)?;
            qb.push(" AND (created_at, id) < (")
                .push_bind(time)
                .push(", ")
                .push_bind(id)
                .push(")");
        }
        if let Some(d) = &filter.device_id {
            qb.push(" AND device_id = ")
                .push_bind(d.as_str().to_owned());
        }
        if let Some(s) = filter.status {
            qb.push(" AND status = ").push_bind(s.value());
        }
        if let Some(p) = filter.parent_alert {
            qb.push(" AND parent_alert = ").push_bind(p.to_string());
        }
        if let Some(r) = filter.request_id {
            qb.push(" AND request_id = ").push_bind(r.to_string());
        }
        qb.push(" ORDER BY created_at DESC, id DESC LIMIT ")
            .push_bind(size as i64 + 1);
        let rows = qb
            .build()
            .fetch_all(&self.pool)
            .await
            .map_err(db("listing commands"))?;
        let items = rows
            .iter()
            .map(command_from_row)
            .collect::<StoreResult<Vec<_>>>()?;
        Ok(finish_page(items, size, |c| {
            time_cursor(c.created_at, &c.id.to_string())
        }))
    }

    /// See [`crate::Store::claim_command`] and [`crate::Store::claim_unpublished_commands`].
    pub(super) async fn claim_commands(
        &self,
        id: Option<Uuid>,
        holder: &str,
        now: DateTime<Utc>,
        until: DateTime<Utc>,
        limit: u32,
    ) -> StoreResult<Vec<Command>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let now = ts(now);
        // One statement, so two replicas never claim the same command.
        let rows = sqlx::query(&format!(
            "UPDATE commands SET claim_holder = ?, claimed_until = ? WHERE id IN (\
                SELECT id FROM commands WHERE published_at IS NULL AND status = ? \
                AND (claimed_until IS NULL OR claimed_until <= ?) AND (? IS NULL OR id = ?) \
                ORDER BY created_at, id LIMIT ?) \
             RETURNING {COMMAND_COLS}"
        ))
        .bind(holder)
        .bind(ts(until))
        .bind(CommandStatus::InProgress.value())
        .bind(&now)
        .bind(id.map(|i| i.to_string()))
        .bind(id.map(|i| i.to_string()))
        .bind(i64::from(limit.min(MAX_PAGE)))
        .fetch_all(&self.pool)
        .await
        .map_err(db("claiming commands"))?;
        let mut commands = rows
            .iter()
            .map(command_from_row)
            .collect::<StoreResult<Vec<_>>>()?;
        commands.sort_by_key(|c| (c.created_at, c.id));
        Ok(commands)
    }

    /// See [`crate::Store::command_published`].
    pub(super) async fn published(&self, id: Uuid, holder: &str) -> StoreResult<bool> {
        let at = now();
        let mut tx = self.write().await?;
        let rows = sqlx::query(&format!(
            "UPDATE commands SET published_at = ?, updated_at = ?, claim_holder = NULL, \
             claimed_until = NULL, status_reason = NULL, change_version = change_version + 1 \
             WHERE id = ? AND claim_holder = ? AND status = ? AND published_at IS NULL \
             RETURNING {COMMAND_COLS}, change_version"
        ))
        .bind(&at)
        .bind(&at)
        .bind(id.to_string())
        .bind(holder)
        .bind(CommandStatus::InProgress.value())
        .fetch_all(&mut *tx)
        .await
        .map_err(db("recording a published command"))?;
        commands_changed(&mut tx, &rows, &self.subs()).await?;
        tx.commit()
            .await
            .map_err(db("committing a published command"))?;
        Ok(rows.len() == 1)
    }

    /// See [`crate::Store::defer_command`].
    pub(super) async fn defer(
        &self,
        id: Uuid,
        holder: &str,
        retry_at: DateTime<Utc>,
        reason: &str,
    ) -> StoreResult<bool> {
        let mut tx = self.write().await?;
        let rows = sqlx::query(&format!(
            "UPDATE commands SET claimed_until = ?, status_reason = ?, updated_at = ?, \
             change_version = change_version + 1 \
             WHERE id = ? AND claim_holder = ? AND status = ? AND published_at IS NULL \
             RETURNING {COMMAND_COLS}, change_version"
        ))
        .bind(ts(retry_at))
        .bind(reason)
        .bind(now())
        .bind(id.to_string())
        .bind(holder)
        .bind(CommandStatus::InProgress.value())
        .fetch_all(&mut *tx)
        .await
        .map_err(db("deferring a command"))?;
        commands_changed(&mut tx, &rows, &self.subs()).await?;
        tx.commit()
            .await
            .map_err(db("committing a deferred command"))?;
        Ok(rows.len() == 1)
    }

    /// See [`crate::Store::release_command_claims`].
    pub(super) async fn release_claims(&self, holder: &str) -> StoreResult<u64> {
        let done = sqlx::query(
            "UPDATE commands SET claim_holder = NULL, claimed_until = NULL \
             WHERE claim_holder = ? AND published_at IS NULL",
        )
        .bind(holder)
        .execute(&self.pool)
        .await
        .map_err(db("releasing command claims"))?;
        Ok(done.rows_affected())
    }
}

impl SqliteStore {
    /// See [`crate::Store::purge`].
    pub(super) async fn purge_old(&self, before: &PurgeBefore, limit: u32) -> StoreResult<Purged> {
        let limit = i64::from(limit);
        let mut tx = self.write().await?;
        let mut out = Purged::default();
        if let Some(t) = before.dead_letters {
            out.dead_letters = sqlx::query(
                "DELETE FROM dead_letters WHERE id IN \
                 (SELECT id FROM dead_letters WHERE created_at < ? ORDER BY created_at, id LIMIT ?)",
            )
            .bind(ts(t))
            .bind(limit)
            .execute(&mut *tx)
            .await
            .map_err(db("purging dead letters"))?
            .rows_affected();
        }
        if let Some(t) = before.commands {
            out.commands = sqlx::query(
                "DELETE FROM commands WHERE id IN \
                 (SELECT id FROM commands WHERE created_at < ? AND status <> ? \
                  ORDER BY created_at, id LIMIT ?)",
            )
            .bind(ts(t))
            .bind(CommandStatus::InProgress.value())
            .bind(limit)
            .execute(&mut *tx)
            .await
            .map_err(db("purging commands"))?
            .rows_affected();
        }
        if let Some(t) = before.alerts {
            // One write lock holds the whole transaction: the ids read here are the ones
            // unlinked and deleted.
            let ids: Vec<String> = sqlx::query_scalar(
                "SELECT a.id FROM alerts a WHERE a.created_at < ? AND a.statecode IN (1, 3) \
                 AND NOT EXISTS (SELECT 1 FROM alerts c WHERE c.parent_alert = a.id) \
                 ORDER BY a.created_at, a.id LIMIT ?",
            )
            .bind(ts(t))
            .bind(limit)
            .fetch_all(&mut *tx)
            .await
            .map_err(db("finding alerts to purge"))?;
            if !ids.is_empty() {
                let ids = serde_json::Value::from(ids).to_string();
                sqlx::query(
                    "UPDATE commands SET parent_alert = NULL \
                     WHERE parent_alert IN (SELECT value FROM json_each(?))",
                )
                .bind(&ids)
                .execute(&mut *tx)
                .await
                .map_err(db("unlinking the commands of purged alerts"))?;
                out.alerts =
                    sqlx::query("DELETE FROM alerts WHERE id IN (SELECT value FROM json_each(?))")
                        .bind(&ids)
                        .execute(&mut *tx)
                        .await
                        .map_err(db("purging alerts"))?
                        .rows_affected();
            }
        }
        if let Some(t) = before.readings {
            out.readings = sqlx::query(
                "DELETE FROM readings WHERE (series, at_ms, msg) IN \
                 (SELECT series, at_ms, msg FROM readings WHERE at_ms < ? ORDER BY at_ms LIMIT ?)",
            )
            .bind(t.timestamp_millis())
            .bind(limit)
            .execute(&mut *tx)
            .await
            .map_err(db("purging readings"))?
            .rows_affected();
        }
        for (resolution_s, t) in [(60_i64, before.minute_rollups), (3600, before.hour_rollups)] {
            let Some(t) = t else { continue };
            out.rollups += sqlx::query(
                "DELETE FROM reading_rollups WHERE (series, resolution_s, bucket_ms) IN \
                 (SELECT series, resolution_s, bucket_ms FROM reading_rollups \
                  WHERE resolution_s = ? AND bucket_ms < ? ORDER BY bucket_ms LIMIT ?)",
            )
            .bind(resolution_s)
            .bind(t.timestamp_millis())
            .bind(limit)
            .execute(&mut *tx)
            .await
            .map_err(db("purging reading rollups"))?
            .rows_affected();
        }
        tx.commit().await.map_err(db("committing a purge"))?;
        Ok(out)
    }
}
