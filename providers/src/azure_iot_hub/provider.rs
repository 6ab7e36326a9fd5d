//! [`AzureIotHubProvider`]: the [`Provider`] of one Azure IoT Hub.
//!
//! This file holds the request/response side of the trait (registration, device state,
//! commands) over [`super::rest::HubClient`], and `run`, which proves the credentials,
//! keeps the event sender for the Event Grid endpoint ([`super::event_grid`]) and waits for
//! shutdown.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use base64::Engine as _;
use iotgw_config::azure_iot_hub::{AzureCommandDelivery, EventHubsStart, ServiceConnectionString};
use iotgw_config::AzureIotHubConfig;
use iotgw_ids::DeviceId;
use rand::RngCore as _;
use serde_json::{json, Map, Value};

use super::c2d::C2dSender;
use super::event_hubs::{Checkpoints, Consumer, EventSource, MemoryCheckpoints, Position};
use super::models::{
    parse_time, without_metadata, Authentication, Capabilities, CloudToDeviceMethod, Device,
    ExportImportDevice, Twin, TwinProperties,
};
use super::rest::{HubClient, HubError, BULK_MAX};
use super::state::{lock, Shared};
use crate::observed::HealthCell;
use crate::{
    CommandOutcome, CommandRequest, DeviceSpec, DeviceState, EventSender, InstanceName, Provider,
    ProviderError, ProviderHealth, ProviderKind, ProviderLimits, PushEndpoint, Registration,
    Shutdown, CFS_MAX_COMMAND_BYTES,
};

/// Delay between two credential probes while the hub is unreachable at start.
const PROBE_RETRY: Duration = Duration::from_secs(5);

/// The Azure IoT Hub provider.
///
/// Built with [`AzureIotHubProvider::new`]; every REST call signs with a cached SAS token.
/// [`Provider::run`] must be active for the Event Grid endpoint to accept events.
pub struct AzureIotHubProvider {
    pub(super) shared: Arc<Shared>,
}

/// 32 random bytes, base64: a device key as the portal generates them.
fn generate_key() -> String {
    let mut k = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut k);
    base64::engine::general_purpose::STANDARD.encode(k)
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
        let mut out = Vec::with_capacity(specs.len());
        for chunk in specs.chunks(BULK_MAX) {
            let keys: Vec<(String, String)> = chunk
                .iter()
                .map(|_| (generate_key(), generate_key()))
                .collect();
            let ops: Vec<ExportImportDevice> = chunk
                .iter()
                .zip(&keys)
                .map(|(s, (pk, sk))| ExportImportDevice {
                    id: s.device_id.as_str().to_owned(),
                    import_mode: "create".into(),
                    status: Some("enabled".into()),
                    authentication: Some(Authentication::sas(pk, sk)),
                })
                .collect();
            let result = match self.shared.hub.bulk(&ops).await {
                Ok(r) => r,
                Err(e) => {
                    let e = self.shared.fail(e);
                    out.extend(chunk.iter().map(|_| Err(e.clone())));
                    continue;
                }
            };
            self.shared.ok();
            let failed: HashMap<&str, &super::models::DeviceRegistryOperationError> = result
                .errors
                .iter()
                .map(|e| (e.device_id.as_str(), e))
                .collect();
            for (spec, (pk, _)) in chunk.iter().zip(&keys) {
                let id = spec.device_id.as_str();
                let r = match failed.get(id) {
                    Some(err)
                        if code_text(&err.error_code).contains("AlreadyExists")
                            || code_text(&err.error_code) == "409001" =>
                    {
                        self.register(spec).await
                    }
                    // The hub does not document whether the other devices of a failed
                    // batch were created: register them one by one (a 409 then returns
                    // the keys the batch gave them).
                    None if !result.is_successful => self.register(spec).await,
                    Some(err) => Err(ProviderError::InvalidInput {
                        instance: self.shared.instance.to_string(),
                        field: "msdyn_deviceid".into(),
                        message: format!(
                            "bulk registration of device {id} failed ({}): {}",
                            code_text(&err.error_code),
                            err.error_status
                        ),
                    }),
                    None => match self.shared.apply_twin(spec).await {
                        Ok(()) => {
                            Ok(self
                                .shared
                                .registration(id, pk, "registered in IoT Hub (bulk)"))
                        }
                        Err(e) => Err(e),
                    },
                };
                out.push(r);
            }
        }
        out
    }
}

