//! Simulated devices speaking MQTT 3.1.1 or 5 (rumqttc): the `mqtt` kind, and the
//! transport of `aws_iot_core` devices (see [`super::aws`]).
//!
//! A device connects (TLS when its [`Link`] says so), subscribes to its command topic,
//! keeps a retained `online`/`offline` status with a last will (when it has a status
//! topic), publishes a reading every interval at QoS 1 (MQTT 5: with the `message_id` user
//! property; the payload's `message_id` field serves 3.1.1 through the provider's
//! `message_id_pointer`), reports its properties on the first reading and every 30th,
//! and answers each command on its reply topic with the correlation id it came with: the
//! MQTT 5 correlation data or `correlation_id` user property, else the payload's
//! `"correlation_id"` field (what the mqtt provider sends with `command_correlation =
//! "payload"` or `"both"`, the only way a 3.1.1 device learns it).

use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::device::{Behaviour, Counters};
use iotgw_config::MqttConfig;

/// The MQTT protocol version of a simulated device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Protocol {
    /// MQTT 3.1.1 (no properties: the correlation id travels in the payload).
    #[value(name = "3.1.1")]
    V311,
    /// MQTT 5.
    #[default]
    #[value(name = "5")]
    V5,
}

/// How reported properties are published.
#[derive(Clone, Debug)]
pub enum Reported {
    /// The JSON object itself (the mqtt provider's `reported_topic`).
    Plain(String),
    /// AWS IoT's shadow update `{"state": {"reported": {...}}}` on
    /// `$aws/things/<thing>/shadow/update`.
    AwsShadow(String),
}

/// Where and how one device connects, and its topics.
#[derive(Clone)]
pub struct Link {
    /// Broker host.
    pub host: String,
    /// Broker port.
    pub port: u16,
    /// MQTT client id.
    pub client_id: String,
    /// User name and password, when the broker wants them.
    pub credentials: Option<(String, String)>,
    /// TLS, when the broker speaks it.
    pub transport: Option<rumqttc::Transport>,
    /// Protocol version.
    pub protocol: Protocol,
    /// Telemetry topic.
    pub telemetry: String,
    /// Retained status topic (also the last will), if any.
    pub status: Option<String>,
    /// Command topic subscribed to.
    pub command: String,
    /// Reply topic.
    pub reply: String,
    /// Reported properties, if the cloud takes them.
    pub reported: Option<Reported>,
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("client_id", &self.client_id)
            .field("user", &self.credentials.as_ref().map(|(u, _)| u))
            .field("tls", &self.transport.is_some())
            .field("protocol", &self.protocol)
            .field("telemetry", &self.telemetry)
            .field("command", &self.command)
            .field("reply", &self.reply)
            .finish_non_exhaustive()
    }
}

fn topic(template: &str, id: &str) -> String {
    template.replace("{device_id}", id)
}

impl Link {
    /// A device of an mqtt instance configured as `cfg`, without broker credentials: the
    /// topics of the instance's templates, its broker address and TLS (verifying the
    /// broker against the instance's `tls.ca_file`, else the system's roots).
    pub fn from_instance(cfg: &MqttConfig, id: &str, protocol: Protocol) -> anyhow::Result<Self> {
        let transport = match &cfg.tls {
            None => None,
            Some(t) => Some(tls_transport(t.ca_file.as_deref())?),
        };
        Ok(Self {
            host: cfg.host.clone(),
            port: cfg.port,
            client_id: id.to_owned(),
            credentials: None,
            transport,
            protocol,
            telemetry: topic(&cfg.telemetry_topic, id),
            status: Some(topic(&cfg.status_topic, id)),
            command: topic(&cfg.command_topic, id),
            reply: topic(&cfg.reply_topic, id),
            reported: Some(Reported::Plain(topic(&cfg.reported_topic, id))),
        })
    }

