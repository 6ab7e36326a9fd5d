//! The MQTT receive loop on the account endpoint: the only code that polls the rumqttc
//! event loop of an `aws_iot_core` instance.
//!
//! - MQTT 5 over mutual TLS with the gateway's own certificate (ALPN `x-amzn-mqtt-ca` on
//!   port 443), one persistent session (`clean_start = false`, `session_expiry_secs`) so
//!   QoS 1 messages published while the gateway is away wait at AWS.
//! - Subscriptions at QoS 1, (re)made on every CONNACK, at most 8 filters per SUBSCRIBE
//!   (AWS's limit): telemetry and replies as `$share/<shared_group>/...`; presence events
//!   and shadow update documents unshared, so every replica sees every state change.
//! - Manual acks: every QoS 1 message becomes an event whose [`AckHandle`] hands the
//!   publish to the acker task, which sends PUBACKs in arrival order (MQTT requires it)
//!   and only on the session they belong to. A nack leaves the message unacknowledged;
//!   unacknowledged messages are redelivered when a session resumes, so the loop resumes
//!   it (reconnects) once `reconnect_max_ms` have passed since the first nack.
//! - Presence events become [`EventKind::Connection`] at the event's own timestamp, so a
//!   late disconnect never overrides a newer connect; the gateway's own client id is
//!   ignored. Shadow documents with a changed reported state become
//!   [`EventKind::ReportedProperties`].
//! - On a connection error: health disconnected with the error, wait `reconnect_min_ms`
//!   doubling up to `reconnect_max_ms`, poll again. A CONNACK refusing the certificate
//!   or the client id ends the loop with an error; anything else is retried.
//! - On shutdown: send the acks already given, DISCONNECT (the session stays), return.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::Utc;
use rumqttc::v5::mqttbytes::v5::{
    ConnectReturnCode, Filter, Packet, Publish, Subscribe, SubscribeReasonCode,
};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, ConnectionError, Event, EventLoop, MqttOptions, Request};
use rumqttc::{TlsConfiguration, Transport};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::inbound::{decode_presence, decode_shadow_documents};
use super::provider::{lock, Shared, AWS_MAX_PAYLOAD_BYTES};
use super::topics::{Inbound, MAX_FILTERS_PER_SUBSCRIBE};
use crate::mqtt::inbound::{
    self as mqtt_inbound, Inbound as Decoded, Received, MESSAGE_ID_PROPERTY,
};
use crate::mqtt::topics::TopicKind;
use crate::{Ack, AckHandle, EventKind, EventSender, ProviderError, ProviderEvent, Shutdown};

/// Unacknowledged QoS 1 messages AWS may have in flight to the gateway (AWS IoT Core
/// allows 100 in-flight messages per connection).
pub const RECEIVE_MAXIMUM: u16 = 100;

/// Capacity of rumqttc's request channel (acks and subscribes).
const REQUEST_CAPACITY: usize = 256;

/// How long shutdown waits to flush acks and the DISCONNECT.
const SHUTDOWN_FLUSH: Duration = Duration::from_secs(2);

/// A publish to acknowledge, tagged with its session and arrival number.
struct AckRequest {
    seq: u64,
    session: u64,
    verdict: Ack,
    publish: Publish,
}

