//! Azure IoT Hub provider (feature `azure_iot_hub`).
//!
//! IoT Hub has no emulator, so every wire format here is checked against the official
//! Azure SDK's own requests (see `docs/azure_iot_hub.md`).
//!
//! # Layout
//! - [`sas`]: SAS tokens (`SharedAccessSignature sr=...&sig=...&se=...&skn=...`), cached
//!   and renewed before expiry.
//! - [`models`]: the REST API's JSON shapes (devices, bulk operations, twins, methods).
//! - [`rest`]: [`HubClient`], the service REST API (api-version 2021-04-12) with retries
//!   of 429/503 after `Retry-After` and error classification.
//! - [`provider`]: [`AzureIotHubProvider`], the [`crate::Provider`] implementation.
//! - [`c2d`]: cloud-to-device messages over AMQP 1.0 (CBS put-token, `/messages/devicebound`).
//! - [`event_hubs`]: the Event Hubs-compatible endpoint consumer behind traits (mapping,
//!   ordering, ack-then-checkpoint), with the [`event_hubs::Checkpoints`] it saves to.
//! - `event_hubs_client` (feature `azure_event_hubs`): the real reader of that endpoint on
//!   the official `azure_messaging_eventhubs` client.
//! - [`event_grid`]: the Event Grid webhook (both schemas, validation handshake, secret,
//!   ordering by sequence number, ack-before-200).
//! - `fakes` (tests, or feature `azure_fakes`): recording fakes of the hub's HTTPS, AMQP
//!   (C2D) and Event Hubs-compatible endpoints.
//! - `differential` (tests only): the official Python SDK and iotgw drive the fakes and are
//!   compared request by request.
//!
//! The provider keeps no device state of its own and never touches the store.

pub mod c2d;
pub mod event_grid;
pub mod event_hubs;
#[cfg(feature = "azure_event_hubs")]
pub mod event_hubs_client;
pub mod models;
pub mod provider;
pub mod rest;
pub mod sas;

#[cfg(test)]
mod differential;
#[cfg(any(test, feature = "azure_fakes"))]
pub mod fakes;

use std::sync::Arc;

pub use provider::AzureIotHubProvider;
pub use rest::HubClient;

/// Builds the provider of instance `instance` (the gateway's entry point).
pub async fn build(
    instance: &str,
    config: &iotgw_config::AzureIotHubConfig,
) -> Result<Arc<dyn crate::Provider>, crate::ProviderError> {
    Ok(Arc::new(AzureIotHubProvider::new(instance, config)?))
}
