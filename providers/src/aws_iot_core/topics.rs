//! The provider's topic scheme: the configured templates (telemetry, command, reply; built
//! on [`crate::mqtt::topics::TopicTemplate`]) plus AWS's reserved topics the gateway
//! listens to (presence events, shadow update documents).
//!
//! Pure data: builds topics and filters, reads device ids back out of received topics.

use iotgw_config::AwsIotCoreConfig;

use crate::mqtt::topics::{TopicError, TopicTemplate};

/// AWS IoT's presence event of a client that connected (`+` = its client id).
pub const PRESENCE_CONNECTED_FILTER: &str = "$aws/events/presence/connected/+";
/// AWS IoT's presence event of a client that disconnected (`+` = its client id).
pub const PRESENCE_DISCONNECTED_FILTER: &str = "$aws/events/presence/disconnected/+";
/// The classic shadow's update documents (`+` = the thing name): previous and current
/// state after every accepted update.
pub const SHADOW_DOCUMENTS_FILTER: &str = "$aws/things/+/shadow/update/documents";

/// AWS IoT Core accepts at most this many topic filters in one SUBSCRIBE.
pub const MAX_FILTERS_PER_SUBSCRIBE: usize = 8;

/// What a received topic is, with the device it concerns (raw, validated by the gateway).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Inbound<'t> {
    /// Telemetry of a device.
    Telemetry(&'t str),
    /// A device's answer to a command.
    Reply(&'t str),
    /// A presence event: `connected` or not, of the client id.
    Presence {
        /// True on `connected/`, false on `disconnected/`.
        connected: bool,
        /// The MQTT client id (a device's is its thing name).
        client_id: &'t str,
    },
    /// A shadow update document of a thing.
    ShadowDocuments(&'t str),
}

/// One subscription of the gateway.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Subscription {
    /// The topic filter as sent (with `$share/<group>/` when shared).
    pub filter: String,
}

/// The validated topic scheme of one instance.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AwsTopics {
    telemetry: Vec<TopicTemplate>,
    command: TopicTemplate,
    reply: TopicTemplate,
}

impl AwsTopics {
    /// Validates the templates of `config` (each with one whole-level `{device_id}`, no
    /// wildcards, no `$` prefix, no two alike).
    pub fn from_config(config: &AwsIotCoreConfig) -> Result<Self, TopicError> {
        let telemetry = config
            .telemetry_topics
            .iter()
            .map(|t| TopicTemplate::parse("telemetry_topics", t))
            .collect::<Result<Vec<_>, _>>()?;
        if telemetry.is_empty() {
            return Err(TopicError::Empty {
                setting: "telemetry_topics",
            });
        }
        let topics = Self {
            telemetry,
            command: TopicTemplate::parse("command_topic", &config.command_topic)?,
            reply: TopicTemplate::parse("reply_topic", &config.reply_topic)?,
        };
        let mut named: Vec<(&'static str, &TopicTemplate)> = topics
            .telemetry
            .iter()
            .map(|t| ("telemetry_topics", t))
            .collect();
        named.push(("command_topic", &topics.command));
        named.push(("reply_topic", &topics.reply));
        for (i, (first, a)) in named.iter().enumerate() {
            for (second, b) in &named[i + 1..] {
                if a.filter() == b.filter() {
                    return Err(TopicError::Duplicate {
                        first,
                        second,
                        template: a.as_str().to_owned(),
                    });
                }
            }
        }
        Ok(topics)
    }

    /// The command topic of `device_id`.
    pub fn command_topic(&self, device_id: &str) -> String {
        self.command.topic_for(device_id)
    }

    /// The reply topic of `device_id`.
    pub fn reply_topic(&self, device_id: &str) -> String {
        self.reply.topic_for(device_id)
    }

    /// The telemetry topics of `device_id`.
    pub fn telemetry_topics(&self, device_id: &str) -> Vec<String> {
        self.telemetry
            .iter()
            .map(|t| t.topic_for(device_id))
            .collect()
    }

    /// The gateway's subscriptions: telemetry and replies shared through `group` (plain
    /// when empty), presence and shadow documents never shared (AWS's reserved topics).
    pub fn subscriptions(&self, group: &str) -> Vec<Subscription> {
        let mut out: Vec<Subscription> = self
            .telemetry
            .iter()
            .chain(std::iter::once(&self.reply))
            .map(|t| Subscription {
                filter: t.shared_filter(group),
            })
            .collect();
        for reserved in [
            PRESENCE_CONNECTED_FILTER,
            PRESENCE_DISCONNECTED_FILTER,
            SHADOW_DOCUMENTS_FILTER,
        ] {
            out.push(Subscription {
                filter: reserved.to_owned(),
            });
        }
        out
    }

    /// What `topic` is. Reserved topics first, then the reply template, then telemetry,
    /// so a catch-all telemetry template cannot shadow replies.
    pub fn classify<'t>(&self, topic: &'t str) -> Option<Inbound<'t>> {
        if let Some(rest) = topic.strip_prefix("$aws/events/presence/") {
            let (kind, client_id) = rest.split_once('/')?;
            if client_id.is_empty() || client_id.contains('/') {
                return None;
            }
            return match kind {
                "connected" => Some(Inbound::Presence {
                    connected: true,
                    client_id,
                }),
                "disconnected" => Some(Inbound::Presence {
                    connected: false,
                    client_id,
                }),
                _ => None,
            };
        }
        if let Some(rest) = topic.strip_prefix("$aws/things/") {
            let thing = rest.strip_suffix("/shadow/update/documents")?;
            return (!thing.is_empty() && !thing.contains('/'))
                .then_some(Inbound::ShadowDocuments(thing));
        }
        if let Some(id) = self.reply.device_id_of(topic) {
            return Some(Inbound::Reply(id));
        }
        self.telemetry
            .iter()
            .find_map(|t| t.device_id_of(topic))
            .map(Inbound::Telemetry)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topics() -> AwsTopics {
        AwsTopics::from_config(&AwsIotCoreConfig {
            telemetry_topics: vec![
                "dt/iotgw/{device_id}/telemetry".into(),
                "dt/iotgw/{device_id}/alarms".into(),
            ],
            ..AwsIotCoreConfig::default()
        })
        .expect("valid templates")
    }

