//! The provider contract: one trait in front of every cloud, and one module per cloud.
//!
//! # Layout
//! - this file: [`Provider`], its request/response types, [`ProviderEvent`] with its
//!   [`AckHandle`], [`ProviderError`].
//! - `mqtt`: plain MQTT 5 on rumqttc (feature `mqtt`).
//! - `aws_iot_core`, `gcp_pubsub`, `azure_iot_hub`: one module per cloud, each behind the
//!   Cargo feature of the same name, each exposing
//!   `pub async fn build(instance: &InstanceName, config: &<Kind>Config) -> Result<Arc<dyn Provider>, ProviderError>`.
//!
//! A provider owns its connections and reconnects on its own. It never touches the store:
//! it yields normalized events and the gateway acks each one only after its effects are
//! committed, so a crash between receive and commit redelivers instead of losing.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use chrono::{DateTime, Utc};
pub use iotgw_ids::{DeviceId, InstanceName};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

#[cfg(feature = "aws_iot_core")]
pub mod aws_iot_core;
#[cfg(feature = "azure_iot_hub")]
pub mod azure_iot_hub;
#[cfg(test)]
mod decode_props;
#[cfg(feature = "gcp_pubsub")]
pub mod gcp_pubsub;
#[cfg(feature = "mqtt")]
pub mod mqtt;
#[cfg(any(
    feature = "mqtt",
    feature = "aws_iot_core",
    feature = "gcp_pubsub",
    feature = "azure_iot_hub"
))]
mod observed;
mod on_drop;
#[cfg(feature = "mqtt")]
mod tls;

pub use tokio_util::sync::CancellationToken as Shutdown;

/// The kinds of provider iotgw knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProviderKind {
    /// Plain MQTT 5 broker.
    Mqtt,
    /// AWS IoT Core.
    AwsIotCore,
    /// Google Cloud Pub/Sub.
    GcpPubSub,
    /// Azure IoT Hub.
    AzureIotHub,
}

impl ProviderKind {
    /// The config spelling.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Mqtt => "mqtt",
            Self::AwsIotCore => "aws_iot_core",
            Self::GcpPubSub => "gcp_pubsub",
            Self::AzureIotHub => "azure_iot_hub",
        }
    }
}

impl fmt::Display for ProviderKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a provider accepts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ProviderLimits {
    /// Largest telemetry payload processed; larger ones are dead-lettered.
    pub max_telemetry_bytes: usize,
    /// Largest command payload sent (Field Service's `msdyn_message` holds 8192).
    pub max_command_bytes: usize,
}

/// Field Service's `msdyn_message` column size: no command may be larger.
pub const CFS_MAX_COMMAND_BYTES: usize = 8192;

/// A device to register with a provider.
#[derive(Clone, Debug, PartialEq)]
pub struct DeviceSpec {
    /// The canonical id.
    pub device_id: DeviceId,
    /// Display name.
    pub name: String,
    /// Category (AWS maps it to a thing type).
    pub category: Option<String>,
    /// Tags (AWS thing attributes, Azure twin tags).
    pub tags: BTreeMap<String, String>,
    /// Desired settings.
    pub settings: Option<serde_json::Value>,
}

/// What registration produced.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Registration {
    /// A note for `msdyn_registrationmessage`.
    pub message: Option<String>,
    /// Credentials for the device, handed out once in the registration response and never
    /// stored or logged (a password, a certificate and key, a connection string).
    pub credentials: Option<serde_json::Value>,
}

/// A command to deliver.
#[derive(Clone, Debug, PartialEq)]
pub struct CommandRequest {
    /// The command record id.
    pub id: Uuid,
    /// Target.
    pub device_id: DeviceId,
    /// Command name.
    pub name: String,
    /// JSON text to send.
    pub message: String,
    /// Ties the device's reply to the command.
    pub correlation_id: String,
}

/// How far a command got.
#[derive(Clone, Debug, PartialEq)]
pub enum CommandOutcome {
    /// Handed to the cloud; the device's reply will decide Sent or Error.
    Published,
    /// The device confirmed synchronously (e.g. a direct method): Sent.
    Delivered {
        /// The device's answer, if any.
        response: Option<serde_json::Value>,
    },
    /// The device answered synchronously and refused (a direct method's status outside
    /// 2xx): Error, with the device's own reason as the status reason, as a refusing
    /// reply makes it on the other clouds.
    Refused {
        /// The device's reason.
        reason: String,
    },
}

