//! Pub/Sub resource names of one provider instance, as data: the full paths of its topics
//! and subscriptions, the per-device command subscription and its filter.
//!
//! Everything here is pure string work, checked once when the provider is built; nothing
//! talks to Pub/Sub.

use iotgw_config::GcpPubSubConfig;
use iotgw_ids::DeviceId;

/// Attribute of a command: its name.
pub const COMMAND_NAME_ATTRIBUTE: &str = "command_name";
/// Attribute of a command and a reply: the correlation id that ties them.
pub const CORRELATION_ID_ATTRIBUTE: &str = "correlation_id";
/// Attribute of a command: the gateway's command record id.
pub const COMMAND_ID_ATTRIBUTE: &str = "command_id";
/// Attribute of a message on the commands topic that is not a command: `settings` for a
/// device's desired settings (Update Device Data). Commands carry no such attribute.
pub const KIND_ATTRIBUTE: &str = "iotgw_kind";
/// [`KIND_ATTRIBUTE`]'s value on a settings message.
pub const SETTINGS_KIND: &str = "settings";
/// Attribute of a reply: `ok` or `error`.
pub const STATUS_ATTRIBUTE: &str = "status";
/// Attribute of a reply: the device's reason.
pub const REASON_ATTRIBUTE: &str = "reason";
/// Attribute of a lifecycle message: `true` / `false`.
pub const CONNECTED_ATTRIBUTE: &str = "connected";
/// Attribute of a telemetry message: the id the device (or its bridge) gave the message,
/// kept across the bridge's own retries, which Pub/Sub sees as new messages.
pub const MESSAGE_ID_ATTRIBUTE: &str = "message_id";
/// Body key of a lifecycle message carrying reported properties (a JSON object).
pub const REPORTED_KEY: &str = "reported";
/// Attribute of a lifecycle message: RFC 3339 event time.
pub const EVENT_TIME_ATTRIBUTE: &str = "event_time";

/// One subscription the gateway streams from, with the topic it reads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stream {
    /// What it carries.
    pub kind: StreamKind,
    /// `projects/P/topics/T`.
    pub topic: String,
    /// `projects/P/subscriptions/S`.
    pub subscription: String,
    /// The config key naming the subscription (for error messages).
    pub subscription_key: &'static str,
    /// The config key naming the topic.
    pub topic_key: &'static str,
}

/// The kinds of inbound stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum StreamKind {
    /// Device messages.
    Telemetry,
    /// Command replies.
    Reply,
    /// Connection events.
    Lifecycle,
}

impl StreamKind {
    /// Lower-case name for logs.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Telemetry => "telemetry",
            Self::Reply => "reply",
            Self::Lifecycle => "lifecycle",
        }
    }
}

/// The resource names of one instance.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Names {
    /// The project id.
    pub project: String,
    /// Attribute carrying the device id.
    pub device_id_attribute: String,
    /// `projects/P/topics/<commands_topic>`.
    pub commands_topic: String,
    /// `projects/P/topics/<dead_letter_topic>`, when configured.
    pub dead_letter_topic: Option<String>,
    /// The streams the gateway reads: telemetry first, then replies and lifecycle when on.
    pub streams: Vec<Stream>,
    command_subscription_prefix: String,
}

impl Names {
    /// The names of `c` (assumed valid: see `iotgw_config::gcp_pubsub::problems`).
    pub fn new(c: &GcpPubSubConfig) -> Self {
        let topic = |t: &str| topic_path(&c.project_id, t);
        let sub = |s: &str| subscription_path(&c.project_id, s);
        let mut streams = vec![Stream {
            kind: StreamKind::Telemetry,
            topic: topic(&c.telemetry_topic),
            subscription: sub(&c.telemetry_subscription),
            subscription_key: "telemetry_subscription",
            topic_key: "telemetry_topic",
        }];
        if !c.reply_topic.is_empty() {
            streams.push(Stream {
                kind: StreamKind::Reply,
                topic: topic(&c.reply_topic),
                subscription: sub(&c.reply_subscription),
                subscription_key: "reply_subscription",
                topic_key: "reply_topic",
            });
        }
        if !c.lifecycle_topic.is_empty() {
            streams.push(Stream {
                kind: StreamKind::Lifecycle,
                topic: topic(&c.lifecycle_topic),
                subscription: sub(&c.lifecycle_subscription),
                subscription_key: "lifecycle_subscription",
                topic_key: "lifecycle_topic",
            });
        }
        Self {
            project: c.project_id.clone(),
            device_id_attribute: c.device_id_attribute.clone(),
            commands_topic: topic(&c.commands_topic),
            dead_letter_topic: (!c.dead_letter_topic.is_empty())
                .then(|| topic(&c.dead_letter_topic)),
            streams,
            command_subscription_prefix: c.command_subscription_prefix.clone(),
        }
    }

