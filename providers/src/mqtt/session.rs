//! The receive loop: the only code that polls the rumqttc event loop.
//!
//! - One persistent session (`clean_start = false`, session expiry one day) so QoS 1
//!   messages published while the gateway is away wait at the broker.
//! - Manual acks: every QoS 1 message becomes an event whose [`AckHandle`] hands the
//!   publish to the acker task; only [`crate::Ack::Ack`] sends the PUBACK. A nack or a
//!   dropped handle leaves the message unacknowledged, and MQTT redelivers unacknowledged
//!   messages only when a session resumes. So after a nack the loop resumes the session
//!   (closes and reopens the connection) once `reconnect_max_ms` have passed, checked at
//!   the next packet or keep-alive ping.
//! - An ack is sent only on the session it belongs to: when the broker reports a new
//!   session (session lost) older acks are dropped, since their packet ids now name other
//!   messages.
//! - Subscriptions at QoS 1 are (re)made on every CONNACK: telemetry, reply and reported
//!   as `$share/{shared_group}/...`, status never shared (brokers send no retained
//!   messages on shared subscriptions, and every replica needs the statuses), with
//!   "retain only on new subscription" so a resumed session does not replay statuses.
//!   Health turns connected when the SUBACK arrives.
//! - On a connection error: health disconnected with the error, wait `reconnect_min_ms`
//!   doubling up to `reconnect_max_ms` (reset by a CONNACK), poll again. A CONNACK refusing
//!   the credentials or client id ends the loop with an error; anything else is retried.
//! - On shutdown: send the acks already given, DISCONNECT (the session stays), return.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::Utc;
use rumqttc::v5::mqttbytes::v5::{
    ConnectReturnCode, Filter, Packet, Publish, RetainForwardRule, SubscribeReasonCode,
};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, ConnectionError, Event, EventLoop, Request};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::inbound::{self, Inbound, Received, MESSAGE_ID_PROPERTY};
use super::provider::{lock, Shared};
use crate::{Ack, AckHandle, EventSender, ProviderError, ProviderEvent, Shutdown};

/// How long shutdown waits to flush acks and the DISCONNECT.
const SHUTDOWN_FLUSH: Duration = Duration::from_secs(2);

/// A publish to acknowledge, tagged with the session it arrived on and its place in the
/// order of arrival (PUBACKs go out in that order, as MQTT requires).
struct AckRequest {
    seq: u64,
    session: u64,
    verdict: Ack,
    publish: Publish,
}

/// Session bookkeeping shared with the acker.
#[derive(Default)]
struct SessionState {
    /// Bumped on every CONNACK without a present session.
    session: AtomicU64,
    /// When the first unresolved nack arrived (cleared by a session resume).
    nacked_since: Mutex<Option<Instant>>,
    /// Arrival number of the next QoS 1/2 publish (orders the PUBACKs).
    next_seq: AtomicU64,
}

