//! Cloud-to-device messages: iotgw and the Python SDK's `send_c2d_message` (uamqp) against
//! the same recording AMQP fake, compared; the CBS token verified with the policy key.

use std::collections::BTreeMap;

use iotgw_config::azure_iot_hub::AzureCommandDelivery;
use iotgw_ids::DeviceId;
use serde_json::json;

use super::fake_amqp::{AmqpLog, FakeAmqp};
use super::fake_hub::FakeHub;
use super::registry::config;
use super::sdk::Sdk;
use crate::azure_iot_hub::AzureIotHubProvider;
use crate::{CommandOutcome, CommandRequest, Provider};

/// A link address without the `amqps://host[:port]` prefix uamqp puts in front.
fn node(address: &str) -> String {
    match address.strip_prefix("amqps://") {
        Some(rest) => rest
            .find('/')
            .map_or(String::new(), |i| rest[i..].to_owned()),
        None => address.to_owned(),
    }
}

fn nodes(v: &[String]) -> Vec<String> {
    let mut n: Vec<String> = v.iter().map(|a| node(a)).collect();
    n.sort();
    n
}

#[tokio::test]
async fn c2d_messages_match_what_the_python_sdk_sends_over_amqp() {
    let hub = FakeHub::start().await;
    let amqp = FakeAmqp::start().await;
    let mut cfg = config(&hub);
    cfg.command_delivery = AzureCommandDelivery::C2d;
    cfg.c2d.amqp_port = amqp.port;
    cfg.c2d.ttl_secs = 600;
    let p = AzureIotHubProvider::new(&crate::InstanceName::from("hub"), &cfg).expect("provider");
    let cmd = CommandRequest {
        id: uuid::Uuid::new_v4(),
        device_id: DeviceId::parse("valve-3").expect("id"),
        name: "close".into(),
        message: r#"{"CommandName":"close","Parameters":{"percent":100}}"#.into(),
        correlation_id: "corr-c2d-1".into(),
    };
    let sent_at = chrono::Utc::now().timestamp_millis();
    assert_eq!(
        p.send_command(&cmd).await.expect("queued by the hub"),
        CommandOutcome::Published
    );
    let second = CommandRequest {
        id: uuid::Uuid::new_v4(),
        ..cmd.clone()
    };
    p.send_command(&second)
        .await
        .expect("the open link is reused");
    let ours = amqp.take();
    assert_eq!(
        ours.sasl_mechanisms,
        ["MSSBCBS"],
        "one connection, SASL MSSBCBS: {ours:?}"
    );
    assert_eq!(
        ours.put_tokens.len(),
        1,
        "one CBS token for both messages: {ours:?}"
    );
    let put = &ours.put_tokens[0];
    assert!(
        put.valid,
        "the CBS token verifies with the policy key: {put:?}"
    );
    assert_eq!(
        put.properties.get("operation").map(String::as_str),
        Some("put-token")
    );
    assert_eq!(
        put.properties.get("type").map(String::as_str),
        Some("servicebus.windows.net:sastoken")
    );
    assert_eq!(
        put.properties.get("name"),
        Some(&format!("https://{}", hub.host()))
    );
    assert_eq!(ours.messages.len(), 2);
    let m = &ours.messages[0];
    assert_eq!(
        m.to.as_deref(),
        Some("/devices/valve-3/messages/devicebound")
    );
    assert_eq!(m.message_id.as_deref(), Some(cmd.id.to_string().as_str()));
    assert_eq!(m.correlation_id.as_deref(), Some("corr-c2d-1"));
    assert_eq!(
        m.application_properties
            .get("iothub-ack")
            .map(String::as_str),
        Some("full"),
        "delivery feedback requested"
    );
    assert_eq!(m.body, cmd.message.as_bytes());
    let expiry = m.absolute_expiry_time.expect("an expiry");
    assert!(
        (expiry - sent_at - 600_000).abs() < 5_000,
        "expires c2d.ttl_secs after sending"
    );

    let Some(sdk) = Sdk::find("c2d_messages_match_what_the_python_sdk_sends") else {
        return;
    };
    if !sdk.has_uamqp() {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("CI=true and uamqp (the SDK's AMQP stack) does not import: the C2D comparison cannot run");
        }
        println!("SKIPPED: uamqp does not import in the SDK's venv; the C2D request was checked against the documented properties only");
        return;
    }
    let cs = hub.connection_string();
    let ops = [json!({
        "op": "send_c2d_message",
        "device_id": "valve-3",
        "message": cmd.message,
        "properties": {
            "messageId": cmd.id.to_string(),
            "correlationId": "corr-c2d-1",
            "contentType": "application/json",
            "contentEncoding": "utf-8",
            "expiryTimeUtc": expiry,
            "iothub-ack": "full",
            "command_name": "close",
        },
    })];
    let sdk_run = sdk.run(Some(&cs), Some(amqp.port), &ops);
    let Ok(results) = tokio::time::timeout(std::time::Duration::from_secs(30), sdk_run).await
    else {
        panic!(
            "the SDK's send_c2d_message hung; the fake saw {:?}",
            amqp.peek()
        );
    };
    assert!(
        results[0].is_ok(),
        "the SDK's send_c2d_message failed against the fake: {results:?}; the fake saw {:?}",
        amqp.peek()
    );
    let theirs: AmqpLog = amqp.take();
    assert_eq!(
        theirs.sasl_mechanisms, ours.sasl_mechanisms,
        "SASL mechanism"
    );
    assert_eq!(
        nodes(&theirs.sender_targets),
        nodes(&ours.sender_targets),
        "sender links (CBS request node and /messages/devicebound)"
    );
    assert_eq!(
        nodes(&theirs.receiver_sources),
        nodes(&ours.receiver_sources),
        "receiver links (CBS answers)"
    );
    assert_eq!(theirs.put_tokens.len(), 1);
    let their_put = &theirs.put_tokens[0];
    assert!(
        their_put.valid,
        "the SDK's CBS token verifies too: {their_put:?}"
    );
    let keys = |p: &BTreeMap<String, String>| p.keys().cloned().collect::<Vec<_>>();
    assert_eq!(
        keys(&their_put.properties),
        keys(&put.properties),
        "put-token application properties"
    );
    for k in ["operation", "type", "name"] {
        assert_eq!(
            their_put.properties.get(k),
            put.properties.get(k),
            "put-token {k}"
        );
    }
    assert_eq!(theirs.messages.len(), 1);
    let t = &theirs.messages[0];
    assert_eq!(t.to, m.to, "to");
    assert_eq!(t.message_id, m.message_id, "message-id");
    assert_eq!(t.correlation_id, m.correlation_id, "correlation-id");
    assert_eq!(t.content_type, m.content_type, "content-type");
    assert_eq!(t.content_encoding, m.content_encoding, "content-encoding");
    assert_eq!(
        t.absolute_expiry_time, m.absolute_expiry_time,
        "absolute-expiry-time"
    );
    assert_eq!(
        t.application_properties, m.application_properties,
        "application properties"
    );
    assert_eq!(t.body, m.body, "body");
}

