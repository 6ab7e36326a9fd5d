//! Turns a received MQTT message into an [`EventKind`]: payload formats of status, reply
//! and reported topics, and the telemetry message id. Pure functions, no I/O.

use bytes::Bytes;
use chrono::{DateTime, Utc};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::topics::TopicKind;
use crate::{EventKind, Telemetry};

/// MQTT 5 user property carrying a device-chosen message id.
pub const MESSAGE_ID_PROPERTY: &str = "message_id";

/// A received message, as far as decoding needs it.
#[derive(Clone, Copy, Debug)]
pub struct Received<'a> {
    /// The topic it arrived on.
    pub topic: &'a str,
    /// Its payload.
    pub payload: &'a Bytes,
    /// The MQTT 5 user property `message_id`, if any.
    pub message_id_property: Option<&'a str>,
    /// The MQTT 5 correlation data, if any.
    pub correlation_data: Option<&'a [u8]>,
    /// When it was received.
    pub received_at: DateTime<Utc>,
}

/// What to do with a received message.
#[derive(Clone, Debug, PartialEq)]
pub enum Inbound {
    /// Hand this event to the gateway.
    Event(EventKind),
    /// Nothing to report (an empty retained status clears the topic): ack it.
    Ignore,
    /// The payload does not follow the topic's format: ack it, count it and log why
    /// (redelivering it would only fail again).
    Unparsable(String),
}

/// Decodes a message of `kind` from `device_id`. `message_id_pointer` is the JSON pointer
/// of the telemetry message id (empty to never look into the payload).
pub fn decode(
    kind: TopicKind,
    device_id: &str,
    msg: &Received<'_>,
    message_id_pointer: &str,
) -> Inbound {
    match kind {
        // An empty payload is how MQTT deletes a retained message (a device clearing a
        // reading it once published with the retain flag); the broker forwards it to
        // subscribers. It carries no reading: nothing to commit, nothing to dead-letter.
        TopicKind::Telemetry if msg.payload.is_empty() => Inbound::Ignore,
        TopicKind::Telemetry => Inbound::Event(EventKind::Telemetry(Telemetry {
            device_id: device_id.to_owned(),
            message_id: message_id(msg, message_id_pointer),
            payload: msg.payload.clone(),
            received_at: msg.received_at,
        })),
        TopicKind::Status => decode_status(device_id, msg),
        TopicKind::Reply => decode_reply(device_id, msg),
        TopicKind::Reported => decode_reported(device_id, msg),
    }
}

fn hash_id(msg: &Received<'_>) -> String {
    let mut hash = Sha256::new();
    hash.update(msg.topic.as_bytes());
    hash.update([0u8]);
    hash.update(msg.payload);
    hex::encode(hash.finalize())
}

/// The id the device gave: the `message_id` user property, else the value at `pointer`.
fn device_message_id(msg: &Received<'_>, pointer: &str) -> Option<String> {
    if let Some(id) = msg.message_id_property.filter(|id| !id.is_empty()) {
        return Some(id.to_owned());
    }
    if pointer.is_empty() {
        return None;
    }
    let json = serde_json::from_slice::<serde_json::Value>(msg.payload).ok()?;
    match json.pointer(pointer) {
        Some(serde_json::Value::String(s)) if !s.is_empty() => Some(s.clone()),
        Some(serde_json::Value::Number(n)) => Some(n.to_string()),
        _ => None,
    }
}

/// The telemetry message id, the first of:
/// 1. the MQTT 5 user property `message_id`;
/// 2. the string or number at `pointer` in a JSON payload;
/// 3. the hex SHA-256 of the topic, a NUL byte and the payload.
///
/// The fallback is content-addressed: two byte-identical readings from one device get the
/// same id, so the gateway treats the second as a redelivery of the first (one alert).
/// Devices that may repeat a reading verbatim should send a `message_id`.
pub fn message_id(msg: &Received<'_>, pointer: &str) -> String {
    device_message_id(msg, pointer).unwrap_or_else(|| hash_id(msg))
}

#[derive(Deserialize)]
struct StatusJson {
    connected: bool,
    at: Option<String>,
}

