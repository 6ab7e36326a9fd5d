//! Pure decoding of what IoT Hub sends iotgw into [`ProviderEvent`](crate::ProviderEvent)
//! kinds, with no I/O: the events Event Grid pushes ([`parse_batch`], [`map_batch`]), the
//! events read from the Event Hubs-compatible endpoint ([`HubEvent`], [`map_event`]) and a
//! twin read back as a device state ([`device_state`]). Both event paths give a
//! [`Mapped`]; connection events are ordered by their `sequenceNumber`
//! ([`super::ordering`]). The receive paths that feed these are [`super::receive`] (the
//! Event Grid webhook) and [`super::event_hubs`] (the Event Hubs consumer).
//!
//! Event Grid: both delivery schemas of the documented IoT Hub events, the Event Grid
//! schema (`eventType`, `eventTime`, a JSON array) and CloudEvents 1.0 (`type`, `time`,
//! `specversion`; a batch array or one structured event).
//! `Microsoft.Devices.DeviceTelemetry` becomes telemetry (body as JSON, or base64 decoded
//! as documented), `DeviceConnected`/`DeviceDisconnected` connection states ordered by
//! `deviceConnectionStateEventInfo.sequenceNumber` (a late, older event is dropped; event
//! times are kept monotonic with the sequence), `DeviceCreated` the twin's reported
//! properties and `DeviceDeleted` a disconnected state.
//!
//! Event Hubs (system property `iothub-message-source`, application property `opType`, as
//! in IoT Hub's "non-telemetry event schemas"):
//! - `Telemetry` (or no source): telemetry from `iothub-connection-device-id`; its message
//!   id (the gateway scopes it by instance and device into the alert token) is the one the
//!   device set, else
//!   `eh:{partition}:{sequence number}` (stable across redeliveries);
//! - `deviceConnectionStateEvents`: `deviceConnected`/`deviceDisconnected`, ordered by the
//!   body's `sequenceNumber` (shared with the Event Grid path), at `operationTimestamp`;
//! - `twinChangeEvents`: the reported properties in the body (desired-only changes skip);
//! - `deviceLifecycleEvents`: `createDeviceIdentity` gives the twin's reported properties,
//!   `deleteDeviceIdentity` a disconnected state;
//! - events of modules (`iothub-connection-module-id` or `moduleId`) are skipped: the
//!   documentation says an event without `moduleId` is the device's own.

use std::cmp::Ordering;
use std::collections::{BTreeMap, HashMap};

use base64::Engine as _;
use bytes::Bytes;
use chrono::{DateTime, NaiveDateTime, TimeZone as _, Utc};
use serde_json::{Map, Value};

use super::ordering::compare_sequence;
use super::rest::Twin;
use crate::{DeviceState, EventKind, Telemetry};

/// What one event becomes, on either event path.
#[derive(Clone, Debug, PartialEq)]
pub enum Mapped {
    /// An event for the pipeline; `seq` is the connection sequence number to record once
    /// it is committed.
    Event {
        /// The event.
        kind: EventKind,
        /// `(device, sequenceNumber, emitted time)` of a connection event.
        seq: Option<(String, String, DateTime<Utc>)>,
    },
    /// Nothing to send (with the reason, for the log).
    Skip(String),
}

/// Parses a hub timestamp (`2024-05-01T12:00:00.123Z`, also without the `Z` as in some
/// documented samples). The hub's "never" (`0001-01-01T00:00:00`) is `None`.
pub fn parse_time(s: &str) -> Option<DateTime<Utc>> {
    let t = DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&Utc))
        .ok()
        .or_else(|| {
            NaiveDateTime::parse_from_str(s, "%Y-%m-%dT%H:%M:%S%.f")
                .ok()
                .map(|n| n.and_utc())
        })?;
    (t.timestamp() > 0).then_some(t)
}

/// Drops the twin bookkeeping (`$metadata`, `$version`) from a property set.
pub fn without_metadata(props: &Map<String, Value>) -> Map<String, Value> {
    props
        .iter()
        .filter(|(k, _)| !k.starts_with('$'))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// The device state a twin (`GET /twins/{id}`) shows: connection state, reported
/// properties (without `$metadata`/`$version`), last activity.
pub fn device_state(twin: Twin) -> DeviceState {
    DeviceState {
        connected: twin
            .connection_state
            .as_deref()
            .map(|c| c.eq_ignore_ascii_case("connected")),
        reported_properties: twin
            .properties
            .and_then(|p| p.reported)
            .map(|r| Value::Object(without_metadata(&r))),
        last_activity: twin.last_activity_time.as_deref().and_then(parse_time),
    }
}

// --- Event Grid ---------------------------------------------------------------------

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
                // Checked: a time from the input at the end of the calendar stays there.
                at = prev_at
                    .checked_add_signed(chrono::Duration::microseconds(1))
                    .unwrap_or(*prev_at);
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

// --- the Event Hubs-compatible endpoint ---------------------------------------------

/// One event read from a partition.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct HubEvent {
    /// The partition.
    pub partition: String,
    /// The event's offset (what a checkpoint records).
    pub offset: String,
    /// The event's sequence number in the partition.
    pub sequence_number: i64,
    /// When Event Hubs enqueued it.
    pub enqueued_time: Option<DateTime<Utc>>,
    /// The AMQP message id (`message-id`), if the device set one.
    pub message_id: Option<String>,
    /// System properties / annotations (`iothub-connection-device-id`,
    /// `iothub-message-source`, `iothub-enqueuedtime`, ...), as text.
    pub system: BTreeMap<String, String>,
    /// Application properties, as text.
    pub application: BTreeMap<String, String>,
    /// The body.
    pub body: Bytes,
}

