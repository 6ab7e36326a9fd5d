//! How long the console's pages take with a large store: `cargo bench -p iotgw --bench
//! console`. Seeds a SQLite file with `DEVICES` registered devices [100,000] and `ALERTS`
//! alerts [1,000,000] (spread over the first tenth of the devices, several per device and
//! debounce window, so parents with children), then starts the release `iotgw run` on it
//! and times `ROUNDS` [20] GETs of every page over HTTP: p50, p99 and max per page.
//! The target (issue 20) is every page under 200 ms.

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

fn device(i: usize) -> String {
    format!("fleet-{i:06}")
}

fn alert(device: &str, seq: usize, at: chrono::DateTime<Utc>) -> BatchWrite {
    BatchWrite::Telemetry {
        commit: TelemetryCommit {
            device_id: DeviceId::parse(device).expect("valid"),
            received_at: at,
            alerts: vec![NewAlert {
                description: format!("Temperature 80 C above 75 C on {device}"),
                alert_data: format!(r#"{{"temperature":80,"seq":{seq}}}"#),
                alert_time: at,
                alert_token: format!("{device}-{seq}"),
                alert_type: AlertType::Anomaly,
                priority_score: Some(80),
                rule: "hot".into(),
                debounce_key: format!("{device}/hot"),
                command: None,
            }],
            debounce_window: chrono::Duration::minutes(5),
            sinks: Vec::new(),
            readings: Box::default(),
        },
        from: Arrival {
            instance: "local".into(),
            message: NewDeadLetter {
                source: "bench".into(),
                reason: String::new(),
                device_id: Some(device.into()),
                message_id: None,
                payload: String::new(),
            },
        },
        if_unknown: IfUnknown::DeadLetter {
            reason: "unknown".into(),
        },
    }
}

async fn seed(store: &SqliteStore, devices: usize, alerts: usize) {
    let started = Instant::now();
    for chunk in (0..devices).collect::<Vec<_>>().chunks(1000) {
        let new: Vec<NewDevice> = chunk
            .iter()
            .map(|&i| NewDevice {
                name: format!("Chiller {i}"),
                device_id: DeviceId::parse(&device(i)).expect("valid"),
                provider_instance: "local".into(),
                category: Some(if i % 2 == 0 { "chiller" } else { "pump" }.into()),
                account: None,
                settings: None,
                tags: Default::default(),
                is_simulated: IsSimulated::No,
            })
            .collect();
        store.begin_registrations(&new).await.expect("begins");
        let done: Vec<(DeviceId, Result<Option<String>, String>)> = new
            .iter()
            .map(|d| (d.device_id.clone(), Ok(None)))
            .collect();
        store.finish_registrations(&done).await.expect("finishes");
    }
    eprintln!(
        "console bench: {devices} devices registered in {:.1?}",
        started.elapsed()
    );
    let started = Instant::now();
    let with_alerts = (devices / 10).max(1);
    let base = Utc::now() - chrono::Duration::days(30);
    let mut seq = 0;
    while seq < alerts {
        let batch: Vec<BatchWrite> = (0..1000.min(alerts - seq))
            .map(|_| {
                seq += 1;
                let d = device(seq % with_alerts);
                // Every device's alerts a minute apart: bursts of five fold into a parent.
                let at = base + chrono::Duration::minutes((seq / with_alerts) as i64);
                alert(&d, seq, at)
            })
            .collect();
        store.commit_batch(&batch).await.expect("commits");
    }
    eprintln!(
        "console bench: {alerts} alerts committed in {:.1?}",
        started.elapsed()
    );
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

fn main() {
    let devices = env("DEVICES", 100_000);
    let alerts = env("ALERTS", 1_000_000);
    let rounds = env("ROUNDS", 20);
    let dir = tempfile::tempdir().expect("a temp dir");
    let db = dir.path().join("iotgw.db");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    rt.block_on(async {
        let store = SqliteStore::open_with(&db, SqliteDurability::Normal)
            .await
            .expect("the store opens");
        seed(&store, devices, alerts).await;
        store.close().await;
    });
    let (api, broker) = (free_port(), free_port());
    let token = "console-bench-token-0123456789";
    std::fs::write(
        dir.path().join("gw.toml"),
        format!(
            "[api]\nlisten = \"127.0.0.1:{api}\"\ntoken = \"{token}\"\n[store]\npath = \"{}\"\n\
             [embedded_broker]\nenabled = true\nport = {broker}\nv311_port = 0\n\
             [routing]\ndefault = \"local\"\n[providers.local]\nkind = \"mqtt\"\nport = {broker}\n\
             shared_group = \"\"\n",
            db.display()
        ),
    )
    .expect("config");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_iotgw"))
        .args(["run", "--config", "gw.toml"])
        .current_dir(dir.path())
        .env("IOTGW_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("iotgw run starts");
    rt.block_on(async {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .expect("an HTTP client");
        let url = |p: &str| format!("http://127.0.0.1:{api}{p}");
        let deadline = Instant::now() + Duration::from_secs(60);
        while client
            .get(url("/ready"))
            .send()
            .await
            .map(|r| !r.status().is_success())
            .unwrap_or(true)
        {
            assert!(Instant::now() < deadline, "not ready within 60 s");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let cookie = format!("iotgw_token={token}");
        let pages = [
            "/ui".to_owned(),
            "/ui/devices".to_owned(),
            "/ui/devices?category=chiller&status=Registered".to_owned(),
            format!("/ui/devices/{}", device(1)),
            "/ui/alerts".to_owned(),
            format!("/ui/alerts?device={}", device(1)),
            "/ui/dead-letters".to_owned(),
        ];
        println!(
            "console bench: {devices} devices, {alerts} alerts, {rounds} GETs per page (load average {})",
            std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim()
        );
        for page in &pages {
            let mut times = Vec::with_capacity(rounds);
            for _ in 0..rounds {
                let t = Instant::now();
                let r = client
                    .get(url(page))
                    .header("cookie", &cookie)
                    .send()
                    .await
                    .expect("the page answers");
                assert!(r.status().is_success(), "{page}: {}", r.status());
                let body = r.text().await.expect("a body");
                times.push(t.elapsed());
                assert!(body.contains("</html>"), "{page}: a whole page");
            }
            times.sort();
            let at = |p: f64| {
                times[((p * times.len() as f64).ceil() as usize).clamp(1, times.len()) - 1]
            };
            println!(
                "  {page:<50} p50 {:>7.1} ms  p99 {:>7.1} ms  max {:>7.1} ms",
                at(0.5).as_secs_f64() * 1e3,
                at(0.99).as_secs_f64() * 1e3,
                times[times.len() - 1].as_secs_f64() * 1e3
            );
        }
    });
    let _ = child.kill();
    let _ = child.wait();
}
