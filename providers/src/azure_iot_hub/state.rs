//! What an `azure_iot_hub` instance shares between the provider handle
//! ([`super::provider`]), its receive paths ([`super::receive`]: the Event Grid endpoint
//! and the Event Hubs consumer), the registry ([`super::registry`]) and the command sender
//! ([`super::commands`]): they import it, it imports none of them, so they never import
//! each other. Its methods are the health bookkeeping every one of them does.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use iotgw_config::AzureIotHubConfig;

use super::c2d::C2dSender;
use super::event_hubs::{Checkpoints, EventSource, PartitionOwnership};
use super::ordering::SharedConnectionSeqs;
use super::rest::{HubClient, HubError};
pub(super) use crate::observed::lock;
use crate::observed::HealthCell;
use crate::{EventSender, InstanceName, ProviderError, ProviderLimits};

/// State shared by the provider, its Event Grid endpoint and its consumers.
pub(super) struct Shared {
    pub(super) instance: InstanceName,
    pub(super) config: AzureIotHubConfig,
    pub(super) hub: HubClient,
    pub(super) limits: ProviderLimits,
    pub(super) health: HealthCell,
    /// The sender of the running `run`; `None` while it is not active.
    pub(super) events: Mutex<Option<EventSender>>,
    pub(super) running: AtomicBool,
    /// Highest committed connection-state sequence number and the event time emitted for
    /// it, per device (Event Grid's `deviceConnectionStateEventInfo.sequenceNumber`).
    pub(super) connection_seq: SharedConnectionSeqs,
    pub(super) c2d: Option<C2dSender>,
    /// The reader of the Event Hubs-compatible endpoint (`event_hubs`), once set.
    pub(super) event_source: Mutex<Option<Arc<dyn EventSource>>>,
    /// Where the Event Hubs consumer keeps its checkpoints.
    pub(super) checkpoints: Mutex<Arc<dyn Checkpoints>>,
    /// Where the Event Hubs consumer claims partitions, and this replica's name in claims.
    pub(super) ownership: Mutex<(Arc<dyn PartitionOwnership>, String)>,
}

impl Shared {
    pub(super) fn try_start(&self) -> bool {
        self.running
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    pub(super) fn stopped(&self) {
        self.set_connected(false);
        self.running.store(false, Ordering::Release);
    }

    pub(super) fn set_connected(&self, connected: bool) {
        self.health.set_connected(connected);
    }

    /// A failed call: transport and credential failures mean the hub is not reachable
    /// as configured; other errors (a missing device, a conflict) leave the state alone.
    pub(super) fn note_error(&self, e: &ProviderError) {
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
    pub(super) fn fail(&self, e: HubError) -> ProviderError {
        let e = self.hub.classify(e);
        self.note_error(&e);
        e
    }

    /// A successful call: the hub is reachable and accepts the credentials.
    pub(super) fn ok(&self) {
        if self.running.load(Ordering::Acquire) {
            self.set_connected(true);
        }
    }
}
