//! How commands go out on Pub/Sub: one message on the instance's commands topic, the
//! device id as attribute and as ordering key (one device's commands keep their order);
//! the device's bridge takes it from its command subscription (see [`super::registry`]).

use std::time::Duration;

use google_cloud_pubsub::error::PublishError;
use google_cloud_pubsub::model::Message;

use super::client::{classify, Call};
use super::names::{
    COMMAND_ID_ATTRIBUTE, COMMAND_NAME_ATTRIBUTE, CORRELATION_ID_ATTRIBUTE, KIND_ATTRIBUTE,
    SETTINGS_KIND,
};
use super::state::Shared;
use crate::{CommandOutcome, CommandRequest, ProviderError};

/// Publishes the command to the commands topic: the message text as data, attributes
/// `<device_id_attribute>`, `command_name`, `correlation_id`, `command_id`, and the
/// device id as ordering key, so one device's commands keep their order. Returns once
/// Pub/Sub accepted it; the device's reply (on the reply topic) decides Sent or Error. A
/// message above `limit` bytes is refused before anything is published.
pub(super) async fn send(
    s: &Shared,
    limit: usize,
    cmd: &CommandRequest,
) -> Result<CommandOutcome, ProviderError> {
    if cmd.message.len() > limit {
        return Err(ProviderError::InvalidInput {
            instance: s.instance.to_string(),
            field: "msdyn_message".into(),
            message: format!(
                "command {} is {} bytes; at most {limit} bytes fit (Field Service's msdyn_message): shorten its parameters",
                cmd.name,
                cmd.message.len()
            ),
        });
    }
    let device = cmd.device_id.as_str();
    let msg = Message::new()
        .set_data(cmd.message.clone())
        .set_ordering_key(device)
        .set_attributes([
            (s.names.device_id_attribute.clone(), device.to_owned()),
            (COMMAND_NAME_ATTRIBUTE.to_owned(), cmd.name.clone()),
            (
                CORRELATION_ID_ATTRIBUTE.to_owned(),
                cmd.correlation_id.clone(),
            ),
            (COMMAND_ID_ATTRIBUTE.to_owned(), cmd.id.to_string()),
        ]);
    let what = format!(
        "publishing command {} ({}) to {} for {device}",
        cmd.id, cmd.name, s.names.commands_topic
    );
    publish(s, msg, device, &what).await?;
    Ok(CommandOutcome::Published)
}

/// Publishes `settings` (Update Device Data) as JSON to the commands topic with attributes
/// `<device_id_attribute>` and `iotgw_kind=settings` (a command has no `iotgw_kind`), and
/// the device id as ordering key, so settings and commands reach the device's bridge in
/// the order they were sent. Settings above `limit` bytes are refused before anything is
/// published.
pub(super) async fn send_settings(
    s: &Shared,
    limit: usize,
    device: &str,
    settings: &serde_json::Value,
) -> Result<(), ProviderError> {
    let data = settings.to_string();
    if data.len() > limit {
        return Err(ProviderError::InvalidInput {
            instance: s.instance.to_string(),
            field: "msdyn_devicesettings".into(),
            message: format!(
                "the settings of {device} are {} bytes; at most {limit} bytes fit",
                data.len()
            ),
        });
    }
    let msg = Message::new()
        .set_data(data)
        .set_ordering_key(device)
        .set_attributes([
            (s.names.device_id_attribute.clone(), device.to_owned()),
            (KIND_ATTRIBUTE.to_owned(), SETTINGS_KIND.to_owned()),
        ]);
    let what = format!(
        "publishing settings to {} for {device}",
        s.names.commands_topic
    );
    publish(s, msg, device, &what).await
}

/// Publishes `msg` to the commands topic and waits for Pub/Sub to accept it; `what`
/// names it in errors.
async fn publish(s: &Shared, msg: Message, device: &str, what: &str) -> Result<(), ProviderError> {
    // The publisher retries within request_timeout_secs; the margin covers batching.
    let limit = Duration::from_secs(s.config.request_timeout_secs) + Duration::from_secs(1);
    let published = tokio::time::timeout(limit, s.clients.commands.publish(msg)).await;
    let err = match published {
        Ok(Ok(message_id)) => {
            tracing::debug!(instance = %s.instance, device, %message_id, "gcp_pubsub: {what}: published");
            return Ok(());
        }
        Ok(Err(PublishError::Rpc(e))) => classify(
            &s.instance,
            Call {
                field: "commands_topic",
                what,
            },
            &e,
        ),
        Ok(Err(PublishError::OrderingKeyPaused)) => s.transient(format!(
            "{what}: an earlier message to this device failed, so its ordering key was paused; it is resumed now: retry"
        )),
        Ok(Err(other)) => s.transient(format!("{what}: {other}")),
        Err(_) => s.transient(format!(
            "{what}: not confirmed within {limit:?} by {}",
            s.clients.target.describe()
        )),
    };
    // A failed publish pauses the device's ordering key; the failure is reported, so
    // later messages may go.
    s.clients.commands.resume_publish(device);
    Err(err)
}
