//! The configuration structs. Field docs are the user documentation.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// A secret value: never printed; `config show` writes it as `<redacted>`.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret.
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }
    /// The secret itself, for the one place that needs it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("<redacted>")
    }
}

/// The whole configuration.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// HTTP API and admin endpoints.
    pub api: ApiConfig,
    /// Where the registry lives.
    pub store: StoreConfig,
    /// Telemetry processing.
    pub pipeline: PipelineConfig,
    /// Which provider instance hosts a new device.
    pub routing: RoutingConfig,
    /// Provider instances by name.
    pub providers: BTreeMap<String, ProviderConfig>,
    /// Alert rules by name, evaluated in name order.
    pub rules: BTreeMap<String, RuleConfig>,
    /// Alert sinks by name.
    pub sinks: BTreeMap<String, SinkConfig>,
    /// The in-process MQTT broker.
    pub embedded_broker: EmbeddedBrokerConfig,
    /// Simulated devices started with the gateway.
    pub simulate: SimulateConfig,
    /// Shutdown behaviour.
    pub shutdown: ShutdownConfig,
    /// Readiness (`/ready`) policy.
    pub health: HealthConfig,
}

impl Config {
    /// The largest `max_payload_bytes` of the mqtt provider instances (0 without any).
    pub fn largest_mqtt_payload(&self) -> usize {
        self.providers
            .values()
            .filter_map(|p| match p {
                ProviderConfig::Mqtt(m) => Some(m.max_payload_bytes),
                _ => None,
            })
            .max()
            .unwrap_or(0)
    }

    /// The packet limit the embedded broker applies: `embedded_broker.max_packet_bytes`,
    /// or (0) four times the largest mqtt `max_payload_bytes`, at least 256 KiB of it.
    pub fn embedded_max_packet(&self) -> usize {
        match self.embedded_broker.max_packet_bytes {
            0 => self.largest_mqtt_payload().max(256 * 1024) * 4,
            n => n,
        }
    }

    /// What `iotgw run` uses without a config file: an in-process broker on loopback, the
    /// mqtt provider on it, SQLite under `data/`, the API on loopback, a sample rule,
    /// alerts printed as JSON lines and three simulated devices.
    pub fn embedded_default() -> Self {
        let mut c = Self::default();
        c.embedded_broker.enabled = true;
        c.providers.insert(
            "local".into(),
            // No shared subscription on the embedded broker: only one gateway uses it, and
            // rumqttd 0.20 mishandles shared subscriptions of persistent sessions.
            // The correlation id in the payload, without MQTT 5 properties: 3.1.1 devices
            // (the broker's second listener) cannot read correlation data, and rumqttd 0.20
            // cannot forward a publish with properties to a 3.1.1 client (its v4 writer
            // panics and the 3.1.1 listener dies).
            ProviderConfig::Mqtt(MqttConfig {
                port: c.embedded_broker.port,
                shared_group: String::new(),
                command_correlation: CommandCorrelation::Payload,
                ..MqttConfig::default()
            }),
        );
        c.routing.default = Some("local".into());
        c.rules.insert(
            "high_temperature".into(),
            RuleConfig {
                pointer: "/temperature".into(),
                op: CompareOp::Gt,
                value: Some(serde_json::json!(75.0)),
                alert_type: "Anomaly".into(),
                description: "Temperature {value} C above 75 C on {device_id}".into(),
                priority: Some(80),
                command: Some(RuleCommandConfig {
                    name: "cool_down".into(),
                    parameters: serde_json::json!({"target_celsius": 60}),
                }),
            },
        );
        c.sinks
            .insert("stdout".into(), SinkConfig::Stdout(StdoutSinkConfig {}));
        c.simulate.devices = 3;
        c
    }
}

/// HTTP API settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiConfig {
    /// Address to listen on. A non-loopback address requires `token`.
    pub listen: String,
    /// Bearer token every request must carry (`Authorization: Bearer ...`). Required when
    /// `listen` is not a loopback address; optional on loopback.
    pub token: Option<Secret>,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".into(),
            token: None,
        }
    }
}

/// Store backend.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// `sqlite` (embedded file, the default) or `postgres` (a shared database, for several
    /// replicas; set `[store.postgres]`).
    pub kind: StoreKind,
    /// SQLite database file; its directory is created when missing.
    pub path: String,
    /// The PostgreSQL store (`kind = "postgres"`): URL, pool, timeouts, TLS.
    pub postgres: Option<crate::postgres::PostgresStoreConfig>,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            kind: StoreKind::Sqlite,
            path: "data/iotgw.db".into(),
            postgres: None,
        }
    }
}

