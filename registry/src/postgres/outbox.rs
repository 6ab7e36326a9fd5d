//! The outbox and the dead letters on PostgreSQL. A claim takes due, unleased items with
//! `FOR UPDATE SKIP LOCKED`, so two replicas claiming at once never lease the same item, and
//! claims of one sink take turns so one record's items go out in order.

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, Postgres, QueryBuilder};

use super::rows::*;
use super::{
    bad_cursor, db, finish_page, get, lock_key, now, page_size, parse_time_cursor, text,
    time_cursor, ts, PostgresStore, MAX_PAGE,
};
use crate::model::*;
use crate::store::{StoreError, StoreResult};

pub(super) async fn write_dead_letter(
    conn: &mut PgConnection,
    letter: &NewDeadLetter,
) -> StoreResult<DeadLetter> {
    let row = sqlx::query(&format!(
        "INSERT INTO dead_letters (source, reason, device_id, message_id, payload, created_at) \
         VALUES ($1, $2, $3, $4, $5, $6) RETURNING {DEAD_LETTER_COLS}"
    ))
    .bind(text(&letter.source).as_ref())
    .bind(text(&letter.reason).as_ref())
    .bind(letter.stored_device_id().as_deref().map(text).as_deref())
    .bind(letter.stored_message_id().as_deref().map(text).as_deref())
    .bind(text(&letter.stored_payload()).as_ref())
    .bind(now())
    .fetch_one(&mut *conn)
    .await
    .map_err(db("writing a dead letter"))?;
    dead_letter_from_row(&row)
}

