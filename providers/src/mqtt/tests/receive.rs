//! Inbound: telemetry, acks and redelivery, statuses and last wills, reconnects.

use bytes::Bytes;
use rumqttc::v5::mqttbytes::v5::{LastWill, PublishProperties};
use rumqttc::v5::mqttbytes::QoS;

use super::*;
use crate::{AckHandle, Telemetry};

async fn publish(device: &Device, topic: &str, payload: &'static [u8]) {
    device
        .client
        .publish(topic, QoS::AtLeastOnce, false, Bytes::from_static(payload))
        .await
        .expect("publish queued");
}

#[tokio::test]
async fn telemetry_from_a_device_topic_arrives_as_an_event_with_its_device_id() {
    let Some(broker) = broker().await else {
        return;
    };
    let p = provider(&config(&broker, "gw-telemetry"));
    let mut run = Running::start_connected(p.clone()).await;
    let device = Device::connect(broker.port(), "pump-1", DeviceOptions::default())
        .await
        .expect("device connects");

    publish(
        &device,
        "devices/pump-1/telemetry",
        br#"{"temperature":80,"message_id":"m-1"}"#,
    )
    .await;
    let (t, ack) = run.telemetry().await;
    assert_eq!(
        (t.device_id.as_str(), t.message_id.as_str()),
        ("pump-1", "m-1")
    );
    assert_eq!(
        t.payload.as_ref(),
        br#"{"temperature":80,"message_id":"m-1"}"#
    );
    ack.ack();

    let props = PublishProperties {
        user_properties: vec![("message_id".into(), "prop-9".into())],
        ..PublishProperties::default()
    };
    device
        .client
        .publish_with_properties(
            "devices/pump-1/telemetry",
            QoS::AtLeastOnce,
            false,
            "21.5",
            props,
        )
        .await
        .expect("publish queued");
    let (t, ack) = run.telemetry().await;
    assert_eq!(
        (t.device_id.as_str(), t.message_id.as_str()),
        ("pump-1", "prop-9")
    );
    ack.ack();

    let id = iotgw_ids::DeviceId::parse("pump-1").expect("valid id");
    let state = p.device_state(&id).await.expect("state");
    assert!(state.last_activity.is_some(), "{state:?}");
    run.stop().await.expect("clean stop");
}

#[tokio::test]
async fn unacked_telemetry_is_redelivered_after_the_provider_restarts() {
    let Some(broker) = broker().await else {
        return;
    };
    let mut config = config(&broker, "gw-redelivery");
    // No nack-triggered session resume during this test: only the restart redelivers.
    config.reconnect_max_ms = 60_000;
    let p = provider(&config);
    let device = Device::connect(broker.port(), "valve-1", DeviceOptions::default())
        .await
        .expect("device connects");

    // First run: receive, drop the handle unanswered (a nack), stop.
    let mut run = Running::start_connected(p.clone()).await;
    publish(
        &device,
        "devices/valve-1/telemetry",
        br#"{"message_id":"first"}"#,
    )
    .await;
    let (t, ack) = run.telemetry().await;
    assert_eq!(t.message_id, "first");
    drop(ack);
    run.stop().await.expect("clean stop");

    // While the gateway is away a second message is queued in its session.
    publish(
        &device,
        "devices/valve-1/telemetry",
        br#"{"message_id":"while-away"}"#,
    )
    .await;

    // Second run, same client id: both arrive; ack them.
    let mut run = Running::start(p.clone());
    let mut seen = Vec::new();
    for _ in 0..2 {
        let (t, ack) = run.telemetry().await;
        seen.push(t.message_id);
        ack.ack();
    }
    seen.sort();
    assert_eq!(seen, ["first", "while-away"]);
    run.stop().await.expect("clean stop");

    // Third run: the acked messages do not come back; the next event is a new one.
    let mut run = Running::start_connected(p.clone()).await;
    publish(
        &device,
        "devices/valve-1/telemetry",
        br#"{"message_id":"marker"}"#,
    )
    .await;
    let (t, ack): (Telemetry, AckHandle) = run.telemetry().await;
    assert_eq!(
        t.message_id,
        "marker",
        "acked messages must not be redelivered: {}",
        broker.logs().await
    );
    ack.ack();
    run.stop().await.expect("clean stop");
}

