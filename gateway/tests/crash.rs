//! The embedded default's durability promises, through the real binary and a real MQTT
//! 3.1.1 device: a SIGTERM loses no reading the broker PUBACKed, and a `kill -9` loses at
//! most the window the README states (the 1,024 readings in flight to the gateway's
//! session while the gateway keeps up), and never makes a reading count twice.
#![allow(
    clippy::disallowed_methods,
    reason = "test code: plain-HTTP clients against in-process servers and local emulators, no TLS roots or timeouts to configure"
)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use iotgw_registry::{AlertFilter, DeviceId, PageRequest, SqliteStore, Store};
use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};

/// The README's stated crash window: the readings in flight to the gateway's session
/// (`iotgw_providers::mqtt::RECEIVE_MAXIMUM`).
const CRASH_WINDOW: usize = iotgw_providers::mqtt::RECEIVE_MAXIMUM as usize;
const DEVICE: &str = "crash-1";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// A gateway process on the embedded default's shape, on free ports, its store in `dir`.
struct Gateway {
    child: Child,
    api: String,
    v311_port: u16,
    config: PathBuf,
    log: PathBuf,
}

impl Gateway {
    fn config(dir: &Path) -> (PathBuf, String, u16) {
        let ports: BTreeSet<u16> = std::iter::repeat_with(free_port).take(8).collect();
        let mut ports = ports.into_iter();
        let (api, v5, v311) = (
            ports.next().expect("port"),
            ports.next().expect("port"),
            ports.next().expect("port"),
        );
        let path = dir.join("gateway.toml");
        std::fs::write(
            &path,
            format!(
                r#"
[api]
listen = "127.0.0.1:{api}"
[store]
path = "{db}"
[embedded_broker]
enabled = true
port = {v5}
v311_port = {v311}
[providers.local]
kind = "mqtt"
port = {v5}
client_id = "iotgw-crash"
command_correlation = "payload"
[routing]
default = "local"
[rules.hot]
pointer = "/temperature"
op = "gt"
value = 75
description = "hot on {{device_id}}"
[shutdown]
grace_secs = 30
"#,
                db = dir.join("iotgw.db").display()
            ),
        )
        .expect("config written");
        (path, format!("http://127.0.0.1:{api}"), v311)
    }

