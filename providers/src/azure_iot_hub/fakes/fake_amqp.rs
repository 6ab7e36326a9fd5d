//! A recording fake of IoT Hub's AMQP service endpoint (fe2o3-amqp's acceptor inside
//! tokio-rustls, TLS straight away as on port 5671; SASL offering `MSSBCBS` and
//! `ANONYMOUS` like Azure's AMQP endpoints, recording the one the client picks).
//!
//! It answers CBS `put-token` requests on `$cbs` (status 200 when the SAS token verifies
//! with the policy key, 401 otherwise), accepts messages on `/messages/devicebound`, sends
//! queued delivery feedback ([`FakeAmqp::feedback`]) on `/messages/servicebound/feedback`
//! (again after a release, as the hub does), and records what it saw: link targets,
//! put-token requests, messages with their properties, how feedback was settled.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use fe2o3_amqp::acceptor::sasl_acceptor::{SaslAcceptor, SaslServerFrame};
use fe2o3_amqp::acceptor::{
    ConnectionAcceptor, LinkAcceptor, LinkEndpoint, SessionAcceptor, SupportedReceiverSettleModes,
};
use fe2o3_amqp::types::definitions::ReceiverSettleMode;
use fe2o3_amqp::types::messaging::{ApplicationProperties, Body, Message, MessageId, Properties};
use fe2o3_amqp::types::primitives::{Array, Symbol};
use fe2o3_amqp::types::primitives::{SimpleValue, Value};
use fe2o3_amqp::types::sasl::{SaslCode, SaslInit, SaslOutcome, SaslResponse};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::fake_hub::sas_valid;
use super::pki::pki;

/// A CBS put-token request as received.
#[derive(Clone, Debug, PartialEq)]
pub struct PutTokenRecord {
    /// Application properties (`operation`, `type`, `name`, `expiration`), as text.
    pub properties: BTreeMap<String, String>,
    /// The token (the message's string value).
    pub token: String,
    /// Whether it verified with the policy key.
    pub valid: bool,
}

/// A message received on `/messages/devicebound`.
#[derive(Clone, Debug, PartialEq)]
pub struct C2dRecord {
    /// `message-id`.
    pub message_id: Option<String>,
    /// `to`.
    pub to: Option<String>,
    /// `correlation-id`.
    pub correlation_id: Option<String>,
    /// `content-type`.
    pub content_type: Option<String>,
    /// `content-encoding`.
    pub content_encoding: Option<String>,
    /// `absolute-expiry-time`, milliseconds since the epoch.
    pub absolute_expiry_time: Option<i64>,
    /// Application properties, as text.
    pub application_properties: BTreeMap<String, String>,
    /// The body (data sections joined, or a string value).
    pub body: Vec<u8>,
}

/// Everything the fake saw.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct AmqpLog {
    /// The SASL mechanism each connection chose.
    pub sasl_mechanisms: Vec<String>,
    /// Target addresses of the links the client attached as sender.
    pub sender_targets: Vec<String>,
    /// Source addresses of the links the client attached as receiver.
    pub receiver_sources: Vec<String>,
    /// CBS requests.
    pub put_tokens: Vec<PutTokenRecord>,
    /// C2D messages.
    pub messages: Vec<C2dRecord>,
    /// Deliveries the fake could not decode (with the reason).
    pub errors: Vec<String>,
    /// How the client settled each feedback message sent on
    /// `/messages/servicebound/feedback` (`accepted`, `released`, `rejected`, ...), in order.
    pub feedback_outcomes: Vec<String>,
}

/// Feedback messages waiting for a receiver on `/messages/servicebound/feedback`.
#[derive(Default)]
struct FeedbackQueue {
    waiting: Mutex<std::collections::VecDeque<Vec<u8>>>,
    ready: tokio::sync::Notify,
}

/// A running fake AMQP endpoint.
pub struct FakeAmqp {
    /// Its port on 127.0.0.1.
    pub port: u16,
    log: Arc<Mutex<AmqpLog>>,
    feedback: Arc<FeedbackQueue>,
    stop: CancellationToken,
}

