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
    .bind(&letter.device_id)
    .bind(&letter.message_id)
    .bind(&letter.payload)
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
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
        limit: u32,
    ) -> StoreResult<Vec<OutboxItem>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let now = ts(now);
        // One statement, so two replicas can never lease the same item.
        let rows = sqlx::query(&format!(
            "UPDATE outbox SET leased_until = ? WHERE id IN (\
                SELECT id FROM outbox WHERE sink = ? AND next_attempt_at <= ? \
                AND (leased_until IS NULL OR leased_until <= ?) ORDER BY id LIMIT ?) \
             RETURNING {OUTBOX_COLS}"
        ))
        .bind(ts(lease_until))
        .bind(sink)
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

    /// See [`crate::Store::outbox_delivered`].
    pub(super) async fn delivered(&self, id: i64) -> StoreResult<()> {
        // Deleting an item that is already gone (another replica delivered it after our
        // lease ran out) is fine: delivered is delivered.
        sqlx::query("DELETE FROM outbox WHERE id = ?")
            .bind(id)
            .execute(&self.pool)
            .await
            .map_err(db("removing a delivered outbox item"))?;
        Ok(())
    }

    /// See [`crate::Store::outbox_retry`].
    pub(super) async fn retry(
        &self,
        id: i64,
        next_attempt_at: DateTime<Utc>,
        error: &str,
    ) -> StoreResult<()> {
        let done = sqlx::query(
            "UPDATE outbox SET attempts = attempts + 1, next_attempt_at = ?, last_error = ?, \
             leased_until = NULL WHERE id = ?",
        )
        .bind(ts(next_attempt_at))
        .bind(error)
        .bind(id)
        .execute(&self.pool)
        .await
        .map_err(db("recording an outbox retry"))?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound {
                entity: "outbox item",
                key: id.to_string(),
            });
        }
        Ok(())
    }

    /// See [`crate::Store::outbox_dead_letter`].
    pub(super) async fn dead_letter_item(&self, id: i64, reason: &str) -> StoreResult<()> {
        let mut tx = self.write().await?;
        let row = sqlx::query("SELECT sink, payload, idempotency_key FROM outbox WHERE id = ?")
            .bind(id)
            .fetch_optional(&mut *tx)
            .await
            .map_err(db("reading an outbox item"))?
            .ok_or_else(|| StoreError::NotFound {
                entity: "outbox item",
                key: id.to_string(),
            })?;
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
            .bind(id)
            .execute(&mut *tx)
            .await
            .map_err(db("removing a dead outbox item"))?;
        tx.commit().await.map_err(db("committing a dead letter"))?;
        Ok(())
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
