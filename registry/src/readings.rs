//! Readings: what a telemetry commit keeps of its message's measures, and the per-minute and
//! per-hour rollups a long range is read from. Backend-neutral: the rows to write, the
//! rollups the new rows add up to, and which table a query reads.
//!
//! A reading's key is its device, a 64-bit hash of its message id and the measure, so a
//! message delivered again (a redelivery after a crash, the same message twice in one
//! batch) writes nothing a second time, and the rollups are built from the rows that were
//! new only: they never count a message twice.

use std::collections::BTreeMap;

use chrono::{DateTime, TimeZone, Utc};
use serde::Serialize;
use sha2::Digest;

use crate::error::{StoreError, StoreResult};
use crate::DeviceId;

/// The rollup resolutions kept, in seconds: one minute and one hour.
pub const ROLLUP_RESOLUTIONS: [i64; 2] = [60, 3600];
/// Longest measure name (a JSON pointer), in bytes.
pub const MAX_MEASURE_BYTES: usize = 256;
/// Most buckets one query may return.
pub const MAX_QUERY_BUCKETS: i64 = 100_000;
/// The widest bucket, seconds (100 years of 365 days).
pub const MAX_INTERVAL_S: i64 = 100 * 365 * 86_400;

/// The measures of one message, kept with its commit.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Readings {
    /// When they were measured: the message's own time, else its reception.
    pub at: DateTime<Utc>,
    /// The message's id (the same when it is delivered again).
    pub message_id: String,
    /// Each measure's JSON pointer (`/engine/temp`) and value; booleans are 0 and 1.
    pub measures: Vec<(String, f64)>,
}

impl Readings {
    /// What a backend cannot hold: a measure name over [`MAX_MEASURE_BYTES`], a value that
    /// is not a finite number.
    pub fn check(&self) -> StoreResult<()> {
        for (measure, value) in &self.measures {
            if measure.len() > MAX_MEASURE_BYTES {
                return Err(StoreError::Invalid {
                    field: "measure",
                    message: format!(
                        "`{}...` is longer than {MAX_MEASURE_BYTES} bytes",
                        measure.chars().take(40).collect::<String>()
                    ),
                });
            }
            if !value.is_finite() {
                return Err(StoreError::Invalid {
                    field: "measure",
                    message: format!("`{measure}` is not a finite number"),
                });
            }
        }
        Ok(())
    }
}

/// The stored key of a message id: the first 8 bytes of its SHA-256.
pub fn message_key(message_id: &str) -> i64 {
    let digest = sha2::Sha256::digest(message_id.as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    i64::from_be_bytes(first)
}

/// A reading's stored key: device, measure, time (ms), message key. Time-ordered, so a
/// batch appends at the end of each device's measure range; a message delivered again
/// with the same time (a device timestamp, a cloud's enqueue time) has the same key.
pub(crate) type ReadingKey = (String, String, i64, i64);

/// One reading row.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct ReadingRow {
    pub device_id: String,
    pub msg: i64,
    pub measure: String,
    pub at_ms: i64,
    pub value: f64,
}

impl ReadingRow {
    /// The row's key as stored: device, measure, time, message.
    pub fn key(&self) -> ReadingKey {
        (
            self.device_id.clone(),
            self.measure.clone(),
            self.at_ms,
            self.msg,
        )
    }
}

/// One rollup row to add to what is stored (min of mins, max of maxes, sums added).
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct RollupRow {
    pub device_id: String,
    pub measure: String,
    pub resolution_s: i64,
    pub bucket_ms: i64,
    pub min: f64,
    pub max: f64,
    pub sum: f64,
    pub count: i64,
}

/// The rows of these messages' readings, each key once (the first wins).
pub(crate) fn rows<'a>(
    readings: impl IntoIterator<Item = (&'a DeviceId, &'a Readings)>,
) -> Vec<ReadingRow> {
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::new();
    for (device, r) in readings {
        let msg = message_key(&r.message_id);
        for (measure, value) in &r.measures {
            if seen.insert((device.as_str(), msg, measure.as_str())) {
                out.push(ReadingRow {
                    device_id: device.as_str().to_owned(),
                    msg,
                    measure: measure.clone(),
                    at_ms: r.at.timestamp_millis(),
                    value: *value,
                });
            }
        }
    }
    out
}