impl Drop for FakeAmqp {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

pub(crate) fn text(v: &SimpleValue) -> String {
    match v {
        SimpleValue::String(s) => s.clone(),
        SimpleValue::Symbol(s) => s.0.clone(),
        SimpleValue::Timestamp(t) => t.milliseconds().to_string(),
        SimpleValue::Bool(b) => b.to_string(),
        SimpleValue::Int(i) => i.to_string(),
        SimpleValue::Uint(i) => i.to_string(),
        SimpleValue::Long(i) => i.to_string(),
        SimpleValue::Ulong(i) => i.to_string(),
        other => format!("{other:?}"),
    }
}

pub(crate) fn id_text(m: &MessageId) -> String {
    match m {
        MessageId::String(s) => s.clone(),
        MessageId::Ulong(u) => u.to_string(),
        MessageId::Uuid(u) => format!("{u:?}"),
        MessageId::Binary(b) => String::from_utf8_lossy(b).into_owned(),
    }
}

pub(crate) fn app_props(m: &Message<Body<Value>>) -> BTreeMap<String, String> {
    m.application_properties
        .as_ref()
        .map(|ap| ap.0.iter().map(|(k, v)| (k.clone(), text(v))).collect())
        .unwrap_or_default()
}

pub(crate) fn body_bytes(b: &Body<Value>) -> Vec<u8> {
    match b {
        Body::Data(batch) => batch.iter().flat_map(|d| d.0.to_vec()).collect(),
        Body::Value(v) => match &v.0 {
            Value::String(s) => s.clone().into_bytes(),
            Value::Binary(b) => b.to_vec(),
            other => format!("{other:?}").into_bytes(),
        },
        other => format!("{other:?}").into_bytes(),
    }
}

impl FakeAmqp {
    /// Starts the fake on a free loopback port.
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("address").port();
        let log = Arc::new(Mutex::new(AmqpLog::default()));
        let stop = CancellationToken::new();
        let tls = tokio_rustls::TlsAcceptor::from(pki().server.clone());
        let feedback = Arc::new(FeedbackQueue::default());
        let (l, halt, fbq) = (log.clone(), stop.clone(), feedback.clone());
        tokio::spawn(async move {
            loop {
                let tcp = tokio::select! {
                    () = halt.cancelled() => return,
                    r = listener.accept() => match r { Ok((t, _)) => t, Err(_) => continue },
                };
                let (tls, l, halt, fb) = (tls.clone(), l.clone(), halt.clone(), fbq.clone());
                tokio::spawn(async move {
                    let Ok(stream) = tls.accept(tcp).await else {
                        return;
                    };
                    let acceptor = ConnectionAcceptor::builder()
                        .container_id("fake-iot-hub")
                        .sasl_acceptor(CbsSasl {
                            chosen: {
                                let l = l.clone();
                                Arc::new(move |m| l.lock().expect("lock").sasl_mechanisms.push(m))
                            },
                        })
                        .build();
                    let Ok(mut conn) = acceptor.accept(stream).await else {
                        return;
                    };
                    loop {
                        let incoming = tokio::select! {
                            () = halt.cancelled() => return,
                            s = conn.next_incoming_session() => match s { Some(s) => s, None => return },
                        };
                        let Ok(session) = SessionAcceptor::new()
                            .accept_incoming_session(incoming, &mut conn)
                            .await
                        else {
                            return;
                        };
                        tokio::spawn(serve_session(session, l.clone(), fb.clone()));
                    }
                });
            }
        });
        Self {
            port,
            log,
            feedback,
            stop,
        }
    }

    /// Queues a feedback message (its body: `records`, a JSON array as IoT Hub sends) for
    /// the next receiver on `/messages/servicebound/feedback`; a message the receiver
    /// releases is queued again, as the hub delivers it again.
    pub fn feedback(&self, records: &serde_json::Value) {
        self.feedback
            .waiting
            .lock()
            .expect("lock")
            .push_back(records.to_string().into_bytes());
        self.feedback.ready.notify_one();
    }

