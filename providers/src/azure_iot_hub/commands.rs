//! How commands go out to an IoT Hub device, per `command_delivery`: a direct method
//! (`POST /twins/{id}/methods`, the device's answer decides), a desired property on the
//! twin (`PATCH /twins/{id}`), or a cloud-to-device message over AMQP ([`super::c2d`]).

use std::time::Duration;

use iotgw_config::azure_iot_hub::AzureCommandDelivery;
use serde_json::{json, Map, Value};

use super::rest::{CloudToDeviceMethod, Twin, TwinProperties};
use super::state::Shared;
use crate::{CommandOutcome, CommandRequest, ProviderError};

/// Per `command_delivery`: a direct method (the device's answer decides: 2xx is
/// Delivered, another status an error with it; an offline device is `NotFound` with
/// the reason, or is retried for `direct_method.offline_retry_secs`), a desired property
/// (Published), or a C2D message over AMQP (Published).
pub(super) async fn send(
    s: &Shared,
    cmd: &CommandRequest,
) -> Result<CommandOutcome, ProviderError> {
    let limit = s.limits.max_command_bytes;
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
    match s.config.command_delivery {
        AzureCommandDelivery::DirectMethod => s.direct_method(cmd).await,
        AzureCommandDelivery::TwinDesired => s.twin_command(cmd).await,
        AzureCommandDelivery::C2d => match &s.c2d {
            Some(c2d) => c2d.send(cmd).await.map(|()| CommandOutcome::Published),
            None => Err(ProviderError::Unsupported {
                instance: s.instance.to_string(),
                what: "C2D messages: the sender was not built".into(),
            }),
        },
    }
}

impl Shared {
    async fn direct_method(&self, cmd: &CommandRequest) -> Result<CommandOutcome, ProviderError> {
        let dm = &self.config.direct_method;
        let device = cmd.device_id.as_str();
        let request = CloudToDeviceMethod {
            method_name: cmd.name.clone(),
            payload: serde_json::from_str(&cmd.message)
                .unwrap_or_else(|_| Value::String(cmd.message.clone())),
            response_timeout_in_seconds: dm.response_timeout_secs,
            connect_timeout_in_seconds: dm.connect_timeout_secs,
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(dm.offline_retry_secs);
        let mut attempts = 0u32;
        loop {
            attempts += 1;
            match self.hub.invoke_method(device, &request).await {
                Ok(result) => {
                    self.ok();
                    if (200..300).contains(&result.status) {
                        return Ok(CommandOutcome::Delivered {
                            response: (!result.payload.is_null()).then_some(result.payload),
                        });
                    }
                    return Ok(CommandOutcome::Refused {
                        reason: refusal_reason(result.status, &result.payload),
                    });
                }
                Err(e) if e.failure().is_some_and(|f| f.device_not_online()) => {
                    let now = tokio::time::Instant::now();
                    if now < deadline {
                        let pause =
                            Duration::from_secs(dm.offline_retry_interval_secs).min(deadline - now);
                        tracing::debug!(provider = %self.instance, device, command = %cmd.id, ?pause, "device offline; direct method retried (queued delivery)");
                        tokio::time::sleep(pause).await;
                        continue;
                    }
                    return Err(ProviderError::NotFound {
                        instance: self.instance.to_string(),
                        what: format!(
                            "device {device} is not online (IoT Hub 404103 DeviceNotOnline): direct method {} not delivered{}",
                            cmd.name,
                            if dm.offline_retry_secs > 0 {
                                format!(" after {attempts} attempts over {} s", dm.offline_retry_secs)
                            } else {
                                String::new()
                            }
                        ),
                    });
                }
                Err(e) => return Err(self.fail(e)),
            }
        }
    }

    async fn twin_command(&self, cmd: &CommandRequest) -> Result<CommandOutcome, ProviderError> {
        let message: Value = serde_json::from_str(&cmd.message)
            .unwrap_or_else(|_| Value::String(cmd.message.clone()));
        let mut desired = Map::new();
        desired.insert(
            self.config.twin_command.property.clone(),
            json!({
                "name": cmd.name,
                "id": cmd.id.to_string(),
                "correlation_id": cmd.correlation_id,
                "message": message,
            }),
        );
        let patch = Twin {
            properties: Some(TwinProperties {
                desired: Some(desired),
                reported: None,
            }),
            ..Twin::default()
        };
        self.hub
            .update_twin(cmd.device_id.as_str(), &patch)
            .await
            .map_err(|e| self.fail(e))?;
        self.ok();
        Ok(CommandOutcome::Published)
    }
}

/// The reason of a direct method the device answered with a status outside 2xx: the
/// `reason` (or `message`) of its payload, a payload that is text, or else the status
/// and the payload as they came.
fn refusal_reason(status: i64, payload: &Value) -> String {
    let text = match payload {
        Value::String(s) => Some(s.as_str()),
        Value::Object(o) => o
            .get("reason")
            .or_else(|| o.get("message"))
            .and_then(Value::as_str),
        _ => None,
    };
    match text {
        Some(t) if !t.is_empty() => t.to_owned(),
        _ => format!("the device answered status {status}: {payload}"),
    }
}
