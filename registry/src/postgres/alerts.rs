//! Telemetry and alerts on PostgreSQL: the statements group commit (`crate::apply`) writes
//! a batch's alerts with (the stored tokens, the debounce lookups, the alert rows and the
//! outbox items, one statement each for the whole batch, rows passed as arrays), and the
//! alert queries.
//!
//! Two replicas committing alerts of one device at once would each see no primary and
//! both write one; so a telemetry transaction first takes the advisory locks of its devices
//! and debounce keys ([`telemetry_locks`]), and the second one waits, then sees the first
//! one's primary and becomes its child.

use chrono::{DateTime, Utc};
use sqlx::postgres::PgRow;
use sqlx::{PgConnection, Postgres, QueryBuilder};
use uuid::Uuid;

use super::rows::*;
use super::{
    db, finish_page, get, lock_key, now, page_size, parse_uuid_cursor, text, time_cursor, ts,
    PostgresStore,
};
use crate::apply::{AlertRow, OutboxRow};
use crate::batch::BatchWrite;
use crate::decide::DebounceMatch;
use crate::fold::Probe;
use crate::model::*;
use crate::store::{StoreError, StoreResult};

/// Debounce for a whole batch, one statement: for each probe (its 1-based ordinality is
/// the answer's `i`) the latest alert with that key inside the window (each lookup a
/// backward scan of the index `alerts_debounce_latest`, without a sort). Probes without a
/// match give no row.
const DEBOUNCE_LOOKUPS: &str = "SELECT q.i, m.id, m.alert_token, m.alert_time, m.parent_alert, \
     m.parent_alert_token FROM unnest($1::text[], $2::timestamptz[], $3::timestamptz[]) \
     WITH ORDINALITY AS q (k, lo, hi, i) JOIN LATERAL (\
     SELECT id, alert_token, alert_time, parent_alert, parent_alert_token FROM alerts \
     WHERE debounce_key = q.k AND alert_time >= q.lo AND alert_time <= q.hi \
     ORDER BY alert_time DESC, created_at DESC, id DESC LIMIT 1) m ON true";

