//! Throughput of the gcp_pubsub provider end to end: messages/s from the official Pub/Sub
//! emulator (in Docker) through streaming pull, the pipeline and the SQLite commit to the
//! ack, with one rule raising alerts on a tenth of them.
//!
//! `cargo bench -p iotgw --features gcp_pubsub --bench pubsub_throughput`
//!
//! Environment: `IOTGW_BENCH_MESSAGES` (default 5000), `IOTGW_BENCH_DEVICES` (default
//! 20). Bounded: fails after 180 s. Skips (prints `SKIPPED: ...`) without Docker, fails
//! under `CI=true`. The recorded figure lives in BENCHMARKS.md
//! (`deploy/examples/gcp_pubsub.BENCH.md` until merged).
#![allow(
    clippy::disallowed_methods,
    reason = "bench: DOCKER_HOST is set once, in main, before any container starts"
)]

use std::collections::HashMap;
use std::time::{Duration, Instant};

use google_cloud_auth::credentials::anonymous;
use google_cloud_pubsub::client::Publisher;
use google_cloud_pubsub::model::Message;
use iotgw::app::{self, StartOptions};
use iotgw::core::RegisterRequest;
use iotgw_config::{CompareOp, Config, GcpPubSubConfig, ProviderConfig, RuleConfig};
use testcontainers::core::{IntoContainerPort, WaitFor};
use testcontainers::runners::AsyncRunner;
use testcontainers::{GenericImage, ImageExt};

mod support;
use support::{env_usize, run_within, Samples};

#[path = "../../tests/src/harness/docker.rs"]
#[allow(dead_code)]
mod docker;

const IMAGE: &str = "gcr.io/google.com/cloudsdktool/google-cloud-cli";
const TAG: &str = "emulators";
const PORT: u16 = 8085;
const PROJECT: &str = "iotgw-bench";
const INSTANCE: &str = "cloud";
const LIMIT: Duration = Duration::from_secs(180);

/// Finds Docker; starts the API-version shim when the engine is older than
/// testcontainers' client. Runs before any other thread exists (it may set DOCKER_HOST).
fn docker_ready() -> Result<Option<tempfile::TempDir>, String> {
    let Ok(ep) = docker::endpoint() else {
        return Ok(None);
    };
    let version = docker::api_version(&ep)?;
    docker::remove_stale(&ep);
    if std::env::var_os("DOCKER_HOST").is_some() || version >= docker::CLIENT_API_VERSION {
        return Ok(None);
    }
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let path = docker::start_shim(ep, version, dir.path()).map_err(|e| e.to_string())?;
    std::env::set_var("DOCKER_HOST", format!("unix://{}", path.display()));
    Ok(Some(dir))
}

fn main() -> anyhow::Result<()> {
    // `cargo bench` passes --bench; `cargo test --all-targets` runs it without: then a
    // short smoke run (200 messages) instead of the measurement.
    if std::env::args().any(|a| a == "--list") {
        return Ok(());
    }
    let smoke = !std::env::args().any(|a| a == "--bench");
    let _shim = match docker_ready() {
        Ok(s) => s,
        Err(why) => {
            let msg =
                format!("the Pub/Sub throughput bench needs Docker, which is unreachable: {why}");
            if std::env::var("CI").is_ok_and(|v| v == "true") {
                anyhow::bail!("CI=true: {msg}");
            }
            println!("SKIPPED: {msg}");
            return Ok(());
        }
    };
    run_within(LIMIT, run(smoke))
}

async fn run(smoke: bool) -> anyhow::Result<()> {
    let messages = env_usize("IOTGW_BENCH_MESSAGES", if smoke { 200 } else { 5000 });
    let devices = env_usize("IOTGW_BENCH_DEVICES", 20).max(1);

    let container = GenericImage::new(IMAGE, TAG)
        .with_exposed_port(PORT.tcp())
        .with_wait_for(WaitFor::message_on_either_std(format!(
            "Server started, listening on {PORT}"
        )))
        .with_cmd([
            "gcloud".to_owned(),
            "beta".into(),
            "emulators".into(),
            "pubsub".into(),
            "start".into(),
            format!("--project={PROJECT}"),
            format!("--host-port=0.0.0.0:{PORT}"),
        ])
        .with_label(docker::LABEL, "1")
        .with_label(docker::LABEL_PID, std::process::id().to_string())
        .with_label(docker::LABEL_HOST, docker::host_name())
        .with_label(docker::LABEL_ROLE, "pubsub/bench")
        .with_startup_timeout(Duration::from_secs(120))
        .start()
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "the Pub/Sub emulator ({IMAGE}:{TAG}) did not start: {e}; without a registry build it with IOTGW_IMAGES=pubsub bash deploy/images/build-local-images.sh"
            )
        })?;
    let host = format!(
        "127.0.0.1:{}",
        container.get_host_port_ipv4(PORT.tcp()).await?
    );

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
        },
    )
    .await?;
    let provider = gw
        .core
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
    container.rm().await?;
    Ok(())
}
