//! Topic templates: `devices/{device_id}/telemetry` and friends.
//!
//! A template is an MQTT topic name in which exactly one whole level is the placeholder
//! `{device_id}`. From it this module builds the topic of one device, the subscription
//! filter (the placeholder becomes `+`) and reads the device id back out of a received
//! topic. It owns no connection and knows nothing of payloads.

use iotgw_config::MqttConfig;

/// The placeholder that stands for one whole topic level.
pub const DEVICE_ID_PLACEHOLDER: &str = "{device_id}";

/// Why a topic template was refused. Every variant names the setting and the template so
/// the message points at the line of the config file to fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    /// The template is empty.
    #[error("{setting} is empty: give a topic such as \"devices/{{device_id}}/telemetry\"")]
    Empty {
        /// The config key.
        setting: &'static str,
    },
    /// No level is `{device_id}`.
    #[error("{setting} {template:?} has no {{device_id}} level: make one whole level exactly {{device_id}}, e.g. \"devices/{{device_id}}/telemetry\"")]
    MissingDeviceId {
        /// The config key.
        setting: &'static str,
        /// The template as given.
        template: String,
    },
    /// `{device_id}` (or another `{...}`) is only part of a level.
    #[error("{setting} {template:?}: level {level:?} mixes a placeholder with other text; {{device_id}} must be a whole level (write \"a/{{device_id}}/b\", not \"a/dev-{{device_id}}\")")]
    PartialLevel {
        /// The config key.
        setting: &'static str,
        /// The template as given.
        template: String,
        /// The offending level.
        level: String,
    },
    /// `{device_id}` appears more than once.
    #[error("{setting} {template:?} has {{device_id}} more than once: keep exactly one")]
    RepeatedDeviceId {
        /// The config key.
        setting: &'static str,
        /// The template as given.
        template: String,
    },
    /// A level holds the wildcards `+` or `#`.
    #[error("{setting} {template:?}: level {level:?} holds a wildcard (+ or #); a template is a topic name, wildcards are derived from {{device_id}}")]
    Wildcard {
        /// The config key.
        setting: &'static str,
        /// The template as given.
        template: String,
        /// The offending level.
        level: String,
    },
    /// The template starts with `$` (reserved for broker topics such as `$SYS`).
    #[error("{setting} {template:?} starts with '$', which brokers reserve ($SYS, $share, $CONTROL): choose another first level")]
    Reserved {
        /// The config key.
        setting: &'static str,
        /// The template as given.
        template: String,
    },
    /// Two settings have the same template, so received messages could not be told apart.
    #[error("{first} and {second} are both {template:?}: give each kind of message its own topic")]
    Duplicate {
        /// The first config key.
        first: &'static str,
        /// The second config key.
        second: &'static str,
        /// The shared template.
        template: String,
    },
}

impl TopicError {
    /// The config key at fault (the second one of a duplicate).
    pub fn setting(&self) -> &'static str {
        match self {
            Self::Empty { setting }
            | Self::MissingDeviceId { setting, .. }
            | Self::PartialLevel { setting, .. }
            | Self::RepeatedDeviceId { setting, .. }
            | Self::Wildcard { setting, .. }
            | Self::Reserved { setting, .. } => setting,
            Self::Duplicate { second, .. } => second,
        }
    }
}

/// A validated topic template.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TopicTemplate {
    template: String,
    /// Index of the `{device_id}` level.
    id_level: usize,
    /// Number of levels.
    levels: usize,
}

impl TopicTemplate {
    /// Validates `template`; `setting` is the config key named in errors.
    pub fn parse(setting: &'static str, template: &str) -> Result<Self, TopicError> {
        if template.is_empty() {
            return Err(TopicError::Empty { setting });
        }
        if template.starts_with('$') {
            return Err(TopicError::Reserved {
                setting,
                template: template.to_owned(),
            });
        }
        let mut id_level = None;
        let mut levels = 0;
        for (i, level) in template.split('/').enumerate() {
            levels += 1;
            if level == DEVICE_ID_PLACEHOLDER {
                if id_level.replace(i).is_some() {
                    return Err(TopicError::RepeatedDeviceId {
                        setting,
                        template: template.to_owned(),
                    });
                }
            } else if level.contains('{') || level.contains('}') {
                return Err(TopicError::PartialLevel {
                    setting,
                    template: template.to_owned(),
                    level: level.to_owned(),
                });
            } else if level.contains('+') || level.contains('#') {
                return Err(TopicError::Wildcard {
                    setting,
                    template: template.to_owned(),
                    level: level.to_owned(),
                });
            }
        }
        let id_level = id_level.ok_or_else(|| TopicError::MissingDeviceId {
            setting,
            template: template.to_owned(),
        })?;
        Ok(Self {
            template: template.to_owned(),
            id_level,
            levels,
        })
    }

