//! Throughput of the azure_iot_hub provider's Event Hubs-compatible endpoint path, end to
//! end: telemetry events/s from a fake of the endpoint (in-process, plain AMQP, 4
//! partitions) read by Microsoft's official `azure_messaging_eventhubs` client, through the
//! pipeline and the SQLite commit to the ack (and the partition checkpoint), with one rule
//! raising alerts on a tenth of them.
//!
//! `cargo bench -p iotgw --features azure_event_hubs,azure_fakes --bench event_hubs_throughput`
//!
//! Environment: `IOTGW_BENCH_MESSAGES` (default 5000), `IOTGW_BENCH_DEVICES` (default 20).
//! Needs no Docker: both fakes (the hub's REST endpoint and the Event Hubs-compatible one)
//! run in this process. Every wait has a deadline; the whole run fails after 300 s. The
//! recorded figures live in BENCHMARKS.md.
#![allow(
    clippy::disallowed_methods,
    reason = "test code: plain-HTTP clients against in-process servers and local emulators, no TLS roots or timeouts to configure"
)]

use std::collections::HashSet;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use iotgw::app::{self, StartOptions};
use iotgw_config::azure_iot_hub::{AzureIotHubConfig, EventHubsConfig, EventHubsStart};
use iotgw_config::model::Secret;
use iotgw_config::{CompareOp, Config, ProviderConfig, RuleConfig};
use iotgw_providers::azure_iot_hub::fakes::fake_event_hubs::{FakeEvent, FakeEventHubs};
use iotgw_providers::azure_iot_hub::fakes::fake_hub::FakeHub;
use iotgw_providers::azure_iot_hub::fakes::pki::pki;
use serde_json::Value;
use support::{env_usize, run_within, Samples};

mod support;

/// The provider instance.
const INSTANCE: &str = "hub";
/// The event hub (entity) of the fake endpoint.
const ENTITY: &str = "iotgw-bench";
/// IoT Hub's default partition count.
const PARTITIONS: usize = 4;
/// The whole run.
const LIMIT: Duration = Duration::from_secs(300);
/// Connecting, registering, attaching the partition receivers: each.
const SETUP_LIMIT: Duration = Duration::from_secs(60);
/// No new ack for this long while waiting is a failure.
const STALL_LIMIT: Duration = Duration::from_secs(30);
/// How often /metrics is read while waiting.
const POLL: Duration = Duration::from_millis(50);

/// The gateway seen from outside: its HTTP API.
struct Api {
    http: reqwest::Client,
    base: String,
}

impl Api {
    async fn metrics(&self) -> anyhow::Result<Samples> {
        let text = self
            .http
            .get(format!("{}/metrics", self.base))
            .send()
            .await?
            .error_for_status()?
            .text()
            .await?;
        Ok(Samples::parse(&text))
    }

    async fn register(&self, id: &str) -> anyhow::Result<()> {
        let answer = self
            .http
            .post(format!("{}/api/v1/devices", self.base))
            .json(&serde_json::json!({ "msdyn_deviceid": id }))
            .send()
            .await?;
        let status = answer.status();
        anyhow::ensure!(
            status == reqwest::StatusCode::CREATED,
            "registering {id}: {status} {}",
            answer.text().await.unwrap_or_default()
        );
        Ok(())
    }

    /// Every alert, page by page.
    async fn alerts(&self) -> anyhow::Result<Vec<Value>> {
        let mut all = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let mut query = vec![("limit", "1000".to_owned())];
            if let Some(a) = &after {
                query.push(("after", a.clone()));
            }
            let page: Value = self
                .http
                .get(format!("{}/api/v1/alerts", self.base))
                .query(&query)
                .send()
                .await?
                .error_for_status()?
                .json()
                .await?;
            if let Some(items) = page["items"].as_array() {
                all.extend(items.iter().cloned());
            }
            match page["next"].as_str() {
                Some(next) => after = Some(next.to_owned()),
                None => return Ok(all),
            }
        }
    }
}

/// Polls `check` every [`POLL`] until it gives a value, for at most `limit`.
async fn wait_for<T, F, Fut>(what: &str, limit: Duration, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Option<T>>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = check().await? {
            return Ok(v);
        }
        anyhow::ensure!(Instant::now() < deadline, "{what}: not within {limit:?}");
        tokio::time::sleep(POLL).await;
    }
}