    /// Takes what registration returned (mqtt with dynsec: host, port, client id, user,
    /// password and the device's topics), keeping the instance's values for what it lacks.
    pub fn with_credentials(mut self, c: &Value) -> Self {
        let text = |k: &str| c[k].as_str().filter(|s| !s.is_empty()).map(str::to_owned);
        if let Some(h) = text("host") {
            self.host = h;
        }
        if let Some(p) = c["port"].as_u64().and_then(|p| u16::try_from(p).ok()) {
            self.port = p;
        }
        if let Some(id) = text("client_id") {
            self.client_id = id;
        }
        if let (Some(u), Some(p)) = (text("username"), text("password")) {
            self.credentials = Some((u, p));
        }
        for (key, slot) in [
            ("telemetry_topic", &mut self.telemetry),
            ("command_topic", &mut self.command),
            ("reply_topic", &mut self.reply),
        ] {
            if let Some(t) = text(key) {
                *slot = t;
            }
        }
        if let Some(t) = text("status_topic") {
            self.status = Some(t);
        }
        if let Some(t) = text("reported_topic") {
            self.reported = Some(Reported::Plain(t));
        }
        self
    }
}

#[cfg(any(feature = "mqtt", feature = "aws_iot_core"))]
fn tls_transport(ca_file: Option<&str>) -> anyhow::Result<rumqttc::Transport> {
    super::tls::transport(&super::tls::TlsSpec {
        ca_file,
        ..Default::default()
    })
}

#[cfg(not(any(feature = "mqtt", feature = "aws_iot_core")))]
fn tls_transport(_ca_file: Option<&str>) -> anyhow::Result<rumqttc::Transport> {
    anyhow::bail!("this build has no TLS for simulated devices: build with --features mqtt")
}

/// Fleet settings of the embedded default (`iotgw run` without a config): MQTT 5 devices
/// on the embedded broker.
#[derive(Debug, Clone)]
pub struct FleetConfig {
    /// Broker host.
    pub host: String,
    /// Broker port.
    pub port: u16,
    /// Topic templates (the mqtt provider's).
    pub topics: MqttConfig,
    /// Device ids.
    pub device_ids: Vec<String>,
    /// Time between readings.
    pub interval: Duration,
    /// Broker credentials per device, if the broker needs them: (username, password).
    pub credentials: Option<(String, String)>,
}

/// Runs every device of `cfg` until `shutdown` (the embedded default's fleet).
pub async fn run_fleet(cfg: FleetConfig, shutdown: CancellationToken) {
    let counters = Arc::new(Counters::default());
    let mut set = JoinSet::new();
    for (i, id) in cfg.device_ids.iter().enumerate() {
        let topics = MqttConfig {
            host: cfg.host.clone(),
            port: cfg.port,
            tls: None,
            ..cfg.topics.clone()
        };
        let mut link = match Link::from_instance(&topics, id, Protocol::V5) {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(device = %id, error = %e, "simulated device not started");
                continue;
            }
        };
        link.credentials.clone_from(&cfg.credentials);
        let (counters, shutdown) = (counters.clone(), shutdown.clone());
        let interval = cfg.interval;
        set.spawn(async move {
            run_device(link, Behaviour::new(i, 0.0), interval, counters, shutdown).await;
        });
    }
    while set.join_next().await.is_some() {}
}

/// The correlation id of a command: from the MQTT 5 properties when present, else the
/// payload's `"correlation_id"` field.
fn correlation(from_properties: Option<String>, body: &Value) -> Option<String> {
    from_properties.filter(|c| !c.is_empty()).or_else(|| {
        body.get("correlation_id")
            .and_then(Value::as_str)
            .filter(|c| !c.is_empty())
            .map(str::to_owned)
    })
}

/// What the device publishes for `properties`.
fn reported_payload(r: &Reported, properties: Value) -> (&str, Value) {
    match r {
        Reported::Plain(t) => (t, properties),
        Reported::AwsShadow(t) => (t, json!({"state": {"reported": properties}})),
    }
}

