//! Telemetry and alerts on PostgreSQL: dedupe by token (the unique index), CFS debounce
//! (`crate::decide`), the primary's command, the outbox items, and the alert queries.
//!
//! Two replicas committing alerts of one device at once would each see no primary and
//! both write one; so a telemetry transaction first takes the advisory locks of its devices
//! and debounce keys ([`telemetry_locks`]), and the second one waits, then sees the first
//! one's primary and becomes its child.

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, Postgres, QueryBuilder};
use uuid::Uuid;

use super::rows::*;
use super::{
    commands, cut, db, devices, finish_page, get, lock_all, lock_key, now, page_size,
    parse_uuid_cursor, retrying, text, time_cursor, ts, PostgresStore, MAX_DESCRIPTION_CHARS,
};
use crate::batch::{BatchWrite, MAX_DATA_CHARS};
use crate::decide::{self, DebounceMatch};
use crate::model::*;
use crate::store::{StoreError, StoreResult};

/// Debounce: the latest alert with this key inside the window (served by the index
/// `alerts_debounce_latest`, a backward scan without a sort).
pub(super) const DEBOUNCE_LOOKUP: &str =
    "SELECT id, alert_token, parent_alert, parent_alert_token FROM alerts \
     WHERE debounce_key = $1 AND alert_time >= $2 AND alert_time <= $3 \
     ORDER BY alert_time DESC, created_at DESC, id DESC LIMIT 1";

/// The advisory lock keys of a reading: its device and the debounce key of each alert.
fn commit_locks(commit: &TelemetryCommit, keys: &mut Vec<i64>) {
    keys.push(lock_key("device", commit.device_id.as_str()));
    keys.extend(
        commit
            .alerts
            .iter()
            .map(|a| lock_key("debounce", &a.debounce_key)),
    );
}

/// The advisory lock keys of a set of writes: every device they touch and every debounce
/// key of their alerts.
pub(super) fn telemetry_locks<'a>(writes: impl IntoIterator<Item = &'a BatchWrite>) -> Vec<i64> {
    let mut keys = Vec::new();
    for write in writes {
        match write {
            BatchWrite::Telemetry { commit, .. } => commit_locks(commit, &mut keys),
            BatchWrite::Connection { device_id, .. } | BatchWrite::Reported { device_id, .. } => {
                keys.push(lock_key("device", device_id.as_str()));
            }
            BatchWrite::DeadLetter(_) => {}
        }
    }
    keys
}

async fn alert_by_token(conn: &mut PgConnection, token: &str) -> StoreResult<Option<Alert>> {
    sqlx::query(&format!(
        "SELECT {ALERT_COLS} FROM alerts WHERE alert_token = $1"
    ))
    .bind(text(token).as_ref())
    .fetch_optional(&mut *conn)
    .await
    .map_err(db("looking up an alert token"))?
    .as_ref()
    .map(alert_from_row)
    .transpose()
}

/// The alerts of one reading: dedupe by token, debounce, the primary's command, the outbox.
/// The caller holds the advisory locks of [`telemetry_locks`].
pub(super) async fn insert_alerts(
    conn: &mut PgConnection,
    device: &Device,
    commit: &TelemetryCommit,
) -> StoreResult<Vec<CommittedAlert>> {
    let mut out = Vec::with_capacity(commit.alerts.len());
    for new in &commit.alerts {
        let alert_time = ts(new.alert_time);
        let mut found = None;
        if let Some((from, to)) = decide::debounce_range(new.alert_time, commit.debounce_window) {
            let row = sqlx::query(DEBOUNCE_LOOKUP)
                .bind(text(&new.debounce_key).as_ref())
                .bind(ts(from))
                .bind(ts(to))
                .fetch_optional(&mut *conn)
                .await
                .map_err(db("looking for an alert to fold into"))?;
            if let Some(row) = row {
                found = Some(DebounceMatch {
                    id: get(&row, "id")?,
                    token: get(&row, "alert_token")?,
                    parent: get(&row, "parent_alert")?,
                    parent_token: get(&row, "parent_alert_token")?,
                });
            }
        }
        let (parent_id, parent_token) = decide::debounce_parent(found);

        let inserted = sqlx::query(&format!(
            "INSERT INTO alerts (id, description, alert_data, alert_time, alert_token, alert_type, \
             priority_score, device, device_id, parent_alert, parent_alert_token, statecode, \
             statuscode, rule, provider_instance, debounce_key, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17) \
             ON CONFLICT (alert_token) DO NOTHING RETURNING {ALERT_COLS}"
        ))
        .bind(Uuid::now_v7())
        .bind(cut(&new.description, MAX_DESCRIPTION_CHARS))
        .bind(cut(&new.alert_data, MAX_DATA_CHARS))
        .bind(alert_time)
        .bind(text(&new.alert_token).as_ref())
        .bind(new.alert_type.value())
        .bind(new.priority_score.map(i32::from))
        .bind(device.id)
        .bind(device.device_id.as_str())
        .bind(parent_id)
        .bind(parent_token.as_deref())
        .bind(AlertStatus::Active.statecode())
        .bind(AlertStatus::Active.statuscode())
        .bind(text(&new.rule).as_ref())
        .bind(&device.provider_instance)
        .bind(text(&new.debounce_key).as_ref())
        .bind(now())
        .fetch_optional(&mut *conn)
        .await
        .map_err(db("inserting an alert"))?;
        let Some(row) = inserted else {
            // The token is already stored: a redelivery. Nothing is written for it.
            let existing = alert_by_token(&mut *conn, &new.alert_token)
                .await?
                .ok_or_else(|| {
                    StoreError::Database(format!(
                        "alert token {} conflicted but cannot be read back",
                        new.alert_token
                    ))
                })?;
            out.push(CommittedAlert {
                alert: existing,
                duplicate: true,
                command: None,
            });
            continue;
        };
        let alert = alert_from_row(&row)?;

        // A debounced child does not repeat its parent's command.
        let command = match &new.command {
            Some(c) if alert.parent_alert.is_none() => Some(
                commands::insert_command_row(
                    &mut *conn,
                    device,
                    &c.name,
                    &c.message,
                    Some(alert.id),
                    &c.correlation_id,
                )
                .await?,
            ),
            _ => None,
        };

        if !commit.sinks.is_empty() {
            let payload = serde_json::to_value(&alert).map_err(|e| {
                StoreError::Database(format!("serializing alert {}: {e}", alert.id))
            })?;
            let payload = super::jsonb(&payload);
            let key = alert.id.to_string();
            let at = now();
            for sink in &commit.sinks {
                sqlx::query(
                    "INSERT INTO outbox (sink, payload, idempotency_key, attempts, next_attempt_at, created_at) \
                     VALUES ($1, $2, $3, 0, $4, $4) ON CONFLICT (sink, idempotency_key) DO NOTHING",
                )
                .bind(sink)
                .bind(&payload)
                .bind(&key)
                .bind(at)
                .execute(&mut *conn)
                .await
                .map_err(db("queueing an outbox item"))?;
            }
        }

        out.push(CommittedAlert {
            alert,
            duplicate: false,
            command,
        });
    }
    Ok(out)
}

