//! Moving a device between provider instances (`POST /api/v1/devices/{id}/move`,
//! `iotgw devices move`): register on the target, cut over in one store transaction, then
//! unregister on the source.
//!
//! - The target registers first. If that fails, nothing changed: the device stays where it
//!   was, and the error says why.
//! - The cut-over is one transaction (`Store::move_device`): the device's instance, a
//!   Deactivate history row on the source and a Register row on the target, and its
//!   commands still In Progress end in Error with the reason. They are not re-sent on the
//!   target: the source may already have delivered them (an MQTT publish or a Pub/Sub
//!   message is not confirmed until the device answers), and a repeated command (open a
//!   valve, reboot) can do harm that a failed one cannot; the business app sees the Error
//!   and decides. From the cut-over on, readings that still arrive through the source are
//!   dead letters with reason `wrong_instance`.
//! - If the cut-over fails, the target registration is undone (best effort) and the
//!   device stays on the source.
//! - The source unregisters last. If it fails, the move still stands (the store says where
//!   the device lives); the answer reports the failure and the gateway tries again in the
//!   background with backoff ([`SOURCE_RETRIES`] attempts). The retry is not kept across a
//!   restart: an instance that was down long enough keeps a stale entry the operator
//!   removes (the log names it).

use std::sync::Arc;
use std::time::Duration;

use iotgw_providers::{DeviceSpec, Provider, ProviderError};
use iotgw_registry::{Device, DeviceId};
use serde::Serialize;

use crate::core::{Core, GatewayError};

/// Background attempts to unregister on the source after a failed first one.
pub const SOURCE_RETRIES: u32 = 6;
/// The first pause between those attempts (doubled each time).
const SOURCE_RETRY_FIRST: Duration = Duration::from_secs(1);

/// What a move did.
#[derive(Debug, Clone, Serialize)]
pub struct Moved {
    /// The device as it is now.
    pub device: Device,
    /// Where it was.
    pub from: String,
    /// Commands that were In Progress and ended in Error.
    pub commands_ended: u64,
    /// Whether the source unregistered the device; false: see `source_error`.
    pub source_unregistered: bool,
    /// Why the source did not unregister (it is retried in the background).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source_error: Option<String>,
    /// Credentials the target handed out, shown this once.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub credentials: Option<serde_json::Value>,
}

/// Moves device `raw_id` to instance `to`; see the module docs for the order and what
/// each failure leaves.
pub async fn move_device(core: &Core, raw_id: &str, to: &str) -> Result<Moved, GatewayError> {
    let id = crate::core::parse_device_id("id", raw_id)?;
    let live = core.live();
    let target = live.provider("to", to)?;
    let device = core
        .store
        .get_device(&id)
        .await?
        .ok_or_else(|| GatewayError::NotFound(format!("device {id} not found")))?;
    let from = device.provider_instance.clone();
    if let Some(refused) = iotgw_registry::decide::move_refusal(&device, &from, to) {
        return Err(refused.into());
    }
    let spec = DeviceSpec {
        device_id: id.clone(),
        name: device.name.clone(),
        category: device.category.clone(),
        tags: device.tags.clone(),
        settings: device.settings.clone(),
    };
    let registration = target.register(&spec).await.map_err(|e| {
        tracing::warn!(device = %id, %from, %to, error = %e, "move refused by the target; the device stays");
        GatewayError::Provider(e)
    })?;
    let (moved, commands_ended) = match core.store.move_device(&id, &from, to).await {
        Ok(m) => m,
        Err(e) => {
            if let Err(undo) = target.unregister(&id).await {
                tracing::warn!(device = %id, %to, error = %undo, "undoing the target registration after a failed cut-over failed; remove it by hand");
            }
            return Err(e.into());
        }
    };
    core.metrics.moved(&from, to);
    let source = live.providers.get(&from).cloned();
    let source_error = match &source {
        None => None, // the source is no longer configured: nothing to remove there
        Some(p) => match p.unregister(&id).await {
            Ok(()) | Err(ProviderError::NotFound { .. }) => None,
            Err(e) => Some(e.to_string()),
        },
    };
    if let (Some(error), Some(p)) = (&source_error, source) {
        tracing::warn!(device = %id, %from, %error, "the moved device is still registered on its old instance; trying again in the background");
        tokio::spawn(retry_unregister(p, id.clone(), from.clone()));
    }
    tracing::info!(device = %id, %from, %to, commands_ended, "device moved");
    Ok(Moved {
        device: moved,
        from,
        commands_ended,
        source_unregistered: source_error.is_none(),
        source_error,
        credentials: registration.credentials,
    })
}

async fn retry_unregister(source: Arc<dyn Provider>, id: DeviceId, from: String) {
    let mut pause = SOURCE_RETRY_FIRST;
    for attempt in 1..=SOURCE_RETRIES {
        tokio::time::sleep(pause).await;
        match source.unregister(&id).await {
            Ok(()) | Err(ProviderError::NotFound { .. }) => {
                tracing::info!(device = %id, %from, attempt, "the moved device is unregistered on its old instance");
                return;
            }
            Err(e) => {
                tracing::warn!(device = %id, %from, attempt, error = %e, "unregistering the moved device on its old instance failed again");
            }
        }
        pause *= 2;
    }
    tracing::error!(device = %id, %from, "gave up unregistering the moved device on its old instance: remove it there by hand");
}
