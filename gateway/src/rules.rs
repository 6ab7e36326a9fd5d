//! Alert rules over JSON telemetry, compiled once from the config.
//!
//! A rule looks up a JSON pointer, compares it with a value and, when it matches, raises an
//! alert whose token is the provider's message id (the first matching rule gets the bare
//! id, later ones `id:rule`), so a redelivered message always yields the same tokens and the
//! store can refuse a second alert.

use chrono::{DateTime, Utc};
use iotgw_config::{CompareOp, RuleCommandConfig, RuleConfig};
use iotgw_registry::{AlertType, DeviceId, NewAlert, NewAlertCommand};
use serde_json::Value;
use sha2::{Digest, Sha256};

/// Longest alert token Field Service stores (`msdyn_alerttoken`).
pub const MAX_TOKEN_LEN: usize = 100;
/// Longest description (`msdyn_description`).
pub const MAX_DESCRIPTION_LEN: usize = 100;
/// Longest alert data (`msdyn_alertdata`).
pub const MAX_ALERT_DATA_LEN: usize = 8192;

/// One compiled rule.
#[derive(Debug, Clone)]
pub struct Rule {
    name: String,
    pointer: Vec<String>,
    op: CompareOp,
    number: Option<f64>,
    value: Option<Value>,
    alert_type: AlertType,
    description: Vec<Part>,
    priority: Option<u8>,
    command: Option<RuleCommandConfig>,
}

/// A piece of a description template, split once at start-up.
#[derive(Debug, Clone, PartialEq)]
enum Part {
    Text(String),
    DeviceId,
    Value,
    Rule,
}

fn compile_template(t: &str) -> Vec<Part> {
    let mut parts = Vec::new();
    let mut rest = t;
    while let Some(start) = rest.find('{') {
        let (before, after) = rest.split_at(start);
        let field = [
            ("{device_id}", Part::DeviceId),
            ("{value}", Part::Value),
            ("{rule}", Part::Rule),
        ]
        .into_iter()
        .find(|(name, _)| after.starts_with(name));
        match field {
            Some((name, part)) => {
                if !before.is_empty() {
                    parts.push(Part::Text(before.to_string()));
                }
                parts.push(part);
                rest = &after[name.len()..];
            }
            None => {
                parts.push(Part::Text(format!("{before}{{")));
                rest = &after[1..];
            }
        }
    }
    if !rest.is_empty() {
        parts.push(Part::Text(rest.to_string()));
    }
    parts
}

/// What makes two alerts "the same" for debounce, besides the device.
#[derive(Debug, Clone, PartialEq)]
enum DebounceField {
    Rule,
    AlertType,
    Pointer(Vec<String>),
}

/// All rules plus the debounce key recipe.
#[derive(Debug, Clone)]
pub struct RuleSet {
    rules: Vec<Rule>,
    debounce: Vec<DebounceField>,
    command_name_property: String,
    command_parameters_property: String,
}

fn split_pointer(p: &str) -> Vec<String> {
    if p.is_empty() {
        return Vec::new();
    }
    p.trim_start_matches('/')
        .split('/')
        .map(|s| s.replace("~1", "/").replace("~0", "~"))
        .collect()
}

fn lookup<'a>(mut v: &'a Value, path: &[String]) -> Option<&'a Value> {
    for seg in path {
        v = match v {
            Value::Object(m) => m.get(seg.as_str())?,
            Value::Array(a) => a.get(seg.parse::<usize>().ok()?)?,
            _ => return None,
        };
    }
    Some(v)
}

/// Cuts `s` to at most `max` characters.
pub fn truncate_chars(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((i, _)) => s[..i].to_string(),
        None => s.to_string(),
    }
}

fn scalar_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

impl Rule {
    fn compile(name: &str, c: &RuleConfig) -> Self {
        Self {
            name: name.to_string(),
            pointer: split_pointer(&c.pointer),
            op: c.op,
            number: c.value.as_ref().and_then(Value::as_f64),
            value: c.value.clone(),
            alert_type: AlertType::from_label(&c.alert_type).unwrap_or(AlertType::Anomaly),
            description: compile_template(&c.description),
            priority: c.priority,
            command: c.command.clone(),
        }
    }