/// What the provider knows of a device right now.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct DeviceState {
    /// Connected, if the provider knows.
    pub connected: Option<bool>,
    /// Reported properties, if the provider keeps them.
    pub reported_properties: Option<serde_json::Value>,
    /// Last activity, if known.
    pub last_activity: Option<DateTime<Utc>>,
}

/// How a provider failed, classified so the gateway acts the same on every cloud.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ProviderError {
    /// May succeed if retried with backoff.
    #[error("{instance}: temporary failure: {message}")]
    Transient {
        /// Provider instance.
        instance: String,
        /// What failed.
        message: String,
    },
    /// The cloud asks us to slow down.
    #[error("{instance}: throttled, retry after {retry_after:?}: {message}")]
    Throttled {
        /// Provider instance.
        instance: String,
        /// Announced delay.
        retry_after: Duration,
        /// What failed.
        message: String,
    },
    /// The device or resource does not exist at the provider.
    #[error("{instance}: not found: {what}")]
    NotFound {
        /// Provider instance.
        instance: String,
        /// What was missing.
        what: String,
    },
    /// It exists already, differently.
    #[error("{instance}: conflict: {message}")]
    Conflict {
        /// Provider instance.
        instance: String,
        /// What conflicts.
        message: String,
    },
    /// The input breaks a provider rule.
    #[error("{instance}: invalid {field}: {message}")]
    InvalidInput {
        /// Provider instance.
        instance: String,
        /// The offending field.
        field: String,
        /// What is wrong and what to do.
        message: String,
    },
    /// Credentials refused.
    #[error("{instance}: unauthorized: {message}")]
    Unauthorized {
        /// Provider instance.
        instance: String,
        /// What was refused.
        message: String,
    },
    /// This provider cannot do it.
    #[error("{instance}: not supported: {what}")]
    Unsupported {
        /// Provider instance.
        instance: String,
        /// What is not supported.
        what: String,
    },
}

impl ProviderError {
    /// Whether retrying can help.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Transient { .. } | Self::Throttled { .. })
    }

    /// A short machine-readable class name.
    pub fn class(&self) -> &'static str {
        match self {
            Self::Transient { .. } => "transient",
            Self::Throttled { .. } => "throttled",
            Self::NotFound { .. } => "not_found",
            Self::Conflict { .. } => "conflict",
            Self::InvalidInput { .. } => "invalid_input",
            Self::Unauthorized { .. } => "unauthorized",
            Self::Unsupported { .. } => "unsupported",
        }
    }
}

/// Telemetry as the provider received it. The device id is raw: the gateway validates it.
#[derive(Clone, Debug, PartialEq)]
pub struct Telemetry {
    /// Device id as received.
    pub device_id: String,
    /// The id of this message, unique per device on this instance and the same when the
    /// message is delivered again (the gateway makes the alert token of the instance, the
    /// device and this id).
    pub message_id: String,
    /// Raw payload.
    pub payload: Bytes,
    /// When it was received.
    pub received_at: DateTime<Utc>,
}

/// What a provider reports.
#[derive(Clone, Debug, PartialEq)]
pub enum EventKind {
    /// A device message.
    Telemetry(Telemetry),
    /// A device connected or disconnected at `at` (event time, which orders states).
    Connection {
        /// Device id as received.
        device_id: String,
        /// New state.
        connected: bool,
        /// Event time.
        at: DateTime<Utc>,
    },
    /// A device answered a command.
    CommandReply {
        /// Device id as received.
        device_id: String,
        /// The command's correlation id.
        correlation_id: String,
        /// True for success.
        ok: bool,
        /// The device's reason, if any.
        reason: Option<String>,
    },
    /// A device reported its properties.
    ReportedProperties {
        /// Device id as received.
        device_id: String,
        /// The reported JSON.
        properties: serde_json::Value,
        /// Event time.
        at: DateTime<Utc>,
    },
    /// A message the provider could not read: an unparsable status, reply, reported or
    /// lifecycle message, or one on a topic that matches no template. The gateway keeps it
    /// as a dead letter (source `<what>:<instance>`) with the reason, so nothing is dropped
    /// silently, and acks it once that is committed.
    Unusable {
        /// What it was meant to be (`status`, `reply`, `reported`, `lifecycle`, `topic`).
        what: String,
        /// Device id as far as it could be told (may be empty).
        device_id: String,
        /// Why it cannot be used, and what to do.
        reason: String,
        /// The payload as received.
        payload: Bytes,
    },
}

/// The verdict on an event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ack {
    /// Effects committed: the cloud may forget it.
    Ack,
    /// Not processed: let the cloud redeliver.
    Nack(String),
}

