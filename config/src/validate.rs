//! Checks serde cannot express: cross references, addresses, templates, limits.

use std::net::{IpAddr, SocketAddr};

use crate::base::Problem;
use crate::model::*;

fn p(path: impl Into<String>, message: impl Into<String>, fix: impl Into<String>) -> Problem {
    Problem {
        path: path.into(),
        message: message.into(),
        fix: fix.into(),
        source: None,
    }
}

/// Whether `listen` is a loopback address (or `localhost:PORT`).
pub fn is_loopback_listen(listen: &str) -> bool {
    if let Ok(addr) = listen.parse::<SocketAddr>() {
        return addr.ip().is_loopback();
    }
    listen
        .strip_prefix("localhost:")
        .is_some_and(|port| port.parse::<u16>().is_ok())
}

/// Every problem serde could not see. `built_kinds` are the provider kinds compiled in.
pub fn validate(c: &Config, built_kinds: &[&'static str]) -> Vec<Problem> {
    let mut out = Vec::new();

    // api
    let listen_ok = c.api.listen.parse::<SocketAddr>().is_ok() || is_loopback_listen(&c.api.listen);
    if !listen_ok {
        out.push(p(
            "api.listen",
            format!("`{}` is not an address with a port", c.api.listen),
            "write HOST:PORT, e.g. 127.0.0.1:8080 or 0.0.0.0:8080",
        ));
    } else if !is_loopback_listen(&c.api.listen) && c.api.token.is_none() {
        out.push(p(
            "api.token",
            format!(
                "the API listens on non-loopback `{}` without a bearer token",
                c.api.listen
            ),
            "set api.token (or IOTGW_API__TOKEN), or listen on 127.0.0.1",
        ));
    }
    if let Some(t) = &c.api.token {
        if t.expose().len() < 16 {
            out.push(p(
                "api.token",
                "the bearer token is shorter than 16 characters",
                "use a random token of at least 16 characters (e.g. `openssl rand -hex 24`)",
            ));
        }
    }

    // store
    crate::store::validate(&c.store, &mut out);

    // replica
    let id = &c.replica.id;
    if id.len() > crate::ReplicaConfig::MAX_LEN || !id.chars().all(crate::ReplicaConfig::allowed) {
        out.push(p(
            "replica.id",
            format!("{id:?} is not a replica id"),
            "use at most 64 letters, digits, `_`, `-` or `.` (e.g. iotgw-1), or leave it empty for the host name",
        ));
    }
    if !(2..=3600).contains(&c.replica.outbox_lease_secs) {
        out.push(p(
            "replica.outbox_lease_secs",
            format!("{} is outside 2..=3600", c.replica.outbox_lease_secs),
            "use 30 (the default): longer than one delivery attempt, short enough for a quick takeover",
        ));
    }

    // commands and health
    if !(1..=172_800).contains(&c.commands.ttl_secs) {
        out.push(p(
            "commands.ttl_secs",
            format!("{} is outside 1..=172800", c.commands.ttl_secs),
            "use seconds up to two days (IoT Hub's longest TTL); 3600 (default) is one hour",
        ));
    }
    if !(1..=3600).contains(&c.commands.retry_secs) {
        out.push(p(
            "commands.retry_secs",
            format!("{} is outside 1..=3600", c.commands.retry_secs),
            "use a few seconds, e.g. 5 (default)",
        ));
    }
    if !(1..=4096).contains(&c.commands.max_in_flight) {
        out.push(p(
            "commands.max_in_flight",
            format!("{} is outside 1..=4096", c.commands.max_in_flight),
            "use 64 (default); more only if one instance must send many slow commands (direct methods) at once",
        ));
    }
    for (key, days) in [
        ("retention.dead_letters_days", c.retention.dead_letters_days),
        ("retention.commands_days", c.retention.commands_days),
        ("retention.alerts_days", c.retention.alerts_days),
        ("readings.retention_days", c.readings.retention_days),
        (
            "readings.minute_rollups_days",
            c.readings.minute_rollups_days,
        ),
        ("readings.hour_rollups_days", c.readings.hour_rollups_days),
    ] {
        if days > 36_500 {
            out.push(p(
                key,
                format!("{days} is above 36500"),
                "use days up to 36500, or 0 to keep the records forever",
            ));
        }
    }
    if !(1..=1024).contains(&c.readings.max_per_message) {
        out.push(p(
            "readings.max_per_message",
            format!("{} is outside 1..=1024", c.readings.max_per_message),
            "use 64 (default), or list the measures to keep in readings.measures",
        ));
    }
    for (i, m) in c.readings.measures.iter().enumerate() {
        if !m.starts_with('/') {
            out.push(p(
                format!("readings.measures[{i}]"),
                format!("{m:?} is not a JSON pointer"),
                "write measures as JSON pointers from the message's root, e.g. \"/engine/temp\"",
            ));
        }
    }
    if !c.readings.time_pointer.is_empty() && !c.readings.time_pointer.starts_with('/') {
        out.push(p(
            "readings.time_pointer",
            format!("{:?} is not a JSON pointer", c.readings.time_pointer),
            "use \"/timestamp\" (default), another JSON pointer, or \"\" to use the arrival time",
        ));
    }
    definitions(c, &mut out);
    if !(60..=86_400).contains(&c.retention.interval_secs) {
        out.push(p(
            "retention.interval_secs",
            format!("{} is outside 60..=86400", c.retention.interval_secs),
            "use 3600 (default, hourly)",
        ));
    }
    if !(1..=86_400).contains(&c.health.failover_after_secs) {
        out.push(p(
            "health.failover_after_secs",
            format!("{} is outside 1..=86400", c.health.failover_after_secs),
            "use seconds, e.g. 60 (default): long enough to ride out a broker restart",
        ));
    }
    for (i, name) in c.health.optional.iter().enumerate() {
        if !c.providers.contains_key(name) {
            out.push(p(
                format!("health.optional[{i}]"),
                format!("`{name}` is not a configured provider instance"),
                format!(
                    "name one of: {}",
                    c.providers.keys().cloned().collect::<Vec<_>>().join(", ")
                ),
            ));
        }
    }

    // pipeline
    if c.pipeline.debounce_window_secs == 0 || c.pipeline.debounce_window_secs > 86_400 {
        out.push(p(
            "pipeline.debounce_window_secs",
            format!("{} is outside 1..=86400", c.pipeline.debounce_window_secs),
            "use a window in seconds; Field Service uses 60 (60..180 in its action)",
        ));
    }
    for (i, f) in c.pipeline.debounce_fields.iter().enumerate() {
        if !(f == "rule" || f == "alert_type" || f.starts_with('/')) {
            out.push(p(
                format!("pipeline.debounce_fields[{i}]"),
                format!("`{f}` is not a debounce field"),
                "use `rule`, `alert_type` or a JSON pointer such as `/sensor`",
            ));
        }
    }
    if c.pipeline.queue_capacity == 0 {
        out.push(p(
            "pipeline.queue_capacity",
            "0 would stall every provider",
            "use at least 1 (default 1024)",
        ));
    }

    if !(1..=10_000).contains(&c.pipeline.batch_max_events) {
        out.push(p(
            "pipeline.batch_max_events",
            format!("{} is outside 1..=10000", c.pipeline.batch_max_events),
            "use 1 to commit every event alone, or a batch size such as 512 (default)",
        ));
    }
    if c.pipeline.max_clock_skew_secs > 86_400 {
        out.push(p(
            "pipeline.max_clock_skew_secs",
            format!("{} is outside 0..=86400", c.pipeline.max_clock_skew_secs),
            "use a few minutes of seconds, e.g. 300 (default)",
        ));
    }
    if c.pipeline.batch_max_wait_ms > 1_000 {
        out.push(p(
            "pipeline.batch_max_wait_ms",
            format!(
                "{} ms would hold every event (and its ack) that long",
                c.pipeline.batch_max_wait_ms
            ),
            "use 0..=1000 milliseconds; 5 (default) keeps the added latency small",
        ));
    }

    // providers
    for (name, prov) in &c.providers {
        let base = format!("providers.{name}");
        if !valid_name(name) {
            out.push(p(
                &base,
                format!("instance name `{name}` is not valid"),
                "use 1-64 characters from a-z 0-9 _ -",
            ));
        }
        if !built_kinds.contains(&prov.kind()) {
            out.push(p(
                format!("{base}.kind"),
                format!("provider kind `{}` is not built in this binary (built: {})", prov.kind(), built_kinds.join(", ")),
                format!("rebuild with `--features {}` once that provider is available, or use one of: {}", prov.kind(), built_kinds.join(", ")),
            ));
        }
        match prov {
            ProviderConfig::Mqtt(m) => crate::mqtt::validate(&base, m, &mut out),
            ProviderConfig::AwsIotCore(c) => crate::aws_iot_core::validate(&base, c, &mut out),
            ProviderConfig::GcpPubsub(c) => crate::gcp_pubsub::validate(&base, c, &mut out),
            ProviderConfig::AzureIotHub(c) => crate::azure_iot_hub::validate(&base, c, &mut out),
        }
    }

    // routing
    let known = |n: &str| c.providers.contains_key(n);
    let names = c.providers.keys().cloned().collect::<Vec<_>>().join(", ");
    match &c.routing.default {
        Some(d) if !known(d) => out.push(p(
            "routing.default",
            format!("provider `{d}` is not configured"),
            format!("name one of: {names}"),
        )),
        None if c.providers.len() > 1 && c.routing.rules.is_empty() => out.push(p(
            "routing.default",
            "several providers and no routing: new devices would have nowhere to go",
            format!("set routing.default to one of: {names}"),
        )),
        _ => {}
    }
    for (i, r) in c.routing.rules.iter().enumerate() {
        let base = format!("routing.rules[{i}]");
        if !known(&r.provider) {
            out.push(p(
                format!("{base}.provider"),
                format!("provider `{}` is not configured", r.provider),
                format!("name one of: {names}"),
            ));
        }
        for (j, f) in r.fallback.iter().enumerate() {
            let path = format!("{base}.fallback[{j}]");
            if !known(f) {
                out.push(p(
                    path,
                    format!("provider `{f}` is not configured"),
                    format!("name one of: {names}"),
                ));
            } else if *f == r.provider || r.fallback[..j].contains(f) {
                out.push(p(
                    path,
                    format!("`{f}` is already named by this rule"),
                    "list each fallback instance once, and not the rule's own provider",
                ));
            }
        }
        if r.category.is_none() && r.tag.is_none() && r.id_pattern.is_none() {
            out.push(p(
                &base,
                "the rule has no matcher and would take every device",
                "add category, tag or id_pattern, or use routing.default",
            ));
        }
        if let Some(pat) = &r.id_pattern {
            if pat.is_empty()
                || pat.chars().any(|ch| {
                    !(ch.is_ascii_alphanumeric() || matches!(ch, ':' | '_' | '-' | '*' | '?'))
                })
            {
                out.push(p(
                    format!("{base}.id_pattern"),
                    format!("`{pat}` is not a device id glob"),
                    "use device id characters (A-Z a-z 0-9 : _ -) with * and ?",
                ));
            }
        }
        if r.tag
            .as_deref()
            .is_some_and(|t| t.is_empty() || t.starts_with('='))
        {
            out.push(p(
                format!("{base}.tag"),
                "empty tag key",
                "write `key` or `key=value`",
            ));
        }
    }

    // rules
    for (name, r) in &c.rules {
        let base = format!("rules.{name}");
        if !valid_rule_name(name) {
            out.push(p(
                &base,
                format!("rule name `{name}` is not valid (it becomes part of alert tokens and metric labels)"),
                "use 1-64 characters from A-Z a-z 0-9 _ -",
            ));
        }
        if !r.pointer.is_empty() && !r.pointer.starts_with('/') {
            out.push(p(
                format!("{base}.pointer"),
                format!("`{}` is not a JSON pointer", r.pointer),
                format!("start it with `/`, e.g. `/{}`", r.pointer),
            ));
        }
        if r.op != CompareOp::Exists && r.value.is_none() {
            out.push(p(
                format!("{base}.value"),
                format!("`{:?}` needs a value to compare with", r.op).to_lowercase(),
                "add value = <number, string or boolean>",
            ));
        }
        if matches!(
            r.op,
            CompareOp::Gt | CompareOp::Ge | CompareOp::Lt | CompareOp::Le
        ) && r.value.as_ref().is_some_and(|v| !v.is_number())
        {
            out.push(p(
                format!("{base}.value"),
                "ordering comparisons need a number",
                "give a number, or use eq/ne for strings",
            ));
        }
        if ![
            "anomaly",
            "info",
            "preventive maintenance",
            "preventivemaintenance",
            "preventive_maintenance",
            "test",
        ]
        .contains(&r.alert_type.to_ascii_lowercase().as_str())
        {
            out.push(p(
                format!("{base}.alert_type"),
                format!("`{}` is not a Field Service alert type", r.alert_type),
                "use Anomaly, Info, Preventive Maintenance or Test",
            ));
        }
        if r.description.trim().is_empty() {
            out.push(p(
                format!("{base}.description"),
                "empty description",
                "describe the alert; {device_id}, {value} and {rule} are filled in",
            ));
        }
        if r.priority.is_some_and(|x| x > 100) {
            out.push(p(
                format!("{base}.priority"),
                "priority score above 100",
                "use 0..=100",
            ));
        }
        if let Some(cmd) = &r.command {
            if cmd.name.trim().is_empty() {
                out.push(p(
                    format!("{base}.command.name"),
                    "empty command name",
                    "name the command the device expects",
                ));
            }
            let size = serde_json::to_string(&cmd.parameters)
                .map(|s| s.len())
                .unwrap_or(0);
            if size > 8000 {
                out.push(p(
                    format!("{base}.command.parameters"),
                    format!("{size} bytes of parameters would not fit msdyn_message (8192)"),
                    "send less",
                ));
            }
        }
    }

    // sinks
    for (name, s) in &c.sinks {
        let base = format!("sinks.{name}");
        if !valid_name(name) {
            out.push(p(
                &base,
                format!("sink name `{name}` is not valid"),
                "use 1-64 characters from a-z 0-9 _ -",
            ));
        }
        crate::sinks::validate(&base, s, &mut out);
    }

    // embedded broker
    if c.embedded_broker.enabled {
        match c.embedded_broker.host.parse::<IpAddr>() {
            Ok(ip) if ip.is_loopback() => {}
            _ => out.push(p(
                "embedded_broker.host",
                format!("`{}` is not a loopback address", c.embedded_broker.host),
                "the embedded broker has no authentication: keep it on 127.0.0.1",
            )),
        }
        let b = &c.embedded_broker;
        if b.v311_port != 0 && b.v311_port == b.port {
            out.push(p(
                "embedded_broker.v311_port",
                format!("{} is also embedded_broker.port (the MQTT 5 listener)", b.v311_port),
                "one port serves one MQTT version on the embedded broker: give 3.1.1 its own port (default 1884), or 0 to turn it off",
            ));
        }
        let largest = c.largest_mqtt_payload();
        if b.max_packet_bytes != 0 && b.max_packet_bytes <= largest {
            out.push(p(
                "embedded_broker.max_packet_bytes",
                format!("{} is not above the mqtt provider's max_payload_bytes ({largest})", b.max_packet_bytes),
                "leave it at 0 (four times max_payload_bytes), or raise it: a reading just over max_payload_bytes must reach the gateway to become a dead letter",
            ));
        }
    }
    if c.simulate.devices > 0 && c.routing.default.is_none() {
        out.push(p(
            "simulate.devices",
            "simulated devices need routing.default to register on",
            "set routing.default",
        ));
    }
    if c.simulate.devices > 10_000 {
        out.push(p(
            "simulate.devices",
            "more than 10000 simulated devices",
            "use at most 10000",
        ));
    }
    out
}

fn valid_rule_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|ch| ch.is_ascii_lowercase() || ch.is_ascii_digit() || ch == '_' || ch == '-')
}

