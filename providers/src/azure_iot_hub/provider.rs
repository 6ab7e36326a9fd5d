//! [`AzureIotHubProvider`]: the [`Provider`] implementation of one Azure IoT Hub, and only
//! that: registration is [`super::registry`]'s, commands [`super::commands`]', the
//! receive paths [`super::receive`]'s (with [`super::event_hubs`]); device state is the
//! twin read over [`super::rest::HubClient`] and decoded by [`super::inbound`].

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use iotgw_config::azure_iot_hub::{AzureCommandDelivery, ServiceConnectionString};
use iotgw_config::AzureIotHubConfig;
use iotgw_ids::DeviceId;

use super::c2d::C2dSender;
use super::event_hubs::{
    Checkpoints, EventSource, MemoryCheckpoints, MemoryOwnership, PartitionOwnership,
};
use super::rest::HubClient;
use super::state::{lock, Shared};

/// This gateway's name in its partition claims until the gateway names the replica
/// ([`Provider::set_ownership`]): alone, it reads every partition.
pub const LOCAL_OWNER: &str = "local";
use crate::observed::HealthCell;
use crate::{
    CommandOutcome, CommandRequest, DeviceSpec, DeviceState, EventSender, InstanceName, Provider,
    ProviderError, ProviderHealth, ProviderKind, ProviderLimits, PushEndpoint, Registration,
    Shutdown, CFS_MAX_COMMAND_BYTES,
};

/// The Azure IoT Hub provider.
///
/// Built with [`AzureIotHubProvider::new`]; every REST call signs with a cached SAS token.
/// [`Provider::run`] must be active for the Event Grid endpoint to accept events.
pub struct AzureIotHubProvider {
    pub(super) shared: Arc<Shared>,
}

impl AzureIotHubProvider {
    /// Parses the connection string, checks the settings and builds the HTTPS client.
    /// Connects nothing: [`Provider::run`] proves the credentials.
    ///
    /// Errors are [`ProviderError::InvalidInput`] naming the config key (and, for the
    /// connection string, the part that is wrong — never the key itself).
    pub fn new(instance: &InstanceName, config: &AzureIotHubConfig) -> Result<Self, ProviderError> {
        let invalid = |field: &str, message: String| ProviderError::InvalidInput {
            instance: instance.to_string(),
            field: field.to_owned(),
            message,
        };
        let raw = config.connection_string.as_ref().ok_or_else(|| {
            invalid(
                "connection_string",
                "missing: set the hub's service connection string (IOTGW_PROVIDERS__<NAME>__CONNECTION_STRING)".into(),
            )
        })?;
        let cs = ServiceConnectionString::parse(raw.expose())
            .map_err(|e| invalid("connection_string", format!("the connection string's {e}")))?;
        let mut problems = Vec::new();
        let dm = &config.direct_method;
        if !(5..=300).contains(&dm.response_timeout_secs) {
            problems.push((
                "direct_method.response_timeout_secs",
                format!("{} is outside 5..=300", dm.response_timeout_secs),
            ));
        }
        if dm.connect_timeout_secs > 300 {
            problems.push((
                "direct_method.connect_timeout_secs",
                format!("{} is above 300", dm.connect_timeout_secs),
            ));
        }
        if dm.offline_retry_secs > 0 && dm.offline_retry_interval_secs == 0 {
            problems.push((
                "direct_method.offline_retry_interval_secs",
                "must be above 0 when offline_retry_secs is set".into(),
            ));
        }
        if config.twin_command.property.is_empty() || config.twin_command.property.starts_with('$')
        {
            problems.push((
                "twin_command.property",
                format!(
                    "`{}` is not a usable desired property name",
                    config.twin_command.property
                ),
            ));
        }
        if let Some((field, message)) = problems.into_iter().next() {
            return Err(invalid(field, message));
        }
        let hub = HubClient::new(instance, &cs, config)?;
        let c2d = match config.command_delivery {
            AzureCommandDelivery::C2d => Some(C2dSender::new(instance, &cs, config)?),
            _ => None,
        };
        Ok(Self {
            shared: Arc::new(Shared {
                instance: instance.to_owned(),
                config: config.clone(),
                hub,
                limits: ProviderLimits {
                    max_telemetry_bytes: config.max_telemetry_bytes,
                    max_command_bytes: CFS_MAX_COMMAND_BYTES,
                },
                health: HealthCell::new(),
                events: Mutex::new(None),
                running: AtomicBool::new(false),
                connection_seq: Arc::default(),
                c2d,
                event_source: Mutex::new(None),
                checkpoints: Mutex::new(Arc::new(MemoryCheckpoints::default())),
                ownership: Mutex::new((
                    Arc::new(MemoryOwnership::default()),
                    LOCAL_OWNER.to_owned(),
                )),
            }),
        })
    }

    /// Sets the reader of the hub's Event Hubs-compatible endpoint, consumed by
    /// [`Provider::run`] when `event_hubs` is configured. Without it, a build with the
    /// `azure_event_hubs` feature reads the endpoint with the official client
    /// (`event_hubs_client::AmqpEventSource`); tests inject their own.
    pub fn set_event_source(&self, source: Arc<dyn EventSource>) {
        *lock(&self.shared.event_source) = Some(source);
    }

    /// The REST client (for callers that need an operation the trait does not name, e.g.
    /// `GET /devices/{id}`).
    pub fn hub(&self) -> &HubClient {
        &self.shared.hub
    }