/// Runs until `shutdown`; see the module docs.
pub(super) async fn run(
    shared: Arc<Shared>,
    events: EventSender,
    shutdown: Shutdown,
) -> Result<(), ProviderError> {
    let (client, mut eventloop) =
        AsyncClient::new(shared.mqtt_options(), super::provider::REQUEST_CAPACITY);
    shared.set_client(Some(client.clone()));
    let state = Arc::new(SessionState::default());
    let (ack_tx, ack_rx) = mpsc::unbounded_channel();
    let acker_stop = shutdown.child_token();
    let acker = tokio::spawn(acker(
        client.clone(),
        ack_rx,
        state.clone(),
        acker_stop.clone(),
    ));
    let cfg = &shared.config;
    let min_delay = Duration::from_millis(cfg.reconnect_min_ms);
    let max_delay = Duration::from_millis(cfg.reconnect_max_ms);
    let mut delay = min_delay;
    info!(instance = %shared.instance, host = %cfg.host, port = cfg.port, client_id = %cfg.client_id, "mqtt: connecting");

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
                info!(instance = %shared.instance, session_present = connack.session_present, "mqtt: connected, subscribing");
                eventloop
                    .pending
                    .push_front(Request::Subscribe(subscription(&shared)));
            }
            Ok(Event::Incoming(Packet::SubAck(suback))) => {
                let refused: Vec<String> = suback
                    .return_codes
                    .iter()
                    .zip(filters(&shared))
                    .filter(|(code, _)| !matches!(code, SubscribeReasonCode::Success(_)))
                    .map(|(code, f)| format!("{} ({code:?})", f.path))
                    .collect();
                shared.health.set_connected(true);
                if !refused.is_empty() {
                    let msg = format!(
                        "broker refused subscriptions {}: grant the gateway's user subscribe access",
                        refused.join(", ")
                    );
                    warn!(instance = %shared.instance, "mqtt: {msg}");
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
                            info!(instance = %shared.instance, "mqtt: event receiver closed, stopping");
                            break Ok(());
                        },
                    }
                }
            }
            Ok(_) => {}
            Err(e) => {
                if let Some(fatal) = fatal(&shared, &e) {
                    shared.health.set_error(fatal.to_string());
                    break Err(fatal);
                }
                let msg = format!("broker {}:{}: {e}", cfg.host, cfg.port);
                warn!(instance = %shared.instance, retry_in = ?delay, "mqtt: connection lost: {msg}");
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
        debug!(instance = %shared.instance, "mqtt: acker did not finish in time");
    }
    disconnect(&client, &mut eventloop).await;
    info!(instance = %shared.instance, "mqtt: stopped");
    result
}

/// The filters of the gateway's session, in a fixed order (SUBACK codes follow it).
fn filters(shared: &Shared) -> [Filter; 4] {
    let t = &shared.topics;
    let group = &shared.config.shared_group;
    let filter = |path: String, retain| Filter {
        path,
        qos: QoS::AtLeastOnce,
        nolocal: false,
        preserve_retain: false,
        retain_forward_rule: retain,
    };
    [
        filter(
            t.telemetry.shared_filter(group),
            RetainForwardRule::OnEverySubscribe,
        ),
        filter(t.status.filter(), RetainForwardRule::OnNewSubscribe),
        filter(
            t.reply.shared_filter(group),
            RetainForwardRule::OnEverySubscribe,
        ),
        filter(
            t.reported.shared_filter(group),
            RetainForwardRule::OnEverySubscribe,
        ),
    ]
}

fn subscription(shared: &Shared) -> rumqttc::v5::mqttbytes::v5::Subscribe {
    rumqttc::v5::mqttbytes::v5::Subscribe::new_many(filters(shared), None)
}

/// Refusals retrying cannot fix.
fn fatal(shared: &Shared, e: &ConnectionError) -> Option<ProviderError> {
    let ConnectionError::ConnectionRefused(code) = e else {
        return None;
    };
    let instance = shared.instance.to_string();
    match code {
        ConnectReturnCode::BadUserNamePassword
        | ConnectReturnCode::NotAuthorized
        | ConnectReturnCode::BadAuthenticationMethod
        | ConnectReturnCode::Banned => Some(ProviderError::Unauthorized {
            instance,
            message: format!(
                "broker {}:{} refused user {:?} ({code:?}): check username and password of this instance",
                shared.config.host,
                shared.config.port,
                shared.config.username.as_deref().unwrap_or("<none>")
            ),
        }),
        ConnectReturnCode::ClientIdentifierNotValid | ConnectReturnCode::BadClientId => {
            Some(ProviderError::InvalidInput {
                instance,
                field: "client_id".into(),
                message: format!("broker refused client id {:?}: choose another", shared.config.client_id),
            })
        }
        _ => None,
    }
}

