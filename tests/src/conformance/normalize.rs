//! Normalising the API's records so that two providers can be compared, and the golden
//! files every provider is compared with.
//!
//! What differs legitimately between providers (or runs) becomes a placeholder:
//! - record ids (any UUID) become `<id N>`, numbered by first appearance, so relations
//!   (a child's `msdyn_parentalert`, an alert's `msdyn_lastcommandsent`) are still compared;
//! - tokens chosen by the provider or the gateway (`msdyn_alerttoken`,
//!   `msdyn_parentalerttoken`, `iotgw_correlationid`, a dead letter's `message_id`)
//!   become `<token N>`, numbered the same way;
//! - timestamps (any RFC 3339 string) become `<time>` (`null` stays `null`);
//! - the provider instance becomes `<instance>`, also inside a dead letter's `source`;
//! - the provider's own note (`msdyn_registrationmessage`) becomes `<provider note>`;
//! - the run's nonce in names (`pump-1a2b3c4d`) becomes `{n}`;
//! - a dead letter's sequence number `id` becomes `<seq>`;
//! - JSON carried as text (`msdyn_alertdata`, `msdyn_message`) is parsed, so only its
//!   content counts.
//!
//! Everything else — option values, statuses, descriptions, reasons, parameters, tags,
//! reported properties, which fields are null — must be identical.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

/// Keys whose values are tokens (compared by identity, not by content).
const TOKEN_KEYS: &[&str] = &[
    "msdyn_alerttoken",
    "msdyn_parentalerttoken",
    "iotgw_correlationid",
    "message_id",
];
/// Keys holding the provider instance name.
const INSTANCE_KEYS: &[&str] = &["msdyn_iotproviderinstance"];
/// Keys whose text is the provider's own.
const PROVIDER_NOTE_KEYS: &[&str] = &["msdyn_registrationmessage"];
/// Keys holding JSON as text.
const JSON_TEXT_KEYS: &[&str] = &["msdyn_alertdata", "msdyn_message"];

/// Normalises the records of one scenario run (one numbering across all of them).
#[derive(Debug)]
pub struct Normalizer {
    nonce: String,
    instance: String,
    ids: BTreeMap<String, usize>,
    tokens: BTreeMap<String, usize>,
}

impl Normalizer {
    /// A normaliser for a run with this nonce and provider instance name.
    pub fn new(nonce: &str, instance: &str) -> Self {
        Self {
            nonce: nonce.to_owned(),
            instance: instance.to_owned(),
            ids: BTreeMap::new(),
            tokens: BTreeMap::new(),
        }
    }

    /// The normalised copy of `v`.
    pub fn normalize(&mut self, v: &Value) -> Value {
        self.value(None, v)
    }

    fn value(&mut self, key: Option<&str>, v: &Value) -> Value {
        match v {
            Value::Object(m) => {
                // Keys in sorted order, so numbering does not depend on the map's order.
                let mut keys: Vec<&String> = m.keys().collect();
                keys.sort();
                let mut out = Map::new();
                for k in keys {
                    out.insert(k.clone(), self.value(Some(k), &m[k]));
                }
                Value::Object(out)
            }
            Value::Array(a) => Value::Array(a.iter().map(|x| self.value(key, x)).collect()),
            Value::String(s) => self.string(key, s),
            Value::Number(_) if key == Some("id") => Value::String("<seq>".into()),
            other => other.clone(),
        }
    }

    fn string(&mut self, key: Option<&str>, s: &str) -> Value {
        let key = key.unwrap_or_default();
        if TOKEN_KEYS.contains(&key) {
            let n = self.tokens.len() + 1;
            let n = *self.tokens.entry(s.to_owned()).or_insert(n);
            return Value::String(format!("<token {n}>"));
        }
        if INSTANCE_KEYS.contains(&key) && s == self.instance {
            return Value::String("<instance>".into());
        }
        if PROVIDER_NOTE_KEYS.contains(&key) {
            return Value::String("<provider note>".into());
        }
        if key == "source" {
            if let Some(rest) = s.strip_suffix(self.instance.as_str()) {
                return Value::String(format!("{rest}<instance>"));
            }
        }
        if JSON_TEXT_KEYS.contains(&key) {
            if let Ok(parsed) = serde_json::from_str::<Value>(s) {
                return self.value(None, &parsed);
            }
        }
        if uuid::Uuid::parse_str(s).is_ok() {
            let n = self.ids.len() + 1;
            let n = *self.ids.entry(s.to_owned()).or_insert(n);
            return Value::String(format!("<id {n}>"));
        }
        if chrono::DateTime::parse_from_rfc3339(s).is_ok() {
            return Value::String("<time>".into());
        }
        Value::String(s.replace(&self.nonce, "{n}"))
    }
}

/// Pretty JSON with object keys sorted (stable whatever map the JSON library uses).
pub fn canonical(v: &Value) -> String {
    fn sort(v: &Value) -> Value {
        match v {
            Value::Object(m) => {
                let sorted: BTreeMap<&String, Value> =
                    m.iter().map(|(k, v)| (k, sort(v))).collect();
                let mut out = Map::new();
                for (k, v) in sorted {
                    out.insert(k.clone(), v);
                }
                Value::Object(out)
            }
            Value::Array(a) => Value::Array(a.iter().map(sort).collect()),
            other => other.clone(),
        }
    }
    let mut s = serde_json::to_string_pretty(&sort(v)).expect("JSON values serialise");
    s.push('\n');
    s
}

/// The golden file of a scenario.
pub fn golden_path(scenario: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("conformance/golden")
        .join(format!("{scenario}.json"))
}

