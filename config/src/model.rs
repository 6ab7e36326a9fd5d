//! The configuration structs that are not one provider's, one sink's or the store's
//! (those have their own files and are re-exported here). Field docs are the user
//! documentation.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub use crate::base::Secret;
pub use crate::mqtt::{CommandCorrelation, DynsecConfig, MqttConfig, MqttTlsConfig};
pub use crate::sinks::{
    default_coalesce_connection, default_dataverse_batch_size, default_entities,
    DataverseDeviceBinding, DataverseSinkConfig, FileSinkConfig, SinkConfig, StdoutSinkConfig,
    WebhookSinkConfig, CHANGE_FEED_ENTITIES, MAX_DATAVERSE_BATCH_SIZE,
};
pub use crate::store::{SqliteSynchronous, StoreConfig, StoreKind};

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
    /// Readiness (`/ready`) policy and failover.
    pub health: HealthConfig,
    /// Command delivery: deadline and retries.
    pub commands: CommandsConfig,
    /// How long finished records are kept.
    pub retention: RetentionConfig,
    /// The measures kept from telemetry.
    pub readings: ReadingsConfig,
    /// This gateway's identity among replicas sharing one store.
    pub replica: ReplicaConfig,
    /// Field Service's command and property definitions.
    pub definitions: DefinitionsConfig,
    /// What happens to alerts after they are raised.
    pub alerts: AlertsConfig,
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
        c.sinks.insert(
            "stdout".into(),
            SinkConfig::Stdout(StdoutSinkConfig::default()),
        );
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
    /// Group commit: how long a batch that is not full waits for more events when the
    /// store is idle, in milliseconds from its first event (0: commit what is waiting at
    /// once). A busy store takes what arrived while it committed the previous batch.
    pub batch_max_wait_ms: u64,
    /// How far in the future an event's own time (a reading's, a connection change's,
    /// reported properties') may lie, in seconds past the moment the gateway takes the
    /// event in (0..=86400). A later time is clamped to that limit and counted
    /// (`iotgw_times_clamped_total`), so a device clock in 2999 cannot pin a connection
    /// state or last activity forever.
    pub max_clock_skew_secs: u64,
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
            max_clock_skew_secs: 300,
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
    /// Instances to use instead, in order, while `provider` has been unhealthy longer than
    /// `health.failover_after_secs`: a new device goes to the first healthy one.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fallback: Vec<String>,
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

    /// This instance as replica `replica` runs it: an MQTT client (kinds `mqtt` and
    /// `aws_iot_core`) in a shared-subscription group gets the client id
    /// `{client_id}-{replica}`, so replicas given one config never take over each other's
    /// broker session. Without a group the client id is used as written (one gateway, one
    /// session that survives its restarts).
    pub fn for_replica(&self, replica: &str) -> Self {
        let mut out = self.clone();
        match &mut out {
            Self::Mqtt(m) if !m.shared_group.is_empty() => {
                m.client_id = format!("{}-{replica}", m.client_id);
            }
            Self::AwsIotCore(a) if !a.shared_group.is_empty() => {
                a.client_id = format!("{}-{replica}", a.client_id);
            }
            _ => {}
        }
        out
    }
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
    /// Provider instances whose outage does not make `/ready` false (`optional`); every
    /// other instance is `required`. `/ready` names each instance that is down either
    /// way. Use it for an instance the gateway can serve without, such as a fallback.
    pub optional: Vec<String>,
    /// Seconds an instance must have been unhealthy (not connected) before routing rules
    /// send new registrations to their `fallback` instances (1..=86400).
    pub failover_after_secs: u64,
}

