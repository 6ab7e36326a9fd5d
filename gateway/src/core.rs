//! The composed gateway state and the operations the API, the CLI and the pipeline share:
//! register and unregister devices, send commands. Providers and the store meet only here.

use std::collections::BTreeMap;
use std::sync::Arc;

use chrono::Utc;
use iotgw_config::Config;
use iotgw_providers::{
    CommandOutcome, CommandRequest, DeviceSpec, DeviceState, Provider, ProviderError,
    CFS_MAX_COMMAND_BYTES,
};
use iotgw_registry::{
    AlertStatus, Command, CommandStatus, Device, DeviceId, IsSimulated, NewCommand, NewDevice,
    RegistrationStatus, Store, StoreError,
};
use tokio::sync::Notify;

use crate::metrics::Metrics;
use crate::router::{RouteInput, Router};
use crate::rules::RuleSet;

/// A failure of a gateway operation, classified for the API.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// Bad input; names the field and the fix.
    #[error("invalid {field}: {message}")]
    Invalid {
        /// The offending field.
        field: String,
        /// What is wrong and what to do.
        message: String,
    },
    /// No such record.
    #[error("{0}")]
    NotFound(String),
    /// Conflicts with the current state.
    #[error("{0}")]
    Conflict(String),
    /// The provider failed.
    #[error(transparent)]
    Provider(#[from] ProviderError),
    /// The store failed.
    #[error(transparent)]
    Store(StoreError),
}

impl From<StoreError> for GatewayError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound { entity, key } => {
                Self::NotFound(format!("{entity} {key} not found"))
            }
            StoreError::Conflict(m) => Self::Conflict(m),
            StoreError::Invalid { field, message } => Self::Invalid {
                field: field.into(),
                message,
            },
            other => Self::Store(other),
        }
    }
}

/// A registration request (shaped after `msdyn_iotdevice`).
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegisterRequest {
    /// The device id (validated here).
    pub msdyn_deviceid: String,
    /// Display name; defaults to the id.
    pub msdyn_name: Option<String>,
    /// Category.
    pub msdyn_category: Option<String>,
    /// Customer account.
    pub msdyn_account: Option<String>,
    /// Tags.
    #[serde(default)]
    pub msdyn_tags: BTreeMap<String, String>,
    /// Desired settings.
    pub msdyn_devicesettings: Option<serde_json::Value>,
    /// Provider instance; the router decides when absent.
    pub msdyn_iotproviderinstance: Option<String>,
    /// Simulated device.
    #[serde(default)]
    pub msdyn_issimulated: bool,
}

/// What registration returns: the record, and credentials shown this once.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Registered {
    /// The device record.
    pub device: Device,
    /// Device credentials from the provider, never stored.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub credentials: Option<serde_json::Value>,
}

/// Everything the gateway's parts share.
pub struct Core {
    /// The effective configuration.
    pub config: Arc<Config>,
    /// The registry.
    pub store: Arc<dyn Store>,
    /// Provider instances by name.
    pub providers: BTreeMap<String, Arc<dyn Provider>>,
    /// Routing of new devices.
    pub router: Router,
    /// Compiled alert rules.
    pub rules: RuleSet,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Woken when outbox items were written.
    pub outbox_wake: Arc<Notify>,
    /// Sink names (one outbox item per sink per alert).
    pub sinks: Vec<String>,
}

impl std::fmt::Debug for Core {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Core")
            .field("providers", &self.providers.keys().collect::<Vec<_>>())
            .field("sinks", &self.sinks)
            .finish()
    }
}

fn parse_id(raw: &str) -> Result<DeviceId, GatewayError> {
    DeviceId::parse(raw).map_err(|e| GatewayError::Invalid {
        field: "msdyn_deviceid".into(),
        message: e.to_string(),
    })
}