/// Handed out with every event; the gateway calls [`AckHandle::ack`] once the event's
/// effects are committed. Dropping it unanswered counts as a nack.
pub struct AckHandle {
    inner: Option<Box<dyn FnOnce(Ack) + Send>>,
}

impl fmt::Debug for AckHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AckHandle")
            .field("pending", &self.inner.is_some())
            .finish()
    }
}

impl AckHandle {
    /// A handle that runs `f` with the verdict (exactly once).
    pub fn new(f: impl FnOnce(Ack) + Send + 'static) -> Self {
        Self {
            inner: Some(Box::new(f)),
        }
    }

    /// A handle for events that need no acknowledgement.
    pub fn none() -> Self {
        Self { inner: None }
    }

    /// Effects committed.
    pub fn ack(mut self) {
        if let Some(f) = self.inner.take() {
            f(Ack::Ack);
        }
    }

    /// Not processed; the provider should let it be redelivered.
    pub fn nack(mut self, reason: impl Into<String>) {
        if let Some(f) = self.inner.take() {
            f(Ack::Nack(reason.into()));
        }
    }
}

impl Drop for AckHandle {
    fn drop(&mut self) {
        if let Some(f) = self.inner.take() {
            f(Ack::Nack("dropped without a verdict".into()));
        }
    }
}

/// An event and the handle to acknowledge it.
#[derive(Debug)]
pub struct ProviderEvent {
    /// The provider instance it came from.
    pub instance: InstanceName,
    /// What happened.
    pub kind: EventKind,
    /// Ack after commit.
    pub ack: AckHandle,
}

/// Where providers send their events (bounded: a slow pipeline slows the provider down).
pub type EventSender = tokio::sync::mpsc::Sender<ProviderEvent>;

/// Health as `/ready` and the providers endpoint report it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ProviderHealth {
    /// Connected to the cloud or broker.
    pub connected: bool,
    /// Since when the state holds.
    pub since: DateTime<Utc>,
    /// Last error, if any.
    pub last_error: Option<String>,
    /// False when the instance is configured without a receive connection (control plane
    /// only, e.g. aws_iot_core without a client certificate): there is nothing to be
    /// connected to, so readiness does not wait for it; `last_error` says what is missing.
    pub receiving: bool,
}

/// An HTTP request a cloud pushed to the gateway for a provider (a webhook such as Azure
/// Event Grid's), without the HTTP framework's types.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PushRequest {
    /// `POST`, `OPTIONS`, ...
    pub method: String,
    /// Header names in lower case, with their values.
    pub headers: Vec<(String, String)>,
    /// Query parameters, percent-decoded.
    pub query: Vec<(String, String)>,
    /// The body.
    pub body: Bytes,
}

