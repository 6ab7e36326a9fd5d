//! The MQTT receive loop on the account endpoint of an `aws_iot_core` instance: what the
//! shared session driver needs to know about AWS.
//!
//! - MQTT 5 over mutual TLS with the gateway's own certificate (ALPN `x-amzn-mqtt-ca` on
//!   port 443), one persistent session (`clean_start = false`, `session_expiry_secs`) so
//!   QoS 1 messages published while the gateway is away wait at AWS.
//! - Subscriptions at QoS 1, (re)made on every CONNACK, at most 8 filters per SUBSCRIBE
//!   (AWS's limit): telemetry and replies as `$share/<shared_group>/...`; presence events
//!   and shadow update documents unshared, so every replica sees every state change.
//! - Manual, ordered acks and the session resume after a nack come from the one MQTT
//!   session driver, [`crate::mqtt::session`] (its state machine: [`crate::mqtt::acks`]);
//!   this file only says what differs on AWS.
//! - Presence events become [`EventKind::Connection`] at the event's own timestamp, so a
//!   late disconnect never overrides a newer connect; the gateway's own client id is
//!   ignored. Shadow documents with a changed reported state become
//!   [`EventKind::ReportedProperties`].
//! - On a connection error: health disconnected with the error, wait `reconnect_min_ms`
//!   doubling up to `reconnect_max_ms`, poll again. A CONNACK refusing the certificate
//!   or the client id ends the loop with an error; anything else is retried.
//! - On shutdown: send the acks already given, DISCONNECT (the session stays), return.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use rumqttc::v5::mqttbytes::v5::{
    ConnectReturnCode, Filter, Publish, SubAck, Subscribe, SubscribeReasonCode,
};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, ConnectionError, EventLoop, MqttOptions, Request};
use rumqttc::{TlsConfiguration, Transport};
use tracing::{info, warn};

use super::inbound::{decode_presence, decode_shadow_documents};
use super::state::{Shared, AWS_MAX_PAYLOAD_BYTES};
use super::topics::{Inbound, MAX_FILTERS_PER_SUBSCRIBE};
use crate::mqtt::inbound::{
    self as mqtt_inbound, Inbound as Decoded, Received, MESSAGE_ID_PROPERTY,
};
use crate::mqtt::session::{self, Hooks, Settings};
use crate::mqtt::topics::TopicKind;
use crate::observed::HealthCell;
use crate::{
    AckHandle, EventKind, EventSender, InstanceName, ProviderError, ProviderEvent, Shutdown,
};

/// Unacknowledged QoS 1 messages AWS may have in flight to the gateway (AWS IoT Core
/// allows 100 in-flight messages per connection).
pub const RECEIVE_MAXIMUM: u16 = 100;

/// Capacity of rumqttc's request channel (acks and subscribes).
const REQUEST_CAPACITY: usize = 256;

/// Runs until `shutdown`; see the module docs.
pub(super) async fn run(
    shared: Arc<Shared>,
    events: EventSender,
    shutdown: Shutdown,
) -> Result<(), ProviderError> {
    let Some(tls) = shared.tls.clone() else {
        let msg = "MQTT not configured (client_cert_path and client_key_path unset): no telemetry, replies or presence from this instance";
        info!(instance = %shared.instance, "aws_iot_core: {msg}");
        shared.health.set_control_plane_only(msg.into());
        shutdown.cancelled().await;
        return Ok(());
    };
    let cfg = &shared.config;
    let min_delay = Duration::from_millis(cfg.reconnect_min_ms);
    let max_delay = Duration::from_millis(cfg.reconnect_max_ms);
    let mut delay = min_delay;
    let host = loop {
        match shared.mqtt_host().await {
            Ok(h) => break h,
            Err(e) if !e.is_retryable() => {
                shared.health.set_error(e.to_string());
                return Err(e);
            }
            Err(e) => {
                warn!(instance = %shared.instance, retry_in = ?delay, "aws_iot_core: data endpoint lookup failed: {e}");
                shared
                    .health
                    .set_error(format!("looking up the MQTT endpoint: {e}"));
                tokio::select! {
                    biased;
                    _ = shutdown.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(delay) => {}
                }
                delay = (delay * 2).min(max_delay);
            }
        }
    };

    let mut options = MqttOptions::new(cfg.client_id.clone(), host.clone(), cfg.mqtt_port);
    options
        .set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(tls)))
        .set_keep_alive(Duration::from_secs(cfg.keep_alive_secs))
        .set_clean_start(false)
        .set_session_expiry_interval(Some(cfg.session_expiry_secs))
        .set_manual_acks(true)
        .set_receive_maximum(Some(RECEIVE_MAXIMUM))
        .set_request_channel_capacity(REQUEST_CAPACITY)
        .set_max_packet_size(Some(
            u32::try_from(AWS_MAX_PAYLOAD_BYTES * 2).unwrap_or(u32::MAX),
        ));
    let (client, eventloop) = AsyncClient::new(options, REQUEST_CAPACITY);
    let settings = Settings {
        reconnect_min: min_delay,
        reconnect_max: max_delay,
        ack_capacity: usize::from(RECEIVE_MAXIMUM) * 4,
    };
    info!(instance = %shared.instance, %host, port = cfg.mqtt_port, client_id = %cfg.client_id, "aws_iot_core: connecting");
    let mut hooks = AwsHooks {
        batches: subscribe_batches(&shared),
        awaiting: VecDeque::new(),
        shared: shared.clone(),
        host,
    };
    session::drive(&mut hooks, client, eventloop, settings, events, shutdown).await
}

