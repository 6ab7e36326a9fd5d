//! The plain MQTT provider's settings (`kind = "mqtt"`) and their validation.

use serde::{Deserialize, Serialize};

use crate::base::{Problem, Secret};

/// Plain MQTT 5 provider.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqttConfig {
    /// Broker host.
    pub host: String,
    /// Broker port.
    pub port: u16,
    /// Client id of the gateway; it names the broker-side persistent session. With a
    /// `shared_group`, each replica connects as `<client_id>-<replica.id>`, so replicas
    /// given one config never take over each other's session.
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
    /// Topic a device's desired settings are published to (Field Service's Update Device
    /// Data, `msdyn_devicesettings`): retained, QoS 1, so a device subscribing later still
    /// gets the latest settings.
    pub settings_topic: String,
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
    /// MQTT 5 `message_id` user property (the gateway scopes it by instance and device into
    /// the alert token); without either, the id is a hash of topic and payload (two
    /// byte-identical readings then count as one).
    pub message_id_pointer: String,
    /// Mosquitto dynamic security: create broker credentials and ACLs per device.
    pub dynsec: Option<DynsecConfig>,
    /// Where a command's correlation id travels to the device: `properties` (MQTT 5
    /// correlation data and user properties), `payload` (a top-level `"correlation_id"`
    /// field added to the JSON command, and no MQTT 5 properties at all), or `both`. A
    /// device that speaks MQTT 3.1.1 has no properties: it needs `payload` or `both`, and
    /// echoes the id in its reply. The stored command message is unchanged.
    pub command_correlation: CommandCorrelation,
    /// TLS to the broker (`[providers.NAME.tls]`, usually with `port = 8883`): the broker's
    /// certificate is verified against `ca_file` (else the system's roots), and a client
    /// certificate is presented when one is given. Absent: plain TCP, where the password
    /// (and the dynsec admin's) travels in clear; use it only on loopback or a private
    /// network.
    pub tls: Option<MqttTlsConfig>,
}

/// TLS settings of an mqtt instance (`[providers.NAME.tls]`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqttTlsConfig {
    /// PEM file of the CA certificates that sign the broker's certificate; absent: the
    /// system's trust store.
    pub ca_file: Option<String>,
    /// PEM certificate the gateway presents (mutual TLS), with `client_key_file`.
    pub client_cert_file: Option<String>,
    /// PEM private key of `client_cert_file`.
    pub client_key_file: Option<String>,
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
            settings_topic: "devices/{device_id}/settings".into(),
            shared_group: String::new(),
            max_payload_bytes: 256 * 1024,
            keep_alive_secs: 30,
            reconnect_min_ms: 100,
            reconnect_max_ms: 10_000,
            message_id_pointer: "/message_id".into(),
            dynsec: None,
            command_correlation: CommandCorrelation::Properties,
            tls: None,
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

/// The checks serde cannot express for one `kind = "mqtt"` instance at `base`.
pub(crate) fn validate(base: &str, m: &MqttConfig, out: &mut Vec<Problem>) {
    if let Some(t) = &m.tls {
        if t.client_cert_file.is_some() != t.client_key_file.is_some() {
            out.push(Problem::new(
                format!("{base}.tls.client_key_file"),
                "client_cert_file and client_key_file go together",
                "give both (mutual TLS) or neither",
            ));
        }
    }
    if m.host.trim().is_empty() {
        out.push(Problem::new(
            format!("{base}.host"),
            "empty broker host",
            "give the broker's host name or address",
        ));
    }
    if m.port == 0 {
        out.push(Problem::new(
            format!("{base}.port"),
            "port 0",
            "give the broker's port, usually 1883 (8883 with TLS)",
        ));
    }
    for (key, t) in [
        ("telemetry_topic", &m.telemetry_topic),
        ("status_topic", &m.status_topic),
        ("command_topic", &m.command_topic),
        ("reply_topic", &m.reply_topic),
        ("reported_topic", &m.reported_topic),
        ("settings_topic", &m.settings_topic),
    ] {
        let levels: Vec<&str> = t.split('/').collect();
        let whole = levels.iter().filter(|l| **l == "{device_id}").count();
        if whole != 1 || t.matches("{device_id}").count() != 1 {
            out.push(Problem::new(
                format!("{base}.{key}"),
                format!("`{t}` must contain `{{device_id}}` exactly once, as a whole topic level"),
                "e.g. devices/{device_id}/telemetry",
            ));
        }
        if t.contains('+') || t.contains('#') || t.starts_with('$') {
            out.push(Problem::new(
                format!("{base}.{key}"),
                format!("`{t}` holds a wildcard or a `$` prefix"),
                "use a plain topic with {device_id} as one level",
            ));
        }
    }
    if m.shared_group.contains(['/', '+', '#']) {
        out.push(Problem::new(
            format!("{base}.shared_group"),
            "a shared group name cannot hold / + #",
            "use a plain name such as iotgw, or empty to disable sharing",
        ));
    }
    if m.reconnect_min_ms == 0 || m.reconnect_min_ms > m.reconnect_max_ms {
        out.push(Problem::new(
            format!("{base}.reconnect_min_ms"),
            "must be above 0 and not above reconnect_max_ms",
            "e.g. 100 and 10000",
        ));
    }
    if m.keep_alive_secs < 5 {
        out.push(Problem::new(
            format!("{base}.keep_alive_secs"),
            "keep-alive below 5 s",
            "use 5 or more (default 30)",
        ));
    }
    if m.password.is_some() && m.username.is_none() {
        out.push(Problem::new(
            format!("{base}.username"),
            "a password without a user name",
            "set username too",
        ));
    }
}
