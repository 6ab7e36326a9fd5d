//! Settings of the `gcp_pubsub` provider (Google Cloud Pub/Sub).
//!
//! Google retired Cloud IoT Core in 2023: devices reach Pub/Sub through a bridge the
//! operator chooses, so this provider speaks topics, subscriptions and message attributes.
//! The device id always travels in a message attribute ([`GcpPubSubConfig::device_id_attribute`]),
//! never in a topic name.
//!
//! Besides the serde shape this module holds the Pub/Sub naming rules
//! ([`resource_id_problem`], [`attribute_name_problem`]) so the provider applies the same
//! checks to configs built in code.

use serde::{Deserialize, Serialize};

use crate::base::Problem;

/// Google Cloud Pub/Sub provider settings.
///
/// Layout on Pub/Sub (every name configurable; defaults in parentheses):
/// - telemetry: devices (through their bridge) publish to `telemetry_topic`
///   (`iotgw-telemetry`); the gateway streams from `telemetry_subscription`
///   (`iotgw-telemetry`), acks only after the pipeline committed a message. The alert
///   token is the bridge's `message_id` attribute scoped by the device
///   (`<device id>:<message_id>`, the same when the bridge retries a publish), else
///   `<Pub/Sub message id>@<publish time>` (the same on every redelivery).
/// - commands: published to `commands_topic` (`iotgw-commands`) with attributes
///   `<device_id_attribute>`, `command_name`, `correlation_id`, `command_id` and the device
///   id as ordering key; optionally one filtered subscription per device.
/// - replies (on): `reply_topic` (`iotgw-replies`) through `reply_subscription`.
/// - lifecycle (off): `lifecycle_topic` through `lifecycle_subscription` (`iotgw-lifecycle`):
///   connection events and reported properties.
/// - dead letters (off): `dead_letter_topic` on the telemetry subscription.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GcpPubSubConfig {
    /// Google Cloud project holding the topics and subscriptions (required), e.g.
    /// `my-project`. Any name works against the emulator.
    pub project_id: String,
    /// `HOST:PORT` (or `http://HOST:PORT`) of a Pub/Sub emulator, e.g. `localhost:8085`.
    /// Unset: the `PUBSUB_EMULATOR_HOST` environment variable is honoured as Google's own
    /// tools do; when neither is set the real service is used. With an emulator no
    /// credentials are sent.
    pub emulator_host: Option<String>,
    /// Endpoint of the real service, e.g. the locational
    /// `https://europe-west1-pubsub.googleapis.com` (keeps a device's commands on one
    /// region's ordering). Unset: `https://pubsub.googleapis.com`. Ignored with an emulator.
    pub endpoint: Option<String>,
    /// Service-account key file (JSON). Unset: Application Default Credentials
    /// (`GOOGLE_APPLICATION_CREDENTIALS`, gcloud's login, or the metadata server on Google
    /// Cloud). The account needs `roles/pubsub.editor` with `create_if_missing` or
    /// `command_subscriptions`, otherwise `roles/pubsub.publisher` on the commands topic and
    /// `roles/pubsub.subscriber` on the subscriptions.
    pub credentials_file: Option<String>,
    /// Create missing topics and subscriptions at start-up. Off: a missing one stops the
    /// provider with an error naming it and its key.
    pub create_if_missing: bool,
    /// Message attribute carrying the device id on every topic (telemetry, commands,
    /// replies, lifecycle). Letters, digits and `_`, starting with a letter or `_`.
    pub device_id_attribute: String,
    /// Topic the devices' bridge publishes telemetry to (payload: a JSON document).
    pub telemetry_topic: String,
    /// Subscription on `telemetry_topic` the gateway streams from. Replicas share it, so
    /// Pub/Sub spreads the messages across them.
    pub telemetry_subscription: String,
    /// Topic commands are published to.
    pub commands_topic: String,
    /// Create one subscription per registered device on `commands_topic`, filtered on
    /// `attributes.<device_id_attribute> = "<id>"` with message ordering on, and delete it
    /// with the device; the device's bridge pulls its commands from it.
    pub command_subscriptions: bool,
    /// Name prefix of the per-device command subscriptions: `<prefix><device id>` with
    /// `:` written as `.` (`:` is not allowed in subscription names).
    pub command_subscription_prefix: String,
    /// Topic devices answer commands on; empty turns replies off (commands then stay
    /// Published). Attributes `correlation_id`, `status` (`ok`/`error`), optional `reason`
    /// and `<device_id_attribute>`; or the same keys in a JSON body.
    pub reply_topic: String,
    /// Subscription on `reply_topic` the gateway streams from.
    pub reply_subscription: String,
    /// Topic of connection events; empty (the default) turns them off. Attributes
    /// `<device_id_attribute>`, `connected` (`true`/`false`) and optional `event_time`
    /// (RFC 3339; default: the publish time); or a JSON body
    /// `{"connected": bool, "at": "<RFC 3339>"}`. States are ordered by event time. A JSON
    /// body `{"reported": {...}, "at": ...}` reports the device's properties instead.
    pub lifecycle_topic: String,
    /// Subscription on `lifecycle_topic` the gateway streams from.
    pub lifecycle_subscription: String,
    /// Dead-letter topic of the telemetry subscription; empty turns it off. A message the
    /// gateway could not commit (nacked) `max_delivery_attempts` times is moved there by
    /// Pub/Sub. On Google Cloud the Pub/Sub service agent needs publisher rights on it and
    /// subscriber rights on the telemetry subscription.
    pub dead_letter_topic: String,
    /// Deliveries before a message goes to `dead_letter_topic` (Pub/Sub allows 5..=100).
    pub max_delivery_attempts: u32,
    /// Ack deadline in seconds (10..=600) of the subscriptions created and the lease the
    /// gateway extends while a message is being committed.
    pub ack_deadline_secs: u32,
    /// The retry policy of the subscriptions the gateway creates: Pub/Sub waits at least
    /// this many seconds (0..=600) before it redelivers a nacked message, doubling up to
    /// `retry_max_backoff_secs`. With the default 10 s, a short store outage does not
    /// spend `max_delivery_attempts` in a few seconds.
    pub retry_min_backoff_secs: u32,
    /// The longest redelivery delay of that retry policy, in seconds (0..=600, at least
    /// `retry_min_backoff_secs`).
    pub retry_max_backoff_secs: u32,
    /// How long the gateway holds a message it could not commit before it nacks it, in
    /// milliseconds (0..=60000, below the ack deadline): an emulator or a subscription
    /// without a retry policy redelivers a nacked message at once.
    pub nack_delay_ms: u64,
    /// Flow control: messages handed to the gateway but not yet acked, per subscription.
    pub max_outstanding_messages: u32,
    /// Flow control: bytes handed to the gateway but not yet acked, per subscription.
    pub max_outstanding_bytes: u64,
    /// Largest telemetry payload processed; larger ones are dead-lettered by the gateway.
    pub max_payload_bytes: usize,
    /// Longest a single Pub/Sub request (admin call, command publish) may take, in seconds.
    pub request_timeout_secs: u64,
    /// First delay before reopening a failed stream, in milliseconds (doubles up to
    /// `reconnect_max_ms`).
    pub reconnect_min_ms: u64,
    /// Longest delay before reopening a failed stream, in milliseconds.
    pub reconnect_max_ms: u64,
}

