//! A recording fake of IoT Hub's Event Hubs-compatible endpoint, on plain AMQP (no TLS,
//! like the Event Hubs emulator) on a free 127.0.0.1 port; fe2o3-amqp's acceptor.
//!
//! What it does, as the service does it:
//! - SASL `MSSBCBS` and `ANONYMOUS`; credentials follow on `$cbs`: a `put-token` of type
//!   `servicebus.windows.net:sastoken` is answered `202` when the token verifies with
//!   [`POLICY_KEY`] the way Event Hubs signs (HMAC-SHA256 keyed with the key's text, not its
//!   base64-decoded bytes as IoT Hub's own endpoints do) and covers this fake's entity,
//!   `401` otherwise;
//! - `$management` `READ` of `com.microsoft:eventhub` (name, `created_at`, `partition_count`,
//!   `partition_ids` as an AMQP array) and of `com.microsoft:partition`, each checking the
//!   request's `security_token`;
//! - replies go out on the client's receiver link of the same node (preferring the one
//!   whose address is the request's `reply-to`), with `correlation-id` = the request's
//!   `message-id`;
//! - a receiver on `.../{entity}/ConsumerGroups/{group}/Partitions/{p}` is refused (attach
//!   without a source, then a detach with `amqp:unauthorized-access`) unless a valid token
//!   for the entity was put on that connection; otherwise it gets, as link credit allows,
//!   every stored event after its selector filter (`amqp.annotation.x-opt-offset > '-1'`,
//!   `> '@latest'`, `>'<offset>'`, sequence number, enqueued time), then new ones as
//!   [`FakeEventHubs::publish`] appends them.
//!
//! Events carry `x-opt-sequence-number` (long), `x-opt-offset` (string) and
//! `x-opt-enqueued-time` (timestamp) plus the event's own annotations (IoT Hub's `iothub-*`;
//! `iothub-enqueuedtime` as a timestamp), application properties, `message-id` and a data
//! body. Everything is held in memory; dropping the fake stops it.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use fe2o3_amqp::acceptor::{
    ConnectionAcceptor, LinkAcceptor, LinkEndpoint, ListenerSessionHandle, SessionAcceptor,
};
use fe2o3_amqp::types::definitions::{self, AmqpError, ConnectionError, Role};
use fe2o3_amqp::types::messaging::annotations::OwnedKey;
use fe2o3_amqp::types::messaging::{
    AmqpValue, ApplicationProperties, Body, Data, Message, MessageAnnotations, MessageId,
    Properties, Source,
};
use fe2o3_amqp::types::primitives::{Array, OrderedMap, SimpleValue, Symbol, Timestamp, Value};
use fe2o3_amqp::{Receiver, Sendable, Sender};
use serde_json::json;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, Notify};
use tokio_util::sync::CancellationToken;

use super::fake_amqp::{app_props, body_bytes, status_reply, CbsSasl, PutTokenRecord};
use super::fake_hub::{percent_decode, signed_resource};
use super::{POLICY, POLICY_KEY};

/// The namespace host of [`FakeEventHubs::connection_string`].
pub const NAMESPACE: &str = "iotgw-fake.servicebus.windows.net";
/// The hub name the fake's non-telemetry events carry in `hubName`.
pub const HUB_NAME: &str = "iotgw-fake";
/// The CBS token type of a SAS token.
pub const SAS_TOKEN_TYPE: &str = "servicebus.windows.net:sastoken";

/// One event as IoT Hub routes it to the built-in endpoint.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FakeEvent {
    /// `message-id` (the device's, for telemetry).
    pub message_id: Option<String>,
    /// Message annotations (IoT Hub's `iothub-*` system properties), as text;
    /// `iothub-enqueuedtime` (milliseconds since the epoch) goes out as a timestamp.
    pub annotations: BTreeMap<String, String>,
    /// Application properties (`opType`, `operationTimestamp`, ... for non-telemetry).
    pub application: BTreeMap<String, String>,
    /// The body (one data section).
    pub body: Vec<u8>,
}

fn iso(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Micros, true)
}

fn system(device: &str, source: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("iothub-connection-device-id".to_owned(), device.to_owned()),
        (
            "iothub-connection-auth-method".to_owned(),
            r#"{"scope":"device","type":"sas","issuer":"iothub","acceptingIpFilterRule":null}"#
                .to_owned(),
        ),
        (
            "iothub-connection-auth-generation-id".to_owned(),
            "638000000000000000".to_owned(),
        ),
        (
            "iothub-enqueuedtime".to_owned(),
            Utc::now().timestamp_millis().to_string(),
        ),
        ("iothub-message-source".to_owned(), source.to_owned()),
    ])
}

fn notification(
    device: &str,
    op: &str,
    schema: &str,
    at: DateTime<Utc>,
) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("hubName".to_owned(), HUB_NAME.to_owned()),
        ("deviceId".to_owned(), device.to_owned()),
        ("opType".to_owned(), op.to_owned()),
        ("operationTimestamp".to_owned(), iso(at)),
        ("iothub-message-schema".to_owned(), schema.to_owned()),
    ])
}