/// The advisory lock keys of a reading: its device and the debounce key of each alert.
pub(super) fn commit_locks(commit: &TelemetryCommit, keys: &mut Vec<i64>) {
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

pub(super) async fn alerts_by_token(
    conn: &mut PgConnection,
    tokens: &[&str],
) -> StoreResult<Vec<Alert>> {
    let tokens: Vec<String> = tokens.iter().map(|t| text(t).into_owned()).collect();
    sqlx::query(&format!(
        "SELECT {ALERT_COLS} FROM alerts WHERE alert_token = ANY($1)"
    ))
    .bind(tokens)
    .fetch_all(&mut *conn)
    .await
    .map_err(db("looking up alert tokens"))?
    .iter()
    .map(alert_from_row)
    .collect()
}

pub(super) async fn debounce_matches(
    conn: &mut PgConnection,
    probes: &[Probe<'_>],
) -> StoreResult<Vec<Option<DebounceMatch>>> {
    let keys: Vec<String> = probes.iter().map(|p| text(p.key).into_owned()).collect();
    let from: Vec<DateTime<Utc>> = probes.iter().map(|p| ts(p.from)).collect();
    let to: Vec<DateTime<Utc>> = probes.iter().map(|p| ts(p.to)).collect();
    let rows = sqlx::query(DEBOUNCE_LOOKUPS)
        .bind(keys)
        .bind(from)
        .bind(to)
        .fetch_all(&mut *conn)
        .await
        .map_err(db("looking for alerts to fold into"))?;
    let mut out = vec![None; probes.len()];
    for row in &rows {
        let i: i64 = get(row, "i")?;
        let slot = usize::try_from(i - 1)
            .ok()
            .and_then(|i| out.get_mut(i))
            .ok_or_else(|| StoreError::Database(format!("debounce lookup {i} was not asked")))?;
        *slot = Some(DebounceMatch {
            id: get(row, "id")?,
            token: get(row, "alert_token")?,
            alert_time: get(row, "alert_time")?,
            parent: get(row, "parent_alert")?,
            parent_token: get(row, "parent_alert_token")?,
        });
    }
    Ok(out)
}

pub(super) async fn insert_alert_rows(
    conn: &mut PgConnection,
    rows: &[AlertRow<'_>],
) -> StoreResult<Vec<Alert>> {
    fn owned<'r>(rows: &'r [AlertRow<'_>], f: impl Fn(&'r AlertRow<'_>) -> &'r str) -> Vec<String> {
        rows.iter().map(|r| text(f(r)).into_owned()).collect()
    }
    let ids: Vec<Uuid> = rows.iter().map(|r| r.id).collect();
    let times: Vec<DateTime<Utc>> = rows.iter().map(|r| ts(r.new.alert_time)).collect();
    let types: Vec<i32> = rows.iter().map(|r| r.new.alert_type.value()).collect();
    let priorities: Vec<Option<i32>> = rows
        .iter()
        .map(|r| r.new.priority_score.map(i32::from))
        .collect();
    let devices: Vec<Uuid> = rows.iter().map(|r| r.device.id).collect();
    let parents: Vec<Option<Uuid>> = rows.iter().map(|r| r.parent).collect();
    let parent_tokens: Vec<Option<String>> = rows
        .iter()
        .map(|r| r.parent_token.as_deref().map(|t| text(t).into_owned()))
        .collect();
    let statecodes = vec![AlertStatus::Active.statecode(); rows.len()];
    let statuscodes = vec![AlertStatus::Active.statuscode(); rows.len()];
    let created: Vec<DateTime<Utc>> = rows.iter().map(|r| ts(r.created_at)).collect();
    sqlx::query(&format!(
        "INSERT INTO alerts (id, description, alert_data, alert_time, alert_token, alert_type, \
         priority_score, device, device_id, parent_alert, parent_alert_token, statecode, \
         statuscode, rule, provider_instance, debounce_key, created_at) \
         SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::timestamptz[], \
         $5::text[], $6::int4[], $7::int4[], $8::uuid[], $9::text[], $10::uuid[], $11::text[], \
         $12::int4[], $13::int4[], $14::text[], $15::text[], $16::text[], $17::timestamptz[]) \
         RETURNING {ALERT_COLS}"
    ))
    .bind(ids)
    .bind(owned(rows, |r| &r.description))
    .bind(owned(rows, |r| &r.alert_data))
    .bind(times)
    .bind(owned(rows, |r| &r.new.alert_token))
    .bind(types)
    .bind(priorities)
    .bind(devices)
    .bind(owned(rows, |r| r.device.device_id.as_str()))
    .bind(parents)
    .bind(parent_tokens)
    .bind(statecodes)
    .bind(statuscodes)
    .bind(owned(rows, |r| &r.new.rule))
    .bind(owned(rows, |r| &r.device.provider_instance))
    .bind(owned(rows, |r| &r.new.debounce_key))
    .bind(created)
    .fetch_all(&mut *conn)
    .await
    .map_err(db("inserting alerts"))?
    .iter()
    .map(alert_from_row)
    .collect()
}

/// Queues each new alert for its sink: the alert as the payload, its id as the idempotency
/// key, and `msdyn_iotalert:<id>` as the record it is about, so the alert's later change
/// events (version 2 on, [`alerts_changed`]) reach the sink after it.
pub(super) async fn queue_outbox(
    conn: &mut PgConnection,
    items: &[OutboxRow<'_>],
) -> StoreResult<()> {
    let mut sinks = Vec::with_capacity(items.len());
    let mut payloads = Vec::with_capacity(items.len());
    let mut keys = Vec::with_capacity(items.len());
    let mut records = Vec::with_capacity(items.len());
    for item in items {
        let payload = serde_json::to_value(item.alert).map_err(|e| {
            StoreError::Database(format!("serializing alert {}: {e}", item.alert.id))
        })?;
        sinks.push(item.sink.to_owned());
        payloads.push(super::jsonb(&payload).0.to_string());
        keys.push(item.alert.id.to_string());
        records.push(format!("{ENTITY_ALERT}:{}", item.alert.id));
    }
    sqlx::query(
        "INSERT INTO outbox (sink, payload, idempotency_key, attempts, next_attempt_at, created_at, \
         change_of) \
         SELECT s, p::jsonb, k, 0, $5, $5, c \
         FROM unnest($1::text[], $2::text[], $3::text[], $4::text[]) \
         WITH ORDINALITY AS v (s, p, k, c, n) ORDER BY n \
         ON CONFLICT (sink, idempotency_key) DO NOTHING",
    )
    .bind(sinks)
    .bind(payloads)
    .bind(keys)
    .bind(records)
    .bind(now())
    .execute(&mut *conn)
    .await
    .map_err(db("queueing outbox items"))?;
    Ok(())
}

/// The alerts of these rows (read with [`ALERT_COLS`] and `change_version`), after queueing
/// each one's change event for each sink in `subs` taking alerts, in the caller's
/// transaction. Every statement changing a stored alert bumps its change version in the
/// same statement (1 is its creation, queued as the new alert itself).
pub(super) async fn alerts_changed(
    conn: &mut PgConnection,
    rows: &[PgRow],
    subs: &Subscriptions,
) -> StoreResult<Vec<Alert>> {
    let alerts = rows
        .iter()
        .map(alert_from_row)
        .collect::<StoreResult<Vec<_>>>()?;
    let sinks = subs.alert_change_sinks();
    if !sinks.is_empty() {
        let events = alerts
            .iter()
            .zip(rows)
            .map(|(a, row)| {
                ChangeEvent::new(
                    ENTITY_ALERT,
                    &a.id.to_string(),
                    get(row, "change_version")?,
                    a,
                )
            })
            .collect::<StoreResult<Vec<_>>>()?;
        super::outbox::queue_changes(conn, &sinks, &events, false).await?;
    }
    Ok(alerts)
}

/// The one alert a statement changed (`row`), after queueing its change event.
async fn alert_changed(
    conn: &mut PgConnection,
    row: PgRow,
    subs: &Subscriptions,
) -> StoreResult<Alert> {
    alerts_changed(conn, std::slice::from_ref(&row), subs)
        .await?
        .pop()
        .ok_or_else(|| StoreError::Database("an updated alert was not read back".into()))
}

impl PostgresStore {
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
        let mut tx = self.write().await?;
        let row = sqlx::query(&format!(
            "UPDATE alerts SET statecode = $1, statuscode = $2, \
             last_command_sent = COALESCE($3, last_command_sent), \
             last_command_sent_time = COALESCE($4, last_command_sent_time), \
             change_version = change_version + 1 \
             WHERE id = $5 RETURNING {ALERT_COLS}, change_version"
        ))
        .bind(status.statecode())
        .bind(status.statuscode())
        .bind(command)
        .bind(sent)
        .bind(id)
        .fetch_optional(&mut *tx)
        .await
        .map_err(db("setting an alert status"))?
        .ok_or_else(|| StoreError::NotFound {
            entity: "alert",
            key: id.to_string(),
        })?;
        let alert = alert_changed(&mut tx, row, &self.subs()).await?;
        tx.commit()
            .await
            .map_err(db("committing an alert status"))?;
        Ok(alert)
    }

    /// See [`crate::Store::set_alert_service_work`].
    pub(super) async fn alert_service_work(
        &self,
        id: Uuid,
        work: ServiceWork,
    ) -> StoreResult<Alert> {
        let status = work.status();
        let (case, order) = match work {
            ServiceWork::Case(c) => (Some(c), None),
            ServiceWork::WorkOrder(w) => (None, Some(w)),
        };
        let mut tx = self.write().await?;
        let row = sqlx::query(&format!(
            "UPDATE alerts SET statecode = $1, statuscode = $2, \
             case_id = COALESCE($3, case_id), workorder_id = COALESCE($4, workorder_id), \
             change_version = change_version + 1 \
             WHERE id = $5 RETURNING {ALERT_COLS}, change_version"
        ))
        .bind(status.statecode())
        .bind(status.statuscode())
        .bind(case)
        .bind(order)
        .bind(id)
        .fetch_optional(&mut *tx)
        .await
        .map_err(db("recording an alert's case or work order"))?
        .ok_or_else(|| StoreError::NotFound {
            entity: "alert",
            key: id.to_string(),
        })?;
        let alert = alert_changed(&mut tx, row, &self.subs()).await?;
        tx.commit()
            .await
            .map_err(db("committing an alert's case or work order"))?;
        Ok(alert)
    }

    /// See [`crate::Store::close_child_alerts`].
    pub(super) async fn close_children(&self, parent: Uuid) -> StoreResult<u64> {
        let closed = AlertStatus::Closed;
        let mut tx = self.write().await?;
        let rows = sqlx::query(&format!(
            "UPDATE alerts SET statecode = $1, statuscode = $2, change_version = change_version + 1 \
             WHERE parent_alert = $3 AND statecode <> $1 RETURNING {ALERT_COLS}, change_version"
        ))
        .bind(closed.statecode())
        .bind(closed.statuscode())
        .bind(parent)
        .fetch_all(&mut *tx)
        .await
        .map_err(db("closing child alerts"))?;
        let closed = alerts_changed(&mut tx, &rows, &self.subs()).await?.len();
        tx.commit()
            .await
            .map_err(db("committing closed child alerts"))?;
        Ok(closed as u64)
    }
}
