//! Field Service's command and property definitions (`[definitions]` in the config): a
//! command sent by definition has its parameters checked against their types, and a
//! device's reported properties are read through the property definitions. Pure, no I/O.
//!
//! A parameter or property with a parent sits inside its parent's object: `threshold`
//! with parent `settings` is `{"settings": {"threshold": 5}}`.

use iotgw_config::{CommandDefinitionConfig, DefinitionsConfig, PropertyType};
use serde::Serialize;
use serde_json::Value;

use crate::core::GatewayError;

fn invalid(field: impl Into<String>, message: impl Into<String>) -> GatewayError {
    GatewayError::Invalid {
        field: field.into(),
        message: message.into(),
    }
}

/// The keys from the top down to `name`: its parents', then its own.
fn path<'a>(defs: &'a DefinitionsConfig, name: &'a str) -> Vec<&'a str> {
    let mut out = vec![name];
    let mut at = name;
    // Validation refuses loops; the bound keeps a bad config from spinning.
    for _ in 0..defs.properties.len() {
        match defs.properties.get(at).and_then(|p| p.parent.as_deref()) {
            Some(up) => {
                out.push(up);
                at = up;
            }
            None => break,
        }
    }
    out.reverse();
    out
}

fn at<'v>(v: &'v Value, keys: &[&str]) -> Option<&'v Value> {
    keys.iter().try_fold(v, |v, k| v.get(*k))
}

/// Why `v` is not of type `kind`, if it is not.
fn type_error(kind: PropertyType, v: &Value) -> Option<String> {
    let ok = match kind {
        PropertyType::String => v.is_string(),
        PropertyType::Object => v.is_object(),
        PropertyType::Boolean => v.is_boolean(),
        PropertyType::Whole => v.is_i64() || v.is_u64(),
        PropertyType::Decimal => v.is_number(),
        PropertyType::DateTime => v
            .as_str()
            .is_some_and(|s| chrono::DateTime::parse_from_rfc3339(s).is_ok()),
    };
    (!ok).then(|| {
        let hint = match kind {
            PropertyType::DateTime => " (an RFC 3339 string, e.g. \"2026-12-07T10:00:00Z\")",
            PropertyType::Whole => " (a whole number, without a fraction)",
            _ => "",
        };
        format!("{v} is not a {}{hint}", kind.label())
    })
}

/// The definition of `command`, or a 400 naming `msdyn_command`.
pub fn command<'a>(
    defs: &'a DefinitionsConfig,
    command: &str,
) -> Result<&'a CommandDefinitionConfig, GatewayError> {
    defs.commands.get(command).ok_or_else(|| {
        let known: Vec<&str> = defs.commands.keys().map(String::as_str).collect();
        invalid(
            "msdyn_command",
            format!(
                "`{command}` is not a command definition (defined: {known:?}): add [definitions.commands.{command}] to the config, or send the command without a definition"
            ),
        )
    })
}

/// Checks a command's parameters against its definition: every given key is a parameter
/// (or a parameter's parent object), every required parameter is there, every value has
/// its property's type, and the device's category is one the command is linked to. The
/// error names the parameter (`Parameters.settings.threshold`).
pub fn check_command(
    defs: &DefinitionsConfig,
    name: &str,
    def: &CommandDefinitionConfig,
    parameters: &Value,
    category: Option<&str>,
) -> Result<(), GatewayError> {
    if !def.categories.is_empty()
        && !category.is_some_and(|c| def.categories.iter().any(|d| d == c))
    {
        return Err(invalid(
            "msdyn_command",
            format!(
                "command `{name}` is linked to the categories {:?}; this device's category is {}",
                def.categories,
                category.map_or("none".to_owned(), |c| format!("`{c}`"))
            ),
        ));
    }
    let empty = serde_json::Map::new();
    let given = match parameters {
        Value::Object(m) => m,
        Value::Null => &empty,
        other => {
            return Err(invalid(
                "Parameters",
                format!("{other} is not an object: send the parameters as {{\"name\": value}}"),
            ))
        }
    };
    let root = Value::Object(given.clone());
    let paths: Vec<Vec<&str>> = def.parameters.iter().map(|p| path(defs, p)).collect();
    // Every key given, at every level, must lead to a parameter.
    fn unknown(v: &Value, prefix: &mut Vec<String>, paths: &[Vec<&str>]) -> Option<String> {
        let Value::Object(m) = v else { return None };
        for (k, child) in m {
            prefix.push(k.clone());
            let leads = paths.iter().any(|p| {
                p.len() >= prefix.len() && p.iter().zip(prefix.iter()).all(|(a, b)| a == b)
            });
            if !leads {
                return Some(prefix.join("."));
            }
            let is_leaf = paths.iter().any(|p| {
                p.len() == prefix.len() && p.iter().zip(prefix.iter()).all(|(a, b)| a == b)
            });
            if !is_leaf {
                if let Some(u) = unknown(child, prefix, paths) {
                    return Some(u);
                }
            }
            prefix.pop();
        }
        None
    }
    if let Some(u) = unknown(&root, &mut Vec::new(), &paths) {
        return Err(invalid(
            format!("Parameters.{u}"),
            format!(
                "not a parameter of command `{name}` (its parameters: {:?})",
                def.parameters
            ),
        ));
    }
    for (param, keys) in def.parameters.iter().zip(&paths) {
        let field = format!("Parameters.{}", keys.join("."));
        match at(&root, keys) {
            None if def.required.contains(param) => {
                return Err(invalid(
                    field,
                    format!("missing: command `{name}` requires it"),
                ))
            }
            None => {}
            Some(v) => {
                // Validation made every parameter a defined property.
                if let Some(prop) = defs.properties.get(param) {
                    if let Some(why) = type_error(prop.kind, v) {
                        return Err(invalid(field, why));
                    }
                }
            }
        }
    }
    Ok(())
}

