//! Inbound: telemetry with acks after commit, redelivery after a crash or a nack, the
//! dead-letter topic, replies and lifecycle events.

use google_cloud_auth::credentials::anonymous;
use google_cloud_pubsub::client::{Publisher, SubscriptionAdmin};
use google_cloud_pubsub::model::Message;
use google_cloud_pubsub::subscriber::ShutdownBehavior;

use super::*;
use crate::gcp_pubsub::names::subscription_path;

#[tokio::test]
async fn telemetry_arrives_with_its_device_attribute_and_message_id_token_and_once_acked_stays_acked(
) {
    let Some(emu) = emulator().await else {
        return;
    };
    let config = config(&emu, "telemetry");
    let bridge = Bridge::new(&emu, &config);
    let p = provider(&config).await;
    let mut run = Running::start_connected(p.clone()).await;

    let id = bridge.telemetry("pump-1", r#"{"temperature":80}"#).await;
    let (t, ack) = run.telemetry().await;
    assert_eq!(
        (t.device_id.as_str(), pubsub_id(&t.message_id)),
        ("pump-1", id.as_str())
    );
    assert!(
        t.message_id.starts_with(&format!("{id}@20")),
        "alert token = message id @ publish time: {}",
        t.message_id
    );
    assert_eq!(t.payload.as_ref(), br#"{"temperature":80}"#);
    ack.ack();

    let marker = bridge.telemetry("pump-1", r#"{"marker":true}"#).await;
    let (t, ack) = run.telemetry().await;
    assert_eq!(
        pubsub_id(&t.message_id),
        marker,
        "an acked message must not come back"
    );
    ack.ack();

    let device = iotgw_ids::DeviceId::parse("pump-1").expect("valid id");
    let state = p.device_state(&device).await.expect("state");
    assert!(state.last_activity.is_some(), "{state:?}");
    run.stop().await.expect("clean stop");
}

#[tokio::test]
#[ignore = "flaky under parallel load: in two clean-clone CI runs on 2 cores (2026-12-01) the emulator never redelivered within 35 s, then 55 s, though alone it does in 23-34 s; run it with `cargo test -p iotgw-providers --features gcp_pubsub -- --ignored a_message_pulled`"]
async fn a_message_pulled_but_not_committed_when_the_gateway_stops_is_redelivered_with_the_same_message_id(
) {
    let Some(emu) = emulator().await else {
        return;
    };
    let config = config(&emu, "crash");
    let bridge = Bridge::new(&emu, &config);

    // First gateway, through a proxy: pulls the message and crashes before committing it
    // (its connections to Pub/Sub reset at once, so neither a nack nor a lease extension
    // arrives any more), then its remains are stopped.
    let proxy = CutProxy::start(&emu.emulator_host()).await;
    let crashing = GcpPubSubConfig {
        emulator_host: Some(proxy.host.clone()),
        ..config.clone()
    };
    let first = provider(&crashing).await;
    let mut run = Running::start_connected(first.clone()).await;
    let id = bridge.telemetry("valve-1", r#"{"pressure":9}"#).await;
    let (t, ack) = run.telemetry().await;
    assert_eq!(pubsub_id(&t.message_id), id);
    let token = t.message_id;
    proxy.cut();
    run.shutdown.cancel();
    drop(ack);
    let _ = run.stop().await;
    drop(first);

    // A new gateway on the same subscription gets it again, same message id (the alert
    // token), and commits it.
    let mut run = Running::start_connected(provider(&config).await).await;
    // Pub/Sub redelivers it once its lease lapsed: one ack deadline after the crash (the
    // last extension) in principle, but the emulator notices the dead stream late: 23 to
    // 34 s measured with this test alone (ack deadline 10 s), and a clean-clone CI run with
    // the whole library's tests in parallel on two cores passed 35 s. Allow four.
    let (t, ack) = run
        .telemetry_within(Duration::from_secs(4 * u64::from(config.ack_deadline_secs)) + WAIT)
        .await;
    assert_eq!(
        (t.device_id.as_str(), t.message_id.as_str()),
        ("valve-1", token.as_str()),
        "the uncommitted message is redelivered with its message id: the same alert token"
    );
    ack.ack();

    // That an acked message stays acked is checked on a fresh subscription by
    // telemetry_arrives_with_its_device_attribute_...: this one has a closed stream the
    // emulator may still hand new messages to for an ack deadline.
    run.stop().await.expect("clean stop");
}

#[tokio::test]
async fn nacked_telemetry_is_held_for_the_nack_delay_then_redelivered_without_a_restart() {
    let Some(emu) = emulator().await else {
        return;
    };
    let config = config(&emu, "nack");
    let bridge = Bridge::new(&emu, &config);
    let mut run = Running::start_connected(provider(&config).await).await;

    let id = bridge.telemetry("fan-1", r#"{"rpm":1200}"#).await;
    let (t, ack) = run.telemetry().await;
    assert_eq!(pubsub_id(&t.message_id), id);
    let token = t.message_id;
    let nacked_at = Instant::now();
    ack.nack("store unavailable");
    let (t, ack) = run.telemetry().await;
    assert_eq!(
        t.message_id, token,
        "the nacked message came back, same alert token"
    );
    assert!(
        nacked_at.elapsed() < Duration::from_secs(u64::from(config.ack_deadline_secs)),
        "redelivered by the nack, not by the lapsed ack deadline ({:?})",
        nacked_at.elapsed()
    );
    // (The emulator's redelivery timing under the subscription's retry policy is not
    // what Google Cloud documents, so only the gateway's own hold is checked here; the
    // policy itself is checked on the created subscription in resources.rs.)
    assert!(
        nacked_at.elapsed() >= Duration::from_millis(config.nack_delay_ms),
        "held {} ms before the nack, so a short store outage does not spend the delivery attempts ({:?})",
        config.nack_delay_ms,
        nacked_at.elapsed()
    );
    ack.ack();
    run.stop().await.expect("clean stop");
}

#[tokio::test]
async fn flow_control_holds_back_messages_beyond_max_outstanding_until_earlier_ones_are_acked() {
    let Some(emu) = emulator().await else {
        return;
    };
    let config = GcpPubSubConfig {
        max_outstanding_messages: 2,
        ..config(&emu, "flow")
    };
    let bridge = Bridge::new(&emu, &config);
    let mut run = Running::start_connected(provider(&config).await).await;
    for i in 0..4 {
        bridge.telemetry("pump-3", &format!(r#"{{"n":{i}}}"#)).await;
    }
    let (_, first) = run.telemetry().await;
    let (_, second) = run.telemetry().await;
    // Two messages are outstanding: the stream hands out no third one.
    let held = tokio::time::timeout(Duration::from_millis(1500), run.events.recv()).await;
    assert!(
        held.is_err(),
        "a third message arrived while two were unacked"
    );
    first.ack();
    second.ack();
    for _ in 0..2 {
        let (_, ack) = run.telemetry().await;
        ack.ack();
    }
    run.stop().await.expect("clean stop");
}

#[tokio::test]
async fn replies_and_lifecycle_messages_become_events_and_malformed_ones_unusable_events() {
    let Some(emu) = emulator().await else {
        return;
    };
    let config = config(&emu, "inbound");
    let bridge = Bridge::new(&emu, &config);
    let p = provider(&config).await;
    let mut run = Running::start_connected(p.clone()).await;

    bridge
        .publish(
            &config.reply_topic,
            "",
            &[
                ("device_id", "pump-2"),
                ("correlation_id", "corr-1"),
                ("status", "error"),
                ("reason", "valve stuck"),
            ],
        )
        .await;
    let ev = run
        .next("a command reply", |k| {
            matches!(k, EventKind::CommandReply { .. })
        })
        .await;
    assert_eq!(
        ev.kind,
        EventKind::CommandReply {
            device_id: "pump-2".into(),
            correlation_id: "corr-1".into(),
            ok: false,
            reason: Some("valve stuck".into()),
        }
    );
    ev.ack.ack();

    // Newer state first, then an older one arriving late: both are reported with their
    // event time (the gateway orders them); the provider's own view keeps the newer.
    for (connected, at) in [
        ("true", "2026-01-01T00:00:02Z"),
        ("false", "2026-01-01T00:00:01Z"),
    ] {
        bridge
            .publish(
                &config.lifecycle_topic,
                "",
                &[
                    ("device_id", "pump-2"),
                    ("connected", connected),
                    ("event_time", at),
                ],
            )
            .await;
        let ev = run
            .next("a connection event", |k| {
                matches!(k, EventKind::Connection { .. })
            })
            .await;
        ev.ack.ack();
    }
    let device = iotgw_ids::DeviceId::parse("pump-2").expect("valid id");
    assert_eq!(
        p.device_state(&device).await.expect("state").connected,
        Some(true)
    );

    // A reply without a status becomes an unusable event (the gateway dead-letters it),
    // counted, and the stream goes on.
    bridge
        .publish(
            &config.reply_topic,
            "not json",
            &[("device_id", "pump-2"), ("correlation_id", "corr-2")],
        )
        .await;
    let ev = run
        .next("the unusable reply", |k| {
            matches!(k, EventKind::Unusable { .. })
        })
        .await;
    assert!(
        matches!(&ev.kind, EventKind::Unusable { what, device_id, payload, .. }
            if what == "reply" && device_id == "pump-2" && payload.as_ref() == b"not json"),
        "{:?}",
        ev.kind
    );
    ev.ack.ack();
    bridge
        .publish(
            &config.reply_topic,
            r#"{"correlation_id":"corr-3","status":"ok"}"#,
            &[("device_id", "pump-2")],
        )
        .await;
    let ev = run
        .next("the valid reply", |k| {
            matches!(k, EventKind::CommandReply { .. })
        })
        .await;
    assert!(
        matches!(&ev.kind, EventKind::CommandReply { correlation_id, ok: true, .. } if correlation_id == "corr-3"),
        "{:?}",
        ev.kind
    );
    ev.ack.ack();
    assert_eq!(p.dropped_messages(), 1);
    run.stop().await.expect("clean stop");
}

#[tokio::test]
async fn a_message_nacked_on_every_delivery_attempt_moves_to_the_dead_letter_topic() {
    let Some(emu) = emulator().await else {
        return;
    };
    let base = config(&emu, "dlq");
    let config = GcpPubSubConfig {
        dead_letter_topic: format!("{}-dead", base.telemetry_topic),
        max_delivery_attempts: 5,
        // Every attempt at once: this test is about the dead-letter topic, not the backoff.
        retry_min_backoff_secs: 0,
        retry_max_backoff_secs: 0,
        nack_delay_ms: 0,
        ..base
    };
    let bridge = Bridge::new(&emu, &config);
    let p = provider(&config).await;
    p.ensure_resources().await.expect("resources created");
    // Someone reads the dead letters.
    let admin = bridge.subscription_admin().await;
    let dead_sub = subscription_path(PROJECT, &format!("{}-reader", config.dead_letter_topic));
    admin
        .create_subscription()
        .set_name(&dead_sub)
        .set_topic(topic_path(PROJECT, &config.dead_letter_topic))
        .send()
        .await
        .expect("dead-letter reader subscription");

    let mut run = Running::start_connected(p).await;
    let id = bridge.telemetry("pump-5", r#"{"poison":true}"#).await;
    for attempt in 1..=config.max_delivery_attempts {
        let (t, ack) = run.telemetry().await;
        assert_eq!(pubsub_id(&t.message_id), id, "delivery {attempt}");
        ack.nack("cannot commit");
    }

    let subscriber = bridge.subscriber().await;
    let mut dead = subscriber
        .subscribe(&dead_sub)
        .set_shutdown_behavior(ShutdownBehavior::NackImmediately)
        .build();
    let (msg, handler) = tokio::time::timeout(WAIT, dead.next())
        .await
        .expect("a dead letter within the deadline")
        .expect("the stream yields")
        .expect("no stream error");
    handler.ack();
    assert_eq!(msg.data.as_ref(), br#"{"poison":true}"#);
    assert_eq!(
        msg.attributes.get("device_id").map(String::as_str),
        Some("pump-5")
    );
    run.stop().await.expect("clean stop");
}

#[tokio::test]
async fn streaming_resumes_on_its_own_after_the_emulator_restarts_and_forgets_everything() {
    let Some(emu) = dedicated_emulator().await else {
        return;
    };
    let config = GcpPubSubConfig {
        project_id: PROJECT.into(),
        emulator_host: Some(emu.emulator_host()),
        create_if_missing: true,
        reconnect_min_ms: 50,
        reconnect_max_ms: 500,
        request_timeout_secs: 5,
        ..GcpPubSubConfig::default()
    };
    let publisher = || async {
        Publisher::builder(topic_path(PROJECT, &config.telemetry_topic))
            .with_endpoint(emu.endpoint())
            .with_credentials(anonymous::Builder::new().build())
            .build()
            .await
            .expect("a publisher on the emulator")
    };
    let message = |n: u32| {
        Message::new()
            .set_data(format!(r#"{{"n":{n}}}"#))
            .set_attributes([("device_id", "pump-9")])
    };
    let p = provider(&config).await;
    let mut run = Running::start_connected(p.clone()).await;
    let id = publisher()
        .await
        .publish(message(1))
        .await
        .expect("published");
    let (t, ack) = run.telemetry().await;
    assert_eq!(pubsub_id(&t.message_id), id);
    ack.ack();

    emu.restart().await.expect("the emulator restarts");
    let restarted = Instant::now();
    // The emulator lost the topics and subscriptions: the provider re-creates them once
    // its stream reconnects and finds the subscription gone (the client library reopens
    // streams with its own backoff: 0.1 s, then 4x). A message published before the
    // subscription exists reaches nobody, so the device waits for it.
    let admin = SubscriptionAdmin::builder()
        .with_endpoint(emu.endpoint())
        .with_credentials(anonymous::Builder::new().build())
        .build()
        .await
        .expect("an admin client");
    let sub = subscription_path(PROJECT, &config.telemetry_subscription);
    let limit = Duration::from_secs(40);
    while admin
        .get_subscription()
        .set_subscription(&sub)
        .send()
        .await
        .is_err()
    {
        assert!(
            restarted.elapsed() < limit,
            "the subscription was not re-created within {limit:?}; health {:?}",
            p.health()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let id = publisher()
        .await
        .publish(message(2))
        .await
        .expect("published after the restart");
    let (t, ack) = run.telemetry().await;
    assert_eq!(
        (t.device_id.as_str(), pubsub_id(&t.message_id)),
        ("pump-9", id.as_str())
    );
    ack.ack();
    assert!(p.health().connected, "{:?}", p.health());
    run.stop().await.expect("clean stop");
}
