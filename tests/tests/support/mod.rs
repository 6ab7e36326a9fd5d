//! Test support of the end-to-end tests: an in-process gateway on its embedded broker, a
//! recording webhook receiver and MQTT 5 device clients. The API client and the waits
//! (conditions with deadlines) come from the `iotgw-tests` library.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use iotgw::app::{self, RunningGateway, StartOptions};
use iotgw_config::{
    CommandDefinitionConfig, Config, DataverseDeviceBinding, DataverseSinkConfig, MqttConfig,
    PropertyDefinitionConfig, PropertyType, ProviderConfig, RuleCommandConfig, RuleConfig, Secret,
    SinkConfig, WebhookSinkConfig,
};
use rumqttc::v5::mqttbytes::v5::{Packet, PublishProperties};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use serde_json::Value;
use tokio::sync::mpsc;

mod dataverse;

pub use dataverse::{FakeDataverse, DATAVERSE_TOKEN_PATH};
pub use iotgw_tests::api::{metric, Api};
pub use iotgw_tests::wait::{free_port, wait_for, DEADLINE};

/// The shared secret the test webhook checks signatures with.
pub const HOOK_SECRET: &str = "s3cret-for-tests";

/// What a test gateway looks like.
#[derive(Default)]
pub struct GatewayOptions {
    /// Webhook sink URL (sink name `hook`).
    pub webhook: Option<String>,
    /// The webhook sink's `entities` (not given: the new alerts only).
    pub webhook_entities: Option<Vec<String>>,
    /// Base URL of a fake Dataverse environment and token endpoint (sink name `d365`).
    pub dataverse: Option<String>,
    /// The dataverse sink's `entities` (not given: the new alerts only).
    pub dataverse_entities: Option<Vec<String>>,
    /// Keep the SQLite file here (to restart on it).
    pub data_dir: Option<PathBuf>,
    /// API bearer token.
    pub token: Option<String>,
    /// The mqtt provider's payload limit.
    pub max_payload_bytes: Option<usize>,
}

/// A running in-process gateway.
pub struct Gateway {
    running: Option<RunningGateway>,
    /// The embedded broker's port (MQTT 5).
    pub broker_port: u16,
    /// The embedded broker's MQTT 3.1.1 port.
    pub v311_port: u16,
    token: Option<String>,
    _tmp: Option<tempfile::TempDir>,
}

