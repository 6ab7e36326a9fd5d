//! [`AwsIotCoreProvider`]: the [`Provider`] implementation of AWS IoT Core, and only that:
//! registration is [`super::registry`]'s, commands [`super::commands`]', the MQTT receive
//! loop [`super::receive`]'s; device state is read here from the shadow and the presence
//! events the receive loop saw ([`super::state`]).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use iotgw_config::AwsIotCoreConfig;
use iotgw_ids::DeviceId;

use super::clients::Clients;
use super::errors::Call;
use super::inbound::reported_of;
use super::registry::Registrar;
use super::state::Shared;
pub use super::state::AWS_MAX_PAYLOAD_BYTES;
use super::topics::AwsTopics;
use crate::observed::{DeviceBook, HealthCell};
use crate::{
    CommandOutcome, CommandRequest, DeviceSpec, DeviceState, EventSender, InstanceName, Provider,
    ProviderError, ProviderHealth, ProviderKind, ProviderLimits, Registration, Shutdown,
    CFS_MAX_COMMAND_BYTES,
};

/// The AWS IoT Core provider: AWS APIs for the registry and commands, one MQTT session on
/// the account endpoint for telemetry, replies and presence.
///
/// Built with [`AwsIotCoreProvider::new`]; [`Provider::run`] owns the MQTT connection (one
/// at a time per instance).
pub struct AwsIotCoreProvider {
    pub(super) shared: Arc<Shared>,
    limits: ProviderLimits,
}

impl AwsIotCoreProvider {
    /// Validates `config`, reads the gateway's certificate files and loads the AWS SDK
    /// configuration. Connects nothing: [`Provider::run`] does, and the API calls do.
    ///
    /// Errors are [`ProviderError::InvalidInput`] naming the config key: a bad topic
    /// template, an unreadable certificate or key, no region.
    pub async fn new(
        instance: &InstanceName,
        config: &AwsIotCoreConfig,
    ) -> Result<Self, ProviderError> {
        let invalid = |field: &str, message: String| ProviderError::InvalidInput {
            instance: instance.to_string(),
            field: field.to_owned(),
            message,
        };
        let topics =
            AwsTopics::from_config(config).map_err(|e| invalid(e.setting(), e.to_string()))?;
        if config.client_id.is_empty() {
            return Err(invalid(
                "client_id",
                "is empty: give the gateway an MQTT client id its policy allows".into(),
            ));
        }
        if config.reconnect_min_ms == 0 || config.reconnect_max_ms < config.reconnect_min_ms {
            return Err(invalid(
                "reconnect_min_ms",
                format!(
                    "reconnect_min_ms {} must be above 0 and at most reconnect_max_ms {}",
                    config.reconnect_min_ms, config.reconnect_max_ms
                ),
            ));
        }
        let tls = super::tls::client_config(instance, config)?;
        let clients = Clients::new(instance, config).await?;
        Ok(Self {
            shared: Arc::new(Shared {
                instance: instance.to_owned(),
                config: config.clone(),
                topics,
                clients,
                tls,
                health: HealthCell::new(),
                devices: DeviceBook::default(),
                running: AtomicBool::new(false),
                dropped: AtomicU64::new(0),
            }),
            limits: ProviderLimits {
                max_telemetry_bytes: AWS_MAX_PAYLOAD_BYTES,
                max_command_bytes: CFS_MAX_COMMAND_BYTES.min(AWS_MAX_PAYLOAD_BYTES),
            },
        })
    }

    /// Messages acked without an event: unparsable presence events, replies or shadow
    /// documents, and topics matching no template. Each one is also logged with the reason.
    pub fn dropped_messages(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }
}

