//! Registration (per-device command subscriptions) and commands.

use google_cloud_pubsub::subscriber::ShutdownBehavior;
use iotgw_ids::DeviceId;

use super::*;
use crate::{CommandOutcome, CommandRequest, DeviceSpec};

fn spec(id: &str) -> DeviceSpec {
    DeviceSpec {
        device_id: DeviceId::parse(id).expect("valid id"),
        name: id.into(),
        category: None,
        tags: Default::default(),
        settings: None,
    }
}

fn command(device: &str, name: &str, n: u32) -> CommandRequest {
    CommandRequest {
        id: uuid::Uuid::new_v4(),
        device_id: DeviceId::parse(device).expect("valid id"),
        name: name.into(),
        message: format!(r#"{{"CommandName":"{name}","Parameters":{{"n":{n}}}}}"#),
        correlation_id: format!("corr-{n}"),
    }
}

#[tokio::test]
async fn registration_creates_a_filtered_ordered_command_subscription_and_unregistration_deletes_it(
) {
    let Some(emu) = emulator().await else {
        return;
    };
    let config = GcpPubSubConfig {
        command_subscriptions: true,
        ..config(&emu, "register")
    };
    let p = provider(&config).await;
    let device = spec("site:pump-1");

    let reg = p.register(&device).await.expect("registered");
    let name = p.command_subscription(&device.device_id);
    assert!(
        reg.message.as_deref().is_some_and(|m| m.contains(&name)),
        "{reg:?}"
    );
    assert_eq!(reg.credentials, None);
    p.register(&device)
        .await
        .expect("registering again is fine");

    let admin = Bridge::new(&emu, &config).subscription_admin().await;
    let sub = admin
        .get_subscription()
        .set_subscription(&name)
        .send()
        .await
        .expect("the command subscription exists");
    // The emulator stores the filter but does not apply it: check it is set as intended.
    assert_eq!(sub.filter, r#"attributes.device_id = "site:pump-1""#);
    assert_eq!(sub.filter, p.command_filter(&device.device_id));
    assert_eq!(sub.topic, topic_path(PROJECT, &config.commands_topic));
    assert!(sub.enable_message_ordering);

    p.unregister(&device.device_id).await.expect("unregistered");
    let gone = admin
        .get_subscription()
        .set_subscription(&name)
        .send()
        .await;
    let status = gone.expect_err("deleted").status().map(|s| s.code);
    assert_eq!(status, Some(google_cloud_gax::error::rpc::Code::NotFound));
    p.unregister(&device.device_id)
        .await
        .expect("unregistering a device whose subscription is gone is fine");
}

#[tokio::test]
async fn commands_carry_their_attributes_and_keep_their_order_per_device() {
    let Some(emu) = emulator().await else {
        return;
    };
    let config = GcpPubSubConfig {
        command_subscriptions: true,
        ..config(&emu, "commands")
    };
    let p = provider(&config).await;
    let device = spec("pump-7");
    p.register(&device).await.expect("registered");

    // No receive loop is needed to send commands.
    let sent: Vec<CommandRequest> = (0..5).map(|n| command("pump-7", "set_speed", n)).collect();
    for cmd in &sent {
        assert_eq!(
            p.send_command(cmd).await.expect("published"),
            CommandOutcome::Published
        );
    }

    let subscriber = Bridge::new(&emu, &config).subscriber().await;
    let mut stream = subscriber
        .subscribe(p.command_subscription(&device.device_id))
        .set_shutdown_behavior(ShutdownBehavior::NackImmediately)
        .build();
    let mut got = Vec::new();
    let deadline = Instant::now() + WAIT;
    while got.len() < sent.len() {
        let (msg, handler) = tokio::time::timeout_at(deadline, stream.next())
            .await
            .expect("every command within the deadline")
            .expect("the stream yields")
            .expect("no stream error");
        handler.ack();
        got.push(msg);
    }
    for (msg, cmd) in got.iter().zip(&sent) {
        assert_eq!(msg.data.as_ref(), cmd.message.as_bytes(), "order kept");
        assert_eq!(msg.ordering_key, "pump-7");
        let attr = |k: &str| msg.attributes.get(k).map(String::as_str);
        assert_eq!(attr("device_id"), Some("pump-7"));
        assert_eq!(attr("command_name"), Some("set_speed"));
        assert_eq!(attr("correlation_id"), Some(cmd.correlation_id.as_str()));
        let id = cmd.id.to_string();
        assert_eq!(attr("command_id"), Some(id.as_str()));
    }
    p.unregister(&device.device_id).await.expect("unregistered");
}

#[tokio::test]
async fn a_command_to_a_missing_topic_fails_with_an_error_naming_the_key() {
    let Some(emu) = emulator().await else {
        return;
    };
    let config = GcpPubSubConfig {
        create_if_missing: false,
        ..config(&emu, "no-topic")
    };
    let p = provider(&config).await;
    let err = p
        .send_command(&command("pump-8", "reboot", 1))
        .await
        .expect_err("the commands topic does not exist");
    assert_eq!(err.class(), "not_found", "{err}");
    assert!(err.to_string().contains("commands_topic"), "{err}");
    // The device's ordering key was resumed: once the topic exists the next command goes.
    GcpPubSubProvider::new(
        &crate::InstanceName::from("gcp-test"),
        &GcpPubSubConfig {
            create_if_missing: true,
            ..config.clone()
        },
    )
    .await
    .expect("valid config")
    .ensure_resources()
    .await
    .expect("resources created");
    assert_eq!(
        p.send_command(&command("pump-8", "reboot", 2))
            .await
            .expect("published after the topic appeared"),
        CommandOutcome::Published
    );
}

#[tokio::test]
async fn settings_go_to_the_command_topic_marked_as_settings() {
    let Some(emu) = emulator().await else {
        return;
    };
    let config = GcpPubSubConfig {
        command_subscriptions: true,
        ..config(&emu, "settings")
    };
    let p = provider(&config).await;
    let device = spec("boiler-3");
    p.register(&device).await.expect("registered");
    let settings = serde_json::json!({"setpoint": 20, "mode": "eco"});
    p.update_settings(&device.device_id, &settings)
        .await
        .expect("published");

    let subscriber = Bridge::new(&emu, &config).subscriber().await;
    let mut stream = subscriber
        .subscribe(p.command_subscription(&device.device_id))
        .set_shutdown_behavior(ShutdownBehavior::NackImmediately)
        .build();
    let (msg, handler) = tokio::time::timeout(WAIT, stream.next())
        .await
        .expect("the settings within the deadline")
        .expect("the stream yields")
        .expect("no stream error");
    handler.ack();
    let body: serde_json::Value = serde_json::from_slice(&msg.data).expect("JSON");
    assert_eq!(body, settings);
    assert_eq!(msg.ordering_key, "boiler-3");
    let attr = |k: &str| msg.attributes.get(k).map(String::as_str);
    assert_eq!(attr("iotgw_kind"), Some("settings"));
    assert_eq!(attr("device_id"), Some("boiler-3"));
    assert_eq!(attr("command_name"), None, "not a command");
}
