//! How commands go out on a plain MQTT broker: one QoS 1 publish to the device's command
//! topic on the receive loop's session, the correlation id as MQTT 5 correlation data,
//! in the JSON payload for MQTT 3.1.1 devices, or both (`command_correlation`).

use std::time::Duration;

use iotgw_config::CommandCorrelation;
use rumqttc::v5::mqttbytes::v5::PublishProperties;
use rumqttc::v5::mqttbytes::QoS;

use super::state::{lock, Shared};
use crate::{CommandOutcome, CommandRequest, ProviderError};

/// How long `send_command` waits for room in the request queue before giving up.
const COMMAND_QUEUE_TIMEOUT: Duration = Duration::from_secs(5);

/// Publishes the command at QoS 1 to the device's command topic with MQTT 5
/// correlation data, response topic and user properties `command_name`,
/// `correlation_id` and `command_id`; with `command_correlation = "payload"` instead
/// the correlation id is a `"correlation_id"` field of the JSON payload and the publish
/// carries no properties (3.1.1 devices), with `"both"` it is in both places. While the
/// broker is away rumqttc queues it in memory and sends it after reconnecting (lost if the
/// process stops first). A message above `limit` bytes is refused before anything is sent.
pub(super) async fn send(
    shared: &Shared,
    limit: usize,
    cmd: &CommandRequest,
) -> Result<CommandOutcome, ProviderError> {
    if cmd.message.len() > limit {
        return Err(ProviderError::InvalidInput {
            instance: shared.instance.to_string(),
            field: "msdyn_message".into(),
            message: format!(
                "command {} is {} bytes; at most {limit} bytes fit (Field Service's msdyn_message): shorten its parameters",
                cmd.name,
                cmd.message.len()
            ),
        });
    }
    let client = lock(&shared.client).clone().ok_or_else(|| {
        shared.transient(
            "the receive loop is not running (run not started or stopped): command not sent",
        )
    })?;
    let topics = &shared.topics;
    let device = cmd.device_id.as_str();
    let properties = PublishProperties {
        payload_format_indicator: Some(1),
        content_type: Some("application/json".into()),
        response_topic: Some(topics.reply.topic_for(device)),
        correlation_data: Some(cmd.correlation_id.clone().into()),
        user_properties: vec![
            ("command_name".into(), cmd.name.clone()),
            ("correlation_id".into(), cmd.correlation_id.clone()),
            ("command_id".into(), cmd.id.to_string()),
        ],
        ..PublishProperties::default()
    };
    let mode = shared.config.command_correlation;
    let payload = match mode {
        CommandCorrelation::Properties => cmd.message.clone(),
        CommandCorrelation::Payload | CommandCorrelation::Both => {
            with_correlation(&cmd.message, &cmd.correlation_id)
        }
    };
    let topic = topics.command.topic_for(device);
    let publish = async {
        match mode {
            CommandCorrelation::Payload => {
                client
                    .publish(topic, QoS::AtLeastOnce, false, payload)
                    .await
            }
            CommandCorrelation::Properties | CommandCorrelation::Both => {
                client
                    .publish_with_properties(topic, QoS::AtLeastOnce, false, payload, properties)
                    .await
            }
        }
    };
    match tokio::time::timeout(COMMAND_QUEUE_TIMEOUT, publish).await {
        Ok(Ok(())) => Ok(CommandOutcome::Published),
        Ok(Err(e)) => Err(shared.transient(format!("command {} to {device} not queued: {e}", cmd.id))),
        Err(_) => Err(shared.transient(format!(
            "command {} to {device} not queued within {COMMAND_QUEUE_TIMEOUT:?}: the broker connection is backed up; retry later",
            cmd.id
        ))),
    }
}

/// Publishes `settings` (Update Device Data) as JSON, retained, at QoS 1 to the device's
/// settings topic (`settings_topic`), on the receive loop's session as commands go: the
/// broker keeps the latest settings and hands them to the device whenever it subscribes.
/// Settings above `limit` bytes are refused before anything is sent.
pub(super) async fn send_settings(
    shared: &Shared,
    limit: usize,
    device: &str,
    settings: &serde_json::Value,
) -> Result<(), ProviderError> {
    let payload = settings.to_string();
    if payload.len() > limit {
        return Err(ProviderError::InvalidInput {
            instance: shared.instance.to_string(),
            field: "msdyn_devicesettings".into(),
            message: format!(
                "the settings of {device} are {} bytes; at most {limit} bytes fit",
                payload.len()
            ),
        });
    }
    let client = lock(&shared.client).clone().ok_or_else(|| {
        shared.transient(
            "the receive loop is not running (run not started or stopped): settings not sent",
        )
    })?;
    let topic = shared.topics.settings.topic_for(device);
    let properties = PublishProperties {
        payload_format_indicator: Some(1),
        content_type: Some("application/json".into()),
        ..PublishProperties::default()
    };
    let publish = async {
        match shared.config.command_correlation {
            // 3.1.1 devices: no MQTT 5 properties at all, as for commands.
            CommandCorrelation::Payload => {
                client.publish(topic, QoS::AtLeastOnce, true, payload).await
            }
            CommandCorrelation::Properties | CommandCorrelation::Both => {
                client
                    .publish_with_properties(topic, QoS::AtLeastOnce, true, payload, properties)
                    .await
            }
        }
    };
    match tokio::time::timeout(COMMAND_QUEUE_TIMEOUT, publish).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(shared.transient(format!("settings for {device} not queued: {e}"))),
        Err(_) => Err(shared.transient(format!(
            "settings for {device} not queued within {COMMAND_QUEUE_TIMEOUT:?}: the broker connection is backed up; retry later"
        ))),
    }
}

/// The command message with `"correlation_id"` added to its top-level JSON object, so a
/// device without MQTT 5 properties (3.1.1) can echo it in its reply. A message that is not
/// a JSON object, or already names a correlation id, is sent as it is.
fn with_correlation(message: &str, correlation_id: &str) -> String {
    match serde_json::from_str::<serde_json::Value>(message) {
        Ok(serde_json::Value::Object(mut fields)) if !fields.contains_key("correlation_id") => {
            fields.insert(
                "correlation_id".into(),
                serde_json::Value::String(correlation_id.to_owned()),
            );
            serde_json::Value::Object(fields).to_string()
        }
        _ => message.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_correlation_id_is_added_to_a_json_object_command_and_nothing_else() {
        let out: serde_json::Value = serde_json::from_str(&with_correlation(
            r#"{"CommandName":"cool_down","Parameters":{"t":60}}"#,
            "m-1/cool_down",
        ))
        .expect("json");
        assert_eq!(
            out,
            serde_json::json!({"CommandName":"cool_down","Parameters":{"t":60},"correlation_id":"m-1/cool_down"})
        );
        assert_eq!(
            with_correlation("reboot", "c"),
            "reboot",
            "not JSON: unchanged"
        );
        assert_eq!(
            with_correlation("[1]", "c"),
            "[1]",
            "not an object: unchanged"
        );
        assert_eq!(
            with_correlation(r#"{"correlation_id":"mine"}"#, "c"),
            r#"{"correlation_id":"mine"}"#,
            "a device-facing id the user chose is kept"
        );
    }
}
