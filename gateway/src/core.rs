//! The composed gateway state and the operations the API, the CLI and the pipeline share:
//! register and unregister devices, send commands. Providers and the store meet only here.

use std::collections::BTreeMap;
use std::sync::Arc;

use arc_swap::ArcSwap;
use chrono::Utc;
use futures::stream::{self, StreamExt};
use iotgw_providers::{DeviceSpec, DeviceState, Provider, ProviderError, CFS_MAX_COMMAND_BYTES};
use iotgw_registry::{
    Command, Device, DeviceId, IsSimulated, NewCommand, NewDevice, RegistrationStatus, Store,
    StoreError,
};
use tokio::sync::Notify;

use crate::live::Live;
use crate::metrics::Metrics;
use crate::router::RouteInput;

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
    /// The device is already Registered (a kind of conflict: registering it again needs an
    /// unregister first).
    #[error("{0}")]
    AlreadyRegistered(String),
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
#[derive(Debug, Clone, Default, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct RegisterRequest {
    /// The device id (validated here).
    pub msdyn_deviceid: String,
    /// Display name; defaults to the id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub msdyn_name: Option<String>,
    /// Category.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub msdyn_category: Option<String>,
    /// Customer account.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub msdyn_account: Option<String>,
    /// Tags.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub msdyn_tags: BTreeMap<String, String>,
    /// Desired settings.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub msdyn_devicesettings: Option<serde_json::Value>,
    /// Provider instance; the router decides when absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub msdyn_iotproviderinstance: Option<String>,
    /// Simulated device.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
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
    /// The registry.
    pub store: Arc<dyn Store>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Woken when outbox items were written.
    pub outbox_wake: Arc<Notify>,
    /// This replica's id (holder of its command claims).
    pub replica: String,
    /// The long-running tasks and which of them ended before their time (`/live`).
    pub vitals: Arc<crate::vitals::Vitals>,
    /// Commands being sent, per provider instance (`commands.max_in_flight`).
    pub command_slots: crate::commands::Slots,
    /// Whether the pipeline's commits go through (`/ready`).
    pub commits: crate::health::Commits,
    /// What a reload replaces: configuration, routing, rules, sinks, providers.
    live: ArcSwap<Live>,
}

impl std::fmt::Debug for Core {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Core")
            .field("live", &*self.live.load())
            .finish()
    }
}

/// The largest settings document [`Core::update_device_data`] takes (compact JSON).
pub const MAX_DEVICE_SETTINGS_BYTES: usize = 8 * 1024;

/// What kind of JSON value `v` is, for error messages.
fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

/// Provider registrations in flight at once in one [`Core::register_many`] call.
pub const PROVIDER_CONCURRENCY: usize = 32;

/// A registration request checked and routed: what to store and which provider registers it.
struct Planned {
    new: NewDevice,
    provider: Arc<dyn Provider>,
}

/// Every slot of `register_many`'s answers is filled before it returns.
fn finish_answers(
    out: Vec<Option<Result<Registered, GatewayError>>>,
) -> Vec<Result<Registered, GatewayError>> {
    out.into_iter()
        .map(|a| a.expect("register_many answers every request"))
        .collect()
}

fn parse_id(raw: &str) -> Result<DeviceId, GatewayError> {
    parse_device_id("msdyn_deviceid", raw)
}

/// A device id from a request, refused naming the request's `field`.
pub(crate) fn parse_device_id(field: &str, raw: &str) -> Result<DeviceId, GatewayError> {
    DeviceId::parse(raw).map_err(|e| GatewayError::Invalid {
        field: field.into(),
        message: e.to_string(),
    })
}

/// What each configured sink takes from the change feed (`sinks.<name>.entities`), as the
/// store is told it.
fn subscriptions(config: &iotgw_config::Config) -> iotgw_registry::Subscriptions {
    let mut subs = iotgw_registry::Subscriptions::default();
    for (name, sink) in &config.sinks {
        subs.insert(
            name.clone(),
            iotgw_registry::Subscription {
                entities: sink.entities(),
                alert_changes: sink.alert_changes(),
                coalesce_connection: chrono::Duration::milliseconds(
                    i64::try_from(sink.coalesce_connection_ms().min(3_600_000)).unwrap_or(0),
                ),
            },
        );
    }
    subs
}