/// Store kinds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StoreKind {
    /// SQLite file in WAL mode.
    Sqlite,
    /// PostgreSQL, shared by several replicas (`[store.postgres]`).
    Postgres,
}

/// What to do with telemetry from a device the registry does not know.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UnknownDevicePolicy {
    /// Record it in the dead letters with the reason.
    DeadLetter,
    /// Add the device with registration status Unknown and process the message.
    AutoRegister,
}

/// Telemetry processing.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PipelineConfig {
    /// Telemetry from unknown devices: `dead_letter` or `auto_register`.
    pub unknown_devices: UnknownDevicePolicy,
    /// Debounce window in seconds (Field Service passes 60): a second alert from the same
    /// device with the same matching fields inside it becomes a child of the first.
    pub debounce_window_secs: u64,
    /// What besides the device must match for debounce: `rule`, `alert_type`, or a JSON
    /// pointer into the telemetry (e.g. `/sensor`).
    pub debounce_fields: Vec<String>,
    /// Events buffered between the providers and the pipeline (back-pressure beyond it).
    pub queue_capacity: usize,
    /// Group commit: at most this many events are committed in one store transaction
    /// (then every one of them is acknowledged).
    pub batch_max_events: usize,
    /// Group commit: how long a batch that is not full waits for more events, in
    /// milliseconds (0: commit what is waiting at once). It bounds the latency batching adds.
    pub batch_max_wait_ms: u64,
    /// Property name of the command name in a command message (Field Service setting).
    pub command_name_property: String,
    /// Property name of the parameters in a command message (Field Service setting).
    pub command_parameters_property: String,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        Self {
            unknown_devices: UnknownDevicePolicy::DeadLetter,
            debounce_window_secs: 60,
            debounce_fields: vec!["rule".into()],
            queue_capacity: 1024,
            batch_max_events: 512,
            batch_max_wait_ms: 5,
            command_name_property: "CommandName".into(),
            command_parameters_property: "Parameters".into(),
        }
    }
}

/// Routing of new devices to provider instances.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RoutingConfig {
    /// Instance used when no rule matches (and no instance is named in the request).
    pub default: Option<String>,
    /// Rules tried in order; the first match wins.
    pub rules: Vec<RouteRule>,
}

/// One routing rule: every matcher given must match.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteRule {
    /// The provider instance to use.
    pub provider: String,
    /// Matches the device's category.
    pub category: Option<String>,
    /// Matches a tag: `key` (present) or `key=value`.
    pub tag: Option<String>,
    /// Matches the device id: a glob with `*` and `?`.
    pub id_pattern: Option<String>,
}

/// A provider instance: `kind` picks the cloud, the other keys are its settings.
#[allow(clippy::large_enum_variant)] // a handful per process, read once at start-up
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ProviderConfig {
    /// Plain MQTT 5 broker.
    Mqtt(MqttConfig),
    /// AWS IoT Core.
    AwsIotCore(crate::aws_iot_core::AwsIotCoreConfig),
    /// GCP Pub/Sub.
    GcpPubsub(crate::gcp_pubsub::GcpPubSubConfig),
    /// Azure IoT Hub.
    AzureIotHub(crate::azure_iot_hub::AzureIotHubConfig),
}

impl ProviderConfig {
    /// The `kind` spelling.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Mqtt(_) => "mqtt",
            Self::AwsIotCore(_) => "aws_iot_core",
            Self::GcpPubsub(_) => "gcp_pubsub",
            Self::AzureIotHub(_) => "azure_iot_hub",
        }
    }
}

