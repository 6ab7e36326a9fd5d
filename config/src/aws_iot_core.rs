//! Settings of the `aws_iot_core` provider (AWS IoT Core).
//!
//! Two sides: the AWS APIs (`iot` for things, certificates and policies, `iot-data` for
//! command publishes and shadows), signed with SigV4 credentials, and one MQTT connection
//! of the gateway to the account's device data endpoint, with the gateway's own X.509
//! certificate, for telemetry, command replies and presence events.

use serde::{Deserialize, Serialize};

use crate::base::{Problem, Secret};

/// AWS IoT Core provider settings.
///
/// Region and credentials fall back to the usual AWS chain when not given here
/// (`AWS_REGION`, `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`, `AWS_PROFILE`, the shared
/// config and credentials files, web identity, the container and instance metadata).
/// Telemetry needs `client_cert_path` and `client_key_path`: without them the provider
/// registers devices and sends commands but receives nothing, and `/ready` does not wait
/// for a connection it will never make (the instance reports itself control-plane only).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AwsIotCoreConfig {
    /// AWS region, e.g. `eu-west-1`. Unset: `AWS_REGION`, then the profile's `region`.
    pub region: Option<String>,
    /// Named profile of `~/.aws/config` and `~/.aws/credentials` to take credentials and
    /// region from. Unset: `AWS_PROFILE`, else `default`.
    pub profile: Option<String>,
    /// Access key id of static credentials (needs `secret_access_key`). Unset: the AWS
    /// credential chain. Prefer an instance/task role or a profile to keys in a file.
    pub access_key_id: Option<String>,
    /// Secret access key of the static credentials. Better set through
    /// `IOTGW_PROVIDERS__<NAME>__SECRET_ACCESS_KEY` than written in the file; never logged.
    pub secret_access_key: Option<Secret>,
    /// Session token of temporary static credentials (with `access_key_id` and
    /// `secret_access_key`).
    pub session_token: Option<Secret>,
    /// Overrides the HTTPS endpoint of both AWS IoT APIs (`iot` and `iot-data`), for an
    /// emulator such as moto (`http://127.0.0.1:5000`). Unset: AWS's regional endpoints.
    pub endpoint_url: Option<String>,
    /// The account's device data endpoint, `<prefix>-ats.iot.<region>.amazonaws.com`
    /// (`aws iot describe-endpoint --endpoint-type iot:Data-ATS`): the host of the
    /// `iot-data` API and of the MQTT connection. Unset: looked up once with
    /// DescribeEndpoint when first needed.
    pub data_endpoint: Option<String>,
    /// MQTT host the gateway connects to. Unset: `data_endpoint`. Set it for an emulator
    /// (e.g. a Mosquitto with client-certificate TLS standing in for AWS IoT Core).
    pub mqtt_host: Option<String>,
    /// MQTT port: 8883 (MQTT over mutual TLS), or 443, where the ALPN protocol
    /// `x-amzn-mqtt-ca` is sent as AWS IoT Core requires.
    pub mqtt_port: u16,
    /// MQTT client id of the gateway. The gateway's certificate policy must allow
    /// `iot:Connect` on `client/<client_id>-*` (with a `shared_group`, the default, each
    /// replica connects as `<client_id>-<replica.id>`); it names the persistent session.
    pub client_id: String,
    /// PEM file with the gateway's own X.509 certificate (registered and active in AWS IoT,
    /// with a policy allowing connect, subscribe and receive on the topics below and on
    /// `$aws/events/presence/*`). Unset (with `client_key_path`): no MQTT connection, so no
    /// telemetry, replies or presence.
    pub client_cert_path: Option<String>,
    /// PEM file with the private key of `client_cert_path` (PKCS#8, PKCS#1 or SEC1).
    pub client_key_path: Option<String>,
    /// PEM file of the CA(s) that sign the MQTT server's certificate (e.g. Amazon Root CA 1,
    /// `AmazonRootCA1.pem`). Unset: the operating system's trust store (as for the AWS API
    /// calls; `SSL_CERT_FILE` is honoured), which holds Amazon's roots.
    pub ca_cert_path: Option<String>,
    /// Topic templates devices publish telemetry to; `{device_id}` (the thing name) is
    /// one whole topic level. AWS allows at most 7 `/` in a topic.
    pub telemetry_topics: Vec<String>,
    /// Topic template commands are published to (QoS 1, through the `iot-data` API).
    pub command_topic: String,
    /// Topic template devices answer commands on:
    /// `{"correlation_id": ..., "status": "ok"|"error", "reason": ...}` (the correlation id
    /// may come as MQTT 5 correlation data instead).
    pub reply_topic: String,
    /// Shared-subscription group (`$share/<group>/...`) so replicas split telemetry and
    /// replies; empty subscribes without sharing. Presence events are never shared.
    pub shared_group: String,
    /// MQTT keep-alive in seconds (AWS raises values below 30 to 30; at most 1200).
    pub keep_alive_secs: u64,
    /// How long AWS keeps the gateway's persistent session (and its queued QoS 1
    /// messages) while it is away, in seconds. AWS's default limit is 3600.
    pub session_expiry_secs: u32,
    /// First MQTT reconnect delay in milliseconds (doubles up to `reconnect_max_ms`).
    pub reconnect_min_ms: u64,
    /// Longest MQTT reconnect delay in milliseconds.
    pub reconnect_max_ms: u64,
    /// JSON pointer of a message id inside the telemetry payload, used when the message
    /// has no MQTT 5 `message_id` user property. Device-chosen ids are prefixed with the
    /// device id (`pump-1:m-7`); without either, the alert token is a hash of topic and
    /// payload.
    pub message_id_pointer: String,
    /// Give each device the thing type named after its category (created when missing,
    /// never deleted by iotgw). Categories must then be valid thing type names
    /// (`[a-zA-Z0-9:_-]`, at most 128 characters).
    pub thing_type_from_category: bool,
    /// Prefix of the per-device policy names (`<prefix><thing name>`), which allow the
    /// device's certificate to connect as its thing name and use only its own topics.
    pub policy_prefix: String,
    /// Timeout of one AWS API call in milliseconds, retries included.
    pub api_timeout_ms: u64,
    /// Attempts per AWS API call (1 = no retry) for throttling and transient errors.
    pub max_attempts: u32,
}

