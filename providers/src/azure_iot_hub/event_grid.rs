//! Event Grid pushing IoT Hub events to iotgw (`POST|OPTIONS /hooks/{instance}`).
//!
//! Accepts both delivery schemas of the documented IoT Hub events — the Event Grid schema
//! (`eventType`, `eventTime`, a JSON array) and CloudEvents 1.0 (`type`, `time`,
//! `specversion`; a batch array or one structured event) — and:
//! - answers the subscription validation handshake (`SubscriptionValidationEvent` →
//!   `{"validationResponse": code}`; CloudEvents' `OPTIONS` with `WebHook-Request-Origin`
//!   → `WebHook-Allowed-Origin`);
//! - checks a shared secret (query parameter `secret` or header `X-Iotgw-Secret`,
//!   constant-time);
//! - turns `Microsoft.Devices.DeviceTelemetry` into telemetry (body as JSON, or base64
//!   decoded as documented), `DeviceConnected`/`DeviceDisconnected` into connection states
//!   ordered by `deviceConnectionStateEventInfo.sequenceNumber` (a late, older event is
//!   dropped; event times are kept monotonic with the sequence), `DeviceCreated` into the
//!   twin's reported properties and `DeviceDeleted` into a disconnected state;
//! - answers 200 only after every event of the batch was acked by the gateway (committed),
//!   otherwise 503 so Event Grid retries the batch.

use std::cmp::Ordering;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use base64::Engine as _;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use serde_json::{json, Value};
use tokio::sync::oneshot;

use super::models::{parse_time, without_metadata};
pub use super::ordering::{compare_sequence, ConnectionSeqs, SharedConnectionSeqs};
use super::state::{lock, Shared};
use crate::{
    Ack, AckHandle, EventKind, ProviderEvent, PushEndpoint, PushRequest, PushResponse, Telemetry,
};

/// Query parameter carrying the shared secret.
pub const SECRET_QUERY: &str = "secret";
/// Header carrying the shared secret (an Event Grid delivery property).
pub const SECRET_HEADER: &str = "x-iotgw-secret";

/// Event types iotgw understands.
pub mod types {
    /// Event Grid's subscription validation.
    pub const VALIDATION: &str = "Microsoft.EventGrid.SubscriptionValidationEvent";
    /// Event Grid's notice that the subscription was deleted.
    pub const SUBSCRIPTION_DELETED: &str = "Microsoft.EventGrid.SubscriptionDeletedEvent";
    /// A device-to-cloud message.
    pub const TELEMETRY: &str = "Microsoft.Devices.DeviceTelemetry";
    /// A device connected.
    pub const CONNECTED: &str = "Microsoft.Devices.DeviceConnected";
    /// A device disconnected.
    pub const DISCONNECTED: &str = "Microsoft.Devices.DeviceDisconnected";
    /// A device was created in the registry.
    pub const CREATED: &str = "Microsoft.Devices.DeviceCreated";
    /// A device was deleted from the registry.
    pub const DELETED: &str = "Microsoft.Devices.DeviceDeleted";
}

/// One event, whichever schema carried it.
#[derive(Clone, Debug, PartialEq)]
pub struct GridEvent {
    /// Event id (unique; stable across Event Grid's retries).
    pub id: String,
    /// `eventType` / `type`.
    pub event_type: String,
    /// `subject` (`devices/{id}` for IoT Hub).
    pub subject: String,
    /// `eventTime` / `time`.
    pub time: Option<DateTime<Utc>>,
    /// `data`.
    pub data: Value,
}

/// Why a pushed body was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct BadBatch(pub String);

