//! [`MqttProvider`]: the [`Provider`] implementation of a plain MQTT 5 broker, and only
//! that: each method hands its work to its room (commands to [`super::commands`], broker
//! credentials to [`super::dynsec`], `run` to [`super::receive`]) or answers from the state
//! the receive loop keeps ([`super::state`]).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use iotgw_config::MqttConfig;
use iotgw_ids::DeviceId;

use super::dynsec::DynsecAdmin;
use super::state::Shared;
pub use super::state::{RECEIVE_MAXIMUM, SESSION_EXPIRY_SECS};
use super::topics::Topics;
use crate::observed::{DeviceBook, HealthCell};
use crate::{
    CommandOutcome, CommandRequest, DeviceSpec, DeviceState, EventSender, InstanceName, Provider,
    ProviderError, ProviderHealth, ProviderKind, ProviderLimits, Registration, Shutdown,
    CFS_MAX_COMMAND_BYTES,
};

/// The plain MQTT 5 provider: one persistent session on one broker.
///
/// Built with [`MqttProvider::new`]; [`Provider::run`] owns the connection (one at a
/// time per instance) and every other method works from the state it maintains.
pub struct MqttProvider {
    pub(super) shared: Arc<Shared>,
    limits: ProviderLimits,
    dynsec: Option<DynsecAdmin>,
}