impl Default for AwsIotCoreConfig {
    fn default() -> Self {
        Self {
            region: None,
            profile: None,
            access_key_id: None,
            secret_access_key: None,
            session_token: None,
            endpoint_url: None,
            data_endpoint: None,
            mqtt_host: None,
            mqtt_port: 8883,
            client_id: "iotgw".into(),
            client_cert_path: None,
            client_key_path: None,
            ca_cert_path: None,
            telemetry_topics: vec!["dt/iotgw/{device_id}/telemetry".into()],
            command_topic: "cmd/iotgw/{device_id}/req".into(),
            reply_topic: "cmd/iotgw/{device_id}/res".into(),
            shared_group: "iotgw".into(),
            keep_alive_secs: 30,
            session_expiry_secs: 3600,
            reconnect_min_ms: 100,
            reconnect_max_ms: 10_000,
            message_id_pointer: "/message_id".into(),
            thing_type_from_category: true,
            policy_prefix: "iotgw-device-".into(),
            api_timeout_ms: 10_000,
            max_attempts: 3,
        }
    }
}

/// Longest AWS IoT policy name.
pub const MAX_POLICY_NAME_LEN: usize = 128;

/// Longest device id (Field Service's `msdyn_deviceid` column); policy names append it.
const MAX_DEVICE_ID_LEN: usize = 100;

/// AWS IoT's limit on `/` in a topic name.
pub const MAX_TOPIC_SLASHES: usize = 7;

fn problem(path: String, message: impl Into<String>, fix: impl Into<String>) -> Problem {
    Problem {
        path,
        message: message.into(),
        fix: fix.into(),
        source: None,
    }
}

