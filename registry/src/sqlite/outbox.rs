//! The outbox and the dead letters on SQLite. A claim is one `UPDATE ... RETURNING`
//! under the write lock, so two writers never lease the same item.

use super::*;

pub(super) async fn write_dead_letter(
    conn: &mut SqliteConnection,
    letter: &NewDeadLetter,
) -> StoreResult<DeadLetter> {
    let row = sqlx::query(&format!(
        "INSERT INTO dead_letters (source, reason, device_id, message_id, payload, created_at) \
         VALUES (?, ?, ?, ?, ?, ?) RETURNING {DEAD_LETTER_COLS}"
    ))
    .bind(&letter.source)
    .bind(&letter.reason)
    .bind(letter.stored_device_id())
    .bind(letter.stored_message_id())
    .bind(letter.stored_payload())
    .bind(now())
    .fetch_one(&mut *conn)
    .await
    .map_err(db("writing a dead letter"))?;
    dead_letter_from_row(&row)
}

impl SqliteStore {
    /// See [`crate::Store::claim_outbox`].
    pub(super) async fn claim(
        &self,
        sink: &str,
        holder: &str,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
        limit: u32,
    ) -> StoreResult<Vec<OutboxItem>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let now = ts(now);
        // One statement, so two replicas can never lease the same item. An item of a record
        // (`change_of`) is held while an earlier one of the same record waits for its retry
        // or is leased: a sink gets each record's changes in order, so an older state can
        // never land after a newer one.
        let rows = sqlx::query(&format!(
            "UPDATE outbox SET leased_until = ?, lease_token = lease_token + 1, lease_holder = ? \
             WHERE id IN (\
                SELECT id FROM outbox o WHERE sink = ? AND next_attempt_at <= ? \
                AND (leased_until IS NULL OR leased_until <= ?) \
                AND (change_of IS NULL OR NOT EXISTS (SELECT 1 FROM outbox e \
                    WHERE e.sink = o.sink AND e.change_of = o.change_of AND e.id < o.id \
                    AND (e.next_attempt_at > ? OR e.leased_until > ?))) \
                ORDER BY id LIMIT ?) \
             RETURNING {OUTBOX_COLS}"
        ))
        .bind(ts(lease_until))
        .bind(holder)
        .bind(sink)
        .bind(&now)
        .bind(&now)
        .bind(&now)
        .bind(&now)
        .bind(i64::from(limit.min(MAX_PAGE)))
        .fetch_all(&self.pool)
        .await
        .map_err(db("claiming outbox items"))?;
        let mut items = rows
            .iter()
            .map(outbox_from_row)
            .collect::<StoreResult<Vec<_>>>()?;
        items.sort_by_key(|i| i.id);
        Ok(items)
    }

    /// See [`crate::Store::renew_outbox`].
    pub(super) async fn renew(
        &self,
        leases: &[OutboxLease],
        lease_until: DateTime<Utc>,
    ) -> StoreResult<Vec<i64>> {
        if leases.is_empty() {
            return Ok(Vec::new());
        }
        let mut renewed = Vec::with_capacity(leases.len());
        for chunk in leases.chunks(400) {
            let mut q = QueryBuilder::<Sqlite>::new("UPDATE outbox SET leased_until = ");
            q.push_bind(ts(lease_until));
            q.push(" WHERE (id, lease_token) IN (VALUES ");
            let mut sep = q.separated(", ");
            for l in chunk {
                sep.push("(")
                    .push_bind_unseparated(l.id)
                    .push_unseparated(", ")
                    .push_bind_unseparated(l.token)
                    .push_unseparated(")");
            }
            q.push(") RETURNING id");
            let rows = q
                .build()
                .fetch_all(&self.pool)
                .await
                .map_err(db("renewing outbox leases"))?;
            for row in &rows {
                renewed.push(get::<i64>(row, "id")?);
            }
        }
        renewed.sort_unstable();
        Ok(renewed)
    }

    /// See [`crate::Store::outbox_delivered`].
    pub(super) async fn delivered(&self, lease: OutboxLease) -> StoreResult<bool> {
        let done = sqlx::query("DELETE FROM outbox WHERE id = ? AND lease_token = ?")
            .bind(lease.id)
            .bind(lease.token)
            .execute(&self.pool)
            .await
            .map_err(db("removing a delivered outbox item"))?;
        Ok(done.rows_affected() == 1)
    }

    /// See [`crate::Store::outbox_retry`].
    pub(super) async fn retry(
        &self,
        lease: OutboxLease,
        next_attempt_at: DateTime<Utc>,
        error: &str,
    ) -> StoreResult<bool> {
        let done = sqlx::query(
            "UPDATE outbox SET attempts = attempts + 1, next_attempt_at = ?, last_error = ?, \
             leased_until = NULL, lease_holder = NULL WHERE id = ? AND lease_token = ?",
        )
        .bind(ts(next_attempt_at))
        .bind(error)
        .bind(lease.id)
        .bind(lease.token)
        .execute(&self.pool)
        .await
        .map_err(db("recording an outbox retry"))?;
        Ok(done.rows_affected() == 1)
    }

    /// See [`crate::Store::outbox_dead_letter`].
    pub(super) async fn dead_letter_item(
        &self,
        lease: OutboxLease,
        reason: &str,
    ) -> StoreResult<bool> {
        let mut tx = self.write().await?;
        let Some(row) = sqlx::query(
            "SELECT sink, payload, idempotency_key FROM outbox WHERE id = ? AND lease_token = ?",
        )
        .bind(lease.id)
        .bind(lease.token)
        .fetch_optional(&mut *tx)
        .await
        .map_err(db("reading an outbox item"))?
        else {
            return Ok(false);
        };
        let sink: String = get(&row, "sink")?;
        let payload: String = get(&row, "payload")?;
        let key: String = get(&row, "idempotency_key")?;
        let device_id = serde_json::from_str::<serde_json::Value>(&payload)
            .ok()
            .and_then(|v| {
                v.get("msdyn_deviceid")
                    .and_then(|d| d.as_str())
                    .map(str::to_owned)
            });
        sqlx::query(
            "INSERT INTO dead_letters (source, reason, device_id, message_id, payload, created_at) \
             VALUES (?, ?, ?, ?, ?, ?)",
        )
        .bind(format!("sink:{sink}"))
        .bind(reason)
        .bind(&device_id)
        .bind(&key)
        .bind(&payload)
        .bind(now())
        .execute(&mut *tx)
        .await
        .map_err(db("writing a dead letter"))?;
        sqlx::query("DELETE FROM outbox WHERE id = ?")
            .bind(lease.id)
            .execute(&mut *tx)
            .await
            .map_err(db("removing a dead outbox item"))?;
        tx.commit().await.map_err(db("committing a dead letter"))?;
        Ok(true)
    }

    /// See [`crate::Store::outbox_depth`].
    pub(super) async fn depth(&self) -> StoreResult<Vec<(String, u64)>> {
        let rows =
            sqlx::query("SELECT sink, COUNT(*) AS depth FROM outbox GROUP BY sink ORDER BY sink")
                .fetch_all(&self.pool)
                .await
                .map_err(db("counting outbox items"))?;
        rows.iter()
            .map(|row| {
                let depth: i64 = get(row, "depth")?;
                Ok((get(row, "sink")?, u64::try_from(depth).unwrap_or_default()))
            })
            .collect()
    }

    /// See [`crate::Store::list_dead_letters`].
    pub(super) async fn dead_letters_page(
        &self,
        page: &PageRequest,
    ) -> StoreResult<Page<DeadLetter>> {
        let size = page_size(page);
        let mut qb = QueryBuilder::<Sqlite>::new(format!(
            "SELECT {DEAD_LETTER_COLS} FROM dead_letters WHERE 1 = 1"
        ));
        if let Some(after) = &page.after {
            let (time, id) = parse_time_cursor(after)?;
            let id: i64 = id.parse().map_err(|_| bad_cursor(after))?;
            qb.push(" AND (created_at, id) < (")
                .push_bind(time)
                .push(", ")
                .push_bind(id)
                .push(")");
        }
        qb.push(" ORDER BY created_at DESC, id DESC LIMIT ")
            .push_bind(size as i64 + 1);
        let rows = qb
            .build()
            .fetch_all(&self.pool)
            .await
            .map_err(db("listing dead letters"))?;
        let items = rows
            .iter()
            .map(dead_letter_from_row)
            .collect::<StoreResult<Vec<_>>>()?;
        Ok(finish_page(items, size, |d| {
            time_cursor(d.created_at, &d.id.to_string())
        }))
    }
}

