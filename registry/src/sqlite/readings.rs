//! Readings on SQLite: the rows a batch keeps, their rollups, and the readings query.

use std::collections::HashSet;

use sqlx::{QueryBuilder, Row, Sqlite, SqliteConnection};

use super::{db, SqliteStore};
use crate::readings::{bucket_of, ReadingBucket, ReadingQuery, ReadingRow, RollupRow, Source};
use crate::store::StoreResult;

/// Rows per statement (5 parameters each; SQLite takes 32,766).
const CHUNK: usize = 1000;

/// Inserts the rows whose key is not stored; returns the keys inserted.
pub(super) async fn insert_readings(
    conn: &mut SqliteConnection,
    rows: &[ReadingRow],
) -> StoreResult<HashSet<(String, i64, String)>> {
    let mut inserted = HashSet::with_capacity(rows.len());
    for chunk in rows.chunks(CHUNK) {
        let mut qb = QueryBuilder::<Sqlite>::new(
            "INSERT INTO readings (device_id, msg, measure, at_ms, value) ",
        );
        qb.push_values(chunk, |mut b, r| {
            b.push_bind(&r.device_id)
                .push_bind(r.msg)
                .push_bind(&r.measure)
                .push_bind(r.at_ms)
                .push_bind(r.value);
        });
        qb.push(" ON CONFLICT DO NOTHING RETURNING device_id, msg, measure");
        let returned = qb
            .build()
            .fetch_all(&mut *conn)
            .await
            .map_err(db("keeping readings"))?;
        for row in returned {
            inserted.insert((row.get(0), row.get(1), row.get(2)));
        }
    }
    Ok(inserted)
}

/// Adds each row to its stored rollup.
pub(super) async fn add_rollups(
    conn: &mut SqliteConnection,
    rows: &[RollupRow],
) -> StoreResult<()> {
    for chunk in rows.chunks(CHUNK) {
        let mut qb = QueryBuilder::<Sqlite>::new(
            "INSERT INTO reading_rollups \
             (device_id, measure, resolution_s, bucket_ms, min, max, sum, count) ",
        );
        qb.push_values(chunk, |mut b, r| {
            b.push_bind(&r.device_id)
                .push_bind(&r.measure)
                .push_bind(r.resolution_s)
                .push_bind(r.bucket_ms)
                .push_bind(r.min)
                .push_bind(r.max)
                .push_bind(r.sum)
                .push_bind(r.count);
        });
        qb.push(
            " ON CONFLICT (device_id, measure, resolution_s, bucket_ms) DO UPDATE SET \
             min = min(reading_rollups.min, excluded.min), \
             max = max(reading_rollups.max, excluded.max), \
             sum = reading_rollups.sum + excluded.sum, \
             count = reading_rollups.count + excluded.count",
        );
        qb.build()
            .execute(&mut *conn)
            .await
            .map_err(db("adding to reading rollups"))?;
    }
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
