//! The receive loop of a plain MQTT instance: what the shared session driver
//! ([`super::session`]) needs to know about this provider.
//!
//! - One persistent session (`clean_start = false`, session expiry one day) so QoS 1
//!   messages published while the gateway is away wait at the broker; manual, ordered
//!   acks ([`super::acks`]), resumed after a nack.
//! - Subscriptions at QoS 1 are (re)made on every CONNACK: telemetry, reply and reported
//!   as `$share/{shared_group}/...`, status never shared (brokers send no retained
//!   messages on shared subscriptions, and every replica needs the statuses), with
//!   "retain only on new subscription" so a resumed session does not replay statuses.
//!   Health turns connected when the SUBACK arrives.
//! - A CONNACK refusing the credentials or client id ends the loop with an error;
//!   anything else is retried.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use rumqttc::v5::mqttbytes::v5::{
    ConnectReturnCode, Filter, Publish, RetainForwardRule, SubAck, SubscribeReasonCode,
};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, ConnectionError, EventLoop, Request};
use tracing::{info, warn};

use super::inbound::{self, Inbound, Received, MESSAGE_ID_PROPERTY};
use super::session::{self, Hooks, Settings};
use super::state::{lock, Barrier, Shared, RECEIVE_MAXIMUM, REQUEST_CAPACITY};
use super::topics::TopicKind;
use crate::observed::HealthCell;
use crate::{
    AckHandle, EventKind, EventSender, InstanceName, ProviderError, ProviderEvent, Shutdown,
};

/// Runs until `shutdown`; see the module docs.
pub(super) async fn run(
    shared: Arc<Shared>,
    events: EventSender,
    shutdown: Shutdown,
) -> Result<(), ProviderError> {
    let (client, eventloop) = AsyncClient::new(shared.mqtt_options(), REQUEST_CAPACITY);
    shared.set_client(Some(client.clone()));
    let cfg = &shared.config;
    let settings = Settings {
        reconnect_min: Duration::from_millis(cfg.reconnect_min_ms),
        reconnect_max: Duration::from_millis(cfg.reconnect_max_ms),
        ack_capacity: usize::from(RECEIVE_MAXIMUM) * 4,
    };
    info!(instance = %shared.instance, host = %cfg.host, port = cfg.port, client_id = %cfg.client_id, "mqtt: connecting");
    let mut hooks = MqttHooks {
        shared: shared.clone(),
    };
    session::drive(&mut hooks, client, eventloop, settings, events, shutdown).await
}

/// The plain MQTT side of the shared session driver.
struct MqttHooks {
    shared: Arc<Shared>,
}

impl Hooks for MqttHooks {
    fn name(&self) -> &'static str {
        "mqtt"
    }

    fn peer(&self) -> &'static str {
        "the broker"
    }

    fn instance(&self) -> &InstanceName {
        &self.shared.instance
    }

    fn health(&self) -> &HealthCell {
        &self.shared.health
    }

    fn on_connack(&mut self, eventloop: &mut EventLoop) {
        eventloop
            .pending
            .push_front(Request::Subscribe(subscription(&self.shared)));
    }

    fn on_suback(&mut self, suback: &SubAck) {
        let shared = &self.shared;
        let refused: Vec<String> = suback
            .return_codes
            .iter()
            .zip(filters(shared))
            .filter(|(code, _)| !matches!(code, SubscribeReasonCode::Success(_)))
            .map(|(code, f)| format!("{} ({code:?})", f.path))
            .collect();
        shared.health.set_connected(true);
        if !refused.is_empty() {
            let msg = format!(
                "broker refused subscriptions {}: grant the gateway's user subscribe access",
                refused.join(", ")
            );
            warn!(instance = %shared.instance, "mqtt: {msg}");
            shared.health.note_error(msg);
        }
    }

    fn to_event(&self, publish: &Publish, handle: AckHandle) -> Option<ProviderEvent> {
        to_event(&self.shared, publish, handle)
    }

    fn fatal(&self, e: &ConnectionError) -> Option<ProviderError> {
        fatal(&self.shared, e)
    }

    fn describe(&self, e: &ConnectionError) -> String {
        let cfg = &self.shared.config;
        format!("broker {}:{}: {e}", cfg.host, cfg.port)
    }
}

/// Publishes a marker on each subscribed topic (device id `iotgw-drain-<uuid>`) and
/// returns when all of them came back through the gateway's own subscription: every
/// message the broker delivered before them is then in the event channel. With a
/// shared subscription the markers may go to another replica, and the broker keeps what
/// this one did not ack anyway, so there is nothing to wait for.
pub(super) async fn drain(shared: &Shared) -> Result<(), ProviderError> {
    if !shared.config.shared_group.is_empty() {
        return Ok(());
    }
    let Some(client) = lock(&shared.client).clone() else {
        return Ok(());
    };
    let marker = format!("iotgw-drain-{}", uuid::Uuid::new_v4().simple());
    let (done, finished) = tokio::sync::oneshot::channel();
    let t = &shared.topics;
    let kinds = [
        (TopicKind::Telemetry, t.telemetry.topic_for(&marker)),
        (TopicKind::Status, t.status.topic_for(&marker)),
        (TopicKind::Reply, t.reply.topic_for(&marker)),
        (TopicKind::Reported, t.reported.topic_for(&marker)),
    ];
    *lock(&shared.barrier) = Some(Barrier {
        marker: marker.clone(),
        pending: kinds.iter().map(|(k, _)| *k).collect(),
        done: Some(done),
    });
    for (_, topic) in kinds {
        client
            .publish(topic, QoS::AtLeastOnce, false, "drain")
            .await
            .map_err(|e| shared.transient(format!("publishing the drain marker: {e}")))?;
    }
    let _ = finished.await;
    *lock(&shared.barrier) = None;
    tracing::info!(instance = %shared.instance, "mqtt: drained: everything the broker delivered before the stop is in the pipeline");
    Ok(())
}