/// Parses a pushed body: an array of Event Grid or CloudEvents events, or one structured
/// CloudEvent.
pub fn parse_batch(body: &[u8]) -> Result<Vec<GridEvent>, BadBatch> {
    let v: Value =
        serde_json::from_slice(body).map_err(|e| BadBatch(format!("the body is not JSON: {e}")))?;
    let items = match v {
        Value::Array(items) => items,
        obj @ Value::Object(_) => vec![obj],
        _ => {
            return Err(BadBatch(
                "expected a JSON array of events or one event object".into(),
            ))
        }
    };
    items
        .into_iter()
        .enumerate()
        .map(|(i, item)| {
            let field = |a: &str, b: &str| {
                item.get(a)
                    .or_else(|| item.get(b))
                    .and_then(Value::as_str)
                    .map(str::to_owned)
            };
            let id = field("id", "id").ok_or_else(|| BadBatch(format!("event {i} has no `id`")))?;
            let event_type = field("eventType", "type").ok_or_else(|| {
                BadBatch(format!(
                    "event {i} ({id}) has neither `eventType` nor `type`"
                ))
            })?;
            Ok(GridEvent {
                subject: field("subject", "subject").unwrap_or_default(),
                time: field("eventTime", "time").as_deref().and_then(parse_time),
                data: item.get("data").cloned().unwrap_or(Value::Null),
                id,
                event_type,
            })
        })
        .collect()
}

/// The device an IoT Hub event is about: `data.deviceId`, the telemetry's
/// `iothub-connection-device-id`, or the subject `devices/{id}`.
pub fn device_of(e: &GridEvent) -> Option<String> {
    e.data
        .get("deviceId")
        .and_then(Value::as_str)
        .or_else(|| {
            e.data
                .get("systemProperties")
                .and_then(|p| p.get("iothub-connection-device-id"))
                .and_then(Value::as_str)
        })
        .or_else(|| {
            e.subject
                .strip_prefix("devices/")
                .map(|s| s.split('/').next().unwrap_or(s))
        })
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
}

/// The payload of a `DeviceTelemetry` event: a JSON body as JSON text; a string body is
/// base64 (IoT Hub encodes bodies it cannot mark as UTF-8 JSON) or, failing that, the text.
pub fn telemetry_payload(data: &Value) -> Bytes {
    match data.get("body") {
        None | Some(Value::Null) => Bytes::new(),
        Some(Value::String(s)) => base64::engine::general_purpose::STANDARD
            .decode(s.trim())
            .map(Bytes::from)
            .unwrap_or_else(|_| Bytes::from(s.clone())),
        Some(other) => Bytes::from(other.to_string()),
    }
}

/// What one event becomes.
#[derive(Clone, Debug, PartialEq)]
pub enum Mapped {
    /// An event for the pipeline; `seq` is the connection sequence number to record once
    /// it is committed.
    Event {
        /// The event.
        kind: EventKind,
        /// Connection sequence number (device, seq, emitted time).
        seq: Option<(String, String, DateTime<Utc>)>,
    },
    /// Nothing to do (with the reason, for the log).
    Skip(String),
}

