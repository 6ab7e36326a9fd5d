//! Commands and device state against moto: the Publish request is checked in moto's
//! request recorder (what moto received), not in our own call's return.

use base64::Engine as _;
use iotgw_ids::DeviceId;

use super::proxy::{Fault, FaultProxy};
use super::{env_or_skip, recording, unique};
use crate::aws_iot_core::AwsIotCoreProvider;
use crate::{CommandOutcome, CommandRequest, DeviceSpec, Provider, ProviderError};

fn command(device: &str, correlation_id: &str) -> CommandRequest {
    CommandRequest {
        id: uuid::Uuid::new_v4(),
        device_id: DeviceId::parse(device).expect("valid id"),
        name: "cool_down".into(),
        message: r#"{"CommandName":"cool_down","Parameters":{"target_celsius":60}}"#.into(),
        correlation_id: correlation_id.into(),
    }
}

#[tokio::test]
async fn a_command_reaches_moto_as_a_qos_1_publish_on_the_device_topic_with_its_correlation_id() {
    let env = env_or_skip!();
    let p = env.provider(&unique("gw")).await;
    let device = unique("cmd");
    let correlation = uuid::Uuid::new_v4().to_string();
    let cmd = command(&device, &correlation);
    let outcome = p.send_command(&cmd).await.expect("published");
    assert_eq!(outcome, CommandOutcome::Published);

    // The SDK sends the topic as one percent-encoded path segment; compare decoded paths
    // (moto records the URL as its web server rebuilt it).
    let path = format!("/topics/cmd/iotgw/{device}/req");
    let recorded = recording(&env).await;
    let publishes: Vec<_> = recorded
        .iter()
        .filter(|r| r.method == "POST" && r.decoded_url().contains(&path))
        .collect();
    assert_eq!(
        publishes.len(),
        1,
        "one Publish to {path} in moto's recording: {:?}",
        recorded.iter().map(|r| &r.url).collect::<Vec<_>>()
    );
    let publish = publishes[0];
    assert!(publish.url.contains("qos=1"), "{}", publish.url);
    assert_eq!(
        publish.body_bytes().expect("recorded body"),
        cmd.message.as_bytes(),
        "payload as sent"
    );
    let b64 = base64::engine::general_purpose::STANDARD;
    let correlation_header = publish
        .header("x-amz-mqtt5-correlation-data")
        .expect("correlation data header");
    assert_eq!(
        b64.decode(correlation_header).expect("base64"),
        correlation.as_bytes()
    );
    let query = publish.decoded_url();
    assert!(
        query.contains(&format!("responseTopic=cmd/iotgw/{device}/res")),
        "the device's reply topic as MQTT 5 response topic: {query}"
    );
    let props = publish
        .header("x-amz-mqtt5-user-properties")
        .expect("user properties header");
    let props: serde_json::Value =
        serde_json::from_slice(&b64.decode(props).expect("base64 JSON")).expect("JSON");
    assert!(
        props
            .as_array()
            .is_some_and(|a| a.contains(&serde_json::json!({"correlation_id": correlation}))),
        "{props}"
    );
}

#[tokio::test]
async fn a_throttled_publish_is_a_throttled_error_with_the_announced_delay() {
    let env = env_or_skip!();
    let proxy = FaultProxy::start(
        &env.moto_url,
        Fault {
            method: "POST",
            path_starts: "/topics/",
            path_ends: "",
            status: 429,
            code: "ThrottlingException",
            retry_after: Some(7),
        },
    )
    .await;
    let mut c = env.config(&unique("gw"));
    c.endpoint_url = Some(proxy.url.clone());
    let p = AwsIotCoreProvider::new(&crate::InstanceName::from("aws-test"), &c)
        .await
        .expect("valid config");
    match p.send_command(&command(&unique("thr"), "c-1")).await {
        Err(ProviderError::Throttled { retry_after, .. }) => {
            assert_eq!(retry_after, std::time::Duration::from_secs(7))
        }
        other => panic!("expected Throttled, got {other:?}"),
    }
}

#[tokio::test]
async fn device_state_reads_reported_properties_from_the_shadow_and_unknown_things_are_not_found() {
    let env = env_or_skip!();
    let p = env.provider(&unique("gw")).await;
    let id = unique("state");
    let spec = DeviceSpec {
        device_id: DeviceId::parse(&id).expect("valid id"),
        name: id.clone(),
        category: None,
        tags: Default::default(),
        settings: None,
    };
    p.register(&spec).await.expect("registered");
    let empty = p.device_state(&spec.device_id).await.expect("state");
    assert_eq!(empty.reported_properties, None, "no shadow yet");

    // The device reports through its shadow (as an AWS device SDK would).
    env.data_inspector()
        .await
        .update_thing_shadow()
        .thing_name(&id)
        .payload(aws_sdk_iotdataplane::primitives::Blob::new(
            br#"{"state":{"reported":{"firmware":"1.4.2","temperature":21.5}}}"#.to_vec(),
        ))
        .send()
        .await
        .expect("shadow updated");
    let state = p.device_state(&spec.device_id).await.expect("state");
    assert_eq!(
        state.reported_properties,
        Some(serde_json::json!({"firmware": "1.4.2", "temperature": 21.5}))
    );
    assert!(state.last_activity.is_some(), "time of the reported update");
    assert_eq!(state.connected, None, "no presence event seen");

    p.unregister(&spec.device_id).await.expect("unregistered");
    match p.device_state(&spec.device_id).await {
        Err(ProviderError::NotFound { .. }) => {}
        other => panic!("expected NotFound, got {other:?}"),
    }
}

#[tokio::test]
async fn settings_become_the_shadows_desired_state() {
    let env = env_or_skip!();
    let p = env.provider(&unique("gw")).await;
    let id = unique("settings");
    let spec = DeviceSpec {
        device_id: DeviceId::parse(&id).expect("valid id"),
        name: id.clone(),
        category: None,
        tags: Default::default(),
        settings: None,
    };
    p.register(&spec).await.expect("registered");
    let settings = serde_json::json!({"setpoint": 19.5, "mode": "eco"});
    p.update_settings(&spec.device_id, &settings)
        .await
        .expect("settings sent");
    let shadow = env
        .data_inspector()
        .await
        .get_thing_shadow()
        .thing_name(&id)
        .send()
        .await
        .expect("shadow");
    let shadow: serde_json::Value =
        serde_json::from_slice(shadow.payload().expect("payload").as_ref()).expect("JSON");
    assert_eq!(
        shadow["state"]["desired"], settings,
        "the settings are the shadow's desired state: {shadow}"
    );
    p.unregister(&spec.device_id).await.expect("unregistered");
}