impl Core {
    /// The composed state, starting at `live`.
    pub fn new(
        store: Arc<dyn Store>,
        metrics: Arc<Metrics>,
        outbox_wake: Arc<Notify>,
        replica: String,
        live: Live,
    ) -> Self {
        store.set_subscriptions(subscriptions(&live.config));
        Self {
            store,
            metrics,
            outbox_wake,
            replica,
            vitals: Arc::default(),
            command_slots: crate::commands::Slots::default(),
            commits: crate::health::Commits::default(),
            live: ArcSwap::from_pointee(live),
        }
    }

    /// The live version of the reloadable state; hold it for one operation.
    pub fn live(&self) -> Arc<Live> {
        self.live.load_full()
    }

    /// Replaces the reloadable state (a configuration reload).
    pub fn swap(&self, live: Live) {
        self.store.set_subscriptions(subscriptions(&live.config));
        self.live.store(Arc::new(live));
    }

    /// The provider instance by name.
    pub fn provider(&self, name: &str) -> Result<Arc<dyn Provider>, GatewayError> {
        self.live().provider("msdyn_iotproviderinstance", name)
    }

    /// Whether an instance has been unhealthy for `health.failover_after_secs` or longer
    /// (an instance that is not configured counts as down).
    pub fn instance_down(&self, name: &str) -> bool {
        let live = self.live();
        let Some(p) = live.providers.get(name) else {
            return true;
        };
        crate::health::unhealthy_for(&p.health(), Utc::now()).is_some_and(|d| {
            d >= std::time::Duration::from_secs(live.config.health.failover_after_secs)
        })
    }

    /// Registers a device: route, mark In Progress, call the provider, then Registered (with
    /// a history row) or Error (with the provider's message). A batch of one
    /// ([`register_many`](Self::register_many)).
    pub async fn register(&self, req: RegisterRequest) -> Result<Registered, GatewayError> {
        self.register_many(vec![req])
            .await
            .pop()
            .expect("register_many answers once per request")
    }

    /// Registers many devices and answers once per request, at the same index: each is
    /// checked and routed as [`register`](Self::register) does, all are marked In Progress
    /// in one store call, each device's provider registers it (at most
    /// [`PROVIDER_CONCURRENCY`] calls in flight), then all are finished in one store call.
    /// One device's failure never fails the others.
    pub async fn register_many(
        &self,
        reqs: Vec<RegisterRequest>,
    ) -> Vec<Result<Registered, GatewayError>> {
        let requested = reqs.len();
        let mut out: Vec<Option<Result<Registered, GatewayError>>> =
            std::iter::repeat_with(|| None).take(requested).collect();
        let (mut planned, mut news) = (Vec::new(), Vec::new());
        for (index, req) in reqs.into_iter().enumerate() {
            match self.plan(req) {
                Ok((new, provider)) => {
                    planned.push((index, provider));
                    news.push(new);
                }
                Err(e) => out[index] = Some(Err(e)),
            }
        }

        let clock = std::time::Instant::now();
        let begun = match self.store.begin_registrations(&news).await {
            Ok(b) => b,
            Err(e) => {
                for (index, _) in &planned {
                    out[*index] = Some(Err(e.clone().into()));
                }
                return finish_answers(out);
            }
        };
        let mut started = Vec::with_capacity(planned.len());
        for (((index, provider), new), begun) in planned.into_iter().zip(news).zip(begun) {
            match begun {
                Ok(_) => started.push((index, Planned { new, provider })),
                Err(e) => out[index] = Some(Err(self.refused(&new.device_id, e).await)),
            }
        }

        let begin_ms = clock.elapsed().as_millis();
        let clock = std::time::Instant::now();
        let mut called: Vec<_> = stream::iter(started)
            .map(|(index, p)| async move {
                let spec = DeviceSpec {
                    device_id: p.new.device_id.clone(),
                    name: p.new.name.clone(),
                    category: p.new.category.clone(),
                    tags: p.new.tags.clone(),
                    settings: p.new.settings.clone(),
                };
                let result = p.provider.register(&spec).await;
                (index, p.new, result)
            })
            .buffer_unordered(PROVIDER_CONCURRENCY)
            .collect()
            .await;
        called.sort_by_key(|(index, _, _)| *index);

        let outcomes: Vec<(DeviceId, Result<Option<String>, String>)> = called
            .iter()
            .map(|(_, new, result)| {
                let outcome = match result {
                    Ok(reg) => Ok(reg.message.clone()),
                    Err(e) => Err(e.to_string()),
                };
                (new.device_id.clone(), outcome)
            })
            .collect();
        let providers_ms = clock.elapsed().as_millis();
        let clock = std::time::Instant::now();
        let finished = self.store.finish_registrations(&outcomes).await;
        let finish_ms = clock.elapsed().as_millis();
        let mut finished = match finished {
            Ok(f) => f.into_iter().map(Some).collect(),
            Err(e) => {
                for (index, _, _) in &called {
                    out[*index] = Some(Err(e.clone().into()));
                }
                Vec::new()
            }
        };
        for (n, (index, new, result)) in called.into_iter().enumerate() {
            let Some(stored) = finished.get_mut(n).and_then(Option::take) else {
                continue;
            };
            let instance = &new.provider_instance;
            let answer = match (stored, result) {
                (Err(e), _) => Err(e.into()),
                (Ok(device), Ok(reg)) => {
                    // One line per device only for a single registration; a batch logs
                    // its counts below.
                    if requested == 1 {
                        tracing::info!(device = %new.device_id, provider = %instance, "device registered");
                    } else {
                        tracing::debug!(device = %new.device_id, provider = %instance, "device registered");
                    }
                    Ok(Registered {
                        device,
                        credentials: reg.credentials,
                    })
                }
                (Ok(_), Err(e)) => {
                    tracing::warn!(device = %new.device_id, provider = %instance, error = %e, "registration failed");
                    Err(e.into())
                }
            };
            out[index] = Some(answer);
        }
        let answers = finish_answers(out);
        let registered = answers.iter().filter(|a| a.is_ok()).count();
        tracing::info!(
            requested,
            begin_ms,
            providers_ms,
            finish_ms,
            registered,
            failed = requested - registered,
            "devices registered"
        );
        answers
    }