    /// The template as configured.
    pub fn as_str(&self) -> &str {
        &self.template
    }

    /// The topic of one device. The id is inserted as is: callers pass a validated
    /// [`iotgw_ids::DeviceId`], which holds no `/`, `+` or `#`.
    pub fn topic_for(&self, device_id: &str) -> String {
        self.template.replacen(DEVICE_ID_PLACEHOLDER, device_id, 1)
    }

    /// The subscription filter matching every device (`{device_id}` becomes `+`).
    pub fn filter(&self) -> String {
        self.topic_for("+")
    }

    /// The filter as a shared subscription of `group` (`$share/{group}/{filter}`); the plain
    /// filter when `group` is empty.
    pub fn shared_filter(&self, group: &str) -> String {
        if group.is_empty() {
            self.filter()
        } else {
            format!("$share/{group}/{}", self.filter())
        }
    }

    /// The device id of a received `topic`, or `None` when the topic does not match the
    /// template (or its id level is empty). The id is raw: the gateway validates it.
    pub fn device_id_of<'t>(&self, topic: &'t str) -> Option<&'t str> {
        let mut found = None;
        let mut count = 0;
        for (i, (got, want)) in topic.split('/').zip(self.template.split('/')).enumerate() {
            count += 1;
            if i == self.id_level {
                if got.is_empty() {
                    return None;
                }
                found = Some(got);
            } else if got != want {
                return None;
            }
        }
        if count != self.levels || topic.split('/').count() != self.levels {
            return None;
        }
        found
    }
}

/// What a received topic is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TopicKind {
    /// Device telemetry.
    Telemetry,
    /// Retained connection status / last will.
    Status,
    /// A command reply.
    Reply,
    /// Reported properties.
    Reported,
}

/// The six templates of one provider instance.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Topics {
    /// `telemetry_topic`.
    pub telemetry: TopicTemplate,
    /// `status_topic`.
    pub status: TopicTemplate,
    /// `command_topic`.
    pub command: TopicTemplate,
    /// `reply_topic`.
    pub reply: TopicTemplate,
    /// `reported_topic`.
    pub reported: TopicTemplate,
    /// `settings_topic` (outbound, retained).
    pub settings: TopicTemplate,
}

