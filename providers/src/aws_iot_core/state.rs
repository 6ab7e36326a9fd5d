//! What an `aws_iot_core` instance has observed and shares between the provider handle
//! ([`super::provider`]), its MQTT receive loop ([`super::receive`]), the command sender
//! ([`super::commands`]) and the registrar ([`super::registry`]): they import it, it
//! imports none of them, so they never import each other.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use iotgw_config::AwsIotCoreConfig;

use super::clients::Clients;
use super::topics::AwsTopics;
use crate::observed::{DeviceBook, HealthCell};
use crate::{InstanceName, ProviderError};

/// AWS IoT Core's largest MQTT payload (publish, and the `iot-data` Publish API).
pub const AWS_MAX_PAYLOAD_BYTES: usize = 128 * 1024;

/// State shared by the provider handle and its receive loop.
pub(super) struct Shared {
    pub(super) instance: InstanceName,
    pub(super) config: AwsIotCoreConfig,
    pub(super) topics: AwsTopics,
    pub(super) clients: Clients,
    /// TLS of the MQTT connection; `None` when no client certificate is configured.
    pub(super) tls: Option<Arc<rustls::ClientConfig>>,
    pub(super) health: HealthCell,
    pub(super) devices: DeviceBook,
    pub(super) running: AtomicBool,
    pub(super) dropped: AtomicU64,
}

impl Shared {
    pub(super) fn try_start(&self) -> bool {
        self.running
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    pub(super) fn stopped(&self) {
        self.health.set_connected(false);
        self.running.store(false, Ordering::Release);
    }

    pub(super) fn count_dropped(&self) {
        self.dropped.fetch_add(1, Ordering::Relaxed);
    }

    /// The MQTT host: `mqtt_host`, else the data endpoint.
    pub(super) async fn mqtt_host(&self) -> Result<String, ProviderError> {
        match &self.config.mqtt_host {
            Some(h) => Ok(h.clone()),
            None => self.clients.data_endpoint().await.map(str::to_owned),
        }
    }
}