fn op_time(e: &HubEvent) -> DateTime<Utc> {
    e.application
        .get("operationTimestamp")
        .and_then(|t| parse_time(t))
        .or_else(|| {
            // An AMQP timestamp: RFC 3339 text from the client, or milliseconds.
            e.system.get("iothub-enqueuedtime").and_then(|t| {
                parse_time(t).or_else(|| {
                    t.parse::<i64>()
                        .ok()
                        .and_then(|ms| Utc.timestamp_millis_opt(ms).single())
                })
            })
        })
        .or(e.enqueued_time)
        .unwrap_or_else(Utc::now)
}

/// Maps one event; `newest` gives the newest connection sequence (and its emitted time)
/// already committed or in flight for a device.
pub fn map_event(e: &HubEvent, newest: impl Fn(&str) -> Option<(String, DateTime<Utc>)>) -> Mapped {
    let Some(device) = e
        .system
        .get("iothub-connection-device-id")
        .or_else(|| e.application.get("deviceId"))
        .filter(|d| !d.is_empty())
        .cloned()
    else {
        return Mapped::Skip(format!(
            "event {}:{} names no device",
            e.partition, e.offset
        ));
    };
    let source = e
        .system
        .get("iothub-message-source")
        .map(String::as_str)
        .unwrap_or("Telemetry");
    let module = e
        .system
        .get("iothub-connection-module-id")
        .or_else(|| e.application.get("moduleId"))
        .is_some_and(|m| !m.is_empty());
    if source == "Telemetry" {
        let message_id = match &e.message_id {
            Some(m) if !m.is_empty() => m.clone(),
            _ => format!("eh:{}:{}", e.partition, e.sequence_number),
        };
        return Mapped::Event {
            kind: EventKind::Telemetry(Telemetry {
                device_id: device,
                message_id,
                payload: e.body.clone(),
                received_at: e.enqueued_time.unwrap_or_else(Utc::now),
            }),
            seq: None,
        };
    }
    if module {
        return Mapped::Skip(format!("{source} of a module of {device}"));
    }
    let body: Value = serde_json::from_slice(&e.body).unwrap_or(Value::Null);
    let op = e
        .application
        .get("opType")
        .map(String::as_str)
        .unwrap_or_default();
    let at = op_time(e);
    match (source, op) {
        ("deviceConnectionStateEvents", "deviceConnected" | "deviceDisconnected") => {
            let Some(seq) = body.get("sequenceNumber").and_then(Value::as_str) else {
                return Mapped::Skip(format!("{op} of {device} without a sequenceNumber"));
            };
            let mut at = at;
            if let Some((prev, prev_at)) = newest(&device) {
                if compare_sequence(seq, &prev) != std::cmp::Ordering::Greater {
                    return Mapped::Skip(format!(
                        "{op} of {device} with sequence {seq} is not newer than {prev}"
                    ));
                }
                if at <= prev_at {
                    at = prev_at
                        .checked_add_signed(chrono::Duration::microseconds(1))
                        .unwrap_or(prev_at);
                }
            }
            Mapped::Event {
                kind: EventKind::Connection {
                    device_id: device.clone(),
                    connected: op == "deviceConnected",
                    at,
                },
                seq: Some((device, seq.to_owned(), at)),
            }
        }
        ("twinChangeEvents", _) => match body
            .pointer("/properties/reported")
            .and_then(Value::as_object)
        {
            Some(reported) => Mapped::Event {
                kind: EventKind::ReportedProperties {
                    device_id: device,
                    properties: Value::Object(without_metadata(reported)),
                    at,
                },
                seq: None,
            },
            None => Mapped::Skip(format!(
                "twin change of {device} without reported properties"
            )),
        },
        ("deviceLifecycleEvents", "createDeviceIdentity") => Mapped::Event {
            kind: EventKind::ReportedProperties {
                device_id: device,
                properties: Value::Object(
                    body.pointer("/properties/reported")
                        .and_then(Value::as_object)
                        .map(without_metadata)
                        .unwrap_or_default(),
                ),
                at,
            },
            seq: None,
        },
        ("deviceLifecycleEvents", "deleteDeviceIdentity") => Mapped::Event {
            kind: EventKind::Connection {
                device_id: device,
                connected: false,
                at,
            },
            seq: None,
        },
        _ => Mapped::Skip(format!("{source}/{op} of {device} is not handled")),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn hub_timestamps_parse_with_or_without_zone_and_never_is_none() {
        assert!(parse_time("2019-01-07T20:58:30.48Z").is_some());
        assert!(parse_time("2018-01-02T19:17:44.4383997Z").is_some());
        assert!(parse_time("2018-01-02T19:17:44.4383997").is_some());
        assert_eq!(parse_time("0001-01-01T00:00:00"), None);
        assert_eq!(parse_time("0001-01-01T00:00:00Z"), None);
        assert_eq!(parse_time("soon"), None);
    }

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