    async fn start(dir: &Path, config: Option<(PathBuf, String, u16)>) -> Self {
        let (config, api, v311_port) = config.unwrap_or_else(|| Self::config(dir));
        let log = dir.join(format!("gateway-{}.log", free_port()));
        let child = Command::new(env!("CARGO_BIN_EXE_iotgw"))
            .args(["run", "--config"])
            .arg(&config)
            .env("IOTGW_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("iotgw starts");
        let gw = Self {
            child,
            api,
            v311_port,
            config,
            log,
        };
        let http = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(r) = http.get(format!("{}/ready", gw.api)).send().await {
                if r.status() == 200 {
                    break;
                }
            }
            assert!(
                Instant::now() < deadline,
                "not ready in 60 s:\n{}",
                gw.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        gw
    }

    fn again(&self) -> Option<(PathBuf, String, u16)> {
        Some((self.config.clone(), self.api.clone(), self.v311_port))
    }

    fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    async fn register(&self, id: &str) {
        let r = reqwest::Client::new()
            .post(format!("{}/api/v1/devices", self.api))
            .json(&serde_json::json!({"msdyn_deviceid": id}))
            .send()
            .await
            .expect("register");
        assert!(
            r.status().is_success() || r.status() == 409,
            "{}",
            r.status()
        );
    }

    /// SIGTERM, then the exit code.
    fn terminate(mut self) -> i32 {
        let pid = self.child.id().to_string();
        let sent = Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill");
        assert!(sent.success());
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status.code().unwrap_or(-1);
            }
            assert!(
                Instant::now() < deadline,
                "no exit 60 s after SIGTERM:\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL: no drain, no goodbye.
    fn kill_9(mut self) {
        self.child.kill().expect("SIGKILL");
        self.child.wait().expect("reaped");
    }
}

/// Publishes `n` readings as a 3.1.1 device, at most `per_sec` a second (0: as fast as
/// QoS 1 allows), and returns the indexes the broker PUBACKed. With `kill_after`, calls it
/// once that many were PUBACKed and keeps counting until the connection breaks.
async fn publish(
    port: u16,
    n: usize,
    per_sec: u64,
    mut kill_after: Option<(usize, Box<dyn FnOnce() + Send>)>,
) -> BTreeSet<usize> {
    let mut opts = MqttOptions::new(format!("{DEVICE}-device"), "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(10));
    let (client, mut events) = AsyncClient::new(opts, 64);
    let publisher = tokio::spawn(async move {
        let started = Instant::now();
        for i in 0..n {
            if let Some(us) = (i as u64 * 1_000_000).checked_div(per_sec) {
                tokio::time::sleep_until((started + Duration::from_micros(us)).into()).await;
            }
            let body = serde_json::json!({"message_id": format!("r-{i}"), "temperature": 90});
            if client
                .publish(
                    format!("devices/{DEVICE}/telemetry"),
                    QoS::AtLeastOnce,
                    false,
                    body.to_string(),
                )
                .await
                .is_err()
            {
                return;
            }
        }
    });
    // The i-th outgoing PUBLISH is reading i; a PUBACK names its packet id.
    let (mut sent, mut in_flight, mut acked) = (0usize, BTreeMap::new(), BTreeSet::new());
    let deadline = Instant::now() + Duration::from_secs(120);
    while acked.len() < n && Instant::now() < deadline {
        let polled = tokio::time::timeout(Duration::from_secs(5), events.poll()).await;
        match polled {
            Ok(Ok(Event::Outgoing(Outgoing::Publish(pkid)))) => {
                in_flight.insert(pkid, sent);
                sent += 1;
            }
            Ok(Ok(Event::Incoming(Packet::PubAck(ack)))) => {
                if let Some(i) = in_flight.remove(&ack.pkid) {
                    acked.insert(i);
                }
                if kill_after.as_ref().is_some_and(|(k, _)| acked.len() >= *k) {
                    if let Some((_, kill)) = kill_after.take() {
                        kill();
                    }
                }
            }
            Ok(Ok(_)) => {}
            // The gateway is gone (killed): what was PUBACKed is final.
            Ok(Err(_)) | Err(_) => break,
        }
    }
    publisher.abort();
    acked
}

/// The readings committed as alerts in `dir`'s store, by index; panics on a duplicate.
async fn committed(dir: &Path) -> BTreeSet<usize> {
    let store = SqliteStore::open(&dir.join("iotgw.db"))
        .await
        .expect("store");
    let filter = AlertFilter {
        device_id: Some(DeviceId::parse(DEVICE).expect("id")),
        ..AlertFilter::default()
    };
    let (mut found, mut after) = (BTreeSet::new(), None);
    loop {
        let page = store
            .list_alerts(&filter, &PageRequest { after, limit: 1000 })
            .await
            .expect("alerts");
        for a in page.items {
            let i: usize = a
                .alert_token
                .strip_prefix(&format!("local/{DEVICE}/r-"))
                .and_then(|i| i.parse().ok())
                .unwrap_or_else(|| panic!("an alert of no reading: {}", a.alert_token));
            assert!(found.insert(i), "reading {i} counted twice");
        }
        match page.next {
            Some(n) => after = Some(n),
            None => break,
        }
    }
    store.close().await;
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_after_5000_pubacked_readings_commits_every_one_of_them_once() {
    const N: usize = 5_000;
    let dir = tempfile::tempdir().expect("tmp");
    let gw = Gateway::start(dir.path(), None).await;
    gw.register(DEVICE).await;
    let acked = publish(gw.v311_port, N, 0, None).await;
    assert_eq!(acked.len(), N, "every reading PUBACKed");
    let again = gw.again();
    assert_eq!(gw.terminate(), 0, "a SIGTERM stop exits 0");
    assert_eq!(
        committed(dir.path()).await,
        acked,
        "every PUBACKed reading committed"
    );

    let gw = Gateway::start(dir.path(), again).await;
    assert_eq!(gw.terminate(), 0);
    assert_eq!(
        committed(dir.path()).await.len(),
        N,
        "a restart adds nothing twice"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_at_a_random_point_loses_at_most_the_readme_window_and_counts_nothing_twice() {
    const N: usize = 5_000;
    let dir = tempfile::tempdir().expect("tmp");
    let gw = Gateway::start(dir.path(), None).await;
    gw.register(DEVICE).await;
    let again = gw.again();
    let kill_at = 1_000 + rand::random::<usize>() % 3_000;
    // 500 readings a second: well under what even a debug build on a busy CI machine
    // commits, so the broker holds no backlog and the README's window applies.
    let acked = publish(
        gw.v311_port,
        N,
        500,
        Some((kill_at, Box::new(move || gw.kill_9()))),
    )
    .await;
    assert!(
        acked.len() >= kill_at,
        "{} PUBACKed before the kill at {kill_at}",
        acked.len()
    );

    let gw = Gateway::start(dir.path(), again).await;
    assert_eq!(gw.terminate(), 0);
    let stored = committed(dir.path()).await;
    let lost: Vec<_> = acked.difference(&stored).collect();
    eprintln!(
        "kill -9 after {kill_at} PUBACKs: {} PUBACKed, {} committed, {} lost",
        acked.len(),
        stored.len(),
        lost.len()
    );
    assert!(
        lost.len() <= CRASH_WINDOW,
        "{} PUBACKed readings lost, more than the stated window of {CRASH_WINDOW}",
        lost.len()
    );
}
