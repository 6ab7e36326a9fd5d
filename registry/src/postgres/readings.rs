//! Readings on PostgreSQL: the rows a batch keeps, their rollups, and the readings query.

use std::collections::{HashMap, HashSet};

use sqlx::{PgConnection, Postgres, QueryBuilder, Row};

use super::{db, text, PostgresStore};
use crate::readings::{
    bucket_of, ReadingBucket, ReadingKey, ReadingQuery, ReadingRow, RollupRow, Source,
};
use crate::store::StoreResult;

/// Rows per rollup statement (8 parameters each; PostgreSQL takes 65,535).
const CHUNK: usize = 1000;

/// The rows' columns as arrays for `unnest`: device, msg, measure (as PostgreSQL stores
/// text), at, value.
type Columns<'a> = (Vec<&'a str>, Vec<i64>, Vec<String>, Vec<i64>, Vec<f64>);

fn columns(rows: &[ReadingRow]) -> Columns<'_> {
    (
        rows.iter().map(|r| r.device_id.as_str()).collect(),
        rows.iter().map(|r| r.msg).collect(),
        rows.iter().map(|r| text(&r.measure).into_owned()).collect(),
        rows.iter().map(|r| r.at_ms).collect(),
        rows.iter().map(|r| r.value).collect(),
    )
}

/// The keys among the rows' that are stored already (as given: a measure PostgreSQL holds
/// with U+FFFD for NUL is mapped back).
pub(super) async fn stored_readings(
    conn: &mut PgConnection,
    rows: &[ReadingRow],
) -> StoreResult<HashSet<ReadingKey>> {
    let given: HashMap<(&str, String, i64, i64), &str> = rows
        .iter()
        .map(|r| {
            (
                (
                    r.device_id.as_str(),
                    text(&r.measure).into_owned(),
                    r.at_ms,
                    r.msg,
                ),
                r.measure.as_str(),
            )
        })
        .collect();
    let (devices, msgs, measures, at, _) = columns(rows);
    let found = sqlx::query(
        "SELECT r.device_id, r.measure, r.at_ms, r.msg FROM readings r \
         JOIN unnest($1::text[], $2::text[], $3::int8[], $4::int8[]) \
         AS k (device_id, measure, at_ms, msg) \
         ON r.device_id = k.device_id AND r.measure = k.measure AND r.at_ms = k.at_ms \
         AND r.msg = k.msg",
    )
    .bind(&devices)
    .bind(&measures)
    .bind(&at)
    .bind(&msgs)
    .fetch_all(&mut *conn)
    .await
    .map_err(db("reading the stored readings"))?;
    Ok(found
        .into_iter()
        .map(|row| {
            let (device, stored, at_ms, msg): (String, String, i64, i64) =
                (row.get(0), row.get(1), row.get(2), row.get(3));
            let measure = given
                .get(&(device.as_str(), stored.clone(), at_ms, msg))
                .map_or(stored, |m| (*m).to_owned());
            (device, measure, at_ms, msg)
        })
        .collect())
}

/// Inserts the rows whose keys are not stored; one statement, the columns as arrays; how
/// many went in.
pub(super) async fn insert_readings(
    conn: &mut PgConnection,
    rows: &[ReadingRow],
) -> StoreResult<u64> {
    let (devices, msgs, measures, at, values) = columns(rows);
    sqlx::query(
        "INSERT INTO readings (device_id, msg, measure, at_ms, value) \
         SELECT * FROM unnest($1::text[], $2::int8[], $3::text[], $4::int8[], $5::float8[]) \
         ON CONFLICT DO NOTHING",
    )
    .bind(&devices)
    .bind(&msgs)
    .bind(&measures)
    .bind(&at)
    .bind(&values)
    .execute(&mut *conn)
    .await
    .map_err(db("keeping readings"))
    .map(|r| r.rows_affected())
}

/// Inserts the rows if none is stored (true); else undoes what went in (false).
pub(super) async fn insert_if_all_new(
    conn: &mut PgConnection,
    rows: &[ReadingRow],
) -> StoreResult<bool> {
    let run = |sql: &'static str| sqlx::query(sql);
    run("SAVEPOINT iotgw_readings")
        .execute(&mut *conn)
        .await
        .map_err(db("opening a savepoint for readings"))?;
    let all = insert_readings(conn, rows).await? == rows.len() as u64;
    if !all {
        run("ROLLBACK TO SAVEPOINT iotgw_readings")
            .execute(&mut *conn)
            .await
            .map_err(db("undoing readings stored already"))?;
    }
    run("RELEASE SAVEPOINT iotgw_readings")
        .execute(&mut *conn)
        .await
        .map_err(db("releasing the readings savepoint"))?;
    Ok(all)
}

/// Adds each row to its stored rollup.
pub(super) async fn add_rollups(conn: &mut PgConnection, rows: &[RollupRow]) -> StoreResult<()> {
    for chunk in rows.chunks(CHUNK) {
        let mut qb = QueryBuilder::<Postgres>::new(
            "INSERT INTO reading_rollups \
             (device_id, measure, resolution_s, bucket_ms, min, max, sum, count) ",
        );
        qb.push_values(chunk, |mut b, r| {
            b.push_bind(&r.device_id)
                .push_bind(text(&r.measure).into_owned())
                .push_bind(r.resolution_s)
                .push_bind(r.bucket_ms)
                .push_bind(r.min)
                .push_bind(r.max)
                .push_bind(r.sum)
                .push_bind(r.count);
        });
        qb.push(
            " ON CONFLICT (device_id, measure, resolution_s, bucket_ms) DO UPDATE SET \
             min = LEAST(reading_rollups.min, excluded.min), \
             max = GREATEST(reading_rollups.max, excluded.max), \
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

impl PostgresStore {
    /// See [`crate::Store::query_readings`].
    pub(super) async fn readings(&self, q: &ReadingQuery) -> StoreResult<Vec<ReadingBucket>> {
        q.check()?;
        let (first, end, width) = (q.first_bucket_ms(), q.end_bucket_ms(), q.interval_ms());
        let mut qb = QueryBuilder::<Postgres>::new("SELECT measure, (");
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
                        " AS b, min(min), max(max), sum(sum), sum(count)::bigint FROM reading_rollups \
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
                list.push_bind(text(m).into_owned());
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
