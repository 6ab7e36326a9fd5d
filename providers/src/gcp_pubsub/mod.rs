//! Google Cloud Pub/Sub provider (feature `gcp_pubsub`), on the official
//! `google-cloud-pubsub` crate (googleapis/google-cloud-rust).
//!
//! Google retired Cloud IoT Core in 2023; devices reach Pub/Sub through a bridge the
//! operator chooses, so this provider speaks topics, subscriptions and attributes. The
//! device id travels in a message attribute, never in a topic name. The settings and their
//! defaults are documented on [`iotgw_config::GcpPubSubConfig`].
//!
//! # Layout
//! The rooms every provider folder has, then this provider's own:
//! - `mod.rs`: [`build`] from config.
//! - [`provider`]: [`GcpPubSubProvider`], the [`crate::Provider`] implementation only:
//!   each method hands its work to its room (device state is what the receive loops saw).
//! - [`state`]: what the instance has observed and shares with its receive loops.
//! - [`receive`]: the streaming pulls (flow control, ack after commit, reopen with backoff).
//! - [`inbound`]: payload and attribute formats of telemetry, replies and lifecycle
//!   messages; pure decoding, no I/O.
//! - [`commands`]: how commands go out: one message on the commands topic, the device id
//!   as attribute and ordering key.
//! - [`registry`]: the control plane: Pub/Sub has no devices, so it is topic and
//!   subscription administration (the start-up check or creation of every resource) and
//!   `register`/`unregister`, the per-device command subscriptions.
//! - `tests/` (tests only): the provider's own tests against the official Pub/Sub
//!   emulator in Docker (from `iotgw_testkit::pubsub`).
//!
//! Its own rooms:
//! - [`names`]: the resource names of an instance (topics, subscriptions, the per-device
//!   command subscription and its filter) and the attribute names.
//! - [`client`]: the crate's clients (emulator or service, credentials) and the
//!   classification of its errors into [`crate::ProviderError`].

pub mod client;
pub mod commands;
pub mod inbound;
pub mod names;
pub mod provider;
pub mod receive;
pub mod registry;
pub mod state;

#[cfg(test)]
mod tests;

use std::sync::Arc;

pub use provider::GcpPubSubProvider;

/// Builds the provider of instance `instance` (what the gateway calls for each
/// `kind = "gcp_pubsub"` instance). Validates the settings and builds the clients; the
/// resources are checked, or created with `create_if_missing`, when `run` starts.
pub async fn build(
    instance: &crate::InstanceName,
    config: &iotgw_config::GcpPubSubConfig,
) -> Result<Arc<dyn crate::Provider>, crate::ProviderError> {
    Ok(Arc::new(GcpPubSubProvider::new(instance, config).await?))
}
