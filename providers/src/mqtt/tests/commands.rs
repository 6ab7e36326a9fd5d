//! Outbound commands and their replies.

use iotgw_ids::DeviceId;
use rumqttc::v5::mqttbytes::v5::{Packet, PublishProperties};
use rumqttc::v5::mqttbytes::QoS;
use uuid::Uuid;

use super::*;
use crate::{CommandOutcome, CommandRequest, CFS_MAX_COMMAND_BYTES};

fn command(device: &str, message: String) -> CommandRequest {
    CommandRequest {
        id: Uuid::new_v4(),
        device_id: DeviceId::parse(device).expect("valid id"),
        name: "cool_down".into(),
        message,
        correlation_id: format!("corr-{}", Uuid::new_v4().simple()),
    }
}

#[tokio::test]
async fn commands_reach_a_subscribed_device_with_correlation_data_and_its_reply_becomes_an_event() {
    let Some(broker) = broker().await else {
        return;
    };
    let mut run = Running::start_connected(provider(&config(&broker, "gw-commands"))).await;
    let mut device = Device::connect(broker.port(), "chiller-1", DeviceOptions::default())
        .await
        .expect("device connects");
    device
        .client
        .subscribe("devices/chiller-1/commands", QoS::AtLeastOnce)
        .await
        .expect("subscribe queued");
    device
        .next("SUBACK", |p| matches!(p, Packet::SubAck(_)))
        .await;

    let cmd = command(
        "chiller-1",
        r#"{"CommandName":"cool_down","Parameters":{"target_celsius":60}}"#.into(),
    );
    let outcome = run
        .provider
        .send_command(&cmd)
        .await
        .expect("command published");
    assert_eq!(outcome, CommandOutcome::Published);

    let Packet::Publish(got) = device
        .next("command", |p| matches!(p, Packet::Publish(_)))
        .await
    else {
        unreachable!("filtered above")
    };
    assert_eq!(got.topic.as_ref(), b"devices/chiller-1/commands");
    assert_eq!(got.qos, QoS::AtLeastOnce);
    assert_eq!(got.payload.as_ref(), cmd.message.as_bytes());
    let props = got.properties.expect("MQTT 5 properties");
    assert_eq!(
        props.correlation_data.as_deref(),
        Some(cmd.correlation_id.as_bytes())
    );
    assert_eq!(
        props.response_topic.as_deref(),
        Some("devices/chiller-1/replies")
    );
    let user = |k: &str| {
        props
            .user_properties
            .iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.clone())
    };
    assert_eq!(user("command_name").as_deref(), Some("cool_down"));
    assert_eq!(user("correlation_id"), Some(cmd.correlation_id.clone()));

    // The device answers on the response topic, echoing the correlation data only.
    let reply_props = PublishProperties {
        correlation_data: props.correlation_data.clone(),
        ..PublishProperties::default()
    };
    device
        .client
        .publish_with_properties(
            props.response_topic.clone().expect("response topic"),
            QoS::AtLeastOnce,
            false,
            r#"{"status":"error","reason":"compressor offline"}"#,
            reply_props,
        )
        .await
        .expect("reply queued");
    let ev = run
        .next("command reply", |k| {
            matches!(k, EventKind::CommandReply { .. })
        })
        .await;
    assert_eq!(
        ev.kind,
        EventKind::CommandReply {
            device_id: "chiller-1".into(),
            correlation_id: cmd.correlation_id.clone(),
            ok: false,
            reason: Some("compressor offline".into()),
        }
    );
    ev.ack.ack();
    run.stop().await.expect("clean stop");
}

#[tokio::test]
async fn oversize_command_is_refused_naming_the_field_and_limit() {
    let p = MqttProvider::new(
        &crate::InstanceName::from("test"),
        &iotgw_config::MqttConfig::default(),
    )
    .expect("defaults are valid");
    assert_eq!(p.limits().max_command_bytes, CFS_MAX_COMMAND_BYTES);
    let cmd = command("pump-1", "x".repeat(CFS_MAX_COMMAND_BYTES + 1));
    match p.send_command(&cmd).await {
        Err(e @ ProviderError::InvalidInput { .. }) => {
            let ProviderError::InvalidInput { field, message, .. } = &e else {
                unreachable!()
            };
            assert_eq!(field, "msdyn_message");
            assert!(
                message.contains("8193") && message.contains("8192"),
                "{message}"
            );
        }
        other => panic!("expected InvalidInput, got {other:?}"),
    }
}

#[tokio::test]
async fn a_command_before_run_started_is_a_transient_error() {
    let p = MqttProvider::new(
        &crate::InstanceName::from("test"),
        &iotgw_config::MqttConfig::default(),
    )
    .expect("defaults are valid");
    let err = p
        .send_command(&command("pump-1", "{}".into()))
        .await
        .expect_err("not running");
    assert!(err.is_retryable(), "{err}");
}

#[tokio::test]
async fn settings_are_published_retained_so_a_device_subscribing_later_gets_them() {
    let Some(broker) = broker().await else {
        return;
    };
    let run = Running::start_connected(provider(&config(&broker, "gw-settings"))).await;
    let id = DeviceId::parse("boiler-1").expect("valid id");
    // A device subscribed already: once it has the settings, the broker holds them.
    let mut early = Device::connect(broker.port(), "boiler-1-early", DeviceOptions::default())
        .await
        .expect("device connects");
    early
        .client
        .subscribe("devices/boiler-1/settings", QoS::AtLeastOnce)
        .await
        .expect("subscribe queued");
    early
        .next("SUBACK", |p| matches!(p, Packet::SubAck(_)))
        .await;
    let settings = serde_json::json!({"setpoint": 21.5, "mode": "eco"});
    run.provider
        .update_settings(&id, &settings)
        .await
        .expect("settings published");
    let too_big = serde_json::json!({"blob": "x".repeat(CFS_MAX_COMMAND_BYTES)});
    let err = run
        .provider
        .update_settings(&id, &too_big)
        .await
        .expect_err("too big");
    assert!(err.to_string().contains("msdyn_devicesettings"), "{err}");

    let Packet::Publish(first) = early
        .next("settings", |p| matches!(p, Packet::Publish(_)))
        .await
    else {
        unreachable!("filtered above")
    };
    assert_eq!(first.topic.as_ref(), b"devices/boiler-1/settings");

    // Subscribes only now: the broker hands over the retained settings.
    let mut device = Device::connect(broker.port(), "boiler-1", DeviceOptions::default())
        .await
        .expect("device connects");
    device
        .client
        .subscribe("devices/boiler-1/settings", QoS::AtLeastOnce)
        .await
        .expect("subscribe queued");
    let Packet::Publish(got) = device
        .next("retained settings", |p| matches!(p, Packet::Publish(_)))
        .await
    else {
        unreachable!("filtered above")
    };
    assert_eq!(got.topic.as_ref(), b"devices/boiler-1/settings");
    assert!(got.retain, "delivered as retained");
    assert_eq!(got.qos, QoS::AtLeastOnce);
    let body: serde_json::Value = serde_json::from_slice(&got.payload).expect("json");
    assert_eq!(body, settings);
}