#[derive(Default)]
struct SessionState {
    /// Bumped on every CONNACK without a present session.
    session: AtomicU64,
    /// When the first unresolved nack arrived (cleared by a session resume).
    nacked_since: Mutex<Option<Instant>>,
    /// Arrival number of the next QoS 1 publish.
    next_seq: AtomicU64,
}

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
    let (client, mut eventloop) = AsyncClient::new(options, REQUEST_CAPACITY);
    let state = Arc::new(SessionState::default());
    let (ack_tx, ack_rx) = mpsc::unbounded_channel();
    let acker_stop = shutdown.child_token();
    let acker = tokio::spawn(acker(
        client.clone(),
        ack_rx,
        state.clone(),
        acker_stop.clone(),
    ));
    let batches = subscribe_batches(&shared);
    // Batches whose SUBACK is outstanding, oldest first (AWS answers in order).
    let mut awaiting: VecDeque<Vec<String>> = VecDeque::new();
    delay = min_delay;
    info!(instance = %shared.instance, %host, port = cfg.mqtt_port, client_id = %cfg.client_id, "aws_iot_core: connecting");

    let result = loop {
        let polled = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break Ok(()),
            polled = eventloop.poll() => polled,
        };
        match polled {
            Ok(Event::Incoming(Packet::ConnAck(connack))) => {
                delay = min_delay;
                if !connack.session_present {
                    state.session.fetch_add(1, Ordering::AcqRel);
                }
                *lock(&state.nacked_since) = None;
                info!(instance = %shared.instance, session_present = connack.session_present, "aws_iot_core: connected, subscribing");
                awaiting.clear();
                for batch in batches.iter().rev() {
                    eventloop
                        .pending
                        .push_front(Request::Subscribe(Subscribe::new_many(batch.clone(), None)));
                }
                awaiting.extend(
                    batches
                        .iter()
                        .map(|b| b.iter().map(|f| f.path.clone()).collect()),
                );
            }
            Ok(Event::Incoming(Packet::SubAck(suback))) => {
                let paths = awaiting.pop_front().unwrap_or_default();
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
                if awaiting.is_empty() {
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
            Ok(Event::Incoming(Packet::Publish(publish))) => {
                let session = state.session.load(Ordering::Acquire);
                let seq = if publish.qos == QoS::AtMostOnce {
                    0
                } else {
                    state.next_seq.fetch_add(1, Ordering::AcqRel)
                };
                if let Some(event) = to_event(&shared, &publish, (seq, session), &ack_tx) {
                    tokio::select! {
                        biased;
                        _ = shutdown.cancelled() => break Ok(()),
                        sent = events.send(event) => if sent.is_err() {
                            info!(instance = %shared.instance, "aws_iot_core: event receiver closed, stopping");
                            break Ok(());
                        },
                    }
                }
            }
            Ok(_) => {}
            Err(e) => {
                if let Some(fatal) = fatal(&shared, &host, &e) {
                    shared.health.set_error(fatal.to_string());
                    break Err(fatal);
                }
                let msg = describe(&host, cfg.mqtt_port, &e);
                warn!(instance = %shared.instance, retry_in = ?delay, "aws_iot_core: connection lost: {msg}");
                shared.health.set_error(msg);
                tokio::select! {
                    biased;
                    _ = shutdown.cancelled() => break Ok(()),
                    _ = tokio::time::sleep(delay) => {}
                }
                delay = (delay * 2).min(max_delay);
                continue;
            }
        }
        resume_after_nack(&shared, &state, &mut eventloop, max_delay);
    };

    acker_stop.cancel();
    if tokio::time::timeout(SHUTDOWN_FLUSH, acker).await.is_err() {
        debug!(instance = %shared.instance, "aws_iot_core: acker did not finish in time");
    }
    disconnect(&client, &mut eventloop).await;
    info!(instance = %shared.instance, "aws_iot_core: stopped");
    result
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

/// Decodes a publish into an event with its ack handle, or acks it at once when there is
/// nothing to report.
fn to_event(
    shared: &Shared,
    publish: &Publish,
    (seq, session): (u64, u64),
    ack_tx: &mpsc::UnboundedSender<AckRequest>,
) -> Option<ProviderEvent> {
    let handle = || {
        if publish.qos == QoS::AtMostOnce {
            return AckHandle::none();
        }
        let tx = ack_tx.clone();
        let publish = publish.clone();
        AckHandle::new(move |verdict| {
            // The acker is gone once run stopped; AWS then redelivers, as for a nack.
            let _ = tx.send(AckRequest {
                seq,
                session,
                verdict,
                publish,
            });
        })
    };
    let drop_with = |topic: &str, reason: &str| {
        warn!(instance = %shared.instance, %topic, %reason, "aws_iot_core: message acked and dropped");
        shared.count_dropped();
        handle().ack();
        None
    };
    let topic = String::from_utf8_lossy(&publish.topic);
    let received_at = Utc::now();
    let kind = match shared.topics.classify(&topic) {
        None => return drop_with(&topic, "the topic matches no template"),
        Some(Inbound::Presence {
            connected,
            client_id,
        }) => {
            if client_id == shared.config.client_id {
                handle().ack();
                return None;
            }
            match decode_presence(connected, client_id, &publish.payload) {
                Ok(p) => EventKind::Connection {
                    device_id: p.client_id,
                    connected: p.connected,
                    at: p.at,
                },
                Err(reason) => return drop_with(&topic, &reason),
            }
        }
        Some(Inbound::ShadowDocuments(thing)) => match decode_shadow_documents(&publish.payload) {
            Ok(Some(r)) => EventKind::ReportedProperties {
                device_id: thing.to_owned(),
                properties: r.properties,
                at: r.at.unwrap_or(received_at),
            },
            Ok(None) => {
                handle().ack();
                return None;
            }
            Err(reason) => return drop_with(&topic, &reason),
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
                    handle().ack();
                    return None;
                }
                Decoded::Unparsable(reason) => return drop_with(&topic, &reason),
            }
        }
    };
    shared.devices.observe(&kind, received_at);
    Some(ProviderEvent {
        instance: shared.instance.clone(),
        kind,
        ack: handle(),
    })
}