impl FakeEvent {
    /// Telemetry as IoT Hub routes it: annotations `iothub-connection-device-id`,
    /// `iothub-message-source=Telemetry`, `iothub-enqueuedtime`; message id as given.
    pub fn telemetry(device: &str, message_id: &str, body: &[u8]) -> Self {
        Self {
            message_id: Some(message_id.to_owned()),
            annotations: system(device, "Telemetry"),
            application: BTreeMap::new(),
            body: body.to_vec(),
        }
    }

    /// A twin change notification with the device's reported properties ("IoT Hub
    /// non-telemetry event schemas": `iothub-message-source=twinChangeEvents`,
    /// `opType=updateTwin`, `deviceId`, `hubName`, `operationTimestamp`, body
    /// `{"version": version, "properties": {"reported": {..., "$metadata", "$version"}}}`).
    pub fn twin_change(device: &str, reported: &serde_json::Value, version: i64) -> Self {
        let now = Utc::now();
        let mut reported = reported.clone();
        if let Some(map) = reported.as_object_mut() {
            let mut metadata = serde_json::Map::new();
            metadata.insert("$lastUpdated".into(), json!(iso(now)));
            for k in map.keys() {
                metadata.insert(k.clone(), json!({"$lastUpdated": iso(now)}));
            }
            map.insert("$metadata".into(), serde_json::Value::Object(metadata));
            map.insert("$version".into(), json!(version));
        }
        Self {
            message_id: Some(uuid::Uuid::new_v4().to_string()),
            annotations: system(device, "twinChangeEvents"),
            application: notification(device, "updateTwin", "twinChangeNotification", now),
            body: json!({"version": version, "properties": {"reported": reported}})
                .to_string()
                .into_bytes(),
        }
    }

    /// A connection state event (`deviceConnectionStateEvents`, `opType`
    /// `deviceConnected`/`deviceDisconnected` at `at`, body `{"sequenceNumber": ...}`).
    pub fn connection(
        device: &str,
        connected: bool,
        sequence_number: &str,
        at: DateTime<Utc>,
    ) -> Self {
        let op = if connected {
            "deviceConnected"
        } else {
            "deviceDisconnected"
        };
        Self {
            message_id: Some(uuid::Uuid::new_v4().to_string()),
            annotations: system(device, "deviceConnectionStateEvents"),
            application: notification(device, op, "deviceConnectionStateNotification", at),
            body: json!({"sequenceNumber": sequence_number})
                .to_string()
                .into_bytes(),
        }
    }

    /// The device the event is of (`iothub-connection-device-id`, else `deviceId`).
    pub fn device(&self) -> Option<&str> {
        self.annotations
            .get("iothub-connection-device-id")
            .or_else(|| self.application.get("deviceId"))
            .map(String::as_str)
    }
}

/// A `$management` request as received.
#[derive(Clone, Debug, PartialEq)]
pub struct ManagementRecord {
    /// Application properties (`operation`, `type`, `name`, `partition`,
    /// `security_token`), as text.
    pub properties: BTreeMap<String, String>,
    /// The `status-code` answered.
    pub status: u16,
}

/// A receiver link the client attached on a partition.
#[derive(Clone, Debug, PartialEq)]
pub struct ReceiverRecord {
    /// The link name.
    pub name: String,
    /// The source address.
    pub source: String,
    /// The selector filter's expression (`apache.org:selector-filter:string`).
    pub filter: Option<String>,
    /// Why it was refused (the error condition and description), if it was.
    pub refused: Option<String>,
}

/// Everything the fake saw.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct EventHubsLog {
    /// Connections accepted.
    pub connections: usize,
    /// The SASL mechanism each connection chose.
    pub sasl_mechanisms: Vec<String>,
    /// CBS put-token requests (`valid`: verified with the policy key as Event Hubs signs).
    pub put_tokens: Vec<PutTokenRecord>,
    /// `$management` requests.
    pub management: Vec<ManagementRecord>,
    /// Receivers attached on partitions.
    pub receivers: Vec<ReceiverRecord>,
    /// Sources of every link the client attached as receiver (`$cbs`, `$management`,
    /// partitions).
    pub receiver_sources: Vec<String>,
    /// Targets of every link the client attached as sender.
    pub sender_targets: Vec<String>,
    /// Anything the fake could not handle.
    pub errors: Vec<String>,
}

#[derive(Clone, Debug)]
struct Stored {
    sequence_number: i64,
    offset: u64,
    enqueued_ms: i64,
    event: FakeEvent,
}

#[derive(Default)]
struct State {
    partitions: Vec<Vec<Stored>>,
    next_offset: Vec<u64>,
    log: EventHubsLog,
    connections: Vec<CancellationToken>,
    /// One switch per open partition link: set, the link stays attached and delivers
    /// nothing more ([`FakeEventHubs::freeze_open_links`]).
    frozen: Vec<Arc<std::sync::atomic::AtomicBool>>,
}

