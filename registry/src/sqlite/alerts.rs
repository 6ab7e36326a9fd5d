//! Telemetry and alerts on SQLite: the statements group commit (`crate::apply`) writes a
//! batch's alerts with (the stored tokens, the debounce lookups, the alert rows and the
//! outbox items, one statement each for up to 500 rows, every value bound), and the alert
//! queries.

use super::*;
use crate::apply::{AlertRow, OutboxRow};
use crate::decide::DebounceMatch;
use crate::fold::Probe;

/// Rows per statement of a batch write: SQLite allows 32,766 bound values a statement, an
/// alert row binds 17.
const ROWS_PER_STATEMENT: usize = 500;

/// Debounce for a batch: for each probe (`(i, key, from, to)` rows of a `VALUES` list) the
/// latest alert with that key inside the window, each lookup served by the index
/// `alerts_debounce_latest` without a sort. Probes without a match give no row.
pub(super) fn debounce_lookups(probes: usize) -> String {
    let values = vec!["(?, ?, ?, ?)"; probes].join(", ");
    format!(
        "WITH probe (i, k, lo, hi) AS (VALUES {values}) \
         SELECT probe.i AS i, a.id, a.alert_token, a.alert_time, a.parent_alert, \
         a.parent_alert_token FROM probe JOIN alerts a ON a.id = (\
         SELECT id FROM alerts WHERE debounce_key = probe.k AND alert_time >= probe.lo \
         AND alert_time <= probe.hi ORDER BY alert_time DESC, created_at DESC, id DESC LIMIT 1)"
    )
}

pub(super) async fn alerts_by_token(
    conn: &mut SqliteConnection,
    tokens: &[&str],
) -> StoreResult<Vec<Alert>> {
    let mut out = Vec::with_capacity(tokens.len());
    for chunk in tokens.chunks(ROWS_PER_STATEMENT) {
        let mut qb = QueryBuilder::<Sqlite>::new(format!(
            "SELECT {ALERT_COLS} FROM alerts WHERE alert_token IN ("
        ));
        let mut list = qb.separated(", ");
        for token in chunk {
            list.push_bind(*token);
        }
        qb.push(")");
        for row in qb
            .build()
            .fetch_all(&mut *conn)
            .await
            .map_err(db("looking up alert tokens"))?
        {
            out.push(alert_from_row(&row)?);
        }
    }
    Ok(out)
}