/// Sends PUBACKs of the current session in arrival order; notes nacks. On stop it drains
/// the acks already given, then ends.
async fn acker(
    client: AsyncClient,
    mut rx: mpsc::UnboundedReceiver<AckRequest>,
    state: Arc<SessionState>,
    stop: Shutdown,
) {
    let mut next: u64 = 0;
    let mut waiting: BTreeMap<u64, AckRequest> = BTreeMap::new();
    loop {
        let req = tokio::select! {
            biased;
            req = rx.recv() => req,
            _ = stop.cancelled() => {
                while let Ok(req) = rx.try_recv() {
                    waiting.insert(req.seq, req);
                }
                while let Some(req) = waiting.remove(&next) {
                    next += 1;
                    // The event loop is no longer polled: do not wait for queue room.
                    if matches!(req.verdict, Ack::Ack) && current(&state, &req) {
                        let _ = client.try_ack(&req.publish);
                    }
                }
                return;
            }
        };
        let Some(req) = req else { return };
        waiting.insert(req.seq, req);
        while let Some(req) = waiting.remove(&next) {
            next += 1;
            match &req.verdict {
                Ack::Ack if current(&state, &req) => {
                    if client.ack(&req.publish).await.is_err() {
                        return;
                    }
                }
                Ack::Ack => debug!(
                    pkid = req.publish.pkid,
                    "aws_iot_core: ack of an earlier session dropped"
                ),
                Ack::Nack(reason) => {
                    debug!(pkid = req.publish.pkid, %reason, "aws_iot_core: nack, redelivered on the next session resume");
                    lock(&state.nacked_since).get_or_insert_with(Instant::now);
                }
            }
        }
    }
}

fn current(state: &SessionState, req: &AckRequest) -> bool {
    state.session.load(Ordering::Acquire) == req.session
}

/// Nacked messages come back only when the session resumes: reconnect (same session) once
/// `after` has passed since the first nack.
fn resume_after_nack(
    shared: &Shared,
    state: &SessionState,
    eventloop: &mut EventLoop,
    after: Duration,
) {
    let mut nacked = lock(&state.nacked_since);
    if nacked.is_some_and(|since| since.elapsed() >= after) {
        *nacked = None;
        info!(instance = %shared.instance, "aws_iot_core: resuming the session so AWS redelivers nacked messages");
        eventloop.clean();
    }
}

/// DISCONNECT after what is queued (the session stays), then read until the server
/// closes, within [`SHUTDOWN_FLUSH`].
async fn disconnect(client: &AsyncClient, eventloop: &mut EventLoop) {
    if client.try_disconnect().is_err() {
        return;
    }
    let _ = tokio::time::timeout(SHUTDOWN_FLUSH, async {
        while eventloop.poll().await.is_ok() {}
    })
    .await;
}
