//! What the inbound streams carry and how a Pub/Sub message becomes an [`EventKind`]:
//! pure decoding, no I/O.
//!
//! - telemetry: the payload as is; the device id from the device id attribute; as message
//!   id (the alert token) the id the device or its bridge gave in the `message_id`
//!   attribute (the gateway scopes it by instance and device), else Pub/Sub's
//!   `message_id` qualified by the publish time,
//!   `<message_id>@<publish time, RFC 3339 with nanoseconds>` (see [`alert_token`]); the
//!   publish time as the receive time. A message
//!   without the attribute still becomes an event with an empty device id, so the gateway
//!   dead-letters it with its payload and the reason instead of it vanishing.
//! - replies: attributes `correlation_id`, `status` (`ok` | `error`), optional `reason`,
//!   and the device id attribute; or the same keys in a JSON object body.
//! - lifecycle: the device id attribute, `connected` (`true`/`false`, also
//!   `online`/`offline`, `connected`/`disconnected`, `1`/`0`) and optional `event_time`
//!   (RFC 3339); or a JSON object body `{"connected": bool, "at": "<RFC 3339>"}` (the device
//!   id may also be a body key named like the attribute). Without an event time the
//!   publish time orders the states. A JSON body with a `reported` object instead reports
//!   the device's properties: `{"reported": {...}, "at": "<RFC 3339>"?}`.

use std::collections::HashMap;

use bytes::Bytes;
use chrono::{DateTime, Utc};

use super::names::{
    StreamKind, CONNECTED_ATTRIBUTE, CORRELATION_ID_ATTRIBUTE, EVENT_TIME_ATTRIBUTE,
    MESSAGE_ID_ATTRIBUTE, REASON_ATTRIBUTE, REPORTED_KEY, STATUS_ATTRIBUTE,
};
use crate::{EventKind, Telemetry};

/// A message as received, reduced to what decoding needs.
#[derive(Clone, Debug)]
pub struct Received<'a> {
    /// The payload.
    pub data: &'a Bytes,
    /// The attributes.
    pub attributes: &'a HashMap<String, String>,
    /// Pub/Sub's message id.
    pub message_id: &'a str,
    /// When Pub/Sub accepted it.
    pub publish_time: Option<DateTime<Utc>>,
    /// When the gateway received it.
    pub received_at: DateTime<Utc>,
}

/// The outcome of decoding.
#[derive(Clone, Debug, PartialEq)]
pub enum Inbound {
    /// An event for the pipeline.
    Event(EventKind),
    /// Not in the stream's format: acked, counted and logged with the reason.
    Unparsable(String),
}

/// Decodes `msg` from a stream of `kind`; `device_attr` names the device id attribute.
pub fn decode(kind: StreamKind, device_attr: &str, msg: &Received<'_>) -> Inbound {
    match kind {
        StreamKind::Telemetry => Inbound::Event(EventKind::Telemetry(telemetry(device_attr, msg))),
        StreamKind::Reply => reply(device_attr, msg),
        StreamKind::Lifecycle => lifecycle(device_attr, msg),
    }
}

/// The alert token of a message: `<message_id>@<publish time>`. A redelivery carries the
/// same message id and publish time, so it never makes a second alert. Pub/Sub's message
/// ids alone are unique only within one topic (and the emulator numbers them from 1 again
/// after a restart), while alert tokens are unique across the whole store; the publish
/// time keeps distinct messages apart. Without a publish time: the bare message id.
pub fn alert_token(message_id: &str, publish_time: Option<DateTime<Utc>>) -> String {
    match publish_time {
        Some(t) => format!(
            "{message_id}@{}",
            t.to_rfc3339_opts(chrono::SecondsFormat::Nanos, true)
        ),
        None => message_id.to_owned(),
    }
}

/// The telemetry's alert token: a device-chosen `message_id` attribute wins, because a
/// bridge that retries a publish makes a second Pub/Sub message (a new Pub/Sub id) of the
/// same reading (the gateway scopes it by instance and device). Without it,
/// [`alert_token`].
fn telemetry_token(msg: &Received<'_>) -> String {
    match msg
        .attributes
        .get(MESSAGE_ID_ATTRIBUTE)
        .filter(|id| !id.is_empty())
    {
        Some(id) => id.clone(),
        None => alert_token(msg.message_id, msg.publish_time),
    }
}

