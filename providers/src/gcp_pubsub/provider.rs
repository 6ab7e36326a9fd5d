//! [`GcpPubSubProvider`]: the [`Provider`] implementation of Google Cloud Pub/Sub, and
//! only that: registration and the resources are [`super::registry`]'s, commands
//! [`super::commands`]', the streaming pulls [`super::receive`]'s; device state comes from
//! what the receive loops saw ([`super::state`]).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use iotgw_config::GcpPubSubConfig;
use iotgw_ids::DeviceId;

use super::client;
use super::names::Names;
use super::state::Shared;
use crate::observed::{DeviceBook, HealthCell};
use crate::{
    CommandOutcome, CommandRequest, DeviceSpec, DeviceState, EventSender, InstanceName, Provider,
    ProviderError, ProviderHealth, ProviderKind, ProviderLimits, Registration, Shutdown,
    CFS_MAX_COMMAND_BYTES,
};

/// The Google Cloud Pub/Sub provider of one configured instance.
///
/// Built with [`GcpPubSubProvider::new`] (no network traffic); [`Provider::run`] checks or
/// creates the topics and subscriptions, then streams from them. Commands and
/// registrations work whether `run` is active or not.
pub struct GcpPubSubProvider {
    pub(super) shared: Arc<Shared>,
    limits: ProviderLimits,
}

impl std::fmt::Debug for GcpPubSubProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GcpPubSubProvider")
            .field("instance", &self.shared.instance)
            .field("target", &self.shared.clients.target)
            .finish()
    }
}

impl GcpPubSubProvider {
    /// Validates `config` and builds the clients of instance `instance`. Connects nothing:
    /// [`Provider::run`] checks the resources and streams.
    ///
    /// Errors are [`ProviderError::InvalidInput`] naming the first bad config key (every
    /// check of `iotgw_config::gcp_pubsub::problems`), or an unreadable `credentials_file`.
    pub async fn new(
        instance: &InstanceName,
        config: &GcpPubSubConfig,
    ) -> Result<Self, ProviderError> {
        if let Some(p) = iotgw_config::gcp_pubsub::problems("", config)
            .into_iter()
            .next()
        {
            return Err(ProviderError::InvalidInput {
                instance: instance.to_string(),
                field: p.path,
                message: format!("{}; fix: {}", p.message, p.fix),
            });
        }
        let names = Names::new(config);
        let clients = client::build(instance, config, &names.commands_topic).await?;
        Ok(Self {
            shared: Arc::new(Shared {
                instance: instance.to_owned(),
                config: config.clone(),
                names,
                clients,
                health: HealthCell::new(),
                devices: DeviceBook::default(),
                running: AtomicBool::new(false),
                dropped: AtomicU64::new(0),
            }),
            limits: ProviderLimits {
                max_telemetry_bytes: config.max_payload_bytes,
                max_command_bytes: CFS_MAX_COMMAND_BYTES,
            },
        })
    }

    /// Checks (or, with `create_if_missing`, creates) every topic and subscription of the
    /// instance now; [`Provider::run`] does the same before streaming.
    pub async fn ensure_resources(&self) -> Result<(), ProviderError> {
        self.shared.ensure_resources().await
    }

    /// The full name of the device's command subscription (whether or not
    /// `command_subscriptions` is on).
    pub fn command_subscription(&self, device: &DeviceId) -> String {
        self.shared.names.command_subscription(device)
    }

    /// The filter the device's command subscription carries.
    pub fn command_filter(&self, device: &DeviceId) -> String {
        self.shared.names.command_filter(device)
    }

    /// Messages acked without an event because they did not follow their stream's format
    /// (a reply without status, a lifecycle message without state). Each is also logged
    /// with the reason.
    pub fn dropped_messages(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }

    /// Where the clients point (`the Pub/Sub emulator at http://...`, or the service).
    pub fn target(&self) -> String {
        self.shared.clients.target.describe()
    }
}

#[async_trait]
impl Provider for GcpPubSubProvider {
    /// Update Device Data: see [`super::commands::send_settings`]: the settings JSON on
    /// the commands topic with attributes `<device_id_attribute>` and
    /// `iotgw_kind=settings`, the device id as ordering key.
    async fn update_settings(
        &self,
        id: &DeviceId,
        settings: &serde_json::Value,
    ) -> Result<(), ProviderError> {
        super::commands::send_settings(
            &self.shared,
            self.limits.max_command_bytes,
            id.as_str(),
            settings,
        )
        .await
    }

    fn instance(&self) -> &InstanceName {
        &self.shared.instance
    }

    fn kind(&self) -> ProviderKind {
        ProviderKind::GcpPubSub
    }

    fn limits(&self) -> &ProviderLimits {
        &self.limits
    }

    fn health(&self) -> ProviderHealth {
        self.shared.health.get()
    }

    /// See [`super::registry`]: with `command_subscriptions`, the device's command
    /// subscription is created (an identical existing one is accepted); otherwise the
    /// gateway's registry is the only one.
    async fn register(&self, spec: &DeviceSpec) -> Result<Registration, ProviderError> {
        self.shared.register(spec).await
    }