    /// Registers many devices with IoT Hub's bulk registry operation (`POST /devices`, at
    /// most 100 per call), then writes tags and desired settings to the twins of the devices
    /// that have them. Returns one result per spec, in order: the device connection string
    /// for new devices; a device that already exists goes through [`Provider::register`]
    /// (which returns its existing keys), and so does every device of a batch the hub did
    /// not fully accept.
    pub async fn register_many(
        &self,
        specs: &[DeviceSpec],
    ) -> Vec<Result<Registration, ProviderError>> {
        self.shared.register_many(specs).await
    }
}

#[async_trait]
impl Provider for AzureIotHubProvider {
    /// Update Device Data: the settings become the twin's desired properties
    /// (`PATCH /twins/{id}` with `{"properties":{"desired": settings}}` and `If-Match: "*"`;
    /// IoT Hub merges them into the desired properties already there, a property set to
    /// null is removed). Settings that are not a JSON object are refused.
    async fn update_settings(
        &self,
        id: &DeviceId,
        settings: &serde_json::Value,
    ) -> Result<(), ProviderError> {
        let Some(desired) = settings.as_object() else {
            return Err(ProviderError::InvalidInput {
                instance: self.shared.instance.to_string(),
                field: "msdyn_devicesettings".into(),
                message:
                    "IoT Hub desired properties must be a JSON object, e.g. {\"interval_s\": 30}"
                        .into(),
            });
        };
        let patch = super::rest::Twin {
            properties: Some(super::rest::TwinProperties {
                desired: Some(desired.clone()),
                reported: None,
            }),
            ..super::rest::Twin::default()
        };
        self.shared
            .hub
            .update_twin(id.as_str(), &patch)
            .await
            .map_err(|e| self.shared.fail(e))?;
        self.shared.ok();
        Ok(())
    }

    fn instance(&self) -> &InstanceName {
        &self.shared.instance
    }

    fn kind(&self) -> ProviderKind {
        ProviderKind::AzureIotHub
    }

    fn limits(&self) -> &ProviderLimits {
        &self.shared.limits
    }

    fn health(&self) -> ProviderHealth {
        self.shared.health.get()
    }

    /// Where the Event Hubs consumer keeps its checkpoints (default: memory, so a restart
    /// starts at `event_hubs.start`); the gateway passes checkpoints kept in its store.
    fn set_checkpoints(&self, checkpoints: Arc<dyn Checkpoints>) {
        *lock(&self.shared.checkpoints) = checkpoints;
    }

    /// Where the Event Hubs consumer claims its partitions and as whom (default: in memory,
    /// as [`LOCAL_OWNER`], so this gateway reads every partition); the gateway passes claims
    /// kept in its store and the replica's identity, so replicas split the partitions.
    fn set_ownership(&self, ownership: Arc<dyn PartitionOwnership>, owner: &str) {
        *lock(&self.shared.ownership) = (ownership, owner.to_owned());
    }

    /// Creates a symmetric-key device with generated keys (`PUT /devices/{id}`, no
    /// `If-Match`), then writes tags and desired settings to its twin (`PATCH /twins/{id}`).
    /// A device that exists already keeps its keys (re-enabled with `If-Match` on its etag
    /// if it was disabled). The device connection string is returned once in
    /// `credentials.connection_string` and not kept.
    async fn register(&self, spec: &DeviceSpec) -> Result<Registration, ProviderError> {
        self.shared.register(spec).await
    }

    /// `DELETE /devices/{id}` with `If-Match: "*"`. A device IoT Hub does not know is
    /// [`ProviderError::NotFound`].
    async fn unregister(&self, id: &DeviceId) -> Result<(), ProviderError> {
        self.shared.unregister(id).await
    }

    /// Per `command_delivery`: a direct method (the device's answer decides: 2xx is
    /// Delivered, another status an error with it; an offline device is `NotFound` with
    /// the reason, or is retried for `direct_method.offline_retry_secs`), a desired property
    /// (Published), or a C2D message over AMQP (Published).
    async fn send_command(&self, cmd: &CommandRequest) -> Result<CommandOutcome, ProviderError> {
        super::commands::send(&self.shared, cmd).await
    }

    /// From the twin (`GET /twins/{id}`): connection state, reported properties (without
    /// `$metadata`/`$version`), last activity.
    async fn device_state(&self, id: &DeviceId) -> Result<DeviceState, ProviderError> {
        let twin = self
            .shared
            .hub
            .get_twin(id.as_str())
            .await
            .map_err(|e| self.shared.fail(e))?;
        self.shared.ok();
        Ok(super::inbound::device_state(twin))
    }

    /// Proves the credentials (`GET /statistics/service`, retried while the hub is
    /// unreachable), then keeps the event sender for the Event Grid endpoint and runs the
    /// Event Hubs consumer and, with `command_delivery = "c2d"`, the C2D delivery feedback
    /// receiver until `shutdown`. Returns `Err` when the hub refuses the
    /// credentials or when `run` is already active.
    async fn run(&self, events: EventSender, shutdown: Shutdown) -> Result<(), ProviderError> {
        if !self.shared.try_start() {
            return Err(ProviderError::Conflict {
                instance: self.shared.instance.to_string(),
                message: "run is already active for this instance; call it once".into(),
            });
        }
        // Released however the loop ends (a panic or a dropped future too), so the
        // gateway's supervisor can start it again.
        let _stopped = crate::on_drop::OnDrop::new(|| self.shared.stopped());
        super::receive::run(&self.shared, events, shutdown).await
    }

    fn push_endpoint(&self) -> Option<Arc<dyn PushEndpoint>> {
        self.shared.config.event_grid.as_ref()?;
        Some(Arc::new(super::receive::EventGridEndpoint::new(
            self.shared.clone(),
        )))
    }
}
