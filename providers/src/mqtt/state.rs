//! What a plain MQTT instance has observed and shares between the provider handle
//! ([`super::provider`]), its receive loop ([`super::receive`]) and the command sender
//! ([`super::commands`]): they import it, it imports none of them, so they never import
//! each other.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use iotgw_config::MqttConfig;
use rumqttc::v5::{AsyncClient, MqttOptions};

use super::topics::{TopicKind, Topics};
pub(super) use crate::observed::lock;
use crate::observed::{DeviceBook, HealthCell};
use crate::{InstanceName, ProviderError};

/// Session expiry asked of the broker: queued QoS 1 messages survive a gateway outage of
/// up to one day.
pub const SESSION_EXPIRY_SECS: u32 = 24 * 60 * 60;

/// Unacknowledged QoS 1 messages the broker may have in flight to the gateway (MQTT 5
/// Receive Maximum). Bounds how many events wait for the gateway's ack at once. The
/// gateway acks a whole group commit at a time (up to `pipeline.batch_max_events`, 512 by
/// default) while it gathers the next one, so the window holds two batches: with 128 the
/// broker stalled every batch at 128 events and readings queued at the broker.
pub const RECEIVE_MAXIMUM: u16 = 1024;

/// Capacity of rumqttc's request channel (publishes, acks, subscribes): room for the acks
/// of a whole batch.
pub(super) const REQUEST_CAPACITY: usize = 1024;

/// Headroom above `max_payload_bytes` for the topic and properties of a packet.
const PACKET_OVERHEAD: usize = 64 * 1024;

/// State shared by the provider handle and its receive loop.
pub(super) struct Shared {
    pub(super) instance: InstanceName,
    pub(super) config: MqttConfig,
    pub(super) topics: Topics,
    pub(super) health: HealthCell,
    pub(super) devices: DeviceBook,
    /// The client of the running loop; `None` while `run` is not active.
    pub(super) client: Mutex<Option<AsyncClient>>,
    pub(super) running: AtomicBool,
    pub(super) dropped: AtomicU64,
    /// The drain barrier in flight, if any (see [`crate::Provider::drain`]).
    pub(super) barrier: Mutex<Option<Barrier>>,
    /// TLS to the broker (`tls`), built once from the configured files.
    pub(super) tls: Option<std::sync::Arc<rustls::ClientConfig>>,
}

/// A drain barrier: one marker message published on each subscribed topic; the broker
/// delivers each filter's messages in order, so once every marker came back, everything
/// delivered before it on that filter has been handed to the event channel.
pub(super) struct Barrier {
    /// The device-id level of the marker topics.
    pub(super) marker: String,
    /// Topic kinds whose marker has not come back yet.
    pub(super) pending: Vec<TopicKind>,
    /// Fired when `pending` is empty.
    pub(super) done: Option<tokio::sync::oneshot::Sender<()>>,
}

/// Sets `o` to speak TLS with `tls`, if the instance has it (the gateway's session and the
/// dynsec admin's alike).
pub(super) fn with_tls(o: &mut MqttOptions, tls: Option<&std::sync::Arc<rustls::ClientConfig>>) {
    if let Some(tls) = tls {
        o.set_transport(rumqttc::Transport::tls_with_config(
            rumqttc::TlsConfiguration::Rustls(tls.clone()),
        ));
    }
}

impl Shared {
    pub(super) fn transient(&self, message: impl Into<String>) -> ProviderError {
        ProviderError::Transient {
            instance: self.instance.to_string(),
            message: message.into(),
        }
    }

    /// The rumqttc options of the gateway's session.
    pub(super) fn mqtt_options(&self) -> MqttOptions {
        let c = &self.config;
        let mut o = MqttOptions::new(c.client_id.clone(), c.host.clone(), c.port);
        o.set_keep_alive(Duration::from_secs(c.keep_alive_secs))
            .set_clean_start(false)
            .set_session_expiry_interval(Some(SESSION_EXPIRY_SECS))
            .set_manual_acks(true)
            .set_receive_maximum(Some(RECEIVE_MAXIMUM))
            .set_request_channel_capacity(REQUEST_CAPACITY)
            // Oversize telemetry must still arrive so the gateway can dead-letter it with a
            // reason; only packets beyond twice the limit are discarded by the broker.
            .set_max_packet_size(Some(
                u32::try_from(
                    c.max_payload_bytes
                        .saturating_mul(2)
                        .saturating_add(PACKET_OVERHEAD),
                )
                .unwrap_or(u32::MAX),
            ));
        with_tls(&mut o, self.tls.as_ref());
        if let Some(user) = &c.username {
            o.set_credentials(
                user.clone(),
                c.password
                    .as_ref()
                    .map(|p| p.expose().to_owned())
                    .unwrap_or_default(),
            );
        }
        o
    }

    pub(super) fn set_client(&self, client: Option<AsyncClient>) {
        *lock(&self.client) = client;
    }

    pub(super) fn try_start(&self) -> bool {
        self.running
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    pub(super) fn stopped(&self) {
        self.set_client(None);
        self.health.set_connected(false);
        self.running.store(false, Ordering::Release);
    }

    pub(super) fn count_dropped(&self) {
        self.dropped.fetch_add(1, Ordering::Relaxed);
    }

    /// Whether `device_id` on a `kind` topic is a drain marker (then it is consumed here).
    pub(super) fn barrier_passed(&self, kind: TopicKind, device_id: &str) -> bool {
        let mut guard = lock(&self.barrier);
        let Some(b) = guard.as_mut().filter(|b| b.marker == device_id) else {
            return false;
        };
        b.pending.retain(|k| *k != kind);
        if b.pending.is_empty() {
            if let Some(done) = b.done.take() {
                let _ = done.send(());
            }
        }
        true
    }
}
