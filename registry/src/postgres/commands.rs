//! Commands on PostgreSQL.

use sqlx::{PgConnection, Postgres, QueryBuilder};
use uuid::Uuid;

use super::rows::*;
use super::{
    db, devices, finish_page, get, is_unique_violation, now, page_size, parse_uuid_cursor, text,
    time_cursor, ts, PostgresStore, MAX_PAGE,
};
use crate::batch::check_command_message;
use crate::model::*;
use crate::store::{StoreError, StoreResult};
use chrono::{DateTime, Utc};
use sqlx::postgres::PgRow;

/// The commands of these rows (read with [`COMMAND_COLS`] and `change_version`), after
/// queueing each one's change event for each sink in `subs` taking commands, in the
/// caller's transaction. Every statement that changes what a command shows (creation,
/// status, status reason, publication) bumps its change version in the same statement, so
/// versions count its changes from 1 at creation; lease bookkeeping alone does not.
pub(super) async fn commands_changed(
    conn: &mut PgConnection,
    rows: &[PgRow],
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
        super::outbox::queue_changes(conn, &sinks, &events, false).await?;
    }
    Ok(commands)
}

/// The one command a statement changed (`row`), after queueing its change event.
async fn command_changed(
    conn: &mut PgConnection,
    row: PgRow,
    subs: &Subscriptions,
) -> StoreResult<Command> {
    commands_changed(conn, std::slice::from_ref(&row), subs)
        .await?
        .pop()
        .ok_or_else(|| StoreError::Database("a written command was not read back".into()))
}

/// Inserts a command (In Progress, change version 1) for a known device and queues its
/// change event for the sinks in `subs` taking commands.
#[allow(clippy::too_many_arguments)]
pub(super) async fn insert_command_row(
    conn: &mut PgConnection,
    device: &Device,
    name: &str,
    message: &str,
    parent_alert: Option<Uuid>,
    correlation_id: &str,
    request_id: Option<Uuid>,
    subs: &Subscriptions,
) -> StoreResult<Command> {
    let row = sqlx::query(&format!(
        "INSERT INTO commands (id, name, message, status, status_reason, device, device_id, \
         parent_alert, correlation_id, provider_instance, created_at, updated_at, request_id, \
         change_version) \
         VALUES ($1, $2, $3, $4, NULL, $5, $6, $7, $8, $9, $10, $10, $11, 1) \
         RETURNING {COMMAND_COLS}, change_version"
    ))
    .bind(Uuid::now_v7())
    .bind(text(name).as_ref())
    .bind(text(message).as_ref())
    .bind(CommandStatus::InProgress.value())
    .bind(device.id)
    .bind(device.device_id.as_str())
    .bind(parent_alert)
    .bind(text(correlation_id).as_ref())
    .bind(&device.provider_instance)
    .bind(now())
    .bind(request_id)
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
    command_changed(conn, row, subs).await
}

impl PostgresStore {
    /// See [`crate::Store::insert_command`].
    pub(super) async fn new_command(&self, command: &NewCommand) -> StoreResult<Command> {
        check_command_message(&command.message)?;
        let mut tx = self.write().await?;
        let device = devices::require_device(&mut tx, &command.device_id).await?;
        if let Some(parent) = command.parent_alert {
            let found = sqlx::query("SELECT id FROM alerts WHERE id = $1")
                .bind(parent)
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
            "UPDATE commands SET status = $1, status_reason = $2, updated_at = $3, \
             change_version = change_version + 1 WHERE id = $4 \
             RETURNING {COMMAND_COLS}, change_version"
        ))
        .bind(status.value())
        .bind(reason.as_deref().map(text).as_deref())
        .bind(now())
        .bind(id)
        .fetch_optional(&mut *tx)
        .await
        .map_err(db("setting a command status"))?
        .ok_or_else(|| StoreError::NotFound {
            entity: "command",
            key: id.to_string(),
        })?;
        let command = command_changed(&mut tx, row, &self.subs()).await?;
        tx.commit()
            .await
            .map_err(db("committing a command status"))?;
        Ok(command)
    }

    /// See [`crate::Store::get_command`].
    pub(super) async fn command(&self, id: Uuid) -> StoreResult<Option<Command>> {
        sqlx::query(&format!(
            "SELECT {COMMAND_COLS} FROM commands WHERE id = $1"
        ))
        .bind(id)
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
            "SELECT {COMMAND_COLS} FROM commands WHERE correlation_id = $1"
        ))
        .bind(text(correlation_id).as_ref())
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
        let mut qb = QueryBuilder::<Postgres>::new(format!(
            "SELECT {COMMAND_COLS} FROM commands WHERE 1 = 1"
        ));
        if let Some(after) = &page.after {
            let (time, id) = parse_uuid_cursor(after)?;
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
            qb.push(" AND parent_alert = ").push_bind(p);
        }
        if let Some(r) = filter.request_id {
            qb.push(" AND request_id = ").push_bind(r);
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
        // One statement, rows locked as they are picked, so two replicas never claim the
        // same command.
        let rows = sqlx::query(&format!(
            "UPDATE commands SET claim_holder = $1, claimed_until = $2 WHERE id IN (\
                SELECT id FROM commands WHERE published_at IS NULL AND status = $3 \
                AND (claimed_until IS NULL OR claimed_until <= $4) \
                AND ($5::uuid IS NULL OR id = $5) \
                ORDER BY created_at, id LIMIT $6 FOR UPDATE SKIP LOCKED) \
             RETURNING {COMMAND_COLS}"
        ))
        .bind(text(holder).as_ref())
        .bind(ts(until))
        .bind(CommandStatus::InProgress.value())
        .bind(ts(now))
        .bind(id)
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
        let mut tx = self.write().await?;
        let rows = sqlx::query(&format!(
            "UPDATE commands SET published_at = $1, updated_at = $1, claim_holder = NULL, \
             claimed_until = NULL, status_reason = NULL, change_version = change_version + 1 \
             WHERE id = $2 AND claim_holder = $3 AND status = $4 AND published_at IS NULL \
             RETURNING {COMMAND_COLS}, change_version"
        ))
        .bind(now())
        .bind(id)
        .bind(text(holder).as_ref())
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
            "UPDATE commands SET claimed_until = $1, status_reason = $2, updated_at = $3, \
             change_version = change_version + 1 \
             WHERE id = $4 AND claim_holder = $5 AND status = $6 AND published_at IS NULL \
             RETURNING {COMMAND_COLS}, change_version"
        ))
        .bind(ts(retry_at))
        .bind(text(reason).as_ref())
        .bind(now())
        .bind(id)
        .bind(text(holder).as_ref())
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
             WHERE claim_holder = $1 AND published_at IS NULL",
        )
        .bind(text(holder).as_ref())
        .execute(&self.pool)
        .await
        .map_err(db("releasing command claims"))?;
        Ok(done.rows_affected())
    }
}