impl MqttProvider {
    /// Validates `config` and builds the provider of instance `instance`. Connects
    /// nothing: [`Provider::run`] does.
    ///
    /// Errors are [`ProviderError::InvalidInput`] naming the config key: a topic template
    /// without a whole-level `{device_id}`, an empty `client_id`, a keep-alive below 5 s.
    pub fn new(instance: &InstanceName, config: &MqttConfig) -> Result<Self, ProviderError> {
        let invalid = |field: &str, message: String| ProviderError::InvalidInput {
            instance: instance.to_string(),
            field: field.to_owned(),
            message,
        };
        let topics =
            Topics::from_config(config).map_err(|e| invalid(e.setting(), e.to_string()))?;
        if config.client_id.is_empty() {
            return Err(invalid(
                "client_id",
                "is empty: give the gateway a client id unique on the broker".into(),
            ));
        }
        if config.keep_alive_secs < 5 {
            return Err(invalid(
                "keep_alive_secs",
                format!(
                    "is {}: the MQTT client needs at least 5 seconds",
                    config.keep_alive_secs
                ),
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
        if config.shared_group.contains(['/', '+', '#']) {
            return Err(invalid(
                "shared_group",
                format!("{:?} may not hold '/', '+' or '#'", config.shared_group),
            ));
        }
        let tls = config
            .tls
            .as_ref()
            .map(|t| {
                crate::tls::client_config(
                    instance,
                    &crate::tls::TlsFiles {
                        cert: t
                            .client_cert_file
                            .as_deref()
                            .map(|p| ("tls.client_cert_file", p)),
                        key: t
                            .client_key_file
                            .as_deref()
                            .map(|p| ("tls.client_key_file", p)),
                        ca: ("tls.ca_file", t.ca_file.as_deref()),
                    },
                )
                .map(Arc::new)
            })
            .transpose()?;
        let dynsec = config
            .dynsec
            .as_ref()
            .map(|d| DynsecAdmin::new(instance, config, d, topics.clone(), tls.clone()));
        Ok(Self {
            shared: Arc::new(Shared {
                instance: instance.to_owned(),
                config: config.clone(),
                topics,
                health: HealthCell::new(),
                devices: DeviceBook::default(),
                client: Mutex::new(None),
                running: AtomicBool::new(false),
                dropped: AtomicU64::new(0),
                barrier: Mutex::new(None),
                tls,
            }),
            limits: ProviderLimits {
                max_telemetry_bytes: config.max_payload_bytes,
                max_command_bytes: CFS_MAX_COMMAND_BYTES,
            },
            dynsec,
        })
    }

    /// Messages acked without an event because their payload did not follow their topic's
    /// format (an unparsable status, reply or reported message) or their topic matched no
    /// template. Each one is also logged with the reason.
    pub fn dropped_messages(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }
}

#[async_trait]
impl Provider for MqttProvider {
    fn instance(&self) -> &InstanceName {
        &self.shared.instance
    }

    fn kind(&self) -> ProviderKind {
        ProviderKind::Mqtt
    }

    fn limits(&self) -> &ProviderLimits {
        &self.limits
    }

    fn health(&self) -> ProviderHealth {
        self.shared.health.get()
    }

    /// Without `dynsec` the broker has no per-device credentials: the device is only
    /// recorded by the gateway. With `dynsec`, creates (or refreshes) the device's broker
    /// client and role and returns its credentials once.
    async fn register(&self, spec: &DeviceSpec) -> Result<Registration, ProviderError> {
        match &self.dynsec {
            Some(admin) => admin.register(spec).await,
            None => Ok(Registration {
                message: Some(
                    "registry only: this broker has no per-device credentials (configure dynsec to create them)"
                        .into(),
                ),
                credentials: None,
            }),
        }
    }

    /// With `dynsec`, deletes the device's broker client and role; otherwise nothing to do.
    async fn unregister(&self, id: &DeviceId) -> Result<(), ProviderError> {
        match &self.dynsec {
            Some(admin) => admin.unregister(id).await,
            None => Ok(()),
        }
    }

    /// See [`super::commands`]: QoS 1 to the device's command topic, the correlation id
    /// as MQTT 5 correlation data and/or in the payload (`command_correlation`).
    async fn send_command(&self, cmd: &CommandRequest) -> Result<CommandOutcome, ProviderError> {
        super::commands::send(&self.shared, self.limits.max_command_bytes, cmd).await
    }

    /// See [`super::commands::send_settings`]: the settings JSON, retained, QoS 1, to the
    /// device's settings topic.
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

    /// What the receive loop has seen of the device since it started: connection state
    /// (from the status topic, ordered by event time), last reported properties, last
    /// activity. Unknown devices get an empty state.
    async fn device_state(&self, id: &DeviceId) -> Result<DeviceState, ProviderError> {
        Ok(self.shared.devices.state(id.as_str()))
    }

    /// See [`super::receive::drain`]: markers through the gateway's own subscription
    /// (nothing to wait for with a shared subscription).
    async fn drain(&self) -> Result<(), ProviderError> {
        super::receive::drain(&self.shared).await
    }

    /// See [`super::receive`] for the loop: persistent session, manual acks, reconnects
    /// with backoff. Returns `Err` only when the broker refuses the gateway's credentials
    /// or client id (retrying cannot fix that), or when `run` is already active for this
    /// instance.
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

    fn refused(config: MqttConfig) -> (String, String) {
        match MqttProvider::new(&crate::InstanceName::from("edge"), &config) {
            Err(ProviderError::InvalidInput { field, message, .. }) => (field, message),
            Err(other) => panic!("expected InvalidInput, got {other}"),
            Ok(_) => panic!("expected the config to be refused"),
        }
    }

    #[test]
    fn invalid_settings_are_refused_naming_the_config_key() {
        let (field, message) = refused(MqttConfig {
            command_topic: "devices/commands".into(),
            ..MqttConfig::default()
        });
        assert_eq!(field, "command_topic");
        assert!(message.contains("devices/commands"), "{message}");
        assert_eq!(
            refused(MqttConfig {
                client_id: String::new(),
                ..MqttConfig::default()
            })
            .0,
            "client_id"
        );
        assert_eq!(
            refused(MqttConfig {
                keep_alive_secs: 2,
                ..MqttConfig::default()
            })
            .0,
            "keep_alive_secs"
        );
        assert_eq!(
            refused(MqttConfig {
                shared_group: "a/b".into(),
                ..MqttConfig::default()
            })
            .0,
            "shared_group"
        );
    }

    #[test]
    fn limits_follow_the_config_and_the_field_service_command_size() {
        let p = MqttProvider::new(
            &crate::InstanceName::from("edge"),
            &MqttConfig {
                max_payload_bytes: 1000,
                ..MqttConfig::default()
            },
        )
        .expect("valid config");
        assert_eq!(
            p.limits(),
            &ProviderLimits {
                max_telemetry_bytes: 1000,
                max_command_bytes: CFS_MAX_COMMAND_BYTES
            }
        );
        assert_eq!(p.kind(), ProviderKind::Mqtt);
        assert!(!p.health().connected);
    }

    #[tokio::test]
    async fn without_dynsec_registration_is_registry_only() {
        let p = MqttProvider::new(&crate::InstanceName::from("edge"), &MqttConfig::default())
            .expect("valid config");
        let spec = DeviceSpec {
            device_id: DeviceId::parse("pump-1").expect("valid id"),
            name: "Pump 1".into(),
            category: None,
            tags: Default::default(),
            settings: None,
        };
        let reg = p.register(&spec).await.expect("registry only");
        assert!(reg.credentials.is_none());
        assert!(reg.message.is_some_and(|m| m.starts_with("registry only")));
        p.unregister(&spec.device_id)
            .await
            .expect("nothing to remove");
    }

    #[test]
    fn a_late_older_status_does_not_override_a_newer_one() {
        let p = MqttProvider::new(&crate::InstanceName::from("edge"), &MqttConfig::default())
            .expect("valid config");
        let t = |s: &str| {
            DateTime::parse_from_rfc3339(s)
                .expect("time")
                .with_timezone(&Utc)
        };
        let conn = |connected, at| EventKind::Connection {
            device_id: "d1".into(),
            connected,
            at,
        };
        p.shared
            .devices
            .observe(&conn(true, t("2024-05-01T12:00:10Z")), Utc::now());
        p.shared
            .devices
            .observe(&conn(false, t("2024-05-01T12:00:05Z")), Utc::now());
        let e = p.shared.devices.seen("d1").expect("known device");
        assert_eq!(e.connected.map(|(c, _)| c), Some(true));
        assert_eq!(e.last_activity, Some(t("2024-05-01T12:00:10Z")));
    }
}