fn code_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

impl Shared {
    /// Reads the Event Hubs-compatible endpoint until `stop` (or waits for `stop` when
    /// `event_hubs` is not configured).
    async fn consume(&self, stop: &Shutdown) -> Result<(), ProviderError> {
        let s = self;
        let Some(eh) = &s.config.event_hubs else {
            stop.cancelled().await;
            return Ok(());
        };
        let injected = lock(&s.event_source).clone();
        #[cfg(feature = "azure_event_hubs")]
        let source: Arc<dyn EventSource> = injected.unwrap_or_else(|| {
            Arc::new(super::event_hubs_client::AmqpEventSource::new(
                &s.instance,
                eh,
            ))
        });
        #[cfg(not(feature = "azure_event_hubs"))]
        let Some(source) = injected
        else {
            return Err(ProviderError::Unsupported {
                instance: s.instance.to_string(),
                what: "event_hubs: this build has no Event Hubs client; rebuild with `--features azure_event_hubs` (cargo build -p iotgw --features azure_event_hubs), or remove event_hubs and use event_grid".into(),
            });
        };
        let consumer = Arc::new(Consumer {
            instance: s.instance.to_string(),
            key_prefix: format!("{}/{}", s.instance, eh.consumer_group),
            start: match eh.start {
                EventHubsStart::Earliest => Position::Earliest,
                EventHubsStart::Latest => Position::Latest,
            },
            checkpoints: lock(&s.checkpoints).clone(),
            connection_seq: s.connection_seq.clone(),
            retry: PROBE_RETRY,
        });
        let sender = lock(&s.events).clone();
        match sender {
            Some(tx) => consumer.run(source, tx, stop.clone()).await,
            None => Ok(()),
        }
    }

    pub(super) fn set_connected(&self, connected: bool) {
        self.health.set_connected(connected);
    }

    /// A failed call: transport and credential failures mean the hub is not reachable
    /// as configured; other errors (a missing device, a conflict) leave the state alone.
    fn note_error(&self, e: &ProviderError) {
        if matches!(
            e,
            ProviderError::Transient { .. } | ProviderError::Unauthorized { .. }
        ) {
            self.health.set_error(e.to_string());
        } else {
            self.health.note_error(e.to_string());
        }
    }

    /// Classifies a failed call and records transport-level failures in the health.
    fn fail(&self, e: HubError) -> ProviderError {
        let e = self.hub.classify(e);
        self.note_error(&e);
        e
    }

    /// A successful call: the hub is reachable and accepts the credentials.
    fn ok(&self) {
        if self.running.load(Ordering::Acquire) {
            self.set_connected(true);
        }
    }

    fn registration(&self, id: &str, primary_key: &str, message: &str) -> Registration {
        let host = self.hub.host();
        Registration {
            message: Some(format!("{message}: {host}")),
            credentials: Some(json!({
                "kind": "azure_iot_hub_sas",
                "connection_string": format!("HostName={host};DeviceId={id};SharedAccessKey={primary_key}"),
            })),
        }
    }

    /// Writes the spec's tags and desired settings to the twin (`PATCH /twins/{id}`), if any.
    async fn apply_twin(&self, spec: &DeviceSpec) -> Result<(), ProviderError> {
        let Some(patch) = self.twin_patch(spec)? else {
            return Ok(());
        };
        self.hub
            .update_twin(spec.device_id.as_str(), &patch)
            .await
            .map_err(|e| self.fail(e))?;
        Ok(())
    }