/// One reported property read through its definition.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PropertyValue {
    /// The definition's name.
    pub name: String,
    /// Its JSON pointer in the reported properties.
    pub pointer: String,
    /// Its type, as Field Service names it.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// Its unit.
    pub unit: Option<String>,
    /// The reported value; null when the device has not reported it.
    pub value: Value,
    /// Why the reported value does not have the defined type, if it does not.
    pub type_error: Option<String>,
}

/// Every property definition's value in `reported`, in name order.
pub fn read_properties(defs: &DefinitionsConfig, reported: &Value) -> Vec<PropertyValue> {
    defs.properties
        .iter()
        .map(|(name, d)| {
            let keys = path(defs, name);
            let value = at(reported, &keys).cloned().unwrap_or(Value::Null);
            let type_error = (!value.is_null())
                .then(|| type_error(d.kind, &value))
                .flatten();
            PropertyValue {
                name: name.clone(),
                pointer: keys
                    .iter()
                    .map(|k| format!("/{}", k.replace('~', "~0").replace('/', "~1")))
                    .collect(),
                kind: d.kind.label(),
                unit: d.unit.clone(),
                value,
                type_error,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn defs() -> DefinitionsConfig {
        toml::from_str(
            r#"
            [properties.settings]
            type = "Object"
            [properties.threshold]
            type = "Decimal"
            unit = "°C"
            parent = "settings"
            [properties.mode]
            type = "String"
            [properties.count]
            type = "Whole"
            [properties.at]
            type = "DateTime"
            [properties.on]
            type = "Boolean"
            [commands.configure]
            parameters = ["threshold", "mode", "count", "at", "on"]
            required = ["mode"]
            categories = ["chillers"]
        "#,
        )
        .expect("definitions parse")
    }

    fn check(params: Value, category: Option<&str>) -> Result<(), String> {
        let d = defs();
        let def = command(&d, "configure").expect("defined");
        check_command(&d, "configure", def, &params, category).map_err(|e| match e {
            GatewayError::Invalid { field, message } => format!("{field}: {message}"),
            other => other.to_string(),
        })
    }

    #[test]
    fn parameters_of_the_right_types_pass_and_a_wrong_type_names_the_parameter() {
        let chiller = Some("chillers");
        assert_eq!(
            check(
                json!({"mode": "eco", "settings": {"threshold": 4.5}, "count": 3,
                       "at": "2026-12-07T10:00:00Z", "on": true}),
                chiller
            ),
            Ok(())
        );
        let wrong = |params| check(params, chiller).expect_err("refused");
        assert!(wrong(json!({"mode": 1})).starts_with("Parameters.mode: 1 is not a String"));
        assert!(
            wrong(json!({"mode": "eco", "settings": {"threshold": "hot"}}))
                .starts_with("Parameters.settings.threshold: \"hot\" is not a Decimal")
        );
        assert!(wrong(json!({"mode": "eco", "count": 2.5}))
            .starts_with("Parameters.count: 2.5 is not a Whole Number"));
        assert!(wrong(json!({"mode": "eco", "at": "tomorrow"}))
            .starts_with("Parameters.at: \"tomorrow\" is not a DateTime"));
        assert!(wrong(json!({"mode": "eco", "on": "yes"}))
            .starts_with("Parameters.on: \"yes\" is not a Boolean"));
        assert!(wrong(json!({"count": 1})).starts_with("Parameters.mode: missing"));
        assert!(wrong(json!({"mode": "eco", "speed": 1}))
            .starts_with("Parameters.speed: not a parameter of command `configure`"));
        assert!(wrong(json!({"mode": "eco", "settings": {"limit": 1}}))
            .starts_with("Parameters.settings.limit: not a parameter"));
        assert!(wrong(json!([1])).starts_with("Parameters: [1] is not an object"));
    }

    #[test]
    fn a_command_linked_to_categories_refuses_a_device_of_another() {
        let other = check(json!({"mode": "eco"}), Some("pumps")).expect_err("refused");
        assert!(other.starts_with("msdyn_command: command `configure` is linked to the categories [\"chillers\"]; this device's category is `pumps`"), "{other}");
        assert!(check(json!({"mode": "eco"}), None).is_err());
        let d = defs();
        let unknown = command(&d, "reboot").expect_err("not defined");
        assert!(
            unknown
                .to_string()
                .contains("[definitions.commands.reboot]"),
            "{unknown}"
        );
    }

    #[test]
    fn reported_properties_are_read_through_their_definitions() {
        let reported = json!({"settings": {"threshold": 4.5}, "mode": 3, "extra": 1});
        let read = read_properties(&defs(), &reported);
        let by_name = |n: &str| read.iter().find(|p| p.name == n).expect("defined").clone();
        let threshold = by_name("threshold");
        assert_eq!(
            (
                threshold.pointer.as_str(),
                threshold.value,
                threshold.unit.as_deref()
            ),
            ("/settings/threshold", json!(4.5), Some("°C"))
        );
        assert_eq!(threshold.type_error, None);
        let mode = by_name("mode");
        assert_eq!(mode.type_error.as_deref(), Some("3 is not a String"));
        assert_eq!(by_name("count").value, Value::Null);
        assert_eq!(read.len(), 6, "one per definition, none for undefined keys");
    }
}