#[async_trait]
impl Provider for AwsIotCoreProvider {
    /// Update Device Data: the settings become the thing shadow's desired state
    /// (`UpdateThingShadow` with `{"state":{"desired": settings}}`, merged by AWS into the
    /// desired state already there; the device gets the delta on
    /// `$aws/things/{thing}/shadow/update/delta`).
    async fn update_settings(
        &self,
        id: &DeviceId,
        settings: &serde_json::Value,
    ) -> Result<(), ProviderError> {
        Registrar::of(&self.shared)
            .set_desired(id.as_str(), settings)
            .await
    }

    fn instance(&self) -> &InstanceName {
        &self.shared.instance
    }

    fn kind(&self) -> ProviderKind {
        ProviderKind::AwsIotCore
    }

    fn limits(&self) -> &ProviderLimits {
        &self.limits
    }

    fn health(&self) -> ProviderHealth {
        self.shared.health.get()
    }

    /// Thing, certificate and key, device policy, attachments, desired shadow state; see
    /// [`super::registry`] for rollback and idempotency. The credentials (certificate
    /// PEM, private key, endpoint, topics) are in the answer only.
    async fn register(&self, spec: &DeviceSpec) -> Result<Registration, ProviderError> {
        Registrar::of(&self.shared).register(spec).await
    }

    /// Detaches, deactivates and deletes the certificate, then deletes the policy, the
    /// shadow and the thing. [`ProviderError::NotFound`] when the thing does not exist.
    async fn unregister(&self, id: &DeviceId) -> Result<(), ProviderError> {
        Registrar::of(&self.shared).unregister(id.as_str()).await
    }

    /// See [`super::commands`]: QoS 1 through the `iot-data` Publish API, with MQTT 5
    /// properties. `Published`: the device's reply decides Sent or Error.
    async fn send_command(&self, cmd: &CommandRequest) -> Result<CommandOutcome, ProviderError> {
        super::commands::send(&self.shared, self.limits.max_command_bytes, cmd).await
    }

    /// Reported properties from the device's shadow (`GetThingShadow`, with the time of
    /// their latest update), connection state from the presence events seen since `run`
    /// started (ordered by their AWS timestamp). A thing without a shadow has no reported
    /// properties; a missing thing is [`ProviderError::NotFound`].
    async fn device_state(&self, id: &DeviceId) -> Result<DeviceState, ProviderError> {
        let thing = id.as_str();
        let seen = self.shared.devices.seen(thing).unwrap_or_default();
        let resource = format!("the shadow of {thing}");
        let call = Call {
            op: "GetThingShadow",
            resource: &resource,
            field: "msdyn_deviceid",
        };
        let data = self.shared.clients.data().await?;
        let reported = match data.get_thing_shadow().thing_name(thing).send().await {
            Ok(out) => out
                .payload()
                .and_then(|p| serde_json::from_slice::<serde_json::Value>(p.as_ref()).ok())
                .as_ref()
                .and_then(reported_of),
            Err(e) => {
                let e = self.shared.clients.error(&call, &e);
                if !matches!(e, ProviderError::NotFound { .. }) {
                    return Err(e);
                }
                self.shared
                    .clients
                    .iot
                    .describe_thing()
                    .thing_name(thing)
                    .send()
                    .await
                    .map_err(|e| {
                        self.shared.clients.error(
                            &Call {
                                op: "DescribeThing",
                                resource: &format!("thing {thing}"),
                                field: "msdyn_deviceid",
                            },
                            &e,
                        )
                    })?;
                None
            }
        };
        let last_activity = match (seen.last_activity, reported.as_ref().and_then(|r| r.at)) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        Ok(DeviceState {
            connected: seen.connected.map(|(c, _)| c),
            reported_properties: reported.map(|r| r.properties).or(seen.reported),
            last_activity,
        })
    }

    /// See [`super::receive`]: persistent session, manual acks, reconnects with backoff.
    /// Without a client certificate it only waits for `shutdown` (health says why).
    /// Returns `Err` when the broker refuses the gateway's certificate or client id, when
    /// the data endpoint cannot be looked up for a reason retrying cannot fix, or when
    /// `run` is already active for this instance.
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
        super::receive::run(self.shared.clone(), events, shutdown).await
    }
}