/// One telemetry body of about 90 bytes; every tenth is above the rule's threshold.
fn body(n: usize) -> String {
    let temperature = if n.is_multiple_of(10) { 82.4 } else { 19.6 };
    format!(
        r#"{{"seq":{n},"temperature":{temperature:.1},"humidity":38.5,"battery":97,"at":"2026-11-23T08:00:00Z"}}"#
    )
}

fn main() -> anyhow::Result<()> {
    // `cargo bench` passes --bench; `cargo test --all-targets` runs it without: then a
    // short smoke run (200 events) instead of the measurement.
    if std::env::args().any(|a| a == "--list") {
        return Ok(());
    }
    let smoke = !std::env::args().any(|a| a == "--bench");
    run_within(LIMIT, run(smoke))
}

async fn run(smoke: bool) -> anyhow::Result<()> {
    let messages = env_usize("IOTGW_BENCH_MESSAGES", if smoke { 200 } else { 5000 }).max(1);
    let devices = env_usize("IOTGW_BENCH_DEVICES", 20).max(1);

    let hub = FakeHub::start().await;
    let endpoint = FakeEventHubs::start(ENTITY, PARTITIONS).await;

    let data = tempfile::tempdir()?;
    let mut config = Config::default();
    config.store.path = data.path().join("iotgw.db").display().to_string();
    let azure = AzureIotHubConfig {
        connection_string: Some(Secret::new(hub.connection_string())),
        ca_file: Some(pki().ca_file.display().to_string()),
        event_hubs: Some(EventHubsConfig {
            connection_string: Secret::new(endpoint.connection_string()),
            consumer_group: "iotgw".into(),
            start: EventHubsStart::Earliest,
            custom_endpoint: Some(endpoint.endpoint()),
            load_balancing_interval_ms:
                iotgw_config::azure_iot_hub::default_load_balancing_interval(),
            ownership_expiry_ms: iotgw_config::azure_iot_hub::default_ownership_expiry(),
        }),
        ..AzureIotHubConfig::default()
    };
    config
        .providers
        .insert(INSTANCE.into(), ProviderConfig::AzureIotHub(azure));
    config.routing.default = Some(INSTANCE.into());
    config.rules.insert(
        "hot".into(),
        RuleConfig {
            pointer: "/temperature".into(),
            op: CompareOp::Gt,
            value: Some(serde_json::json!(75)),
            alert_type: "Anomaly".into(),
            description: "{device_id} reads {value} °C".into(),
            priority: Some(60),
            command: None,
        },
    );

    let started = Instant::now();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let gw = app::start(
        config,
        StartOptions {
            api_listener: Some(listener),
            ..StartOptions::default()
        },
    )
    .await?;
    let api = Api {
        http: reqwest::Client::new(),
        base: format!("http://{}", gw.api_addr),
    };
    let instance = [("provider", INSTANCE)];

    wait_for(
        "the provider to reach the fake hub",
        SETUP_LIMIT,
        || async {
            let m = api.metrics().await?;
            Ok((m.sum("iotgw_provider_connected", &instance) == 1).then_some(()))
        },
    )
    .await?;
    let connected = started.elapsed();

    let ids: Vec<String> = (0..devices).map(|i| format!("eh-bench-{i:03}")).collect();
    for id in &ids {
        api.register(id).await?;
        anyhow::ensure!(
            hub.has_device(id),
            "{id} was registered but is not in the hub"
        );
    }
    let registered = started.elapsed();
    let mut per_partition = vec![0usize; PARTITIONS];
    for n in 0..messages {
        let p: usize = endpoint.partition_of(&ids[n % ids.len()]).parse()?;
        per_partition[p] += 1;
    }

    // Measure the steady state, not the client's connection: wait for a receiver on
    // every partition first.
    let attached = wait_for(
        "the official client to attach a receiver on every partition",
        SETUP_LIMIT,
        || async {
            let log = endpoint.log();
            anyhow::ensure!(log.errors.is_empty(), "the fake failed: {:?}", log.errors);
            let open: HashSet<&str> = log
                .receivers
                .iter()
                .filter(|r| r.refused.is_none())
                .map(|r| r.source.as_str())
                .collect();
            Ok((open.len() >= PARTITIONS).then(|| started.elapsed()))
        },
    )
    .await?;

    let hot = messages.div_ceil(10);
    eprintln!(
        "event_hubs_throughput: provider connected at {:.2} s, {devices} devices registered at {:.2} s, \
         {PARTITIONS} receivers attached at {:.2} s; publishing {messages} events ({hot} alerting), \
         per partition {per_partition:?}",
        connected.as_secs_f64(),
        registered.as_secs_f64(),
        attached.as_secs_f64()
    );
    let t0 = Instant::now();
    for n in 0..messages {
        let device = &ids[n % ids.len()];
        endpoint.publish(FakeEvent::telemetry(
            device,
            &format!("msg-{n:07}"),
            body(n).as_bytes(),
        ));
    }
    let published = t0.elapsed();

    // Wait for every ack, with a deadline that grows with the run and a stall check.
    let deadline = t0 + Duration::from_secs(60) + Duration::from_millis(2 * messages as u64);
    let (mut last_acked, mut last_change) = (0, Instant::now());
    let mut next_report = Instant::now() + Duration::from_secs(1);
    let (samples, elapsed) = loop {
        let m = api.metrics().await?;
        let acked = m.sum("iotgw_events_acked_total", &instance);
        let now = Instant::now();
        if acked >= messages as u64 {
            break (m, t0.elapsed());
        }
        if acked != last_acked {
            (last_acked, last_change) = (acked, now);
        }
        let state = || {
            format!(
                "{acked}/{messages} acked, {} received, {} nacked, {} rejected; fake: {} connections, errors {:?}",
                m.sum("iotgw_events_received_total", &instance),
                m.sum("iotgw_events_nacked_total", &instance),
                m.sum("iotgw_events_rejected_total", &instance),
                endpoint.log().connections,
                endpoint.log().errors,
            )
        };
        anyhow::ensure!(
            now < deadline,
            "not every event was acked by the deadline ({:.0} s): {}",
            (deadline - t0).as_secs_f64(),
            state()
        );
        anyhow::ensure!(
            now - last_change < STALL_LIMIT,
            "no event acked for {STALL_LIMIT:?}: {}",
            state()
        );
        if now >= next_report {
            eprintln!(
                "  {:5.1} s: {acked}/{messages} acked ({:.0} events/s so far)",
                t0.elapsed().as_secs_f64(),
                acked as f64 / t0.elapsed().as_secs_f64()
            );
            next_report = now + Duration::from_secs(1);
        }
        tokio::time::sleep(POLL).await;
    };

    let acked = samples.sum("iotgw_events_acked_total", &instance);
    let received = samples.sum("iotgw_events_received_total", &instance);
    let nacked = samples.sum("iotgw_events_nacked_total", &instance);
    let rejected = samples.sum("iotgw_events_rejected_total", &instance);
    let kind = |k: &str| samples.sum("iotgw_alerts_total", &[("provider", INSTANCE), ("kind", k)]);
    let (primary, children, duplicates) = (kind("primary"), kind("child"), kind("duplicate"));

    let alerts = api.alerts().await.context("listing the alerts")?;
    let tokens: HashSet<&str> = alerts
        .iter()
        .filter_map(|a| a["msdyn_alerttoken"].as_str())
        .collect();
    let log = endpoint.log();

    let rate = messages as f64 / elapsed.as_secs_f64();
    println!(
        "event_hubs_throughput: {messages} events from {devices} devices over {PARTITIONS} partitions, {hot} alerting: \
         published in {:.2} s, all committed and acked in {:.2} s = {rate:.0} events/s; \
         alerts {} (primary {primary}, child {children}, duplicates {duplicates}), nacks {nacked}, rejected {rejected}",
        published.as_secs_f64(),
        elapsed.as_secs_f64(),
        alerts.len(),
    );
    println!(
        "| | {messages} | {:.3} | {:.2} | {rate:.0} | {} | {duplicates} | {nacked} |",
        published.as_secs_f64(),
        elapsed.as_secs_f64(),
        alerts.len(),
    );

    anyhow::ensure!(
        acked == messages as u64 && received == messages as u64,
        "expected {messages} events received and acked once each, got {received} received, {acked} acked"
    );
    anyhow::ensure!(
        nacked == 0 && rejected == 0 && duplicates == 0,
        "expected no nack, rejection or duplicate: {nacked} nacked, {rejected} rejected, {duplicates} duplicates"
    );
    anyhow::ensure!(
        alerts.len() == hot && tokens.len() == hot && primary + children == hot as u64,
        "expected {hot} alerts with distinct tokens: {} stored ({} distinct tokens), {} counted",
        alerts.len(),
        tokens.len(),
        primary + children
    );
    anyhow::ensure!(
        log.errors.is_empty() && log.connections == 1,
        "the client should have read over one connection without errors: {} connections, errors {:?}",
        log.connections,
        log.errors
    );

    gw.stop(Duration::from_secs(5)).await;
    Ok(())
}