mod feedback {
    //! C2D delivery feedback (`/messages/servicebound/feedback`) against the recording AMQP
    //! fake, in the record format of IoT Hub's "Send cloud-to-device messages" page (the
    //! Python service SDK has no feedback receiver to compare against).

    use std::sync::Arc;

    use iotgw_config::azure_iot_hub::AzureCommandDelivery;
    use serde_json::{json, Value};

    use super::super::fake_amqp::FakeAmqp;
    use super::super::fake_hub::FakeHub;
    use super::super::registry::config;
    use super::super::{eventually, Run};
    use crate::azure_iot_hub::AzureIotHubProvider;
    use crate::{EventKind, ProviderEvent};

    struct Running {
        amqp: FakeAmqp,
        _hub: FakeHub,
        run: Run,
    }

    /// A provider delivering commands as C2D messages, running, with its feedback
    /// receiver attached to the fake.
    async fn running() -> Running {
        let hub = FakeHub::start().await;
        let amqp = FakeAmqp::start().await;
        let mut cfg = config(&hub);
        cfg.command_delivery = AzureCommandDelivery::C2d;
        cfg.c2d.amqp_port = amqp.port;
        let run = Run::spawn(Arc::new(
            AzureIotHubProvider::new(&crate::InstanceName::from("hub"), &cfg).expect("provider"),
        ));
        eventually("the feedback receiver to attach", || async {
            amqp.peek()
                .receiver_sources
                .iter()
                .any(|s| s == "/messages/servicebound/feedback")
        })
        .await;
        Running {
            amqp,
            _hub: hub,
            run,
        }
    }