fn telemetry(device_attr: &str, msg: &Received<'_>) -> Telemetry {
    let device_id = msg.attributes.get(device_attr).cloned().unwrap_or_default();
    Telemetry {
        message_id: telemetry_token(msg),
        device_id,
        payload: msg.data.clone(),
        received_at: msg.publish_time.unwrap_or(msg.received_at),
    }
}

/// The body as a JSON object, if it is one.
fn body(msg: &Received<'_>) -> Option<serde_json::Map<String, serde_json::Value>> {
    match serde_json::from_slice(msg.data) {
        Ok(serde_json::Value::Object(m)) => Some(m),
        _ => None,
    }
}

/// An attribute, else the string value of the same key in the body.
fn field(
    msg: &Received<'_>,
    body: Option<&serde_json::Map<String, serde_json::Value>>,
    key: &str,
) -> Option<String> {
    msg.attributes.get(key).cloned().or_else(|| {
        body.and_then(|b| b.get(key))
            .and_then(|v| v.as_str())
            .map(str::to_owned)
    })
}

fn reply(device_attr: &str, msg: &Received<'_>) -> Inbound {
    let body = body(msg);
    let body = body.as_ref();
    let Some(device_id) = field(msg, body, device_attr) else {
        return Inbound::Unparsable(format!("reply without the `{device_attr}` attribute"));
    };
    let Some(correlation_id) = field(msg, body, CORRELATION_ID_ATTRIBUTE) else {
        return Inbound::Unparsable(format!(
            "reply of {device_id} without `{CORRELATION_ID_ATTRIBUTE}`"
        ));
    };
    let ok = match field(msg, body, STATUS_ATTRIBUTE)
        .map(|s| s.to_ascii_lowercase())
        .as_deref()
    {
        Some("ok") => true,
        Some("error") => false,
        other => {
            return Inbound::Unparsable(format!(
                "reply {correlation_id} of {device_id}: `{STATUS_ATTRIBUTE}` is {other:?}, expected \"ok\" or \"error\""
            ))
        }
    };
    Inbound::Event(EventKind::CommandReply {
        device_id,
        correlation_id,
        ok,
        reason: field(msg, body, REASON_ATTRIBUTE).filter(|r| !r.is_empty()),
    })
}

fn parse_connected(s: &str) -> Option<bool> {
    match s.to_ascii_lowercase().as_str() {
        "true" | "1" | "online" | "connected" => Some(true),
        "false" | "0" | "offline" | "disconnected" => Some(false),
        _ => None,
    }
}

fn lifecycle(device_attr: &str, msg: &Received<'_>) -> Inbound {
    let body = body(msg);
    let body = body.as_ref();
    let Some(device_id) = field(msg, body, device_attr) else {
        return Inbound::Unparsable(format!(
            "lifecycle message without the `{device_attr}` attribute"
        ));
    };
    let at = match event_time(msg, body) {
        Ok(at) => at,
        Err(why) => return Inbound::Unparsable(format!("lifecycle message of {device_id}: {why}")),
    };
    if let Some(reported) = body.and_then(|b| b.get(REPORTED_KEY)) {
        if !reported.is_object() {
            return Inbound::Unparsable(format!(
                "lifecycle message of {device_id}: `{REPORTED_KEY}` must be a JSON object of properties"
            ));
        }
        return Inbound::Event(EventKind::ReportedProperties {
            device_id,
            properties: reported.clone(),
            at,
        });
    }
    let connected = match msg.attributes.get(CONNECTED_ATTRIBUTE) {
        Some(s) => parse_connected(s),
        None => body
            .and_then(|b| b.get(CONNECTED_ATTRIBUTE))
            .and_then(|v| match v {
                serde_json::Value::Bool(b) => Some(*b),
                serde_json::Value::String(s) => parse_connected(s),
                _ => None,
            }),
    };
    let Some(connected) = connected else {
        return Inbound::Unparsable(format!(
            "lifecycle message of {device_id} without a valid `{CONNECTED_ATTRIBUTE}` (true or false)"
        ));
    };
    Inbound::Event(EventKind::Connection {
        device_id,
        connected,
        at,
    })
}