impl PostgresStore {
    /// See [`crate::Store::commit_telemetry`].
    pub(super) async fn telemetry(
        &self,
        commit: &TelemetryCommit,
    ) -> StoreResult<Vec<CommittedAlert>> {
        commit.check()?;
        let mut keys = Vec::new();
        commit_locks(commit, &mut keys);
        retrying(|| async {
            let mut tx = self.write().await?;
            lock_all(&mut tx, keys.clone()).await?;
            let device = devices::require_device(&mut tx, &commit.device_id).await?;
            devices::bump_activity(&mut tx, &device.id, commit.received_at).await?;
            let out = insert_alerts(&mut tx, &device, commit).await?;
            tx.commit().await.map_err(db("committing telemetry"))?;
            Ok(out)
        })
        .await
    }

    /// See [`crate::Store::get_alert`].
    pub(super) async fn alert(&self, id: Uuid) -> StoreResult<Option<Alert>> {
        sqlx::query(&format!("SELECT {ALERT_COLS} FROM alerts WHERE id = $1"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(db("reading an alert"))?
            .as_ref()
            .map(alert_from_row)
            .transpose()
    }

    /// See [`crate::Store::list_alerts`].
    pub(super) async fn alerts_page(
        &self,
        filter: &AlertFilter,
        page: &PageRequest,
    ) -> StoreResult<Page<Alert>> {
        let size = page_size(page);
        let mut qb =
            QueryBuilder::<Postgres>::new(format!("SELECT {ALERT_COLS} FROM alerts WHERE 1 = 1"));
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
        if let Some(s) = filter.statecode {
            qb.push(" AND statecode = ").push_bind(s);
        }
        if let Some(p) = filter.parent_alert {
            qb.push(" AND parent_alert = ").push_bind(p);
        }
        match filter.primary {
            Some(true) => {
                qb.push(" AND parent_alert IS NULL");
            }
            Some(false) => {
                qb.push(" AND parent_alert IS NOT NULL");
            }
            None => {}
        }
        if let Some(t) = filter.alert_type {
            qb.push(" AND alert_type = ").push_bind(t.value());
        }
        qb.push(" ORDER BY created_at DESC, id DESC LIMIT ")
            .push_bind(size as i64 + 1);
        let rows = qb
            .build()
            .fetch_all(&self.pool)
            .await
            .map_err(db("listing alerts"))?;
        let items = rows
            .iter()
            .map(alert_from_row)
            .collect::<StoreResult<Vec<_>>>()?;
        Ok(finish_page(items, size, |a| {
            time_cursor(a.created_at, &a.id.to_string())
        }))
    }

    /// See [`crate::Store::set_alert_status`].
    pub(super) async fn alert_status(
        &self,
        id: Uuid,
        status: AlertStatus,
        last_command: Option<(Uuid, DateTime<Utc>)>,
    ) -> StoreResult<Alert> {
        let (command, sent) = match last_command {
            Some((command, at)) => (Some(command), Some(ts(at))),
            None => (None, None),
        };
        let row = sqlx::query(&format!(
            "UPDATE alerts SET statecode = $1, statuscode = $2, \
             last_command_sent = COALESCE($3, last_command_sent), \
             last_command_sent_time = COALESCE($4, last_command_sent_time) \
             WHERE id = $5 RETURNING {ALERT_COLS}"
        ))
        .bind(status.statecode())
        .bind(status.statuscode())
        .bind(command)
        .bind(sent)
        .bind(id)
        .fetch_optional(&self.pool)
        .await
        .map_err(db("setting an alert status"))?
        .ok_or_else(|| StoreError::NotFound {
            entity: "alert",
            key: id.to_string(),
        })?;
        alert_from_row(&row)
    }
}