/// The filters of the gateway's session, in a fixed order (SUBACK codes follow it).
fn filters(shared: &Shared) -> [Filter; 4] {
    let t = &shared.topics;
    let group = &shared.config.shared_group;
    let filter = |path: String, retain| Filter {
        path,
        qos: QoS::AtLeastOnce,
        nolocal: false,
        preserve_retain: false,
        retain_forward_rule: retain,
    };
    [
        filter(
            t.telemetry.shared_filter(group),
            RetainForwardRule::OnEverySubscribe,
        ),
        filter(t.status.filter(), RetainForwardRule::OnNewSubscribe),
        filter(
            t.reply.shared_filter(group),
            RetainForwardRule::OnEverySubscribe,
        ),
        filter(
            t.reported.shared_filter(group),
            RetainForwardRule::OnEverySubscribe,
        ),
    ]
}

fn subscription(shared: &Shared) -> rumqttc::v5::mqttbytes::v5::Subscribe {
    rumqttc::v5::mqttbytes::v5::Subscribe::new_many(filters(shared), None)
}

/// Refusals retrying cannot fix.
fn fatal(shared: &Shared, e: &ConnectionError) -> Option<ProviderError> {
    let ConnectionError::ConnectionRefused(code) = e else {
        return None;
    };
    let instance = shared.instance.to_string();
    match code {
        ConnectReturnCode::BadUserNamePassword
        | ConnectReturnCode::NotAuthorized
        | ConnectReturnCode::BadAuthenticationMethod
        | ConnectReturnCode::Banned => Some(ProviderError::Unauthorized {
            instance,
            message: format!(
                "broker {}:{} refused user {:?} ({code:?}): check username and password of this instance",
                shared.config.host,
                shared.config.port,
                shared.config.username.as_deref().unwrap_or("<none>")
            ),
        }),
        ConnectReturnCode::ClientIdentifierNotValid | ConnectReturnCode::BadClientId => {
            Some(ProviderError::InvalidInput {
                instance,
                field: "client_id".into(),
                message: format!("broker refused client id {:?}: choose another", shared.config.client_id),
            })
        }
        _ => None,
    }
}

/// Decodes a publish into an event carrying its ack handle, or acks it right away when
/// there is nothing to report.
fn to_event(shared: &Shared, publish: &Publish, handle: AckHandle) -> Option<ProviderEvent> {
    let topic = String::from_utf8_lossy(&publish.topic);
    let Some((kind, device_id)) = shared.topics.classify(&topic) else {
        warn!(instance = %shared.instance, %topic, "mqtt: message on a topic matching no template; the gateway dead-letters it");
        shared.count_dropped();
        return Some(ProviderEvent {
            instance: shared.instance.clone(),
            kind: EventKind::Unusable {
                what: "topic".into(),
                device_id: String::new(),
                reason: format!(
                    "topic {topic} matches none of the instance's topic templates (telemetry_topic, status_topic, reply_topic, reported_topic): publish to one of them, or narrow the broker ACL"
                ),
                payload: publish.payload.clone(),
            },
            ack: handle,
        });
    };
    if shared.barrier_passed(kind, device_id) {
        handle.ack();
        return None;
    }
    let props = publish.properties.as_ref();
    let received_at = Utc::now();
    let msg = Received {
        topic: &topic,
        payload: &publish.payload,
        message_id_property: props.and_then(|p| {
            p.user_properties
                .iter()
                .find(|(k, _)| k == MESSAGE_ID_PROPERTY)
                .map(|(_, v)| v.as_str())
        }),
        correlation_data: props.and_then(|p| p.correlation_data.as_deref()),
        received_at,
    };
    match inbound::decode(kind, device_id, &msg, &shared.config.message_id_pointer) {
        Inbound::Event(kind) => {
            shared.devices.observe(&kind, received_at);
            Some(ProviderEvent {
                instance: shared.instance.clone(),
                kind,
                ack: handle,
            })
        }
        Inbound::Ignore => {
            handle.ack();
            None
        }
        Inbound::Unparsable(reason) => {
            warn!(instance = %shared.instance, %topic, %reason, "mqtt: unparsable message; the gateway dead-letters it");
            shared.count_dropped();
            Some(ProviderEvent {
                instance: shared.instance.clone(),
                kind: EventKind::Unusable {
                    what: match kind {
                        TopicKind::Telemetry => "telemetry",
                        TopicKind::Status => "status",
                        TopicKind::Reply => "reply",
                        TopicKind::Reported => "reported",
                    }
                    .into(),
                    device_id: device_id.to_owned(),
                    reason: format!("{reason} (topic {topic})"),
                    payload: publish.payload.clone(),
                },
                ack: handle,
            })
        }
    }
}
