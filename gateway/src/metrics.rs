//! Prometheus metrics, exposed at `/metrics`. Each method both counts and logs, so the
//! metrics cannot drift from the logs.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProviderLabel {
    provider: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    provider: String,
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TableLabel {
    table: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TaskLabel {
    task: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FailoverLabel {
    from: String,
    to: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AlertLabel {
    provider: String,
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SinkLabel {
    sink: String,
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DepthLabel {
    sink: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SourceLabel {
    source: String,
    reason: String,
}

/// Every metric iotgw exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    received: Family<ProviderLabel, Counter>,
    acked: Family<ProviderLabel, Counter>,
    nacked: Family<ReasonLabel, Counter>,
    rejected: Family<ReasonLabel, Counter>,
    alerts: Family<AlertLabel, Counter>,
    commands: Family<ReasonLabel, Counter>,
    failovers: Family<FailoverLabel, Counter>,
    clamped: Family<ReasonLabel, Counter>,
    provider_restarts: Family<ReasonLabel, Counter>,
    panics: Family<TaskLabel, Counter>,
    retention_deleted: Family<TableLabel, Counter>,
    replays: Family<OutcomeLabel, Counter>,
    reloads: Family<OutcomeLabel, Counter>,
    moves: Family<FailoverLabel, Counter>,
    deliveries: Family<SinkLabel, Counter>,
    dead_letters: Family<SourceLabel, Counter>,
    in_flight: Gauge<i64, std::sync::atomic::AtomicI64>,
    in_flight_by_provider: Family<ProviderLabel, Gauge<i64, std::sync::atomic::AtomicI64>>,
    outbox_depth: Family<DepthLabel, Gauge<i64, std::sync::atomic::AtomicI64>>,
    provider_connected: Family<ProviderLabel, Gauge<i64, std::sync::atomic::AtomicI64>>,
    ready: Gauge<i64, std::sync::atomic::AtomicI64>,
    api_auth_failures: Counter<u64, AtomicU64>,
    batch_events: Histogram,
    batch_commit_seconds: Histogram,
    batch_store_seconds: Histogram,
    /// Events acked, all providers (the rate the console shows).
    acked_total: AtomicU64,
    /// `acked_total` sampled every [`RATE_EVERY`], the last [`RATE_KEEP`] samples.
    rate_samples:
        std::sync::Mutex<std::collections::VecDeque<(chrono::DateTime<chrono::Utc>, u64)>>,
}

/// How often the acked total is sampled for [`Metrics::acked_rates`].
pub const RATE_EVERY: std::time::Duration = std::time::Duration::from_secs(5);
/// Samples kept: five minutes.
pub const RATE_KEEP: usize = 61;

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("iotgw");
        let m = Self {
            received: Family::default(),
            acked: Family::default(),
            nacked: Family::default(),
            rejected: Family::default(),
            alerts: Family::default(),
            commands: Family::default(),
            failovers: Family::default(),
            clamped: Family::default(),
            provider_restarts: Family::default(),
            panics: Family::default(),
            retention_deleted: Family::default(),
            replays: Family::default(),
            reloads: Family::default(),
            moves: Family::default(),
            deliveries: Family::default(),
            dead_letters: Family::default(),
            in_flight: Gauge::default(),
            in_flight_by_provider: Family::default(),
            outbox_depth: Family::default(),
            provider_connected: Family::default(),
            ready: Gauge::default(),
            api_auth_failures: Counter::default(),
            batch_events: Histogram::new([
                1.0, 4.0, 16.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 4096.0,
            ]),
            batch_commit_seconds: Histogram::new([
                0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5, 1.0,
            ]),
            batch_store_seconds: Histogram::new([
                0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5, 1.0,
            ]),
            acked_total: AtomicU64::new(0),
            rate_samples: std::sync::Mutex::default(),
            registry: Registry::default(),
        };
        registry.register(
            "events_received",
            "Provider events received",
            m.received.clone(),
        );
        registry.register(
            "events_acked",
            "Provider events acknowledged after commit",
            m.acked.clone(),
        );
        registry.register(
            "events_nacked",
            "Provider events left for redelivery, by reason",
            m.nacked.clone(),
        );
        registry.register(
            "events_rejected",
            "Provider events refused (dead-lettered or ignored), by reason",
            m.rejected.clone(),
        );
        registry.register(
            "alerts",
            "Alerts by kind: primary, child (debounced) or duplicate (redelivery)",
            m.alerts.clone(),
        );
        registry.register("commands", "Commands by outcome", m.commands.clone());
        registry.register(
            "failovers",
            "New devices routed to a fallback instance because the rule's own was down",
            m.failovers.clone(),
        );
        registry.register(
            "provider_restarts",
            "Provider receive loops started again after they ended (reason: error, panic, returned)",
            m.provider_restarts.clone(),
        );
        registry.register(
            "panics",
            "Panics caught in the gateway's own tasks, by task; the event being handled was left for redelivery",
            m.panics.clone(),
        );
        registry.register(
            "dead_letter_replays",
            "Dead letters replayed, by outcome (committed, dead_lettered_again, requeued)",
            m.replays.clone(),
        );
        registry.register(
            "retention_deleted",
            "Rows deleted because [retention] no longer keeps them, by table",
            m.retention_deleted.clone(),
        );
        registry.register(
            "times_clamped",
            "Event times later than pipeline.max_clock_skew_secs after their arrival, clamped, by field",
            m.clamped.clone(),
        );
        registry.register(
            "provider_in_flight",
            "Events received from a provider instance and not yet acknowledged or left for redelivery",
            m.in_flight_by_provider.clone(),
        );
        registry.register(
            "config_reloads",
            "Configuration reloads by outcome (applied, unchanged, refused)",
            m.reloads.clone(),
        );
        registry.register(
            "device_moves",
            "Devices moved between provider instances",
            m.moves.clone(),
        );
        registry.register(
            "deliveries",
            "Sink delivery attempts by outcome",
            m.deliveries.clone(),
        );
        registry.register(
            "dead_letters",
            "Dead letters written, by source and reason",
            m.dead_letters.clone(),
        );
        registry.register(
            "in_flight",
            "Events received and not yet acknowledged",
            m.in_flight.clone(),
        );
        registry.register(
            "outbox_depth",
            "Outbox items waiting per sink",
            m.outbox_depth.clone(),
        );
        registry.register(
            "provider_connected",
            "1 when the provider instance is connected",
            m.provider_connected.clone(),
        );
        registry.register(
            "ready",
            "1 when the gateway is ready (/ready answers 200: the store takes writes and every required provider instance is connected), else 0",
            m.ready.clone(),
        );
        registry.register(
            "api_auth_failures",
            "API requests refused for a missing or wrong bearer token",
            m.api_auth_failures.clone(),
        );
        registry.register(
            "batch_events",
            "Events per group commit (one store transaction)",
            m.batch_events.clone(),
        );
        registry.register(
            "batch_commit_seconds",
            "Time from a batch's commit start to every event of it acknowledged",
            m.batch_commit_seconds.clone(),
        );
        registry.register(
            "batch_store_seconds",
            "Time a batch's store transaction took (the part of batch_commit_seconds before the acks)",
            m.batch_store_seconds.clone(),
        );
        Self { registry, ..m }
    }

    /// Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::error!(error = %e, "encoding metrics failed");
        }
        out
    }

    /// One group commit of `events` events took `took` (commit and acks).
    pub fn batch(&self, events: usize, took: std::time::Duration) {
        #[allow(clippy::cast_precision_loss)]
        self.batch_events.observe(events as f64);
        self.batch_commit_seconds.observe(took.as_secs_f64());
    }

    /// One group commit's store transaction took `took`.
    pub fn batch_store(&self, took: std::time::Duration) {
        self.batch_store_seconds.observe(took.as_secs_f64());
    }

    /// An event arrived.
    pub fn received(&self, provider: &str) {
        self.received
            .get_or_create(&ProviderLabel {
                provider: provider.into(),
            })
            .inc();
        self.in_flight.inc();
        self.provider_gauge(provider).inc();
    }

    fn provider_gauge(&self, provider: &str) -> Gauge<i64, std::sync::atomic::AtomicI64> {
        self.in_flight_by_provider
            .get_or_create(&ProviderLabel {
                provider: provider.into(),
            })
            .clone()
    }

    /// Events of `provider` received and not yet acknowledged or nacked.
    pub fn in_flight_of(&self, provider: &str) -> u64 {
        u64::try_from(self.provider_gauge(provider).get()).unwrap_or(0)
    }

    /// An event was acknowledged.
    pub fn acked(&self, provider: &str) {
        self.acked_total
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.acked
            .get_or_create(&ProviderLabel {
                provider: provider.into(),
            })
            .inc();
        self.in_flight.dec();
        self.provider_gauge(provider).dec();
    }

    /// Records the acked total now (kept: the last [`RATE_KEEP`] samples).
    pub fn sample_rate(&self, now: chrono::DateTime<chrono::Utc>) {
        let total = self.acked_total.load(std::sync::atomic::Ordering::Relaxed);
        let mut samples = self
            .rate_samples
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        samples.push_back((now, total));
        while samples.len() > RATE_KEEP {
            samples.pop_front();
        }
    }

    /// Events acked per second between consecutive samples, each at its later sample's
    /// time, oldest first (empty before two samples).
    pub fn acked_rates(&self) -> Vec<(chrono::DateTime<chrono::Utc>, f64)> {
        let samples = self
            .rate_samples
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        samples
            .iter()
            .zip(samples.iter().skip(1))
            .filter_map(|((t0, n0), (t1, n1))| {
                let secs = (*t1 - *t0).num_milliseconds() as f64 / 1000.0;
                (secs > 0.0).then(|| (*t1, n1.saturating_sub(*n0) as f64 / secs))
            })
            .collect()
    }

    /// Samples the acked total every [`RATE_EVERY`] until these metrics are dropped.
    pub fn spawn_rate_sampler(self: &std::sync::Arc<Self>) {
        let weak = std::sync::Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(RATE_EVERY);
            loop {
                tick.tick().await;
                let Some(m) = weak.upgrade() else { return };
                m.sample_rate(chrono::Utc::now());
            }
        });
    }

    /// An event was left for redelivery.
    pub fn nacked(&self, provider: &str, reason: &str, detail: &str) {
        tracing::warn!(
            provider,
            reason,
            detail,
            "event not acknowledged: the provider will redeliver it"
        );
        self.nacked
            .get_or_create(&ReasonLabel {
                provider: provider.into(),
                reason: reason.into(),
            })
            .inc();
        self.in_flight.dec();
        self.provider_gauge(provider).dec();
    }

    /// The counter of [`EventRejected`](crate::internal_events::EventRejected) alone;
    /// only that event calls it, so the log line always comes with it.
    pub(crate) fn count_rejected(&self, provider: &str, reason: &str) {
        self.rejected
            .get_or_create(&ReasonLabel {
                provider: provider.into(),
                reason: reason.into(),
            })
            .inc();
    }

    /// The counter of [`AlertCommitted`](crate::internal_events::AlertCommitted); emit
    /// that event instead, so the log line comes with it.
    pub(crate) fn alert(&self, provider: &str, kind: &str) {
        self.alerts
            .get_or_create(&AlertLabel {
                provider: provider.into(),
                kind: kind.into(),
            })
            .inc();
    }

    /// A command reached an outcome.
    pub fn command(&self, provider: &str, outcome: &str) {
        self.commands
            .get_or_create(&ReasonLabel {
                provider: provider.into(),
                reason: outcome.into(),
            })
            .inc();
    }

    /// A new device went to fallback `to` because `from` was down.
    pub fn failover(&self, from: &str, to: &str) {
        self.failovers
            .get_or_create(&FailoverLabel {
                from: from.into(),
                to: to.into(),
            })
            .inc();
    }

    /// An event time from `provider` lay too far in the future and was clamped.
    pub fn clamped(&self, provider: &str, field: &str) {
        self.clamped
            .get_or_create(&ReasonLabel {
                provider: provider.into(),
                reason: field.into(),
            })
            .inc();
    }

    /// Provider `provider`'s receive loop ended (`reason`: error, panic, returned) and is
    /// started again.
    pub fn provider_restart(&self, provider: &str, reason: &str) {
        self.provider_restarts
            .get_or_create(&ReasonLabel {
                provider: provider.into(),
                reason: reason.into(),
            })
            .inc();
    }

    /// A dead letter was replayed.
    pub fn replay(&self, outcome: &str) {
        self.replays
            .get_or_create(&OutcomeLabel {
                outcome: outcome.into(),
            })
            .inc();
    }

    /// Retention deleted `n` rows of `table`.
    pub fn retention_deleted(&self, table: &str, n: u64) {
        self.retention_deleted
            .get_or_create(&TableLabel {
                table: table.into(),
            })
            .inc_by(n);
    }

    /// A panic was caught in `task`.
    pub fn panic(&self, task: &str) {
        self.panics
            .get_or_create(&TaskLabel { task: task.into() })
            .inc();
    }

    /// A configuration reload ended.
    pub fn config_reload(&self, outcome: &str) {
        self.reloads
            .get_or_create(&OutcomeLabel {
                outcome: outcome.into(),
            })
            .inc();
    }

    /// A device moved from `from` to `to`.
    pub fn moved(&self, from: &str, to: &str) {
        self.moves
            .get_or_create(&FailoverLabel {
                from: from.into(),
                to: to.into(),
            })
            .inc();
    }

    /// A sink delivery attempt ended.
    pub fn delivery(&self, sink: &str, outcome: &str) {
        self.deliveries
            .get_or_create(&SinkLabel {
                sink: sink.into(),
                outcome: outcome.into(),
            })
            .inc();
    }

    /// A dead letter was written.
    pub fn dead_letter(&self, source: &str, reason: &str) {
        self.dead_letters
            .get_or_create(&SourceLabel {
                source: source.into(),
                reason: reason.into(),
            })
            .inc();
    }

    /// Sets the outbox depth of a sink.
    pub fn set_outbox_depth(&self, sink: &str, depth: u64) {
        self.outbox_depth
            .get_or_create(&DepthLabel { sink: sink.into() })
            .set(i64::try_from(depth).unwrap_or(i64::MAX));
    }

    /// Sets a provider's connection gauge.
    pub fn set_provider_connected(&self, provider: &str, connected: bool) {
        self.provider_connected
            .get_or_create(&ProviderLabel {
                provider: provider.into(),
            })
            .set(i64::from(connected));
    }

    /// Sets the readiness gauge: `ready` is whether `/ready` answers 200 (the verdict of
    /// [`Readiness::check`](crate::health::Readiness::check)).
    pub fn set_ready(&self, ready: bool) {
        self.ready.set(i64::from(ready));
    }

    /// An API request was refused for its token.
    pub fn api_auth_failure(&self) {
        self.api_auth_failures.inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acked_rates_are_per_second_between_samples_and_keep_five_minutes() {
        let m = Metrics::new();
        let t0 = chrono::Utc::now();
        assert!(m.acked_rates().is_empty());
        m.sample_rate(t0);
        for _ in 0..50 {
            m.acked("local");
        }
        m.sample_rate(t0 + chrono::Duration::seconds(5));
        assert_eq!(
            m.acked_rates(),
            vec![(t0 + chrono::Duration::seconds(5), 10.0)]
        );
        for i in 2..200 {
            m.sample_rate(t0 + chrono::Duration::seconds(5 * i));
        }
        let rates = m.acked_rates();
        assert_eq!(rates.len(), RATE_KEEP - 1);
        assert!(rates.iter().all(|(_, r)| *r == 0.0));
    }

    #[test]
    fn exposition_names_every_family_with_the_iotgw_prefix() {
        let m = Metrics::new();
        m.received("local");
        m.acked("local");
        m.delivery("hook", "delivered");
        m.set_outbox_depth("hook", 3);
        let text = m.encode();
        for name in [
            "iotgw_events_received_total{provider=\"local\"} 1",
            "iotgw_events_acked_total{provider=\"local\"} 1",
            "iotgw_deliveries_total{sink=\"hook\",outcome=\"delivered\"} 1",
            "iotgw_outbox_depth{sink=\"hook\"} 3",
            "iotgw_in_flight 0",
        ] {
            assert!(text.contains(name), "{name} missing in\n{text}");
        }
    }

    /// The names of the series `exposition` holds (`iotgw_events_received_total`,
    /// `iotgw_batch_events_bucket`, ...: what Prometheus stores and PromQL can name), and
    /// the names its `# TYPE` lines declare (`iotgw_events_received`, without `_total`).
    fn series_and_families(
        exposition: &str,
    ) -> (
        std::collections::BTreeSet<String>,
        std::collections::BTreeSet<String>,
    ) {
        let mut series = std::collections::BTreeSet::new();
        let mut families = std::collections::BTreeSet::new();
        for line in exposition.lines() {
            if let Some(declared) = line.strip_prefix("# TYPE ") {
                if let Some(name) = declared.split(' ').next() {
                    families.insert(name.to_owned());
                }
            } else if !line.starts_with('#') && !line.is_empty() {
                let end = line.find(['{', ' ']).unwrap_or(line.len());
                series.insert(line[..end].to_owned());
            }
        }
        (series, families)
    }

    #[test]
    fn the_dashboard_and_the_alert_rules_name_only_metrics_the_gateway_exports() {
        // Every public counting and setting method once, so that every family, labelled
        // ones included, has a series in the exposition.
        let m = Metrics::new();
        m.batch(3, std::time::Duration::from_millis(2));
        m.batch_store(std::time::Duration::from_millis(1));
        m.received("local");
        m.received("local");
        m.acked("local");
        m.nacked("local", "store_error", "test");
        m.count_rejected("local", "malformed");
        m.alert("local", "primary");
        m.command("local", "published");
        m.failover("a", "b");
        m.clamped("local", "enqueued_time");
        m.provider_restart("local", "error");
        m.replay("committed");
        m.retention_deleted("alerts", 2);
        m.panic("commit");
        m.config_reload("applied");
        m.moved("a", "b");
        m.delivery("hook", "delivered");
        m.dead_letter("local", "unknown_device");
        m.set_outbox_depth("hook", 1);
        m.set_provider_connected("local", true);
        m.set_ready(true);
        m.api_auth_failure();
        let exposition = m.encode();
        let (series, families) = series_and_families(&exposition);

        // Every family needs a series here, or a dashboard naming it would be refused: a
        // metric added to Metrics needs its method called above.
        for family in &families {
            assert!(
                series.iter().any(|s| s == family
                    || s.strip_prefix(family.as_str())
                        .is_some_and(
                            |suffix| ["_total", "_bucket", "_sum", "_count"].contains(&suffix)
                        )),
                "family {family} has no series: call its method in this test\n{exposition}"
            );
        }

        // Every iotgw_ name in the files must be a series name, exactly. A histogram's
        // series are its _bucket, _sum and _count; the bare name of a histogram, or of a
        // counter without its _total, is only a `# TYPE` line and finds no data in
        // Prometheus, so it is refused too.
        let token = regex::Regex::new(r"iotgw_[a-z0-9_]+").expect("regex");
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        for (file, at_least) in [
            ("deploy/grafana/iotgw.json", 20),
            ("deploy/prometheus/rules.yml", 4),
        ] {
            let text = std::fs::read_to_string(root.join(file))
                .unwrap_or_else(|e| panic!("reading {file}: {e}"));
            let named: std::collections::BTreeSet<&str> =
                token.find_iter(&text).map(|t| t.as_str()).collect();
            assert!(
                named.len() >= at_least,
                "{file} names only {} iotgw_ metrics ({named:?}): is it the right file?",
                named.len()
            );
            let unknown: Vec<&str> = named
                .iter()
                .copied()
                .filter(|name| !series.contains(*name))
                .collect();
            assert!(
                unknown.is_empty(),
                "{file} names metrics the gateway does not export: {unknown:?}\nexported series: {series:?}"
            );
        }
    }
}
