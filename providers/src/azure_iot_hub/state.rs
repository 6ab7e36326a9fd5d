//! What an `azure_iot_hub` instance shares between the provider handle
//! ([`super::provider`]), its Event Grid endpoint ([`super::event_grid`]) and its Event
//! Hubs consumer: they import it, it imports none of them, so the provider and the
//! receive paths it starts never import each other. Its methods stay with the provider.

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use iotgw_config::AzureIotHubConfig;

use super::c2d::C2dSender;
use super::event_hubs::{Checkpoints, EventSource};
use super::ordering::SharedConnectionSeqs;
use super::rest::HubClient;
pub(super) use crate::observed::lock;
use crate::observed::HealthCell;
use crate::{EventSender, InstanceName, ProviderLimits};

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
}