    /// The rule's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The matched value if the rule fires on `doc`.
    pub fn matches<'a>(&self, doc: &'a Value) -> Option<&'a Value> {
        let got = lookup(doc, &self.pointer)?;
        let hit = match self.op {
            CompareOp::Exists => true,
            CompareOp::Eq => self.equal(got),
            CompareOp::Ne => !self.equal(got),
            CompareOp::Gt | CompareOp::Ge | CompareOp::Lt | CompareOp::Le => {
                let (Some(x), Some(limit)) = (got.as_f64(), self.number) else {
                    return None;
                };
                match self.op {
                    CompareOp::Gt => x > limit,
                    CompareOp::Ge => x >= limit,
                    CompareOp::Lt => x < limit,
                    _ => x <= limit,
                }
            }
        };
        hit.then_some(got)
    }

    fn equal(&self, got: &Value) -> bool {
        match (got.as_f64(), self.number) {
            (Some(x), Some(y)) => x == y,
            _ => self.value.as_ref() == Some(got),
        }
    }

    fn describe(&self, device_id: &DeviceId, value: &Value) -> String {
        let mut text = String::with_capacity(64);
        for part in &self.description {
            match part {
                Part::Text(t) => text.push_str(t),
                Part::DeviceId => text.push_str(device_id.as_str()),
                Part::Value => match value {
                    Value::String(s) => text.push_str(s),
                    other => text.push_str(&other.to_string()),
                },
                Part::Rule => text.push_str(&self.name),
            }
        }
        if text.len() > MAX_DESCRIPTION_LEN {
            text = truncate_chars(&text, MAX_DESCRIPTION_LEN);
        }
        text
    }
}

/// The alert token of a reading: `<instance>/<device>/<message id>` for the first rule
/// that fires, `<instance>/<device>#<rule>/<message id>` for each later one, then made to
/// fit ([`fit_token`]). Instance names, device ids and rule names never hold `/` or `#`, so
/// two different (instance, device, rule, message id) never give one token: a device's ids
/// cannot collide with another device's (device `a` with id `b:m1` against device `a:b`
/// with id `m1`), nor an instance's with another instance's.
pub fn alert_token(
    instance: &str,
    device_id: &DeviceId,
    later_rule: Option<&str>,
    message_id: &str,
) -> String {
    let raw = match later_rule {
        None => format!("{instance}/{device_id}/{message_id}"),
        Some(rule) => format!("{instance}/{device_id}#{rule}/{message_id}"),
    };
    fit_token(raw)
}

/// Makes a token fit `msdyn_alerttoken`: ids longer than 100 characters are replaced by
/// `sha256:` and 64 hex digits of their hash (still deterministic, still unique).
pub fn fit_token(raw: String) -> String {
    if raw.len() <= MAX_TOKEN_LEN || raw.chars().count() <= MAX_TOKEN_LEN {
        raw
    } else {
        format!("sha256:{}", hex::encode(Sha256::digest(raw.as_bytes())))
    }
}

impl RuleSet {
    /// Compiles the configured rules (in name order) and debounce fields. The config was
    /// validated, so this cannot fail.
    pub fn new(cfg: &iotgw_config::Config) -> Self {
        let rules = cfg.rules.iter().map(|(n, c)| Rule::compile(n, c)).collect();
        let debounce = cfg
            .pipeline
            .debounce_fields
            .iter()
            .map(|f| match f.as_str() {
                "rule" => DebounceField::Rule,
                "alert_type" => DebounceField::AlertType,
                p => DebounceField::Pointer(split_pointer(p)),
            })
            .collect();
        Self {
            rules,
            debounce,
            command_name_property: cfg.pipeline.command_name_property.clone(),
            command_parameters_property: cfg.pipeline.command_parameters_property.clone(),
        }
    }

    /// The number of rules.
    pub fn len(&self) -> usize {
        self.rules.len()
    }