/// The test config: embedded broker on a free port, mqtt provider `local`, a
/// temperature rule with a `cool_down` command, optional webhook sink `hook`.
pub fn test_config(
    opts: &GatewayOptions,
    data_dir: &std::path::Path,
    broker_port: u16,
    v311_port: u16,
) -> Config {
    let mut c = Config::default();
    c.store.path = data_dir.join("iotgw.db").display().to_string();
    c.embedded_broker.enabled = true;
    c.embedded_broker.port = broker_port;
    c.embedded_broker.v311_port = v311_port;
    // A command definition whose parameter sits in an object: `set_threshold` takes
    // `{"settings": {"threshold": <Decimal>}}`, for chillers; and a reported property.
    let property = |kind, parent: Option<&str>, unit: Option<&str>| PropertyDefinitionConfig {
        kind,
        unit: unit.map(str::to_owned),
        parent: parent.map(str::to_owned),
        description: String::new(),
    };
    c.definitions.properties.insert(
        "settings".into(),
        property(PropertyType::Object, None, None),
    );
    c.definitions.properties.insert(
        "threshold".into(),
        property(PropertyType::Decimal, Some("settings"), Some("°C")),
    );
    c.definitions.properties.insert(
        "firmware".into(),
        property(PropertyType::String, None, None),
    );
    c.definitions.commands.insert(
        "set_threshold".into(),
        CommandDefinitionConfig {
            description: "the temperature above which the chiller starts".into(),
            parameters: vec!["threshold".into()],
            required: vec!["threshold".into()],
            categories: vec!["chiller".into()],
        },
    );
    // As in the embedded default: no shared subscription on rumqttd (see Config::embedded_default).
    let mut mqtt = MqttConfig {
        port: broker_port,
        client_id: format!("iotgw-test-{broker_port}"),
        shared_group: String::new(),
        // As in the embedded default: 3.1.1 devices read the id from the payload.
        command_correlation: iotgw_config::CommandCorrelation::Payload,
        ..MqttConfig::default()
    };
    if let Some(max) = opts.max_payload_bytes {
        mqtt.max_payload_bytes = max;
    }
    c.providers
        .insert("local".into(), ProviderConfig::Mqtt(mqtt));
    c.routing.default = Some("local".into());
    c.rules.insert(
        "high_temperature".into(),
        RuleConfig {
            pointer: "/temperature".into(),
            op: iotgw_config::CompareOp::Gt,
            value: Some(serde_json::json!(75)),
            alert_type: "Anomaly".into(),
            description: "Temperature {value} on {device_id}".into(),
            priority: Some(70),
            command: Some(RuleCommandConfig {
                name: "cool_down".into(),
                parameters: serde_json::json!({"target_celsius": 60}),
            }),
        },
    );
    if let Some(url) = &opts.webhook {
        c.sinks.insert(
            "hook".into(),
            SinkConfig::Webhook(WebhookSinkConfig {
                url: iotgw_config::SecretUrl::new(url.clone()),
                secret: Some(Secret::new(HOOK_SECRET)),
                timeout_ms: 2_000,
                backoff_min_ms: 50,
                backoff_max_ms: 300,
                retry_statuses: vec![401, 403, 404],
                retry_statuses_for_secs: 3600,
                entities: opts.webhook_entities.clone(),
                coalesce_connection_ms: iotgw_config::default_coalesce_connection(),
            }),
        );
    }
    if let Some(base) = &opts.dataverse {
        c.sinks.insert(
            "d365".into(),
            SinkConfig::Dataverse(DataverseSinkConfig {
                url: base.clone(),
                tenant_id: "contoso.onmicrosoft.com".into(),
                client_id: "11111111-2222-3333-4444-555555555555".into(),
                client_secret: Some(Secret::new("dataverse-test-secret")),
                client_certificate: None,
                client_certificate_key: None,
                token_url: Some(format!("{base}{DATAVERSE_TOKEN_PATH}")),
                scope: None,
                device_binding: DataverseDeviceBinding::Id,
                timeout_ms: 2_000,
                backoff_min_ms: 50,
                backoff_max_ms: 300,
                entities: opts.dataverse_entities.clone(),
                coalesce_connection_ms: iotgw_config::default_coalesce_connection(),
                batch_size: iotgw_config::default_dataverse_batch_size(),
                provider_instances: Default::default(),
            }),
        );
    }
    c.api.token = opts.token.clone().map(Secret::new);
    c
}

impl Gateway {
    /// Starts a gateway and waits until `/ready` says so.
    pub async fn start(opts: GatewayOptions) -> Self {
        let tmp = if opts.data_dir.is_none() {
            Some(tempfile::tempdir().expect("temp dir"))
        } else {
            None
        };
        let dir = opts
            .data_dir
            .clone()
            .unwrap_or_else(|| tmp.as_ref().expect("tmp").path().to_owned());
        // The broker's ports are found free and released before the gateway binds them, so
        // a test running beside this one can take one in between: start again on new
        // ports then (a few times), as a user would after "is another broker running".
        let mut attempt = 0;
        let (running, broker_port, v311_port) = loop {
            attempt += 1;
            let broker_port = free_port();
            let v311_port = std::iter::repeat_with(free_port)
                .find(|p| *p != broker_port)
                .expect("a second free port");
            let config = test_config(&opts, &dir, broker_port, v311_port);
            let problems = iotgw_config::validate::validate(&config, &app::built_kinds());
            assert!(problems.is_empty(), "test config invalid: {problems:?}");
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            match app::start(
                config,
                StartOptions {
                    api_listener: Some(listener),
                    ..StartOptions::default()
                },
            )
            .await
            {
                Ok(running) => break (running, broker_port, v311_port),
                Err(e) if attempt < 5 && format!("{e:#}").contains("Address already in use") => {
                    eprintln!("gateway start, attempt {attempt}: {e:#}; new ports");
                }
                Err(e) => panic!("gateway starts: {e:?}"),
            }
        };
        let gw = Self {
            running: Some(running),
            broker_port,
            v311_port,
            token: opts.token,
            _tmp: tmp,
        };
        let api = gw.api();
        wait_for("the gateway to be ready", || async {
            (api.get("/ready").await.0 == 200).then_some(())
        })
        .await;
        gw
    }

    /// The API address.
    pub fn api_addr(&self) -> SocketAddr {
        self.running.as_ref().expect("running").api_addr
    }