impl SqliteStore {
    /// See [`crate::Store::get_dead_letter`].
    pub(super) async fn dead_letter(&self, id: i64) -> StoreResult<Option<DeadLetter>> {
        sqlx::query(&format!(
            "SELECT {DEAD_LETTER_COLS} FROM dead_letters WHERE id = ?"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await
        .map_err(db("reading a dead letter"))?
        .as_ref()
        .map(dead_letter_from_row)
        .transpose()
    }

    /// See [`crate::Store::delete_dead_letter`].
    pub(super) async fn remove_dead_letter(&self, id: i64) -> StoreResult<bool> {
        let mut tx = self.write().await?;
        let done = sqlx::query("DELETE FROM dead_letters WHERE id = ?")
            .bind(id)
            .execute(&mut *tx)
            .await
            .map_err(db("deleting a dead letter"))?;
        tx.commit().await.map_err(db("deleting a dead letter"))?;
        Ok(done.rows_affected() == 1)
    }

    /// See [`crate::Store::requeue_outbox`].
    pub(super) async fn queue_again(
        &self,
        sink: &str,
        key: &str,
        payload: &serde_json::Value,
    ) -> StoreResult<bool> {
        let at = now();
        let mut tx = self.write().await?;
        let done = sqlx::query(
            "INSERT INTO outbox (sink, payload, idempotency_key, attempts, next_attempt_at, \
             created_at) VALUES (?, ?, ?, 0, ?, ?) ON CONFLICT (sink, idempotency_key) DO NOTHING",
        )
        .bind(sink)
        .bind(payload.to_string())
        .bind(key)
        .bind(&at)
        .bind(&at)
        .execute(&mut *tx)
        .await
        .map_err(db("queueing an outbox item again"))?;
        tx.commit()
            .await
            .map_err(db("queueing an outbox item again"))?;
        Ok(done.rows_affected() == 1)
    }
}

/// Change-event rows per `INSERT` (8 bound values each).
const CHANGES_PER_STATEMENT: usize = 500;

/// Queues each of `events` for each of `sinks` (change events of the change feed), in the
/// caller's transaction, in order: event by event, the sinks of one event together. An item
/// already queued for its sink and idempotency key is kept as is. `connection_only` marks
/// items a newer connection state may replace (see `devices::device_changed`). No sink or
/// no event: no statement.
pub(super) async fn queue_changes(
    conn: &mut SqliteConnection,
    sinks: &[&str],
    events: &[ChangeEvent],
    connection_only: bool,
) -> StoreResult<()> {
    if sinks.is_empty() || events.is_empty() {
        return Ok(());
    }
    let payloads = events
        .iter()
        .map(|e| json_text(&e.payload, "change event"))
        .collect::<StoreResult<Vec<_>>>()?;
    let rows: Vec<(&str, &ChangeEvent, &str)> = events
        .iter()
        .zip(&payloads)
        .flat_map(|(e, p)| sinks.iter().map(move |s| (*s, e, p.as_str())))
        .collect();
    let at = now();
    for chunk in rows.chunks(CHANGES_PER_STATEMENT) {
        let mut qb = QueryBuilder::<Sqlite>::new(
            "INSERT INTO outbox (sink, payload, idempotency_key, attempts, next_attempt_at, \
             created_at, change_of, connection_only) ",
        );
        qb.push_values(chunk, |mut b, (sink, event, payload)| {
            b.push_bind(*sink)
                .push_bind(*payload)
                .push_bind(event.key.as_str())
                .push_bind(0_i64)
                .push_bind(at.as_str())
                .push_bind(at.as_str())
                .push_bind(event.change_of.as_str())
                .push_bind(connection_only);
        });
        qb.push(" ON CONFLICT (sink, idempotency_key) DO NOTHING");
        qb.build()
            .execute(&mut *conn)
            .await
            .map_err(db("queueing change events"))?;
    }
    Ok(())
}
