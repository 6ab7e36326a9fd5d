//! Readings on SQLite: the rows a batch keeps, their rollups, and the readings query.

use std::collections::{HashMap, HashSet};

use sqlx::{QueryBuilder, Row, Sqlite, SqliteConnection};

use super::{db, SqliteStore};
use crate::readings::{
    bucket_of, ReadingBucket, ReadingKey, ReadingQuery, ReadingRow, RollupRow, Source,
};
use crate::store::StoreResult;

/// The series ids of (device, measure) pairs this process has seen committed. A reading
/// row is keyed by its series id, an integer, instead of two text columns: the id of a
/// pair is looked up here, and only a pair not seen yet costs a statement. Entries are
/// added once the transaction that wrote them has committed (an id from a transaction
/// rolled back could be given to another pair), and the map is emptied when it grows past
/// [`SERIES_CACHE_MAX`], so it stays bounded whatever devices send.
#[derive(Debug, Default)]
pub(super) struct SeriesCache(std::sync::Mutex<SeriesMap>);

/// Entries the series cache holds before it starts again from empty (about 100 bytes each).
const SERIES_CACHE_MAX: usize = 200_000;

/// Series ids by device, then measure (looked up by `&str`, without allocating).
#[derive(Debug, Default)]
pub(super) struct SeriesMap {
    by_device: HashMap<String, HashMap<String, i64>>,
    len: usize,
}

impl SeriesMap {
    fn get(&self, device: &str, measure: &str) -> Option<i64> {
        self.by_device.get(device)?.get(measure).copied()
    }

    fn insert(&mut self, device: String, measure: String, id: i64) {
        if self
            .by_device
            .entry(device)
            .or_default()
            .insert(measure, id)
            .is_none()
        {
            self.len += 1;
        }
    }
}

impl SeriesCache {
    /// Adds the series a committed transaction wrote.
    pub(super) fn remember(&self, tx: TxSeries) {
        if tx.new.len == 0 {
            return;
        }
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if map.len + tx.new.len > SERIES_CACHE_MAX {
            *map = SeriesMap::default();
        }
        for (device, measures) in tx.new.by_device {
            for (measure, id) in measures {
                map.insert(device.clone(), measure, id);
            }
        }
    }
}

/// The series a transaction looked up or created, which the cache learns once the
/// transaction commits.
#[derive(Debug, Default)]
pub(super) struct TxSeries {
    new: SeriesMap,
}

impl TxSeries {
    /// The pairs' ids, from this transaction or the cache.
    fn ids<'r>(
        &self,
        cache: &SeriesCache,
        pairs: impl Iterator<Item = (&'r str, &'r str)>,
    ) -> Vec<Option<i64>> {
        let map = cache.0.lock().unwrap_or_else(|p| p.into_inner());
        pairs
            .map(|(d, m)| self.new.get(d, m).or_else(|| map.get(d, m)))
            .collect()
    }
}

/// The series id of every row, in the rows' order; pairs neither cached nor seen in this
/// transaction are created (if new) and read in two statements.
async fn series_of(
    conn: &mut SqliteConnection,
    cache: &SeriesCache,
    tx: &mut TxSeries,
    rows: &[ReadingRow],
) -> StoreResult<Vec<i64>> {
    let pairs = || {
        rows.iter()
            .map(|r| (r.device_id.as_str(), r.measure.as_str()))
    };
    let mut ids = tx.ids(cache, pairs());
    let mut seen = HashSet::new();
    let missing: Vec<(&str, &str)> = pairs()
        .zip(&ids)
        .filter(|(p, id)| id.is_none() && seen.insert(*p))
        .map(|(p, _)| p)
        .collect();
    if !missing.is_empty() {
        let pairs_json = serde_json::Value::Array(
            missing
                .iter()
                .map(|(d, m)| serde_json::json!([d, m]))
                .collect(),
        )
        .to_string();
        sqlx::query(
            "INSERT INTO reading_series (device_id, measure) \
             SELECT j.value ->> 0, j.value ->> 1 FROM json_each(?) AS j WHERE true \
             ON CONFLICT DO NOTHING",
        )
        .bind(&pairs_json)
        .execute(&mut *conn)
        .await
        .map_err(db("adding reading series"))?;
        let found = sqlx::query(
            "SELECT s.id, s.device_id, s.measure FROM json_each(?) AS j \
             CROSS JOIN reading_series AS s \
             ON s.device_id = j.value ->> 0 AND s.measure = j.value ->> 1",
        )
        .bind(&pairs_json)
        .fetch_all(&mut *conn)
        .await
        .map_err(db("reading reading series"))?;
        for row in found {
            tx.new.insert(row.get(1), row.get(2), row.get(0));
        }
        ids = tx.ids(cache, pairs());
    }
    ids.into_iter()
        .zip(rows)
        .map(|(id, r)| {
            id.ok_or_else(|| {
                crate::store::StoreError::Database(format!(
                    "reading series ({}, {}) was neither found nor created",
                    r.device_id, r.measure
                ))
            })
        })
        .collect()
}

