//! Payloads of AWS's reserved topics: presence events and shadow update documents, and
//! the shadow state document `GetThingShadow` returns. Pure functions, no I/O.
//!
//! Presence events may arrive late, twice or out of order: each carries the time AWS saw
//! the (dis)connection, and that time, not the arrival, orders the device's state.

use chrono::{DateTime, Utc};
use serde::Deserialize;

/// A decoded presence event.
#[derive(Clone, Debug, PartialEq)]
pub struct Presence {
    /// The MQTT client id (a device's is its thing name).
    pub client_id: String,
    /// Connected or disconnected.
    pub connected: bool,
    /// When AWS saw it (`timestamp`, milliseconds since the epoch).
    pub at: DateTime<Utc>,
    /// `disconnectReason` of a disconnect (`CLIENT_INITIATED_DISCONNECT`, `MQTT_KEEP_ALIVE_TIMEOUT`...).
    pub reason: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct PresenceJson {
    client_id: Option<String>,
    timestamp: i64,
    event_type: String,
    disconnect_reason: Option<String>,
}

/// Decodes the presence event received on `.../presence/{connected|disconnected}/{client_id}`.
/// The payload's `eventType` and `clientId` must agree with the topic.
pub fn decode_presence(
    connected: bool,
    client_id: &str,
    payload: &[u8],
) -> Result<Presence, String> {
    let p: PresenceJson = serde_json::from_slice(payload).map_err(|e| {
        format!("presence event is not JSON with clientId, timestamp (ms) and eventType: {e}")
    })?;
    let want = if connected {
        "connected"
    } else {
        "disconnected"
    };
    if !p.event_type.eq_ignore_ascii_case(want) {
        return Err(format!(
            "presence event on the {want} topic has eventType {:?}",
            p.event_type
        ));
    }
    if p.client_id.as_deref().is_some_and(|c| c != client_id) {
        return Err(format!(
            "presence event for {client_id:?} names clientId {:?}",
            p.client_id.unwrap_or_default()
        ));
    }
    let at = DateTime::from_timestamp_millis(p.timestamp)
        .ok_or_else(|| format!("presence timestamp {} is out of range", p.timestamp))?;
    Ok(Presence {
        client_id: client_id.to_owned(),
        connected,
        at,
        reason: p.disconnect_reason,
    })
}

/// Reported state of a shadow document and its time.
#[derive(Clone, Debug, PartialEq)]
pub struct Reported {
    /// `state.reported`.
    pub properties: serde_json::Value,
    /// The latest `metadata.reported` timestamp, else the document's `timestamp`.
    pub at: Option<DateTime<Utc>>,
}

/// The reported state of a shadow document (`GetThingShadow` payload, or the `current`
/// part of an update document), `None` when nothing is reported.
pub fn reported_of(doc: &serde_json::Value) -> Option<Reported> {
    let properties = doc.pointer("/state/reported")?.clone();
    if !properties.is_object() {
        return None;
    }
    let at = doc
        .pointer("/metadata/reported")
        .and_then(latest_timestamp)
        .or_else(|| doc.get("timestamp").and_then(serde_json::Value::as_i64))
        .and_then(|s| DateTime::from_timestamp(s, 0));
    Some(Reported { properties, at })
}

/// The largest `timestamp` (seconds) anywhere in shadow metadata.
fn latest_timestamp(meta: &serde_json::Value) -> Option<i64> {
    match meta {
        serde_json::Value::Object(m) => {
            let own = m.get("timestamp").and_then(serde_json::Value::as_i64);
            m.iter()
                .filter(|(k, _)| *k != "timestamp")
                .filter_map(|(_, v)| latest_timestamp(v))
                .chain(own)
                .max()
        }
        serde_json::Value::Array(a) => a.iter().filter_map(latest_timestamp).max(),
        _ => None,
    }
}

/// Decodes a `$aws/things/{thing}/shadow/update/documents` message: the reported state
/// after the update when the update changed it, else `None` (a desired-only update).
pub fn decode_shadow_documents(payload: &[u8]) -> Result<Option<Reported>, String> {
    let doc: serde_json::Value = serde_json::from_slice(payload)
        .map_err(|e| format!("shadow update document is not JSON: {e}"))?;
    let current = doc
        .get("current")
        .ok_or("shadow update document has no \"current\" part")?;
    let Some(mut now) = reported_of(current) else {
        return Ok(None);
    };
    let before = doc.get("previous").and_then(reported_of);
    if before.is_some_and(|b| b.properties == now.properties) {
        return Ok(None);
    }
    if let Some(ts) = doc.get("timestamp").and_then(serde_json::Value::as_i64) {
        now.at = DateTime::from_timestamp(ts, 0).or(now.at);
    }
    Ok(Some(now))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presence_events_carry_the_aws_timestamp_and_must_match_their_topic() {
        let p = decode_presence(
            false,
            "pump-1",
            br#"{"clientId":"pump-1","timestamp":1714564800123,"eventType":"disconnected","disconnectReason":"MQTT_KEEP_ALIVE_TIMEOUT","sessionIdentifier":"s","principalIdentifier":"p","versionNumber":3}"#,
        )
        .expect("valid event");
        assert!(!p.connected);
        assert_eq!(p.at.timestamp_millis(), 1_714_564_800_123);
        assert_eq!(p.reason.as_deref(), Some("MQTT_KEEP_ALIVE_TIMEOUT"));
        for bad in [
            &br#"{"clientId":"pump-1","timestamp":1,"eventType":"connected"}"#[..],
            br#"{"clientId":"pump-2","timestamp":1,"eventType":"disconnected"}"#,
            br#"{"clientId":"pump-1","eventType":"disconnected"}"#,
            b"offline",
        ] {
            assert!(
                decode_presence(false, "pump-1", bad).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn reported_state_is_read_with_its_latest_metadata_time() {
        let doc = serde_json::json!({
            "state": {"desired": {"rate": 5}, "reported": {"rate": 4, "fw": {"v": "1.2"}}},
            "metadata": {"reported": {"rate": {"timestamp": 100}, "fw": {"v": {"timestamp": 250}}}},
            "timestamp": 999,
            "version": 7
        });
        let r = reported_of(&doc).expect("reported");
        assert_eq!(
            r.properties,
            serde_json::json!({"rate": 4, "fw": {"v": "1.2"}})
        );
        assert_eq!(r.at.map(|t| t.timestamp()), Some(250));
        assert_eq!(
            reported_of(&serde_json::json!({"state": {"desired": {"a": 1}}})),
            None
        );
    }

    #[test]
    fn update_documents_yield_the_reported_state_only_when_it_changed() {
        let changed = br#"{"previous":{"state":{"reported":{"rate":4}}},"current":{"state":{"reported":{"rate":5}},"metadata":{"reported":{"rate":{"timestamp":10}}}},"timestamp":12}"#;
        let r = decode_shadow_documents(changed)
            .expect("valid")
            .expect("changed");
        assert_eq!(r.properties, serde_json::json!({"rate": 5}));
        assert_eq!(r.at.map(|t| t.timestamp()), Some(12));
        let desired_only = br#"{"previous":{"state":{"reported":{"rate":4}}},"current":{"state":{"desired":{"rate":9},"reported":{"rate":4}}},"timestamp":13}"#;
        assert_eq!(decode_shadow_documents(desired_only).expect("valid"), None);
        assert!(decode_shadow_documents(b"{}").is_err());
    }
}