impl PostgresStore {
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
        // Claims of one sink take turns across replicas (a transaction-scoped advisory
        // lock): the hold on a record's later items reads the leases of its earlier ones,
        // which a concurrent claim has not committed yet and SKIP LOCKED would skip.
        let mut tx = self
            .pool
            .begin()
            .await
            .map_err(db("claiming outbox items"))?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(lock_key("outbox", sink))
            .execute(&mut *tx)
            .await
            .map_err(db("waiting for the outbox claim lock"))?;
        let rows = sqlx::query(&format!(
            "UPDATE outbox SET leased_until = $1, lease_token = lease_token + 1, \
             lease_holder = $5 WHERE id IN (\
                SELECT id FROM outbox o WHERE sink = $2 AND next_attempt_at <= $3 \
                AND (leased_until IS NULL OR leased_until <= $3) \
                AND (change_of IS NULL OR NOT EXISTS (SELECT 1 FROM outbox e \
                    WHERE e.sink = o.sink AND e.change_of = o.change_of AND e.id < o.id \
                    AND (e.next_attempt_at > $3 OR e.leased_until > $3))) \
                ORDER BY id LIMIT $4 FOR UPDATE SKIP LOCKED) \
             RETURNING {OUTBOX_COLS}"
        ))
        .bind(ts(lease_until))
        .bind(sink)
        .bind(ts(now))
        .bind(i64::from(limit.min(MAX_PAGE)))
        .bind(text(holder).as_ref())
        .fetch_all(&mut *tx)
        .await
        .map_err(db("claiming outbox items"))?;
        tx.commit().await.map_err(db("claiming outbox items"))?;
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
        let ids: Vec<i64> = leases.iter().map(|l| l.id).collect();
        let tokens: Vec<i64> = leases.iter().map(|l| l.token).collect();
        let rows = sqlx::query(
            "UPDATE outbox SET leased_until = $1 FROM unnest($2::bigint[], $3::bigint[]) \
             AS held(id, token) WHERE outbox.id = held.id AND outbox.lease_token = held.token \
             RETURNING outbox.id",
        )
        .bind(ts(lease_until))
        .bind(&ids)
        .bind(&tokens)
        .fetch_all(&self.pool)
        .await
        .map_err(db("renewing outbox leases"))?;
        let mut renewed = rows
            .iter()
            .map(|row| get::<i64>(row, "id"))
            .collect::<StoreResult<Vec<_>>>()?;
        renewed.sort_unstable();
        Ok(renewed)
    }

    /// See [`crate::Store::outbox_delivered`].
    pub(super) async fn delivered(&self, lease: OutboxLease) -> StoreResult<bool> {
        let done = sqlx::query("DELETE FROM outbox WHERE id = $1 AND lease_token = $2")
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
            "UPDATE outbox SET attempts = attempts + 1, next_attempt_at = $1, last_error = $2, \
             leased_until = NULL, lease_holder = NULL WHERE id = $3 AND lease_token = $4",
        )
        .bind(ts(next_attempt_at))
        .bind(text(error).as_ref())
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
            "SELECT sink, payload, idempotency_key FROM outbox \
             WHERE id = $1 AND lease_token = $2 FOR UPDATE",
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
        let payload: serde_json::Value = get(&row, "payload")?;
        let key: String = get(&row, "idempotency_key")?;
        let device_id = payload
            .get("msdyn_deviceid")
            .and_then(|d| d.as_str())
            .map(str::to_owned);
        let payload = serde_json::to_string(&payload)
            .map_err(|e| StoreError::Database(format!("outbox item {} payload: {e}", lease.id)))?;
        sqlx::query(
            "INSERT INTO dead_letters (source, reason, device_id, message_id, payload, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(format!("sink:{sink}"))
        .bind(text(reason).as_ref())
        .bind(&device_id)
        .bind(&key)
        .bind(&payload)
        .bind(now())
        .execute(&mut *tx)
        .await
        .map_err(db("writing a dead letter"))?;
        sqlx::query("DELETE FROM outbox WHERE id = $1")
            .bind(lease.id)
            .execute(&mut *tx)
            .await
            .map_err(db("removing a dead outbox item"))?;
        tx.commit().await.map_err(db("committing a dead letter"))?;
        Ok(true)
    }

    /// See [`crate::Store::outbox_depth`].
    pub(super) async fn depth(&self) -> StoreResult<Vec<(String, u64)>> {
        let rows = sqlx::query(
            "SELECT sink, COUNT(*) AS depth FROM outbox GROUP BY sink ORDER BY sink COLLATE \"C\"",
        )
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
        let mut qb = QueryBuilder::<Postgres>::new(format!(
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

impl PostgresStore {
    /// See [`crate::Store::get_dead_letter`].
    pub(super) async fn dead_letter(&self, id: i64) -> StoreResult<Option<DeadLetter>> {
        sqlx::query(&format!(
            "SELECT {DEAD_LETTER_COLS} FROM dead_letters WHERE id = $1"
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
        let done = sqlx::query("DELETE FROM dead_letters WHERE id = $1")
            .bind(id)
            .execute(&self.pool)
            .await
            .map_err(db("deleting a dead letter"))?;
        Ok(done.rows_affected() == 1)
    }

    /// See [`crate::Store::requeue_outbox`].
    pub(super) async fn queue_again(
        &self,
        sink: &str,
        key: &str,
        payload: &serde_json::Value,
    ) -> StoreResult<bool> {
        let done = sqlx::query(
            "INSERT INTO outbox (sink, payload, idempotency_key, attempts, next_attempt_at, created_at) \
             VALUES ($1, $2, $3, 0, $4, $4) ON CONFLICT (sink, idempotency_key) DO NOTHING",
        )
        .bind(text(sink).as_ref())
        .bind(payload)
        .bind(text(key).as_ref())
        .bind(now())
        .execute(&self.pool)
        .await
        .map_err(db("queueing an outbox item again"))?;
        Ok(done.rows_affected() == 1)
    }
}

/// Change-event rows per `INSERT` (6 bound values each).
const CHANGES_PER_STATEMENT: usize = 1000;

/// Queues each of `events` for each of `sinks` (change events of the change feed), in the
/// caller's transaction, in order: event by event, the sinks of one event together. An item
/// already queued for its sink and idempotency key is kept as is. `connection_only` marks
/// items a newer connection state may replace (see `devices::device_changed`). No sink or
/// no event: no statement.
pub(super) async fn queue_changes(
    conn: &mut PgConnection,
    sinks: &[&str],
    events: &[ChangeEvent],
    connection_only: bool,
) -> StoreResult<()> {
    if sinks.is_empty() || events.is_empty() {
        return Ok(());
    }
    let payloads: Vec<_> = events.iter().map(|e| super::jsonb(&e.payload)).collect();
    let rows: Vec<(&str, &ChangeEvent, &sqlx::types::Json<serde_json::Value>)> = events
        .iter()
        .zip(&payloads)
        .flat_map(|(e, p)| sinks.iter().map(move |s| (*s, e, p)))
        .collect();
    let at = now();
    for chunk in rows.chunks(CHANGES_PER_STATEMENT) {
        let mut qb = QueryBuilder::<Postgres>::new(
            "INSERT INTO outbox (sink, payload, idempotency_key, attempts, next_attempt_at, \
             created_at, change_of, connection_only) ",
        );
        qb.push_values(chunk, |mut b, (sink, event, payload)| {
            b.push_bind(text(sink).into_owned())
                .push_bind(*payload)
                .push_bind(text(&event.key).into_owned())
                .push_unseparated(", 0")
                .push_bind(at)
                .push_bind(at)
                .push_bind(text(&event.change_of).into_owned())
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