/// Plain MQTT 5 provider.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqttConfig {
    /// Broker host.
    pub host: String,
    /// Broker port.
    pub port: u16,
    /// Client id of the gateway; it names the broker-side persistent session, so each
    /// replica needs its own (e.g. `IOTGW_PROVIDERS__<NAME>__CLIENT_ID=iotgw-2`).
    pub client_id: String,
    /// Broker user name.
    pub username: Option<String>,
    /// Broker password.
    pub password: Option<Secret>,
    /// Topic devices publish telemetry to; `{device_id}` is one whole topic level.
    pub telemetry_topic: String,
    /// Retained status topic (`online`/`offline` or JSON `{"connected":bool,"at":time}`),
    /// also the devices' last-will topic.
    pub status_topic: String,
    /// Topic commands are published to (QoS 1).
    pub command_topic: String,
    /// Topic devices answer commands on: `{"correlation_id":..., "status":"ok"|"error", "reason":...}`.
    pub reply_topic: String,
    /// Topic devices publish reported properties to (JSON object).
    pub reported_topic: String,
    /// Shared-subscription group (`$share/<group>/...`) so several gateway replicas split
    /// the telemetry. Empty (the default) subscribes without sharing: the broker keeps the
    /// subscription in the gateway's persistent session, so nothing published while the
    /// gateway or the broker restarts is lost. Mosquitto 2.0 does not keep shared
    /// subscriptions across a broker restart: with a group, messages published between the
    /// broker's restart and the gateway's re-subscription are not delivered.
    pub shared_group: String,
    /// Largest telemetry payload processed; larger ones are dead-lettered.
    pub max_payload_bytes: usize,
    /// Keep-alive in seconds.
    pub keep_alive_secs: u64,
    /// First reconnect delay in milliseconds (doubles up to `reconnect_max_ms`).
    pub reconnect_min_ms: u64,
    /// Longest reconnect delay in milliseconds.
    pub reconnect_max_ms: u64,
    /// JSON pointer of a message id inside the payload, used when the message carries no
    /// MQTT 5 `message_id` user property. Device-chosen ids are prefixed with the device id
    /// (`pump-1:m-7`) to make the alert token unique; without either, the token is a hash
    /// of topic and payload (two byte-identical readings then count as one).
    pub message_id_pointer: String,
    /// Mosquitto dynamic security: create broker credentials and ACLs per device.
    pub dynsec: Option<DynsecConfig>,
    /// Where a command's correlation id travels to the device: `properties` (MQTT 5
    /// correlation data and user properties), `payload` (a top-level `"correlation_id"`
    /// field added to the JSON command, and no MQTT 5 properties at all), or `both`. A
    /// device that speaks MQTT 3.1.1 has no properties: it needs `payload` or `both`, and
    /// echoes the id in its reply. The stored command message is unchanged.
    pub command_correlation: CommandCorrelation,
}

impl Default for MqttConfig {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".into(),
            port: 1883,
            client_id: "iotgw".into(),
            username: None,
            password: None,
            telemetry_topic: "devices/{device_id}/telemetry".into(),
            status_topic: "devices/{device_id}/status".into(),
            command_topic: "devices/{device_id}/commands".into(),
            reply_topic: "devices/{device_id}/replies".into(),
            reported_topic: "devices/{device_id}/reported".into(),
            shared_group: String::new(),
            max_payload_bytes: 256 * 1024,
            keep_alive_secs: 30,
            reconnect_min_ms: 100,
            reconnect_max_ms: 10_000,
            message_id_pointer: "/message_id".into(),
            dynsec: None,
            command_correlation: CommandCorrelation::Properties,
        }
    }
}

/// Where an mqtt command's correlation id travels (`providers.NAME.command_correlation`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CommandCorrelation {
    /// MQTT 5 correlation data and user properties (MQTT 5 devices only).
    #[default]
    Properties,
    /// A `"correlation_id"` field in the JSON payload, no MQTT 5 properties (any device,
    /// any broker, MQTT 3.1.1 included).
    Payload,
    /// Both: MQTT 5 devices read the properties, 3.1.1 devices the payload field (for a
    /// broker that strips properties towards 3.1.1 clients, such as Mosquitto).
    Both,
}

/// Mosquitto dynamic-security plugin administration.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DynsecConfig {
    /// Admin user allowed to publish to `$CONTROL/dynamic-security/#`.
    pub admin_username: String,
    /// Its password.
    pub admin_password: Secret,
    /// Prefix of the per-device role names.
    #[serde(default = "default_role_prefix")]
    pub role_prefix: String,
}

fn default_role_prefix() -> String {
    "iotgw-device-".into()
}

/// Comparison of a rule.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CompareOp {
    /// Greater than.
    Gt,
    /// Greater or equal.
    Ge,
    /// Less than.
    Lt,
    /// Less or equal.
    Le,
    /// Equal (numbers, strings, booleans).
    Eq,
    /// Not equal.
    Ne,
    /// The pointer resolves to anything.
    Exists,
}