/// `[definitions]`: parents exist, are objects and form no loop; parameters name property
/// definitions; required parameters are parameters.
fn definitions(c: &Config, out: &mut Vec<Problem>) {
    let props = &c.definitions.properties;
    for (name, d) in props {
        if name.is_empty() || name.contains('/') {
            out.push(p(
                format!("definitions.properties.{name:?}"),
                "a property name must be non-empty and without `/`",
                "name it as the JSON key it is, e.g. \"threshold\"",
            ));
        }
        let Some(parent) = &d.parent else { continue };
        match props.get(parent) {
            None => out.push(p(
                format!("definitions.properties.{name}.parent"),
                format!("`{parent}` is not a property definition"),
                format!("define [definitions.properties.{parent}] with type = \"Object\", or remove the parent"),
            )),
            Some(pd) if pd.kind != PropertyType::Object => out.push(p(
                format!("definitions.properties.{name}.parent"),
                format!("`{parent}` is of type {}, not Object", pd.kind.label()),
                format!("give [definitions.properties.{parent}] type = \"Object\""),
            )),
            Some(_) => {
                // Walk up: a loop never reaches the top.
                let mut at = parent.as_str();
                for _ in 0..=props.len() {
                    match props.get(at).and_then(|d| d.parent.as_deref()) {
                        Some(up) => at = up,
                        None => break,
                    }
                    if at == name {
                        out.push(p(
                            format!("definitions.properties.{name}.parent"),
                            "the parents form a loop",
                            "make one property of the loop a top-level one (no parent)",
                        ));
                        break;
                    }
                }
            }
        }
    }
    for (name, d) in &c.definitions.commands {
        for (i, param) in d.parameters.iter().enumerate() {
            if !props.contains_key(param) {
                out.push(p(
                    format!("definitions.commands.{name}.parameters[{i}]"),
                    format!("`{param}` is not a property definition"),
                    format!("define it under [definitions.properties.{param}] with its type"),
                ));
            }
        }
        for (i, r) in d.required.iter().enumerate() {
            if !d.parameters.contains(r) {
                out.push(p(
                    format!("definitions.commands.{name}.required[{i}]"),
                    format!("`{r}` is not one of the command's parameters"),
                    "list it in parameters too, or remove it from required",
                ));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fallbacks_optional_instances_and_command_timings_are_checked_with_their_keys() {
        let mut c = Config::embedded_default();
        c.providers.insert("b".into(), c.providers["local"].clone());
        c.routing.rules.push(RouteRule {
            provider: "local".into(),
            category: Some("pumps".into()),
            fallback: vec!["b".into(), "nowhere".into(), "local".into(), "b".into()],
            ..RouteRule::default()
        });
        c.health.optional = vec!["b".into(), "typo".into()];
        c.health.failover_after_secs = 0;
        c.commands.ttl_secs = 0;
        c.commands.retry_secs = 7200;
        c.commands.max_in_flight = 0;
        c.retention.alerts_days = 40_000;
        c.retention.interval_secs = 1;
        let mut paths: Vec<_> = validate(&c, &["mqtt"])
            .into_iter()
            .map(|x| x.path)
            .collect();
        paths.sort();
        assert_eq!(
            paths,
            vec![
                "commands.max_in_flight",
                "commands.retry_secs",
                "commands.ttl_secs",
                "health.failover_after_secs",
                "health.optional[1]",
                "retention.alerts_days",
                "retention.interval_secs",
                "routing.rules[0].fallback[1]",
                "routing.rules[0].fallback[2]",
                "routing.rules[0].fallback[3]",
            ]
        );
        c.routing.rules[0].fallback = vec!["b".into()];
        c.health.optional = vec!["b".into()];
        c.health.failover_after_secs = 30;
        c.commands.ttl_secs = 60;
        c.commands.retry_secs = 1;
        c.commands.max_in_flight = 4096;
        c.retention.alerts_days = 0;
        c.retention.interval_secs = 60;
        assert!(validate(&c, &["mqtt"]).is_empty());
    }

    #[test]
    fn the_hybrid_example_loads_with_a_fallback_and_an_optional_instance() {
        let path =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples/hybrid.toml");
        let c = crate::load::load_file(&path, &["mqtt", "gcp_pubsub"])
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.routing.rules[0].fallback, vec!["plant".to_owned()]);
        assert_eq!(c.health.optional, vec!["plant".to_owned()]);
        assert_eq!(c.providers.len(), 2);
    }

    #[test]
    fn definitions_name_the_missing_parent_the_loop_and_the_unknown_parameter() {
        let toml = r#"
            [definitions.properties.settings]
            type = "Object"
            [definitions.properties.threshold]
            type = "Decimal"
            parent = "settings"
            [definitions.properties.a]
            type = "Object"
            parent = "b"
            [definitions.properties.b]
            type = "Object"
            parent = "a"
            [definitions.properties.orphan]
            type = "Whole Number"
            parent = "nowhere"
            [definitions.commands.set_threshold]
            parameters = ["threshold", "typo"]
            required = ["threshold", "other"]
        "#;
        let c: Config = toml::from_str(toml).expect("parses");
        let probs = validate(&c, &["mqtt"]);
        let paths: Vec<&str> = probs.iter().map(|x| x.path.as_str()).collect();
        assert_eq!(
            paths,
            vec![
                "definitions.properties.a.parent",
                "definitions.properties.b.parent",
                "definitions.properties.orphan.parent",
                "definitions.commands.set_threshold.parameters[1]",
                "definitions.commands.set_threshold.required[1]",
            ],
            "{probs:?}"
        );
        let bad: Result<Config, _> = toml::from_str("[definitions.properties.x]\ntype = \"Float\"");
        assert!(bad.is_err(), "an unknown type is refused");
    }

    #[test]
    fn non_loopback_api_without_token_is_refused() {
        let mut c = Config::embedded_default();
        c.api.listen = "0.0.0.0:8080".into();
        let probs = validate(&c, &["mqtt"]);
        assert!(probs.iter().any(|x| x.path == "api.token"), "{probs:?}");
        c.api.token = Some(Secret::new("0123456789abcdef0123"));
        assert!(validate(&c, &["mqtt"]).is_empty());
    }

    #[test]
    fn a_replica_id_with_a_slash_or_too_long_is_refused_and_an_empty_one_is_the_host_name() {
        let mut c = Config::embedded_default();
        for bad in ["iotgw/1", &"r".repeat(65), "iotgw 1"] {
            c.replica.id = bad.into();
            let probs = validate(&c, &["mqtt"]);
            assert!(
                probs.len() == 1 && probs[0].path == "replica.id",
                "{bad}: {probs:?}"
            );
        }
        c.replica.id = "iotgw-2.eu_west".into();
        assert!(validate(&c, &["mqtt"]).is_empty());
        assert_eq!(c.replica.resolved_id(), "iotgw-2.eu_west");
        c.replica.id = String::new();
        let host = c.replica.resolved_id();
        assert!(
            !host.is_empty() && host.len() <= 64 && host.chars().all(ReplicaConfig::allowed),
            "{host:?}"
        );
    }

    #[test]
    fn replicas_in_a_shared_group_get_their_own_client_id_and_a_lone_gateway_keeps_its_own() {
        let shared = ProviderConfig::Mqtt(MqttConfig {
            shared_group: "iotgw".into(),
            ..MqttConfig::default()
        });
        let ProviderConfig::Mqtt(m) = shared.for_replica("iotgw-1") else {
            unreachable!()
        };
        assert_eq!(m.client_id, "iotgw-iotgw-1");
        let lone = ProviderConfig::Mqtt(MqttConfig::default());
        assert_eq!(lone.for_replica("iotgw-1"), lone);
        let aws = ProviderConfig::AwsIotCore(crate::AwsIotCoreConfig::default());
        let ProviderConfig::AwsIotCore(a) = aws.for_replica("b") else {
            unreachable!()
        };
        assert_eq!(a.client_id, "iotgw-b", "aws shares by default");
    }

    #[test]
    fn a_postgres_store_needs_its_section_and_names_each_bad_key() {
        let mut c = Config::embedded_default();
        c.store.kind = StoreKind::Postgres;
        let probs = validate(&c, &["mqtt"]);
        assert_eq!(probs.len(), 1, "{probs:?}");
        assert_eq!(probs[0].path, "store.postgres.url");
        assert!(probs[0].fix.contains("IOTGW_STORE__POSTGRES__URL"));

        let pg: crate::PostgresStoreConfig = toml::from_str(
            "url = \"postgres://iotgw:hunter2@db:5432/iotgw\"\ntls_mode = \"verify-full\"",
        )
        .expect("section");
        assert_eq!(pg.pool_size, 10, "defaults apply");
        c.store.postgres = Some(pg);
        assert!(validate(&c, &["mqtt"]).is_empty());
        let shown = toml::to_string(&c.store).expect("show");
        assert!(
            shown.contains("postgres://iotgw:<redacted>@db:5432/iotgw")
                && !shown.contains("hunter2"),
            "{shown}"
        );

        c.store.kind = StoreKind::Sqlite;
        let probs = validate(&c, &["mqtt"]);
        assert_eq!(probs.len(), 1, "{probs:?}");
        assert_eq!(probs[0].path, "store.postgres");
    }

    #[test]
    fn group_commit_sizes_outside_their_ranges_are_refused_with_the_key() {
        let mut c = Config::embedded_default();
        assert!(validate(&c, &["mqtt"]).is_empty());
        c.pipeline.batch_max_events = 0;
        c.pipeline.batch_max_wait_ms = 5_000;
        let probs = validate(&c, &["mqtt"]);
        let paths: Vec<_> = probs.iter().map(|x| x.path.as_str()).collect();
        assert!(paths.contains(&"pipeline.batch_max_events"), "{probs:?}");
        assert!(paths.contains(&"pipeline.batch_max_wait_ms"), "{probs:?}");
        c.pipeline.batch_max_events = 1;
        c.pipeline.batch_max_wait_ms = 0;
        assert!(
            validate(&c, &["mqtt"]).is_empty(),
            "1 event, no wait is valid"
        );
    }

    #[test]
    fn loopback_detection_accepts_ipv4_ipv6_and_localhost() {
        assert!(is_loopback_listen("127.0.0.1:1"));
        assert!(is_loopback_listen("[::1]:8080"));
        assert!(is_loopback_listen("localhost:8080"));
        assert!(!is_loopback_listen("0.0.0.0:8080"));
    }

    #[test]
    fn topic_templates_need_device_id_as_a_whole_level() {
        let mut c = Config::embedded_default();
        if let Some(ProviderConfig::Mqtt(m)) = c.providers.get_mut("local") {
            m.telemetry_topic = "devices/x{device_id}/t".into();
            m.command_topic = "devices/+/{device_id}".into();
        }
        let probs = validate(&c, &["mqtt"]);
        assert!(
            probs
                .iter()
                .any(|x| x.path == "providers.local.telemetry_topic"),
            "{probs:?}"
        );
        assert!(
            probs
                .iter()
                .any(|x| x.path == "providers.local.command_topic"),
            "{probs:?}"
        );
    }

    #[test]
    fn routing_must_name_configured_providers_and_have_matchers() {
        let mut c = Config::embedded_default();
        c.routing.rules.push(RouteRule {
            provider: "ghost".into(),
            ..RouteRule::default()
        });
        let probs = validate(&c, &["mqtt"]);
        assert!(probs.iter().any(|x| x.path == "routing.rules[0].provider"));
        assert!(probs.iter().any(|x| x.path == "routing.rules[0]"));
    }

    #[test]
    fn rule_names_that_could_not_part_an_alert_token_are_refused() {
        let mut c = Config::embedded_default();
        let rule = c.rules["high_temperature"].clone();
        c.rules.insert("hot/cold".into(), rule.clone());
        c.rules.insert("Hot_2-b".into(), rule);
        let probs = validate(&c, &["mqtt"]);
        let named: Vec<_> = probs
            .iter()
            .filter(|x| x.path.starts_with("rules."))
            .collect();
        assert_eq!(named.len(), 1, "{probs:?}");
        assert_eq!(named[0].path, "rules.hot/cold");
        assert!(named[0].fix.contains("A-Z a-z 0-9 _ -"), "{:?}", named[0]);
    }

    #[test]
    fn rules_need_values_of_the_right_type() {
        let mut c = Config::embedded_default();
        let r = c.rules.get_mut("high_temperature").expect("sample rule");
        r.value = Some(serde_json::json!("hot"));
        r.pointer = "temperature".into();
        let probs = validate(&c, &["mqtt"]);
        assert!(probs
            .iter()
            .any(|x| x.path == "rules.high_temperature.value"));
        assert!(probs
            .iter()
            .any(|x| x.path == "rules.high_temperature.pointer" && x.fix.contains("/temperature")));
    }
}