impl Default for GcpPubSubConfig {
    fn default() -> Self {
        Self {
            project_id: String::new(),
            emulator_host: None,
            endpoint: None,
            credentials_file: None,
            create_if_missing: false,
            device_id_attribute: "device_id".into(),
            telemetry_topic: "iotgw-telemetry".into(),
            telemetry_subscription: "iotgw-telemetry".into(),
            commands_topic: "iotgw-commands".into(),
            command_subscriptions: false,
            command_subscription_prefix: "iotgw-commands-".into(),
            reply_topic: "iotgw-replies".into(),
            reply_subscription: "iotgw-replies".into(),
            lifecycle_topic: String::new(),
            lifecycle_subscription: "iotgw-lifecycle".into(),
            dead_letter_topic: String::new(),
            max_delivery_attempts: 5,
            ack_deadline_secs: 30,
            retry_min_backoff_secs: 10,
            retry_max_backoff_secs: 600,
            nack_delay_ms: 1000,
            max_outstanding_messages: 1000,
            max_outstanding_bytes: 100 * 1024 * 1024,
            max_payload_bytes: 256 * 1024,
            request_timeout_secs: 30,
            reconnect_min_ms: 100,
            reconnect_max_ms: 10_000,
        }
    }
}

/// The longest device id (`msdyn_deviceid` holds 100 characters).
const MAX_DEVICE_ID: usize = 100;