/// How long a device waits before connecting again after an error (doubling to 5 s).
fn backoff(attempt: u32) -> Duration {
    Duration::from_millis((250u64 << attempt.min(5)).min(5_000))
}

/// Runs one device until `shutdown`.
pub async fn run_device(
    link: Link,
    behaviour: Behaviour,
    interval: Duration,
    counters: Arc<Counters>,
    shutdown: CancellationToken,
) {
    match link.protocol {
        Protocol::V5 => v5::run(link, behaviour, interval, counters, shutdown).await,
        Protocol::V311 => v311::run(link, behaviour, interval, counters, shutdown).await,
    }
}

/// Waits `delay` unless `shutdown` comes first (then `false`).
async fn pause(delay: Duration, shutdown: &CancellationToken) -> bool {
    tokio::select! {
        () = shutdown.cancelled() => false,
        () = tokio::time::sleep(delay) => true,
    }
}

mod v5 {
    use super::*;
    use rumqttc::v5::mqttbytes::v5::{LastWill, Packet, PublishProperties};
    use rumqttc::v5::mqttbytes::QoS;
    use rumqttc::v5::{AsyncClient, Event, MqttOptions};

    pub(super) async fn run(
        link: Link,
        mut b: Behaviour,
        interval: Duration,
        counters: Arc<Counters>,
        shutdown: CancellationToken,
    ) {
        let id = link.client_id.clone();
        let mut opts = MqttOptions::new(&link.client_id, link.host.clone(), link.port);
        opts.set_keep_alive(Duration::from_secs(10));
        opts.set_connection_timeout(10);
        if let Some(status) = &link.status {
            opts.set_last_will(LastWill::new(
                status.clone(),
                "offline",
                QoS::AtLeastOnce,
                true,
                None,
            ));
        }
        if let Some((u, p)) = &link.credentials {
            opts.set_credentials(u.clone(), p.clone());
        }
        if let Some(t) = &link.transport {
            opts.set_transport(t.clone());
        }
        let (client, mut events) = AsyncClient::new(opts, 64);
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let (mut online, mut ever_connected, mut failures) = (false, false, 0u32);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => {
                    if let Some(status) = &link.status {
                        let _ = client.try_publish(status.clone(), QoS::AtLeastOnce, true, "offline");
                    }
                    let _ = client.try_disconnect();
                    // Let the event loop flush the last publish and the disconnect.
                    let flush = tokio::time::timeout(Duration::from_millis(500), async {
                        while let Ok(ev) = events.poll().await {
                            if matches!(ev, Event::Outgoing(rumqttc::Outgoing::Disconnect)) { break; }
                        }
                    });
                    let _ = flush.await;
                    return;
                }
                _ = tick.tick(), if online => {
                    let body = b.next_reading();
                    let props = PublishProperties {
                        user_properties: vec![("message_id".into(), body["message_id"].as_str().unwrap_or_default().to_owned())],
                        ..Default::default()
                    };
                    match client.try_publish_with_properties(link.telemetry.clone(), QoS::AtLeastOnce, false, body.to_string(), props) {
                        Ok(()) => Counters::bump(&counters.sent),
                        Err(e) => counters.error(&id, format!("reading not queued: {e}")),
                    }
                    if b.report_due() {
                        if let Some(r) = &link.reported {
                            let (t, v) = reported_payload(r, b.properties());
                            if client.try_publish(t, QoS::AtLeastOnce, false, v.to_string()).is_ok() {
                                Counters::bump(&counters.reported);
                            }
                        }
                    }
                }
                ev = events.poll() => match ev {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        tracing::info!(device = %id, "simulated device connected (MQTT 5)");
                        online = true;
                        failures = 0;
                        if !ever_connected {
                            ever_connected = true;
                            Counters::bump(&counters.connected);
                        }
                        let _ = client.try_subscribe(link.command.clone(), QoS::AtLeastOnce);
                        if let Some(status) = &link.status {
                            let _ = client.try_publish(status.clone(), QoS::AtLeastOnce, true, "online");
                        }
                    }
                    Ok(Event::Incoming(Packet::SubAck(ack))) => {
                        let refused = ack.return_codes.iter().any(|c| !matches!(c, rumqttc::v5::mqttbytes::v5::SubscribeReasonCode::Success(_)));
                        if refused {
                            counters.error(&id, format!("the broker refused the subscription to {}: {:?}", link.command, ack.return_codes));
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let body: Value = serde_json::from_slice(&p.payload).unwrap_or_default();
                        Counters::bump(&counters.commands);
                        let props = p.properties.as_ref();
                        let from_props = props
                            .and_then(|pr| pr.correlation_data.as_ref())
                            .map(|b| String::from_utf8_lossy(b).into_owned())
                            .or_else(|| props.and_then(|pr| pr.user_properties.iter().find(|(k, _)| k == "correlation_id").map(|(_, v)| v.clone())));
                        let Some(c) = correlation(from_props, &body) else {
                            counters.error(&id, "a command without a correlation id (no MQTT 5 correlation data, no \"correlation_id\" field): cannot answer it");
                            continue;
                        };
                        let answer = b.answer(&body);
                        tracing::info!(device = %id, command = %body, status = answer.status(), "simulated device answers a command");
                        let props = PublishProperties { correlation_data: Some(c.clone().into_bytes().into()), ..Default::default() };
                        match client.try_publish_with_properties(link.reply.clone(), QoS::AtLeastOnce, false, answer.reply_json(&c).to_string(), props) {
                            Ok(()) => counters.answered(&answer),
                            Err(e) => counters.error(&id, format!("reply not queued: {e}")),
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        online = false;
                        counters.error(&id, format!("connection to {}:{}: {e}", link.host, link.port));
                        failures += 1;
                        if !pause(backoff(failures), &shutdown).await {
                            return;
                        }
                    }
                }
            }
        }
    }
}