    /// Whether there are no rules.
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// The command message Field Service's default shape gives:
    /// `{"CommandName": name, "Parameters": parameters}` (property names configurable).
    pub fn command_message(&self, name: &str, parameters: &Value) -> String {
        let mut m = serde_json::Map::new();
        m.insert(
            self.command_name_property.clone(),
            Value::String(name.to_string()),
        );
        m.insert(self.command_parameters_property.clone(), parameters.clone());
        Value::Object(m).to_string()
    }

    /// Evaluates every rule on a parsed message and returns the alerts to commit.
    pub fn evaluate(
        &self,
        instance: &str,
        device_id: &DeviceId,
        message_id: &str,
        raw: &str,
        doc: &Value,
        at: DateTime<Utc>,
    ) -> Vec<NewAlert> {
        let mut out = Vec::new();
        for rule in &self.rules {
            let Some(value) = rule.matches(doc) else {
                continue;
            };
            let later = (!out.is_empty()).then_some(rule.name.as_str());
            let alert_token = alert_token(instance, device_id, later, message_id);
            let alert_data = if raw.len() > MAX_ALERT_DATA_LEN {
                truncate_chars(raw, MAX_ALERT_DATA_LEN)
            } else {
                raw.to_string()
            };
            let command = rule.command.as_ref().map(|c| NewAlertCommand {
                name: c.name.clone(),
                message: self.command_message(&c.name, &c.parameters),
                correlation_id: format!("{alert_token}/{}", c.name),
            });
            out.push(NewAlert {
                description: rule.describe(device_id, value),
                alert_data,
                alert_time: at,
                alert_token,
                alert_type: rule.alert_type,
                priority_score: rule.priority,
                rule: rule.name.clone(),
                debounce_key: self.debounce_key(device_id, rule, doc),
                command,
            });
        }
        out
    }