impl Core {
    /// The provider instance by name.
    pub fn provider(&self, name: &str) -> Result<&Arc<dyn Provider>, GatewayError> {
        self.providers
            .get(name)
            .ok_or_else(|| GatewayError::Invalid {
                field: "msdyn_iotproviderinstance".into(),
                message: format!(
                    "provider instance `{name}` is not configured; configured: {}",
                    self.providers
                        .keys()
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            })
    }

    /// Registers a device: route, mark In Progress, call the provider, then Registered (with
    /// a history row) or Error (with the provider's message).
    pub async fn register(&self, req: RegisterRequest) -> Result<Registered, GatewayError> {
        let device_id = parse_id(&req.msdyn_deviceid)?;
        let instance = match &req.msdyn_iotproviderinstance {
            Some(i) => i.clone(),
            None => self
                .router
                .route(RouteInput { device_id: &device_id, category: req.msdyn_category.as_deref(), tags: &req.msdyn_tags })
                .map(str::to_string)
                .ok_or_else(|| GatewayError::Invalid {
                    field: "msdyn_iotproviderinstance".into(),
                    message: "no routing rule matches this device and routing.default is not set: name an instance or add a rule".into(),
                })?,
        };
        let provider = self.provider(&instance)?.clone();
        if let Some(s) = &req.msdyn_devicesettings {
            let size = s.to_string().len();
            if size > 8000 {
                return Err(GatewayError::Invalid {
                    field: "msdyn_devicesettings".into(),
                    message: format!("{size} bytes; msdyn_devicesettings holds 8000"),
                });
            }
        }
        if let Some(cat) = &req.msdyn_category {
            self.store.upsert_category(cat, None).await?;
        }
        let new = NewDevice {
            name: req
                .msdyn_name
                .clone()
                .unwrap_or_else(|| device_id.to_string()),
            device_id: device_id.clone(),
            provider_instance: instance.clone(),
            category: req.msdyn_category.clone(),
            account: req.msdyn_account.clone(),
            settings: req.msdyn_devicesettings.clone(),
            tags: req.msdyn_tags.clone(),
            is_simulated: if req.msdyn_issimulated {
                IsSimulated::Yes
            } else {
                IsSimulated::No
            },
        };
        self.store.begin_registration(&new).await?;
        let spec = DeviceSpec {
            device_id: device_id.clone(),
            name: new.name.clone(),
            category: new.category.clone(),
            tags: new.tags.clone(),
            settings: new.settings.clone(),
        };
        match provider.register(&spec).await {
            Ok(reg) => {
                let device = self
                    .store
                    .finish_registration(&device_id, Ok(reg.message))
                    .await?;
                tracing::info!(device = %device_id, provider = %instance, "device registered");
                Ok(Registered {
                    device,
                    credentials: reg.credentials,
                })
            }
            Err(e) => {
                tracing::warn!(device = %device_id, provider = %instance, error = %e, "registration failed");
                self.store
                    .finish_registration(&device_id, Err(e.to_string()))
                    .await?;
                Err(e.into())
            }
        }
    }

    /// Unregisters: the provider removes what register created, then the record becomes
    /// Unregistered with a history row. A device the provider no longer knows is still
    /// unregistered here.
    pub async fn unregister(&self, raw_id: &str) -> Result<Device, GatewayError> {
        let id = parse_id(raw_id)?;
        let device = self.store.get_device(&id).await?.ok_or_else(|| {
            GatewayError::NotFound(format!(
                "device {id} is not registered: nothing to unregister"
            ))
        })?;
        if device.registration_status == RegistrationStatus::Unregistered {
            return Err(GatewayError::Conflict(format!(
                "device {id} is already unregistered"
            )));
        }
        if let Some(p) = self.providers.get(&device.provider_instance) {
            match p.unregister(&id).await {
                Ok(()) => {}
                Err(ProviderError::NotFound { .. }) => {
                    tracing::info!(device = %id, "provider did not know the device; unregistering it here");
                }
                Err(e) => return Err(e.into()),
            }
        }
        let d = self.store.mark_unregistered(&id, None).await?;
        tracing::info!(device = %id, "device unregistered");
        Ok(d)
    }

    /// What the provider reports for a device (Field Service's "pull device data").
    pub async fn device_state(&self, raw_id: &str) -> Result<DeviceState, GatewayError> {
        let id = parse_id(raw_id)?;
        let device = self
            .store
            .get_device(&id)
            .await?
            .ok_or_else(|| GatewayError::NotFound(format!("device {id} not found")))?;
        let p = self.provider(&device.provider_instance)?;
        Ok(p.device_state(&id).await?)
    }

    /// Creates a command (In Progress) and sends it in the background: the answer does not
    /// wait for the device (an Azure direct method may wait up to its response timeout);
    /// the command's status follows on the record.
    pub async fn send_command(
        self: &Arc<Self>,
        raw_id: &str,
        name: &str,
        parameters: &serde_json::Value,
    ) -> Result<Command, GatewayError> {
        let cmd = self.create_command(raw_id, name, parameters).await?;
        let core = self.clone();
        let sending = cmd.clone();
        tokio::spawn(async move {
            core.dispatch(sending).await;
        });
        Ok(cmd)
    }

    /// Checks and stores a command (In Progress) without sending it.
    pub async fn create_command(
        &self,
        raw_id: &str,
        name: &str,
        parameters: &serde_json::Value,
    ) -> Result<Command, GatewayError> {
        let id = parse_id(raw_id)?;
        if name.trim().is_empty() {
            return Err(GatewayError::Invalid {
                field: "msdyn_name".into(),
                message: "empty command name: name the command the device expects".into(),
            });
        }
        let device = self.store.get_device(&id).await?.ok_or_else(|| {
            GatewayError::NotFound(format!("device {id} not found: register it first"))
        })?;
        if matches!(
            device.registration_status,
            RegistrationStatus::Unregistered
                | RegistrationStatus::Error
                | RegistrationStatus::InProgress
        ) {
            return Err(GatewayError::Conflict(format!(
                "device {id} is {}: only registered (or Unknown) devices take commands",
                device.registration_status.label()
            )));
        }
        let provider = self.provider(&device.provider_instance)?.clone();
        let message = self.rules.command_message(name, parameters);
        let limit = provider
            .limits()
            .max_command_bytes
            .min(CFS_MAX_COMMAND_BYTES);
        if message.len() > limit {
            return Err(GatewayError::Invalid {
                field: "msdyn_message".into(),
                message: format!("the command is {} bytes; provider `{}` and Field Service accept at most {limit}: send fewer parameters", message.len(), device.provider_instance),
            });
        }
        let cmd = self
            .store
            .insert_command(&NewCommand {
                name: name.to_string(),
                message,
                device_id: id,
                parent_alert: None,
                correlation_id: uuid::Uuid::new_v4().to_string(),
            })
            .await?;
        Ok(cmd)
    }

    /// Sends a stored command through its device's provider and records the outcome on the
    /// command and on its parent alert (Command Sent / Command Failed).
    pub async fn dispatch(&self, cmd: Command) -> Command {
        let outcome = match self.providers.get(&cmd.provider_instance) {
            None => Err(format!(
                "provider instance `{}` is not configured",
                cmd.provider_instance
            )),
            Some(p) => {
                let req = CommandRequest {
                    id: cmd.id,
                    device_id: cmd.device_id.clone(),
                    name: cmd.name.clone(),
                    message: cmd.message.clone(),
                    correlation_id: cmd.correlation_id.clone(),
                };
                p.send_command(&req).await.map_err(|e| e.to_string())
            }
        };
        let (status, reason, alert_status) = match &outcome {
            Ok(CommandOutcome::Published) => (None, None, AlertStatus::CommandSent),
            Ok(CommandOutcome::Delivered { .. }) => {
                (Some(CommandStatus::Sent), None, AlertStatus::CommandSent)
            }
            Ok(CommandOutcome::Refused { reason }) => (
                Some(CommandStatus::Error),
                Some(reason.clone()),
                AlertStatus::CommandFailed,
            ),
            Err(e) => (
                Some(CommandStatus::Error),
                Some(e.clone()),
                AlertStatus::CommandFailed,
            ),
        };
        self.metrics.command(
            &cmd.provider_instance,
            match &outcome {
                Ok(CommandOutcome::Published) => "published",
                Ok(CommandOutcome::Delivered { .. }) => "delivered",
                Ok(CommandOutcome::Refused { .. }) => "refused",
                Err(_) => "failed",
            },
        );
        let mut cmd = cmd;
        if let Some(status) = status {
            match self.store.set_command_status(cmd.id, status, reason).await {
                Ok(c) => cmd = c,
                Err(e) => {
                    tracing::error!(command = %cmd.id, error = %e, "recording the command status failed")
                }
            }
        }
        if let Some(alert) = cmd.parent_alert {
            if let Err(e) = self
                .store
                .set_alert_status(alert, alert_status, Some((cmd.id, Utc::now())))
                .await
            {
                tracing::error!(%alert, error = %e, "recording the alert's command status failed");
            }
        }
        cmd
    }
}
