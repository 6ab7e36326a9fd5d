//! What a telemetry message keeps as readings: every number and boolean of its JSON
//! document by JSON pointer (RFC 6901: `/engine/temp`, `~1` for a `/` in a key, `~0` for a
//! `~`), booleans as 0 and 1, in key order (objects' keys sorted, arrays in order), and the
//! message's own time (which is not a measure itself). Pure, no I/O.

use chrono::{DateTime, TimeZone, Utc};
use iotgw_config::ReadingsConfig;
use iotgw_registry::readings::MAX_MEASURE_BYTES;

/// `[readings]`, read once per live version.
#[derive(Clone, Debug)]
pub(crate) struct Measures {
    enabled: bool,
    only: std::collections::HashSet<String>,
    max: usize,
    time_pointer: String,
}

impl Measures {
    pub(crate) fn new(config: &ReadingsConfig) -> Self {
        Self {
            enabled: config.enabled,
            only: config.measures.iter().cloned().collect(),
            max: config.max_per_message,
            time_pointer: config.time_pointer.clone(),
        }
    }

    /// The measures of `doc` to keep (none when readings are off).
    pub(crate) fn of(&self, doc: &serde_json::Value) -> Vec<(String, f64)> {
        let mut out = Vec::new();
        if self.enabled {
            walk(doc, &mut String::new(), &mut |pointer, value| {
                if out.len() < self.max
                    && pointer.len() <= MAX_MEASURE_BYTES
                    && pointer != self.time_pointer
                    && (self.only.is_empty() || self.only.contains(pointer))
                {
                    out.push((pointer.to_owned(), value));
                }
                out.len() < self.max
            });
        }
        out
    }

    /// The message's own time (`time_pointer`: an RFC 3339 string or Unix milliseconds),
    /// else `received_at`; never later than `latest`.
    pub(crate) fn time(
        &self,
        doc: &serde_json::Value,
        received_at: DateTime<Utc>,
        latest: DateTime<Utc>,
    ) -> DateTime<Utc> {
        let own = if self.time_pointer.is_empty() {
            None
        } else {
            match doc.pointer(&self.time_pointer) {
                Some(serde_json::Value::String(s)) => DateTime::parse_from_rfc3339(s)
                    .ok()
                    .map(|t| t.with_timezone(&Utc)),
                Some(serde_json::Value::Number(n)) => n
                    .as_i64()
                    .and_then(|ms| Utc.timestamp_millis_opt(ms).single()),
                _ => None,
            }
        };
        own.unwrap_or(received_at).min(latest)
    }
}

/// Calls `keep(pointer, value)` for every number and boolean under `v`, in key order, while it returns true. Keys with control characters are skipped (no store or
/// chart holds them well).
fn walk(
    v: &serde_json::Value,
    pointer: &mut String,
    keep: &mut dyn FnMut(&str, f64) -> bool,
) -> bool {
    use serde_json::Value;
    match v {
        Value::Number(n) => match n.as_f64().filter(|f| f.is_finite()) {
            Some(f) => keep(pointer, f),
            None => true,
        },
        Value::Bool(b) => keep(pointer, if *b { 1.0 } else { 0.0 }),
        Value::Object(map) => {
            for (key, child) in map {
                if key.chars().any(char::is_control) {
                    continue;
                }
                let len = pointer.len();
                pointer.push('/');
                pointer.push_str(&key.replace('~', "~0").replace('/', "~1"));
                let go_on = walk(child, pointer, keep);
                pointer.truncate(len);
                if !go_on {
                    return false;
                }
            }
            true
        }
        Value::Array(items) => {
            for (i, child) in items.iter().enumerate() {
                let len = pointer.len();
                pointer.push('/');
                pointer.push_str(&i.to_string());
                let go_on = walk(child, pointer, keep);
                pointer.truncate(len);
                if !go_on {
                    return false;
                }
            }
            true
        }
        Value::Null | Value::String(_) => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Readings on, everything else as configured by default.
    fn on() -> ReadingsConfig {
        ReadingsConfig {
            enabled: true,
            ..ReadingsConfig::default()
        }
    }

    fn all() -> Measures {
        Measures::new(&on())
    }

    #[test]
    fn numbers_and_booleans_are_kept_by_json_pointer_in_key_order() {
        let doc = json!({
            "message_id": "m-1",
            "temperature": 71.5,
            "engine": {"rpm": 900, "on": true, "a/b": 1, "t~": 2},
            "axes": [1, {"x": false}],
            "note": null
        });
        assert_eq!(
            all().of(&doc),
            vec![
                ("/axes/0".to_owned(), 1.0),
                ("/axes/1/x".to_owned(), 0.0),
                ("/engine/a~1b".to_owned(), 1.0),
                ("/engine/on".to_owned(), 1.0),
                ("/engine/rpm".to_owned(), 900.0),
                ("/engine/t~0".to_owned(), 2.0),
                ("/temperature".to_owned(), 71.5),
            ]
        );
        // Every pointer finds its value again.
        for (pointer, _) in all().of(&doc) {
            assert!(doc.pointer(&pointer).is_some(), "{pointer}");
        }
    }

    #[test]
    fn the_allow_list_and_the_cap_bound_what_is_kept() {
        let doc = json!({"a": 1, "b": 2, "c": 3, "ctl\u{1}": 4});
        let only = Measures::new(&ReadingsConfig {
            measures: vec!["/c".into(), "/a".into()],
            ..on()
        });
        assert_eq!(
            only.of(&doc),
            vec![("/a".to_owned(), 1.0), ("/c".to_owned(), 3.0)]
        );
        let two = Measures::new(&ReadingsConfig {
            max_per_message: 2,
            ..on()
        });
        assert_eq!(two.of(&doc).len(), 2);
        let off = Measures::new(&ReadingsConfig {
            enabled: false,
            ..on()
        });
        assert!(off.of(&doc).is_empty());
    }

    #[test]
    fn the_message_time_is_read_from_the_payload_and_never_later_than_allowed() {
        let received = Utc
            .with_ymd_and_hms(2026, 1, 1, 12, 0, 0)
            .single()
            .expect("t");
        let latest = received + chrono::Duration::minutes(5);
        let m = all();
        let t = |doc| m.time(&doc, received, latest);
        assert_eq!(
            t(json!({"timestamp": "2026-01-01T11:59:00Z"})),
            received - chrono::Duration::minutes(1)
        );
        assert_eq!(
            t(json!({"timestamp": received.timestamp_millis() - 1000})),
            received - chrono::Duration::seconds(1)
        );
        assert_eq!(t(json!({"timestamp": "2999-01-01T00:00:00Z"})), latest);
        assert_eq!(t(json!({"timestamp": "yesterday"})), received);
        assert_eq!(t(json!({})), received);
        // The time is the message's time, not one of its measures.
        assert_eq!(
            m.of(&json!({"timestamp": received.timestamp_millis(), "t": 1})),
            vec![("/t".to_owned(), 1.0)]
        );
    }
}