    fn debounce_key(&self, device_id: &DeviceId, rule: &Rule, doc: &Value) -> String {
        let mut key = String::with_capacity(64);
        key.push_str(device_id.as_str());
        for f in &self.debounce {
            key.push('\u{1f}');
            match f {
                DebounceField::Rule => key.push_str(&rule.name),
                DebounceField::AlertType => key.push_str(&rule.alert_type.value().to_string()),
                DebounceField::Pointer(p) => {
                    if let Some(v) = lookup(doc, p) {
                        key.push_str(&scalar_text(v));
                    }
                }
            }
        }
        key
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use iotgw_config::Config;

    fn set(extra: &str) -> RuleSet {
        let cfg: Config = toml::from_str(extra).expect("config");
        RuleSet::new(&cfg)
    }

    fn id(s: &str) -> DeviceId {
        DeviceId::parse(s).expect("id")
    }

    const TWO_RULES: &str = r#"
        [pipeline]
        debounce_fields = ["rule", "/sensor"]
        [rules.a_hot]
        pointer = "/temperature"
        op = "gt"
        value = 75
        description = "{device_id} at {value}"
        [rules.b_door]
        pointer = "/door"
        op = "eq"
        value = "open"
        alert_type = "Info"
        description = "door {value} ({rule})"
        [rules.b_door.command]
        name = "lock"
        parameters = { force = true }
    "#;

    #[test]
    fn tokens_name_the_instance_the_device_and_the_message_and_later_rules_add_their_name() {
        let rs = set(TWO_RULES);
        let doc = serde_json::json!({"temperature": 80.5, "door": "open", "sensor": "s1"});
        let alerts = rs.evaluate("edge", &id("d1"), "m-1", "{}", &doc, Utc::now());
        let tokens: Vec<_> = alerts.iter().map(|a| a.alert_token.as_str()).collect();
        assert_eq!(tokens, ["edge/d1/m-1", "edge/d1#b_door/m-1"]);
        assert_eq!(alerts[0].description, "d1 at 80.5");
        assert_eq!(alerts[1].description, "door open (b_door)");
        assert_eq!(alerts[1].alert_type, AlertType::Info);
        assert_eq!(alerts[0].debounce_key, "d1\u{1f}a_hot\u{1f}s1");
        let cmd = alerts[1].command.as_ref().expect("command");
        assert_eq!(
            cmd.message,
            r#"{"CommandName":"lock","Parameters":{"force":true}}"#
        );
    }

    #[test]
    fn tokens_of_different_devices_instances_or_rules_never_collide() {
        let t = |instance: &str, device: &str, rule: Option<&str>, message: &str| {
            alert_token(instance, &id(device), rule, message)
        };
        // The colliding pair of the old `<device>:<id>` form.
        assert_ne!(t("edge", "a", None, "b:m1"), t("edge", "a:b", None, "m1"));
        assert_ne!(t("edge", "d", None, "m"), t("cloud", "d", None, "m"));
        assert_ne!(t("edge", "d", Some("hot"), "m"), t("edge", "d", None, "m"));
        assert_ne!(
            t("edge", "d", Some("hot"), "m"),
            t("edge", "d", None, "hot/m")
        );
        assert_ne!(
            t("edge", "d", Some("hot"), "m"),
            t("edge", "d", None, "m:hot")
        );
        assert_eq!(t("edge", "d", None, "m"), t("edge", "d", None, "m"));
    }

    proptest::proptest! {
        #[test]
        fn distinct_readings_get_distinct_tokens(
            a in ("[a-z]{1,3}", "[a-z:]{1,4}", proptest::option::of("[a-z]{1,2}"), "[a-z:/#]{0,5}"),
            b in ("[a-z]{1,3}", "[a-z:]{1,4}", proptest::option::of("[a-z]{1,2}"), "[a-z:/#]{0,5}"),
        ) {
            let token = |(i, d, r, m): &(String, String, Option<String>, String)| {
                alert_token(i, &id(d), r.as_deref(), m)
            };
            proptest::prop_assert_eq!(a == b, token(&a) == token(&b));
        }
    }

    #[test]
    fn comparisons_need_the_right_type_and_missing_values_never_match() {
        let rs = set(TWO_RULES);
        for doc in [
            serde_json::json!({"temperature": "hot"}),
            serde_json::json!({"temperature": 75}),
            serde_json::json!({"humidity": 99}),
            serde_json::json!([1, 2]),
        ] {
            assert!(
                rs.evaluate("edge", &id("d1"), "m", "{}", &doc, Utc::now())
                    .is_empty(),
                "{doc}"
            );
        }
    }

    #[test]
    fn long_descriptions_tokens_and_data_are_cut_to_field_service_sizes() {
        let rs = set(r#"
            [rules.x]
            pointer = "/v"
            op = "exists"
            description = "{value}"
        "#);
        let long = "é".repeat(300);
        let raw = format!("{{\"v\":\"{long}\"}}").repeat(40);
        let doc = serde_json::json!({"v": long});
        let a = &rs.evaluate("edge", &id("d"), &"m".repeat(150), &raw, &doc, Utc::now())[0];
        assert_eq!(a.description.chars().count(), 100);
        assert!(a.alert_token.starts_with("sha256:") && a.alert_token.len() <= 100);
        assert_eq!(a.alert_data.chars().count(), 8192);
    }

    #[test]
    fn templates_fill_every_field_and_keep_unknown_braces() {
        let parts = compile_template("{rule}: {device_id} at {value} {x}");
        assert_eq!(parts.len(), 7, "{parts:?}");
        let rs = set(r#"
            [rules.t]
            pointer = "/v"
            op = "exists"
            description = "{rule}: {device_id} at {value} {x}"
        "#);
        let doc = serde_json::json!({"v": 3});
        assert_eq!(
            rs.evaluate("edge", &id("d"), "m", "{}", &doc, Utc::now())[0].description,
            "t: d at 3 {x}"
        );
    }

    #[test]
    fn pointers_walk_arrays_and_escaped_keys() {
        let rs = set(r#"
            [rules.x]
            pointer = "/a~1b/1/c"
            op = "le"
            value = 0
            description = "x"
        "#);
        let doc = serde_json::json!({"a/b": [{}, {"c": -1}]});
        assert_eq!(
            rs.evaluate("edge", &id("d"), "m", "{}", &doc, Utc::now())
                .len(),
            1
        );
    }
}