impl PostgresStore {
    /// See [`crate::Store::purge`].
    pub(super) async fn purge_old(&self, before: &PurgeBefore, limit: u32) -> StoreResult<Purged> {
        let limit = i64::from(limit);
        let mut tx = self.write().await?;
        let mut out = Purged::default();
        if let Some(t) = before.dead_letters {
            out.dead_letters = sqlx::query(
                "DELETE FROM dead_letters WHERE id IN \
                 (SELECT id FROM dead_letters WHERE created_at < $1 ORDER BY created_at, id LIMIT $2)",
            )
            .bind(t)
            .bind(limit)
            .execute(&mut *tx)
            .await
            .map_err(db("purging dead letters"))?
            .rows_affected();
        }
        if let Some(t) = before.commands {
            out.commands = sqlx::query(
                "DELETE FROM commands WHERE id IN \
                 (SELECT id FROM commands WHERE created_at < $1 AND status <> $2 \
                  ORDER BY created_at, id LIMIT $3)",
            )
            .bind(t)
            .bind(CommandStatus::InProgress.value())
            .bind(limit)
            .execute(&mut *tx)
            .await
            .map_err(db("purging commands"))?
            .rows_affected();
        }
        if let Some(t) = before.alerts {
            // Locked, so a replica cannot link a new child to them before they are gone.
            let ids: Vec<Uuid> = sqlx::query_scalar(
                "SELECT a.id FROM alerts a WHERE a.created_at < $1 AND a.statecode IN (1, 3) \
                 AND NOT EXISTS (SELECT 1 FROM alerts c WHERE c.parent_alert = a.id) \
                 ORDER BY a.created_at, a.id LIMIT $2 FOR UPDATE OF a",
            )
            .bind(t)
            .bind(limit)
            .fetch_all(&mut *tx)
            .await
            .map_err(db("finding alerts to purge"))?;
            if !ids.is_empty() {
                sqlx::query("UPDATE commands SET parent_alert = NULL WHERE parent_alert = ANY($1)")
                    .bind(&ids)
                    .execute(&mut *tx)
                    .await
                    .map_err(db("unlinking the commands of purged alerts"))?;
                out.alerts = sqlx::query("DELETE FROM alerts WHERE id = ANY($1)")
                    .bind(&ids)
                    .execute(&mut *tx)
                    .await
                    .map_err(db("purging alerts"))?
                    .rows_affected();
            }
        }
        if let Some(t) = before.readings {
            out.readings = sqlx::query(
                "DELETE FROM readings WHERE (device_id, measure, at_ms, msg) IN \
                 (SELECT device_id, measure, at_ms, msg FROM readings WHERE at_ms < $1 ORDER BY at_ms LIMIT $2)",
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
                "DELETE FROM reading_rollups WHERE (device_id, measure, resolution_s, bucket_ms) IN \
                 (SELECT device_id, measure, resolution_s, bucket_ms FROM reading_rollups \
                  WHERE resolution_s = $1 AND bucket_ms < $2 ORDER BY bucket_ms LIMIT $3)",
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