/// How a snapshot compared with its golden file.
#[derive(Debug, PartialEq, Eq)]
pub enum Golden {
    /// Equal.
    Same,
    /// The golden file did not exist (or `IOTGW_BLESS=1`): written from this snapshot.
    Written(PathBuf),
}

/// Compares `snapshot` (already normalised) with the scenario's golden file. A missing
/// file is written from it, except under `CI=true` (a CI run must compare, not create);
/// `IOTGW_BLESS=1` rewrites it. The error shows the differing lines.
pub fn check_golden(scenario: &str, kind: &str, snapshot: &Value) -> anyhow::Result<Golden> {
    let path = golden_path(scenario);
    let actual = canonical(snapshot);
    let bless = std::env::var("IOTGW_BLESS").is_ok_and(|v| v == "1");
    match std::fs::read_to_string(&path) {
        Ok(expected) if !bless => {
            if expected == actual {
                return Ok(Golden::Same);
            }
            anyhow::bail!(
                "{kind}'s records differ from {} (- golden, + {kind}):\n{}\n\
                 If the change is intended for every provider, rerun with IOTGW_BLESS=1 and commit the file.",
                path.display(),
                diff(&expected, &actual)
            )
        }
        Ok(_) | Err(_) => {
            anyhow::ensure!(
                bless || !iotgw_testkit::ci(),
                "CI=true and the golden file {} is missing: run the suite locally once to create it and commit it",
                path.display()
            );
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            std::fs::write(&path, actual)?;
            Ok(Golden::Written(path))
        }
    }
}

/// A line diff (longest common subsequence), changed lines with two lines of context.
pub fn diff(expected: &str, actual: &str) -> String {
    let a: Vec<&str> = expected.lines().collect();
    let b: Vec<&str> = actual.lines().collect();
    let (n, m) = (a.len(), b.len());
    let mut lcs = vec![vec![0usize; m + 1]; n + 1];
    for i in (0..n).rev() {
        for j in (0..m).rev() {
            lcs[i][j] = if a[i] == b[j] {
                lcs[i + 1][j + 1] + 1
            } else {
                lcs[i + 1][j].max(lcs[i][j + 1])
            };
        }
    }
    let mut ops: Vec<(char, &str)> = Vec::new();
    let (mut i, mut j) = (0, 0);
    while i < n || j < m {
        if i < n && j < m && a[i] == b[j] {
            ops.push((' ', a[i]));
            i += 1;
            j += 1;
        } else if i < n && (j == m || lcs[i + 1][j] >= lcs[i][j + 1]) {
            ops.push(('-', a[i]));
            i += 1;
        } else {
            ops.push(('+', b[j]));
            j += 1;
        }
    }
    let near_change = |k: usize| {
        let lo = k.saturating_sub(2);
        let hi = (k + 3).min(ops.len());
        ops[lo..hi].iter().any(|(c, _)| *c != ' ')
    };
    let mut out = String::new();
    let mut skipped = false;
    for (k, (c, line)) in ops.iter().enumerate() {
        if near_change(k) {
            out.push_str(&format!("{c} {line}\n"));
            skipped = false;
        } else if !skipped {
            out.push_str("  ...\n");
            skipped = true;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn ids_tokens_times_instance_and_nonce_become_placeholders_keeping_relations() {
        let mut n = Normalizer::new("1a2b3c4d", "mqtt");
        let primary = "0190a1b2-0000-7000-8000-000000000001";
        let v = json!({
            "alerts": [
                {"msdyn_iotalertid": primary, "msdyn_alerttoken": "pump-1a2b3c4d:m-1",
                 "msdyn_parentalert": null, "createdon": "2026-01-01T10:00:00.123Z",
                 "msdyn_iotproviderinstance": "mqtt", "msdyn_alertdata": "{\"temperature\": 80.5}",
                 "msdyn_description": "Temperature 80.5 on pump-1a2b3c4d"},
                {"msdyn_iotalertid": "0190a1b2-0000-7000-8000-000000000002",
                 "msdyn_parentalert": primary, "msdyn_parentalerttoken": "pump-1a2b3c4d:m-1"}
            ],
            "dead_letters": [{"id": 7, "source": "telemetry:mqtt", "message_id": "x"}]
        });
        let out = n.normalize(&v);
        assert_eq!(out["alerts"][0]["msdyn_iotalertid"], "<id 1>");
        assert_eq!(out["alerts"][1]["msdyn_parentalert"], "<id 1>");
        assert_eq!(out["alerts"][0]["msdyn_alerttoken"], "<token 1>");
        assert_eq!(out["alerts"][1]["msdyn_parentalerttoken"], "<token 1>");
        assert_eq!(out["alerts"][0]["createdon"], "<time>");
        assert_eq!(out["alerts"][0]["msdyn_parentalert"], Value::Null);
        assert_eq!(out["alerts"][0]["msdyn_iotproviderinstance"], "<instance>");
        assert_eq!(
            out["alerts"][0]["msdyn_alertdata"],
            json!({"temperature": 80.5})
        );
        assert_eq!(
            out["alerts"][0]["msdyn_description"],
            "Temperature 80.5 on pump-{n}"
        );
        assert_eq!(out["dead_letters"][0]["id"], "<seq>");
        assert_eq!(out["dead_letters"][0]["source"], "telemetry:<instance>");
    }

    #[test]
    fn the_diff_marks_changed_lines_with_context() {
        let d = diff("a\nb\nc\nd\ne\nf\ng\n", "a\nb\nc\nX\ne\nf\ng\n");
        assert!(d.contains("- d\n+ X\n"), "{d}");
        assert!(d.contains("  c\n") && d.contains("  e\n"), "{d}");
    }
}