/// The AWS side of the shared session driver.
struct AwsHooks {
    shared: Arc<Shared>,
    /// The account's MQTT endpoint.
    host: String,
    /// The SUBSCRIBE packets made on every CONNACK.
    batches: Vec<Vec<Filter>>,
    /// Batches whose SUBACK is outstanding, oldest first (AWS answers in order).
    awaiting: VecDeque<Vec<String>>,
}

impl Hooks for AwsHooks {
    fn name(&self) -> &'static str {
        "aws_iot_core"
    }

    fn peer(&self) -> &'static str {
        "AWS"
    }

    fn instance(&self) -> &InstanceName {
        &self.shared.instance
    }

    fn health(&self) -> &HealthCell {
        &self.shared.health
    }

    fn on_connack(&mut self, eventloop: &mut EventLoop) {
        self.awaiting.clear();
        for batch in self.batches.iter().rev() {
            eventloop
                .pending
                .push_front(Request::Subscribe(Subscribe::new_many(batch.clone(), None)));
        }
        self.awaiting.extend(
            self.batches
                .iter()
                .map(|b| b.iter().map(|f| f.path.clone()).collect()),
        );
    }

    fn on_suback(&mut self, suback: &SubAck) {
        let shared = &self.shared;
        let paths = self.awaiting.pop_front().unwrap_or_default();
        let refused: Vec<String> = suback
            .return_codes
            .iter()
            .enumerate()
            .filter(|(_, code)| !matches!(code, SubscribeReasonCode::Success(_)))
            .map(|(i, code)| match paths.get(i) {
                Some(p) => format!("{p} ({code:?})"),
                None => format!("{code:?}"),
            })
            .collect();
        if self.awaiting.is_empty() {
            shared.health.set_connected(true);
        }
        if !refused.is_empty() {
            let msg = format!(
                "AWS IoT refused subscriptions {}: allow iot:Subscribe and iot:Receive on them in the gateway certificate's policy",
                refused.join(", ")
            );
            warn!(instance = %shared.instance, "aws_iot_core: {msg}");
            shared.health.note_error(msg);
        }
    }

    fn to_event(&self, publish: &Publish, handle: AckHandle) -> Option<ProviderEvent> {
        to_event(&self.shared, publish, handle)
    }

    fn fatal(&self, e: &ConnectionError) -> Option<ProviderError> {
        fatal(&self.shared, &self.host, e)
    }

    fn describe(&self, e: &ConnectionError) -> String {
        describe(&self.host, self.shared.config.mqtt_port, e)
    }
}

/// The gateway's filters at QoS 1, in SUBSCRIBE packets of at most 8.
fn subscribe_batches(shared: &Shared) -> Vec<Vec<Filter>> {
    let filters: Vec<Filter> = shared
        .topics
        .subscriptions(&shared.config.shared_group)
        .into_iter()
        .map(|s| Filter::new(s.filter, QoS::AtLeastOnce))
        .collect();
    filters
        .chunks(MAX_FILTERS_PER_SUBSCRIBE)
        .map(<[Filter]>::to_vec)
        .collect()
}