    impl Running {
        async fn reply(&mut self) -> (ProviderEvent, (String, String, bool, Option<String>)) {
            let ev = self.run.next("a command reply").await;
            let fields = match &ev.kind {
                EventKind::CommandReply {
                    device_id,
                    correlation_id,
                    ok,
                    reason,
                } => (
                    device_id.clone(),
                    correlation_id.clone(),
                    *ok,
                    reason.clone(),
                ),
                other => panic!("expected a command reply, got {other:?}"),
            };
            (ev, fields)
        }

        async fn outcomes_become(&self, want: &[&str]) {
            let what = format!(
                "feedback settled as {want:?} (now {:?})",
                self.amqp.peek().feedback_outcomes
            );
            eventually(&what, || async {
                self.amqp.peek().feedback_outcomes == want
            })
            .await;
        }

        async fn stop(self) {
            self.run.stop().await;
        }
    }

    fn record(id: &str, device: &str, status: &str, description: &str) -> Value {
        json!({
            "originalMessageId": id,
            "enqueuedTimeUtc": "2026-12-01T12:00:00.000Z",
            "statusCode": status,
            "description": description,
            "deviceId": device,
            "deviceGenerationId": "638000000000000001",
        })
    }

    #[tokio::test]
    async fn delivery_feedback_becomes_command_replies_and_is_accepted_once_committed() {
        let mut r = running().await;
        let (ok_id, refused_id) = (uuid::Uuid::new_v4(), uuid::Uuid::new_v4());
        r.amqp.feedback(&json!([
            record(&ok_id.to_string(), "valve-3", "Success", "Success"),
            record(
                &refused_id.to_string(),
                "valve-4",
                "Rejected",
                "Message rejected"
            ),
        ]));
        let (first, got) = r.reply().await;
        assert_eq!(got, ("valve-3".into(), ok_id.to_string(), true, None));
        let (second, got) = r.reply().await;
        assert_eq!(
            (got.0.as_str(), got.1.as_str(), got.2),
            ("valve-4", refused_id.to_string().as_str(), false)
        );
        let reason = got.3.expect("a reason");
        assert!(
            reason.contains("rejected by the device") && reason.contains("Message rejected"),
            "{reason}"
        );
        assert!(
            r.amqp.peek().feedback_outcomes.is_empty(),
            "nothing settled before the gateway commits"
        );
        first.ack.ack();
        second.ack.ack();
        r.outcomes_become(&["accepted"]).await;
        r.stop().await;
    }

    #[tokio::test]
    async fn feedback_not_committed_is_released_and_delivered_again() {
        let mut r = running().await;
        let id = uuid::Uuid::new_v4().to_string();
        r.amqp.feedback(&json!([record(
            &id,
            "valve-3",
            "Expired",
            "Message expired"
        )]));
        let (ev, got) = r.reply().await;
        assert!(
            got.3.as_deref().is_some_and(|w| w.contains("expired")),
            "{got:?}"
        );
        ev.ack.nack("store down");
        r.outcomes_become(&["released"]).await;
        let (again, got_again) = r.reply().await;
        assert_eq!(got_again, got, "the same record again");
        again.ack.ack();
        r.outcomes_become(&["released", "accepted"]).await;
        r.stop().await;
    }

    #[tokio::test]
    async fn a_feedback_message_that_is_not_the_documented_array_is_rejected_and_the_next_one_is_read(
    ) {
        let mut r = running().await;
        r.amqp.feedback(&json!({"not": "an array"}));
        let id = uuid::Uuid::new_v4().to_string();
        r.amqp
            .feedback(&json!([record(&id, "valve-3", "Success", "Success")]));
        let (ev, got) = r.reply().await;
        assert_eq!(got.1, id);
        ev.ack.ack();
        r.outcomes_become(&["rejected", "accepted"]).await;
        r.stop().await;
    }
}
