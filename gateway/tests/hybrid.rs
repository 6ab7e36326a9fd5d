//! Hybrid routing through the real binary: provider instances of different kinds side by
//! side (an `mqtt` instance on Mosquitto and a `gcp_pubsub` instance on the Pub/Sub
//! emulator, or two Mosquitto brokers), real MQTT 3.1.1 devices, the Pub/Sub REST API as
//! the cloud side's devices, and the gateway's HTTP API as the business app.
//!
//! - Devices routed to two clouds get alerts and commands whose records have one shape,
//!   and a reading spoofed through the other cloud is a `wrong_instance` dead letter.
//! - A device moves from one broker to the other while it publishes: every reading is
//!   either committed once or kept as a `wrong_instance` dead letter (those that arrived
//!   through the old broker after the cut-over), and history shows the move.
//! - Failover: with broker A killed, new devices of A's rule go to its fallback B; a
//!   command to a device on A waits and goes out when A returns, or ends in Error after
//!   its TTL.
//! - A command inserted but never published when the gateway is killed (`kill -9`) is sent
//!   after the restart with its original correlation id.
//! - `iotgw simulate --instance NAME --register` on each cloud ([`simulate`]), and the
//!   Azure device SDK's simulator against a stand-in for the hub (`simulate_azure`).
#![allow(
    clippy::disallowed_methods,
    reason = "test code: plain-HTTP clients against local processes and containers"
)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use iotgw_testkit::mosquitto::{Mosquitto, MosquittoSpec};
use iotgw_testkit::wait_for;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::{json, Value};
use tokio::sync::mpsc;

/// `iotgw simulate` on each cloud's emulator, against this file's gateway.
#[path = "hybrid/simulate.rs"]
mod simulate;

/// `iotgw simulate` on an azure_iot_hub instance: what the Azure device SDK sends, checked
/// against a TLS stand-in for the hub's MQTT endpoint.
#[cfg(feature = "azure_device_sim")]
#[path = "hybrid/simulate_azure.rs"]
mod simulate_azure;

/// One `iotgw run` process with its own API port and log file.
struct Gateway {
    child: Option<Child>,
    api: String,
    log: PathBuf,
    http: reqwest::Client,
}

