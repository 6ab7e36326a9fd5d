//! The per-message work of the pipeline before the store commit: size check, JSON parse,
//! three rules, debounce key and alert construction. No I/O.
//!
//! Target (BENCHMARKS.md): at least 250,000 messages/s on one core for a 200-byte message
//! and 3 rules.

use bytes::Bytes;
use chrono::Utc;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use iotgw::pipeline::prepare;
use iotgw::rules::RuleSet;
use iotgw_providers::Telemetry;
use iotgw_registry::DeviceId;

const CONFIG: &str = r#"
[pipeline]
debounce_fields = ["rule", "/sensor"]
[rules.high_temperature]
pointer = "/temperature"
op = "gt"
value = 75
description = "Temperature {value} above 75 on {device_id}"
[rules.low_pressure]
pointer = "/pressure/value"
op = "lt"
value = 0.8
alert_type = "Preventive Maintenance"
description = "Pressure {value} low on {device_id}"
[rules.door_open]
pointer = "/door"
op = "eq"
value = "open"
alert_type = "Info"
description = "Door open on {device_id}"
"#;

fn message(temp: f64) -> Bytes {
    let body = format!(
        r#"{{"message_id":"5f0c1a9e-2b7d-4c1e-9a3f-0d2e4b6c8a10","sensor":"s-17","temperature":{temp:.1},"humidity":41.2,"pressure":{{"value":1.02,"unit":"bar"}},"door":"closed","fw":"2.4.1","ts":"2026-11-22T20:00:00Z"}}"#
    );
    Bytes::from(body)
}

fn bench(c: &mut Criterion) {
    let cfg: iotgw_config::Config = toml::from_str(CONFIG).expect("bench config");
    let rules = RuleSet::new(&cfg);
    let device = DeviceId::parse("pump-0001").expect("id");
    let quiet = message(61.5);
    let alerting = message(80.5);
    assert!(
        (195..=210).contains(&quiet.len()),
        "message is {} bytes",
        quiet.len()
    );

    let mut g = c.benchmark_group("pipeline_prepare");
    g.throughput(Throughput::Elements(1));
    for (name, payload) in [
        ("200B_3rules_no_alert", quiet),
        ("200B_3rules_one_alert", alerting),
    ] {
        let t = Telemetry {
            device_id: "pump-0001".into(),
            message_id: "m-1".into(),
            payload,
            received_at: Utc::now(),
        };
        g.bench_function(name, |b| {
            b.iter_batched_ref(
                || t.clone(),
                |t| prepare(&rules, "local", &device, t, 256 * 1024).expect("valid"),
                BatchSize::SmallInput,
            )
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