    /// An API client.
    pub fn api(&self) -> Api {
        Api::new(format!("http://{}", self.api_addr()), self.token.clone())
    }

    /// Graceful stop with a 5 s grace.
    pub async fn stop(self) {
        self.stop_with_grace(Duration::from_secs(5)).await;
    }

    /// Graceful stop with the given grace.
    pub async fn stop_with_grace(mut self, grace: Duration) {
        if let Some(r) = self.running.take() {
            r.stop(grace).await;
        }
    }
}

/// One request the webhook accepted.
#[derive(Debug, Clone)]
pub struct Post {
    /// Idempotency-Key header.
    pub idempotency_key: String,
    /// Whether X-Iotgw-Signature matched HMAC-SHA256(secret, body).
    pub signature_valid: bool,
    /// The JSON body.
    pub body: Value,
}

#[derive(Default)]
struct HookState {
    down: bool,
    /// Answered instead of accepting (e.g. 410 Gone, which dead-letters at once).
    refuse_with: Option<StatusCode>,
    accepted: Vec<Post>,
    refused: usize,
}

/// A recording webhook receiver on loopback; can be switched "down" (503).
pub struct Webhook {
    addr: SocketAddr,
    state: Arc<Mutex<HookState>>,
}

async fn receive(
    State(state): State<Arc<Mutex<HookState>>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> StatusCode {
    let mut s = state.lock().expect("lock");
    if s.down {
        s.refused += 1;
        return StatusCode::SERVICE_UNAVAILABLE;
    }
    if let Some(status) = s.refuse_with {
        s.refused += 1;
        return status;
    }
    let header = |n: &str| {
        headers
            .get(n)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    };
    let expected = iotgw::sinks::signature(HOOK_SECRET.as_bytes(), &body);
    s.accepted.push(Post {
        idempotency_key: header("idempotency-key"),
        signature_valid: header("x-iotgw-signature") == expected,
        body: serde_json::from_slice(&body).unwrap_or(Value::Null),
    });
    StatusCode::OK
}

impl Webhook {
    /// Starts the receiver.
    pub async fn start() -> Self {
        let state = Arc::new(Mutex::new(HookState::default()));
        let app = axum::Router::new()
            .route("/hook", post(receive))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move { axum::serve(listener, app).await.expect("webhook server") });
        Self { addr, state }
    }

    /// Its URL.
    pub fn url(&self) -> String {
        format!("http://{}/hook", self.addr)
    }

    /// Switches 503 answers on or off.
    pub fn set_down(&self, down: bool) {
        self.state.lock().expect("lock").down = down;
    }

    /// Answers every request with `status` (`None`: accepts again).
    pub fn refuse_with(&self, status: Option<StatusCode>) {
        self.state.lock().expect("lock").refuse_with = status;
    }

    /// Requests accepted so far.
    pub fn accepted(&self) -> Vec<Post> {
        self.state.lock().expect("lock").accepted.clone()
    }

    /// Requests refused so far.
    pub fn refused(&self) -> usize {
        self.state.lock().expect("lock").refused
    }
}

/// A command as a device received it.
#[derive(Debug, Clone)]
pub struct ReceivedCommand {
    /// The JSON message.
    pub body: Value,
    /// Correlation data.
    pub correlation: String,
}

/// An MQTT 5 device client on the default topic scheme.
pub struct Device {
    id: String,
    client: AsyncClient,
    commands: mpsc::Receiver<ReceivedCommand>,
    _task: tokio::task::JoinHandle<()>,
}