    /// Checks and routes one request, as registration needs it.
    fn plan(&self, req: RegisterRequest) -> Result<(NewDevice, Arc<dyn Provider>), GatewayError> {
        let device_id = parse_id(&req.msdyn_deviceid)?;
        let instance = match req.msdyn_iotproviderinstance {
            Some(i) => i,
            None => {
                let input = RouteInput {
                    device_id: &device_id,
                    category: req.msdyn_category.as_deref(),
                    tags: &req.msdyn_tags,
                };
                let live = self.live();
                let route = live.router.route(input, |i| self.instance_down(i)).ok_or_else(|| GatewayError::Invalid {
                    field: "msdyn_iotproviderinstance".into(),
                    message: "no routing rule matches this device and routing.default is not set: name an instance or add a rule".into(),
                })?;
                if let Some(down) = route.instead_of {
                    tracing::warn!(device = %device_id, down, fallback = route.instance, "failover: the rule's instance is down; the device goes to its fallback");
                    self.metrics.failover(down, route.instance);
                }
                route.instance.to_string()
            }
        };
        let provider = self.provider(&instance)?;
        if let Some(s) = &req.msdyn_devicesettings {
            let size = s.to_string().len();
            if size > 8000 {
                return Err(GatewayError::Invalid {
                    field: "msdyn_devicesettings".into(),
                    message: format!("{size} bytes; msdyn_devicesettings holds 8000"),
                });
            }
        }
        let new = NewDevice {
            name: req.msdyn_name.unwrap_or_else(|| device_id.to_string()),
            device_id,
            provider_instance: instance,
            category: req.msdyn_category,
            account: req.msdyn_account,
            settings: req.msdyn_devicesettings,
            tags: req.msdyn_tags,
            is_simulated: if req.msdyn_issimulated {
                IsSimulated::Yes
            } else {
                IsSimulated::No
            },
        };
        Ok((new, provider))
    }