/// Command delivery (`[commands]`). A command is In Progress until the device confirms it;
/// until its provider instance took it, the gateway keeps trying to send it (also after a
/// restart, with the same correlation id) for `ttl_secs`, like IoT Hub's cloud-to-device
/// TTL, then it ends in Error with the reason.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CommandsConfig {
    /// Seconds from a command's creation by which it must have been sent (1..=172800, two
    /// days, IoT Hub's longest TTL). A command whose instance stays unreachable that long
    /// ends in Error "instance X unreachable for N s".
    pub ttl_secs: u64,
    /// Seconds between two attempts to send a command whose instance is unreachable or
    /// failed transiently (1..=3600).
    pub retry_secs: u64,
    /// Commands being sent through one provider instance at once (1..=4096). A direct
    /// method waits for its device (30 s and more); this bounds what one slow instance
    /// holds, and never delays telemetry or the other instances' commands.
    pub max_in_flight: usize,
}

impl Default for CommandsConfig {
    fn default() -> Self {
        Self {
            ttl_secs: 3600,
            retry_secs: 5,
            max_in_flight: 64,
        }
    }
}

/// How long finished records are kept (`[retention]`); 0 keeps them forever. A replica
/// deletes what is older every `interval_secs` (replicas sharing a store may all do it).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetentionConfig {
    /// Days a dead letter is kept (0..=36500).
    pub dead_letters_days: u32,
    /// Days a command that is no longer In Progress is kept (0..=36500).
    pub commands_days: u32,
    /// Days an Inactive or Closed alert is kept (0..=36500); an alert with a child left
    /// stays until the child goes. Its token goes with it: a reading delivered again after
    /// that makes a new alert, so keep this above any redelivery window.
    pub alerts_days: u32,
    /// Seconds between two rounds (60..=86400).
    pub interval_secs: u64,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        Self {
            dead_letters_days: 30,
            commands_days: 90,
            alerts_days: 90,
            interval_secs: 3600,
        }
    }
}

/// The readings kept from telemetry (`[readings]`): every number and boolean of an accepted
/// message (booleans as 0 and 1), by JSON pointer (`/engine/temp`), at the message's time,
/// with per-minute and hourly rollups (min, max, sum, count) for the readings query. Days
/// of 0 keep that table forever.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReadingsConfig {
    /// Keep readings (on by default; they cost about half the end-to-end throughput on
    /// SQLite, BENCHMARKS.md "Readings: the write cost": turn them off, or list the
    /// `measures` to keep, when no one reads them).
    pub enabled: bool,
    /// Only these measures (JSON pointers, e.g. `"/engine/temp"`); empty: every one.
    pub measures: Vec<String>,
    /// At most this many measures of one message are kept, the first in key order
    /// (1..=1024).
    pub max_per_message: usize,
    /// The JSON pointer of the message's own time: an RFC 3339 string or Unix
    /// milliseconds. Missing or unreadable: the time the gateway received it. A time
    /// later than arrival plus `pipeline.max_clock_skew_secs` is clamped to that.
    pub time_pointer: String,
    /// Days a reading is kept (0..=36500).
    pub retention_days: u32,
    /// Days a per-minute rollup is kept (0..=36500).
    pub minute_rollups_days: u32,
    /// Days an hourly rollup is kept (0..=36500).
    pub hour_rollups_days: u32,
}

impl Default for ReadingsConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            measures: Vec::new(),
            max_per_message: 64,
            time_pointer: "/timestamp".into(),
            retention_days: 30,
            minute_rollups_days: 90,
            hour_rollups_days: 800,
        }
    }
}

/// Alerts after they are raised (`[alerts]`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AlertsConfig {
    /// Closing a parent alert (`POST /api/v1/alerts/{id}/close`) closes its children too,
    /// as Field Service does when the case or work order made from the parent is resolved.
    pub close_children_with_parent: bool,
}

impl Default for AlertsConfig {
    fn default() -> Self {
        Self {
            close_children_with_parent: true,
        }
    }
}

/// Field Service's command and property definitions (`[definitions]`):
/// `msdyn_iotdevicecommanddefinition` and `msdyn_iotpropertydefinition`. A command sent by
/// definition has its parameters checked against their property definitions' types; a
/// device's reported properties are read through the property definitions.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DefinitionsConfig {
    /// Command definitions by name (the command name the device receives).
    pub commands: BTreeMap<String, CommandDefinitionConfig>,
    /// Property definitions by name: command parameters and reported properties.
    pub properties: BTreeMap<String, PropertyDefinitionConfig>,
}