/// An alert rule over JSON telemetry.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    /// JSON pointer into the telemetry, e.g. `/temperature`.
    pub pointer: String,
    /// `gt`, `ge`, `lt`, `le`, `eq`, `ne` or `exists`.
    pub op: CompareOp,
    /// The value compared against (not used by `exists`).
    pub value: Option<serde_json::Value>,
    /// `Anomaly`, `Info`, `Preventive Maintenance` or `Test`.
    #[serde(default = "default_alert_type")]
    pub alert_type: String,
    /// Description template; `{device_id}`, `{value}` and `{rule}` are filled in (cut to 100 characters).
    pub description: String,
    /// Priority score 0..=100.
    pub priority: Option<u8>,
    /// A command sent in response; the alert becomes Command Sent or Command Failed.
    pub command: Option<RuleCommandConfig>,
}

fn default_alert_type() -> String {
    "Anomaly".into()
}

/// A command a rule sends in response.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleCommandConfig {
    /// Command name.
    pub name: String,
    /// Parameters (any JSON).
    #[serde(default)]
    pub parameters: serde_json::Value,
}

/// An alert sink: `kind` picks it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum SinkConfig {
    /// JSON lines on standard output.
    Stdout(StdoutSinkConfig),
    /// JSON lines appended to a file.
    File(FileSinkConfig),
    /// HTTP POST with retries, an idempotency key and an HMAC signature.
    Webhook(WebhookSinkConfig),
}

/// Standard output sink (no settings).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StdoutSinkConfig {}

/// File sink.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSinkConfig {
    /// File to append JSON lines to (created with its directory).
    pub path: String,
}

/// Webhook sink.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookSinkConfig {
    /// `http://` or `https://` URL to POST each alert to.
    pub url: String,
    /// Shared secret: the body is signed with HMAC-SHA256 into `X-Iotgw-Signature: sha256=<hex>`.
    pub secret: Option<Secret>,
    /// Per-request timeout in milliseconds.
    #[serde(default = "default_webhook_timeout")]
    pub timeout_ms: u64,
    /// First retry delay in milliseconds (doubles per attempt).
    #[serde(default = "default_backoff_min")]
    pub backoff_min_ms: u64,
    /// Longest retry delay in milliseconds; a sink that is down is retried forever at this pace.
    #[serde(default = "default_backoff_max")]
    pub backoff_max_ms: u64,
}

const fn default_webhook_timeout() -> u64 {
    5_000
}
const fn default_backoff_min() -> u64 {
    200
}
const fn default_backoff_max() -> u64 {
    30_000
}

/// The in-process MQTT broker (rumqttd) used by the embedded default.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EmbeddedBrokerConfig {
    /// Start it.
    pub enabled: bool,
    /// Loopback address it listens on.
    pub host: String,
    /// Port of its MQTT 5 listener (the gateway's own session and MQTT 5 devices).
    pub port: u16,
    /// Port of its MQTT 3.1.1 listener, for devices that speak 3.1.1 (most field devices);
    /// 0 turns it off. One port cannot serve both versions on this broker (rumqttd): a
    /// 3.1.1 device on the MQTT 5 port is closed without a CONNACK.
    pub v311_port: u16,
    /// Largest MQTT packet the broker reads from a device, in bytes. Keep it well above the
    /// mqtt provider's `max_payload_bytes`, so an oversize reading reaches the gateway and
    /// becomes a dead letter with the reason; a bigger packet makes the broker close the
    /// device's connection. 0 = four times the largest `max_payload_bytes` of the mqtt
    /// providers.
    pub max_packet_bytes: usize,
}

impl Default for EmbeddedBrokerConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            host: "127.0.0.1".into(),
            port: 1883,
            v311_port: 1884,
            max_packet_bytes: 0,
        }
    }
}

/// Simulated devices started by `iotgw run` (registered on the default instance).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SimulateConfig {
    /// How many (0 = none).
    pub devices: u32,
    /// Milliseconds between readings of one device.
    pub interval_ms: u64,
}

impl Default for SimulateConfig {
    fn default() -> Self {
        Self {
            devices: 0,
            interval_ms: 1_000,
        }
    }
}

/// Shutdown behaviour.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShutdownConfig {
    /// Seconds to drain the outbox and in-flight events after SIGTERM/Ctrl-C.
    pub grace_secs: u64,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        Self { grace_secs: 10 }
    }
}

/// Readiness (`/ready`) policy. `/ready` is false until the store answers and every
/// configured provider has connected; these settings say how long a lost connection is
/// tolerated afterwards.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthConfig {
    /// Seconds a provider may stay disconnected, after having been connected, before
    /// `/ready` turns false, so a short broker restart does not take the pod out of
    /// service. 0 turns `/ready` false as soon as a connection drops.
    pub provider_grace_secs: u64,
}

impl Default for HealthConfig {
    fn default() -> Self {
        Self {
            provider_grace_secs: 30,
        }
    }
}
