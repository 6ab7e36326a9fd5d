//! Readings on SQLite: the rows a batch keeps, their rollups, and the readings query.

use std::collections::HashSet;

use sqlx::{QueryBuilder, Row, Sqlite, SqliteConnection};

use super::{db, SqliteStore};
use crate::readings::{
    bucket_of, ReadingBucket, ReadingKey, ReadingQuery, ReadingRow, RollupRow, Source,
};
use crate::store::StoreResult;

/// The rows as one JSON array, read in SQL with `json_each`: one parameter, so the same
/// prepared statement serves every batch whatever its size (a VALUES list of thousands of
/// parameters was parsed again for every batch).
fn as_json(rows: &[ReadingRow]) -> String {
    serde_json::Value::Array(
        rows.iter()
            .map(|r| serde_json::json!([r.device_id, r.msg, r.measure, r.at_ms, r.value]))
            .collect(),
    )
    .to_string()
}

/// The keys among the rows' that are stored already.
pub(super) async fn stored_readings(
    conn: &mut SqliteConnection,
    rows: &[ReadingRow],
) -> StoreResult<HashSet<ReadingKey>> {
    let found = sqlx::query(
        // The rows drive the join (CROSS JOIN keeps that order), one primary-key lookup
        // each, at the end of the device's measure range where the insert writes next.
        "SELECT r.device_id, r.measure, r.at_ms, r.msg FROM json_each(?) AS j \
         CROSS JOIN readings AS r ON r.device_id = j.value ->> 0 \
         AND r.measure = j.value ->> 2 AND r.at_ms = j.value ->> 3 AND r.msg = j.value ->> 1",
    )
    .bind(as_json(rows))
    .fetch_all(&mut *conn)
    .await
    .map_err(db("reading the stored readings"))?;
    Ok(found
        .into_iter()
        .map(|row| (row.get(0), row.get(1), row.get(2), row.get(3)))
        .collect())
}

/// Rows per insert statement: every full chunk is the same statement text, prepared once
/// and taken from the connection's statement cache after that.
const INSERT_CHUNK: usize = 128;

/// Inserts the rows whose keys are not stored; how many went in.
pub(super) async fn insert_readings(
    conn: &mut SqliteConnection,
    rows: &[ReadingRow],
) -> StoreResult<u64> {
    let mut inserted = 0;
    for chunk in rows.chunks(INSERT_CHUNK) {
        let mut qb = sqlx::QueryBuilder::<sqlx::Sqlite>::new(
            "INSERT INTO readings (device_id, msg, measure, at_ms, value) ",
        );
        qb.push_values(chunk, |mut b, r| {
            b.push_bind(&r.device_id)
                .push_bind(r.msg)
                .push_bind(&r.measure)
                .push_bind(r.at_ms)
                .push_bind(r.value);
        });
        qb.push(" ON CONFLICT DO NOTHING");
        inserted += qb
            .build()
            .persistent(true)
            .execute(&mut *conn)
            .await
            .map_err(db("keeping readings"))?
            .rows_affected();
    }
    Ok(inserted)
}

/// Inserts the rows if none is stored (true); else undoes what went in (false).
pub(super) async fn insert_if_all_new(
    conn: &mut SqliteConnection,
    rows: &[ReadingRow],
) -> StoreResult<bool> {
    let run = |sql: &'static str| sqlx::query(sql);
    run("SAVEPOINT iotgw_readings")
        .execute(&mut *conn)
        .await
        .map_err(db("opening a savepoint for readings"))?;
    let all = insert_readings(conn, rows).await? == rows.len() as u64;
    if !all {
        run("ROLLBACK TO iotgw_readings")
            .execute(&mut *conn)
            .await
            .map_err(db("undoing readings stored already"))?;
    }
    run("RELEASE iotgw_readings")
        .execute(&mut *conn)
        .await
        .map_err(db("releasing the readings savepoint"))?;
    Ok(all)
}

/// Adds each row to its stored rollup; one statement, the rows as one JSON array.
pub(super) async fn add_rollups(
    conn: &mut SqliteConnection,
    rows: &[RollupRow],
) -> StoreResult<()> {
    let data = serde_json::Value::Array(
        rows.iter()
            .map(|r| {
                serde_json::json!([
                    r.device_id,
                    r.measure,
                    r.resolution_s,
                    r.bucket_ms,
                    r.min,
                    r.max,
                    r.sum,
                    r.count
                ])
            })
            .collect(),
    )
    .to_string();
    sqlx::query(
        "INSERT INTO reading_rollups \
         (device_id, measure, resolution_s, bucket_ms, min, max, sum, count) \
         SELECT j.value ->> 0, j.value ->> 1, j.value ->> 2, j.value ->> 3, \
                j.value ->> 4, j.value ->> 5, j.value ->> 6, j.value ->> 7 \
         FROM json_each(?) AS j WHERE true \
         ON CONFLICT (device_id, measure, resolution_s, bucket_ms) DO UPDATE SET \
         min = min(reading_rollups.min, excluded.min), \
         max = max(reading_rollups.max, excluded.max), \
         sum = reading_rollups.sum + excluded.sum, \
         count = reading_rollups.count + excluded.count",
    )
    .bind(data)
    .execute(&mut *conn)
    .await
    .map_err(db("adding to reading rollups"))?;
    Ok(())
}

impl SqliteStore {
    /// See [`crate::Store::query_readings`].
    pub(super) async fn readings(&self, q: &ReadingQuery) -> StoreResult<Vec<ReadingBucket>> {
        q.check()?;
        let (first, end, width) = (q.first_bucket_ms(), q.end_bucket_ms(), q.interval_ms());
        let mut qb = QueryBuilder::<Sqlite>::new("SELECT measure, (");
        match q.source() {
            Source::Raw => {
                qb.push("at_ms / ")
                    .push_bind(width)
                    .push(") * ")
                    .push_bind(width)
                    .push(
                        " AS b, min(value), max(value), sum(value), count(*) FROM readings \
                         WHERE device_id = ",
                    )
                    .push_bind(q.device_id.as_str().to_owned())
                    .push(" AND at_ms >= ")
                    .push_bind(first)
                    .push(" AND at_ms < ")
                    .push_bind(end);
            }
            Source::Rollup(resolution_s) => {
                qb.push("bucket_ms / ")
                    .push_bind(width)
                    .push(") * ")
                    .push_bind(width)
                    .push(
                        " AS b, min(min), max(max), sum(sum), sum(count) FROM reading_rollups \
                         WHERE device_id = ",
                    )
                    .push_bind(q.device_id.as_str().to_owned())
                    .push(" AND resolution_s = ")
                    .push_bind(resolution_s)
                    .push(" AND bucket_ms >= ")
                    .push_bind(first)
                    .push(" AND bucket_ms < ")
                    .push_bind(end);
            }
        }
        if !q.measures.is_empty() {
            qb.push(" AND measure IN (");
            let mut list = qb.separated(", ");
            for m in &q.measures {
                list.push_bind(m.clone());
            }
            qb.push(")");
        }
        qb.push(" GROUP BY measure, b ORDER BY measure, b");
        let rows = qb
            .build()
            .fetch_all(&self.pool)
            .await
            .map_err(db("querying readings"))?;
        Ok(rows
            .into_iter()
            .map(|r| bucket_of(r.get(0), r.get(1), r.get(2), r.get(3), r.get(4), r.get(5)))
            .collect())
    }
}