    /// The error for a device the store refused to begin: a conflict with a device that is
    /// already Registered is [`GatewayError::AlreadyRegistered`] (an import run twice
    /// tells it apart from a real failure).
    async fn refused(&self, id: &DeviceId, e: StoreError) -> GatewayError {
        let StoreError::Conflict(message) = e else {
            return e.into();
        };
        match self.store.get_device(id).await {
            Ok(Some(d)) if d.registration_status == RegistrationStatus::Registered => {
                GatewayError::AlreadyRegistered(message)
            }
            _ => GatewayError::Conflict(message),
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
        if let Some(p) = self
            .live()
            .providers
            .get(&device.provider_instance)
            .cloned()
        {
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

    /// Field Service's Update Device Data: the device's provider hands it `settings` (a
    /// JSON object of at most [`MAX_DEVICE_SETTINGS_BYTES`]: twin desired properties,
    /// shadow desired state, a retained settings message...), then the settings are stored
    /// as the device's `msdyn_devicesettings`. Answers the device record. The device must
    /// exist (else NotFound) and be Registered (else Conflict); nothing is stored when the
    /// provider fails.
    pub async fn update_device_data(
        &self,
        raw_id: &str,
        settings: &serde_json::Value,
    ) -> Result<Device, GatewayError> {
        let id = parse_id(raw_id)?;
        if !settings.is_object() {
            return Err(GatewayError::Invalid {
                field: "msdyn_devicesettings".into(),
                message: format!(
                    "must be a JSON object of settings (e.g. {{\"interval\": 30}}), found {}",
                    json_kind(settings)
                ),
            });
        }
        let size = settings.to_string().len();
        if size > MAX_DEVICE_SETTINGS_BYTES {
            return Err(GatewayError::Invalid {
                field: "msdyn_devicesettings".into(),
                message: format!(
                    "{size} bytes; at most {MAX_DEVICE_SETTINGS_BYTES} bytes (8 KiB) of settings fit: send fewer or shorter settings"
                ),
            });
        }
        let device = self.store.get_device(&id).await?.ok_or_else(|| {
            GatewayError::NotFound(format!("device {id} not found: register it first"))
        })?;
        if device.registration_status != RegistrationStatus::Registered {
            return Err(GatewayError::Conflict(format!(
                "device {id} is {}: only a Registered device takes settings",
                device.registration_status.label()
            )));
        }
        let provider = self.provider(&device.provider_instance)?;
        provider.update_settings(&id, settings).await?;
        let stored = self.store.set_device_settings(&id, settings).await?;
        tracing::info!(device = %id, provider = %device.provider_instance, bytes = size, "device settings updated");
        Ok(stored)
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
        self.send_command_of(raw_id, name, parameters, None).await
    }

    /// Checks and stores a command (In Progress) without sending it.
    pub async fn create_command(
        &self,
        raw_id: &str,
        name: &str,
        parameters: &serde_json::Value,
    ) -> Result<Command, GatewayError> {
        self.create_command_of(raw_id, name, parameters, None).await
    }

    /// Stores a command as [`Self::create_command`] does, and sends it in the background;
    /// `request` ties it to a send-to-all request.
    pub async fn send_command_of(
        self: &Arc<Self>,
        raw_id: &str,
        name: &str,
        parameters: &serde_json::Value,
        request: Option<uuid::Uuid>,
    ) -> Result<Command, GatewayError> {
        let cmd = self
            .create_command_of(raw_id, name, parameters, request)
            .await?;
        let core = self.clone();
        let sending = cmd.clone();
        tokio::spawn(async move {
            crate::commands::claim_and_deliver(&core, &sending).await;
        });
        Ok(cmd)
    }

    async fn create_command_of(
        &self,
        raw_id: &str,
        name: &str,
        parameters: &serde_json::Value,
        request: Option<uuid::Uuid>,
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
        let provider = self.provider(&device.provider_instance)?;
        let message = self.live().rules.command_message(name, parameters);
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
                request_id: request,
            })
            .await?;
        Ok(cmd)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use iotgw_providers::{
        CommandOutcome, CommandRequest, EventSender, ProviderHealth, ProviderKind, ProviderLimits,
        Registration, Shutdown,
    };
    use iotgw_registry::{RegistrationAction, SqliteStore};

    use super::*;

    /// A provider that counts the registrations in flight, fails ids starting with `fail-`
    /// and hands out credentials to ids starting with `cred-`.
    struct Counting {
        name: iotgw_providers::InstanceName,
        limits: ProviderLimits,
        in_flight: AtomicUsize,
        most_in_flight: AtomicUsize,
        calls: AtomicUsize,
    }

    impl Counting {
        fn new() -> Self {
            Self {
                name: "local".into(),
                limits: ProviderLimits {
                    max_telemetry_bytes: 1024,
                    max_command_bytes: 1024,
                },
                in_flight: AtomicUsize::new(0),
                most_in_flight: AtomicUsize::new(0),
                calls: AtomicUsize::new(0),
            }
        }
    }

    #[async_trait::async_trait]
    impl Provider for Counting {
        fn instance(&self) -> &iotgw_providers::InstanceName {
            &self.name
        }
        fn kind(&self) -> ProviderKind {
            ProviderKind::Mqtt
        }
        fn limits(&self) -> &ProviderLimits {
            &self.limits
        }
        fn health(&self) -> ProviderHealth {
            ProviderHealth {
                connected: true,
                since: Utc::now(),
                last_error: None,
                receiving: true,
            }
        }
        async fn register(&self, spec: &DeviceSpec) -> Result<Registration, ProviderError> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
            self.most_in_flight.fetch_max(now, Ordering::SeqCst);
            // Let every other registration the batch allows start before this one ends.
            tokio::task::yield_now().await;
            self.in_flight.fetch_sub(1, Ordering::SeqCst);
            let id = spec.device_id.as_str();
            if id.starts_with("fail-") {
                return Err(ProviderError::Transient {
                    instance: "local".into(),
                    message: format!("the broker refused {id}"),
                });
            }
            Ok(Registration {
                message: Some(format!("created {id}")),
                credentials: id
                    .starts_with("cred-")
                    .then(|| serde_json::json!({"password": format!("pw-{id}")})),
            })
        }
        async fn unregister(&self, _: &DeviceId) -> Result<(), ProviderError> {
            Ok(())
        }
        async fn send_command(&self, _: &CommandRequest) -> Result<CommandOutcome, ProviderError> {
            Ok(CommandOutcome::Published)
        }
        async fn device_state(&self, _: &DeviceId) -> Result<DeviceState, ProviderError> {
            Ok(DeviceState::default())
        }
        async fn update_settings(
            &self,
            _: &DeviceId,
            settings: &serde_json::Value,
        ) -> Result<(), ProviderError> {
            if settings.get("refuse").is_some() {
                return Err(ProviderError::Unsupported {
                    instance: "local".into(),
                    what: "settings named refuse".into(),
                });
            }
            Ok(())
        }
        async fn run(&self, _: EventSender, _: Shutdown) -> Result<(), ProviderError> {
            Ok(())
        }
    }

    async fn core_with(provider: Arc<Counting>) -> Core {
        use iotgw_config::Config;
        let config = Config::embedded_default();
        let store = SqliteStore::memory().await.expect("in-memory store");
        let mut providers: BTreeMap<String, Arc<dyn Provider>> = BTreeMap::new();
        providers.insert("local".into(), provider);
        let mut config = config;
        config.sinks.clear();
        Core::new(
            Arc::new(store),
            Arc::new(Metrics::new()),
            Arc::new(Notify::new()),
            "test".into(),
            Live::new(1, Arc::new(config), providers),
        )
    }

    fn req(id: &str) -> RegisterRequest {
        RegisterRequest {
            msdyn_deviceid: id.into(),
            msdyn_category: Some("meters".into()),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn register_many_answers_each_request_at_its_index() {
        let provider = Arc::new(Counting::new());
        let core = core_with(provider.clone()).await;
        core.register(req("old-1")).await.expect("old-1 registered");
        let answers = core
            .register_many(vec![
                req("ok-1"),
                req("old-1"),
                req("fail-1"),
                req("not valid!"),
                req("cred-1"),
                RegisterRequest {
                    msdyn_iotproviderinstance: Some("nowhere".into()),
                    ..req("ok-2")
                },
                req("ok-1"),
            ])
            .await;
        assert_eq!(answers.len(), 7, "one answer per request");
        let ok = answers[0].as_ref().expect("ok-1 registered");
        assert_eq!(
            ok.device.registration_status,
            RegistrationStatus::Registered
        );
        assert_eq!(
            ok.device.registration_message.as_deref(),
            Some("created ok-1")
        );
        assert!(ok.credentials.is_none());
        assert!(
            matches!(&answers[1], Err(GatewayError::AlreadyRegistered(m)) if m.contains("unregister it first")),
            "{:?}",
            answers[1]
        );
        assert!(
            matches!(&answers[2], Err(GatewayError::Provider(ProviderError::Transient { message, .. })) if message.contains("fail-1")),
            "{:?}",
            answers[2]
        );
        assert!(
            matches!(&answers[3], Err(GatewayError::Invalid { field, .. }) if field == "msdyn_deviceid"),
            "{:?}",
            answers[3]
        );
        let cred = answers[4].as_ref().expect("cred-1 registered");
        assert_eq!(
            cred.credentials,
            Some(serde_json::json!({"password": "pw-cred-1"}))
        );
        assert!(
            matches!(&answers[5], Err(GatewayError::Invalid { field, .. }) if field == "msdyn_iotproviderinstance"),
            "{:?}",
            answers[5]
        );
        assert!(
            matches!(&answers[6], Err(GatewayError::Conflict(m)) if m.contains("In Progress")),
            "a repeated id is refused, not registered twice: {:?}",
            answers[6]
        );
        assert_eq!(
            provider.calls.load(Ordering::SeqCst),
            4,
            "the provider is called for old-1 once, then ok-1, fail-1 and cred-1"
        );

        let failed = core
            .store
            .get_device(&DeviceId::parse("fail-1").expect("id"))
            .await
            .expect("get")
            .expect("fail-1 stored");
        assert_eq!(failed.registration_status, RegistrationStatus::Error);
        assert!(failed
            .registration_message
            .as_deref()
            .is_some_and(|m| m.contains("the broker refused fail-1")));
        let history = core
            .store
            .history(&DeviceId::parse("ok-1").expect("id"))
            .await
            .expect("history");
        assert_eq!(
            history.iter().map(|h| h.action).collect::<Vec<_>>(),
            vec![RegistrationAction::Register]
        );
        let categories = core.store.list_categories().await.expect("categories");
        assert_eq!(categories.len(), 1, "{categories:?}");
    }

    #[tokio::test]
    async fn register_many_keeps_at_most_the_provider_concurrency_in_flight() {
        let provider = Arc::new(Counting::new());
        let core = core_with(provider.clone()).await;
        let reqs = (0..100).map(|n| req(&format!("dev-{n:03}"))).collect();
        let answers = core.register_many(reqs).await;
        assert!(answers.iter().all(Result::is_ok));
        assert_eq!(provider.calls.load(Ordering::SeqCst), 100);
        assert_eq!(
            provider.most_in_flight.load(Ordering::SeqCst),
            PROVIDER_CONCURRENCY,
            "the batch fills the concurrency bound and never exceeds it"
        );
    }

    #[tokio::test]
    async fn update_device_data_checks_the_settings_and_the_device_then_stores_them() {
        let core = core_with(Arc::new(Counting::new())).await;
        core.register(req("ok-1")).await.expect("ok-1 registered");
        let _ = core.register(req("fail-1")).await;
        let settings = serde_json::json!({"interval": 30, "mode": "eco"});
        let device = core
            .update_device_data("ok-1", &settings)
            .await
            .expect("settings updated");
        assert_eq!(device.settings.as_ref(), Some(&settings));

        let invalid = |r: Result<Device, GatewayError>| match r {
            Err(GatewayError::Invalid { field, message }) => {
                assert_eq!(field, "msdyn_devicesettings");
                message
            }
            other => panic!("expected Invalid, got {other:?}"),
        };
        let m = invalid(
            core.update_device_data("ok-1", &serde_json::json!([1]))
                .await,
        );
        assert!(m.contains("JSON object") && m.contains("array"), "{m}");
        let big = serde_json::json!({"blob": "x".repeat(MAX_DEVICE_SETTINGS_BYTES)});
        let m = invalid(core.update_device_data("ok-1", &big).await);
        assert!(m.contains("8192"), "names the limit: {m}");
        assert!(matches!(
            core.update_device_data("nobody", &settings).await,
            Err(GatewayError::NotFound(m)) if m.contains("register it first")
        ));
        assert!(matches!(
            core.update_device_data("fail-1", &settings).await,
            Err(GatewayError::Conflict(m)) if m.contains("Registered")
        ));
        assert!(matches!(
            core.update_device_data("ok-1", &serde_json::json!({"refuse": 1}))
                .await,
            Err(GatewayError::Provider(ProviderError::Unsupported { .. }))
        ));
        let stored = core
            .store
            .get_device(&DeviceId::parse("ok-1").expect("id"))
            .await
            .expect("get")
            .expect("ok-1");
        assert_eq!(
            stored.settings.as_ref(),
            Some(&settings),
            "a provider failure stores nothing"
        );
    }
}
