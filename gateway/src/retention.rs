//! Retention: every `retention.interval_secs` the gateway deletes what `[retention]` no
//! longer keeps (dead letters, finished commands, Inactive or Closed alerts), through
//! [`Store::purge`](iotgw_registry::Store::purge), at most [`PURGE_BATCH`] rows per table
//! and transaction, so no round holds the store's write lock for long. Counted in
//! `iotgw_retention_deleted_total{table}`.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use iotgw_config::{ReadingsConfig, RetentionConfig};
use iotgw_registry::{PurgeBefore, Purged};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::core::Core;

/// Rows deleted per table in one transaction.
pub const PURGE_BATCH: u32 = 1000;

/// What `config` and `readings` let go at `now` (a 0 keeps the table whole).
pub fn cutoffs(
    config: &RetentionConfig,
    readings: &ReadingsConfig,
    now: DateTime<Utc>,
) -> PurgeBefore {
    let before = |days: u32| (days > 0).then(|| now - chrono::Duration::days(i64::from(days)));
    PurgeBefore {
        dead_letters: before(config.dead_letters_days),
        commands: before(config.commands_days),
        alerts: before(config.alerts_days),
        readings: before(readings.retention_days),
        minute_rollups: before(readings.minute_rollups_days),
        hour_rollups: before(readings.hour_rollups_days),
    }
}

/// One round at `now`: purges in batches until every table is done. A closed child goes
/// in one batch and its closed parent in the next, so the round goes on while anything
/// was deleted.
pub async fn round(core: &Core, now: DateTime<Utc>) -> Purged {
    let live = core.live();
    let before = cutoffs(&live.config.retention, &live.config.readings, now);
    let mut total = Purged::default();
    if before == PurgeBefore::default() {
        return total;
    }
    loop {
        let done = match core.store.purge(&before, PURGE_BATCH).await {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(error = %e, "retention: purging failed; trying again next round");
                break;
            }
        };
        for (table, n) in [
            ("dead_letters", done.dead_letters),
            ("commands", done.commands),
            ("alerts", done.alerts),
            ("readings", done.readings),
            ("reading_rollups", done.rollups),
        ] {
            core.metrics.retention_deleted(table, n);
        }
        total.dead_letters += done.dead_letters;
        total.commands += done.commands;
        total.alerts += done.alerts;
        total.readings += done.readings;
        total.rollups += done.rollups;
        if done == Purged::default() {
            break;
        }
        tokio::task::yield_now().await;
    }
    if total != Purged::default() {
        tracing::info!(
            dead_letters = total.dead_letters,
            commands = total.commands,
            alerts = total.alerts,
            readings = total.readings,
            rollups = total.rollups,
            "retention: deleted what [retention] no longer keeps"
        );
    }
    total
}

/// Runs a round now and every `retention.interval_secs` until `stop` (a supervised task).
pub fn spawn(core: Arc<Core>, stop: CancellationToken) -> JoinHandle<()> {
    let vitals = core.vitals.clone();
    vitals.spawn("retention", Some(stop.clone()), async move {
        loop {
            round(&core, Utc::now()).await;
            let every = Duration::from_secs(core.live().config.retention.interval_secs);
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(every) => {}
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use iotgw_config::Config;
    use iotgw_registry::{NewDeadLetter, SqliteStore, Store};
    use tokio::sync::Notify;

    use super::*;
    use crate::live::Live;
    use crate::metrics::Metrics;

    #[test]
    fn zero_days_keep_a_table_and_other_values_count_back_from_now() {
        let now = Utc::now();
        let config = RetentionConfig {
            dead_letters_days: 30,
            commands_days: 0,
            alerts_days: 1,
            interval_secs: 3600,
        };
        let readings = ReadingsConfig {
            retention_days: 7,
            minute_rollups_days: 0,
            ..ReadingsConfig::default()
        };
        let c = cutoffs(&config, &readings, now);
        assert_eq!(c.dead_letters, Some(now - chrono::Duration::days(30)));
        assert_eq!(c.commands, None);
        assert_eq!(c.alerts, Some(now - chrono::Duration::days(1)));
        assert_eq!(c.readings, Some(now - chrono::Duration::days(7)));
        assert_eq!(c.minute_rollups, None);
        assert_eq!(c.hour_rollups, Some(now - chrono::Duration::days(800)));
    }

    #[tokio::test]
    async fn a_round_deletes_in_batches_until_nothing_is_left_and_counts_it() {
        let store = Arc::new(SqliteStore::memory().await.expect("store"));
        for i in 0..(PURGE_BATCH + 5) {
            store
                .insert_dead_letter(&NewDeadLetter {
                    source: "telemetry:edge".into(),
                    reason: "malformed".into(),
                    device_id: None,
                    message_id: Some(format!("m-{i}")),
                    payload: "{".into(),
                })
                .await
                .expect("dead letter");
        }
        let core = Core::new(
            store.clone(),
            Arc::new(Metrics::new()),
            Arc::new(Notify::new()),
            "test".into(),
            Live::new(1, Arc::new(Config::embedded_default()), BTreeMap::new()),
        );
        assert_eq!(
            round(&core, Utc::now()).await,
            Purged::default(),
            "nothing is 30 days old"
        );
        let later = Utc::now() + chrono::Duration::days(31);
        assert_eq!(
            round(&core, later).await.dead_letters,
            u64::from(PURGE_BATCH) + 5
        );
        assert!(core.metrics.encode().contains(&format!(
            "iotgw_retention_deleted_total{{table=\"dead_letters\"}} {}",
            PURGE_BATCH + 5
        )));
    }
}