/// One command definition (`[definitions.commands.NAME]`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CommandDefinitionConfig {
    /// What it does, for people.
    pub description: String,
    /// Its parameters: names of property definitions (a parameter with a parent property
    /// sits inside that parent's object).
    pub parameters: Vec<String>,
    /// Parameters that must be given (a subset of `parameters`).
    pub required: Vec<String>,
    /// The device categories it is linked to; a device of another category cannot be sent
    /// it. Empty: every device.
    pub categories: Vec<String>,
}

/// One property definition (`[definitions.properties.NAME]`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PropertyDefinitionConfig {
    /// Its type, as Field Service names it.
    #[serde(rename = "type")]
    pub kind: PropertyType,
    /// Its unit, for people (`"°C"`).
    #[serde(default)]
    pub unit: Option<String>,
    /// The property (of type Object) it sits inside; none: at the top level.
    #[serde(default)]
    pub parent: Option<String>,
    /// What it means, for people.
    #[serde(default)]
    pub description: String,
}

/// `msdyn_iotpropertydefinition`'s types.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PropertyType {
    /// A JSON string.
    String,
    /// A JSON object (other properties name it as their parent).
    Object,
    /// An RFC 3339 date and time, as a JSON string.
    DateTime,
    /// `true` or `false`.
    Boolean,
    /// A whole number ("Whole Number" in Field Service).
    #[serde(alias = "WholeNumber", alias = "Whole Number")]
    Whole,
    /// Any number.
    Decimal,
}

impl PropertyType {
    /// Its name as Field Service shows it.
    pub const fn label(self) -> &'static str {
        match self {
            Self::String => "String",
            Self::Object => "Object",
            Self::DateTime => "DateTime",
            Self::Boolean => "Boolean",
            Self::Whole => "Whole Number",
            Self::Decimal => "Decimal",
        }
    }
}

/// This gateway's identity among replicas sharing one store (`[replica]`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReplicaConfig {
    /// Names this replica: it suffixes the MQTT client id of a provider with a
    /// `shared_group` (`{client_id}-{id}`, so replicas never take over each other's
    /// session), and it names the holder of outbox leases in logs. Letters, digits, `_`,
    /// `-` and `.`, at most 64. Empty (the default): the host name (`$HOSTNAME`, else the
    /// kernel's), which is the pod name in a Kubernetes StatefulSet (`iotgw-0`, stable
    /// across restarts, so a restarted replica finds its broker session again).
    pub id: String,
    /// Seconds an outbox item stays leased to the replica delivering it. The replica renews
    /// the lease every third of it while it delivers; when a replica dies, the others take
    /// its items over once the lease has run out (2..=3600).
    pub outbox_lease_secs: u64,
}

impl Default for ReplicaConfig {
    fn default() -> Self {
        Self {
            id: String::new(),
            outbox_lease_secs: 30,
        }
    }
}

impl ReplicaConfig {
    /// The longest replica id.
    pub const MAX_LEN: usize = 64;

    /// The configured id, else the host name made fit (other characters become `-`), else
    /// `iotgw`.
    pub fn resolved_id(&self) -> String {
        if !self.id.is_empty() {
            return self.id.clone();
        }
        let host = std::env::var("HOSTNAME")
            .ok()
            .filter(|h| !h.trim().is_empty())
            .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
            .unwrap_or_default();
        let fitted: String = host
            .trim()
            .chars()
            .map(|c| if Self::allowed(c) { c } else { '-' })
            .take(Self::MAX_LEN)
            .collect();
        if fitted.is_empty() {
            "iotgw".into()
        } else {
            fitted
        }
    }

    /// Whether `c` may appear in a replica id.
    pub fn allowed(c: char) -> bool {
        c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.')
    }
}

impl Default for HealthConfig {
    fn default() -> Self {
        Self {
            provider_grace_secs: 30,
            optional: Vec::new(),
            failover_after_secs: 60,
        }
    }
}