    /// What the fake saw so far (then forgets it).
    pub fn take(&self) -> AmqpLog {
        std::mem::take(&mut *self.log.lock().expect("lock"))
    }

    /// What the fake saw so far.
    pub fn peek(&self) -> AmqpLog {
        self.log.lock().expect("lock").clone()
    }
}

/// SASL as Azure's AMQP endpoints offer it: `MSSBCBS` (credentials follow on `$cbs`) and
/// `ANONYMOUS`; both succeed at once, the token check happens on `$cbs`. `chosen` records
/// the mechanism each connection picks. Shared by the fakes of the C2D and the Event
/// Hubs-compatible endpoints.
#[derive(Clone)]
pub(crate) struct CbsSasl {
    pub(crate) chosen: Arc<dyn Fn(String) + Send + Sync>,
}

impl SaslAcceptor for CbsSasl {
    fn mechanisms(&self) -> Array<Symbol> {
        Array::from(vec![Symbol::from("MSSBCBS"), Symbol::from("ANONYMOUS")])
    }

    fn on_init(&mut self, init: SaslInit) -> SaslServerFrame {
        let known = ["MSSBCBS", "ANONYMOUS"].contains(&init.mechanism.0.as_str());
        (self.chosen)(init.mechanism.0);
        SaslServerFrame::Outcome(SaslOutcome {
            code: if known { SaslCode::Ok } else { SaslCode::Auth },
            additional_data: None,
        })
    }

    fn on_response(&mut self, _response: SaslResponse) -> SaslServerFrame {
        SaslServerFrame::Outcome(SaslOutcome {
            code: SaslCode::Sys,
            additional_data: None,
        })
    }
}

/// A management answer (`$cbs`, `$management`): `status-code`, `status-description` and
/// the request's message id as correlation id.
pub(crate) fn status_reply(
    correlation: Option<MessageId>,
    code: u16,
    description: &str,
    body: Value,
) -> Message<fe2o3_amqp::types::messaging::AmqpValue<Value>> {
    Message::builder()
        .properties(Properties {
            correlation_id: correlation,
            ..Properties::default()
        })
        .application_properties(
            ApplicationProperties::builder()
                .insert("status-code", SimpleValue::Int(i32::from(code)))
                .insert("status-description", description)
                .build(),
        )
        .value(body)
        .build()
}