    #[test]
    fn received_topics_are_classified_with_their_device_or_client_id() {
        let t = topics();
        assert_eq!(
            t.classify("dt/iotgw/pump-1/telemetry"),
            Some(Inbound::Telemetry("pump-1"))
        );
        assert_eq!(
            t.classify("dt/iotgw/pump-1/alarms"),
            Some(Inbound::Telemetry("pump-1"))
        );
        assert_eq!(
            t.classify("cmd/iotgw/pump-1/res"),
            Some(Inbound::Reply("pump-1"))
        );
        assert_eq!(
            t.classify("$aws/events/presence/connected/pump-1"),
            Some(Inbound::Presence {
                connected: true,
                client_id: "pump-1"
            })
        );
        assert_eq!(
            t.classify("$aws/events/presence/disconnected/pump-1"),
            Some(Inbound::Presence {
                connected: false,
                client_id: "pump-1"
            })
        );
        assert_eq!(
            t.classify("$aws/things/pump-1/shadow/update/documents"),
            Some(Inbound::ShadowDocuments("pump-1"))
        );
        for miss in [
            "cmd/iotgw/pump-1/req",
            "$aws/events/presence/connected/",
            "$aws/events/subscriptions/subscribed/pump-1",
            "$aws/things/pump-1/shadow/update/accepted",
            "dt/iotgw/pump-1/telemetry/x",
        ] {
            assert_eq!(t.classify(miss), None, "{miss}");
        }
    }

    #[test]
    fn telemetry_and_replies_are_shared_but_aws_reserved_topics_are_not() {
        let filters: Vec<String> = topics()
            .subscriptions("gw")
            .into_iter()
            .map(|s| s.filter)
            .collect();
        assert_eq!(
            filters,
            vec![
                "$share/gw/dt/iotgw/+/telemetry",
                "$share/gw/dt/iotgw/+/alarms",
                "$share/gw/cmd/iotgw/+/res",
                PRESENCE_CONNECTED_FILTER,
                PRESENCE_DISCONNECTED_FILTER,
                SHADOW_DOCUMENTS_FILTER,
            ]
        );
    }

    #[test]
    fn a_reply_template_equal_to_a_telemetry_template_is_refused() {
        let err = AwsTopics::from_config(&AwsIotCoreConfig {
            reply_topic: "dt/iotgw/{device_id}/telemetry".into(),
            ..AwsIotCoreConfig::default()
        })
        .expect_err("duplicate");
        assert_eq!(err.setting(), "reply_topic");
    }
}