struct Shared {
    entity: String,
    created_ms: i64,
    state: Mutex<State>,
    published: watch::Sender<u64>,
}

impl Shared {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// A running fake of the Event Hubs-compatible endpoint.
pub struct FakeEventHubs {
    /// Its port on 127.0.0.1.
    pub port: u16,
    shared: Arc<Shared>,
    stop: CancellationToken,
}

impl Drop for FakeEventHubs {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// A stable hash of a device id (FNV-1a): IoT Hub keeps a device's events on one partition.
fn partition_hash(device: &str) -> u32 {
    device.bytes().fold(0x811c_9dc5_u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

impl FakeEventHubs {
    /// Starts the fake for event hub `entity` with `partitions` partitions (`"0"`, `"1"`, ...).
    pub async fn start(entity: &str, partitions: usize) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("address").port();
        let partitions = partitions.max(1);
        let shared = Arc::new(Shared {
            entity: entity.to_owned(),
            created_ms: Utc::now().timestamp_millis(),
            state: Mutex::new(State {
                partitions: vec![Vec::new(); partitions],
                next_offset: vec![0; partitions],
                ..State::default()
            }),
            published: watch::channel(0).0,
        });
        let stop = CancellationToken::new();
        let (s, halt) = (shared.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                let tcp = tokio::select! {
                    () = halt.cancelled() => return,
                    r = listener.accept() => match r { Ok((t, _)) => t, Err(_) => continue },
                };
                let token = halt.child_token();
                {
                    let mut st = s.state();
                    st.connections.retain(|t| !t.is_cancelled());
                    st.connections.push(token.clone());
                    st.log.connections += 1;
                }
                tokio::spawn(serve_connection(tcp, s.clone(), token));
            }
        });
        Self { port, shared, stop }
    }

    /// `amqp://127.0.0.1:{port}`: the client's custom endpoint (plain TCP).
    pub fn endpoint(&self) -> String {
        format!("amqp://127.0.0.1:{}", self.port)
    }

    /// The endpoint's connection string, signed with [`POLICY_KEY`].
    pub fn connection_string(&self) -> String {
        self.connection_string_with_key(POLICY_KEY)
    }

    /// The endpoint's connection string with another key (to be refused).
    pub fn connection_string_with_key(&self, key: &str) -> String {
        format!(
            "Endpoint=sb://{NAMESPACE}/;SharedAccessKeyName={POLICY};SharedAccessKey={key};EntityPath={}",
            self.shared.entity
        )
    }

    /// The partition IoT Hub puts `device`'s events on.
    pub fn partition_of(&self, device: &str) -> String {
        let n = self.shared.state().partitions.len();
        (partition_hash(device) as usize % n).to_string()
    }

    /// Appends `event` to the partition of its device (`iothub-connection-device-id`) with
    /// the next sequence number and offset; open receivers on that partition get it at
    /// once. Returns the partition and the sequence number.
    pub fn publish(&self, event: FakeEvent) -> (String, i64) {
        let partition = event
            .device()
            .map_or("0".to_owned(), |d| self.partition_of(d));
        let p: usize = partition.parse().expect("a partition index");
        let sequence_number = {
            let mut st = self.shared.state();
            let sequence_number = i64::try_from(st.partitions[p].len()).expect("fits");
            let offset = st.next_offset[p];
            // Offsets are byte positions in the partition's log, as in Event Hubs.
            st.next_offset[p] += 512 + event.body.len() as u64;
            st.partitions[p].push(Stored {
                sequence_number,
                offset,
                enqueued_ms: Utc::now().timestamp_millis(),
                event,
            });
            sequence_number
        };
        self.shared.published.send_modify(|v| *v += 1);
        (partition, sequence_number)
    }

    /// The offset of the event `sequence_number` of `partition`.
    pub fn offset(&self, partition: &str, sequence_number: i64) -> Option<String> {
        let p: usize = partition.parse().ok()?;
        let st = self.shared.state();
        st.partitions
            .get(p)?
            .iter()
            .find(|s| s.sequence_number == sequence_number)
            .map(|s| s.offset.to_string())
    }

    /// What the fake saw so far.
    pub fn log(&self) -> EventHubsLog {
        self.shared.state().log.clone()
    }