async fn serve_session(
    mut session: fe2o3_amqp::acceptor::ListenerSessionHandle,
    log: Arc<Mutex<AmqpLog>>,
    feedback: Arc<FeedbackQueue>,
) {
    // CBS answers go out on the client's receiver link of `$cbs`.
    let (reply_tx, reply_rx) =
        mpsc::channel::<Message<fe2o3_amqp::types::messaging::AmqpValue<Value>>>(16);
    let mut reply_rx = Some(reply_rx);
    // Like the hub, settle on the first disposition (rcv-settle-mode first), whatever the
    // client asks for.
    let acceptor = LinkAcceptor::builder()
        .supported_receiver_settle_modes(SupportedReceiverSettleModes::First)
        .fallback_receiver_settle_mode(ReceiverSettleMode::First)
        .build();
    loop {
        let Ok(link) = acceptor.accept(&mut session).await else {
            return;
        };
        match link {
            LinkEndpoint::Receiver(mut receiver) => {
                let target = receiver
                    .target()
                    .as_ref()
                    .and_then(|t| t.address.clone())
                    .unwrap_or_default();
                log.lock()
                    .expect("lock")
                    .sender_targets
                    .push(target.clone());
                let (log, reply_tx) = (log.clone(), reply_tx.clone());
                tokio::spawn(async move {
                    loop {
                        let delivery = match receiver.recv::<Body<Value>>().await {
                            Ok(d) => d,
                            Err(e) => {
                                log.lock()
                                    .expect("lock")
                                    .errors
                                    .push(format!("on {target}: {e:?}"));
                                return;
                            }
                        };
                        let _ = receiver.accept(&delivery).await;
                        let message = delivery.into_message();
                        let props = message.properties.clone().unwrap_or_default();
                        if target == "$cbs" {
                            let token =
                                String::from_utf8(body_bytes(&message.body)).unwrap_or_default();
                            let valid = sas_valid(&token);
                            log.lock().expect("lock").put_tokens.push(PutTokenRecord {
                                properties: app_props(&message),
                                token,
                                valid,
                            });
                            let (code, description) = if valid {
                                (200, "OK")
                            } else {
                                (401, "Unauthorized")
                            };
                            let reply = status_reply(
                                props.message_id.clone(),
                                code,
                                description,
                                Value::Null,
                            );
                            let _ = reply_tx.send(reply).await;
                        } else {
                            log.lock().expect("lock").messages.push(C2dRecord {
                                message_id: props.message_id.as_ref().map(id_text),
                                to: props.to.clone(),
                                correlation_id: props.correlation_id.as_ref().map(id_text),
                                content_type: props.content_type.as_ref().map(|s| s.0.clone()),
                                content_encoding: props
                                    .content_encoding
                                    .as_ref()
                                    .map(|s| s.0.clone()),
                                absolute_expiry_time: props
                                    .absolute_expiry_time
                                    .as_ref()
                                    .map(|t| t.milliseconds()),
                                application_properties: app_props(&message),
                                body: body_bytes(&message.body),
                            });
                        }
                    }
                });
            }
            LinkEndpoint::Sender(mut sender) => {
                let source = sender
                    .source()
                    .as_ref()
                    .and_then(|s| s.address.clone())
                    .unwrap_or_default();
                log.lock()
                    .expect("lock")
                    .receiver_sources
                    .push(source.clone());
                if source == "/messages/servicebound/feedback" {
                    tokio::spawn(serve_feedback(sender, feedback.clone(), log.clone()));
                    continue;
                }
                if let Some(mut rx) = reply_rx.take() {
                    tokio::spawn(async move {
                        while let Some(reply) = rx.recv().await {
                            if sender.send(reply).await.is_err() {
                                return;
                            }
                        }
                    });
                }
            }
        }
    }
}

/// Sends queued feedback messages on the client's feedback receiver and records how the
/// client settles each; a released (or unsettled) one goes back to the front of the queue.
async fn serve_feedback(
    mut sender: fe2o3_amqp::link::Sender,
    queue: Arc<FeedbackQueue>,
    log: Arc<Mutex<AmqpLog>>,
) {
    loop {
        let next = queue.waiting.lock().expect("lock").pop_front();
        let Some(body) = next else {
            queue.ready.notified().await;
            continue;
        };
        let message = Message::builder()
            .properties(Properties {
                content_type: Some("application/vnd.microsoft.iothub.feedback.json".into()),
                ..Properties::default()
            })
            .data(fe2o3_amqp::types::primitives::Binary::from(body.clone()))
            .build();
        let outcome = sender.send(message).await;
        let label = match &outcome {
            Ok(fe2o3_amqp::types::messaging::Outcome::Accepted(_)) => "accepted".to_owned(),
            Ok(fe2o3_amqp::types::messaging::Outcome::Released(_)) => "released".to_owned(),
            Ok(fe2o3_amqp::types::messaging::Outcome::Rejected(_)) => "rejected".to_owned(),
            Ok(other) => format!("{other:?}"),
            Err(e) => format!("not settled: {e}"),
        };
        log.lock().expect("lock").feedback_outcomes.push(label);
        match outcome {
            Ok(fe2o3_amqp::types::messaging::Outcome::Accepted(_))
            | Ok(fe2o3_amqp::types::messaging::Outcome::Rejected(_)) => {}
            Ok(_) => {
                queue.waiting.lock().expect("lock").push_front(body);
            }
            Err(_) => {
                queue.waiting.lock().expect("lock").push_front(body);
                queue.ready.notify_one();
                return;
            }
        }
    }
}