/// Maps a batch of IoT Hub events to pipeline events. Connection events are ordered by
/// sequence number per device; one not newer than `committed` (or than an earlier event
/// of the batch) is skipped; emitted event times never go backwards along the sequence.
pub fn map_batch(
    events: &[GridEvent],
    committed: &HashMap<String, (String, DateTime<Utc>)>,
    now: DateTime<Utc>,
) -> Vec<Mapped> {
    // Indices of connection events, stably sorted by (device, sequence).
    let mut conn: Vec<(usize, String, String)> = events
        .iter()
        .enumerate()
        .filter(|(_, e)| e.event_type == types::CONNECTED || e.event_type == types::DISCONNECTED)
        .filter_map(|(i, e)| {
            let seq = e
                .data
                .get("deviceConnectionStateEventInfo")
                .and_then(|s| s.get("sequenceNumber"))
                .and_then(Value::as_str)?;
            Some((i, device_of(e)?, seq.to_owned()))
        })
        .collect();
    conn.sort_by(|a, b| a.1.cmp(&b.1).then_with(|| compare_sequence(&a.2, &b.2)));
    let sorted: Vec<usize> = conn.iter().map(|(i, _, _)| *i).collect();
    let mut last: HashMap<String, (String, DateTime<Utc>)> = HashMap::new();
    let mut conn_out: HashMap<usize, Mapped> = HashMap::new();
    for (i, device, seq) in conn {
        let e = &events[i];
        let prev = last
            .get(&device)
            .or_else(|| committed.get(&device))
            .cloned();
        if let Some((prev_seq, _)) = &prev {
            if compare_sequence(&seq, prev_seq) != Ordering::Greater {
                conn_out.insert(
                    i,
                    Mapped::Skip(format!(
                        "{} of {device} with sequence {seq} is not newer than {prev_seq}",
                        e.event_type
                    )),
                );
                continue;
            }
        }
        let mut at = e.time.unwrap_or(now);
        if let Some((_, prev_at)) = &prev {
            if at <= *prev_at {
                at = *prev_at + chrono::Duration::microseconds(1);
            }
        }
        last.insert(device.clone(), (seq.clone(), at));
        conn_out.insert(
            i,
            Mapped::Event {
                kind: EventKind::Connection {
                    device_id: device.clone(),
                    connected: e.event_type == types::CONNECTED,
                    at,
                },
                seq: Some((device, seq, at)),
            },
        );
    }
    // Connection events leave in sequence order (per device), in the slots the batch
    // gave connection events; every other event keeps its place.
    let slots: std::collections::HashSet<usize> = sorted.iter().copied().collect();
    let mut in_order = sorted.into_iter();
    events
        .iter()
        .enumerate()
        .map(|(i, e)| {
            if slots.contains(&i) {
                if let Some(m) = in_order.next().and_then(|j| conn_out.remove(&j)) {
                    return m;
                }
            }
            let Some(device) = device_of(e) else {
                return Mapped::Skip(format!("{} {} names no device", e.event_type, e.id));
            };
            let at = e.time.unwrap_or(now);
            match e.event_type.as_str() {
                types::TELEMETRY => {
                    let received_at = e
                        .data
                        .get("systemProperties")
                        .and_then(|p| p.get("iothub-enqueuedtime"))
                        .and_then(Value::as_str)
                        .and_then(parse_time)
                        .unwrap_or(at);
                    Mapped::Event {
                        kind: EventKind::Telemetry(Telemetry {
                            device_id: device,
                            message_id: e.id.clone(),
                            payload: telemetry_payload(&e.data),
                            received_at,
                        }),
                        seq: None,
                    }
                }
                types::CONNECTED | types::DISCONNECTED => Mapped::Skip(format!(
                    "{} {} has no deviceConnectionStateEventInfo.sequenceNumber",
                    e.event_type, e.id
                )),
                types::CREATED => {
                    let reported = e
                        .data
                        .pointer("/twin/properties/reported")
                        .and_then(Value::as_object)
                        .map(without_metadata)
                        .unwrap_or_default();
                    Mapped::Event {
                        kind: EventKind::ReportedProperties {
                            device_id: device,
                            properties: Value::Object(reported),
                            at,
                        },
                        seq: None,
                    }
                }
                types::DELETED => Mapped::Event {
                    kind: EventKind::Connection {
                        device_id: device,
                        connected: false,
                        at,
                    },
                    seq: None,
                },
                other => Mapped::Skip(format!("event type {other} is not handled")),
            }
        })
        .collect()
}

/// The Event Grid endpoint of one provider instance.
pub struct EventGridEndpoint {
    shared: Arc<Shared>,
}