    /// Every partition link open now stays attached but delivers nothing more, with no
    /// error, as a stalled connection does; links opened later deliver as usual.
    pub fn freeze_open_links(&self) {
        for f in std::mem::take(&mut self.shared.state().frozen) {
            f.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    }

    /// Closes every open connection (`amqp:connection:forced`): the client must reconnect.
    /// The stored events stay.
    pub fn drop_connections(&self) {
        let tokens = std::mem::take(&mut self.shared.state().connections);
        for t in tokens {
            t.cancel();
        }
    }
}

type Reply = Message<AmqpValue<Value>>;

/// A client receiver link of `$cbs` or `$management`, where replies go.
struct ReplyLink {
    session: u64,
    node: String,
    address: String,
    tx: mpsc::Sender<Reply>,
}

/// One connection's state: what its tokens authorize, where replies go.
struct Conn {
    shared: Arc<Shared>,
    stop: CancellationToken,
    /// Resources (`sr`, decoded) of the valid tokens put on `$cbs`.
    authorized: Mutex<Vec<String>>,
    replies: Mutex<Vec<ReplyLink>>,
    reply_added: Notify,
}

impl Conn {
    fn authorized(&self) -> std::sync::MutexGuard<'_, Vec<String>> {
        self.authorized
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn replies(&self) -> std::sync::MutexGuard<'_, Vec<ReplyLink>> {
        self.replies
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn error(&self, e: String) {
        self.shared.state().log.errors.push(e);
    }

    /// The reply link for a request on `node` from `session`: the newest open one of the
    /// same session whose address is `reply_to`, else of the same session, else of the
    /// connection.
    fn reply_link(
        &self,
        session: u64,
        node: &str,
        reply_to: Option<&str>,
    ) -> Option<mpsc::Sender<Reply>> {
        let mut links = self.replies();
        links.retain(|l| !l.tx.is_closed());
        let of_node = || links.iter().rev().filter(|l| l.node == node);
        of_node()
            .find(|l| l.session == session && reply_to.is_none_or(|r| r == l.address))
            .or_else(|| of_node().find(|l| l.session == session))
            .or_else(|| of_node().find(|l| reply_to.is_none_or(|r| r == l.address)))
            .map(|l| l.tx.clone())
    }

