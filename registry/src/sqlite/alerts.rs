//! Telemetry and alerts on SQLite: dedupe by token (the unique index), CFS debounce
//! (`crate::decide`), the primary's command, the outbox items, and the alert queries.

use super::*;

/// Debounce: the latest alert with this key inside the window (served by the index
/// `alerts_debounce_latest`, without a sort).
pub(super) const DEBOUNCE_LOOKUP: &str =
    "SELECT id, alert_token, parent_alert, parent_alert_token FROM alerts \
     WHERE debounce_key = ? AND alert_time >= ? AND alert_time <= ? \
     ORDER BY alert_time DESC, created_at DESC, id DESC LIMIT 1";

pub(super) async fn alert_by_token(
    conn: &mut SqliteConnection,
    token: &str,
) -> StoreResult<Option<Alert>> {
    sqlx::query(&format!(
        "SELECT {ALERT_COLS} FROM alerts WHERE alert_token = ?"
    ))
    .bind(token)
    .fetch_optional(&mut *conn)
    .await
    .map_err(db("looking up an alert token"))?
    .as_ref()
    .map(alert_from_row)
    .transpose()
}

pub(super) async fn insert_alerts(
    conn: &mut SqliteConnection,
    device: &Device,
    commit: &TelemetryCommit,
) -> StoreResult<Vec<CommittedAlert>> {
    let mut out = Vec::with_capacity(commit.alerts.len());
    for new in &commit.alerts {
        // Debounce: the latest alert with the same key whose time is at most one window
        // from this one's, or its parent if it is a child (the hierarchy stays flat).
        // In order, that is the latest alert of the window before this one; the window
        // also reaches forward so that an alert delivered late (after later alerts of the
        // same burst) folds into its burst instead of opening a new primary.
        let alert_time = ts(new.alert_time);
        let mut found = None;
        if let Some((from, to)) =
            crate::decide::debounce_range(new.alert_time, commit.debounce_window)
        {
            let row = sqlx::query(DEBOUNCE_LOOKUP)
                .bind(&new.debounce_key)
                .bind(ts(from))
                .bind(ts(to))
                .fetch_optional(&mut *conn)
                .await
                .map_err(db("looking for an alert to fold into"))?;
            if let Some(row) = row {
                found = Some(crate::decide::DebounceMatch {
                    id: get_uuid(&row, "id")?,
                    token: get(&row, "alert_token")?,
                    parent: get_opt_uuid(&row, "parent_alert")?,
                    parent_token: get(&row, "parent_alert_token")?,
                });
            }
        }
        let (parent_id, parent_token) = crate::decide::debounce_parent(found);
        let parent_id = parent_id.map(|id| id.to_string());

        let inserted = sqlx::query(&format!(
                "INSERT INTO alerts (id, description, alert_data, alert_time, alert_token, alert_type, \
                 priority_score, device, device_id, parent_alert, parent_alert_token, statecode, \
                 statuscode, rule, provider_instance, debounce_key, created_at) \
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) \
                 ON CONFLICT (alert_token) DO NOTHING RETURNING {ALERT_COLS}"
            ))
            .bind(Uuid::now_v7().to_string())
            .bind(cut(&new.description, MAX_DESCRIPTION_CHARS))
            .bind(cut(&new.alert_data, MAX_DATA_CHARS))
            .bind(&alert_time)
            .bind(&new.alert_token)
            .bind(new.alert_type.value())
            .bind(new.priority_score.map(i64::from))
            .bind(device.id.to_string())
            .bind(device.device_id.as_str())
            .bind(&parent_id)
            .bind(&parent_token)
            .bind(AlertStatus::Active.statecode())
            .bind(AlertStatus::Active.statuscode())
            .bind(&new.rule)
            .bind(&device.provider_instance)
            .bind(&new.debounce_key)
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
                insert_command_row(
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
            let payload = serde_json::to_string(&alert).map_err(|e| {
                StoreError::Database(format!("serializing alert {}: {e}", alert.id))
            })?;
            let key = alert.id.to_string();
            let at = now();
            for sink in &commit.sinks {
                sqlx::query(
                        "INSERT INTO outbox (sink, payload, idempotency_key, attempts, next_attempt_at, created_at) \
                         VALUES (?, ?, ?, 0, ?, ?) ON CONFLICT (sink, idempotency_key) DO NOTHING",
                    )
                    .bind(sink)
                    .bind(&payload)
                    .bind(&key)
                    .bind(&at)
                    .bind(&at)
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

impl SqliteStore {
    /// See [`crate::Store::commit_telemetry`].
    pub(super) async fn telemetry(
        &self,
        commit: &TelemetryCommit,
    ) -> StoreResult<Vec<CommittedAlert>> {
        commit.check()?;
        let mut tx = self.write().await?;
        let device = require_device(&mut tx, &commit.device_id).await?;
        bump_activity(&mut tx, &device.id, commit.received_at).await?;
        let out = insert_alerts(&mut tx, &device, commit).await?;
        tx.commit().await.map_err(db("committing telemetry"))?;
        Ok(out)
    }

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
        let row = sqlx::query(&format!(
            "UPDATE alerts SET statecode = ?, statuscode = ?, \
             last_command_sent = COALESCE(?, last_command_sent), \
             last_command_sent_time = COALESCE(?, last_command_sent_time) \
             WHERE id = ? RETURNING {ALERT_COLS}"
        ))
        .bind(status.statecode())
        .bind(status.statuscode())
        .bind(&command)
        .bind(&sent)
        .bind(id.to_string())
        .fetch_optional(&self.pool)
        .await
        .map_err(db("setting an alert status"))?
        .ok_or_else(|| StoreError::NotFound {
            entity: "alert",
            key: id.to_string(),
        })?;
        alert_from_row(&row)
    }

    // --- commands ------------------------------------------------------------------------
}