impl EventGridEndpoint {
    pub(super) fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }

    fn secret_ok(&self, req: &PushRequest) -> bool {
        let Some(cfg) = &self.shared.config.event_grid else {
            return false;
        };
        let want = cfg.secret.expose().as_bytes();
        let given = req
            .query_param(SECRET_QUERY)
            .or_else(|| req.header(SECRET_HEADER))
            .unwrap_or_default()
            .as_bytes();
        constant_time_eq(given, want)
    }

    async fn deliver(&self, events: Vec<GridEvent>) -> PushResponse {
        let s = &self.shared;
        let Some(sender) = lock(&s.events).clone() else {
            return reply(
                503,
                json!({"error": "the provider is not running yet; Event Grid will retry"}),
            );
        };
        let mapped = {
            let committed = lock(&s.connection_seq);
            map_batch(&events, &committed, Utc::now())
        };
        let timeout = Duration::from_secs(
            s.config
                .event_grid
                .as_ref()
                .map_or(20, |c| c.commit_timeout_secs),
        );
        let work = async {
            let mut pending = Vec::new();
            let (mut skipped, mut accepted) = (0usize, 0usize);
            for m in mapped {
                match m {
                    Mapped::Skip(why) => {
                        skipped += 1;
                        tracing::debug!(provider = %s.instance, reason = %why, "Event Grid event skipped");
                    }
                    Mapped::Event { kind, seq } => {
                        let (tx, rx) = oneshot::channel();
                        let ev = ProviderEvent {
                            instance: s.instance.clone(),
                            kind,
                            ack: AckHandle::new(move |a| {
                                let _ = tx.send(a);
                            }),
                        };
                        if sender.send(ev).await.is_err() {
                            return Err("the pipeline is shut down".to_owned());
                        }
                        accepted += 1;
                        pending.push((rx, seq));
                    }
                }
            }
            let mut committed_seqs = Vec::new();
            let mut failure = None;
            for (rx, seq) in pending {
                match rx.await {
                    Ok(Ack::Ack) => committed_seqs.extend(seq),
                    Ok(Ack::Nack(why)) => {
                        failure.get_or_insert(why);
                    }
                    Err(_) => {
                        failure.get_or_insert_with(|| "dropped without a verdict".to_owned());
                    }
                }
            }
            {
                let mut map = lock(&s.connection_seq);
                for (device, seq, at) in committed_seqs {
                    let newer = map
                        .get(&device)
                        .is_none_or(|(prev, _)| compare_sequence(&seq, prev) == Ordering::Greater);
                    if newer {
                        map.insert(device, (seq, at));
                    }
                }
            }
            match failure {
                None => Ok((accepted, skipped)),
                Some(why) => Err(format!("an event was not committed: {why}")),
            }
        };
        match tokio::time::timeout(timeout, work).await {
            Ok(Ok((accepted, skipped))) => {
                reply(200, json!({"accepted": accepted, "skipped": skipped}))
            }
            Ok(Err(why)) => {
                tracing::warn!(provider = %s.instance, reason = %why, "Event Grid batch not committed; answering 503 so it is retried");
                reply(503, json!({"error": why}))
            }
            Err(_) => {
                tracing::warn!(provider = %s.instance, ?timeout, "Event Grid batch not committed in time; answering 503 so it is retried");
                reply(
                    503,
                    json!({"error": format!("not committed within {timeout:?}; retry")}),
                )
            }
        }
    }
}

fn reply(status: u16, body: Value) -> PushResponse {
    PushResponse {
        status,
        headers: vec![("content-type".into(), "application/json".into())],
        body: Bytes::from(body.to_string()),
    }
}