/// Decodes a publish into an event with its ack handle, or acks it right away when there
/// is nothing to report.
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
            // The acker is gone once run stopped; the broker then redelivers, as for a nack.
            let _ = tx.send(AckRequest {
                seq,
                session,
                verdict,
                publish,
            });
        })
    };
    let topic = String::from_utf8_lossy(&publish.topic);
    let Some((kind, device_id)) = shared.topics.classify(&topic) else {
        warn!(instance = %shared.instance, %topic, "mqtt: message on a topic matching no template, dropped");
        shared.count_dropped();
        handle().ack();
        return None;
    };
    if shared.barrier_passed(kind, device_id) {
        handle().ack();
        return None;
    }
    let props = publish.properties.as_ref();
    let received_at = Utc::now();
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
    match inbound::decode(kind, device_id, &msg, &shared.config.message_id_pointer) {
        Inbound::Event(kind) => {
            shared.devices.observe(&kind, received_at);
            Some(ProviderEvent {
                instance: shared.instance.clone(),
                kind,
                ack: handle(),
            })
        }
        Inbound::Ignore => {
            handle().ack();
            None
        }
        Inbound::Unparsable(reason) => {
            warn!(instance = %shared.instance, %topic, %reason, "mqtt: unparsable message acked and dropped");
            shared.count_dropped();
            handle().ack();
            None
        }
    }
}

/// Sends the PUBACK of acked publishes of the current session, in arrival order (a verdict
/// that comes early waits for the ones before it: MQTT requires PUBACKs in the order of
/// the PUBLISHes, and some brokers drop the connection otherwise); notes nacks. On stop it
/// drains the acks already given, then ends.
async fn acker(
    client: AsyncClient,
    mut rx: mpsc::UnboundedReceiver<AckRequest>,
    state: Arc<SessionState>,
    stop: Shutdown,
) {
    let mut next: u64 = 0;
    let mut waiting: std::collections::BTreeMap<u64, AckRequest> =
        std::collections::BTreeMap::new();
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
                    if let (Ack::Ack, true) = (&req.verdict, current(&state, &req)) {
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
            if !resolve(&client, &state, req).await {
                return;
            }
        }
    }
}

/// Sends one verdict; false when the client is gone.
async fn resolve(client: &AsyncClient, state: &SessionState, req: AckRequest) -> bool {
    match &req.verdict {
        Ack::Ack if current(state, &req) => {
            if client.ack(&req.publish).await.is_err() {
                return false;
            }
        }
        Ack::Ack => debug!(
            pkid = req.publish.pkid,
            "mqtt: ack of an earlier session dropped"
        ),
        Ack::Nack(reason) => {
            debug!(pkid = req.publish.pkid, %reason, "mqtt: nack, redelivered on the next session resume");
            lock(&state.nacked_since).get_or_insert_with(Instant::now);
        }
    }
    true
}

fn current(state: &SessionState, req: &AckRequest) -> bool {
    state.session.load(Ordering::Acquire) == req.session
}

/// Nacked messages come back only when the session resumes: drop the connection (the
/// next poll reconnects with the same session) once `after` has passed since the first
/// nack.
fn resume_after_nack(
    shared: &Shared,
    state: &SessionState,
    eventloop: &mut EventLoop,
    after: Duration,
) {
    let mut nacked = lock(&state.nacked_since);
    if nacked.is_some_and(|since| since.elapsed() >= after) {
        *nacked = None;
        info!(instance = %shared.instance, "mqtt: resuming the session so the broker redelivers nacked messages");
        eventloop.clean();
    }
}

/// Sends DISCONNECT (normal: the broker keeps the session) after what is queued, then
/// reads until the broker closes the connection, within [`SHUTDOWN_FLUSH`]. Closing our
/// side with unread input would reset the connection, and the broker could lose the
/// last acks and the DISCONNECT.
async fn disconnect(client: &AsyncClient, eventloop: &mut EventLoop) {
    if client.try_disconnect().is_err() {
        return;
    }
    let _ = tokio::time::timeout(SHUTDOWN_FLUSH, async {
        // Until the broker's EOF (an error); incoming publishes stay unacked for the next run.
        while eventloop.poll().await.is_ok() {}
    })
    .await;
}
