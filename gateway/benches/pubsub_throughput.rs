//! Throughput of the gcp_pubsub provider end to end: messages/s from the official Pub/Sub
//! emulator (in Docker) through streaming pull, the pipeline and the SQLite commit to the
//! ack, with one rule raising alerts on a tenth of them.
//!
//! `cargo bench -p iotgw --features gcp_pubsub --bench pubsub_throughput`
//!
//! Environment: `IOTGW_BENCH_MESSAGES` (default 5000), `IOTGW_BENCH_DEVICES` (default
//! 20). Bounded: fails after 180 s. The emulator is `iotgw_testkit::pubsub`'s, as in every
//! other test. Skips (prints `SKIPPED: ...`) without Docker, fails under `CI=true`. The
//! recorded figure lives in BENCHMARKS.md (`deploy/examples/gcp_pubsub.BENCH.md` until
//! merged).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use google_cloud_auth::credentials::anonymous;
use google_cloud_pubsub::client::Publisher;
use google_cloud_pubsub::model::Message;
use iotgw::app::{self, StartOptions};
use iotgw::core::RegisterRequest;
use iotgw_config::{CompareOp, Config, GcpPubSubConfig, ProviderConfig, RuleConfig};
use iotgw_testkit::pubsub::{PubSub, PROJECT};

mod support;
use support::{env_usize, run_within, Samples};

const INSTANCE: &str = "cloud";
const LIMIT: Duration = Duration::from_secs(180);

fn main() -> anyhow::Result<()> {
    // `cargo bench` passes --bench; `cargo test --all-targets` runs it without: then a
    // short smoke run (200 messages) instead of the measurement.
    if std::env::args().any(|a| a == "--list") {
        return Ok(());
    }
    let smoke = !std::env::args().any(|a| a == "--bench");
    // First, while the process has one thread (it may set DOCKER_HOST).
    iotgw_testkit::init();
    if iotgw_testkit::require_docker("the Pub/Sub throughput bench").is_err() {
        return Ok(());
    }
    let result = run_within(LIMIT, run(smoke));
    iotgw_testkit::cleanup();
    result
}

async fn run(smoke: bool) -> anyhow::Result<()> {
    let messages = env_usize("IOTGW_BENCH_MESSAGES", if smoke { 200 } else { 5000 });
    let devices = env_usize("IOTGW_BENCH_DEVICES", 20).max(1);

    let host = PubSub::shared().await?.emulator_host();

    let data = tempfile::tempdir()?;
    let mut config = Config::default();
    config.store.path = data.path().join("iotgw.db").display().to_string();
    let gcp = GcpPubSubConfig {
        project_id: PROJECT.into(),
        emulator_host: Some(host.clone()),
        create_if_missing: true,
        ..GcpPubSubConfig::default()
    };
    let topic = format!("projects/{PROJECT}/topics/{}", gcp.telemetry_topic);
    config
        .providers
        .insert(INSTANCE.into(), ProviderConfig::GcpPubsub(gcp));
    config.routing.default = Some(INSTANCE.into());
    config.rules.insert(
        "high_temperature".into(),
        RuleConfig {
            pointer: "/temperature".into(),
            op: CompareOp::Gt,
            value: Some(serde_json::json!(75)),
            alert_type: "Anomaly".into(),
            description: "Temperature {value} on {device_id}".into(),
            priority: Some(70),
            command: None,
        },
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let gw = app::start(
        config,
        StartOptions {
            api_listener: Some(listener),
            ..StartOptions::default()
        },
    )
    .await?;
    let provider = gw
        .core
        .live()
        .providers
        .get(INSTANCE)
        .cloned()
        .ok_or_else(|| anyhow::anyhow!("provider {INSTANCE} not started"))?;
    let ready = Instant::now();
    while !provider.health().connected {
        anyhow::ensure!(
            ready.elapsed() < Duration::from_secs(30),
            "the provider did not connect: {:?}",
            provider.health()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let ids: Vec<String> = (0..devices).map(|i| format!("bench-{i:03}")).collect();
    for id in &ids {
        gw.core
            .register(RegisterRequest {
                msdyn_deviceid: id.clone(),
                ..Default::default()
            })
            .await?;
    }

    let publisher = Publisher::builder(topic)
        .with_endpoint(format!("http://{host}"))
        .with_credentials(anonymous::Builder::new().build())
        .build()
        .await?;
    let hot = messages.div_ceil(10);
    let started = Instant::now();
    let mut pending = Vec::with_capacity(messages);
    for n in 0..messages {
        let device = &ids[n % ids.len()];
        let temperature = if n % 10 == 0 { 90.5 } else { 21.0 };
        let body = format!(
            r#"{{"sensor":"s-{n}","temperature":{temperature},"humidity":41.2,"ts":"2026-11-22T20:00:00Z"}}"#
        );
        pending.push(
            publisher.publish(
                Message::new()
                    .set_data(body)
                    .set_attributes(HashMap::from([("device_id".to_owned(), device.clone())])),
            ),
        );
    }
    for p in pending {
        p.await?;
    }
    let published = started.elapsed();

    let instance = [("provider", INSTANCE)];
    let samples = loop {
        let samples = Samples::parse(&gw.core.metrics.encode());
        if samples.sum("iotgw_events_acked_total", &instance) >= messages as u64 {
            break samples;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let elapsed = started.elapsed();
    let kind = |k: &str| samples.sum("iotgw_alerts_total", &[("kind", k)]);
    let alerts = kind("primary") + kind("child");
    let duplicates = kind("duplicate");
    let nacked = samples.sum("iotgw_events_nacked_total", &[]);
    let rate = messages as f64 / elapsed.as_secs_f64();
    println!(
        "pubsub_throughput: {messages} messages from {devices} devices, {hot} alerting: published in {:.2} s, \
         all committed and acked in {:.2} s = {rate:.0} messages/s; alerts {alerts} (duplicates {duplicates}), nacks {nacked}",
        published.as_secs_f64(),
        elapsed.as_secs_f64(),
    );
    anyhow::ensure!(
        alerts == hot as u64,
        "expected {hot} alerts (primary + child), got {alerts}"
    );

    gw.stop(Duration::from_secs(5)).await;
    Ok(())
}