/// `ms` rounded up to a multiple of `width`.
fn align_up(ms: i64, width: i64) -> i64 {
    let down = ms.div_euclid(width) * width;
    if down == ms {
        ms
    } else {
        down + width
    }
}

/// The start of the `resolution_s` bucket holding `at_ms`.
fn bucket(at_ms: i64, resolution_s: i64) -> i64 {
    let width = resolution_s * 1000;
    at_ms.div_euclid(width) * width
}

/// What the new rows add to each rollup, one row per (device, measure, resolution,
/// bucket).
pub(crate) fn rollups(new_rows: &[ReadingRow]) -> Vec<RollupRow> {
    let mut out: BTreeMap<(&str, &str, i64, i64), RollupRow> = BTreeMap::new();
    for r in new_rows {
        for resolution_s in ROLLUP_RESOLUTIONS {
            let b = bucket(r.at_ms, resolution_s);
            out.entry((&r.device_id, &r.measure, resolution_s, b))
                .and_modify(|u| {
                    u.min = u.min.min(r.value);
                    u.max = u.max.max(r.value);
                    u.sum += r.value;
                    u.count += 1;
                })
                .or_insert_with(|| RollupRow {
                    device_id: r.device_id.clone(),
                    measure: r.measure.clone(),
                    resolution_s,
                    bucket_ms: b,
                    min: r.value,
                    max: r.value,
                    sum: r.value,
                    count: 1,
                });
        }
    }
    out.into_values().collect()
}

/// A readings query: one device's measures in buckets of `interval_s` seconds aligned on
/// the Unix epoch, every bucket whose start lies in `from` (included) to `to` (excluded).
#[derive(Clone, Debug, PartialEq)]
pub struct ReadingQuery {
    /// The device.
    pub device_id: DeviceId,
    /// First instant.
    pub from: DateTime<Utc>,
    /// End, excluded.
    pub to: DateTime<Utc>,
    /// Bucket width, seconds.
    pub interval_s: i64,
    /// Only these measures (all when empty).
    pub measures: Vec<String>,
}

/// Where a query reads from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Source {
    /// The readings themselves (an interval that is not whole minutes).
    Raw,
    /// The rollups of this resolution, seconds.
    Rollup(i64),
}

impl ReadingQuery {
    /// Refuses what cannot be answered: an empty or reversed range, a non-positive
    /// interval, more than [`MAX_QUERY_BUCKETS`] buckets.
    pub fn check(&self) -> StoreResult<()> {
        if !(1..=MAX_INTERVAL_S).contains(&self.interval_s) {
            return Err(StoreError::Invalid {
                field: "interval",
                message: format!(
                    "{} s: it must be at least one second and at most {MAX_INTERVAL_S} (100 years)",
                    self.interval_s
                ),
            });
        }
        if self.to <= self.from {
            return Err(StoreError::Invalid {
                field: "to",
                message: format!(
                    "the range ends ({}) before it starts ({})",
                    self.to, self.from
                ),
            });
        }
        let buckets = (self.to - self.from).num_seconds() / self.interval_s;
        if buckets > MAX_QUERY_BUCKETS {
            return Err(StoreError::Invalid {
                field: "interval",
                message: format!(
                    "{buckets} buckets of {} s: at most {MAX_QUERY_BUCKETS}; ask for a longer interval or a shorter range",
                    self.interval_s
                ),
            });
        }
        Ok(())
    }

    /// The coarsest rollup whose buckets tile the interval, else the readings.
    pub(crate) fn source(&self) -> Source {
        ROLLUP_RESOLUTIONS
            .iter()
            .rev()
            .find(|&&r| self.interval_s % r == 0)
            .map_or(Source::Raw, |&r| Source::Rollup(r))
    }

    /// The bucket width, milliseconds.
    pub(crate) fn interval_ms(&self) -> i64 {
        self.interval_s * 1000
    }

    /// The first bucket's start: `from` rounded up to the interval (a bucket is answered
    /// when its start lies in the range).
    pub(crate) fn first_bucket_ms(&self) -> i64 {
        align_up(self.from.timestamp_millis(), self.interval_ms())
    }

