//! How commands go out on AWS IoT Core: the `iot-data` Publish API to the device's command
//! topic at QoS 1, with MQTT 5 properties (correlation data, response topic, content type,
//! user properties), never over the gateway's own MQTT session.

use aws_sdk_iotdataplane::primitives::Blob;
use aws_sdk_iotdataplane::types::PayloadFormatIndicator;
use base64::Engine as _;

use super::errors::Call;
use super::state::Shared;
use crate::{CommandOutcome, CommandRequest, ProviderError};

/// Publishes the command at QoS 1 through the `iot-data` API to the device's command
/// topic, with MQTT 5 properties: correlation data (the correlation id), response
/// topic (the device's reply topic), content type, and user properties
/// `command_name`, `correlation_id`, `command_id`. `Published`: the device's reply
/// decides Sent or Error. A message above `limit` bytes is refused before any call.
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
                "command {} is {} bytes; at most {limit} bytes fit (Field Service's msdyn_message; AWS allows 128 KB): shorten its parameters",
                cmd.name,
                cmd.message.len()
            ),
        });
    }
    let device = cmd.device_id.as_str();
    let topics = &shared.topics;
    let topic = topics.command_topic(device);
    let user_properties = serde_json::json!([
        {"command_name": cmd.name},
        {"correlation_id": cmd.correlation_id},
        {"command_id": cmd.id.to_string()},
    ])
    .to_string();
    let resource = format!("command {} to {device} on {topic}", cmd.name);
    shared
        .clients
        .data()
        .await?
        .publish()
        .topic(&topic)
        .qos(1)
        .payload(Blob::new(cmd.message.as_bytes().to_vec()))
        .content_type("application/json")
        .payload_format_indicator(PayloadFormatIndicator::Utf8Data)
        .response_topic(topics.reply_topic(device))
        .correlation_data(base64::engine::general_purpose::STANDARD.encode(&cmd.correlation_id))
        .user_properties(user_properties)
        .send()
        .await
        .map_err(|e| {
            shared.clients.error(
                &Call {
                    op: "Publish",
                    resource: &resource,
                    field: "msdyn_message",
                },
                &e,
            )
        })?;
    Ok(CommandOutcome::Published)
}