    /// The stream of `kind`, when it is on.
    pub fn stream(&self, kind: StreamKind) -> Option<&Stream> {
        self.streams.iter().find(|s| s.kind == kind)
    }

    /// The per-device command subscription: `projects/P/subscriptions/<prefix><id>`, with
    /// `:` (valid in device ids, not in subscription ids) written as `.` (valid in
    /// subscription ids, not in device ids), so distinct devices never share one.
    pub fn command_subscription(&self, device: &DeviceId) -> String {
        subscription_path(
            &self.project,
            &format!(
                "{}{}",
                self.command_subscription_prefix,
                device.as_str().replace(':', ".")
            ),
        )
    }

    /// The filter of a device's command subscription: `attributes.<attr> = "<id>"`. Device
    /// ids hold no quote or backslash, so nothing needs escaping.
    pub fn command_filter(&self, device: &DeviceId) -> String {
        format!(
            "attributes.{} = \"{}\"",
            self.device_id_attribute,
            device.as_str()
        )
    }
}

/// `projects/<project>/topics/<id>`.
pub fn topic_path(project: &str, id: &str) -> String {
    format!("projects/{project}/topics/{id}")
}

/// `projects/<project>/subscriptions/<id>`.
pub fn subscription_path(project: &str, id: &str) -> String {
    format!("projects/{project}/subscriptions/{id}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> GcpPubSubConfig {
        GcpPubSubConfig {
            project_id: "plant-7".into(),
            ..GcpPubSubConfig::default()
        }
    }

    fn id(s: &str) -> DeviceId {
        DeviceId::parse(s).expect("valid id")
    }

    #[test]
    fn default_layout_streams_telemetry_and_replies_but_not_lifecycle() {
        let n = Names::new(&config());
        let kinds: Vec<StreamKind> = n.streams.iter().map(|s| s.kind).collect();
        assert_eq!(kinds, [StreamKind::Telemetry, StreamKind::Reply]);
        let t = n.stream(StreamKind::Telemetry).expect("telemetry");
        assert_eq!(t.topic, "projects/plant-7/topics/iotgw-telemetry");
        assert_eq!(
            t.subscription,
            "projects/plant-7/subscriptions/iotgw-telemetry"
        );
        assert_eq!(n.commands_topic, "projects/plant-7/topics/iotgw-commands");
        assert_eq!(n.dead_letter_topic, None);
    }

    #[test]
    fn empty_reply_topic_turns_replies_off_and_lifecycle_topic_turns_it_on() {
        let n = Names::new(&GcpPubSubConfig {
            reply_topic: String::new(),
            lifecycle_topic: "presence".into(),
            dead_letter_topic: "dead".into(),
            ..config()
        });
        assert!(n.stream(StreamKind::Reply).is_none());
        let l = n.stream(StreamKind::Lifecycle).expect("lifecycle");
        assert_eq!(l.topic, "projects/plant-7/topics/presence");
        assert_eq!(
            l.subscription,
            "projects/plant-7/subscriptions/iotgw-lifecycle"
        );
        assert_eq!(
            n.dead_letter_topic.as_deref(),
            Some("projects/plant-7/topics/dead")
        );
    }

    #[test]
    fn command_subscriptions_are_distinct_per_device_and_filter_on_the_id_attribute() {
        let n = Names::new(&config());
        assert_eq!(
            n.command_subscription(&id("site:pump-1")),
            "projects/plant-7/subscriptions/iotgw-commands-site.pump-1"
        );
        assert_ne!(
            n.command_subscription(&id("a:b")),
            n.command_subscription(&id("a_b"))
        );
        assert_eq!(
            n.command_filter(&id("site:pump-1")),
            r#"attributes.device_id = "site:pump-1""#
        );
        let longest = n.command_subscription(&id(&"x".repeat(100)));
        let sub_id = longest.rsplit('/').next().expect("an id");
        assert_eq!(iotgw_config::gcp_pubsub::resource_id_problem(sub_id), None);
    }
}