    async fn reply(&self, session: u64, node: &str, reply_to: Option<&str>, reply: Reply) {
        // The client attaches its receiver right after its sender: give it a moment.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let notified = self.reply_added.notified();
            if let Some(tx) = self.reply_link(session, node, reply_to) {
                if tx.send(reply).await.is_err() {
                    self.error(format!("the reply link of {node} closed before the reply"));
                }
                return;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                self.error(format!(
                    "no receiver link of {node} (reply-to {reply_to:?}) to reply on"
                ));
                return;
            }
        }
    }
}

async fn serve_connection(tcp: TcpStream, shared: Arc<Shared>, stop: CancellationToken) {
    let acceptor = ConnectionAcceptor::builder()
        .container_id("fake-event-hubs")
        .sasl_acceptor(CbsSasl {
            chosen: {
                let shared = shared.clone();
                Arc::new(move |m| shared.state().log.sasl_mechanisms.push(m))
            },
        })
        .build();
    let Ok(mut conn) = acceptor.accept(tcp).await else {
        stop.cancel();
        return;
    };
    let cx = Arc::new(Conn {
        shared,
        stop: stop.clone(),
        authorized: Mutex::new(Vec::new()),
        replies: Mutex::new(Vec::new()),
        reply_added: Notify::new(),
    });
    let sessions = AtomicU64::new(0);
    loop {
        let incoming = tokio::select! {
            () = stop.cancelled() => {
                let forced = definitions::Error::new(
                    ConnectionError::ConnectionForced,
                    Some("the fake dropped the connection".to_owned()),
                    None,
                );
                let _ = tokio::time::timeout(Duration::from_secs(2), conn.close_with_error(forced)).await;
                return;
            }
            s = conn.next_incoming_session() => match s {
                Some(s) => s,
                None => break,
            },
        };
        let Ok(session) = SessionAcceptor::new()
            .accept_incoming_session(incoming, &mut conn)
            .await
        else {
            break;
        };
        let id = sessions.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(serve_session(session, id, cx.clone()));
    }
    // The client closed the connection: end what served it.
    stop.cancel();
}

fn source_address(source: Option<&Source>) -> String {
    source.and_then(|s| s.address.clone()).unwrap_or_default()
}

/// The selector filter's expression of a source.
fn selector(source: Option<&Source>) -> Option<String> {
    fn text(v: &Value) -> Option<String> {
        match v {
            Value::String(s) => Some(s.clone()),
            Value::Described(d) => text(&d.value),
            _ => None,
        }
    }
    source?
        .filter
        .as_ref()?
        .iter()
        .find(|(k, _)| k.0 == "apache.org:selector-filter:string")
        .and_then(|(_, v)| text(v))
}

async fn serve_session(mut session: ListenerSessionHandle, id: u64, cx: Arc<Conn>) {
    let acceptor = LinkAcceptor::new();
    loop {
        let mut attach = tokio::select! {
            () = cx.stop.cancelled() => return,
            a = session.next_incoming_attach() => match a { Some(a) => a, None => return },
        };
        match attach.role {
            // The client sends: requests to `$cbs` / `$management`.
            Role::Sender => {
                let Ok(LinkEndpoint::Receiver(receiver)) =
                    acceptor.accept_incoming_attach(attach, &mut session).await
                else {
                    continue;
                };
                let target = receiver
                    .target()
                    .as_ref()
                    .and_then(|t| t.address.clone())
                    .unwrap_or_default();
                cx.shared.state().log.sender_targets.push(target.clone());
                tokio::spawn(serve_requests(receiver, target, id, cx.clone()));
            }
            // The client receives: replies of `$cbs` / `$management`, or a partition.
            Role::Receiver => {
                let source = source_address(attach.source.as_deref());
                let filter = selector(attach.source.as_deref());
                cx.shared.state().log.receiver_sources.push(source.clone());
                if source == "$cbs" || source == "$management" {
                    let Ok(LinkEndpoint::Sender(sender)) =
                        acceptor.accept_incoming_attach(attach, &mut session).await
                    else {
                        continue;
                    };
                    let address = sender
                        .target()
                        .as_ref()
                        .and_then(|t| t.address.clone())
                        .unwrap_or_default();
                    let (tx, rx) = mpsc::channel(16);
                    cx.replies().push(ReplyLink {
                        session: id,
                        node: source,
                        address,
                        tx,
                    });
                    cx.reply_added.notify_waiters();
                    tokio::spawn(forward_replies(sender, rx, cx.stop.clone()));
                    continue;
                }
                let name = attach.name.clone();
                let start = partition_start(&cx, &source, filter.as_deref());
                let refused = start
                    .as_ref()
                    .err()
                    .map(|(condition, why)| format!("{}: {why}", Symbol::from(condition).0));
                cx.shared.state().log.receivers.push(ReceiverRecord {
                    name,
                    source,
                    filter,
                    refused,
                });
                match start {
                    Ok((partition, next)) => {
                        let Ok(LinkEndpoint::Sender(sender)) =
                            acceptor.accept_incoming_attach(attach, &mut session).await
                        else {
                            continue;
                        };
                        tokio::spawn(serve_partition(sender, partition, next, cx.clone()));
                    }
                    Err((condition, why)) => {
                        let error = definitions::Error::new(condition, Some(why), None);
                        // Like the service: an attach without a source, then a detach
                        // with the reason.
                        attach.source = None;
                        let Ok(LinkEndpoint::Sender(sender)) =
                            acceptor.accept_incoming_attach(attach, &mut session).await
                        else {
                            continue;
                        };
                        tokio::spawn(async move {
                            let _ = tokio::time::timeout(
                                Duration::from_secs(5),
                                sender.close_with_error(error),
                            )
                            .await;
                        });
                    }
                }
            }
        }
    }
}

async fn forward_replies(
    mut sender: Sender,
    mut rx: mpsc::Receiver<Reply>,
    stop: CancellationToken,
) {
    loop {
        let reply = tokio::select! {
            () = stop.cancelled() => return,
            r = rx.recv() => match r { Some(r) => r, None => return },
        };
        if sender.send(reply).await.is_err() {
            return;
        }
    }
}

/// `(partition index, index of the first event to send)` for a receiver on `address`
/// with selector `filter`, or why it is refused.
fn partition_start(
    cx: &Conn,
    address: &str,
    filter: Option<&str>,
) -> Result<(usize, usize), (AmqpError, String)> {
    let entity = &cx.shared.entity;
    let path = address.split_once("://").map_or(address, |(_, rest)| {
        rest.split_once('/').map_or("", |(_, p)| p)
    });
    let parts: Vec<&str> = path.split('/').collect();
    let partition = match parts[..] {
        [e, cg, _, p, id]
            if e.eq_ignore_ascii_case(entity)
                && cg.eq_ignore_ascii_case("ConsumerGroups")
                && p.eq_ignore_ascii_case("Partitions") =>
        {
            id
        }
        _ => {
            return Err((
                AmqpError::NotFound,
                format!("The messaging entity '{address}' could not be found."),
            ))
        }
    };
    let covered = cx.authorized().iter().any(|sr| covers(sr, address));
    if !covered {
        return Err((
            AmqpError::UnauthorizedAccess,
            format!("Unauthorized access. 'Listen' claim(s) are required to perform this operation. Resource: '{address}'. No valid token was put on $cbs for it."),
        ));
    }
    let st = cx.shared.state();
    let Some(events) = partition
        .parse::<usize>()
        .ok()
        .and_then(|p| st.partitions.get(p).map(|e| (p, e)))
    else {
        return Err((
            AmqpError::NotFound,
            format!("The partition '{partition}' of '{entity}' does not exist."),
        ));
    };
    let (p, events) = events;
    let next = match filter {
        None => 0,
        Some(f) => start_index(events, f).ok_or_else(|| {
            (
                AmqpError::InvalidField,
                format!("The selector filter '{f}' is not supported."),
            )
        })?,
    };
    Ok((p, next))
}

/// The index of the first event after a selector expression such as
/// `amqp.annotation.x-opt-offset > '-1'` (see the client's `StartPosition::start_expression`).
fn start_index(events: &[Stored], expression: &str) -> Option<usize> {
    let rest = expression.trim().strip_prefix("amqp.annotation.")?;
    let (field, rest) = rest.split_at(rest.find([' ', '>', '='])?);
    let rest = rest.trim_start();
    let (inclusive, rest) = match rest.strip_prefix(">=") {
        Some(r) => (true, r),
        None => (false, rest.strip_prefix('>')?),
    };
    let value = rest.trim().strip_prefix('\'')?.strip_suffix('\'')?;
    let after = |key: &dyn Fn(&Stored) -> i64, v: i64| {
        events
            .iter()
            .position(|s| if inclusive { key(s) >= v } else { key(s) > v })
            .unwrap_or(events.len())
    };
    match field {
        "x-opt-offset" if value == "@latest" => Some(events.len()),
        "x-opt-offset" => {
            let v: i64 = value.parse().ok()?;
            Some(after(&|s| i64::try_from(s.offset).unwrap_or(i64::MAX), v))
        }
        "x-opt-sequence-number" => Some(after(&|s| s.sequence_number, value.parse().ok()?)),
        "x-opt-enqueued-time" => Some(after(&|s| s.enqueued_ms, value.parse().ok()?)),
        _ => None,
    }
}

fn event_message(s: &Stored) -> Message<Data> {
    let mut annotations = MessageAnnotations::builder()
        .insert(
            OwnedKey::Symbol(Symbol::from("x-opt-sequence-number")),
            Value::Long(s.sequence_number),
        )
        .insert(
            OwnedKey::Symbol(Symbol::from("x-opt-offset")),
            Value::String(s.offset.to_string()),
        )
        .insert(
            OwnedKey::Symbol(Symbol::from("x-opt-enqueued-time")),
            Value::Timestamp(Timestamp::from_milliseconds(s.enqueued_ms)),
        );
    for (k, v) in &s.event.annotations {
        let value = match (k.as_str(), v.parse::<i64>()) {
            ("iothub-enqueuedtime", Ok(ms)) => Value::Timestamp(Timestamp::from_milliseconds(ms)),
            _ => Value::String(v.clone()),
        };
        annotations = annotations.insert(OwnedKey::Symbol(Symbol::from(k.as_str())), value);
    }
    let mut application = ApplicationProperties::builder();
    for (k, v) in &s.event.application {
        application = application.insert(k.clone(), SimpleValue::String(v.clone()));
    }
    Message::builder()
        .properties(Properties {
            message_id: s.event.message_id.clone().map(MessageId::String),
            ..Properties::default()
        })
        .message_annotations(annotations.build())
        .application_properties(application.build())
        .data(s.event.body.clone())
        .build()
}

/// Sends a partition's events from `next` on, as link credit allows, then new ones.
async fn serve_partition(mut sender: Sender, partition: usize, mut next: usize, cx: Arc<Conn>) {
    let mut published = cx.shared.published.subscribe();
    let frozen = Arc::new(std::sync::atomic::AtomicBool::new(false));
    cx.shared.state().frozen.push(frozen.clone());
    loop {
        if frozen.load(std::sync::atomic::Ordering::SeqCst) {
            tokio::select! {
                () = cx.stop.cancelled() => return,
                _ = sender.on_detach() => return,
            }
        }
        let batch: Vec<Stored> = cx
            .shared
            .state()
            .partitions
            .get(partition)
            .map(|events| events.get(next..).unwrap_or_default().to_vec())
            .unwrap_or_default();
        if batch.is_empty() {
            tokio::select! {
                () = cx.stop.cancelled() => return,
                r = published.changed() => if r.is_err() { return },
                // The client detached (on_detach answers it).
                _ = sender.on_detach() => return,
            }
            continue;
        }
        for s in &batch {
            let sendable = Sendable::builder()
                .message(event_message(s))
                .settled(true)
                .build();
            tokio::select! {
                () = cx.stop.cancelled() => return,
                r = sender.send(sendable) => if r.is_err() { return },
            }
            next += 1;
        }
    }
}

/// The resource (`sr`, decoded) of a SAS token that verifies with [`POLICY_KEY`] the way
/// Event Hubs signs: HMAC-SHA256 of `"{sr}\n{se}"` (sr as sent) keyed with the key's text,
/// `skn` = [`POLICY`], `se` in the future.
pub fn event_hubs_sas_resource(token: &str) -> Option<String> {
    signed_resource(token, POLICY_KEY.as_bytes()).map(|sr| percent_decode(&sr))
}

/// Whether a token for resource `sr` covers `address` (the same path or one below it).
fn covers(sr: &str, address: &str) -> bool {
    let (sr, address) = (sr.to_ascii_lowercase(), address.to_ascii_lowercase());
    let sr = sr.trim_end_matches('/');
    address
        .strip_prefix(sr)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

/// Whether `sr` names this fake's entity (`amqps://{namespace}/{entity}` or below).
fn names_entity(sr: &str, entity: &str) -> bool {
    let path = sr
        .split_once("://")
        .map_or(sr, |(_, rest)| rest.split_once('/').map_or("", |(_, p)| p));
    path.split('/')
        .next()
        .is_some_and(|e| e.eq_ignore_ascii_case(entity))
}

/// Answers requests on `$cbs` and `$management`.
async fn serve_requests(mut receiver: Receiver, node: String, session: u64, cx: Arc<Conn>) {
    loop {
        let delivery = tokio::select! {
            () = cx.stop.cancelled() => return,
            d = receiver.recv::<Body<Value>>() => match d {
                Ok(d) => d,
                Err(_) => return, // detached or the connection ended
            },
        };
        let _ = receiver.accept(&delivery).await;
        let message = delivery.into_message();
        let props = message.properties.clone().unwrap_or_default();
        let reply_to = props.reply_to.clone();
        let request = app_props(&message);
        let reply = match node.as_str() {
            "$cbs" => put_token(&cx, request, body_bytes(&message.body), props.message_id),
            "$management" => management(&cx, request, props.message_id),
            other => {
                cx.error(format!(
                    "a message to {other}, which the fake does not serve"
                ));
                continue;
            }
        };
        cx.reply(session, &node, reply_to.as_deref(), reply).await;
    }
}

fn put_token(
    cx: &Conn,
    request: BTreeMap<String, String>,
    body: Vec<u8>,
    message_id: Option<MessageId>,
) -> Reply {
    let token = String::from_utf8(body).unwrap_or_default();
    let sastoken = request.get("type").map(String::as_str) == Some(SAS_TOKEN_TYPE);
    let operation = request.get("operation").map(String::as_str) == Some("put-token");
    let resource = event_hubs_sas_resource(&token)
        .filter(|sr| names_entity(sr, &cx.shared.entity))
        .filter(|sr| request.get("name").is_some_and(|name| covers(sr, name)));
    let valid = sastoken && operation && resource.is_some();
    cx.shared.state().log.put_tokens.push(PutTokenRecord {
        properties: request,
        token,
        valid,
    });
    match resource {
        // Event Hubs answers a put-token with 202 Accepted.
        Some(sr) if valid => {
            cx.authorized().push(sr);
            status_reply(message_id, 202, "Accepted", Value::Null)
        }
        _ => status_reply(
            message_id,
            401,
            "InvalidSignature: The token has an invalid signature.",
            Value::Null,
        ),
    }
}

fn map(entries: Vec<(&str, Value)>) -> Value {
    Value::Map(
        entries
            .into_iter()
            .map(|(k, v)| (Value::String(k.to_owned()), v))
            .collect::<OrderedMap<Value, Value>>(),
    )
}

fn management(
    cx: &Conn,
    request: BTreeMap<String, String>,
    message_id: Option<MessageId>,
) -> Reply {
    let entity = &cx.shared.entity;
    let get = |k: &str| request.get(k).map(String::as_str).unwrap_or_default();
    let authorized =
        event_hubs_sas_resource(get("security_token")).is_some_and(|sr| names_entity(&sr, entity));
    let (status, description, body) = if get("operation") != "READ" {
        (
            400,
            format!("The operation '{}' is not supported.", get("operation")),
            Value::Null,
        )
    } else if !authorized {
        (
            401,
            "Unauthorized: the security_token does not verify.".to_owned(),
            Value::Null,
        )
    } else if !get("name").eq_ignore_ascii_case(entity) {
        (
            404,
            format!("The messaging entity '{}' could not be found.", get("name")),
            Value::Null,
        )
    } else {
        let st = cx.shared.state();
        match get("type") {
            "com.microsoft:eventhub" => (
                200,
                "OK".to_owned(),
                map(vec![
                    ("name", Value::String(entity.clone())),
                    ("type", Value::String("com.microsoft:eventhub".into())),
                    (
                        "created_at",
                        Value::Timestamp(Timestamp::from_milliseconds(cx.shared.created_ms)),
                    ),
                    (
                        "partition_count",
                        Value::Int(i32::try_from(st.partitions.len()).unwrap_or(i32::MAX)),
                    ),
                    (
                        "partition_ids",
                        Value::Array(Array::from(
                            (0..st.partitions.len())
                                .map(|p| Value::String(p.to_string()))
                                .collect::<Vec<_>>(),
                        )),
                    ),
                ]),
            ),
            "com.microsoft:partition" => {
                match get("partition")
                    .parse::<usize>()
                    .ok()
                    .and_then(|p| st.partitions.get(p))
                {
                    None => (
                        404,
                        format!("The partition '{}' does not exist.", get("partition")),
                        Value::Null,
                    ),
                    Some(events) => {
                        let last = events.last();
                        (
                            200,
                            "OK".to_owned(),
                            map(vec![
                                ("name", Value::String(entity.clone())),
                                ("type", Value::String("com.microsoft:partition".into())),
                                ("partition", Value::String(get("partition").to_owned())),
                                (
                                    "begin_sequence_number",
                                    Value::Long(events.first().map_or(-1, |s| s.sequence_number)),
                                ),
                                (
                                    "last_enqueued_sequence_number",
                                    Value::Long(last.map_or(-1, |s| s.sequence_number)),
                                ),
                                (
                                    "last_enqueued_offset",
                                    Value::String(
                                        last.map_or("-1".to_owned(), |s| s.offset.to_string()),
                                    ),
                                ),
                                (
                                    "last_enqueued_time_utc",
                                    Value::Timestamp(Timestamp::from_milliseconds(
                                        last.map_or(0, |s| s.enqueued_ms),
                                    )),
                                ),
                                ("last_enqueued_sequence_number_epoch", Value::Long(0)),
                                ("is_partition_empty", Value::Bool(events.is_empty())),
                            ]),
                        )
                    }
                }
            }
            other => (
                404,
                format!("The entity type '{other}' is not known."),
                Value::Null,
            ),
        }
    };
    cx.shared.state().log.management.push(ManagementRecord {
        properties: request,
        status,
    });
    status_reply(message_id, status, &description, body)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(n: i64) -> Stored {
        Stored {
            sequence_number: n,
            offset: u64::try_from(n).expect("n") * 600,
            enqueued_ms: 1_700_000_000_000 + n,
            event: FakeEvent::default(),
        }
    }

    #[test]
    fn selector_filters_pick_the_first_event_after_the_position() {
        let events: Vec<Stored> = (0..4).map(stored).collect();
        let at = |f: &str| start_index(&events, f);
        assert_eq!(at("amqp.annotation.x-opt-offset > '-1'"), Some(0));
        assert_eq!(at("amqp.annotation.x-opt-offset > '@latest'"), Some(4));
        assert_eq!(at("amqp.annotation.x-opt-offset >'600'"), Some(2));
        assert_eq!(at("amqp.annotation.x-opt-offset >='600'"), Some(1));
        assert_eq!(at("amqp.annotation.x-opt-sequence-number >'2'"), Some(3));
        assert_eq!(
            at("amqp.annotation.x-opt-enqueued-time >'1700000000000'"),
            Some(1)
        );
        assert_eq!(at("amqp.annotation.x-opt-offset >'9999'"), Some(4));
        assert_eq!(at("amqp.annotation.x-opt-partition-key > 'x'"), None);
        assert_eq!(at("x-opt-offset > '1'"), None);
    }

    #[test]
    fn a_device_stays_on_one_partition() {
        assert_eq!(partition_hash("pump-1"), partition_hash("pump-1"));
        assert_ne!(partition_hash("pump-1"), partition_hash("pump-2"));
    }

    #[test]
    fn a_token_for_the_entity_covers_its_partitions_only() {
        let sr = "amqps://iotgw-fake.servicebus.windows.net/hub";
        assert!(covers(
            sr,
            "amqps://iotgw-fake.servicebus.windows.net/hub/ConsumerGroups/g/Partitions/0"
        ));
        assert!(covers(sr, "amqps://IOTGW-fake.servicebus.windows.net/hub"));
        assert!(!covers(
            sr,
            "amqps://iotgw-fake.servicebus.windows.net/hub2/ConsumerGroups/g/Partitions/0"
        ));
        assert!(names_entity(sr, "HUB"));
        assert!(!names_entity(sr, "other"));
    }

    #[tokio::test]
    async fn a_partition_receiver_without_a_valid_token_is_refused_like_the_real_service() {
        use fe2o3_amqp::sasl_profile::SaslProfile;
        use fe2o3_amqp::{Connection, Session};

        let fake = FakeEventHubs::start("hub", 2).await;
        fake.publish(FakeEvent::telemetry("d1", "m-1", b"{}"));
        let mut connection = Connection::builder()
            .container_id("test-client")
            .sasl_profile(SaslProfile::Anonymous)
            .hostname(NAMESPACE)
            .open(fake.endpoint().as_str())
            .await
            .expect("connected");
        let mut session = Session::begin(&mut connection).await.expect("session");
        let address = format!("amqps://{NAMESPACE}/hub/ConsumerGroups/$Default/Partitions/0");
        let attached = Receiver::attach(&mut session, "no-token", address.as_str()).await;
        let error = attached.expect_err("refused without a token");
        assert!(
            format!("{error:?}").contains("UnauthorizedAccess"),
            "{error:?}"
        );
        let log = fake.log();
        assert_eq!(log.sasl_mechanisms, ["ANONYMOUS"]);
        let refused = log.receivers[0]
            .refused
            .clone()
            .expect("recorded as refused");
        assert!(refused.starts_with("amqp:unauthorized-access"), "{refused}");
        let _ = session.end().await;
        let _ = connection.close().await;
    }
}