/// The keys among the rows' that are stored already.
pub(super) async fn stored_readings(
    conn: &mut SqliteConnection,
    cache: &SeriesCache,
    tx: &mut TxSeries,
    rows: &[ReadingRow],
) -> StoreResult<HashSet<ReadingKey>> {
    let series = series_of(conn, cache, tx, rows).await?;
    let keys = serde_json::Value::Array(
        rows.iter()
            .zip(&series)
            .map(|(r, s)| serde_json::json!([s, r.at_ms, r.msg]))
            .collect(),
    )
    .to_string();
    let found = sqlx::query(
        // The rows drive the join (CROSS JOIN keeps that order), one primary-key lookup
        // each, at the end of the series where the insert writes next.
        "SELECT s.device_id, s.measure, r.at_ms, r.msg FROM json_each(?) AS j \
         CROSS JOIN readings AS r ON r.series = j.value ->> 0 \
         AND r.at_ms = j.value ->> 1 AND r.msg = j.value ->> 2 \
         JOIN reading_series AS s ON s.id = r.series",
    )
    .bind(keys)
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
const INSERT_CHUNK: usize = 1024;

/// Inserts the rows whose keys are not stored; how many went in.
pub(super) async fn insert_readings(
    conn: &mut SqliteConnection,
    cache: &SeriesCache,
    tx: &mut TxSeries,
    rows: &[ReadingRow],
) -> StoreResult<u64> {
    let series = series_of(conn, cache, tx, rows).await?;
    insert_keyed(conn, &series, rows).await
}

/// Inserts the rows under their series ids (`series[i]` is `rows[i]`'s), a row whose key is
/// stored already left out; how many went in.
async fn insert_keyed(
    conn: &mut SqliteConnection,
    series: &[i64],
    rows: &[ReadingRow],
) -> StoreResult<u64> {
    let keyed: Vec<(i64, &ReadingRow)> = series.iter().copied().zip(rows).collect();
    let mut inserted = 0;
    for chunk in keyed.chunks(INSERT_CHUNK) {
        let mut qb = sqlx::QueryBuilder::<sqlx::Sqlite>::new(
            "INSERT INTO readings (series, at_ms, msg, value) ",
        );
        qb.push_values(chunk, |mut b, (s, r)| {
            b.push_bind(*s)
                .push_bind(r.at_ms)
                .push_bind(r.msg)
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
    cache: &SeriesCache,
    tx: &mut TxSeries,
    rows: &[ReadingRow],
) -> StoreResult<bool> {
    // Series first, outside the savepoint: a series created here stays whichever way the
    // insert goes.
    let series = series_of(conn, cache, tx, rows).await?;
    let run = |sql: &'static str| sqlx::query(sql);
    run("SAVEPOINT iotgw_readings")
        .execute(&mut *conn)
        .await
        .map_err(db("opening a savepoint for readings"))?;
    let all = insert_keyed(conn, &series, rows).await? == rows.len() as u64;
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
    cache: &SeriesCache,
    tx: &mut TxSeries,
    rows: &[RollupRow],
) -> StoreResult<()> {
    let ids = tx.ids(
        cache,
        rows.iter()
            .map(|r| (r.device_id.as_str(), r.measure.as_str())),
    );
    let ids = ids
        .into_iter()
        .zip(rows)
        .map(|(id, r)| {
            id.ok_or_else(|| {
                crate::store::StoreError::Database(format!(
                    "rollup of reading series ({}, {}) before its readings",
                    r.device_id, r.measure
                ))
            })
        })
        .collect::<StoreResult<Vec<i64>>>()?;
    let data = serde_json::Value::Array(
        rows.iter()
            .zip(ids)
            .map(|(r, s)| {
                serde_json::json!([s, r.resolution_s, r.bucket_ms, r.min, r.max, r.sum, r.count])
            })
            .collect(),
    )
    .to_string();
    sqlx::query(
        "INSERT INTO reading_rollups \
         (series, resolution_s, bucket_ms, min, max, sum, count) \
         SELECT j.value ->> 0, j.value ->> 1, j.value ->> 2, \
                j.value ->> 3, j.value ->> 4, j.value ->> 5, j.value ->> 6 \
         FROM json_each(?) AS j WHERE true \
         ON CONFLICT (series, resolution_s, bucket_ms) DO UPDATE SET \
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
        let mut qb = QueryBuilder::<Sqlite>::new("SELECT s.measure, (");
        match q.source() {
            Source::Raw => {
                qb.push("at_ms / ")
                    .push_bind(width)
                    .push(") * ")
                    .push_bind(width)
                    .push(
                        " AS b, min(value), max(value), sum(value), count(*) FROM reading_series AS s \
                         CROSS JOIN readings ON series = s.id WHERE s.device_id = ",
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
                        " AS b, min(min), max(max), sum(sum), sum(count) FROM reading_series AS s \
                         CROSS JOIN reading_rollups ON series = s.id WHERE s.device_id = ",
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
            qb.push(" AND s.measure IN (");
            let mut list = qb.separated(", ");
            for m in &q.measures {
                list.push_bind(m.clone());
            }
            qb.push(")");
        }
        qb.push(" GROUP BY s.measure, b ORDER BY s.measure, b");
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

#[cfg(test)]
mod tests {
    use sqlx::{Executor, Row};

    /// Migration 0012 keeps every reading and rollup stored under the earlier layout, now
    /// under one series per (device, measure).
    #[tokio::test]
    async fn migrating_to_series_ids_keeps_every_reading_and_rollup() {
        let pool = sqlx::sqlite::SqlitePoolOptions::new()
            .max_connections(1)
            .connect("sqlite::memory:")
            .await
            .expect("in-memory SQLite");
        for (version, _, sql) in super::super::MIGRATIONS.iter().filter(|m| m.0 < 12) {
            pool.execute(*sql)
                .await
                .unwrap_or_else(|e| panic!("migration {version}: {e}"));
        }
        pool.execute(
            "INSERT INTO readings (device_id, measure, at_ms, msg, value) VALUES \
             ('d1', '/t', 1000, 1, 20.5), ('d1', '/t', 2000, 2, 21.5), \
             ('d1', '/h', 1000, 1, 40.0), ('d2', '/t', 1000, 3, 19.0); \
             INSERT INTO reading_rollups \
             (device_id, measure, resolution_s, bucket_ms, min, max, sum, count) VALUES \
             ('d1', '/t', 60, 0, 20.5, 21.5, 42.0, 2), ('d3', '/x', 3600, 0, 1, 1, 1, 1)",
        )
        .await
        .expect("readings in the earlier layout");
        let (_, _, sql) = super::super::MIGRATIONS
            .iter()
            .find(|m| m.0 == 12)
            .expect("migration 12");
        pool.execute(*sql).await.expect("migration 12 runs");

        let rows: Vec<(String, String, i64, i64, f64)> = sqlx::query(
            "SELECT s.device_id, s.measure, r.at_ms, r.msg, r.value FROM readings AS r \
             JOIN reading_series AS s ON s.id = r.series ORDER BY 1, 2, 3",
        )
        .fetch_all(&pool)
        .await
        .expect("migrated readings")
        .into_iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4)))
        .collect();
        let expected: Vec<(String, String, i64, i64, f64)> = vec![
            ("d1".into(), "/h".into(), 1000, 1, 40.0),
            ("d1".into(), "/t".into(), 1000, 1, 20.5),
            ("d1".into(), "/t".into(), 2000, 2, 21.5),
            ("d2".into(), "/t".into(), 1000, 3, 19.0),
        ];
        assert_eq!(rows, expected);
        let rollups: Vec<(String, String, i64, f64, i64)> = sqlx::query(
            "SELECT s.device_id, s.measure, u.resolution_s, u.sum, u.count \
             FROM reading_rollups AS u JOIN reading_series AS s ON s.id = u.series ORDER BY 1",
        )
        .fetch_all(&pool)
        .await
        .expect("migrated rollups")
        .into_iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4)))
        .collect();
        assert_eq!(
            rollups,
            vec![
                ("d1".into(), "/t".into(), 60, 42.0, 2),
                ("d3".into(), "/x".into(), 3600, 1.0, 1)
            ]
        );
        let series: i64 = sqlx::query("SELECT count(*) FROM reading_series")
            .fetch_one(&pool)
            .await
            .expect("series")
            .get(0);
        assert_eq!(
            series, 4,
            "one series per (device, measure): d1 /t, d1 /h, d2 /t, d3 /x"
        );
    }
}
