//! Azure IoT Hub provider (feature `azure_iot_hub`).
//!
//! IoT Hub has no emulator, so every wire format here is checked against the official
//! Azure SDK's own requests (see `docs/azure_iot_hub.md`).
//!
//! # Layout
//! The rooms every provider folder has, then this provider's own:
//! - `mod.rs`: [`build`] from config.
//! - [`provider`]: [`AzureIotHubProvider`], the [`crate::Provider`] implementation only:
//!   each method hands its work to its room (device state is the twin, read over [`rest`]
//!   and decoded by [`inbound`]).
//! - [`state`]: what the instance shares with its receive paths, registry and command
//!   sender, and the health bookkeeping they all do.
//! - [`receive`]: the receive paths: `run` (credential probe, then the Event Hubs consumer
//!   and the C2D feedback receiver until shutdown) and the Event Grid webhook (validation
//!   handshake, secret, ack-before-200).
//! - [`inbound`]: pure decoding, no I/O: Event Grid batches (both schemas) and events of
//!   the Event Hubs-compatible endpoint into pipeline events, and a twin into a device
//!   state.
//! - [`commands`]: how commands go out, per `command_delivery`: a direct method or a
//!   desired property over [`rest`], or a C2D message over [`c2d`].
//! - [`registry`]: the control plane: the identity registry (symmetric-key devices, one
//!   at a time or in bulk, tags and desired settings on the twin, deletion) over [`rest`].
//! - `tests/` (tests only): the provider's own tests: the official Python SDK and iotgw
//!   drive the `fakes` and are compared request by request (IoT Hub has no emulator).
//!
//! Its own rooms (IoT Hub has no emulator, so every wire format here is checked against
//! the official Azure SDK's own requests):
//! - [`rest`]: [`HubClient`], the service REST API (api-version 2021-04-12): SAS-signed
//!   requests, retries of 429/503 after `Retry-After`, error classification, and the JSON
//!   shapes it sends and reads.
//! - [`c2d`]: cloud-to-device messages over AMQP 1.0 (CBS put-token,
//!   `/messages/devicebound`) and their delivery feedback.
//! - [`sas`]: SAS tokens (`SharedAccessSignature sr=...&sig=...&se=...&skn=...`), cached
//!   and renewed before expiry.
//! - [`event_hubs`]: the consumer of the Event Hubs-compatible endpoint, the second receive
//!   path: one receiver per partition behind traits, ack-then-checkpoint, the
//!   [`event_hubs::Checkpoints`] it saves to.
//! - `partitions` and [`balance`]: which partitions this replica reads: claims in a
//!   [`crate::PartitionOwnership`] shared by the replicas, balanced each interval (fair
//!   share, takeover of expired claims, stealing), a receiver per partition held.
//! - `event_hubs_client` (feature `azure_event_hubs`): the real reader of the Event
//!   Hubs-compatible endpoint on the official `azure_messaging_eventhubs` client.
//! - [`ordering`]: connection-sequence ordering, which both event paths use.
//! - `fakes` (tests, or feature `azure_fakes`): recording fakes of the hub's HTTPS, AMQP
//!   (C2D) and Event Hubs-compatible endpoints.
//!
//! The provider keeps no device state of its own and never touches the store.

pub mod balance;
pub mod c2d;
pub mod commands;
pub mod event_hubs;
#[cfg(feature = "azure_event_hubs")]
pub mod event_hubs_client;
pub mod inbound;
pub mod ordering;
mod partitions;
pub mod provider;
pub mod receive;
pub mod registry;
pub mod rest;
pub mod sas;
pub mod state;

#[cfg(any(test, feature = "azure_fakes"))]
pub mod fakes;
#[cfg(test)]
mod tests;

use std::sync::Arc;

pub use provider::AzureIotHubProvider;
pub use rest::HubClient;

/// Builds the provider of instance `instance` (the gateway's entry point). A config with
/// `event_hubs` in a build without the Event Hubs client is refused here, before the
/// gateway starts, naming the key and the fix.
pub async fn build(
    instance: &crate::InstanceName,
    config: &iotgw_config::AzureIotHubConfig,
) -> Result<Arc<dyn crate::Provider>, crate::ProviderError> {
    event_hubs_buildable(instance, config, cfg!(feature = "azure_event_hubs"))?;
    Ok(Arc::new(AzureIotHubProvider::new(instance, config)?))
}

/// `event_hubs` needs the client that the feature `azure_event_hubs` (`built`) compiles in.
pub fn event_hubs_buildable(
    instance: &str,
    config: &iotgw_config::AzureIotHubConfig,
    built: bool,
) -> Result<(), crate::ProviderError> {
    if config.event_hubs.is_none() || built {
        return Ok(());
    }
    Err(crate::ProviderError::InvalidInput {
        instance: instance.to_owned(),
        field: "event_hubs".into(),
        message: "this build has no Event Hubs client (it is the Cargo feature azure_event_hubs, off by default): rebuild with `cargo build --release -p iotgw --features azure_event_hubs`, or remove the event_hubs section and let Event Grid push to /hooks/<instance>".into(),
    })
}

#[cfg(test)]
mod build_tests {
    use super::*;

    #[test]
    fn event_hubs_without_its_feature_is_refused_naming_the_key_and_the_fix() {
        let mut c = iotgw_config::AzureIotHubConfig::default();
        assert!(
            event_hubs_buildable("hub", &c, false).is_ok(),
            "no section, no need"
        );
        c.event_hubs = Some(iotgw_config::azure_iot_hub::EventHubsConfig {
            connection_string: iotgw_config::Secret::new("Endpoint=sb://n.servicebus.windows.net/;SharedAccessKeyName=s;SharedAccessKey=k;EntityPath=h"),
            consumer_group: "$Default".into(),
            start: Default::default(),
            custom_endpoint: None,
            load_balancing_interval_ms: iotgw_config::azure_iot_hub::default_load_balancing_interval(),
            ownership_expiry_ms: iotgw_config::azure_iot_hub::default_ownership_expiry(),
        });
        assert!(event_hubs_buildable("hub", &c, true).is_ok());
        match event_hubs_buildable("hub", &c, false) {
            Err(crate::ProviderError::InvalidInput { field, message, .. }) => {
                assert_eq!(field, "event_hubs");
                assert!(message.contains("--features azure_event_hubs"), "{message}");
            }
            other => panic!("expected InvalidInput, got {other:?}"),
        }
    }
}