/// Why `id` is not a valid Pub/Sub topic or subscription id, if it is not: 3-255
/// characters from `A-Z a-z 0-9 - _ . ~ + %`, starting with a letter, not starting with
/// `goog`.
pub fn resource_id_problem(id: &str) -> Option<String> {
    if id.len() < 3 || id.len() > 255 {
        return Some(format!(
            "`{id}` is {} characters; Pub/Sub names have 3 to 255",
            id.len()
        ));
    }
    if !id.starts_with(|c: char| c.is_ascii_alphabetic()) {
        return Some(format!("`{id}` does not start with a letter"));
    }
    if id.to_ascii_lowercase().starts_with("goog") {
        return Some(format!("`{id}` starts with `goog`, which Google reserves"));
    }
    if let Some(c) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '~' | '+' | '%')))
    {
        return Some(format!(
            "`{id}` holds {c:?}; only A-Z a-z 0-9 - _ . ~ + % are allowed"
        ));
    }
    None
}

/// Why `name` cannot be the device id attribute, if it cannot: it must be usable in a
/// subscription filter (`attributes.<name>`), so letters, digits and `_`, starting with a
/// letter or `_`, at most 256 bytes, not starting with `goog`.
pub fn attribute_name_problem(name: &str) -> Option<String> {
    if name.is_empty() || name.len() > 256 {
        return Some(format!("`{name}` must have 1 to 256 characters"));
    }
    if !name.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_') {
        return Some(format!("`{name}` does not start with a letter or `_`"));
    }
    if name.to_ascii_lowercase().starts_with("goog") {
        return Some(format!(
            "`{name}` starts with `goog`, which Google reserves"
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '_'))
    {
        return Some(format!("`{name}` holds {c:?}; use letters, digits and `_`"));
    }
    None
}

/// Every problem of `c`, with paths below `base` (empty `base`: bare key names). The
/// provider calls this too, so configs built in code get the same checks.
pub fn problems(base: &str, c: &GcpPubSubConfig) -> Vec<Problem> {
    let mut out = Vec::new();
    validate(base, c, &mut out);
    out
}