impl Topics {
    /// Validates the templates of `config`, including that no two are equal.
    pub fn from_config(config: &MqttConfig) -> Result<Self, TopicError> {
        let topics = Self {
            telemetry: TopicTemplate::parse("telemetry_topic", &config.telemetry_topic)?,
            status: TopicTemplate::parse("status_topic", &config.status_topic)?,
            command: TopicTemplate::parse("command_topic", &config.command_topic)?,
            reply: TopicTemplate::parse("reply_topic", &config.reply_topic)?,
            reported: TopicTemplate::parse("reported_topic", &config.reported_topic)?,
            settings: TopicTemplate::parse("settings_topic", &config.settings_topic)?,
        };
        let named = topics.named();
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

    fn named(&self) -> [(&'static str, &TopicTemplate); 6] {
        [
            ("telemetry_topic", &self.telemetry),
            ("status_topic", &self.status),
            ("command_topic", &self.command),
            ("reply_topic", &self.reply),
            ("reported_topic", &self.reported),
            ("settings_topic", &self.settings),
        ]
    }

    /// Which inbound kind `topic` is and its device id. Checked in the order status,
    /// reply, reported, telemetry, so a catch-all telemetry template cannot shadow the
    /// others.
    pub fn classify<'t>(&self, topic: &'t str) -> Option<(TopicKind, &'t str)> {
        [
            (TopicKind::Status, &self.status),
            (TopicKind::Reply, &self.reply),
            (TopicKind::Reported, &self.reported),
            (TopicKind::Telemetry, &self.telemetry),
        ]
        .into_iter()
        .find_map(|(kind, t)| t.device_id_of(topic).map(|id| (kind, id)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> TopicTemplate {
        TopicTemplate::parse("telemetry_topic", s).expect("valid template")
    }

    #[test]
    fn a_device_topic_and_a_wildcard_filter_are_built_from_the_template() {
        let tpl = t("devices/{device_id}/telemetry");
        assert_eq!(tpl.topic_for("pump-1"), "devices/pump-1/telemetry");
        assert_eq!(tpl.filter(), "devices/+/telemetry");
        assert_eq!(tpl.shared_filter("gw"), "$share/gw/devices/+/telemetry");
        assert_eq!(tpl.shared_filter(""), "devices/+/telemetry");
        assert_eq!(t("{device_id}").filter(), "+");
    }

    #[test]
    fn the_device_id_is_extracted_only_from_topics_matching_the_template() {
        let tpl = t("devices/{device_id}/telemetry");
        assert_eq!(tpl.device_id_of("devices/pump-1/telemetry"), Some("pump-1"));
        assert_eq!(
            tpl.device_id_of("devices/site:7_p/telemetry"),
            Some("site:7_p")
        );
        for miss in [
            "devices/pump-1/status",
            "devices/pump-1/telemetry/extra",
            "devices/pump-1",
            "devices//telemetry",
            "other/pump-1/telemetry",
            "",
        ] {
            assert_eq!(tpl.device_id_of(miss), None, "{miss}");
        }
        assert_eq!(t("{device_id}/up").device_id_of("d1/up"), Some("d1"));
        assert_eq!(t("up/{device_id}").device_id_of("up/d1"), Some("d1"));
    }

    #[test]
    fn templates_without_a_whole_level_device_id_are_refused_naming_the_template() {
        let err = |s: &str| TopicTemplate::parse("command_topic", s).expect_err(s);
        assert!(matches!(
            err(""),
            TopicError::Empty {
                setting: "command_topic"
            }
        ));
        assert!(matches!(
            err("devices/telemetry"),
            TopicError::MissingDeviceId { .. }
        ));
        assert!(matches!(
            err("devices/dev-{device_id}/x"),
            TopicError::PartialLevel { .. }
        ));
        assert!(matches!(
            err("devices/{device}/x"),
            TopicError::PartialLevel { .. }
        ));
        assert!(matches!(
            err("a/{device_id}/{device_id}"),
            TopicError::RepeatedDeviceId { .. }
        ));
        assert!(matches!(
            err("a/+/{device_id}"),
            TopicError::Wildcard { .. }
        ));
        assert!(matches!(
            err("a/{device_id}/#"),
            TopicError::Wildcard { .. }
        ));
        assert!(matches!(
            err("$SYS/{device_id}"),
            TopicError::Reserved { .. }
        ));
        let msg = err("devices/dev-{device_id}/x").to_string();
        assert!(
            msg.contains("command_topic") && msg.contains("devices/dev-{device_id}/x"),
            "{msg}"
        );
    }

    #[test]
    fn two_settings_with_the_same_template_are_refused() {
        let config = MqttConfig {
            reply_topic: "devices/{device_id}/telemetry".into(),
            ..MqttConfig::default()
        };
        let err = Topics::from_config(&config).expect_err("duplicate");
        assert!(
            matches!(
                err,
                TopicError::Duplicate {
                    first: "telemetry_topic",
                    second: "reply_topic",
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn received_topics_are_classified_by_kind_with_their_device_id() {
        let topics = Topics::from_config(&MqttConfig::default()).expect("defaults are valid");
        assert_eq!(
            topics.classify("devices/d1/telemetry"),
            Some((TopicKind::Telemetry, "d1"))
        );
        assert_eq!(
            topics.classify("devices/d1/status"),
            Some((TopicKind::Status, "d1"))
        );
        assert_eq!(
            topics.classify("devices/d1/replies"),
            Some((TopicKind::Reply, "d1"))
        );
        assert_eq!(
            topics.classify("devices/d1/reported"),
            Some((TopicKind::Reported, "d1"))
        );
        assert_eq!(topics.classify("devices/d1/commands"), None);
        assert_eq!(
            topics.classify("devices/d1/settings"),
            None,
            "outbound only"
        );
    }
}