fn decode_status(device_id: &str, msg: &Received<'_>) -> Inbound {
    let text = match std::str::from_utf8(msg.payload) {
        Ok(t) => t.trim(),
        Err(_) => return Inbound::Unparsable("status payload is not UTF-8".into()),
    };
    if text.is_empty() {
        return Inbound::Ignore;
    }
    let connection = |connected, at| {
        Inbound::Event(EventKind::Connection {
            device_id: device_id.to_owned(),
            connected,
            at,
        })
    };
    match text.to_ascii_lowercase().as_str() {
        "online" | "connected" => return connection(true, msg.received_at),
        "offline" | "disconnected" => return connection(false, msg.received_at),
        _ => {}
    }
    match serde_json::from_str::<StatusJson>(text) {
        Ok(StatusJson { connected, at: None }) => connection(connected, msg.received_at),
        Ok(StatusJson { connected, at: Some(at) }) => match DateTime::parse_from_rfc3339(&at) {
            Ok(at) => connection(connected, at.with_timezone(&Utc)),
            Err(e) => Inbound::Unparsable(format!(
                "status \"at\" {at:?} is not an RFC 3339 time ({e}); send e.g. \"2024-05-01T12:00:00Z\""
            )),
        },
        Err(_) => Inbound::Unparsable(format!(
            "status payload {:?} is none of online, offline, connected, disconnected or {{\"connected\":bool,\"at\":\"RFC 3339\"}}",
            truncate(text, 64)
        )),
    }
}

#[derive(Deserialize)]
struct ReplyJson {
    correlation_id: Option<String>,
    status: Option<String>,
    reason: Option<String>,
}

fn decode_reply(device_id: &str, msg: &Received<'_>) -> Inbound {
    let reply: ReplyJson = match serde_json::from_slice(msg.payload) {
        Ok(r) => r,
        Err(e) => {
            return Inbound::Unparsable(format!(
            "reply is not JSON {{\"correlation_id\",\"status\":\"ok\"|\"error\",\"reason\"}}: {e}"
        ))
        }
    };
    let correlation_id = reply.correlation_id.filter(|c| !c.is_empty()).or_else(|| {
        msg.correlation_data
            .and_then(|d| std::str::from_utf8(d).ok())
            .filter(|c| !c.is_empty())
            .map(str::to_owned)
    });
    let Some(correlation_id) = correlation_id else {
        return Inbound::Unparsable(
            "reply has neither a \"correlation_id\" field nor MQTT 5 correlation data".into(),
        );
    };
    let ok = match reply
        .status
        .as_deref()
        .map(str::to_ascii_lowercase)
        .as_deref()
    {
        Some("ok") => true,
        Some("error") => false,
        other => {
            return Inbound::Unparsable(format!(
                "reply {correlation_id}: \"status\" is {other:?}, expected \"ok\" or \"error\""
            ))
        }
    };
    Inbound::Event(EventKind::CommandReply {
        device_id: device_id.to_owned(),
        correlation_id,
        ok,
        reason: reply.reason,
    })
}

fn decode_reported(device_id: &str, msg: &Received<'_>) -> Inbound {
    match serde_json::from_slice::<serde_json::Value>(msg.payload) {
        Ok(properties @ serde_json::Value::Object(_)) => {
            Inbound::Event(EventKind::ReportedProperties {
                device_id: device_id.to_owned(),
                properties,
                at: msg.received_at,
            })
        }
        Ok(_) => Inbound::Unparsable("reported properties are not a JSON object".into()),
        Err(e) => Inbound::Unparsable(format!("reported properties are not JSON: {e}")),
    }
}

