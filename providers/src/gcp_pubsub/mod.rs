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
//! - [`provider`]: [`GcpPubSubProvider`], the [`crate::Provider`] implementation
//!   (registration, device state; commands are published from its `send_command`: this
//!   provider has no `commands.rs` yet).
//! - [`state`]: what the instance has observed and shares with its receive loops.
//! - [`receive`]: the streaming pulls (flow control, ack after commit, reopen with backoff).
//! - [`inbound`]: payload and attribute formats of telemetry, replies and lifecycle
//!   messages; pure decoding.
//! - `commands.rs`: not a room of its own yet (see `provider`).
//! - `registry.rs`: the control plane is `admin`: topic and subscription checks and
//!   creation, per-device command subscriptions.
//! - `tests/` (tests only): the provider's own tests against the official Pub/Sub
//!   emulator in Docker.
//!
//! Its own rooms:
//! - [`names`]: the resource names of an instance (topics, subscriptions, the per-device
//!   command subscription and its filter) and the attribute names.
//! - [`client`]: the crate's clients (emulator or service, credentials) and the
//!   classification of its errors into [`crate::ProviderError`].

mod admin;
pub mod client;
pub mod inbound;
pub mod names;
pub mod provider;
pub mod receive;
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