/// A connection error in words an operator can act on.
fn describe(host: &str, port: u16, e: &ConnectionError) -> String {
    let text = e.to_string();
    let lower = text.to_ascii_lowercase();
    let tls = matches!(e, ConnectionError::Tls(_))
        || ["alert", "certificate", "handshake", "tls"]
            .iter()
            .any(|w| lower.contains(w));
    if tls {
        format!(
            "TLS with {host}:{port} failed ({text}): check that client_cert_path is registered and ACTIVE in AWS IoT, that client_key_path is its key, and that ca_cert_path trusts the server"
        )
    } else {
        format!("{host}:{port}: {text}")
    }
}

/// Refusals retrying cannot fix.
fn fatal(shared: &Shared, host: &str, e: &ConnectionError) -> Option<ProviderError> {
    let ConnectionError::ConnectionRefused(code) = e else {
        return None;
    };
    let instance = shared.instance.to_string();
    let client_id = &shared.config.client_id;
    match code {
        ConnectReturnCode::BadUserNamePassword
        | ConnectReturnCode::NotAuthorized
        | ConnectReturnCode::BadAuthenticationMethod
        | ConnectReturnCode::Banned => Some(ProviderError::Unauthorized {
            instance,
            message: format!(
                "{host} refused the gateway's certificate for client id {client_id:?} ({code:?}): its policy must allow iot:Connect on client/{client_id}"
            ),
        }),
        ConnectReturnCode::ClientIdentifierNotValid | ConnectReturnCode::BadClientId => {
            Some(ProviderError::InvalidInput {
                instance,
                field: "client_id".into(),
                message: format!("{host} refused client id {client_id:?}: choose another"),
            })
        }
        _ => None,
    }
}

/// Decodes a publish into an event carrying its ack handle, or acks it at once when there
/// is nothing to report.
fn to_event(shared: &Shared, publish: &Publish, handle: AckHandle) -> Option<ProviderEvent> {
    let drop_with = |handle: AckHandle, topic: &str, reason: &str| {
        warn!(instance = %shared.instance, %topic, %reason, "aws_iot_core: message acked and dropped");
        shared.count_dropped();
        handle.ack();
        None
    };
    let topic = String::from_utf8_lossy(&publish.topic);
    let received_at = Utc::now();
    let kind = match shared.topics.classify(&topic) {
        None => return drop_with(handle, &topic, "the topic matches no template"),
        Some(Inbound::Presence {
            connected,
            client_id,
        }) => {
            if client_id == shared.config.client_id {
                handle.ack();
                return None;
            }
            match decode_presence(connected, client_id, &publish.payload) {
                Ok(p) => EventKind::Connection {
                    device_id: p.client_id,
                    connected: p.connected,
                    at: p.at,
                },
                Err(reason) => return drop_with(handle, &topic, &reason),
            }
        }
        Some(Inbound::ShadowDocuments(thing)) => match decode_shadow_documents(&publish.payload) {
            Ok(Some(r)) => EventKind::ReportedProperties {
                device_id: thing.to_owned(),
                properties: r.properties,
                at: r.at.unwrap_or(received_at),
            },
            Ok(None) => {
                handle.ack();
                return None;
            }
            Err(reason) => return drop_with(handle, &topic, &reason),
        },
        Some(found @ (Inbound::Telemetry(device) | Inbound::Reply(device))) => {
            let props = publish.properties.as_ref();
            let msg = Received {
                topic: &topic,
                payload: &publish.payload,
                message_id_property: props.and_then(|p| {
                    p.user_properties
                        .iter()
                        .find(|(k, _)| k == MESSAGE_ID_PROPERTY)
                        .map(|(_, v)| v.as_str())
                }),
                correlation_data: props.and_then(|p| p.correlation_data.as_deref()),
                received_at,
            };
            let kind = if matches!(found, Inbound::Reply(_)) {
                TopicKind::Reply
            } else {
                TopicKind::Telemetry
            };
            match mqtt_inbound::decode(kind, device, &msg, &shared.config.message_id_pointer) {
                Decoded::Event(kind) => kind,
                Decoded::Ignore => {
                    handle.ack();
                    return None;
                }
                Decoded::Unparsable(reason) => return drop_with(handle, &topic, &reason),
            }
        }
    };
    shared.devices.observe(&kind, received_at);
    Some(ProviderEvent {
        instance: shared.instance.clone(),
        kind,
        ack: handle,
    })
}