impl Device {
    /// Connects as `id` and subscribes to its command topic; returns once subscribed.
    pub async fn connect(port: u16, id: &str) -> Self {
        let mut opts = MqttOptions::new(format!("{id}-dev-{}", free_port()), "127.0.0.1", port);
        opts.set_keep_alive(Duration::from_secs(10));
        let (client, mut events) = AsyncClient::new(opts, 64);
        let (tx, commands) = mpsc::channel(16);
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        client
            .subscribe(format!("devices/{id}/commands"), QoS::AtLeastOnce)
            .await
            .expect("subscribe queued");
        let task = tokio::spawn(async move {
            let mut ready = Some(ready_tx);
            loop {
                match events.poll().await {
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        if let Some(r) = ready.take() {
                            let _ = r.send(());
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let body: Value = serde_json::from_slice(&p.payload).unwrap_or(Value::Null);
                        // MQTT 5 correlation data, else the payload's field (the embedded
                        // default's `command_correlation = "payload"`).
                        let correlation = p
                            .properties
                            .as_ref()
                            .and_then(|pr| pr.correlation_data.clone())
                            .map(|b| String::from_utf8_lossy(&b).into_owned())
                            .or_else(|| body["correlation_id"].as_str().map(str::to_owned))
                            .unwrap_or_default();
                        if tx
                            .send(ReceivedCommand { body, correlation })
                            .await
                            .is_err()
                        {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        tokio::time::timeout(DEADLINE, ready_rx)
            .await
            .expect("device subscribed in time")
            .expect("device task alive");
        Self {
            id: id.to_string(),
            client,
            commands,
            _task: task,
        }
    }

    /// Publishes JSON telemetry on the device's telemetry topic (QoS 1).
    pub async fn publish_telemetry(&mut self, body: Value) {
        let topic = format!("devices/{}/telemetry", self.id);
        self.publish_raw(&topic, body.to_string().into_bytes())
            .await;
    }

    /// Publishes raw bytes on any topic (QoS 1).
    pub async fn publish_raw(&mut self, topic: &str, payload: Vec<u8>) {
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload)
            .await
            .expect("publish queued");
    }

    /// Whether a command arrives within `wait` (for a device that must get none).
    pub async fn command_within(&mut self, wait: Duration) -> Option<ReceivedCommand> {
        tokio::time::timeout(wait, self.commands.recv())
            .await
            .ok()
            .flatten()
    }

    /// The next command, failing the test after [`DEADLINE`].
    pub async fn next_command(&mut self) -> ReceivedCommand {
        tokio::time::timeout(DEADLINE, self.commands.recv())
            .await
            .expect("a command in time")
            .expect("device task alive")
    }

    /// Answers a command on the reply topic.
    pub async fn reply(&mut self, cmd: &ReceivedCommand, ok: bool) {
        self.reply_to(&cmd.correlation, ok).await;
    }

    /// Answers the command that `correlation` names (its correlation data, or its id).
    pub async fn reply_to(&mut self, correlation: &str, ok: bool) {
        let body = if ok {
            serde_json::json!({"correlation_id": correlation, "status": "ok"})
        } else {
            serde_json::json!({"correlation_id": correlation, "status": "error", "reason": "refused by test device"})
        };
        let props = PublishProperties {
            correlation_data: Some(correlation.to_owned().into_bytes().into()),
            ..Default::default()
        };
        self.client
            .publish_with_properties(
                format!("devices/{}/replies", self.id),
                QoS::AtLeastOnce,
                false,
                body.to_string(),
                props,
            )
            .await
            .expect("reply queued");
    }
}

/// An MQTT 3.1.1 device client (rumqttc's v4 client: no properties at all), on the
/// default topic scheme. It learns a command's correlation id from the payload's
/// `correlation_id` field, the only place a 3.1.1 device can read it.
pub struct Device311 {
    id: String,
    client: rumqttc::AsyncClient,
    commands: mpsc::Receiver<ReceivedCommand>,
    _task: tokio::task::JoinHandle<()>,
}

impl Device311 {
    /// Connects as `id` to the 3.1.1 port and subscribes to its command topic.
    pub async fn connect(port: u16, id: &str) -> Self {
        use rumqttc::{Event as E4, Packet as P4};
        let mut opts =
            rumqttc::MqttOptions::new(format!("{id}-dev311-{}", free_port()), "127.0.0.1", port);
        opts.set_keep_alive(Duration::from_secs(10));
        opts.set_max_packet_size(1024 * 1024, 1024 * 1024);
        let (client, mut events) = rumqttc::AsyncClient::new(opts, 64);
        let (tx, commands) = mpsc::channel(16);
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        client
            .subscribe(format!("devices/{id}/commands"), rumqttc::QoS::AtLeastOnce)
            .await
            .expect("subscribe queued");
        let task = tokio::spawn(async move {
            let mut ready = Some(ready_tx);
            loop {
                match events.poll().await {
                    Ok(E4::Incoming(P4::SubAck(_))) => {
                        if let Some(r) = ready.take() {
                            let _ = r.send(());
                        }
                    }
                    Ok(E4::Incoming(P4::Publish(p))) => {
                        let body: Value = serde_json::from_slice(&p.payload).unwrap_or(Value::Null);
                        let correlation = body["correlation_id"]
                            .as_str()
                            .unwrap_or_default()
                            .to_owned();
                        if tx
                            .send(ReceivedCommand { body, correlation })
                            .await
                            .is_err()
                        {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        tokio::time::timeout(DEADLINE, ready_rx)
            .await
            .expect("3.1.1 device subscribed in time")
            .expect("device task alive");
        Self {
            id: id.to_string(),
            client,
            commands,
            _task: task,
        }
    }

    /// Publishes JSON telemetry (QoS 1).
    pub async fn publish_telemetry(&mut self, body: Value) {
        self.publish_raw(body.to_string().into_bytes()).await;
    }

    /// Publishes raw bytes on the telemetry topic (QoS 1).
    pub async fn publish_raw(&mut self, payload: Vec<u8>) {
        self.client
            .publish(
                format!("devices/{}/telemetry", self.id),
                rumqttc::QoS::AtLeastOnce,
                false,
                payload,
            )
            .await
            .expect("publish queued");
    }

    /// The next command, failing the test after [`DEADLINE`].
    pub async fn next_command(&mut self) -> ReceivedCommand {
        tokio::time::timeout(DEADLINE, self.commands.recv())
            .await
            .expect("a command in time")
            .expect("device task alive")
    }

    /// Answers a command with its correlation id in the reply payload.
    pub async fn reply(&mut self, cmd: &ReceivedCommand, ok: bool) {
        let body = if ok {
            serde_json::json!({"correlation_id": cmd.correlation, "status": "ok"})
        } else {
            serde_json::json!({"correlation_id": cmd.correlation, "status": "error", "reason": "refused by a 3.1.1 device"})
        };
        self.client
            .publish(
                format!("devices/{}/replies", self.id),
                rumqttc::QoS::AtLeastOnce,
                false,
                body.to_string(),
            )
            .await
            .expect("reply queued");
    }
}

/// `value` with what changes from run to run replaced: UUIDs by `<uuid>`, RFC 3339 times
/// by `<time>` (as keys, `<time #n>` in order), and the values of `volatile` keys by
/// `<KEY>`.
pub fn normalized(value: &Value, volatile: &[&str]) -> Value {
    match value {
        Value::String(s) if uuid::Uuid::parse_str(s).is_ok() => Value::String("<uuid>".into()),
        Value::String(s) if chrono::DateTime::parse_from_rfc3339(s).is_ok() => {
            Value::String("<time>".into())
        }
        Value::Array(items) => {
            Value::Array(items.iter().map(|v| normalized(v, volatile)).collect())
        }
        Value::Object(m) => {
            // Time keys (bucket starts) become `<time #n>` in their order.
            let mut times = 0;
            Value::Object(
                m.iter()
                    .map(|(k, v)| {
                        let v = if volatile.contains(&k.as_str()) && !v.is_null() {
                            Value::String(format!("<{k}>"))
                        } else {
                            normalized(v, volatile)
                        };
                        let key = if chrono::DateTime::parse_from_rfc3339(k).is_ok() {
                            times += 1;
                            format!("<time #{times}>")
                        } else {
                            normalized_key(k)
                        };
                        (key, v)
                    })
                    .collect(),
            )
        }
        other => other.clone(),
    }
}

fn normalized_key(k: &str) -> String {
    if uuid::Uuid::parse_str(k).is_ok() {
        "<uuid>".into()
    } else {
        k.to_owned()
    }
}

/// Compares `value` (normalized) with the golden file `tests/golden/NAME.json`; with
/// `GOLDEN_UPDATE=1` in the environment, writes it instead. The golden files are the
/// Field Service actions' response JSON as CFS receives it, field for field.
pub fn assert_golden(name: &str, value: &Value, volatile: &[&str]) {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("golden")
        .join(format!("{name}.json"));
    let got = serde_json::to_string_pretty(&normalized(value, volatile)).expect("json") + "\n";
    if std::env::var("GOLDEN_UPDATE").as_deref() == Ok("1") {
        std::fs::create_dir_all(path.parent().expect("dir")).expect("golden dir");
        std::fs::write(&path, &got).expect("golden written");
        return;
    }
    let want = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e}; write it with GOLDEN_UPDATE=1 and review it",
            path.display()
        )
    });
    assert_eq!(
        got,
        want,
        "{} differs (GOLDEN_UPDATE=1 rewrites it; review the diff)",
        path.display()
    );
}
