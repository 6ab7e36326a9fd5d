//! The per-device AWS IoT policy: connect as its own thing name, publish its telemetry
//! and replies, receive its commands, use its own shadow; nothing else. Also the checks of
//! what registration sends to AWS (thing attributes from tags, thing type from category).
//!
//! Pure functions, no I/O.

use std::collections::BTreeMap;
use std::collections::HashMap;

use serde_json::{json, Value};

use super::topics::AwsTopics;

/// Most attributes of a thing without a thing type (AWS IoT limit).
pub const MAX_ATTRIBUTES_UNTYPED: usize = 3;
/// Most attributes of a thing with a thing type (AWS IoT limit).
pub const MAX_ATTRIBUTES_TYPED: usize = 50;

/// `arn:<partition>:iot:<region>:<account>` of a thing ARN
/// (`arn:aws:iot:eu-west-1:123456789012:thing/pump-1`); a wildcard prefix when the ARN
/// does not parse.
pub fn arn_prefix(thing_arn: &str) -> String {
    let parts: Vec<&str> = thing_arn.splitn(6, ':').collect();
    match parts.as_slice() {
        ["arn", partition, "iot", region, account, _] if !partition.is_empty() => {
            format!("arn:{partition}:iot:{region}:{account}")
        }
        _ => "arn:aws:iot:*:*".to_owned(),
    }
}

/// The policy document of `thing` (its device id). `arn` is [`arn_prefix`] of its ARN.
pub fn device_policy(arn: &str, thing: &str, topics: &AwsTopics) -> Value {
    let topic = |t: &str| format!("{arn}:topic/{t}");
    let filter = |t: &str| format!("{arn}:topicfilter/{t}");
    let shadow = format!("$aws/things/{thing}/shadow/*");
    let mut publish: Vec<String> = topics
        .telemetry_topics(thing)
        .iter()
        .map(|t| topic(t))
        .collect();
    publish.push(topic(&topics.reply_topic(thing)));
    publish.push(topic(&shadow));
    let command = topics.command_topic(thing);
    json!({
        "Version": "2012-10-17",
        "Statement": [
            {"Effect": "Allow", "Action": "iot:Connect", "Resource": format!("{arn}:client/{thing}")},
            {"Effect": "Allow", "Action": "iot:Publish", "Resource": publish},
            {"Effect": "Allow", "Action": "iot:Subscribe", "Resource": [filter(&command), filter(&shadow)]},
            {"Effect": "Allow", "Action": "iot:Receive", "Resource": [topic(&command), topic(&shadow)]}
        ]
    })
}

/// Whether two policy documents say the same (AWS may reformat the text).
pub fn same_document(a: &str, b: &str) -> bool {
    match (
        serde_json::from_str::<Value>(a),
        serde_json::from_str::<Value>(b),
    ) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}

fn attribute_name_ok(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.,@/:#-".contains(c))
}

fn attribute_value_ok(s: &str) -> bool {
    s.len() <= 800
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.,@/:#=[]-".contains(c))
}

/// A valid thing type name (`[a-zA-Z0-9:_-]{1,128}`).
pub fn thing_type_ok(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || ":_-".contains(c))
}

/// The thing attributes of `tags`, or what is wrong (for `msdyn_tags`).
pub fn attributes(
    tags: &BTreeMap<String, String>,
    typed: bool,
) -> Result<HashMap<String, String>, String> {
    let max = if typed {
        MAX_ATTRIBUTES_TYPED
    } else {
        MAX_ATTRIBUTES_UNTYPED
    };
    if tags.len() > max {
        return Err(format!(
            "{} tags, but an AWS IoT thing {} holds at most {max} attributes{}",
            tags.len(),
            if typed {
                "with a thing type"
            } else {
                "without a thing type"
            },
            if typed {
                ""
            } else {
                ": give the device a category (a thing type allows 50)"
            }
        ));
    }
    for (k, v) in tags {
        if !attribute_name_ok(k) {
            return Err(format!(
                "tag name {k:?} is not a thing attribute name: use 1-128 characters from A-Z a-z 0-9 _ . , @ / : # -"
            ));
        }
        if !attribute_value_ok(v) {
            return Err(format!(
                "tag {k}={v:?}: thing attribute values allow at most 800 characters from A-Z a-z 0-9 _ . , @ / : # = [ ] - (no spaces)"
            ));
        }
    }
    Ok(tags.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use iotgw_config::AwsIotCoreConfig;

    #[test]
    fn the_device_policy_names_only_the_devices_own_client_id_topics_and_shadow() {
        let topics = AwsTopics::from_config(&AwsIotCoreConfig::default()).expect("defaults");
        let arn = arn_prefix("arn:aws:iot:eu-west-1:123456789012:thing/pump-1");
        assert_eq!(arn, "arn:aws:iot:eu-west-1:123456789012");
        let doc = device_policy(&arn, "pump-1", &topics);
        let text = doc.to_string();
        assert!(text.contains("arn:aws:iot:eu-west-1:123456789012:client/pump-1"));
        assert!(text.contains(":topic/dt/iotgw/pump-1/telemetry"));
        assert!(text.contains(":topic/cmd/iotgw/pump-1/res"));
        assert!(text.contains(":topicfilter/cmd/iotgw/pump-1/req"));
        assert!(text.contains(":topic/$aws/things/pump-1/shadow/*"));
        assert!(
            !text.contains('+') && !text.contains('#'),
            "no wildcard topics: {text}"
        );
        assert!(!text.contains("pump-2"));
        assert!(same_document(
            &text,
            &serde_json::to_string_pretty(&doc).expect("json")
        ));
    }

    #[test]
    fn an_unparsable_thing_arn_gives_a_wildcard_account() {
        assert_eq!(arn_prefix("thing/pump-1"), "arn:aws:iot:*:*");
        assert_eq!(
            arn_prefix("arn:aws-cn:iot:cn-north-1:1:thing/x"),
            "arn:aws-cn:iot:cn-north-1:1"
        );
    }

    #[test]
    fn tags_become_attributes_within_aws_limits() {
        let tags = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let ok =
            attributes(&tags(&[("site", "plant-7"), ("floor", "2")]), false).expect("valid tags");
        assert_eq!(ok.get("site").map(String::as_str), Some("plant-7"));
        let four = tags(&[("a", "1"), ("b", "2"), ("c", "3"), ("d", "4")]);
        assert!(attributes(&four, false)
            .expect_err("too many untyped")
            .contains("category"));
        assert!(attributes(&four, true).is_ok());
        assert!(attributes(&tags(&[("site", "plant 7")]), false)
            .expect_err("space")
            .contains("no spaces"));
        assert!(attributes(&tags(&[("bad key", "x")]), false).is_err());
        assert!(thing_type_ok("chiller_v2") && !thing_type_ok("chiller v2"));
    }
}
