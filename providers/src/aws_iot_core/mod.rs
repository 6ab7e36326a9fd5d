//! AWS IoT Core provider (feature `aws_iot_core`): `aws-sdk-iot` for the registry,
//! `aws-sdk-iotdataplane` for commands and shadows, rumqttc (MQTT 5, mutual TLS) on the
//! account endpoint for telemetry, command replies and presence.
//!
//! # Layout
//! The rooms every provider folder has, then this provider's own:
//! - `mod.rs`: [`build`] from config.
//! - [`provider`]: [`AwsIotCoreProvider`], the [`crate::Provider`] implementation only:
//!   each method hands its work to its room; device state is read there (the shadow, and
//!   the presence events the receive loop saw).
//! - [`state`]: what the instance has observed and shares with its receive loop.
//! - [`receive`]: the MQTT receive loop (what differs on AWS; the session itself is
//!   [`crate::mqtt::session`]: persistent session, in-order manual acks, reconnects),
//!   presence ordered by event time.
//! - [`inbound`]: presence events and shadow documents (pure decoding, no I/O).
//! - [`commands`]: how commands go out: the `iot-data` Publish API at QoS 1 with MQTT 5
//!   properties (never the gateway's own MQTT session).
//! - [`registry`]: register and unregister (thing, certificate, policy, attachments,
//!   shadow), with rollback of partial registrations.
//! - `tests/` (tests only): the provider's own tests against moto (iot, iot-data) and a
//!   Mosquitto with client-certificate TLS standing in for the AWS IoT Core MQTT endpoint,
//!   both from `iotgw_testkit`.
//!
//! Its own rooms:
//! - [`clients`]: the shared AWS SDK configuration and the `iot` / `iot-data` clients.
//! - [`errors`]: AWS errors classified into [`crate::ProviderError`].
//! - [`topics`]: the topic scheme (configured templates plus AWS's reserved topics).
//! - [`policy`]: the per-device IoT policy, thing attributes and type names (pure).
//! - [`tls`]: the rustls configuration of the MQTT connection (ring, ALPN on 443).
//!
//! Topic templates and telemetry/reply payload decoding are the mqtt module's
//! ([`crate::mqtt::topics`], [`crate::mqtt::inbound`]), so both providers read device
//! messages the same way.

pub mod clients;
pub mod commands;
pub mod errors;
pub mod inbound;
pub mod policy;
pub mod provider;
pub mod receive;
pub mod registry;
pub mod state;
pub mod tls;
pub mod topics;

#[cfg(test)]
#[allow(
    clippy::disallowed_methods,
    reason = "tests against a local moto and an in-process proxy over plain HTTP: no TLS roots or timeouts to configure"
)]
mod tests;

use std::sync::Arc;

use iotgw_config::AwsIotCoreConfig;

pub use provider::{AwsIotCoreProvider, AWS_MAX_PAYLOAD_BYTES};

/// Builds the provider of instance `instance` (what the gateway calls for each
/// `kind = "aws_iot_core"` section). Connects nothing; see [`AwsIotCoreProvider::new`].
pub async fn build(
    instance: &crate::InstanceName,
    config: &AwsIotCoreConfig,
) -> Result<Arc<dyn crate::Provider>, crate::ProviderError> {
    Ok(Arc::new(AwsIotCoreProvider::new(instance, config).await?))
}