#[tokio::test]
async fn nacked_telemetry_is_redelivered_without_restarting_the_provider() {
    let Some(broker) = broker().await else {
        return;
    };
    let mut config = config(&broker, "gw-nack");
    config.reconnect_max_ms = 200;
    let mut run = Running::start_connected(provider(&config)).await;
    let device = Device::connect(broker.port(), "fan-1", DeviceOptions::default())
        .await
        .expect("device connects");

    publish(
        &device,
        "devices/fan-1/telemetry",
        br#"{"message_id":"again"}"#,
    )
    .await;
    let (t, ack) = run.telemetry().await;
    assert_eq!(t.message_id, "again");
    ack.nack("store unavailable");
    // The session resume is checked when a packet arrives (or at the keep-alive ping, 5 s
    // here): keep traffic flowing with acked nudges until the nacked message is back.
    let nudger = device.client.clone();
    let nudges = tokio::spawn(async move {
        loop {
            let _ = nudger
                .publish(
                    "devices/fan-1/telemetry",
                    QoS::AtLeastOnce,
                    false,
                    r#"{"message_id":"nudge"}"#,
                )
                .await;
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    });
    let mut redelivered = false;
    for _ in 0..40 {
        let (t, ack) = run.telemetry().await;
        ack.ack();
        if t.message_id == "again" {
            redelivered = true;
            break;
        }
    }
    nudges.abort();
    assert!(redelivered, "the nacked message came back");
    run.stop().await.expect("clean stop");
}

#[tokio::test]
async fn retained_status_and_last_will_become_connection_events() {
    let Some(broker) = broker().await else {
        return;
    };
    let will = LastWill::new(
        "devices/pump-7/status",
        "offline",
        QoS::AtLeastOnce,
        true,
        None,
    );
    let device = Device::connect(
        broker.port(),
        "pump-7",
        DeviceOptions {
            last_will: Some(will),
            ..DeviceOptions::default()
        },
    )
    .await
    .expect("device connects");
    device
        .client
        .publish("devices/pump-7/status", QoS::AtLeastOnce, true, "online")
        .await
        .expect("publish queued");
    let p = provider(&config(&broker, "gw-status"));
    // The retained status was published before the gateway subscribed: wait until the
    // broker holds it by reading it back through the provider.
    let mut run = Running::start(p.clone());
    let ev = run
        .next("retained online status", |k| {
            matches!(k, EventKind::Connection { device_id, connected: true, .. } if device_id == "pump-7")
        })
        .await;
    ev.ack.ack();
    let id = iotgw_ids::DeviceId::parse("pump-7").expect("valid id");
    assert_eq!(
        p.device_state(&id).await.expect("state").connected,
        Some(true)
    );

    device.kill();
    let ev = run
        .next("last will offline status", |k| {
            matches!(k, EventKind::Connection { device_id, connected: false, .. } if device_id == "pump-7")
        })
        .await;
    ev.ack.ack();
    assert_eq!(
        p.device_state(&id).await.expect("state").connected,
        Some(false)
    );
    run.stop().await.expect("clean stop");

    // A resumed session resubscribes without replaying the retained "offline": the next
    // status event is the device's new one.
    let mut run = Running::start_connected(p.clone()).await;
    let device = Device::connect(broker.port(), "pump-7", DeviceOptions::default())
        .await
        .expect("device reconnects");
    publish(
        &device,
        "devices/pump-7/status",
        br#"{"connected":true,"at":"2030-01-01T00:00:00Z"}"#,
    )
    .await;
    let ev = run
        .next("a status event", |k| {
            matches!(k, EventKind::Connection { .. })
        })
        .await;
    assert!(
        matches!(
            ev.kind,
            EventKind::Connection {
                connected: true,
                ..
            }
        ),
        "{:?}",
        ev.kind
    );
    ev.ack.ack();
    run.stop().await.expect("clean stop");
}

#[tokio::test]
async fn provider_reconnects_and_resubscribes_after_a_broker_restart() {
    let Some(broker) = broker().await else {
        return;
    };
    let p = provider(&config(&broker, "gw-restart"));
    let mut run = Running::start_connected(p.clone()).await;

    broker.kill().await.expect("the broker is killed");
    run.wait_health(false).await;
    assert!(
        p.health().last_error.is_some(),
        "health names the error: {:?}",
        p.health()
    );

    broker.start_again().await.expect("the broker starts again");
    // SIGKILL lost the broker's state, so connected (SUBACK seen) means resubscribed.
    run.wait_health(true).await;
    let device = Device::connect(broker.port(), "pump-9", DeviceOptions::default())
        .await
        .expect("device connects");
    publish(
        &device,
        "devices/pump-9/telemetry",
        br#"{"message_id":"after-restart"}"#,
    )
    .await;
    let (t, ack) = run.telemetry().await;
    assert_eq!(
        (t.device_id.as_str(), t.message_id.as_str()),
        ("pump-9", "after-restart")
    );
    ack.ack();
    run.stop().await.expect("clean stop");
}

#[tokio::test]
async fn unparsable_replies_and_stray_topics_become_unusable_events_for_the_dead_letters() {
    let Some(broker) = broker().await else {
        return;
    };
    let p = provider(&config(&broker, "gw-unparsable"));
    let mut run = Running::start_connected(p.clone()).await;
    let device = Device::connect(broker.port(), "pump-4", DeviceOptions::default())
        .await
        .expect("device connects");
    publish(&device, "devices/pump-4/replies", b"not json").await;
    let ev = run
        .next("the unusable reply", |k| {
            matches!(k, EventKind::Unusable { .. })
        })
        .await;
    match &ev.kind {
        EventKind::Unusable {
            what,
            device_id,
            reason,
            payload,
        } => {
            assert_eq!((what.as_str(), device_id.as_str()), ("reply", "pump-4"));
            assert!(reason.contains("devices/pump-4/replies"), "{reason}");
            assert_eq!(payload.as_ref(), b"not json");
        }
        other => unreachable!("filtered above: {other:?}"),
    }
    ev.ack.ack();
    publish(
        &device,
        "devices/pump-4/telemetry",
        br#"{"message_id":"after"}"#,
    )
    .await;
    let (t, ack) = run.telemetry().await;
    assert_eq!(t.message_id, "after");
    ack.ack();
    assert_eq!(p.dropped_messages(), 1);
    run.stop().await.expect("clean stop");
}