impl PushRequest {
    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The first value of query parameter `name`.
    pub fn query_param(&self, name: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// The answer to a [`PushRequest`].
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PushResponse {
    /// HTTP status.
    pub status: u16,
    /// Headers to send.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: Bytes,
}

/// A provider's webhook: the gateway forwards `POST|OPTIONS /hooks/{instance}` to it
/// (outside the API's bearer token; the endpoint checks its own secret).
#[async_trait]
pub trait PushEndpoint: Send + Sync {
    /// Checks a request's credentials from its method, query and headers alone (its body
    /// is empty here), before the body is read: `Some` is the refusal to send back. The
    /// default accepts (an endpoint without credentials checks them in `handle`).
    fn authorize(&self, _head: &PushRequest) -> Option<PushResponse> {
        None
    }
    /// Handles one pushed request. A success status must mean every event in it was
    /// committed (acked), so the cloud may forget them.
    async fn handle(&self, request: PushRequest) -> PushResponse;
}

/// One cloud (or broker) behind one interface.
#[async_trait]
pub trait Provider: Send + Sync {
    /// The instance name from the config file.
    fn instance(&self) -> &InstanceName;
    /// Which cloud.
    fn kind(&self) -> ProviderKind;
    /// Payload limits.
    fn limits(&self) -> &ProviderLimits;
    /// Current connection health.
    fn health(&self) -> ProviderHealth;
    /// Creates the device at the provider (credentials, ACLs, things...). Idempotent for an
    /// identical spec.
    async fn register(&self, spec: &DeviceSpec) -> Result<Registration, ProviderError>;
    /// Removes the device and everything register created.
    async fn unregister(&self, id: &DeviceId) -> Result<(), ProviderError>;
    /// Sends a command.
    async fn send_command(&self, cmd: &CommandRequest) -> Result<CommandOutcome, ProviderError>;
    /// What the provider knows of the device.
    async fn device_state(&self, id: &DeviceId) -> Result<DeviceState, ProviderError>;
    /// Hands the device its desired settings (Field Service's Update Device Data,
    /// `msdyn_devicesettings`, a JSON object): IoT Hub twin desired properties, the AWS
    /// shadow's desired state, a retained settings message on MQTT, a settings message on
    /// Pub/Sub. [`ProviderError::Unsupported`] when the provider cannot.
    async fn update_settings(
        &self,
        id: &DeviceId,
        settings: &serde_json::Value,
    ) -> Result<(), ProviderError>;
    /// Receives until `shutdown` fires, sending events; reconnects on its own. Returns an
    /// error only for failures retrying cannot fix (bad credentials, bad config).
    async fn run(&self, events: EventSender, shutdown: Shutdown) -> Result<(), ProviderError>;
    /// Called on a graceful stop for an instance on the gateway's embedded broker, while
    /// `run` still runs and after the gateway stopped that broker's device listeners:
    /// returns once everything the source already delivered to this instance has been
    /// handed to the event channel. The default has nothing to do: a cloud keeps what was
    /// not acknowledged and redelivers it.
    async fn drain(&self) -> Result<(), ProviderError> {
        Ok(())
    }
    /// The provider's webhook, if the cloud pushes events to the gateway (Azure Event
    /// Grid). Events pushed there go to the sender of the active [`Provider::run`].
    fn push_endpoint(&self) -> Option<std::sync::Arc<dyn PushEndpoint>> {
        None
    }
    /// Where the provider keeps its stream checkpoints. The gateway calls it once, before
    /// [`Provider::run`], with checkpoints kept in its store; providers whose cloud keeps
    /// the position itself (MQTT sessions, Pub/Sub subscriptions) ignore it.
    fn set_checkpoints(&self, _checkpoints: std::sync::Arc<dyn Checkpoints>) {}
    /// Where the provider claims the partitions of its streams, and who claims them: the
    /// gateway calls it once, before [`Provider::run`], with claims kept in its store and
    /// `owner` = this replica's identity, so replicas sharing the store split the partitions
    /// (Event Hubs). Providers whose cloud balances its consumers itself (MQTT shared
    /// subscriptions, Pub/Sub subscriptions) ignore it.
    fn set_ownership(&self, _ownership: std::sync::Arc<dyn PartitionOwnership>, _owner: &str) {}
}

/// Where a provider keeps the positions its streams resume from after a restart (the
/// offset of each Event Hubs partition, say): the gateway hands every provider one backed
/// by its store ([`Provider::set_checkpoints`]), scoped to the provider instance.
#[async_trait]
pub trait Checkpoints: Send + Sync {
    /// The value saved under `key`.
    async fn load(&self, key: &str) -> Result<Option<String>, ProviderError>;
    /// Saves `value` under `key` at `position`, its place in the stream (the Event Hubs
    /// sequence number), unless a checkpoint further along is saved there: a checkpoint
    /// never moves backwards, so a replica that lost a partition and still settles its last
    /// events cannot write behind the replica that took it over. Returns whether it saved.
    async fn save(&self, key: &str, value: &str, position: i64) -> Result<bool, ProviderError>;
}

/// Checkpoints kept in memory (lost on restart: the configured start position applies).
#[derive(Debug, Default)]
pub struct MemoryCheckpoints(Mutex<HashMap<String, (String, i64)>>);

#[async_trait]
impl Checkpoints for MemoryCheckpoints {
    async fn load(&self, key: &str) -> Result<Option<String>, ProviderError> {
        Ok(self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(key)
            .map(|(value, _)| value.clone()))
    }

    async fn save(&self, key: &str, value: &str, position: i64) -> Result<bool, ProviderError> {
        let mut saved = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if saved.get(key).is_some_and(|(_, stored)| *stored > position) {
            return Ok(false);
        }
        saved.insert(key.to_owned(), (value.to_owned(), position));
        Ok(true)
    }
}

/// A replica's claim on one partition of a stream: while it has not expired, its owner
/// alone reads the partition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PartitionClaim {
    /// The partition, in the provider's terms (the Event Hubs consumer uses its checkpoint
    /// key, so consumer groups never share claims).
    pub partition: String,
    /// The replica that holds it.
    pub owner: String,
    /// Bumped by every write; a claim names the version it read.
    pub version: i64,
    /// Until when it holds unless renewed.
    pub expires_at: DateTime<Utc>,
}

impl PartitionClaim {
    /// Whether the claim no longer holds at `now` (an expired claim is nobody's).
    pub fn expired(&self, now: DateTime<Utc>) -> bool {
        self.expires_at <= now
    }
}

/// Where the replicas of one provider instance claim the partitions of its streams, the
/// way Event Hubs processors claim partitions in their checkpoint store: list the claims,
/// then claim with optimistic concurrency. The gateway hands every provider one backed by
/// its store ([`Provider::set_ownership`]), scoped to the provider instance;
/// [`MemoryOwnership`] serves a gateway on its own.
#[async_trait]
pub trait PartitionOwnership: Send + Sync {
    /// Every claim, expired ones included.
    async fn list(&self) -> Result<Vec<PartitionClaim>, ProviderError>;
    /// Claims (renews; releases with an `expires_at` that has passed) `partition` for
    /// `owner` until `expires_at` if the claim is still at `expected_version` (`None`: no
    /// claim yet). `Ok(None)`: another replica wrote first, nothing was written.
    async fn claim(
        &self,
        partition: &str,
        owner: &str,
        expected_version: Option<i64>,
        expires_at: DateTime<Utc>,
    ) -> Result<Option<PartitionClaim>, ProviderError>;
}

/// Claims kept in memory: the partitions of a gateway on its own, or of several consumers
/// sharing it in one process (tests).
#[derive(Debug, Default)]
pub struct MemoryOwnership(Mutex<BTreeMap<String, PartitionClaim>>);

#[async_trait]
impl PartitionOwnership for MemoryOwnership {
    async fn list(&self) -> Result<Vec<PartitionClaim>, ProviderError> {
        Ok(self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .values()
            .cloned()
            .collect())
    }