/// Checks serde cannot express; `base` is the key path of the instance (`providers.NAME`).
pub(crate) fn validate(base: &str, c: &AwsIotCoreConfig, out: &mut Vec<Problem>) {
    let key = |k: &str| format!("{base}.{k}");
    if let Some(r) = &c.region {
        if r.is_empty()
            || !r
                .chars()
                .all(|ch| ch.is_ascii_lowercase() || ch.is_ascii_digit() || ch == '-')
        {
            out.push(problem(
                key("region"),
                format!("`{r}` is not an AWS region name"),
                "give e.g. eu-west-1, or leave it unset to use AWS_REGION or the profile's region",
            ));
        }
    }
    if c.profile.as_deref().is_some_and(str::is_empty) {
        out.push(problem(
            key("profile"),
            "empty profile name",
            "name a profile of ~/.aws/config, or leave it unset",
        ));
    }
    match (&c.access_key_id, &c.secret_access_key) {
        (Some(_), None) => out.push(problem(
            key("secret_access_key"),
            "access_key_id is set without secret_access_key",
            "set both (the secret via IOTGW_PROVIDERS__<NAME>__SECRET_ACCESS_KEY), or neither to use the AWS credential chain",
        )),
        (None, Some(_)) => out.push(problem(
            key("access_key_id"),
            "secret_access_key is set without access_key_id",
            "set both, or neither to use the AWS credential chain",
        )),
        _ => {}
    }
    if c.session_token.is_some() && c.access_key_id.is_none() {
        out.push(problem(
            key("session_token"),
            "a session token without access_key_id and secret_access_key",
            "set all three, or none to use the AWS credential chain",
        ));
    }
    if let Some(u) = &c.endpoint_url {
        if !(u.starts_with("http://") || u.starts_with("https://")) || u.len() < 10 {
            out.push(problem(
                key("endpoint_url"),
                format!("`{u}` is not an http(s) URL"),
                "give e.g. http://127.0.0.1:5000 for moto, or leave it unset for AWS",
            ));
        }
    }
    for (k, host) in [
        ("data_endpoint", &c.data_endpoint),
        ("mqtt_host", &c.mqtt_host),
    ] {
        if let Some(h) = host {
            if h.is_empty() || h.contains("://") || h.contains('/') || h.contains(' ') {
                out.push(problem(
                    key(k),
                    format!("`{h}` is not a host name"),
                    "give the host only, e.g. a1b2c3-ats.iot.eu-west-1.amazonaws.com (no scheme, no path)",
                ));
            }
        }
    }
    if c.mqtt_port == 0 {
        out.push(problem(
            key("mqtt_port"),
            "port 0",
            "use 8883 (MQTT over TLS) or 443 (with ALPN)",
        ));
    }
    if c.client_id.is_empty() || c.client_id.len() > 128 {
        out.push(problem(
            key("client_id"),
            format!("client id `{}` is empty or longer than 128 characters", c.client_id),
            "give the gateway a client id of 1-128 characters its policy allows (client/<client_id>)",
        ));
    }
    match (&c.client_cert_path, &c.client_key_path) {
        (Some(_), None) => out.push(problem(
            key("client_key_path"),
            "client_cert_path is set without client_key_path",
            "give the PEM file of the certificate's private key",
        )),
        (None, Some(_)) => out.push(problem(
            key("client_cert_path"),
            "client_key_path is set without client_cert_path",
            "give the PEM file of the gateway's certificate",
        )),
        _ => {}
    }
    for (k, path) in [
        ("client_cert_path", &c.client_cert_path),
        ("client_key_path", &c.client_key_path),
        ("ca_cert_path", &c.ca_cert_path),
    ] {
        if path.as_deref().is_some_and(|p| p.trim().is_empty()) {
            out.push(problem(
                key(k),
                "empty path",
                "give a PEM file path, or leave the key unset",
            ));
        }
    }
    if c.telemetry_topics.is_empty() {
        out.push(problem(
            key("telemetry_topics"),
            "no telemetry topic",
            "give at least one template, e.g. [\"dt/iotgw/{device_id}/telemetry\"]",
        ));
    }
    let mut templates: Vec<(String, &str)> = c
        .telemetry_topics
        .iter()
        .enumerate()
        .map(|(i, t)| (format!("telemetry_topics[{i}]"), t.as_str()))
        .collect();
    templates.push(("command_topic".into(), &c.command_topic));
    templates.push(("reply_topic".into(), &c.reply_topic));
    for (i, (k, t)) in templates.iter().enumerate() {
        if let Some(why) = template_problem(t) {
            out.push(problem(
                key(k),
                format!("`{t}` {why}"),
                "use a plain topic with {device_id} as one whole level, e.g. dt/iotgw/{device_id}/telemetry",
            ));
        }
        if let Some((first, _)) = templates[..i].iter().find(|(_, other)| other == t) {
            out.push(problem(
                key(k),
                format!("`{t}` is also {first}"),
                "give each kind of message its own topic",
            ));
        }
    }
    if c.shared_group.contains(['/', '+', '#']) {
        out.push(problem(
            key("shared_group"),
            "a shared group name cannot hold / + #",
            "use a plain name such as iotgw, or empty to disable sharing",
        ));
    }
    if c.keep_alive_secs < 5 || c.keep_alive_secs > 1200 {
        out.push(problem(
            key("keep_alive_secs"),
            format!("{} is outside 5..=1200", c.keep_alive_secs),
            "use 30 or more (AWS raises lower values to 30; at most 1200)",
        ));
    }
    if c.session_expiry_secs > 7 * 24 * 3600 {
        out.push(problem(
            key("session_expiry_secs"),
            "longer than the 7 days AWS IoT Core allows",
            "use at most 604800 (3600 is AWS's default limit)",
        ));
    }
    if c.reconnect_min_ms == 0 || c.reconnect_min_ms > c.reconnect_max_ms {
        out.push(problem(
            key("reconnect_min_ms"),
            "must be above 0 and not above reconnect_max_ms",
            "e.g. 100 and 10000",
        ));
    }
    if !c.message_id_pointer.is_empty() && !c.message_id_pointer.starts_with('/') {
        out.push(problem(
            key("message_id_pointer"),
            format!("`{}` is not a JSON pointer", c.message_id_pointer),
            "start it with `/`, e.g. /message_id, or leave it empty",
        ));
    }
    let max_prefix = MAX_POLICY_NAME_LEN - MAX_DEVICE_ID_LEN;
    if c.policy_prefix.len() > max_prefix
        || !c
            .policy_prefix
            .chars()
            .all(|ch| ch.is_ascii_alphanumeric() || "+=,.@_-".contains(ch))
    {
        out.push(problem(
            key("policy_prefix"),
            format!("`{}` is not a usable policy name prefix", c.policy_prefix),
            format!("use at most {max_prefix} characters from A-Z a-z 0-9 + = , . @ _ -"),
        ));
    }
    if c.api_timeout_ms == 0 {
        out.push(problem(
            key("api_timeout_ms"),
            "a zero timeout fails every call",
            "use e.g. 10000",
        ));
    }
    if c.max_attempts == 0 || c.max_attempts > 10 {
        out.push(problem(
            key("max_attempts"),
            format!("{} is outside 1..=10", c.max_attempts),
            "use 3 (1 disables retries)",
        ));
    }
}