/// Checks serde cannot express; `base` is the key path of the instance (`providers.NAME`).
pub(crate) fn validate(base: &str, c: &GcpPubSubConfig, out: &mut Vec<Problem>) {
    let key = |k: &str| {
        if base.is_empty() {
            k.to_owned()
        } else {
            format!("{base}.{k}")
        }
    };
    let mut push = |k: &str, message: String, fix: &str| {
        out.push(Problem {
            path: key(k),
            message,
            fix: fix.to_owned(),
            source: None,
        })
    };

    if c.project_id.trim().is_empty() {
        push(
            "project_id",
            "no project id".into(),
            "set project_id to the Google Cloud project holding the topics (any name works against the emulator)",
        );
    } else if c.project_id.contains(['/', ' ']) {
        push(
            "project_id",
            format!("`{}` is not a project id", c.project_id),
            "give the project id (e.g. my-project), not a resource path",
        );
    }
    if let Some(h) = &c.emulator_host {
        if emulator_host_problem(h) {
            push(
                "emulator_host",
                format!("`{h}` is not HOST:PORT"),
                "e.g. localhost:8085 or http://pubsub-emulator:8085",
            );
        }
    }
    if let Some(e) = &c.endpoint {
        if !(e.starts_with("https://") || e.starts_with("http://")) {
            push(
                "endpoint",
                format!("`{e}` is not a URL"),
                "e.g. https://europe-west1-pubsub.googleapis.com, or remove it for the global endpoint",
            );
        }
    }
    if c.credentials_file
        .as_deref()
        .is_some_and(|f| f.trim().is_empty())
    {
        push(
            "credentials_file",
            "empty path".into(),
            "give the path of a service-account key file, or remove the key to use Application Default Credentials",
        );
    }
    if let Some(m) = attribute_name_problem(&c.device_id_attribute) {
        push("device_id_attribute", m, "e.g. device_id");
    }

    let mut ids = vec![
        ("telemetry_topic", &c.telemetry_topic),
        ("telemetry_subscription", &c.telemetry_subscription),
        ("commands_topic", &c.commands_topic),
    ];
    if !c.reply_topic.is_empty() {
        ids.push(("reply_topic", &c.reply_topic));
        ids.push(("reply_subscription", &c.reply_subscription));
    }
    if !c.lifecycle_topic.is_empty() {
        ids.push(("lifecycle_topic", &c.lifecycle_topic));
        ids.push(("lifecycle_subscription", &c.lifecycle_subscription));
    }
    if !c.dead_letter_topic.is_empty() {
        ids.push(("dead_letter_topic", &c.dead_letter_topic));
    }
    for (k, id) in &ids {
        if let Some(m) = resource_id_problem(id) {
            push(
                k,
                m,
                "use 3-255 characters from A-Z a-z 0-9 - _ . ~ + %, starting with a letter",
            );
        }
    }
    // The prefix plus the longest device id must still be a valid subscription id.
    let longest = format!(
        "{}{}",
        c.command_subscription_prefix,
        "a".repeat(MAX_DEVICE_ID)
    );
    if let Some(m) = resource_id_problem(&longest) {
        push(
            "command_subscription_prefix",
            format!(
                "`{}` cannot start a subscription name: {m}",
                c.command_subscription_prefix
            ),
            "start with a letter, use A-Z a-z 0-9 - _ . ~ + %, at most 155 characters",
        );
    }

    // Two streams on one subscription would split its messages between them.
    let subs: Vec<(&str, &String)> = ids
        .iter()
        .filter(|(k, _)| k.ends_with("_subscription"))
        .map(|(k, v)| (*k, *v))
        .collect();
    for (i, (k, s)) in subs.iter().enumerate() {
        if let Some((other, _)) = subs[..i].iter().find(|(_, o)| o == s) {
            push(
                k,
                format!("`{s}` is also {other}: one subscription cannot feed two streams"),
                "give each stream its own subscription",
            );
        }
    }
    let topics: Vec<(&str, &String)> = ids
        .iter()
        .filter(|(k, _)| k.ends_with("_topic"))
        .map(|(k, v)| (*k, *v))
        .collect();
    for (i, (k, t)) in topics.iter().enumerate() {
        if let Some((other, _)) = topics[..i].iter().find(|(_, o)| o == t) {
            push(
                k,
                format!("`{t}` is also {other}"),
                "give telemetry, commands, replies, lifecycle and dead letters their own topics",
            );
        }
    }

    if !(5..=100).contains(&c.max_delivery_attempts) {
        push(
            "max_delivery_attempts",
            format!("{} is outside 5..=100", c.max_delivery_attempts),
            "Pub/Sub accepts 5 to 100 delivery attempts (default 5)",
        );
    }
    if !(10..=600).contains(&c.ack_deadline_secs) {
        push(
            "ack_deadline_secs",
            format!("{} is outside 10..=600", c.ack_deadline_secs),
            "Pub/Sub accepts ack deadlines of 10 to 600 seconds (default 30)",
        );
    }
    if c.retry_min_backoff_secs > 600 {
        push(
            "retry_min_backoff_secs",
            format!("{} is above 600", c.retry_min_backoff_secs),
            "Pub/Sub accepts 0 to 600 seconds (default 10)",
        );
    }
    if c.retry_max_backoff_secs > 600 || c.retry_max_backoff_secs < c.retry_min_backoff_secs {
        push(
            "retry_max_backoff_secs",
            format!(
                "{} is outside {}..=600",
                c.retry_max_backoff_secs, c.retry_min_backoff_secs
            ),
            "use at least retry_min_backoff_secs and at most 600 (default 600)",
        );
    }
    if c.nack_delay_ms > 60_000 || c.nack_delay_ms >= u64::from(c.ack_deadline_secs) * 1000 {
        push(
            "nack_delay_ms",
            format!(
                "{} ms is not below both 60000 and the ack deadline ({} s)",
                c.nack_delay_ms, c.ack_deadline_secs
            ),
            "use 1000 (default), or 0 to nack at once",
        );
    }
    if c.max_outstanding_messages == 0 {
        push(
            "max_outstanding_messages",
            "0 would stop delivery".into(),
            "use at least 1 (default 1000)",
        );
    }
    if c.max_outstanding_bytes < 1024 {
        push(
            "max_outstanding_bytes",
            format!("{} bytes would stall delivery", c.max_outstanding_bytes),
            "use at least 1024 (default 104857600)",
        );
    }
    if c.max_payload_bytes == 0 || c.max_payload_bytes > 10 * 1024 * 1024 {
        push(
            "max_payload_bytes",
            format!("{} is outside 1..=10485760", c.max_payload_bytes),
            "Pub/Sub messages hold at most 10 MB (default 262144)",
        );
    }
    if c.request_timeout_secs == 0 {
        push(
            "request_timeout_secs",
            "0 would fail every request".into(),
            "use a few seconds (default 30)",
        );
    }
    if c.reconnect_min_ms == 0 || c.reconnect_min_ms > c.reconnect_max_ms {
        push(
            "reconnect_min_ms",
            "must be above 0 and not above reconnect_max_ms".into(),
            "e.g. 100 and 10000",
        );
    }
}