fn truncate(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg<'a>(topic: &'a str, payload: &'a Bytes) -> Received<'a> {
        Received {
            topic,
            payload,
            message_id_property: None,
            correlation_data: None,
            received_at: DateTime::parse_from_rfc3339("2024-05-01T12:00:00Z")
                .expect("valid time")
                .with_timezone(&Utc),
        }
    }

    #[test]
    fn message_id_prefers_the_user_property_then_the_payload_pointer_then_a_hash() {
        let payload = Bytes::from_static(br#"{"message_id":"m-7","seq":42}"#);
        let mut m = msg("devices/d1/telemetry", &payload);
        assert_eq!(message_id(&m, "/message_id"), "m-7");
        assert_eq!(message_id(&m, "/seq"), "42");
        m.message_id_property = Some("prop-1");
        assert_eq!(message_id(&m, "/message_id"), "prop-1");
        m.message_id_property = None;
        let hashed = message_id(&m, "/missing");
        assert_eq!(hashed.len(), 64);
        assert_eq!(
            hashed,
            message_id(&m, ""),
            "same topic and payload, same id"
        );
        let other_topic = msg("devices/d2/telemetry", &payload);
        assert_ne!(
            hashed,
            message_id(&other_topic, ""),
            "the topic is part of the hash"
        );
    }

    #[test]
    fn status_text_and_json_become_connection_events_and_empty_is_ignored() {
        let cases = [
            ("online", Some(true)),
            ("Connected", Some(true)),
            (" offline\n", Some(false)),
            ("disconnected", Some(false)),
            (r#"{"connected":true}"#, Some(true)),
        ];
        for (text, want) in cases {
            let p = Bytes::from(text);
            match decode(TopicKind::Status, "d1", &msg("t", &p), "") {
                Inbound::Event(EventKind::Connection {
                    connected,
                    device_id,
                    ..
                }) => {
                    assert_eq!(
                        (Some(connected), device_id.as_str()),
                        (want, "d1"),
                        "{text}"
                    )
                }
                other => panic!("{text}: {other:?}"),
            }
        }
        let p = Bytes::from_static(br#"{"connected":false,"at":"2024-06-01T08:00:00+02:00"}"#);
        let Inbound::Event(EventKind::Connection {
            at,
            connected: false,
            ..
        }) = decode(TopicKind::Status, "d1", &msg("t", &p), "")
        else {
            panic!("json status with time")
        };
        assert_eq!(at.to_rfc3339(), "2024-06-01T06:00:00+00:00");
        let empty = Bytes::new();
        assert_eq!(
            decode(TopicKind::Status, "d1", &msg("t", &empty), ""),
            Inbound::Ignore
        );
        for bad in ["maybe", r#"{"connected":true,"at":"yesterday"}"#] {
            let p = Bytes::from(bad);
            assert!(matches!(
                decode(TopicKind::Status, "d1", &msg("t", &p), ""),
                Inbound::Unparsable(_)
            ));
        }
    }

    #[test]
    fn an_empty_telemetry_payload_clears_a_retained_reading_and_is_no_dead_letter() {
        let empty = Bytes::new();
        assert_eq!(
            decode(
                TopicKind::Telemetry,
                "d1",
                &msg("devices/d1/telemetry", &empty),
                "/message_id"
            ),
            Inbound::Ignore
        );
        let junk = Bytes::from_static(b"not json");
        assert!(
            matches!(
                decode(
                    TopicKind::Telemetry,
                    "d1",
                    &msg("devices/d1/telemetry", &junk),
                    "/message_id"
                ),
                Inbound::Event(EventKind::Telemetry(_))
            ),
            "a non-empty payload still reaches the pipeline (and its dead letter)"
        );
    }

    #[test]
    fn replies_take_the_correlation_id_from_the_payload_or_the_correlation_data() {
        let p = Bytes::from_static(br#"{"correlation_id":"c1","status":"ok"}"#);
        assert_eq!(
            decode(TopicKind::Reply, "d1", &msg("t", &p), ""),
            Inbound::Event(EventKind::CommandReply {
                device_id: "d1".into(),
                correlation_id: "c1".into(),
                ok: true,
                reason: None
            })
        );
        let p = Bytes::from_static(br#"{"status":"error","reason":"valve stuck"}"#);
        let mut m = msg("t", &p);
        m.correlation_data = Some(b"c2");
        assert_eq!(
            decode(TopicKind::Reply, "d1", &m, ""),
            Inbound::Event(EventKind::CommandReply {
                device_id: "d1".into(),
                correlation_id: "c2".into(),
                ok: false,
                reason: Some("valve stuck".into())
            })
        );
        for bad in [
            &b"not json"[..],
            br#"{"status":"ok"}"#,
            br#"{"correlation_id":"c","status":"meh"}"#,
        ] {
            let p = Bytes::copy_from_slice(bad);
            assert!(matches!(
                decode(TopicKind::Reply, "d1", &msg("t", &p), ""),
                Inbound::Unparsable(_)
            ));
        }
    }

    #[test]
    fn reported_properties_must_be_a_json_object() {
        let p = Bytes::from_static(br#"{"firmware":"1.2"}"#);
        assert!(matches!(
            decode(TopicKind::Reported, "d1", &msg("t", &p), ""),
            Inbound::Event(EventKind::ReportedProperties { .. })
        ));
        let p = Bytes::from_static(b"[1,2]");
        assert!(matches!(
            decode(TopicKind::Reported, "d1", &msg("t", &p), ""),
            Inbound::Unparsable(_)
        ));
    }
}