    /// The end of the last bucket answered: `to` rounded up to the interval.
    pub(crate) fn end_bucket_ms(&self) -> i64 {
        align_up(self.to.timestamp_millis(), self.interval_ms())
    }
}

/// One bucket of one measure.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ReadingBucket {
    /// The measure (JSON pointer).
    pub measure: String,
    /// The bucket's start.
    pub start: DateTime<Utc>,
    /// Smallest value.
    pub min: f64,
    /// Largest value.
    pub max: f64,
    /// Sum of the values.
    pub sum: f64,
    /// How many readings.
    pub count: i64,
}

impl ReadingBucket {
    /// The mean value.
    pub fn avg(&self) -> f64 {
        if self.count == 0 {
            0.0
        } else {
            self.sum / self.count as f64
        }
    }
}

/// A bucket from its stored columns.
pub(crate) fn bucket_of(
    measure: String,
    start_ms: i64,
    min: f64,
    max: f64,
    sum: f64,
    count: i64,
) -> ReadingBucket {
    ReadingBucket {
        measure,
        start: Utc
            .timestamp_millis_opt(start_ms)
            .single()
            .unwrap_or_default(),
        min,
        max,
        sum,
        count,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> DeviceId {
        DeviceId::parse(s).expect("id")
    }

    fn at(secs: i64) -> DateTime<Utc> {
        Utc.timestamp_opt(1_700_000_000 + secs, 0)
            .single()
            .expect("time")
    }

    #[test]
    fn the_same_message_twice_gives_its_rows_once() {
        let r = Readings {
            at: at(0),
            message_id: "m-1".into(),
            measures: vec![("/t".into(), 1.0), ("/h".into(), 2.0)],
        };
        let d = id("d-1");
        let rows = rows([(&d, &r), (&d, &r)]);
        assert_eq!(rows.len(), 2);
    }

    #[test]
    fn rollups_add_up_per_minute_and_hour() {
        let d = id("d-1");
        let rs: Vec<Readings> = (0..3)
            .map(|i| Readings {
                at: at(i * 40),
                message_id: format!("m-{i}"),
                measures: vec![("/t".into(), i as f64)],
            })
            .collect();
        let rows = rows(rs.iter().map(|r| (&d, r)));
        let ups = rollups(&rows);
        let minutes: Vec<_> = ups.iter().filter(|u| u.resolution_s == 60).collect();
        let hours: Vec<_> = ups.iter().filter(|u| u.resolution_s == 3600).collect();
        assert_eq!(hours.len(), 1);
        assert_eq!(
            (hours[0].min, hours[0].max, hours[0].sum, hours[0].count),
            (0.0, 2.0, 3.0, 3)
        );
        assert_eq!(
            minutes.iter().map(|m| m.count).sum::<i64>(),
            3,
            "{minutes:?}"
        );
    }

    #[test]
    fn a_query_reads_the_coarsest_rollup_that_tiles_its_interval() {
        let q = |interval_s| ReadingQuery {
            device_id: id("d"),
            from: at(0),
            to: at(7200),
            interval_s,
            measures: Vec::new(),
        };
        assert_eq!(q(30).source(), Source::Raw);
        assert_eq!(q(90).source(), Source::Raw);
        assert_eq!(q(60).source(), Source::Rollup(60));
        assert_eq!(q(300).source(), Source::Rollup(60));
        assert_eq!(q(3600).source(), Source::Rollup(3600));
        assert_eq!(q(86_400).source(), Source::Rollup(3600));
        assert!(q(0).check().is_err());
        assert!(q(1).check().is_ok());
        assert!(q(MAX_INTERVAL_S).check().is_ok());
        assert!(q(MAX_INTERVAL_S + 1).check().is_err());
        assert!(q(i64::MAX).check().is_err(), "refused, not an overflow");
    }

    #[test]
    fn buckets_before_the_epoch_start_on_their_boundary() {
        assert_eq!(bucket(-1, 60), -60_000);
        assert_eq!(bucket(59_999, 60), 0);
        assert_eq!(bucket(60_000, 60), 60_000);
    }
}