mod v311 {
    use super::*;
    use rumqttc::{AsyncClient, Event, LastWill, MqttOptions, Packet, QoS, SubscribeReasonCode};

    pub(super) async fn run(
        link: Link,
        mut b: Behaviour,
        interval: Duration,
        counters: Arc<Counters>,
        shutdown: CancellationToken,
    ) {
        let id = link.client_id.clone();
        let mut opts = MqttOptions::new(&link.client_id, link.host.clone(), link.port);
        opts.set_keep_alive(Duration::from_secs(10));
        if let Some(status) = &link.status {
            opts.set_last_will(LastWill::new(
                status.clone(),
                "offline",
                QoS::AtLeastOnce,
                true,
            ));
        }
        if let Some((u, p)) = &link.credentials {
            opts.set_credentials(u.clone(), p.clone());
        }
        if let Some(t) = &link.transport {
            opts.set_transport(t.clone());
        }
        let (client, mut events) = AsyncClient::new(opts, 64);
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let (mut online, mut ever_connected, mut failures) = (false, false, 0u32);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => {
                    if let Some(status) = &link.status {
                        let _ = client.try_publish(status.clone(), QoS::AtLeastOnce, true, "offline");
                    }
                    let _ = client.try_disconnect();
                    let flush = tokio::time::timeout(Duration::from_millis(500), async {
                        while let Ok(ev) = events.poll().await {
                            if matches!(ev, Event::Outgoing(rumqttc::Outgoing::Disconnect)) { break; }
                        }
                    });
                    let _ = flush.await;
                    return;
                }
                _ = tick.tick(), if online => {
                    let body = b.next_reading();
                    match client.try_publish(link.telemetry.clone(), QoS::AtLeastOnce, false, body.to_string()) {
                        Ok(()) => Counters::bump(&counters.sent),
                        Err(e) => counters.error(&id, format!("reading not queued: {e}")),
                    }
                    if b.report_due() {
                        if let Some(r) = &link.reported {
                            let (t, v) = reported_payload(r, b.properties());
                            if client.try_publish(t, QoS::AtLeastOnce, false, v.to_string()).is_ok() {
                                Counters::bump(&counters.reported);
                            }
                        }
                    }
                }
                ev = events.poll() => match ev {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        tracing::info!(device = %id, "simulated device connected (MQTT 3.1.1)");
                        online = true;
                        failures = 0;
                        if !ever_connected {
                            ever_connected = true;
                            Counters::bump(&counters.connected);
                        }
                        let _ = client.try_subscribe(link.command.clone(), QoS::AtLeastOnce);
                        if let Some(status) = &link.status {
                            let _ = client.try_publish(status.clone(), QoS::AtLeastOnce, true, "online");
                        }
                    }
                    Ok(Event::Incoming(Packet::SubAck(ack))) => {
                        if ack.return_codes.iter().any(|c| matches!(c, SubscribeReasonCode::Failure)) {
                            counters.error(&id, format!("the broker refused the subscription to {}", link.command));
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let body: Value = serde_json::from_slice(&p.payload).unwrap_or_default();
                        Counters::bump(&counters.commands);
                        let Some(c) = correlation(None, &body) else {
                            counters.error(&id, "a command without a \"correlation_id\" field: an MQTT 3.1.1 device needs command_correlation = \"payload\" or \"both\" on the instance");
                            continue;
                        };
                        let answer = b.answer(&body);
                        tracing::info!(device = %id, command = %body, status = answer.status(), "simulated device answers a command");
                        match client.try_publish(link.reply.clone(), QoS::AtLeastOnce, false, answer.reply_json(&c).to_string()) {
                            Ok(()) => counters.answered(&answer),
                            Err(e) => counters.error(&id, format!("reply not queued: {e}")),
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        online = false;
                        counters.error(&id, format!("connection to {}:{}: {e}", link.host, link.port));
                        failures += 1;
                        if !pause(backoff(failures), &shutdown).await {
                            return;
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_correlation_id_comes_from_the_properties_else_the_payload() {
        let body = json!({"CommandName": "reboot", "correlation_id": "from-payload"});
        assert_eq!(
            correlation(Some("from-props".into()), &body).as_deref(),
            Some("from-props")
        );
        assert_eq!(correlation(None, &body).as_deref(), Some("from-payload"));
        assert_eq!(correlation(Some(String::new()), &json!({})), None);
    }

    #[test]
    fn registration_credentials_override_the_instance_topics_and_address() {
        let cfg = MqttConfig::default();
        let link = Link::from_instance(&cfg, "sim-001", Protocol::V311)
            .expect("plain")
            .with_credentials(&json!({
                "host": "broker.example", "port": 8883, "client_id": "sim-001",
                "username": "sim-001", "password": "pw",
                "telemetry_topic": "p/devices/sim-001/telemetry",
                "command_topic": "p/devices/sim-001/commands",
            }));
        assert_eq!((link.host.as_str(), link.port), ("broker.example", 8883));
        assert_eq!(link.credentials, Some(("sim-001".into(), "pw".into())));
        assert_eq!(link.telemetry, "p/devices/sim-001/telemetry");
        assert_eq!(link.command, "p/devices/sim-001/commands");
        assert_eq!(link.reply, "devices/sim-001/replies");
    }

    #[test]
    fn a_shadow_update_wraps_the_reported_properties() {
        let r = Reported::AwsShadow("$aws/things/t/shadow/update".into());
        let (t, v) = reported_payload(&r, json!({"a": 1}));
        assert_eq!(t, "$aws/things/t/shadow/update");
        assert_eq!(v, json!({"state": {"reported": {"a": 1}}}));
    }
}
