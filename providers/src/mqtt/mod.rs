//! Plain MQTT 5 provider (feature `mqtt`), on rumqttc's v5 client.
//!
//! # Layout
//! The rooms every provider folder has, then this provider's own:
//! - `mod.rs`: [`build`] from config.
//! - [`provider`]: [`MqttProvider`], the [`crate::Provider`] implementation only: each
//!   method hands its work to the room below that does it.
//! - [`state`]: what the instance has observed and shares with its receive loop.
//! - [`receive`]: the receive loop of a plain MQTT instance (its subscriptions, decoding,
//!   the drain barrier), on the shared session driver.
//! - [`inbound`]: payload formats of the inbound topics, telemetry message ids (pure, no
//!   I/O).
//! - [`commands`]: how commands go out: a QoS 1 publish on the receive loop's session, the
//!   correlation id as MQTT 5 correlation data and/or in the payload.
//! - `registry.rs`: does not apply: a broker has no device registry (the gateway's store
//!   is the only one). The one control plane a broker may have, per-device credentials,
//!   is Mosquitto's dynamic security, in its own room [`dynsec`].
//! - `tests/` (tests only): the provider's own tests against Mosquitto 2 in Docker (one
//!   broker per test, from `iotgw_testkit::mosquitto`).
//!
//! Its own rooms:
//! - [`topics`]: topic templates (`{device_id}` is one whole level): device topics,
//!   subscription filters, device id extraction, validation.
//! - [`session`]: the one MQTT session driver, shared with `aws_iot_core`: polls the
//!   event loop, reconnects, sends PUBACKs (persistent session, manual acks).
//! - [`acks`]: the ordered-ack state machine the driver runs, pure (no I/O).
//! - [`dynsec`]: Mosquitto dynamic-security administration (per-device broker clients and
//!   roles, created by `register` and deleted by `unregister` when `dynsec` is configured).

pub(crate) mod acks;
pub mod commands;
pub mod dynsec;
pub mod inbound;
pub mod provider;
pub mod receive;
pub(crate) mod session;
pub mod state;
pub mod topics;

#[cfg(test)]
mod tests;

pub use dynsec::DynsecAdmin;
pub use provider::{MqttProvider, RECEIVE_MAXIMUM, SESSION_EXPIRY_SECS};
pub use topics::{TopicError, TopicKind, TopicTemplate, Topics};

use std::sync::Arc;

/// Builds the provider of instance `instance` (what the gateway calls for each
/// `kind = "mqtt"` instance), as every other provider folder does. Validates the settings;
/// connects nothing: [`crate::Provider::run`] does.
pub async fn build(
    instance: &crate::InstanceName,
    config: &iotgw_config::MqttConfig,
) -> Result<Arc<dyn crate::Provider>, crate::ProviderError> {
    Ok(Arc::new(MqttProvider::new(instance, config)?))
}