/// Compares without an early exit, so the time taken does not reveal how much matched.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[async_trait]
impl PushEndpoint for EventGridEndpoint {
    async fn handle(&self, req: PushRequest) -> PushResponse {
        if !self.secret_ok(&req) {
            tracing::warn!(provider = %self.shared.instance, "Event Grid request refused: missing or wrong shared secret");
            return reply(
                401,
                json!({"error": "missing or wrong secret: put ?secret=<event_grid.secret> in the subscription's endpoint URL or send it as the X-Iotgw-Secret delivery header"}),
            );
        }
        match req.method.to_ascii_uppercase().as_str() {
            "OPTIONS" => {
                // CloudEvents 1.0 webhook abuse protection.
                let Some(origin) = req.header("webhook-request-origin") else {
                    return reply(
                        400,
                        json!({"error": "OPTIONS without WebHook-Request-Origin"}),
                    );
                };
                PushResponse {
                    status: 200,
                    headers: vec![
                        ("webhook-allowed-origin".into(), origin.to_owned()),
                        ("webhook-allowed-rate".into(), "*".into()),
                        ("allow".into(), "POST, OPTIONS".into()),
                    ],
                    body: Bytes::new(),
                }
            }
            "POST" => {
                let events = match parse_batch(&req.body) {
                    Ok(e) => e,
                    Err(e) => return reply(400, json!({"error": e.0})),
                };
                if let Some(v) = events.iter().find(|e| e.event_type == types::VALIDATION) {
                    let Some(code) = v.data.get("validationCode").and_then(Value::as_str) else {
                        return reply(
                            400,
                            json!({"error": "SubscriptionValidationEvent without data.validationCode"}),
                        );
                    };
                    tracing::info!(provider = %self.shared.instance, "Event Grid subscription validated");
                    return reply(200, json!({"validationResponse": code}));
                }
                if events
                    .iter()
                    .all(|e| e.event_type == types::SUBSCRIPTION_DELETED)
                    && !events.is_empty()
                {
                    tracing::warn!(provider = %self.shared.instance, "Event Grid says the subscription was deleted");
                    return reply(200, json!({}));
                }
                self.deliver(events).await
            }
            other => PushResponse {
                status: 405,
                headers: vec![("allow".into(), "POST, OPTIONS".into())],
                body: Bytes::from(json!({"error": format!("{other} is not accepted")}).to_string()),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn(id: &str, connected: bool, seq: &str, time: &str) -> GridEvent {
        GridEvent {
            id: id.into(),
            event_type: if connected {
                types::CONNECTED
            } else {
                types::DISCONNECTED
            }
            .into(),
            subject: "devices/d1".into(),
            time: parse_time(time),
            data: json!({"deviceId": "d1", "deviceConnectionStateEventInfo": {"sequenceNumber": seq}}),
        }
    }

    #[test]
    fn sequence_numbers_compare_numerically_whatever_their_length_and_case() {
        assert_eq!(compare_sequence("0002", "1"), Ordering::Greater);
        assert_eq!(compare_sequence("00ff", "FE"), Ordering::Greater);
        assert_eq!(compare_sequence("000A", "a"), Ordering::Equal);
        assert_eq!(compare_sequence("0100", "FF"), Ordering::Greater);
    }

    #[test]
    fn a_batch_out_of_order_leaves_in_sequence_order_with_monotonic_times() {
        let out = map_batch(
            &[
                conn("late", false, "03", "2024-05-01T12:00:00Z"),
                conn("early", true, "02", "2024-05-01T12:00:05Z"),
            ],
            &HashMap::new(),
            Utc::now(),
        );
        let got: Vec<(bool, String)> = out
            .iter()
            .map(|m| match m {
                Mapped::Event {
                    kind: EventKind::Connection { connected, at, .. },
                    ..
                } => (*connected, at.to_rfc3339()),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(
            got,
            [
                (true, "2024-05-01T12:00:05+00:00".to_owned()),
                (false, "2024-05-01T12:00:05.000001+00:00".to_owned())
            ]
        );
    }

    #[test]
    fn older_or_repeated_connection_events_are_skipped_against_the_committed_sequence() {
        let now = Utc::now();
        let committed = HashMap::from([("d1".to_owned(), ("03".to_owned(), now))]);
        let out = map_batch(
            &[
                conn("a", true, "01", "2024-05-01T11:59:00Z"),
                conn("b", false, "03", "2024-05-01T12:00:00Z"),
                conn("c", true, "04", "2024-05-01T11:00:00Z"),
            ],
            &committed,
            now,
        );
        assert!(matches!(out[0], Mapped::Skip(_)), "{out:?}");
        assert!(matches!(out[1], Mapped::Skip(_)), "{out:?}");
        match &out[2] {
            Mapped::Event {
                kind:
                    EventKind::Connection {
                        connected: true,
                        at,
                        ..
                    },
                seq: Some((_, s, _)),
            } => {
                assert_eq!(s, "04");
                assert!(*at > now, "kept after the committed event's time");
            }
            other => panic!("{other:?}"),
        }
    }
}