    /// See [`super::registry`]: with `command_subscriptions`, deletes the device's command
    /// subscription (one already gone counts as deleted); otherwise nothing to do.
    async fn unregister(&self, id: &DeviceId) -> Result<(), ProviderError> {
        self.shared.unregister(id).await
    }

    /// See [`super::commands`]: one message on the commands topic, the device id as
    /// ordering key. Returns once Pub/Sub accepted it; the device's reply (on the reply
    /// topic) decides Sent or Error.
    async fn send_command(&self, cmd: &CommandRequest) -> Result<CommandOutcome, ProviderError> {
        super::commands::send(&self.shared, self.limits.max_command_bytes, cmd).await
    }

    /// What the receive loops have seen of the device since they started: connection state
    /// (from the lifecycle topic, ordered by event time), the last reported properties
    /// (also from the lifecycle topic) and last activity. Pub/Sub keeps no device state;
    /// unknown devices get an empty state.
    async fn device_state(&self, id: &DeviceId) -> Result<DeviceState, ProviderError> {
        Ok(self.shared.devices.state(id.as_str()))
    }

    /// See [`super::receive`]: checks (or creates) the resources, then one streaming pull
    /// per subscription with flow control, acks after commit, reopening failed streams
    /// with backoff. Returns `Err` for what retrying cannot fix (a missing resource without
    /// `create_if_missing`, refused credentials or permissions), or when `run` is already
    /// active for this instance.
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
        let result = super::receive::run(self.shared.clone(), events, shutdown).await;
        if let Err(e) = &result {
            self.shared.health.set_error(e.to_string());
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use chrono::{DateTime, Utc};

    use super::*;
    use crate::EventKind;

    #[tokio::test]
    async fn invalid_settings_are_refused_naming_the_config_key() {
        let config = GcpPubSubConfig {
            project_id: "p".into(),
            ack_deadline_secs: 3,
            ..GcpPubSubConfig::default()
        };
        match GcpPubSubProvider::new(&crate::InstanceName::from("gcp"), &config).await {
            Err(ProviderError::InvalidInput { field, message, .. }) => {
                assert_eq!(field, "ack_deadline_secs");
                assert!(message.contains("10..=600"), "{message}");
            }
            other => panic!("expected InvalidInput, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn an_unreadable_credentials_file_is_refused_naming_the_key() {
        let config = GcpPubSubConfig {
            project_id: "p".into(),
            credentials_file: Some("/nonexistent/key.json".into()),
            ..GcpPubSubConfig::default()
        };
        match GcpPubSubProvider::new(&crate::InstanceName::from("gcp"), &config).await {
            Err(ProviderError::InvalidInput { field, message, .. }) => {
                assert_eq!(field, "credentials_file");
                assert!(message.contains("/nonexistent/key.json"), "{message}");
            }
            other => panic!("expected InvalidInput, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn oversize_commands_are_refused_before_publishing() {
        let config = GcpPubSubConfig {
            project_id: "p".into(),
            emulator_host: Some("127.0.0.1:9".into()),
            ..GcpPubSubConfig::default()
        };
        let p = GcpPubSubProvider::new(&crate::InstanceName::from("gcp"), &config)
            .await
            .expect("valid config");
        let cmd = CommandRequest {
            id: uuid::Uuid::new_v4(),
            device_id: DeviceId::parse("pump-1").expect("valid id"),
            name: "flash".into(),
            message: "x".repeat(CFS_MAX_COMMAND_BYTES + 1),
            correlation_id: "c".into(),
        };
        let err = p.send_command(&cmd).await.expect_err("too big");
        assert!(
            matches!(err, ProviderError::InvalidInput { ref field, .. } if field == "msdyn_message"),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn connection_state_follows_event_time_and_ignores_late_older_events() {
        let config = GcpPubSubConfig {
            project_id: "p".into(),
            emulator_host: Some("127.0.0.1:9".into()),
            ..GcpPubSubConfig::default()
        };
        let p = GcpPubSubProvider::new(&crate::InstanceName::from("gcp"), &config)
            .await
            .expect("valid config");
        let at = |s: &str| {
            DateTime::parse_from_rfc3339(s)
                .expect("time")
                .with_timezone(&Utc)
        };
        let conn = |connected, t| EventKind::Connection {
            device_id: "pump-1".into(),
            connected,
            at: at(t),
        };
        p.shared
            .devices
            .observe(&conn(true, "2026-01-01T00:00:02Z"), Utc::now());
        p.shared
            .devices
            .observe(&conn(false, "2026-01-01T00:00:01Z"), Utc::now());
        let id = DeviceId::parse("pump-1").expect("valid id");
        let state = p.device_state(&id).await.expect("state");
        assert_eq!(state.connected, Some(true));
        assert_eq!(state.last_activity, Some(at("2026-01-01T00:00:02Z")));
    }
}