    async fn claim(
        &self,
        partition: &str,
        owner: &str,
        expected_version: Option<i64>,
        expires_at: DateTime<Utc>,
    ) -> Result<Option<PartitionClaim>, ProviderError> {
        let mut claims = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let stored = claims.get(partition).map(|c| c.version);
        if stored != expected_version {
            return Ok(None);
        }
        let claim = PartitionClaim {
            partition: partition.to_owned(),
            owner: owner.to_owned(),
            version: stored.map_or(1, |v| v + 1),
            expires_at,
        };
        claims.insert(partition.to_owned(), claim.clone());
        Ok(Some(claim))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[test]
    fn ack_handle_reports_exactly_one_verdict_and_drop_is_a_nack() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        AckHandle::new(move |a| s.lock().expect("lock").push(a)).ack();
        let s = seen.clone();
        drop(AckHandle::new(move |a| s.lock().expect("lock").push(a)));
        let got = seen.lock().expect("lock").clone();
        assert_eq!(
            got,
            vec![Ack::Ack, Ack::Nack("dropped without a verdict".into())]
        );
    }

    #[test]
    fn only_transient_and_throttled_errors_are_retryable() {
        let t = ProviderError::Transient {
            instance: "a".into(),
            message: "m".into(),
        };
        let n = ProviderError::NotFound {
            instance: "a".into(),
            what: "d".into(),
        };
        assert!(t.is_retryable() && !n.is_retryable());
        assert_eq!(n.class(), "not_found");
    }

    #[tokio::test]
    async fn a_memory_checkpoint_never_moves_behind_the_saved_position() {
        let c = MemoryCheckpoints::default();
        assert!(c.save("p0", "500", 5).await.expect("save"));
        assert!(
            !c.save("p0", "400", 4).await.expect("save"),
            "behind: refused"
        );
        assert_eq!(c.load("p0").await.expect("load").as_deref(), Some("500"));
        assert!(c.save("p0", "600", 6).await.expect("save"));
        assert_eq!(c.load("p0").await.expect("load").as_deref(), Some("600"));
    }

    #[tokio::test]
    async fn a_memory_claim_wins_only_on_the_version_it_read() {
        let o = MemoryOwnership::default();
        let at = Utc::now();
        let first = o.claim("p0", "a", None, at).await.expect("claim");
        assert_eq!(first.as_ref().map(|c| c.version), Some(1));
        assert_eq!(o.claim("p0", "b", None, at).await.expect("claim"), None);
        let renewed = o.claim("p0", "a", Some(1), at).await.expect("claim");
        assert_eq!(renewed.map(|c| c.version), Some(2));
        assert_eq!(o.claim("p0", "b", Some(1), at).await.expect("claim"), None);
        assert_eq!(o.list().await.expect("list")[0].owner, "a");
    }
}