/// The event time: the `event_time` attribute, else the body's `at`, else the publish time.
fn event_time(
    msg: &Received<'_>,
    body: Option<&serde_json::Map<String, serde_json::Value>>,
) -> Result<DateTime<Utc>, String> {
    let time = msg
        .attributes
        .get(EVENT_TIME_ATTRIBUTE)
        .cloned()
        .or_else(|| {
            body.and_then(|b| b.get("at"))
                .and_then(|v| v.as_str())
                .map(str::to_owned)
        });
    match time {
        Some(t) => DateTime::parse_from_rfc3339(&t)
            .map(|at| at.with_timezone(&Utc))
            .map_err(|e| format!("event time {t:?} is not RFC 3339: {e}")),
        None => Ok(msg.publish_time.unwrap_or(msg.received_at)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attrs(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn t(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s)
            .expect("valid time")
            .with_timezone(&Utc)
    }

    fn decode_with(
        kind: StreamKind,
        data: &'static [u8],
        attributes: &HashMap<String, String>,
    ) -> Inbound {
        let data = Bytes::from_static(data);
        decode(
            kind,
            "device_id",
            &Received {
                data: &data,
                attributes,
                message_id: "4711",
                publish_time: Some(t("2030-01-01T00:00:05Z")),
                received_at: t("2030-01-01T00:00:06Z"),
            },
        )
    }

    #[test]
    fn telemetry_takes_the_id_attribute_and_the_publish_time_qualified_message_id() {
        let a = attrs(&[("device_id", "pump-1")]);
        let got = decode_with(StreamKind::Telemetry, br#"{"temperature":80}"#, &a);
        assert_eq!(
            got,
            Inbound::Event(EventKind::Telemetry(Telemetry {
                device_id: "pump-1".into(),
                message_id: "4711@2030-01-01T00:00:05.000000000Z".into(),
                payload: Bytes::from_static(br#"{"temperature":80}"#),
                received_at: t("2030-01-01T00:00:05Z"),
            }))
        );
    }

    #[test]
    fn a_device_chosen_message_id_is_the_message_id_across_bridge_retries() {
        let a = attrs(&[("device_id", "pump-1"), ("message_id", "m-7")]);
        let Inbound::Event(EventKind::Telemetry(t)) = decode_with(StreamKind::Telemetry, b"{}", &a)
        else {
            panic!("telemetry expected")
        };
        assert_eq!(t.message_id, "m-7");
        let a = attrs(&[("device_id", "pump-1"), ("message_id", "")]);
        let Inbound::Event(EventKind::Telemetry(t)) = decode_with(StreamKind::Telemetry, b"{}", &a)
        else {
            panic!("telemetry expected")
        };
        assert_eq!(t.message_id, "4711@2030-01-01T00:00:05.000000000Z");
    }

    #[test]
    fn a_lifecycle_body_with_reported_properties_reports_them_at_its_event_time() {
        let a = attrs(&[("device_id", "pump-1")]);
        assert_eq!(
            decode_with(
                StreamKind::Lifecycle,
                br#"{"reported":{"firmware":"1.4.2"},"at":"2030-01-01T00:00:01Z"}"#,
                &a
            ),
            Inbound::Event(EventKind::ReportedProperties {
                device_id: "pump-1".into(),
                properties: serde_json::json!({"firmware": "1.4.2"}),
                at: t("2030-01-01T00:00:01Z"),
            })
        );
        let Inbound::Unparsable(why) =
            decode_with(StreamKind::Lifecycle, br#"{"reported":"1.4.2"}"#, &a)
        else {
            panic!("a reported value that is not an object must not parse");
        };
        assert!(why.contains("JSON object"), "{why}");
    }

    #[test]
    fn telemetry_without_the_id_attribute_reaches_the_gateway_with_an_empty_id() {
        let got = decode_with(StreamKind::Telemetry, b"{}", &attrs(&[]));
        let Inbound::Event(EventKind::Telemetry(t)) = got else {
            panic!("{got:?}")
        };
        assert_eq!(t.device_id, "");
    }

    #[test]
    fn replies_come_from_attributes_or_from_a_json_body() {
        let a = attrs(&[
            ("device_id", "pump-1"),
            ("correlation_id", "c-1"),
            ("status", "error"),
            ("reason", "valve stuck"),
        ]);
        assert_eq!(
            decode_with(StreamKind::Reply, b"", &a),
            Inbound::Event(EventKind::CommandReply {
                device_id: "pump-1".into(),
                correlation_id: "c-1".into(),
                ok: false,
                reason: Some("valve stuck".into()),
            })
        );
        let a = attrs(&[("device_id", "pump-1")]);
        assert_eq!(
            decode_with(
                StreamKind::Reply,
                br#"{"correlation_id":"c-2","status":"OK"}"#,
                &a
            ),
            Inbound::Event(EventKind::CommandReply {
                device_id: "pump-1".into(),
                correlation_id: "c-2".into(),
                ok: true,
                reason: None,
            })
        );
    }

    #[test]
    fn replies_without_a_status_or_correlation_are_unparsable_with_the_reason() {
        let a = attrs(&[("device_id", "pump-1"), ("correlation_id", "c-1")]);
        let Inbound::Unparsable(why) = decode_with(StreamKind::Reply, b"", &a) else {
            panic!("no status must not parse");
        };
        assert!(why.contains("status"), "{why}");
        let a = attrs(&[("device_id", "pump-1"), ("status", "ok")]);
        let Inbound::Unparsable(why) = decode_with(StreamKind::Reply, b"", &a) else {
            panic!("no correlation id must not parse");
        };
        assert!(why.contains("correlation_id"), "{why}");
    }

    #[test]
    fn lifecycle_uses_the_event_time_and_falls_back_to_the_publish_time() {
        let a = attrs(&[
            ("device_id", "pump-1"),
            ("connected", "false"),
            ("event_time", "2030-01-01T00:00:01Z"),
        ]);
        assert_eq!(
            decode_with(StreamKind::Lifecycle, b"", &a),
            Inbound::Event(EventKind::Connection {
                device_id: "pump-1".into(),
                connected: false,
                at: t("2030-01-01T00:00:01Z"),
            })
        );
        let a = attrs(&[("device_id", "pump-1")]);
        assert_eq!(
            decode_with(StreamKind::Lifecycle, br#"{"connected":true}"#, &a),
            Inbound::Event(EventKind::Connection {
                device_id: "pump-1".into(),
                connected: true,
                at: t("2030-01-01T00:00:05Z"),
            })
        );
        assert_eq!(
            decode_with(
                StreamKind::Lifecycle,
                br#"{"device_id":"fan-2","connected":"online","at":"2030-01-01T00:00:02+01:00"}"#,
                &attrs(&[])
            ),
            Inbound::Event(EventKind::Connection {
                device_id: "fan-2".into(),
                connected: true,
                at: t("2029-12-31T23:00:02Z"),
            })
        );
    }

    #[test]
    fn lifecycle_messages_without_state_or_with_a_bad_time_are_unparsable() {
        let a = attrs(&[("device_id", "pump-1"), ("connected", "maybe")]);
        assert!(matches!(
            decode_with(StreamKind::Lifecycle, b"", &a),
            Inbound::Unparsable(_)
        ));
        let a = attrs(&[
            ("device_id", "pump-1"),
            ("connected", "true"),
            ("event_time", "yesterday"),
        ]);
        let Inbound::Unparsable(why) = decode_with(StreamKind::Lifecycle, b"", &a) else {
            panic!("a bad time must not parse");
        };
        assert!(why.contains("RFC 3339"), "{why}");
    }

    #[test]
    fn alert_tokens_stay_under_the_store_limit_and_apart_across_emulator_restarts() {
        let before = alert_token("1", Some(t("2030-01-01T00:00:05.123456789Z")));
        let after = alert_token("1", Some(t("2030-01-01T00:07:00Z")));
        assert_eq!(before, "1@2030-01-01T00:00:05.123456789Z");
        assert_ne!(before, after);
        assert!(alert_token(&"9".repeat(20), Some(t("2030-01-01T00:00:05Z"))).len() < 100);
        assert_eq!(alert_token("42", None), "42");
    }
}