/// Why a topic template is unusable, if it is.
fn template_problem(t: &str) -> Option<&'static str> {
    let levels: Vec<&str> = t.split('/').collect();
    if levels.iter().filter(|l| **l == "{device_id}").count() != 1
        || t.matches("{device_id}").count() != 1
    {
        return Some("must contain {device_id} exactly once, as a whole topic level");
    }
    if t.contains(['+', '#']) || t.starts_with('$') {
        return Some("holds a wildcard or a `$` prefix (reserved for AWS topics)");
    }
    if levels.len() > MAX_TOPIC_SLASHES + 1 {
        return Some("has more than the 7 `/` AWS IoT Core allows in a topic");
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn problems(c: &AwsIotCoreConfig) -> Vec<Problem> {
        let mut out = Vec::new();
        validate("providers.aws", c, &mut out);
        out
    }

    #[test]
    fn the_defaults_are_valid() {
        assert_eq!(problems(&AwsIotCoreConfig::default()), vec![]);
    }

    #[test]
    fn half_given_credentials_and_certificates_are_refused_naming_the_missing_key() {
        let c = AwsIotCoreConfig {
            access_key_id: Some("AKIDEXAMPLE".into()),
            client_cert_path: Some("gw.crt".into()),
            ..AwsIotCoreConfig::default()
        };
        let paths: Vec<String> = problems(&c).into_iter().map(|p| p.path).collect();
        assert_eq!(
            paths,
            vec![
                "providers.aws.secret_access_key",
                "providers.aws.client_key_path"
            ]
        );
    }

    #[test]
    fn topic_templates_follow_the_mqtt_rules_and_the_aws_slash_limit() {
        let c = AwsIotCoreConfig {
            telemetry_topics: vec![
                "dt/x{device_id}/t".into(),
                "a/b/c/d/e/f/g/h/{device_id}".into(),
                "cmd/iotgw/{device_id}/res".into(),
            ],
            command_topic: "$aws/things/{device_id}/cmd".into(),
            ..AwsIotCoreConfig::default()
        };
        let paths: Vec<String> = problems(&c).into_iter().map(|p| p.path).collect();
        assert_eq!(
            paths,
            vec![
                "providers.aws.telemetry_topics[0]",
                "providers.aws.telemetry_topics[1]",
                "providers.aws.command_topic",
                "providers.aws.reply_topic",
            ]
        );
    }

    #[test]
    fn an_overlong_policy_prefix_is_refused_because_names_hold_128_characters() {
        let c = AwsIotCoreConfig {
            policy_prefix: "p".repeat(29),
            ..AwsIotCoreConfig::default()
        };
        let probs = problems(&c);
        assert_eq!(probs.len(), 1, "{probs:?}");
        assert!(probs[0].fix.contains("at most 28"), "{}", probs[0]);
    }

    #[test]
    fn the_example_file_loads_with_the_provider_built_in() {
        let path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples/aws_iot_core.toml");
        let c = crate::load::load_file(&path, &["aws_iot_core"]).unwrap_or_else(|e| panic!("{e}"));
        let Some(crate::ProviderConfig::AwsIotCore(aws)) = c.providers.get("aws") else {
            panic!("the example configures providers.aws as aws_iot_core: {c:?}");
        };
        assert_eq!(aws.region.as_deref(), Some("eu-west-1"));
        assert_eq!(aws.mqtt_port, 8883);
        assert!(
            aws.secret_access_key.is_none(),
            "no secret written in the example"
        );
        assert_eq!(c.routing.default.as_deref(), Some("aws"));
    }
}
