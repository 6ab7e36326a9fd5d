//! What one group-commit transaction costs in the embedded store, apart from MQTT, the
//! pipeline and the machine's other processes: `cargo bench -p iotgw-registry --bench
//! commit_batch`.
//!
//! The shape is the end-to-end bench's stage (d) (`scripts/bench-e2e.sh`): 10 devices,
//! readings spread evenly over them, one in ten raising an alert that debounces into its
//! device's burst. A batch of `EVENTS` readings is committed `BATCHES` times on a SQLite
//! file in WAL mode; the figures are per transaction (p50, p99, max) and events/s.
//!
//! Environment: `EVENTS` per batch [80], `BATCHES` [400], `DEVICES` [10], `MEASURES` kept
//! as readings per event [2, as the end-to-end bench's payload has: temperature, sent_us;
//! 0: readings off].

use std::time::{Duration, Instant};

use chrono::Utc;
use iotgw_registry::{
    AlertType, Arrival, BatchWrite, DeviceId, IfUnknown, IsSimulated, NewAlert, NewDeadLetter,
    NewDevice, SqliteDurability, SqliteStore, Store, TelemetryCommit,
};

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn reading(device: &str, seq: usize, alert: bool, measures: usize) -> BatchWrite {
    let device_id = DeviceId::parse(device).expect("bench device ids are valid");
    let now = Utc::now();
    let alerts = if alert {
        vec![NewAlert {
            description: format!("{device} temperature above 75"),
            alert_data: format!(r#"{{"temperature":80,"message_id":"{device}-{seq}"}}"#),
            alert_time: now,
            alert_token: format!("{device}-{seq}-hot"),
            alert_type: AlertType::Anomaly,
            priority_score: Some(50),
            rule: "hot".into(),
            debounce_key: format!("{device}/hot"),
            command: None,
        }]
    } else {
        Vec::new()
    };
    BatchWrite::Telemetry {
        commit: TelemetryCommit {
            device_id,
            received_at: now,
            alerts,
            debounce_window: chrono::Duration::minutes(5),
            sinks: Vec::new(),
            readings: Box::new(iotgw_registry::Readings {
                at: now,
                message_id: format!("{device}-{seq}"),
                measures: (0..measures)
                    .map(|m| (format!("/m{m}"), (seq % 97) as f64))
                    .collect(),
            }),
        },
        from: Arrival {
            instance: "mqtt".into(),
            message: NewDeadLetter {
                source: "bench".into(),
                reason: String::new(),
                device_id: Some(device.into()),
                message_id: None,
                payload: String::new(),
            },
        },
        if_unknown: IfUnknown::DeadLetter {
            reason: "unknown device".into(),
        },
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let k = ((p / 100.0) * sorted.len() as f64).ceil().max(1.0) as usize;
    sorted[k - 1]
}

fn main() {
    let events = env("EVENTS", 80);
    let batches = env("BATCHES", 400);
    let devices = env("DEVICES", 10);
    let measures = env("MEASURES", 2);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    rt.block_on(async {
        let dir = tempfile::tempdir().expect("a temp dir");
        let durability = match std::env::var("SYNCHRONOUS").as_deref() {
            Ok("normal") => SqliteDurability::Normal,
            _ => SqliteDurability::Full,
        };
        let store = SqliteStore::open_with(&dir.path().join("bench.db"), durability)
            .await
            .expect("the store opens");
        let names: Vec<String> = (0..devices).map(|d| format!("bench-device-{d}")).collect();
        for name in &names {
            let id = DeviceId::parse(name).expect("valid");
            store
                .begin_registration(&NewDevice {
                    name: name.clone(),
                    device_id: id.clone(),
                    provider_instance: "mqtt".into(),
                    category: None,
                    account: None,
                    settings: None,
                    tags: Default::default(),
                    is_simulated: IsSimulated::No,
                })
                .await
                .expect("registers");
            store
                .finish_registration(&id, Ok(None))
                .await
                .expect("finishes");
        }
        let mut seq = 0usize;
        let mut times = Vec::with_capacity(batches);
        let started = Instant::now();
        for _ in 0..batches {
            let writes: Vec<BatchWrite> = (0..events)
                .map(|i| {
                    seq += 1;
                    reading(&names[i % devices], seq, seq.is_multiple_of(10), measures)
                })
                .collect();
            let t = Instant::now();
            store
                .commit_batch(&writes)
                .await
                .expect("the batch commits");
            times.push(t.elapsed());
        }
        let total = started.elapsed();
        times.sort();
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        println!(
            "commit_batch sqlite (synchronous={durability:?}): {batches} batches of {events} events over {devices} devices, \
             {measures} readings each, \
             10 % alerts: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms per transaction; \
             {:.0} events/s",
            ms(percentile(&times, 50.0)),
            ms(percentile(&times, 99.0)),
            ms(*times.last().expect("at least one batch")),
            (batches * events) as f64 / total.as_secs_f64(),
        );
        store.close().await;
    });
}
