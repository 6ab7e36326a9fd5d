//! Start-up: topics and subscriptions checked, created with `create_if_missing`, the
//! dead-letter policy honoured.

use super::*;
use crate::gcp_pubsub::names::subscription_path;

#[tokio::test]
async fn missing_resources_end_run_with_an_error_naming_the_resource_and_its_key() {
    let Some(emu) = emulator().await else {
        return;
    };
    let config = GcpPubSubConfig {
        create_if_missing: false,
        ..config(&emu, "missing")
    };
    let p = provider(&config).await;
    let run = Running::start(p.clone());
    let err = tokio::time::timeout(WAIT, run.task)
        .await
        .expect("run ends by itself")
        .expect("run does not panic")
        .expect_err("nothing exists");
    let text = err.to_string();
    assert_eq!(err.class(), "not_found", "{text}");
    assert!(
        text.contains(&config.commands_topic)
            && text.contains("commands_topic")
            && text.contains("create_if_missing"),
        "{text}"
    );
    let health = p.health();
    assert!(!health.connected);
    assert!(
        health
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("commands_topic")),
        "{health:?}"
    );
}

#[tokio::test]
async fn create_if_missing_creates_every_topic_and_subscription_with_the_retry_and_dead_letter_policies(
) {
    let Some(emu) = emulator().await else {
        return;
    };
    let config = GcpPubSubConfig {
        dead_letter_topic: format!("{}-dead", config(&emu, "x").telemetry_topic),
        max_delivery_attempts: 7,
        ..config(&emu, "create")
    };
    let p = provider(&config).await;
    p.ensure_resources().await.expect("resources created");
    // A second replica finds them in place.
    provider(&config)
        .await
        .ensure_resources()
        .await
        .expect("resources found");

    let admin = Bridge::new(&emu, &config).subscription_admin().await;
    let get = |id: String| {
        let admin = admin.clone();
        async move {
            admin
                .get_subscription()
                .set_subscription(subscription_path(PROJECT, &id))
                .send()
                .await
                .unwrap_or_else(|e| panic!("subscription {id}: {e}"))
        }
    };
    let telemetry = get(config.telemetry_subscription.clone()).await;
    assert_eq!(
        telemetry.topic,
        topic_path(PROJECT, &config.telemetry_topic)
    );
    assert_eq!(telemetry.ack_deadline_seconds, 10);
    let dl = telemetry
        .dead_letter_policy
        .expect("dead-letter policy set");
    assert_eq!(
        (dl.dead_letter_topic.as_str(), dl.max_delivery_attempts),
        (topic_path(PROJECT, &config.dead_letter_topic).as_str(), 7)
    );
    let retry = telemetry.retry_policy.expect("retry policy set");
    assert_eq!(
        (
            retry.minimum_backoff.map(|d| d.seconds()),
            retry.maximum_backoff.map(|d| d.seconds())
        ),
        (Some(10), Some(600)),
        "redeliveries back off instead of spending the delivery attempts at once"
    );
    let replies = get(config.reply_subscription.clone()).await;
    assert_eq!(replies.topic, topic_path(PROJECT, &config.reply_topic));
    assert!(replies.dead_letter_policy.is_none());
    let lifecycle = get(config.lifecycle_subscription.clone()).await;
    assert_eq!(
        lifecycle.topic,
        topic_path(PROJECT, &config.lifecycle_topic)
    );
}

#[tokio::test]
async fn an_existing_subscription_gets_the_configured_dead_letter_policy_or_a_clear_error() {
    let Some(emu) = emulator().await else {
        return;
    };
    let plain = config(&emu, "dlq-update");
    provider(&plain)
        .await
        .ensure_resources()
        .await
        .expect("resources created without a dead-letter topic");
    let with_dlq = GcpPubSubConfig {
        dead_letter_topic: format!("{}-dead", plain.telemetry_topic),
        ..plain.clone()
    };

    // A managing instance adds the policy to the existing subscription.
    provider(&with_dlq)
        .await
        .ensure_resources()
        .await
        .expect("policy set by a managing instance");
    let admin = Bridge::new(&emu, &plain).subscription_admin().await;
    let sub = admin
        .get_subscription()
        .set_subscription(subscription_path(PROJECT, &plain.telemetry_subscription))
        .send()
        .await
        .expect("subscription");
    let dl = sub
        .dead_letter_policy
        .expect("policy added to the existing subscription");
    assert_eq!(
        dl.dead_letter_topic,
        topic_path(PROJECT, &with_dlq.dead_letter_topic)
    );
    assert_eq!(dl.max_delivery_attempts, 5);

    // An unmanaged instance asking for another policy gets a conflict naming the keys.
    let other = GcpPubSubConfig {
        max_delivery_attempts: 9,
        create_if_missing: false,
        ..with_dlq
    };
    let e = provider(&other)
        .await
        .ensure_resources()
        .await
        .expect_err("policy differs");
    assert_eq!(e.class(), "conflict", "{e}");
    assert!(e.to_string().contains("max_delivery_attempts"), "{e}");
}