/// Whether `h` is not `HOST:PORT` with an optional `http://` or `https://`.
fn emulator_host_problem(h: &str) -> bool {
    let rest = h
        .strip_prefix("http://")
        .or_else(|| h.strip_prefix("https://"))
        .unwrap_or(h)
        .trim_end_matches('/');
    match rest.rsplit_once(':') {
        Some((host, port)) => host.is_empty() || port.parse::<u16>().map_or(true, |p| p == 0),
        None => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid() -> GcpPubSubConfig {
        GcpPubSubConfig {
            project_id: "my-project".into(),
            ..GcpPubSubConfig::default()
        }
    }

    fn paths(c: &GcpPubSubConfig) -> Vec<String> {
        problems("providers.gcp", c)
            .into_iter()
            .map(|p| p.path)
            .collect()
    }

    #[test]
    fn defaults_with_a_project_id_are_valid() {
        assert_eq!(paths(&valid()), Vec::<String>::new());
    }

    #[test]
    fn a_missing_project_id_is_reported_with_its_key() {
        assert_eq!(
            paths(&GcpPubSubConfig::default()),
            ["providers.gcp.project_id"]
        );
    }

    #[test]
    fn bad_names_limits_and_hosts_are_each_reported() {
        let c = GcpPubSubConfig {
            emulator_host: Some("localhost".into()),
            device_id_attribute: "device-id".into(),
            telemetry_topic: "t".into(),
            reply_subscription: "iotgw-telemetry".into(),
            dead_letter_topic: "goog-dead".into(),
            max_delivery_attempts: 2,
            ack_deadline_secs: 5,
            retry_min_backoff_secs: 700,
            retry_max_backoff_secs: 5,
            nack_delay_ms: 90_000,
            reconnect_min_ms: 0,
            ..valid()
        };
        let got = paths(&c);
        for key in [
            "emulator_host",
            "device_id_attribute",
            "telemetry_topic",
            "reply_subscription",
            "dead_letter_topic",
            "max_delivery_attempts",
            "ack_deadline_secs",
            "retry_min_backoff_secs",
            "retry_max_backoff_secs",
            "nack_delay_ms",
            "reconnect_min_ms",
        ] {
            assert!(
                got.contains(&format!("providers.gcp.{key}")),
                "{key} missing from {got:?}"
            );
        }
    }

    #[test]
    fn pubsub_resource_id_rules_are_applied() {
        assert_eq!(resource_id_problem("iotgw-telemetry"), None);
        assert_eq!(resource_id_problem("a.b~c+d%2A_e"), None);
        assert!(resource_id_problem("ab").is_some());
        assert!(resource_id_problem("1abc").is_some());
        assert!(resource_id_problem("google-things").is_some());
        assert!(resource_id_problem("has:colon").is_some());
        assert!(resource_id_problem(&"a".repeat(256)).is_some());
    }

    #[test]
    fn emulator_hosts_take_an_optional_scheme() {
        assert!(!emulator_host_problem("localhost:8085"));
        assert!(!emulator_host_problem("http://127.0.0.1:8085/"));
        assert!(emulator_host_problem("localhost"));
        assert!(emulator_host_problem(":8085"));
        assert!(emulator_host_problem("localhost:0"));
    }

    #[test]
    fn a_long_command_subscription_prefix_is_refused() {
        let c = GcpPubSubConfig {
            command_subscriptions: true,
            command_subscription_prefix: "c".repeat(200),
            ..valid()
        };
        assert_eq!(paths(&c), ["providers.gcp.command_subscription_prefix"]);
    }

    #[test]
    fn the_example_section_loads_with_every_key() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../deploy/examples/gcp_pubsub.toml");
        let c = crate::load::load_file(&path, &["gcp_pubsub"]).unwrap_or_else(|e| panic!("{e}"));
        let Some(crate::ProviderConfig::GcpPubsub(g)) = c.providers.get("cloud") else {
            panic!(
                "providers.cloud is a gcp_pubsub instance: {:?}",
                c.providers
            );
        };
        assert_eq!(g.project_id, "my-project");
        assert!(g.create_if_missing);
        assert_eq!(g.device_id_attribute, "device_id");
    }
}