    fn twin_patch(&self, spec: &DeviceSpec) -> Result<Option<Twin>, ProviderError> {
        let desired = match &spec.settings {
            None | Some(Value::Null) => None,
            Some(Value::Object(m)) => Some(m.clone()),
            Some(_) => return Err(ProviderError::InvalidInput {
                instance: self.instance.to_string(),
                field: "msdyn_devicesettings".into(),
                message:
                    "IoT Hub desired properties must be a JSON object, e.g. {\"interval_s\": 30}"
                        .into(),
            }),
        };
        if desired.is_none() && spec.tags.is_empty() {
            return Ok(None);
        }
        Ok(Some(Twin {
            tags: (!spec.tags.is_empty()).then(|| tags_json(&spec.tags)),
            properties: desired.map(|d| TwinProperties {
                desired: Some(d),
                reported: None,
            }),
            ..Twin::default()
        }))
    }

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

fn tags_json(tags: &BTreeMap<String, String>) -> Map<String, Value> {
    tags.iter()
        .map(|(k, v)| (k.clone(), Value::String(v.clone())))
        .collect()
}

#[async_trait]
impl Provider for AzureIotHubProvider {
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

    /// Creates a symmetric-key device with generated keys (`PUT /devices/{id}`, no
    /// `If-Match`), then writes tags and desired settings to its twin (`PATCH /twins/{id}`).
    /// A device that exists already keeps its keys (re-enabled with `If-Match` on its etag
    /// if it was disabled). The device connection string is returned once in
    /// `credentials.connection_string` and not kept.
    async fn register(&self, spec: &DeviceSpec) -> Result<Registration, ProviderError> {
        let s = &self.shared;
        let id = spec.device_id.as_str();
        let patch = s.twin_patch(spec)?;
        let device = Device {
            device_id: id.to_owned(),
            status: Some("enabled".into()),
            authentication: Some(Authentication::sas(&generate_key(), &generate_key())),
            capabilities: Some(Capabilities { iot_edge: false }),
            ..Device::default()
        };
        let (created, note) = match s.hub.create_device(&device).await {
            Ok(d) => (d, "registered in IoT Hub"),
            Err(e) if e.failure().is_some_and(|f| f.already_exists()) => {
                let existing = s.hub.get_device(id).await.map_err(|e| s.fail(e))?;
                if existing
                    .authentication
                    .as_ref()
                    .and_then(Authentication::primary_key)
                    .is_none()
                {
                    return Err(ProviderError::Conflict {
                        instance: s.instance.to_string(),
                        message: format!(
                            "device {id} exists in IoT Hub without symmetric keys (X.509 or none); iotgw registers symmetric-key devices: delete it or use another id"
                        ),
                    });
                }
                if existing.status.as_deref() == Some("disabled") {
                    let etag = existing.etag.clone().unwrap_or_else(|| "*".into());
                    let update = Device {
                        device_id: id.to_owned(),
                        status: Some("enabled".into()),
                        authentication: existing.authentication.clone(),
                        capabilities: existing.capabilities.clone(),
                        ..Device::default()
                    };
                    (
                        s.hub
                            .update_device(&update, &etag)
                            .await
                            .map_err(|e| s.fail(e))?,
                        "re-enabled in IoT Hub with its existing keys",
                    )
                } else {
                    (
                        existing,
                        "already registered in IoT Hub; its existing keys are returned",
                    )
                }
            }
            Err(e) => return Err(s.fail(e)),
        };
        s.ok();
        let key = created
            .authentication
            .as_ref()
            .and_then(Authentication::primary_key)
            .or_else(|| {
                device
                    .authentication
                    .as_ref()
                    .and_then(Authentication::primary_key)
            })
            .unwrap_or_default()
            .to_owned();
        if let Some(patch) = patch {
            s.hub.update_twin(id, &patch).await.map_err(|e| s.fail(e))?;
        }
        Ok(s.registration(id, &key, note))
    }