impl Gateway {
    /// Starts the binary on `config` and waits until its API answers `/live` (the
    /// providers may still be connecting).
    async fn start(config: &Path, dir: &Path, port: u16) -> Self {
        let log = dir.join(format!("iotgw-{port}-{}.log", std::process::id()));
        let child = Command::new(env!("CARGO_BIN_EXE_iotgw"))
            .args(["run", "--config"])
            .arg(config)
            .env("IOTGW_API__LISTEN", format!("127.0.0.1:{port}"))
            .env("IOTGW_REPLICA__ID", "hybrid-1")
            .env("IOTGW_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("iotgw starts");
        let mut g = Self {
            child: Some(child),
            api: format!("http://127.0.0.1:{port}"),
            log,
            http: reqwest::Client::new(),
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(r) = g
                .http
                .get(format!("{}/api/v1/providers", g.api))
                .send()
                .await
            {
                if r.status() == 200 {
                    return g;
                }
            }
            if let Some(status) = g.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!("iotgw exited ({status}) before it served\n{}", g.logs());
            }
            assert!(
                Instant::now() < deadline,
                "iotgw did not serve in 60 s\n{}",
                g.logs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn logs(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let from = lines.len().saturating_sub(40);
        format!(
            "--- iotgw log (last lines) ---\n{}",
            lines[from..].join("\n")
        )
    }

    fn kill_9(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().expect("SIGKILL");
            child.wait().expect("reaped");
        }
    }

    async fn get(&self, path: &str) -> (u16, Value) {
        let r = self
            .http
            .get(format!("{}{path}", self.api))
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {path}: {e}\n{}", self.logs()));
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        let r = self
            .http
            .post(format!("{}{path}", self.api))
            .json(&body)
            .send()
            .await
            .unwrap_or_else(|e| panic!("POST {path}: {e}\n{}", self.logs()));
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    async fn register(&self, id: &str, category: &str) -> Value {
        let (status, body) = self
            .post(
                "/api/v1/devices",
                json!({"msdyn_deviceid": id, "msdyn_category": category}),
            )
            .await;
        assert_eq!(status, 201, "registering {id}: {body}\n{}", self.logs());
        body["device"].clone()
    }

    async fn command(&self, id: &str, name: &str) -> Value {
        let (status, body) = self
            .post(
                "/api/v1/commands",
                json!({"msdyn_deviceid": id, "msdyn_name": name, "parameters": {"n": 1}}),
            )
            .await;
        assert_eq!(status, 202, "command to {id}: {body}\n{}", self.logs());
        body
    }

    async fn items(&self, path: &str) -> Vec<Value> {
        let (status, body) = self.get(path).await;
        assert_eq!(status, 200, "GET {path}: {body}");
        body["items"].as_array().cloned().unwrap_or_default()
    }

    /// The provider entry of `/api/v1/providers` named `name`.
    async fn provider(&self, name: &str) -> Value {
        self.items("/api/v1/providers")
            .await
            .into_iter()
            .find(|p| p["name"] == name)
            .unwrap_or_else(|| panic!("provider {name} listed"))
    }

    async fn wait_connected(&self, name: &str) {
        wait_for(
            &format!("provider {name} connected"),
            Duration::from_secs(60),
            || async { (self.provider(name).await["healthy"] == true).then_some(()) },
            || self.logs(),
        )
        .await;
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.kill_9();
    }
}

/// An MQTT 3.1.1 device: publishes readings at QoS 1 (counting the broker's PUBACKs) and
/// hands over the commands it receives (the JSON payloads).
struct Device {
    client: AsyncClient,
    acked: Arc<AtomicUsize>,
    subscribed: Arc<AtomicUsize>,
    sent: usize,
    commands: mpsc::UnboundedReceiver<Value>,
    task: tokio::task::JoinHandle<()>,
}

impl Device {
    /// A device with a clean session: what it missed while disconnected is gone.
    async fn connect(id: &str, port: u16) -> Self {
        Self::start(id, port, true).await
    }

    /// A device that must get the commands sent while it was away: a persistent session
    /// (clean session off) with its QoS 1 subscription, kept by the broker across the
    /// device's reconnects and, with [`saving_broker`], across the broker's restarts. It
    /// returns once the broker confirmed the subscription.
    async fn connect_persistent(id: &str, port: u16) -> Self {
        let device = Self::start(id, port, false).await;
        let subscribed = device.subscribed.clone();
        wait_for(
            &format!("the SUBACK of {id}'s command subscription"),
            Duration::from_secs(20),
            || async { (subscribed.load(Ordering::SeqCst) > 0).then_some(()) },
            String::new,
        )
        .await;
        device
    }

    async fn start(id: &str, port: u16, clean: bool) -> Self {
        let mut opts = MqttOptions::new(format!("device-{id}"), "127.0.0.1", port);
        opts.set_keep_alive(Duration::from_secs(5));
        opts.set_clean_session(clean);
        let (client, mut events) = AsyncClient::new(opts, 64);
        let acked = Arc::new(AtomicUsize::new(0));
        let subscribed = Arc::new(AtomicUsize::new(0));
        let (tx, commands) = mpsc::unbounded_channel();
        let (count, topic) = (acked.clone(), format!("devices/{id}/commands"));
        let subacks = subscribed.clone();
        let subscriber = client.clone();
        let task = tokio::spawn(async move {
            loop {
                match events.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        let _ = subscriber.subscribe(topic.clone(), QoS::AtLeastOnce).await;
                    }
                    Ok(Event::Incoming(Packet::PubAck(_))) => {
                        count.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        subacks.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        if let Ok(v) = serde_json::from_slice::<Value>(&p.payload) {
                            let _ = tx.send(v);
                        }
                    }
                    Ok(_) => {}
                    // The broker went away (a test killed it): try again, as a device does.
                    Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
                }
            }
        });
        Self {
            client,
            acked,
            subscribed,
            sent: 0,
            commands,
            task,
        }
    }

    /// Publishes one reading and waits until the broker confirmed it.
    async fn publish(&mut self, id: &str, message_id: &str, temperature: i64) {
        self.client
            .publish(
                format!("devices/{id}/telemetry"),
                QoS::AtLeastOnce,
                false,
                json!({"message_id": message_id, "temperature": temperature}).to_string(),
            )
            .await
            .expect("publish queued");
        self.sent += 1;
        let want = self.sent;
        let acked = self.acked.clone();
        wait_for(
            &format!("PUBACK of {message_id}"),
            Duration::from_secs(20),
            || async { (acked.load(Ordering::SeqCst) >= want).then_some(()) },
            String::new,
        )
        .await;
    }

    async fn next_command(&mut self, within: Duration) -> Option<Value> {
        tokio::time::timeout(within, self.commands.recv())
            .await
            .ok()
            .flatten()
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A Mosquitto of the test's own (anonymous access, fixed port across restarts).
async fn broker() -> Mosquitto {
    Mosquitto::dedicated(MosquittoSpec::anonymous())
        .await
        .expect("mosquitto starts")
}

/// [`broker`] that writes its sessions to disk after every change, so a `kill -9` keeps
/// them: the persistent sessions of its devices (and their subscriptions) survive the
/// restart and it queues what is published to them meanwhile. Mosquitto's default saves
/// every 30 minutes and on a clean stop only.
async fn saving_broker() -> Mosquitto {
    let mut spec = MosquittoSpec::anonymous();
    spec.extra_config = vec![
        "autosave_interval 1".into(),
        "autosave_on_changes true".into(),
    ];
    Mosquitto::dedicated(spec).await.expect("mosquitto starts")
}

fn mqtt_instance(name: &str, port: u16) -> String {
    format!(
        r#"
[providers.{name}]
kind = "mqtt"
host = "127.0.0.1"
port = {port}
client_id = "iotgw-{name}"
command_correlation = "payload"
reconnect_max_ms = 500
"#
    )
}

/// `[pipeline]`, one rule (hot above 75, with a command) and the store in `dir`.
fn common(dir: &Path) -> String {
    format!(
        r#"
[store]
path = "{}/iotgw.db"
[pipeline]
debounce_window_secs = 3600
[rules.hot]
pointer = "/temperature"
op = "gt"
value = 75
description = "hot on {{device_id}}"
[rules.hot.command]
name = "cool_down"
parameters = {{ target_celsius = 60 }}
[simulate]
devices = 0
"#,
        dir.display()
    )
}

fn write(dir: &Path, text: &str) -> PathBuf {
    let path = dir.join("gateway.toml");
    std::fs::write(&path, text).expect("config written");
    path
}

/// The sorted keys of a JSON object: the record's shape.
#[cfg(feature = "gcp_pubsub")]
fn shape(v: &Value) -> Vec<String> {
    let mut keys: Vec<String> = v
        .as_object()
        .map(|o| o.keys().cloned().collect())
        .unwrap_or_default();
    keys.sort();
    keys
}

// The binary must be built with the gcp_pubsub provider (scripts/test.sh builds every one).
#[cfg(feature = "gcp_pubsub")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_on_two_clouds_get_alerts_and_commands_of_one_shape_and_spoofing_is_refused() {
    use iotgw_testkit::pubsub::{PubSub, Rest};
    iotgw_testkit::init();
    let broker = broker().await;
    let pubsub = PubSub::leased().await.expect("pub/sub emulator");
    let rest = Rest::new(&pubsub.endpoint());
    let tag = format!("hy{}", std::process::id());
    let dir = tempfile::tempdir().expect("dir");
    let config = write(
        dir.path(),
        &format!(
            r#"{common}{plant}
[providers.cloud]
kind = "gcp_pubsub"
project_id = "{project}"
emulator_host = "{emulator}"
create_if_missing = true
command_subscriptions = true
telemetry_topic = "{tag}-telemetry"
telemetry_subscription = "{tag}-telemetry"
commands_topic = "{tag}-commands"
command_subscription_prefix = "{tag}-cmd-"
reply_topic = "{tag}-replies"
reply_subscription = "{tag}-replies"
[routing]
[[routing.rules]]
provider = "plant"
category = "factory"
[[routing.rules]]
provider = "cloud"
category = "field"
"#,
            common = common(dir.path()),
            plant = mqtt_instance("plant", broker.port()),
            project = iotgw_testkit::pubsub::PROJECT,
            emulator = pubsub.emulator_host(),
        ),
    );
    let gw = Gateway::start(&config, dir.path(), iotgw_testkit::free_port()).await;
    gw.wait_connected("plant").await;
    gw.wait_connected("cloud").await;

    let m = gw.register("m-1", "factory").await;
    let g = gw.register("g-1", "field").await;
    assert_eq!(m["msdyn_iotproviderinstance"], "plant", "{m}");
    assert_eq!(g["msdyn_iotproviderinstance"], "cloud", "{g}");
    assert_eq!(shape(&m), shape(&g), "device records of one shape");

    // A hot reading from each: the MQTT device through Mosquitto, the cloud device through
    // Pub/Sub (the device id in the attribute, as its bridge sends it).
    let mut device = Device::connect("m-1", broker.port()).await;
    device.publish("m-1", "m-1-r1", 90).await;
    rest.publish(
        &format!("{tag}-telemetry"),
        json!({"message_id": "g-1-r1", "temperature": 91})
            .to_string()
            .as_bytes(),
        &[("device_id", "g-1")],
    )
    .await
    .expect("publish to pub/sub");

    let alerts = wait_for(
        "one alert per cloud",
        Duration::from_secs(60),
        || async {
            let a = gw.items("/api/v1/alerts").await;
            (a.len() >= 2).then_some(a)
        },
        || gw.logs(),
    )
    .await;
    assert_eq!(alerts.len(), 2, "{alerts:?}");
    assert_eq!(shape(&alerts[0]), shape(&alerts[1]), "alerts of one shape");
    let instances: BTreeSet<_> = alerts
        .iter()
        .map(|a| {
            a["msdyn_iotproviderinstance"]
                .as_str()
                .unwrap_or("")
                .to_owned()
        })
        .collect();
    assert_eq!(
        instances,
        BTreeSet::from(["cloud".to_owned(), "plant".to_owned()])
    );

    // The rule's command reaches each device through its own cloud.
    let on_mqtt = device
        .next_command(Duration::from_secs(30))
        .await
        .unwrap_or_else(|| panic!("the mqtt device got its command\n{}", gw.logs()));
    assert_eq!(on_mqtt["CommandName"], "cool_down", "{on_mqtt}");
    let subscription = format!("{tag}-cmd-g-1");
    let on_cloud = wait_for(
        "the cloud device's command in its subscription",
        Duration::from_secs(30),
        || async {
            let pulled = rest.pull(&subscription, 10).await.ok()?;
            pulled.into_iter().next()
        },
        || gw.logs(),
    )
    .await;
    let body: Value = serde_json::from_slice(&on_cloud.data).expect("command JSON");
    assert_eq!(body["CommandName"], "cool_down", "{body}");
    let commands = wait_for(
        "both commands published",
        Duration::from_secs(30),
        || async {
            let c = gw.items("/api/v1/commands").await;
            (c.len() == 2 && c.iter().all(|c| !c["iotgw_publishedon"].is_null())).then_some(c)
        },
        || gw.logs(),
    )
    .await;
    assert_eq!(
        shape(&commands[0]),
        shape(&commands[1]),
        "commands of one shape"
    );

    // g-1 lives on the cloud instance: the same id through Mosquitto is refused.
    device.publish("g-1", "spoof-1", 99).await;
    let letter = wait_for(
        "the spoofed reading dead-lettered",
        Duration::from_secs(30),
        || async {
            gw.items("/api/v1/dead-letters")
                .await
                .into_iter()
                .find(|d| {
                    d["reason"]
                        .as_str()
                        .is_some_and(|r| r.starts_with("wrong_instance"))
                })
        },
        || gw.logs(),
    )
    .await;
    assert_eq!(letter["device_id"], "g-1", "{letter}");
    assert!(
        letter["reason"]
            .as_str()
            .is_some_and(|r| r.contains("`cloud`") && r.contains("`plant`")),
        "{letter}"
    );
    assert_eq!(
        gw.items("/api/v1/alerts").await.len(),
        2,
        "no alert from the spoof"
    );
    let (_, metrics) = (
        0,
        reqwest::get(format!("{}/metrics", gw.api))
            .await
            .expect("metrics")
            .text()
            .await
            .expect("text"),
    );
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("iotgw_events_rejected_total") && l.contains("wrong_instance")),
        "the refusal is counted"
    );
    broker.remove().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_moves_under_traffic_and_no_reading_is_lost_or_counted_twice() {
    iotgw_testkit::init();
    let a = broker().await;
    let b = broker().await;
    let dir = tempfile::tempdir().expect("dir");
    let config = write(
        dir.path(),
        &format!(
            "{}{}{}\n[routing]\ndefault = \"a\"\n",
            common(dir.path()),
            mqtt_instance("a", a.port()),
            mqtt_instance("b", b.port())
        ),
    );
    let gw = Gateway::start(&config, dir.path(), iotgw_testkit::free_port()).await;
    gw.wait_connected("a").await;
    gw.wait_connected("b").await;
    gw.register("mv-1", "pumps").await;

    // Every reading is hot: each one is an alert (the first a primary, the rest its
    // children), so a lost reading is a missing alert and a doubled one a second alert.
    let mut on_a = Device::connect("mv-1", a.port()).await;
    let mut seq = 0;
    let mut through_a = Vec::new();
    for _ in 0..30 {
        seq += 1;
        on_a.publish("mv-1", &format!("r-{seq:03}"), 90).await;
        through_a.push(format!("r-{seq:03}"));
    }
    // The move runs while the device keeps publishing to A.
    let moving = {
        let http = gw.http.clone();
        let url = format!("{}/api/v1/devices/mv-1/move", gw.api);
        tokio::spawn(async move {
            let r = http
                .post(url)
                .json(&json!({"to": "b"}))
                .send()
                .await
                .expect("move");
            (
                r.status().as_u16(),
                r.json::<Value>().await.expect("move answer"),
            )
        })
    };
    while !moving.is_finished() {
        seq += 1;
        on_a.publish("mv-1", &format!("r-{seq:03}"), 90).await;
        through_a.push(format!("r-{seq:03}"));
    }
    let (status, moved) = moving.await.expect("move task");
    assert_eq!(status, 200, "{moved}\n{}", gw.logs());
    assert_eq!(moved["from"], "a");
    assert_eq!(moved["device"]["msdyn_iotproviderinstance"], "b");
    assert_eq!(moved["source_unregistered"], true);
    // Late readings through the old instance, after the cut-over.
    let mut late = Vec::new();
    for _ in 0..5 {
        seq += 1;
        on_a.publish("mv-1", &format!("r-{seq:03}"), 90).await;
        late.push(format!("r-{seq:03}"));
    }
    drop(on_a);
    let mut on_b = Device::connect("mv-1", b.port()).await;
    let mut through_b = Vec::new();
    for _ in 0..30 {
        seq += 1;
        on_b.publish("mv-1", &format!("r-{seq:03}"), 90).await;
        through_b.push(format!("r-{seq:03}"));
    }

    let total = through_a.len() + late.len() + through_b.len();
    let (alerts, letters) = wait_for(
        "every reading committed or dead-lettered",
        Duration::from_secs(60),
        || async {
            let alerts = gw.items("/api/v1/alerts?limit=1000").await;
            let letters = gw.items("/api/v1/dead-letters?limit=1000").await;
            (alerts.len() + letters.len() >= total).then_some((alerts, letters))
        },
        || gw.logs(),
    )
    .await;
    let tokens: Vec<String> = alerts
        .iter()
        .map(|a| a["msdyn_alerttoken"].as_str().unwrap_or("").to_owned())
        .collect();
    let distinct: BTreeSet<&String> = tokens.iter().collect();
    assert_eq!(distinct.len(), tokens.len(), "no alert doubled: {tokens:?}");
    let dead: BTreeSet<String> = letters
        .iter()
        .map(|d| {
            assert!(
                d["reason"]
                    .as_str()
                    .is_some_and(|r| r.starts_with("wrong_instance")),
                "{d}"
            );
            d["message_id"].as_str().unwrap_or("").to_owned()
        })
        .collect();
    let alerted = |m: &String| tokens.iter().any(|t| t.contains(m.as_str()));
    let kept = |m: &String| dead.iter().any(|d| d.contains(m.as_str()));
    for m in through_a.iter().chain(&late).chain(&through_b) {
        assert!(
            alerted(m) ^ kept(m),
            "{m} is committed once or kept as a dead letter, never both or neither"
        );
    }
    assert!(
        late.iter().all(kept),
        "late readings through A are wrong_instance dead letters"
    );
    assert!(
        through_b.iter().all(alerted),
        "every reading through B is committed"
    );
    assert_eq!(alerts.len() + letters.len(), total, "nothing extra");
    let history: Vec<(String, String)> = gw
        .items("/api/v1/devices/mv-1/history")
        .await
        .iter()
        .map(|h| {
            (
                h["msdyn_action"]
                    .as_str()
                    .unwrap_or(&h["msdyn_action"].to_string())
                    .to_owned(),
                h["msdyn_iotproviderinstance"]
                    .as_str()
                    .unwrap_or("")
                    .to_owned(),
            )
        })
        .collect();
    assert_eq!(history.len(), 3, "{history:?}");
    assert_eq!(history[1].1, "a", "Deactivate on the source: {history:?}");
    assert_eq!(history[2].1, "b", "Register on the target: {history:?}");
    a.remove().await;
    b.remove().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "the waiting command must go out before its 15 s TTL, counted from before broker A restarts: under the parallel load of a cold CI run a container start can take most of that; scripts/test.sh runs it alone after the parallel run (QUIET_INTEGRATION)"]
async fn with_a_broker_down_new_devices_fail_over_and_commands_wait_for_it_or_expire() {
    iotgw_testkit::init();
    let a = saving_broker().await;
    let b = broker().await;
    let dir = tempfile::tempdir().expect("dir");
    let config = write(
        dir.path(),
        &format!(
            r#"{}{}{}
[routing]
default = "b"
[[routing.rules]]
provider = "a"
category = "pumps"
fallback = ["b"]
[health]
failover_after_secs = 2
optional = ["a"]
[commands]
ttl_secs = 15
retry_secs = 1
"#,
            common(dir.path()),
            mqtt_instance("a", a.port()),
            mqtt_instance("b", b.port())
        ),
    );
    let gw = Gateway::start(&config, dir.path(), iotgw_testkit::free_port()).await;
    gw.wait_connected("a").await;
    gw.wait_connected("b").await;
    let first = gw.register("p-1", "pumps").await;
    assert_eq!(first["msdyn_iotproviderinstance"], "a");
    let mut device = Device::connect_persistent("p-1", a.port()).await;

    a.kill().await.expect("kill broker a");
    let down = wait_for(
        "instance a failed over",
        Duration::from_secs(30),
        || async {
            let p = gw.provider("a").await;
            (p["failed_over"] == true).then_some(p)
        },
        || gw.logs(),
    )
    .await;
    assert_eq!(down["healthy"], false, "{down}");
    assert_eq!(down["required"], false, "{down}");
    assert_eq!(down["devices"], 1, "{down}");
    let (ready, report) = gw.get("/ready").await;
    assert_eq!(
        ready, 200,
        "an optional instance down keeps the gateway ready: {report}"
    );
    assert!(
        report["degraded"].to_string().contains("provider a"),
        "{report}"
    );

    let second = gw.register("p-2", "pumps").await;
    assert_eq!(
        second["msdyn_iotproviderinstance"], "b",
        "new devices go to the fallback"
    );

    // A command to p-1 while A is down waits and then expires after its TTL.
    let expiring = gw.command("p-1", "too_late").await;
    let id = expiring["msdyn_iotdevicecommandid"]
        .as_str()
        .expect("id")
        .to_owned();
    let waiting = wait_for(
        "the command waits with the reason",
        Duration::from_secs(10),
        || async {
            let (_, c) = gw.get(&format!("/api/v1/commands/{id}")).await;
            c["msdyn_commandstatusreason"]
                .as_str()
                .is_some_and(|r| r.contains("unreachable"))
                .then_some(c)
        },
        || gw.logs(),
    )
    .await;
    assert_eq!(
        waiting["msdyn_commandstatus"], 192_350_000,
        "still In Progress: {waiting}"
    );
    assert!(waiting["iotgw_publishedon"].is_null());
    let expired = wait_for(
        "the command ends in Error after its TTL",
        Duration::from_secs(40),
        || async {
            let (_, c) = gw.get(&format!("/api/v1/commands/{id}")).await;
            (c["msdyn_commandstatus"] == 192_350_002).then_some(c)
        },
        || gw.logs(),
    )
    .await;
    assert!(
        expired["msdyn_commandstatusreason"]
            .as_str()
            .is_some_and(|r| r.starts_with("instance a unreachable for")),
        "{expired}"
    );

    // A second command waits for A, and goes out once A is back.
    let waits = gw.command("p-1", "reboot").await;
    let correlation = waits["iotgw_correlationid"]
        .as_str()
        .expect("correlation")
        .to_owned();
    tokio::time::sleep(Duration::from_secs(2)).await; // it is In Progress meanwhile
    a.start_again().await.expect("broker a back");
    let got = device
        .next_command(Duration::from_secs(30))
        .await
        .unwrap_or_else(|| panic!("the waiting command reached the device\n{}", gw.logs()));
    assert_eq!(got["CommandName"], "reboot", "{got}");
    assert_eq!(got["correlation_id"], correlation.as_str(), "{got}");
    assert!(
        device.next_command(Duration::from_secs(2)).await.is_none(),
        "the expired command is never sent"
    );

    // With A back, the operator moves the failed-over pumps home with the bulk move.
    gw.wait_connected("a").await;
    let out = Command::new(env!("CARGO_BIN_EXE_iotgw"))
        .args([
            "devices",
            "move",
            "--category",
            "pumps",
            "--from",
            "b",
            "--to",
            "a",
        ])
        .args(["--url", &gw.api])
        .output()
        .expect("iotgw devices move runs");
    let summary = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{summary}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        summary.starts_with("1 device(s) selected: 1 moved to a, 0 already there, 0 failed"),
        "{summary}"
    );
    let (_, back) = gw.get("/api/v1/devices/p-2").await;
    assert_eq!(back["msdyn_iotproviderinstance"], "a", "{back}");
    a.remove().await;
    b.remove().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_never_published_before_a_kill_is_sent_after_the_restart() {
    iotgw_testkit::init();
    let broker = saving_broker().await;
    let dir = tempfile::tempdir().expect("dir");
    let config = write(
        dir.path(),
        &format!(
            "{}{}\n[routing]\ndefault = \"plant\"\n[commands]\nretry_secs = 1\n",
            common(dir.path()),
            mqtt_instance("plant", broker.port())
        ),
    );
    let port = iotgw_testkit::free_port();
    let mut gw = Gateway::start(&config, dir.path(), port).await;
    gw.wait_connected("plant").await;
    gw.register("k-1", "pumps").await;
    let mut device = Device::connect_persistent("k-1", broker.port()).await;

    // With the broker gone the gateway cannot publish: the command is stored, In
    // Progress, never published, when the gateway is killed.
    broker.kill().await.expect("kill the broker");
    wait_for(
        "the gateway sees the broker gone",
        Duration::from_secs(30),
        || async { (gw.provider("plant").await["healthy"] == false).then_some(()) },
        || gw.logs(),
    )
    .await;
    let cmd = gw.command("k-1", "reboot").await;
    let (id, correlation) = (
        cmd["msdyn_iotdevicecommandid"]
            .as_str()
            .expect("id")
            .to_owned(),
        cmd["iotgw_correlationid"]
            .as_str()
            .expect("correlation")
            .to_owned(),
    );
    let (_, stored) = gw.get(&format!("/api/v1/commands/{id}")).await;
    assert!(stored["iotgw_publishedon"].is_null(), "{stored}");
    gw.kill_9();

    broker.start_again().await.expect("broker back");
    let gw = Gateway::start(&config, dir.path(), port).await;
    let got = device
        .next_command(Duration::from_secs(30))
        .await
        .unwrap_or_else(|| {
            panic!(
                "the command reached the device after the restart\n{}",
                gw.logs()
            )
        });
    assert_eq!(got["CommandName"], "reboot", "{got}");
    assert_eq!(
        got["correlation_id"],
        correlation.as_str(),
        "the same correlation id: {got}"
    );
    let published = wait_for(
        "the command recorded as published",
        Duration::from_secs(10),
        || async {
            let (_, c) = gw.get(&format!("/api/v1/commands/{id}")).await;
            (!c["iotgw_publishedon"].is_null()).then_some(c)
        },
        || gw.logs(),
    )
    .await;
    assert_eq!(
        published["msdyn_commandstatus"], 192_350_000,
        "In Progress until the device answers"
    );
    assert!(
        device.next_command(Duration::from_secs(2)).await.is_none(),
        "sent once"
    );
    broker.remove().await;
}

/// A webhook receiver that records the idempotency key (the alert id) of each request.
async fn hook() -> (u16, Arc<std::sync::Mutex<Vec<String>>>) {
    let seen: Arc<std::sync::Mutex<Vec<String>>> = Arc::default();
    let keys = seen.clone();
    let app = axum::Router::new().route(
        "/alerts",
        axum::routing::post(move |headers: axum::http::HeaderMap| {
            let keys = keys.clone();
            async move {
                if let Some(k) = headers
                    .get(iotgw::sinks::IDEMPOTENCY_HEADER)
                    .and_then(|v| v.to_str().ok())
                {
                    keys.lock().expect("hook").push(k.to_owned());
                }
                axum::http::StatusCode::OK
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("hook listens");
    let port = listener.local_addr().expect("addr").port();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (port, seen)
}

fn reload_config(dir: &Path, mqtt_port: u16, threshold: i64, hook: Option<u16>) -> String {
    let mut text = format!(
        r#"
[store]
path = "{}/iotgw.db"
[pipeline]
debounce_window_secs = 3600
[rules.hot]
pointer = "/temperature"
op = "gt"
value = {threshold}
description = "hot on {{device_id}}"
[simulate]
devices = 0
[routing]
default = "plant"
{}"#,
        dir.display(),
        mqtt_instance("plant", mqtt_port)
    );
    if let Some(port) = hook {
        text.push_str(&format!(
            "[sinks.hook]\nkind = \"webhook\"\nurl = \"http://127.0.0.1:{port}/alerts\"\nbackoff_min_ms = 100\nbackoff_max_ms = 1000\n"
        ));
    }
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_config_file_applies_new_rules_and_sinks_within_2_s_and_a_typo_is_refused() {
    iotgw_testkit::init();
    let broker = broker().await;
    let dir = tempfile::tempdir().expect("dir");
    let config = write(
        dir.path(),
        &reload_config(dir.path(), broker.port(), 75, None),
    );
    let gw = Gateway::start(&config, dir.path(), iotgw_testkit::free_port()).await;
    gw.wait_connected("plant").await;
    gw.register("r-1", "pumps").await;
    gw.register("r-2", "pumps").await;
    let version = |v: &Value| v["version"].as_u64().unwrap_or(0);
    assert_eq!(version(&gw.get("/api/v1/config/version").await.1), 1);
    let alert_of = |message_id: &str| {
        let message_id = message_id.to_owned();
        let gw = &gw;
        async move {
            gw.items("/api/v1/alerts?limit=1000")
                .await
                .into_iter()
                .find(|a| {
                    a["msdyn_alerttoken"]
                        .as_str()
                        .is_some_and(|t| t.contains(&message_id))
                })
        }
    };

    // Background traffic from r-2 through the whole test: every reading is hot under
    // both thresholds, so each must end up as exactly one alert.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let background = {
        let (stop, port) = (stop.clone(), broker.port());
        tokio::spawn(async move {
            let mut d = Device::connect("r-2", port).await;
            let mut sent = 0;
            while !stop.load(Ordering::SeqCst) {
                sent += 1;
                d.publish("r-2", &format!("bg-{sent:04}"), 99).await;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            sent
        })
    };

    let mut device = Device::connect("r-1", broker.port()).await;
    device.publish("r-1", "m-1", 80).await;
    wait_for(
        "m-1's alert (80 > 75)",
        Duration::from_secs(20),
        || alert_of("m-1"),
        || gw.logs(),
    )
    .await;

    // The new file: a higher threshold and a webhook sink.
    let (hook_port, hooked) = hook().await;
    std::fs::write(
        &config,
        reload_config(dir.path(), broker.port(), 85, Some(hook_port)),
    )
    .expect("config rewritten");
    let written = Instant::now();
    wait_for(
        "version 2 live",
        Duration::from_secs(10),
        || async { (version(&gw.get("/api/v1/config/version").await.1) == 2).then_some(()) },
        || gw.logs(),
    )
    .await;
    let took = written.elapsed();
    assert!(took < Duration::from_secs(2), "the reload took {took:?}");
    device.publish("r-1", "m-2", 80).await;
    device.publish("r-1", "m-3", 90).await;
    let m3 = wait_for(
        "m-3's alert (90 > 85)",
        Duration::from_secs(20),
        || alert_of("m-3"),
        || gw.logs(),
    )
    .await;
    assert!(
        alert_of("m-2").await.is_none(),
        "80 is below the new threshold"
    );
    let m3_id = m3["msdyn_iotalertid"]
        .as_str()
        .expect("alert id")
        .to_owned();
    wait_for(
        "the new sink received m-3's alert",
        Duration::from_secs(20),
        || async { hooked.lock().expect("hook").contains(&m3_id).then_some(()) },
        || gw.logs(),
    )
    .await;

    // A typo: refused whole, named, counted; the running configuration stays.
    let typo = reload_config(dir.path(), broker.port(), 70, Some(hook_port))
        .replace("op = \"gt\"", "op = \"gt\"\nthreshhold = 1");
    std::fs::write(&config, typo).expect("typo written");
    let refused = wait_for(
        "the typo refused",
        Duration::from_secs(10),
        || async {
            let (_, v) = gw.get("/api/v1/config/version").await;
            (v["last_reload"]["outcome"] == "refused").then_some(v)
        },
        || gw.logs(),
    )
    .await;
    assert_eq!(version(&refused), 2, "{refused}");
    assert!(
        refused["last_reload"]["problems"]
            .to_string()
            .contains("rules.hot.threshhold"),
        "{refused}"
    );
    let metrics = reqwest::get(format!("{}/metrics", gw.api))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics text");
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("iotgw_config_reloads_total{outcome=\"refused\"} ")),
        "{metrics}"
    );
    device.publish("r-1", "m-4", 80).await;
    device.publish("r-1", "m-5", 90).await;
    wait_for(
        "m-5's alert (the old rule still runs)",
        Duration::from_secs(20),
        || alert_of("m-5"),
        || gw.logs(),
    )
    .await;
    assert!(
        alert_of("m-4").await.is_none(),
        "threshold 85 still applies, not the typo's 70"
    );

    stop.store(true, Ordering::SeqCst);
    let sent = background.await.expect("background publisher");
    let committed = wait_for(
        "every background reading committed",
        Duration::from_secs(30),
        || async {
            let n = gw
                .items("/api/v1/alerts?device_id=r-2&limit=1000")
                .await
                .len();
            (n >= sent).then_some(n)
        },
        || gw.logs(),
    )
    .await;
    assert_eq!(
        committed, sent,
        "one alert per background reading, none lost across two reloads"
    );
    broker.remove().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_added_in_the_file_starts_and_a_removed_one_drains_before_it_stops() {
    iotgw_testkit::init();
    let a = broker().await;
    let b = broker().await;
    let dir = tempfile::tempdir().expect("dir");
    let only_a = format!(
        "{}{}\n[routing]\ndefault = \"a\"\n",
        common(dir.path()),
        mqtt_instance("a", a.port())
    );
    let config = write(dir.path(), &only_a);
    let gw = Gateway::start(&config, dir.path(), iotgw_testkit::free_port()).await;
    gw.wait_connected("a").await;
    gw.register("x-1", "pumps").await;
    let version = |v: &Value| v["version"].as_u64().unwrap_or(0);
    let wait_version = |n: u64| {
        let gw = &gw;
        async move {
            wait_for(
                &format!("config version {n}"),
                Duration::from_secs(30),
                || async {
                    (version(&gw.get("/api/v1/config/version").await.1) == n).then_some(())
                },
                || gw.logs(),
            )
            .await;
        }
    };

    // Add instance b with a rule that places "bees" there.
    std::fs::write(
        &config,
        format!(
            "{}{}{}\n[routing]\ndefault = \"a\"\n[[routing.rules]]\nprovider = \"b\"\ncategory = \"bees\"\n",
            common(dir.path()),
            mqtt_instance("a", a.port()),
            mqtt_instance("b", b.port())
        ),
    )
    .expect("config with b");
    wait_version(2).await;
    gw.wait_connected("b").await;
    let y = gw.register("y-1", "bees").await;
    assert_eq!(y["msdyn_iotproviderinstance"], "b", "{y}");
    let mut on_b = Device::connect("y-1", b.port()).await;
    on_b.publish("y-1", "y-r1", 90).await;

    // Readings the broker confirmed to x-1 on A, then A removed at once: they are
    // committed before A's loop stops.
    let mut on_a = Device::connect("x-1", a.port()).await;
    for n in 0..20 {
        on_a.publish("x-1", &format!("x-r{n:02}"), 90).await;
    }
    std::fs::write(
        &config,
        format!(
            "{}{}\n[routing]\ndefault = \"b\"\n",
            common(dir.path()),
            mqtt_instance("b", b.port())
        ),
    )
    .expect("config without a");
    wait_version(3).await;
    let removed = wait_for(
        "instance a gone from the providers",
        Duration::from_secs(30),
        || async {
            let names: Vec<Value> = gw
                .items("/api/v1/providers")
                .await
                .into_iter()
                .map(|p| p["name"].clone())
                .collect();
            (!names.contains(&json!("a"))).then_some(names)
        },
        || gw.logs(),
    )
    .await;
    assert_eq!(removed, vec![json!("b")]);
    let x_alerts = wait_for(
        "x-1's readings committed",
        Duration::from_secs(30),
        || async {
            let n = gw
                .items("/api/v1/alerts?device_id=x-1&limit=1000")
                .await
                .len();
            (n >= 20).then_some(n)
        },
        || gw.logs(),
    )
    .await;
    assert_eq!(
        x_alerts, 20,
        "every reading A confirmed before its removal is committed once"
    );
    let y_alerts = gw.items("/api/v1/alerts?device_id=y-1").await;
    assert_eq!(
        y_alerts.len(),
        1,
        "the added instance's reading: {y_alerts:?}"
    );
    assert!(
        !gw.logs().contains("with events in flight"),
        "A drained before it stopped\n{}",
        gw.logs()
    );
    a.remove().await;
    b.remove().await;
}
