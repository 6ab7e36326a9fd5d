//! What a `gcp_pubsub` instance has observed and shares between the provider handle
//! ([`super::provider`]), its receive loops ([`super::receive`]), the control plane
//! ([`super::registry`]) and the command sender ([`super::commands`]): they import it, it
//! imports none of them, so they never import each other.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use iotgw_config::GcpPubSubConfig;

use super::client::Clients;
use super::names::Names;
use crate::observed::{DeviceBook, HealthCell};
use crate::{InstanceName, ProviderError};

/// State shared by the provider handle and its receive loops.
pub(super) struct Shared {
    pub(super) instance: InstanceName,
    pub(super) config: GcpPubSubConfig,
    pub(super) names: Names,
    pub(super) clients: Clients,
    pub(super) health: HealthCell,
    pub(super) devices: DeviceBook,
    pub(super) running: AtomicBool,
    pub(super) dropped: AtomicU64,
}

impl Shared {
    pub(super) fn transient(&self, message: impl Into<String>) -> ProviderError {
        ProviderError::Transient {
            instance: self.instance.to_string(),
            message: message.into(),
        }
    }

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
}