pub(super) async fn debounce_matches(
    conn: &mut SqliteConnection,
    probes: &[Probe<'_>],
) -> StoreResult<Vec<Option<DebounceMatch>>> {
    let mut out = vec![None; probes.len()];
    for (c, chunk) in probes.chunks(ROWS_PER_STATEMENT).enumerate() {
        let sql = debounce_lookups(chunk.len());
        let mut query = sqlx::query(&sql);
        for (i, p) in chunk.iter().enumerate() {
            let i = i64::try_from(c * ROWS_PER_STATEMENT + i).unwrap_or(i64::MAX);
            query = query.bind(i).bind(p.key).bind(ts(p.from)).bind(ts(p.to));
        }
        let rows = query
            .fetch_all(&mut *conn)
            .await
            .map_err(db("looking for alerts to fold into"))?;
        for row in &rows {
            let i: i64 = get(row, "i")?;
            let slot = usize::try_from(i)
                .ok()
                .and_then(|i| out.get_mut(i))
                .ok_or_else(|| {
                    StoreError::Database(format!("debounce lookup {i} was not asked"))
                })?;
            *slot = Some(DebounceMatch {
                id: get_uuid(row, "id")?,
                token: get(row, "alert_token")?,
                alert_time: get_ts(row, "alert_time")?,
                parent: get_opt_uuid(row, "parent_alert")?,
                parent_token: get(row, "parent_alert_token")?,
            });
        }
    }
    Ok(out)
}

pub(super) async fn insert_alert_rows(
    conn: &mut SqliteConnection,
    rows: &[AlertRow<'_>],
) -> StoreResult<Vec<Alert>> {
    let mut out = Vec::with_capacity(rows.len());
    for chunk in rows.chunks(ROWS_PER_STATEMENT) {
        let mut qb = QueryBuilder::<Sqlite>::new(
            "INSERT INTO alerts (id, description, alert_data, alert_time, alert_token, \
             alert_type, priority_score, device, device_id, parent_alert, parent_alert_token, \
             statecode, statuscode, rule, provider_instance, debounce_key, created_at) ",
        );
        qb.push_values(chunk, |mut b, r| {
            b.push_bind(r.id.to_string())
                .push_bind(r.description.as_str())
                .push_bind(r.alert_data.as_str())
                .push_bind(ts(r.new.alert_time))
                .push_bind(r.new.alert_token.as_str())
                .push_bind(r.new.alert_type.value())
                .push_bind(r.new.priority_score.map(i64::from))
                .push_bind(r.device.id.to_string())
                .push_bind(r.device.device_id.as_str())
                .push_bind(r.parent.map(|p| p.to_string()))
                .push_bind(r.parent_token.as_deref())
                .push_bind(AlertStatus::Active.statecode())
                .push_bind(AlertStatus::Active.statuscode())
                .push_bind(r.new.rule.as_str())
                .push_bind(r.device.provider_instance.as_str())
                .push_bind(r.new.debounce_key.as_str())
                .push_bind(ts(r.created_at));
        });
        qb.push(format!(" RETURNING {ALERT_COLS}"));
        for row in qb
            .build()
            .fetch_all(&mut *conn)
            .await
            .map_err(db("inserting alerts"))?
        {
            out.push(alert_from_row(&row)?);
        }
    }
    Ok(out)
}

/// Queues each new alert for its sink: the alert as the payload, its id as the idempotency
/// key, and `msdyn_iotalert:<id>` as the record it is about, so the alert's later change
/// events (version 2 on, [`alerts_changed`]) reach the sink after it.
pub(super) async fn queue_outbox(
    conn: &mut SqliteConnection,
    items: &[OutboxRow<'_>],
) -> StoreResult<()> {
    let payloads = items
        .iter()
        .map(|item| {
            serde_json::to_string(item.alert).map_err(|e| {
                StoreError::Database(format!("serializing alert {}: {e}", item.alert.id))
            })
        })
        .collect::<StoreResult<Vec<_>>>()?;
    let at = now();
    for (chunk, payloads) in items
        .chunks(ROWS_PER_STATEMENT)
        .zip(payloads.chunks(ROWS_PER_STATEMENT))
    {
        let mut qb = QueryBuilder::<Sqlite>::new(
            "INSERT INTO outbox (sink, payload, idempotency_key, attempts, next_attempt_at, \
             created_at, change_of) ",
        );
        qb.push_values(chunk.iter().zip(payloads), |mut b, (item, payload)| {
            b.push_bind(item.sink)
                .push_bind(payload.as_str())
                .push_bind(item.alert.id.to_string())
                .push_bind(0_i64)
                .push_bind(&at)
                .push_bind(&at)
                .push_bind(format!("{ENTITY_ALERT}:{}", item.alert.id));
        });
        qb.push(" ON CONFLICT (sink, idempotency_key) DO NOTHING");
        qb.build()
            .execute(&mut *conn)
            .await
            .map_err(db("queueing outbox items"))?;
    }
    Ok(())
}

/// The alerts of these rows (read with [`ALERT_COLS`] and `change_version`), after queueing
/// each one's change event for each sink in `subs` taking alerts, in the caller's
/// transaction. Every statement changing a stored alert bumps its change version in the
/// same statement (1 is its creation, queued as the new alert itself).
pub(super) async fn alerts_changed(
    conn: &mut SqliteConnection,
    rows: &[SqliteRow],
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
        queue_changes(conn, &sinks, &events, false).await?;
    }
    Ok(alerts)
}

/// The one alert a statement changed (`row`), after queueing its change event.
async fn alert_changed(
    conn: &mut SqliteConnection,
    row: SqliteRow,
    subs: &Subscriptions,
) -> StoreResult<Alert> {
    alerts_changed(conn, std::slice::from_ref(&row), subs)
        .await?
        .pop()
        .ok_or_else(|| StoreError::Database("an updated alert was not read back".into()))
}

impl SqliteStore {
    /// See [`crate::Store::get_alert`].
    pub(super) async fn alert(&self, id: Uuid) -> StoreResult<Option<Alert>> {
        sqlx::query(&format!("SELECT {ALERT_COLS} FROM alerts WHERE id = ?"))
            .bind(id.to_string())
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
            QueryBuilder::<Sqlite>::new(format!("SELECT {ALERT_COLS} FROM alerts WHERE 1 = 1"));
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
        if let Some(s) = filter.statecode {
            qb.push(" AND statecode = ").push_bind(s);
        }
        if let Some(p) = filter.parent_alert {
            qb.push(" AND parent_alert = ").push_bind(p.to_string());
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
            Some((command, at)) => (Some(command.to_string()), Some(ts(at))),
            None => (None, None),
        };
        let mut tx = self.write().await?;
        let row = sqlx::query(&format!(
            "UPDATE alerts SET statecode = ?, statuscode = ?, \
             last_command_sent = COALESCE(?, last_command_sent), \
             last_command_sent_time = COALESCE(?, last_command_sent_time), \
             change_version = change_version + 1 \
             WHERE id = ? RETURNING {ALERT_COLS}, change_version"
        ))
        .bind(status.statecode())
        .bind(status.statuscode())
        .bind(&command)
        .bind(&sent)
        .bind(id.to_string())
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
            ServiceWork::Case(c) => (Some(c.to_string()), None),
            ServiceWork::WorkOrder(w) => (None, Some(w.to_string())),
        };
        let mut tx = self.write().await?;
        let row = sqlx::query(&format!(
            "UPDATE alerts SET statecode = ?, statuscode = ?, \
             case_id = COALESCE(?, case_id), workorder_id = COALESCE(?, workorder_id), \
             change_version = change_version + 1 \
             WHERE id = ? RETURNING {ALERT_COLS}, change_version"
        ))
        .bind(status.statecode())
        .bind(status.statuscode())
        .bind(case)
        .bind(order)
        .bind(id.to_string())
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
            "UPDATE alerts SET statecode = ?, statuscode = ?, change_version = change_version + 1 \
             WHERE parent_alert = ? AND statecode <> ? RETURNING {ALERT_COLS}, change_version"
        ))
        .bind(closed.statecode())
        .bind(closed.statuscode())
        .bind(parent.to_string())
        .bind(closed.statecode())
        .fetch_all(&mut *tx)
        .await
        .map_err(db("closing child alerts"))?;
        let closed = alerts_changed(&mut tx, &rows, &self.subs()).await?.len();
        tx.commit()
            .await
            .map_err(db("committing closed child alerts"))?;
        Ok(closed as u64)
    }

    // --- commands ------------------------------------------------------------------------
}