#[cfg(test)]
mod tests {
    use chrono::{DateTime, Utc};

    use super::*;
    use crate::EventKind;

    fn config() -> AwsIotCoreConfig {
        AwsIotCoreConfig {
            region: Some("eu-west-1".into()),
            access_key_id: Some("AKIDEXAMPLE".into()),
            secret_access_key: Some(iotgw_config::Secret::new("secret")),
            endpoint_url: Some("http://127.0.0.1:9".into()),
            ..AwsIotCoreConfig::default()
        }
    }

    #[tokio::test]
    async fn a_bad_topic_template_is_refused_naming_its_key() {
        let c = AwsIotCoreConfig {
            command_topic: "cmd/{device_id}/{device_id}".into(),
            ..config()
        };
        match AwsIotCoreProvider::new(&crate::InstanceName::from("aws"), &c).await {
            Err(ProviderError::InvalidInput { field, .. }) => assert_eq!(field, "command_topic"),
            Err(e) => panic!("{e}"),
            Ok(_) => panic!("accepted"),
        }
    }

    #[tokio::test]
    async fn commands_above_the_field_service_limit_are_refused_before_any_call() {
        let p = AwsIotCoreProvider::new(&crate::InstanceName::from("aws"), &config())
            .await
            .expect("valid config");
        assert_eq!(p.limits().max_command_bytes, CFS_MAX_COMMAND_BYTES);
        assert_eq!(p.limits().max_telemetry_bytes, 128 * 1024);
        let cmd = CommandRequest {
            id: uuid::Uuid::new_v4(),
            device_id: DeviceId::parse("pump-1").expect("valid id"),
            name: "flash".into(),
            message: "x".repeat(CFS_MAX_COMMAND_BYTES + 1),
            correlation_id: "c1".into(),
        };
        match p.send_command(&cmd).await {
            Err(ProviderError::InvalidInput { field, .. }) => assert_eq!(field, "msdyn_message"),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn without_a_client_certificate_the_instance_reports_itself_control_plane_only() {
        let p = Arc::new(
            AwsIotCoreProvider::new(&crate::InstanceName::from("aws"), &config())
                .await
                .expect("valid config"),
        );
        assert!(p.health().receiving, "receiving until run says otherwise");
        let (tx, _rx) = tokio::sync::mpsc::channel(1);
        let stop = Shutdown::new();
        let run = tokio::spawn({
            let (p, stop) = (p.clone(), stop.clone());
            async move { p.run(tx, stop).await }
        });
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
        while p.health().receiving {
            assert!(
                tokio::time::Instant::now() < deadline,
                "run did not report its mode"
            );
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        let h = p.health();
        assert!(!h.connected);
        assert!(
            h.last_error
                .as_deref()
                .is_some_and(|e| e.contains("client_cert_path")),
            "{h:?}"
        );
        stop.cancel();
        run.await.expect("join").expect("run ends cleanly");
    }

    #[tokio::test]
    async fn a_late_older_presence_event_does_not_override_a_newer_one() {
        let p = AwsIotCoreProvider::new(&crate::InstanceName::from("aws"), &config())
            .await
            .expect("valid config");
        let t = |ms: i64| DateTime::from_timestamp_millis(ms).expect("time");
        let conn = |connected, at| EventKind::Connection {
            device_id: "d1".into(),
            connected,
            at,
        };
        p.shared.devices.observe(&conn(true, t(2_000)), Utc::now());
        p.shared.devices.observe(&conn(false, t(1_000)), Utc::now());
        let e = p.shared.devices.seen("d1").expect("known");
        assert_eq!(e.connected, Some((true, t(2_000))));
        p.shared.devices.observe(&conn(false, t(3_000)), Utc::now());
        let e = p.shared.devices.seen("d1").expect("known");
        assert_eq!(e.connected, Some((false, t(3_000))));
    }
}