    /// `DELETE /devices/{id}` with `If-Match: "*"`. A device IoT Hub does not know is
    /// [`ProviderError::NotFound`].
    async fn unregister(&self, id: &DeviceId) -> Result<(), ProviderError> {
        self.shared
            .hub
            .delete_device(id.as_str())
            .await
            .map_err(|e| self.shared.fail(e))?;
        self.shared.ok();
        Ok(())
    }

    /// Per `command_delivery`: a direct method (the device's answer decides: 2xx is
    /// Delivered, another status an error with it; an offline device is `NotFound` with
    /// the reason, or is retried for `direct_method.offline_retry_secs`), a desired property
    /// (Published), or a C2D message over AMQP (Published).
    async fn send_command(&self, cmd: &CommandRequest) -> Result<CommandOutcome, ProviderError> {
        let s = &self.shared;
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
        Ok(DeviceState {
            connected: twin
                .connection_state
                .as_deref()
                .map(|c| c.eq_ignore_ascii_case("connected")),
            reported_properties: twin
                .properties
                .and_then(|p| p.reported)
                .map(|r| Value::Object(without_metadata(&r))),
            last_activity: twin.last_activity_time.as_deref().and_then(parse_time),
        })
    }

    /// Proves the credentials (`GET /statistics/service`, retried while the hub is
    /// unreachable), then keeps the event sender for the Event Grid endpoint and runs the
    /// Event Hubs consumer and, with `command_delivery = "c2d"`, the C2D delivery feedback
    /// receiver until `shutdown`. Returns `Err` when the hub refuses the
    /// credentials or when `run` is already active.
    async fn run(&self, events: EventSender, shutdown: Shutdown) -> Result<(), ProviderError> {
        let s = &self.shared;
        if s.running
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return Err(ProviderError::Conflict {
                instance: s.instance.to_string(),
                message: "run is already active for this instance; call it once".into(),
            });
        }
        *lock(&s.events) = Some(events);
        let result = async {
            loop {
                match s.hub.service_statistics().await {
                    Ok(_) => {
                        s.set_connected(true);
                        tracing::info!(provider = %s.instance, host = %s.hub.host(), "IoT Hub reachable, credentials accepted");
                        break;
                    }
                    Err(e) => {
                        let e = s.fail(e);
                        if matches!(e, ProviderError::Unauthorized { .. }) {
                            return Err(e);
                        }
                        tracing::warn!(provider = %s.instance, error = %e, "IoT Hub not reachable yet; retrying");
                        tokio::select! {
                            () = shutdown.cancelled() => return Ok(()),
                            () = tokio::time::sleep(PROBE_RETRY) => {}
                        }
                    }
                }
            }
            // C2D delivery feedback beside the Event Hubs consumer; either one failing for
            // good (refused credentials) ends `run`.
            let stop = shutdown.child_token();
            let feedback = async {
                let sender = lock(&s.events).clone();
                let r = match (&s.c2d, sender) {
                    (Some(c2d), Some(tx)) => c2d.run_feedback(tx, stop.clone()).await,
                    _ => Ok(()),
                };
                if r.is_err() {
                    stop.cancel();
                }
                r
            };
            let consume = async {
                let r = s.consume(&stop).await;
                stop.cancel();
                r
            };
            let (consumed, fed) = tokio::join!(consume, feedback);
            consumed.and(fed)
        }
        .await;
        *lock(&s.events) = None;
        s.set_connected(false);
        s.running.store(false, Ordering::Release);
        result
    }

    fn push_endpoint(&self) -> Option<Arc<dyn PushEndpoint>> {
        self.shared.config.event_grid.as_ref()?;
        Some(Arc::new(super::event_grid::EventGridEndpoint::new(
            self.shared.clone(),
        )))
    }
}
