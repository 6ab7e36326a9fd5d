//! End-to-end behaviour through the real boundaries, in-process: the gateway with its
//! embedded MQTT broker (rumqttd), SQLite in a temp dir, the real HTTP API, a real webhook
//! receiver and MQTT 5 device clients.
#![allow(
    clippy::disallowed_methods,
    reason = "test code: plain-HTTP clients against in-process servers and local emulators, no TLS roots or timeouts to configure"
)]

mod support;

#[path = "e2e/field_sync.rs"]
mod field_sync;

use std::time::Duration;

use serde_json::{json, Value};
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_telemetry_alert_child_webhook_command_reply_unregister() {
    let hook = Webhook::start().await;
    let gw = Gateway::start(GatewayOptions {
        webhook: Some(hook.url()),
        ..Default::default()
    })
    .await;
    let api = gw.api();

    let reg = api.post("/api/v1/devices", json!({"msdyn_deviceid": "pump-1", "msdyn_category": "chiller", "msdyn_tags": {"site": "north"}})).await;
    assert_eq!(reg.0, 201, "{}", reg.1);
    assert_eq!(reg.1["device"]["msdyn_registrationstatus"], 192350003);
    assert_eq!(reg.1["device"]["msdyn_iotproviderinstance"], "local");

    let mut dev = Device::connect(gw.broker_port, "pump-1").await;
    dev.publish_telemetry(json!({"message_id": "m-1", "temperature": 80.5}))
        .await;
    dev.publish_telemetry(json!({"message_id": "m-2", "temperature": 82.0}))
        .await;

    let alerts = wait_for("two alerts for pump-1", || async {
        let (_, body) = api.get("/api/v1/alerts?device_id=pump-1").await;
        let items = body["items"].as_array().cloned().unwrap_or_default();
        (items.len() == 2).then_some(items)
    })
    .await;
    let primary = alerts
        .iter()
        .find(|a| a["msdyn_parentalert"].is_null())
        .expect("a primary alert");
    let child = alerts
        .iter()
        .find(|a| !a["msdyn_parentalert"].is_null())
        .expect("a child alert");
    assert_eq!(child["msdyn_parentalert"], primary["msdyn_iotalertid"]);
    assert_eq!(child["msdyn_parentalerttoken"], "local/pump-1/m-1");
    assert_eq!(primary["msdyn_alerttoken"], "local/pump-1/m-1");
    assert_eq!(primary["msdyn_alerttype"], 192350000);

    // The webhook receives both alerts exactly once, signed.
    let posts = wait_for("two webhook deliveries", || async {
        let p = hook.accepted();
        (p.len() >= 2).then_some(p)
    })
    .await;
    assert_eq!(posts.len(), 2, "{posts:?}");
    let mut keys: Vec<_> = posts.iter().map(|p| p.idempotency_key.clone()).collect();
    keys.dedup();
    assert_eq!(keys.len(), 2);
    assert!(
        posts.iter().all(|p| p.signature_valid),
        "every body is signed with the shared secret"
    );

    // The rule's command reaches the device; its reply marks it Sent and the alert Command Sent.
    let cmd = dev.next_command().await;
    assert_eq!(cmd.body["CommandName"], "cool_down");
    dev.reply(&cmd, true).await;
    let sent = wait_for("the rule's command to be Sent", || async {
        let (_, body) = api.get("/api/v1/commands?device_id=pump-1").await;
        body["items"].as_array().and_then(|i| {
            i.iter()
                .find(|c| c["msdyn_commandstatus"] == 192350001)
                .cloned()
        })
    })
    .await;
    assert_eq!(sent["msdyn_parentalert"], primary["msdyn_iotalertid"]);
    let (_, a) = api
        .get(&format!(
            "/api/v1/alerts/{}",
            primary["msdyn_iotalertid"].as_str().expect("id")
        ))
        .await;
    assert_eq!(
        (a["statecode"].as_i64(), a["statuscode"].as_i64()),
        (Some(2), Some(5)),
        "{a}"
    );
    assert_eq!(a["msdyn_lastcommandsent"], sent["msdyn_iotdevicecommandid"]);

    // A command through the API that the device refuses ends in Error with its reason.
    let (status, manual) = api.post("/api/v1/commands", json!({"msdyn_deviceid": "pump-1", "msdyn_name": "reboot", "parameters": {"delay_s": 5}})).await;
    assert_eq!(status, 202, "{manual}");
    let cmd = dev.next_command().await;
    assert_eq!(
        cmd.body,
        json!({"CommandName": "reboot", "Parameters": {"delay_s": 5}, "correlation_id": cmd.correlation}),
        "the stored message, plus the correlation id (command_correlation = \"payload\")"
    );
    dev.reply(&cmd, false).await;
    let id = manual["msdyn_iotdevicecommandid"]
        .as_str()
        .expect("id")
        .to_string();
    let failed = wait_for("the manual command to be Error", || async {
        let (_, c) = api.get(&format!("/api/v1/commands/{id}")).await;
        (c["msdyn_commandstatus"] == 192350002).then_some(c)
    })
    .await;
    assert_eq!(
        failed["msdyn_commandstatusreason"],
        "refused by test device"
    );

    // Unregister writes history.
    let (status, d) = api.delete("/api/v1/devices/pump-1").await;
    assert_eq!(status, 200, "{d}");
    assert_eq!(d["msdyn_registrationstatus"], 192350001);
    let (_, h) = api.get("/api/v1/devices/pump-1/history").await;
    let actions: Vec<_> = h["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|r| r["msdyn_action"].clone())
        .collect();
    assert_eq!(actions, vec![json!(192350000), json!(192350001)]);

    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redelivered_message_makes_one_alert() {
    let gw = Gateway::start(GatewayOptions::default()).await;
    let api = gw.api();
    api.register("dup-1").await;
    let mut dev = Device::connect(gw.broker_port, "dup-1").await;
    for _ in 0..3 {
        dev.publish_telemetry(json!({"message_id": "same-id", "temperature": 90}))
            .await;
    }
    dev.publish_telemetry(json!({"message_id": "marker", "temperature": 10}))
        .await;
    wait_for("three duplicates counted", || async {
        let m = api.metrics().await;
        (metric(&m, "iotgw_alerts_total", &["kind=\"duplicate\""]) >= 2.0).then_some(())
    })
    .await;
    let (_, body) = api.get("/api/v1/alerts?device_id=dup-1").await;
    assert_eq!(body["items"].as_array().map(Vec::len), Some(1), "{body}");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_telemetry_is_dead_lettered_with_a_reason_and_counted_while_good_data_flows() {
    let gw = Gateway::start(GatewayOptions {
        max_payload_bytes: Some(2048),
        ..Default::default()
    })
    .await;
    let api = gw.api();
    api.register("good-1").await;
    let mut raw = Device::connect(gw.broker_port, "raw-client").await;
    raw.publish_raw("devices/good-1/telemetry", b"{not json".to_vec())
        .await;
    raw.publish_raw(
        "devices/stranger-9/telemetry",
        br#"{"temperature": 99}"#.to_vec(),
    )
    .await;
    raw.publish_raw(
        "devices/bad.id/telemetry",
        br#"{"temperature": 99}"#.to_vec(),
    )
    .await;
    let big = format!(r#"{{"temperature": 99, "blob": "{}"}}"#, "x".repeat(4096));
    raw.publish_raw("devices/good-1/telemetry", big.into_bytes())
        .await;
    // Not telemetry, and unreadable: a status that is no status.
    raw.publish_raw("devices/good-1/status", b"sort of online".to_vec())
        .await;
    raw.publish_raw(
        "devices/good-1/telemetry",
        br#"{"message_id": "ok-1", "temperature": 99}"#.to_vec(),
    )
    .await;

    let letters = wait_for("five dead letters", || async {
        let (_, body) = api.get("/api/v1/dead-letters").await;
        let items = body["items"].as_array().cloned().unwrap_or_default();
        (items.len() >= 5).then_some(items)
    })
    .await;
    let status = letters
        .iter()
        .find(|l| l["source"] == "status:local")
        .unwrap_or_else(|| panic!("the unreadable status is a dead letter: {letters:?}"));
    assert_eq!(status["device_id"], "good-1", "{status}");
    assert_eq!(status["payload"], "sort of online", "{status}");
    let reasons: Vec<String> = letters
        .iter()
        .map(|l| l["reason"].as_str().unwrap_or_default().to_string())
        .collect();
    let has = |needle: &str| reasons.iter().any(|r| r.contains(needle));
    assert!(has("not JSON"), "{reasons:?}");
    assert!(
        has("not in the registry") && has("auto_register"),
        "{reasons:?}"
    );
    assert!(
        has("'.'") || has("\".\"") || has("'.'"),
        "invalid id reason names the character: {reasons:?}"
    );
    assert!(has("accepts at most 2048"), "{reasons:?}");

    // The good message after the bad ones still makes its alert.
    wait_for("the good message's alert", || async {
        let (_, body) = api.get("/api/v1/alerts?device_id=good-1").await;
        (body["items"].as_array().map(Vec::len) == Some(1)).then_some(())
    })
    .await;
    let m = api.metrics().await;
    for reason in [
        "malformed_json",
        "unknown_device",
        "invalid_device_id",
        "oversize",
        "unusable",
    ] {
        assert!(
            metric(
                &m,
                "iotgw_events_rejected_total",
                &[&format!("reason=\"{reason}\"")]
            ) >= 1.0,
            "{reason} not counted:\n{m}"
        );
    }
    assert!(metric(&m, "iotgw_dead_letters_total", &[]) >= 5.0);
    let (live, _) = api.get("/live").await;
    assert_eq!(live, 200, "still running");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_refuses_bad_requests_with_the_field_and_the_fix() {
    let gw = Gateway::start(GatewayOptions::default()).await;
    let api = gw.api();

    let (s, b) = api
        .post("/api/v1/devices", json!({"msdyn_deviceid": "has space"}))
        .await;
    assert_eq!(s, 400, "{b}");
    assert_eq!(b["error"]["code"], "invalid_input");
    assert!(
        b["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("msdyn_deviceid"),
        "{b}"
    );

    let (s, b) = api
        .post(
            "/api/v1/devices",
            json!({"msdyn_deviceid": "x".repeat(101)}),
        )
        .await;
    assert_eq!(s, 400, "{b}");
    assert!(
        b["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("at most 100"),
        "{b}"
    );

    let (s, b) = api
        .post(
            "/api/v1/devices",
            json!({"msdyn_deviceid": "ok-1", "msdyn_colour": "red"}),
        )
        .await;
    assert_eq!(s, 400, "{b}");
    assert!(
        b["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("msdyn_colour"),
        "{b}"
    );

    api.register("twice").await;
    let (s, b) = api
        .post("/api/v1/devices", json!({"msdyn_deviceid": "twice"}))
        .await;
    assert_eq!(s, 409, "{b}");
    assert!(
        b["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("unregister"),
        "{b}"
    );

    let (s, b) = api.delete("/api/v1/devices/never-seen").await;
    assert_eq!(s, 404, "{b}");

    let (s, b) = api.post("/api/v1/commands", json!({"msdyn_deviceid": "twice", "msdyn_name": "big", "parameters": {"blob": "x".repeat(9000)}})).await;
    assert_eq!(s, 400, "{b}");
    let msg = b["error"]["message"].as_str().unwrap_or_default();
    assert!(msg.contains("msdyn_message") && msg.contains("8192"), "{b}");

    let (s, b) = api
        .post(
            "/api/v1/devices",
            json!({"msdyn_deviceid": "r1", "msdyn_iotproviderinstance": "nowhere"}),
        )
        .await;
    assert_eq!(s, 400, "{b}");
    assert!(
        b["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("local"),
        "names the configured instances: {b}"
    );

    let (s, _) = api.get("/api/v1/nothing-here").await;
    assert_eq!(s, 404);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_alert_pending_when_the_gateway_stops_is_delivered_once_after_restart() {
    let hook = Webhook::start().await;
    hook.set_down(true);
    let dir = tempfile::tempdir().expect("tmp");
    let opts = || GatewayOptions {
        webhook: Some(hook.url()),
        data_dir: Some(dir.path().to_owned()),
        ..Default::default()
    };
    let gw = Gateway::start(opts()).await;
    let api = gw.api();
    api.register("restart-1").await;
    let mut dev = Device::connect(gw.broker_port, "restart-1").await;
    dev.publish_telemetry(json!({"message_id": "r-1", "temperature": 95}))
        .await;
    wait_for("the webhook to refuse at least once", || async {
        (hook.refused() >= 1).then_some(())
    })
    .await;
    let m = api.metrics().await;
    assert!(
        metric(&m, "iotgw_outbox_depth", &["sink=\"hook\""]) >= 1.0,
        "{m}"
    );
    drop(dev);
    gw.stop_with_grace(Duration::ZERO).await;
    assert!(hook.accepted().is_empty());

    hook.set_down(false);
    let gw = Gateway::start(opts()).await;
    let posts = wait_for("the pending alert to be delivered", || async {
        let p = hook.accepted();
        (!p.is_empty()).then_some(p)
    })
    .await;
    // Give a wrong second delivery every chance to show up before counting.
    let api = gw.api();
    wait_for("the outbox to be empty", || async {
        let m = api.metrics().await;
        (metric(&m, "iotgw_outbox_depth", &["sink=\"hook\""]) == 0.0).then_some(())
    })
    .await;
    assert_eq!(hook.accepted().len(), 1, "{posts:?}");
    assert_eq!(
        posts[0].body["data"]["msdyn_alerttoken"],
        "local/restart-1/r-1"
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bearer_token_guards_the_api_but_not_the_probes() {
    let token = "0123456789abcdef-test-token";
    let gw = Gateway::start(GatewayOptions {
        token: Some(token.into()),
        ..Default::default()
    })
    .await;
    let client = reqwest::Client::new();
    let url = |p: &str| format!("http://{}{p}", gw.api_addr());
    let r = client
        .get(url("/api/v1/devices"))
        .send()
        .await
        .expect("http");
    assert_eq!(r.status(), 401);
    assert_eq!(
        r.headers()
            .get("www-authenticate")
            .and_then(|v| v.to_str().ok()),
        Some("Bearer")
    );
    let r = client
        .get(url("/api/v1/devices"))
        .bearer_auth("wrong-token-wrong-token")
        .send()
        .await
        .expect("http");
    assert_eq!(r.status(), 401);
    let r = client
        .get(url("/api/v1/devices"))
        .bearer_auth(token)
        .send()
        .await
        .expect("http");
    assert_eq!(r.status(), 200);
    assert_eq!(
        client
            .get(url("/live"))
            .send()
            .await
            .expect("http")
            .status(),
        200
    );
    assert_eq!(
        client
            .get(url("/ready"))
            .send()
            .await
            .expect("http")
            .status(),
        200
    );
    let m = client
        .get(url("/metrics"))
        .bearer_auth(token)
        .send()
        .await
        .expect("http")
        .text()
        .await
        .expect("text");
    assert!(
        metric(&m, "iotgw_api_auth_failures_total", &[]) >= 2.0,
        "{m}"
    );
    assert_eq!(metric(&m, "iotgw_ready", &[]), 1.0, "{m}");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tokenless_api_answers_only_loopback_hosts_and_refuses_oversize_bodies() {
    let gw = Gateway::start(GatewayOptions::default()).await;
    let client = reqwest::Client::new();
    let url = |p: &str| format!("http://{}{p}", gw.api_addr());
    // A page on a DNS name rebound to 127.0.0.1 sends its own name as Host.
    let rebound = client
        .get(url("/api/v1/devices"))
        .header("host", "evil.example:8080")
        .send()
        .await
        .expect("http");
    assert_eq!(rebound.status(), 421);
    let body: serde_json::Value = rebound.json().await.expect("json");
    assert_eq!(body["error"]["code"], "host_not_allowed", "{body}");
    for host in ["localhost:8080", "127.0.0.1", "[::1]:8080"] {
        let ok = client
            .get(url("/api/v1/devices"))
            .header("host", host)
            .send()
            .await
            .expect("http");
        assert_eq!(ok.status(), 200, "Host {host}");
    }
    // 2 MiB of JSON to a route that takes 1 MiB.
    let big =
        serde_json::json!({"msdyn_deviceid": "big-1", "msdyn_name": "x".repeat(2 * 1024 * 1024)});
    let refused = client
        .post(url("/api/v1/devices"))
        .json(&big)
        .send()
        .await
        .expect("http");
    assert_eq!(refused.status(), 413);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_token_the_scheme_is_case_insensitive_and_ready_hides_its_reasons_from_strangers() {
    let token = "0123456789abcdef-test-token";
    let gw = Gateway::start(GatewayOptions {
        token: Some(token.into()),
        ..Default::default()
    })
    .await;
    let client = reqwest::Client::new();
    let url = |p: &str| format!("http://{}{p}", gw.api_addr());
    let lower = client
        .get(url("/api/v1/devices"))
        .header("authorization", format!("bearer {token}"))
        .send()
        .await
        .expect("http");
    assert_eq!(
        lower.status(),
        200,
        "`bearer` in lower case is the same scheme"
    );
    let stranger: serde_json::Value = client
        .get(url("/ready"))
        .send()
        .await
        .expect("http")
        .json()
        .await
        .expect("json");
    assert_eq!(stranger["ready"], true, "{stranger}");
    assert!(
        stranger.get("store").is_none() && stranger.get("reasons").is_none(),
        "no internals without the token: {stranger}"
    );
    let operator: serde_json::Value = client
        .get(url("/ready"))
        .bearer_auth(token)
        .send()
        .await
        .expect("http")
        .json()
        .await
        .expect("json");
    assert_eq!(operator["store"], true, "{operator}");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_registers_each_device_and_reports_every_failure_with_its_index() {
    let token = "0123456789abcdef-test-token";
    let gw = Gateway::start(GatewayOptions {
        token: Some(token.into()),
        ..Default::default()
    })
    .await;
    let api = gw.api();
    api.register("old-1").await;
    let (s, b) = Api::new(api.base(), None)
        .post(
            "/api/v1/devices/batch",
            json!({"devices": [{"msdyn_deviceid": "fleet-9"}]}),
        )
        .await;
    assert_eq!(s, 401, "the batch route needs the bearer token too: {b}");

    let (s, b) = api
        .post(
            "/api/v1/devices/batch",
            json!({"devices": [
                {"msdyn_deviceid": "fleet-1", "msdyn_category": "meter", "msdyn_tags": {"site": "north"}},
                {"msdyn_deviceid": "old-1"},
                {"msdyn_deviceid": "bad id!"},
                {"msdyn_deviceid": "fleet-2", "msdyn_colour": "red"},
                {"msdyn_deviceid": "fleet-3", "msdyn_iotproviderinstance": "nowhere"},
                {"msdyn_deviceid": "fleet-1"},
                {"msdyn_deviceid": "batch", "msdyn_category": "meter"},
            ]}),
        )
        .await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["registered"], 2, "{b}");
    let registered: Vec<_> = b["devices"]
        .as_array()
        .expect("devices")
        .iter()
        .map(|d| (d["index"].clone(), d["device"]["msdyn_deviceid"].clone()))
        .collect();
    assert_eq!(
        registered,
        vec![(json!(0), json!("fleet-1")), (json!(6), json!("batch"))]
    );
    assert_eq!(
        b["devices"][0]["device"]["msdyn_registrationstatus"],
        192350003
    );
    assert_eq!(b["devices"][0]["device"]["msdyn_tags"]["site"], "north");
    let failed: Vec<_> = b["failed"]
        .as_array()
        .expect("failed")
        .iter()
        .map(|f| {
            (
                f["index"].as_u64().expect("index"),
                f["msdyn_deviceid"].as_str().unwrap_or("-").to_owned(),
                f["status"].as_u64().expect("status"),
                f["code"].as_str().expect("code").to_owned(),
                f["error"].as_str().expect("error").to_owned(),
            )
        })
        .collect();
    let expected = [
        (1, "old-1", 409, "already_registered", "unregister it first"),
        (2, "bad id!", 400, "invalid_input", "msdyn_deviceid"),
        (3, "fleet-2", 400, "invalid_input", "msdyn_colour"),
        (
            4,
            "fleet-3",
            400,
            "invalid_input",
            "msdyn_iotproviderinstance",
        ),
        (5, "fleet-1", 409, "conflict", "In Progress"),
    ];
    assert_eq!(failed.len(), expected.len(), "{b}");
    for (got, want) in failed.iter().zip(expected) {
        assert_eq!(
            (got.0, got.1.as_str(), got.2, got.3.as_str()),
            (want.0, want.1, want.2, want.3),
            "{b}"
        );
        assert!(
            got.4.contains(want.4),
            "{:?} should mention {:?}",
            got.4,
            want.4
        );
    }

    let (_, h) = api.get("/api/v1/devices/fleet-1/history").await;
    assert_eq!(h["items"].as_array().map(Vec::len), Some(1), "{h}");
    let categories = api.items("/api/v1/categories").await;
    assert_eq!(categories.len(), 1, "{categories:?}");
    assert_eq!(categories[0]["msdyn_name"], "meter");

    // The single route tells "already registered" apart from other conflicts too.
    let (s, b) = api
        .post("/api/v1/devices", json!({"msdyn_deviceid": "fleet-1"}))
        .await;
    assert_eq!(
        (s, b["error"]["code"].as_str()),
        (409, Some("already_registered")),
        "{b}"
    );

    // A device may be called `batch`: only POST is the batch route.
    let (s, d) = api.get("/api/v1/devices/batch").await;
    assert_eq!(
        (s, d["msdyn_deviceid"].as_str()),
        (200, Some("batch")),
        "{d}"
    );
    let (s, h) = api.get("/api/v1/devices/batch/history").await;
    assert_eq!(s, 200, "{h}");
    assert_eq!(h["items"].as_array().map(Vec::len), Some(1), "{h}");
    let (s, d) = api.delete("/api/v1/devices/batch").await;
    assert_eq!(
        (s, d["msdyn_registrationstatus"].clone()),
        (200, json!(192350001)),
        "{d}"
    );

    let too_many: Vec<Value> = (0..1001)
        .map(|n| json!({"msdyn_deviceid": format!("many-{n}")}))
        .collect();
    let (s, b) = api
        .post("/api/v1/devices/batch", json!({"devices": too_many}))
        .await;
    assert_eq!(s, 400, "{b}");
    let msg = b["error"]["message"].as_str().unwrap_or_default();
    assert!(
        msg.contains("devices") && msg.contains("1000") && msg.contains("split"),
        "{b}"
    );
    assert!(
        api.get("/api/v1/devices/many-0").await.0 == 404,
        "nothing of an oversized batch is registered"
    );
    let (s, b) = api
        .post("/api/v1/devices/batch", json!({"devices": []}))
        .await;
    assert_eq!(s, 400, "{b}");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_state_follows_event_time_not_arrival() {
    let gw = Gateway::start(GatewayOptions::default()).await;
    let api = gw.api();
    api.register("conn-1").await;
    let mut raw = Device::connect(gw.broker_port, "raw-conn").await;
    raw.publish_raw(
        "devices/conn-1/status",
        br#"{"connected": true, "at": "2026-01-01T10:00:05Z"}"#.to_vec(),
    )
    .await;
    raw.publish_raw(
        "devices/conn-1/status",
        br#"{"connected": false, "at": "2026-01-01T10:00:01Z"}"#.to_vec(),
    )
    .await;
    raw.publish_raw(
        "devices/conn-1/telemetry",
        br#"{"message_id": "c-1", "temperature": 1}"#.to_vec(),
    )
    .await;
    let d = wait_for("the device's connection time", || async {
        let (_, d) = api.get("/api/v1/devices/conn-1").await;
        (d["msdyn_connectionstateupdatedtime"]
            .as_str()
            .is_some_and(|t| t.starts_with("2026-01-01T10:00:05")))
        .then_some(d)
    })
    .await;
    // Both status events and the telemetry went through; the late "disconnected" lost.
    wait_for("the telemetry processed", || async {
        let m = api.metrics().await;
        (metric(&m, "iotgw_events_acked_total", &[]) >= 3.0).then_some(())
    })
    .await;
    let (_, d2) = api.get("/api/v1/devices/conn-1").await;
    assert_eq!(d2["msdyn_connectionstate"], Value::Bool(true), "{d} / {d2}");
    gw.stop().await;
}

/// A webhook taking `msdyn_iotdevice` gets the device's change events as they are (its
/// key and version in `Idempotency-Key`, versions in order, the record in `state`) next to
/// the alerts it already took, in their envelope.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_taking_devices_gets_their_change_events_in_version_order() {
    let hook = Webhook::start().await;
    let gw = Gateway::start(GatewayOptions {
        webhook: Some(hook.url()),
        webhook_entities: Some(vec!["msdyn_iotalert".into(), "msdyn_iotdevice".into()]),
        ..Default::default()
    })
    .await;
    let api = gw.api();
    api.register("feed-1").await;
    let mut raw = Device::connect(gw.broker_port, "raw-feed").await;
    raw.publish_raw(
        "devices/feed-1/status",
        br#"{"connected": true, "at": "2026-01-01T10:00:05Z"}"#.to_vec(),
    )
    .await;
    raw.publish_raw(
        "devices/feed-1/telemetry",
        br#"{"message_id": "f-1", "temperature": 90}"#.to_vec(),
    )
    .await;
    wait_for("the alert at the webhook", || async {
        hook.accepted()
            .iter()
            .any(|p| p.body["type"] == "msdyn_iotalert")
            .then_some(())
    })
    .await;
    let (status, d) = api.delete("/api/v1/devices/feed-1").await;
    assert_eq!(status, 200, "{d}");
    let events = wait_for("the unregistration's change event", || async {
        let events: Vec<Post> = hook
            .accepted()
            .into_iter()
            .filter(|p| p.body["entity"] == "msdyn_iotdevice")
            .collect();
        events
            .iter()
            .any(|p| p.body["state"]["msdyn_registrationstatus"] == 192350001)
            .then_some(events)
    })
    .await;
    let mut versions: Vec<i64> = events
        .iter()
        .map(|p| p.body["version"].as_i64().expect("a version"))
        .collect();
    versions.sort_unstable();
    versions.dedup();
    assert_eq!(
        versions.len(),
        events.len(),
        "each version once: {events:?}"
    );
    assert_eq!(versions[0], 1, "{events:?}");
    for p in &events {
        assert_eq!(p.body["key"], "feed-1");
        assert_eq!(
            p.idempotency_key,
            format!("msdyn_iotdevice:feed-1:{}", p.body["version"])
        );
        assert!(p.signature_valid);
        assert_eq!(p.body["state"]["msdyn_deviceid"], "feed-1");
    }
    let newest = events
        .iter()
        .max_by_key(|p| p.body["version"].as_i64())
        .expect("an event");
    assert_eq!(newest.body["state"]["msdyn_registrationstatus"], 192350001);
    assert!(
        events
            .iter()
            .any(|p| p.body["state"]["msdyn_connectionstate"] == Value::Bool(true)),
        "the connection state's event: {events:?}"
    );
    let alerts: Vec<Post> = hook
        .accepted()
        .into_iter()
        .filter(|p| p.body["type"] == "msdyn_iotalert")
        .collect();
    assert_eq!(alerts.len(), 1, "{alerts:?}");
    gw.stop().await;
}

/// C2D delivery feedback names a command by its message id, which is the command's id, not
/// its correlation id: such a reply settles the command too, and a reply from another
/// device does not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_naming_the_command_by_its_id_settles_it_but_not_from_another_device() {
    let gw = Gateway::start(GatewayOptions::default()).await;
    let api = gw.api();
    for id in ["fan-1", "fan-2"] {
        let (status, body) = api
            .post("/api/v1/devices", json!({"msdyn_deviceid": id}))
            .await;
        assert_eq!(status, 201, "{body}");
    }
    let mut dev = Device::connect(gw.broker_port, "fan-1").await;
    let mut other = Device::connect(gw.broker_port, "fan-2").await;
    let (status, cmd) = api
        .post(
            "/api/v1/commands",
            json!({"msdyn_deviceid": "fan-1", "msdyn_name": "spin_down"}),
        )
        .await;
    assert_eq!(status, 202, "{cmd}");
    let id = cmd["msdyn_iotdevicecommandid"]
        .as_str()
        .expect("id")
        .to_owned();
    let received = dev.next_command().await;
    assert_ne!(received.correlation, id, "the correlation id is not the id");

    other.reply_to(&id, true).await;
    wait_for("the reply from the wrong device to be counted", || async {
        let m = api.metrics().await;
        m.lines()
            .any(|l| l.contains("reply_from_wrong_device") && !l.ends_with(" 0"))
            .then_some(())
    })
    .await;
    let (_, c) = api.get(&format!("/api/v1/commands/{id}")).await;
    assert_ne!(c["msdyn_commandstatus"], 192350001, "{c}");

    dev.reply_to(&id, true).await;
    wait_for("the command to be Sent", || async {
        let (_, c) = api.get(&format!("/api/v1/commands/{id}")).await;
        (c["msdyn_commandstatus"] == 192350001).then_some(())
    })
    .await;
}

/// Alert, debounced child, the rule's command and the reply that settles it, for one device.
async fn alert_child_command_reply(
    api: &Api,
    id: &str,
    publish: impl std::future::Future<Output = ()>,
) -> Value {
    publish.await;
    wait_for("an alert and its child", || async {
        let (_, body) = api.get(&format!("/api/v1/alerts?device_id={id}")).await;
        let items = body["items"].as_array().cloned().unwrap_or_default();
        let child = items.iter().any(|a| !a["msdyn_parentalert"].is_null());
        (items.len() == 2 && child).then_some(())
    })
    .await;
    wait_for("the rule's command to be Sent after the reply", || async {
        let (_, body) = api.get(&format!("/api/v1/commands?device_id={id}")).await;
        body["items"].as_array().and_then(|i| {
            i.iter()
                .find(|c| c["msdyn_commandstatus"] == 192350001)
                .cloned()
        })
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_311_device_and_a_5_device_each_get_alert_child_command_and_reply_on_the_embedded_broker()
{
    let gw = Gateway::start(GatewayOptions::default()).await;
    let api = gw.api();
    api.register("old-311").await;
    api.register("new-5").await;

    // MQTT 3.1.1 on its own port: no properties, the correlation id travels in the payload.
    let mut old = Device311::connect(gw.v311_port, "old-311").await;
    old.publish_telemetry(json!({"message_id": "a", "temperature": 80}))
        .await;
    old.publish_telemetry(json!({"message_id": "b", "temperature": 81}))
        .await;
    let cmd = old.next_command().await;
    assert_eq!(cmd.body["CommandName"], "cool_down");
    assert!(
        cmd.correlation.starts_with("local/old-311/a"),
        "the 3.1.1 device reads the correlation id from the payload: {:?}",
        cmd.body
    );
    old.reply(&cmd, true).await;
    let sent = alert_child_command_reply(&api, "old-311", async {}).await;
    assert_eq!(sent["msdyn_name"], "cool_down");

    // MQTT 5 on the main port: the same flow, answered through correlation data.
    let mut new = Device::connect(gw.broker_port, "new-5").await;
    new.publish_telemetry(json!({"message_id": "a", "temperature": 80}))
        .await;
    new.publish_telemetry(json!({"message_id": "b", "temperature": 81}))
        .await;
    let cmd = new.next_command().await;
    assert_eq!(cmd.body["CommandName"], "cool_down");
    new.reply(&cmd, true).await;
    alert_child_command_reply(&api, "new-5", async {}).await;
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_400_kb_reading_is_a_dead_letter_and_the_devices_next_reading_is_processed() {
    let gw = Gateway::start(GatewayOptions::default()).await;
    let api = gw.api();
    api.register("big-1").await;
    let mut dev = Device311::connect(gw.v311_port, "big-1").await;
    let big = format!(
        r#"{{"temperature": 99, "blob": "{}"}}"#,
        "x".repeat(400 * 1024)
    );
    dev.publish_raw(big.into_bytes()).await;
    dev.publish_telemetry(json!({"message_id": "after", "temperature": 90}))
        .await;
    wait_for("the next reading's alert", || async {
        let (_, body) = api.get("/api/v1/alerts?device_id=big-1").await;
        body["items"].as_array().and_then(|i| {
            i.iter()
                .find(|a| a["msdyn_alerttoken"] == "local/big-1/after")
                .cloned()
        })
    })
    .await;
    let (_, body) = api.get("/api/v1/dead-letters").await;
    let letters = body["items"].as_array().cloned().unwrap_or_default();
    assert!(
        letters.iter().any(|l| l["reason"]
            .as_str()
            .is_some_and(|r| r.contains("accepts at most 262144"))),
        "the oversize reading is a dead letter naming the limit: {letters:?}"
    );
    let m = api.metrics().await;
    assert!(metric(&m, "iotgw_events_rejected_total", &["reason=\"oversize\""]) >= 1.0);
    gw.stop().await;
}

/// Publishes `n` alerting readings as a 3.1.1 device at QoS 1 and returns once the
/// embedded broker PUBACKed every one of them.
async fn publish_acked(port: u16, device: &str, n: usize) {
    use rumqttc::{Event as E4, Outgoing, Packet as P4};
    let mut opts = rumqttc::MqttOptions::new(format!("{device}-burst"), "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(10));
    let (client, mut events) = rumqttc::AsyncClient::new(opts, 1024);
    let publisher = {
        let (client, topic) = (client.clone(), format!("devices/{device}/telemetry"));
        tokio::spawn(async move {
            for i in 0..n {
                let body = json!({"message_id": format!("r-{i}"), "temperature": 90});
                client
                    .publish(&topic, rumqttc::QoS::AtLeastOnce, false, body.to_string())
                    .await
                    .expect("publish queued");
            }
        })
    };
    let (mut published, mut acked) = (0, 0);
    tokio::time::timeout(Duration::from_secs(60), async {
        while acked < n {
            match events.poll().await.expect("the device's connection holds") {
                E4::Outgoing(Outgoing::Publish(_)) => published += 1,
                E4::Incoming(P4::PubAck(_)) => acked += 1,
                _ => {}
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{acked} of {n} PUBACKed ({published} sent) in 60 s"));
    publisher.await.expect("publisher");
}

/// Every alert of `device` in the SQLite file under `dir`, counted by token.
async fn committed_tokens(
    dir: &std::path::Path,
    device: &str,
) -> std::collections::BTreeMap<String, usize> {
    use iotgw_registry::{AlertFilter, DeviceId, PageRequest, SqliteStore, Store};
    let store = SqliteStore::open(&dir.join("iotgw.db"))
        .await
        .expect("store");
    let filter = AlertFilter {
        device_id: Some(DeviceId::parse(device).expect("id")),
        ..AlertFilter::default()
    };
    let mut tokens = std::collections::BTreeMap::new();
    let mut after = None;
    loop {
        let page = store
            .list_alerts(&filter, &PageRequest { after, limit: 1000 })
            .await
            .expect("alerts");
        for a in page.items {
            *tokens.entry(a.alert_token).or_insert(0) += 1;
        }
        match page.next {
            Some(n) => after = Some(n),
            None => break,
        }
    }
    store.close().await;
    tokens
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readings_the_embedded_broker_pubacked_are_all_committed_after_a_graceful_stop() {
    const N: usize = 5_000;
    let dir = tempfile::tempdir().expect("tmp");
    let opts = || GatewayOptions {
        data_dir: Some(dir.path().to_owned()),
        ..Default::default()
    };
    let gw = Gateway::start(opts()).await;
    gw.api().register("burst-1").await;
    publish_acked(gw.v311_port, "burst-1", N).await;
    // The stop (what SIGTERM and Ctrl-C do) comes while the broker still holds readings it
    // confirmed and the gateway has not committed.
    gw.stop().await;
    let committed = committed_tokens(dir.path(), "burst-1").await;
    assert_eq!(
        committed.len(),
        N,
        "every PUBACKed reading is committed before the stop ends"
    );
    assert!(committed.values().all(|n| *n == 1), "no duplicate alert");

    // A restart on the same file finds nothing more and nothing twice.
    let gw = Gateway::start(opts()).await;
    gw.stop().await;
    assert_eq!(committed_tokens(dir.path(), "burst-1").await.len(), N);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_packet_over_the_brokers_limit_is_refused_counted_and_named_and_other_devices_carry_on() {
    let gw = Gateway::start(GatewayOptions::default()).await;
    let api = gw.api();
    api.register("huge-1").await;
    let mut opts = rumqttc::MqttOptions::new("huge-1-client", "127.0.0.1", gw.v311_port);
    opts.set_max_packet_size(4 * 1024 * 1024, 4 * 1024 * 1024);
    let (client, mut events) = rumqttc::AsyncClient::new(opts, 8);
    let huge = format!(
        r#"{{"temperature": 99, "blob": "{}"}}"#,
        "x".repeat(1536 * 1024)
    );
    client
        .publish(
            "devices/huge-1/telemetry",
            rumqttc::QoS::AtLeastOnce,
            false,
            huge,
        )
        .await
        .expect("queued");
    // The device's connection is closed (the client sees an error), not left hanging.
    tokio::time::timeout(DEADLINE, async { while events.poll().await.is_ok() {} })
        .await
        .expect("the oversize packet's connection is closed");
    let m = wait_for("the refusal to be counted", || async {
        let m = api.metrics().await;
        (metric(
            &m,
            "iotgw_events_rejected_total",
            &["reason=\"packet_too_large\""],
        ) >= 1.0)
            .then_some(m)
    })
    .await;
    assert!(m.contains("provider=\"embedded_broker\""), "{m}");
    // Another device's reading still goes through.
    api.register("fine-1").await;
    let mut fine = Device311::connect(gw.v311_port, "fine-1").await;
    fine.publish_telemetry(json!({"message_id": "ok", "temperature": 90}))
        .await;
    wait_for("the other device's alert", || async {
        let (_, body) = api.get("/api/v1/alerts?device_id=fine-1").await;
        (body["items"].as_array().map(Vec::len) == Some(1)).then_some(())
    })
    .await;
    gw.stop().await;
}

#[tokio::test]
async fn dead_letters_are_replayed_one_by_one_or_by_filter_once_their_cause_is_fixed() {
    let hook = Webhook::start().await;
    let gw = Gateway::start(GatewayOptions {
        webhook: Some(hook.url()),
        ..Default::default()
    })
    .await;
    let api = gw.api();
    let mut raw = Device::connect(gw.broker_port, "replay-client").await;
    let letters_of = |device: &'static str| {
        let api = api.clone();
        async move {
            let (_, body) = api.get("/api/v1/dead-letters?limit=100").await;
            body["items"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .filter(|l| l["device_id"] == device)
                .collect::<Vec<_>>()
        }
    };

    // A reading of a device registered too late is a dead letter...
    raw.publish_raw(
        "devices/late-1/telemetry",
        br#"{"message_id": "l-1", "temperature": 90}"#.to_vec(),
    )
    .await;
    let letter = wait_for("late-1's dead letter", || async {
        letters_of("late-1").await.into_iter().next()
    })
    .await;
    let id = letter["id"].as_i64().expect("id");
    // ... replayed before the fix, it is a dead letter again, with today's reason.
    let (status, again) = api
        .post(&format!("/api/v1/dead-letters/{id}/replay"), json!({}))
        .await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(again["outcome"], "dead_lettered_again", "{again}");
    assert!(
        again["reason"]
            .as_str()
            .is_some_and(|r| r.contains("not in the registry")),
        "{again}"
    );
    let (gone, _) = api
        .post(&format!("/api/v1/dead-letters/{id}/replay"), json!({}))
        .await;
    assert_eq!(gone, 404, "the replayed dead letter is gone");

    // Registered, the reading replays into an alert, with the token it would have had.
    api.register("late-1").await;
    let letter = letters_of("late-1")
        .await
        .into_iter()
        .next()
        .expect("the new dead letter");
    let id = letter["id"].as_i64().expect("id");
    let (status, done) = api
        .post(&format!("/api/v1/dead-letters/{id}/replay"), json!({}))
        .await;
    assert_eq!(status, 200, "{done}");
    assert_eq!(done, json!({"outcome": "committed", "alerts": 1}));
    let (_, alerts) = api.get("/api/v1/alerts?device_id=late-1").await;
    assert_eq!(
        alerts["items"][0]["msdyn_alerttoken"], "local/late-1/l-1",
        "{alerts}"
    );
    assert!(letters_of("late-1").await.is_empty());

    // By filter: every dead letter of late-2.
    for m in ["l-2", "l-3"] {
        raw.publish_raw(
            "devices/late-2/telemetry",
            format!(r#"{{"message_id": "{m}", "temperature": 20}}"#).into_bytes(),
        )
        .await;
    }
    wait_for("late-2's two dead letters", || async {
        (letters_of("late-2").await.len() == 2).then_some(())
    })
    .await;
    api.register("late-2").await;
    // With a limit, the oldest go first.
    let (status, bulk) = api
        .post(
            "/api/v1/dead-letters/replay",
            json!({"device_id": "late-2", "limit": 1}),
        )
        .await;
    assert_eq!(status, 200, "{bulk}");
    assert_eq!(
        (&bulk["selected"], &bulk["committed"]),
        (&json!(1), &json!(1)),
        "{bulk}"
    );
    let left = letters_of("late-2").await;
    assert_eq!(left.len(), 1, "{left:?}");
    assert_eq!(
        left[0]["message_id"], "l-3",
        "the older one was replayed first"
    );
    let (status, bulk) = api
        .post(
            "/api/v1/dead-letters/replay",
            json!({"device_id": "late-2", "reason_contains": "not in the registry"}),
        )
        .await;
    assert_eq!(status, 200, "{bulk}");
    assert_eq!(
        (&bulk["selected"], &bulk["committed"], &bulk["failed"]),
        (&json!(1), &json!(1), &json!([])),
        "{bulk}"
    );
    let (bad, why) = api
        .post(
            "/api/v1/dead-letters/replay",
            json!({"devise_id": "late-2"}),
        )
        .await;
    assert_eq!(bad, 400, "a typo in the filter is refused: {why}");

    // A sink's dead letter: the receiver said 410 Gone; fixed, the alert is queued again
    // with its idempotency key and delivered.
    hook.refuse_with(Some(axum::http::StatusCode::GONE));
    api.register("sink-1").await;
    let mut dev = Device::connect(gw.broker_port, "sink-1").await;
    dev.publish_telemetry(json!({"message_id": "s-1", "temperature": 95}))
        .await;
    let letter = wait_for("the sink's dead letter", || async {
        let (_, body) = api.get("/api/v1/dead-letters?limit=100").await;
        body["items"]
            .as_array()
            .and_then(|items| items.iter().find(|l| l["source"] == "sink:hook").cloned())
    })
    .await;
    assert!(
        letter["reason"].as_str().is_some_and(|r| r.contains("410")),
        "{letter}"
    );
    hook.refuse_with(None);
    let (status, requeued) = api
        .post(
            &format!("/api/v1/dead-letters/{}/replay", letter["id"]),
            json!({}),
        )
        .await;
    assert_eq!(status, 200, "{requeued}");
    assert_eq!(
        requeued,
        json!({"outcome": "requeued", "sink": "hook", "queued": true})
    );
    let posts = wait_for("the replayed alert at the webhook", || async {
        let p = hook.accepted();
        p.iter()
            .any(|p| p.body["data"]["msdyn_deviceid"] == "sink-1")
            .then_some(p)
    })
    .await;
    let post = posts
        .iter()
        .find(|p| p.body["data"]["msdyn_deviceid"] == "sink-1")
        .expect("post");
    assert_eq!(
        post.idempotency_key,
        letter["message_id"].as_str().expect("key")
    );
    let m = api.metrics().await;
    assert_eq!(
        metric(
            &m,
            "iotgw_dead_letter_replays_total",
            &["outcome=\"committed\""]
        ),
        3.0,
        "{m}"
    );
    gw.stop().await;
}

#[tokio::test]
async fn a_receiver_answering_401_mid_key_rotation_gets_the_alert_once_it_accepts_again() {
    let hook = Webhook::start().await;
    hook.refuse_with(Some(axum::http::StatusCode::UNAUTHORIZED));
    let gw = Gateway::start(GatewayOptions {
        webhook: Some(hook.url()),
        ..Default::default()
    })
    .await;
    let api = gw.api();
    api.register("rotate-1").await;
    let mut dev = Device::connect(gw.broker_port, "rotate-1").await;
    dev.publish_telemetry(json!({"message_id": "k-1", "temperature": 95}))
        .await;
    wait_for("two refused attempts", || async {
        (hook.refused() >= 2).then_some(())
    })
    .await;
    hook.refuse_with(None);
    wait_for("the alert delivered after the rotation", || async {
        (hook.accepted().len() == 1).then_some(())
    })
    .await;
    let (_, letters) = api.get("/api/v1/dead-letters").await;
    assert_eq!(
        letters["items"],
        json!([]),
        "401 is retried, not dead-lettered"
    );
    gw.stop().await;
}

/// Arbitrary JSON (and non-JSON) bodies against every route that takes one: never a 5xx,
/// and every 400 says which field is wrong (`invalid <field>: ...`).
#[test]
fn arbitrary_request_bodies_get_a_4xx_naming_the_field_never_a_5xx() {
    use proptest::prelude::*;
    use proptest::test_runner::{Config, TestRunner};

    fn leaf() -> impl Strategy<Value = Value> {
        prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<f64>().prop_map(Value::from),
            ".{0,30}".prop_map(Value::from),
            Just(json!("pump-1")),
            Just(json!("local")),
        ]
    }
    fn bodies() -> impl Strategy<Value = Value> {
        let keys = proptest::sample::select(vec![
            "msdyn_deviceid",
            "msdyn_name",
            "msdyn_category",
            "msdyn_tags",
            "msdyn_iotproviderinstance",
            "msdyn_devicesettings",
            "parameters",
            "to",
            "devices",
            "source",
            "limit",
            "extra",
        ]);
        leaf().prop_recursive(3, 24, 6, move |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
                proptest::collection::btree_map(keys.clone(), inner, 0..5).prop_map(|m| {
                    Value::Object(m.into_iter().map(|(k, v)| (k.to_owned(), v)).collect())
                }),
            ]
        })
    }
    let routes = proptest::sample::select(vec![
        "/api/v1/devices",
        "/api/v1/devices/batch",
        "/api/v1/commands",
        "/api/v1/devices/pump-1/move",
        "/api/v1/dead-letters/replay",
        "/api/v1/categories",
    ]);

    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let gw = rt.block_on(Gateway::start(GatewayOptions::default()));
    let api = gw.api();
    rt.block_on(api.register("pump-1"));
    let mut runner = TestRunner::new(Config::with_cases(128));
    runner
        .run(&(routes, bodies()), |(route, body)| {
            let (status, answer) = rt.block_on(api.post(route, body.clone()));
            prop_assert!(status < 500, "POST {route} {body} -> {status} {answer}");
            if status == 400 {
                let message = answer["error"]["message"].as_str().unwrap_or_default();
                prop_assert!(
                    message.starts_with("invalid "),
                    "POST {route} {body} -> 400 without the field: {answer}"
                );
            }
            Ok(())
        })
        .unwrap_or_else(|e| panic!("{e}"));
    rt.block_on(gw.stop());
}

/// Readings through the real boundaries: three devices publish ten minutes of telemetry
/// (one message every 10 s, the time in the payload, a few delivered twice), and the
/// readings query answers each minute and each five minutes with the min, max, avg, sum
/// and count the test computes from what it sent; a device's other measures and a string
/// are not mixed in, and a bad interval is a 400 naming it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readings_of_ten_minutes_are_answered_per_minute_and_per_five_minutes() {
    use chrono::{DateTime, Duration as Span, DurationRound, Utc};
    use std::collections::BTreeMap;

    let gw = Gateway::start(GatewayOptions::default()).await;
    let api = gw.api();
    // Ten minutes that ended at least an hour ago, from a whole hour.
    let start = (Utc::now() - Span::hours(2))
        .duration_trunc(Span::hours(1))
        .expect("an hour");
    let value = |d: usize, i: i64| ((d as i64 * 100) + (i * 7) % 23) as f64 / 4.0;
    let mut sent: BTreeMap<(String, DateTime<Utc>, i64), Vec<f64>> = BTreeMap::new();
    for d in 0..3 {
        let id = format!("meter-{d}");
        api.register(&id).await;
        let mut dev = Device::connect(gw.broker_port, &id).await;
        for i in 0..60 {
            let at = start + Span::seconds(10 * i);
            let body = json!({
                "message_id": format!("r-{i}"),
                "timestamp": at.to_rfc3339(),
                "flow": {"litres": value(d, i)},
                "valve_open": i % 3 == 0,
                "site": "north",
            });
            dev.publish_telemetry(body.clone()).await;
            if i % 17 == 0 {
                dev.publish_telemetry(body).await; // delivered twice: kept once
            }
            for interval in [60, 300] {
                let bucket = start + Span::seconds((10 * i) / interval * interval);
                sent.entry((id.clone(), bucket, interval))
                    .or_default()
                    .push(value(d, i));
            }
        }
    }
    let from = start.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let to = (start + Span::minutes(10)).to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    for d in 0..3 {
        let id = format!("meter-{d}");
        for (interval, name) in [(60, "PT1M"), (300, "PT5M")] {
            let path = format!(
                "/api/v1/devices/{id}/readings?from={from}&to={to}&interval={name}&measures=/flow/litres"
            );
            let body = wait_for("every reading of the ten minutes", || async {
                let (status, body) = api.get(&path).await;
                assert_eq!(status, 200, "{body}");
                let series = body[&id]["/flow/litres"].as_object()?;
                let count: i64 = series.values().filter_map(|b| b["count"].as_i64()).sum();
                (count == 60).then_some(body)
            })
            .await;
            let series = body[&id]["/flow/litres"].as_object().expect("series");
            assert_eq!(series.len(), 600 / interval as usize, "{name}: {body}");
            for ((dev, bucket, i), values) in sent
                .iter()
                .filter(|((dev, _, i), _)| *dev == id && *i == interval)
            {
                let key = bucket.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
                let got = &series[&key];
                let sum: f64 = values.iter().sum();
                let expected = json!({
                    "min": values.iter().copied().fold(f64::MAX, f64::min),
                    "max": values.iter().copied().fold(f64::MIN, f64::max),
                    "sum": sum,
                    "avg": sum / values.len() as f64,
                    "count": values.len(),
                });
                assert_eq!(got, &expected, "{dev} {name} {key} (every {i} s)");
            }
            assert!(
                body[&id].get("/site").is_none() && body[&id].get("/valve_open").is_none(),
                "only the measure asked for: {body}"
            );
        }
        let (_, all) = api
            .get(&format!(
                "/api/v1/devices/{id}/readings?from={from}&to={to}&interval=PT10M"
            ))
            .await;
        assert_eq!(
            all[&id]["/valve_open"][&from]["sum"],
            json!(20.0),
            "a boolean counts as 0 and 1: {all}"
        );
        assert!(all[&id].get("/site").is_none(), "strings are not readings");
    }
    let (status, bad) = api
        .get("/api/v1/devices/meter-0/readings?interval=PT0.5S")
        .await;
    assert_eq!(status, 400, "{bad}");
    assert!(
        bad["error"]["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("invalid interval:")),
        "{bad}"
    );
    gw.stop().await;
}

/// Field Service's provider actions with its own JSON, on the embedded default: register
/// three devices by their Dataverse GUIDs, readings through MQTT, "query device readings"
/// at PT1M, "aggregated device readings", and "pull device data" after a gateway restart
/// (the connection state and reported properties come from the registry, not from memory).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn field_service_actions_register_query_aggregate_and_pull_after_a_restart() {
    use chrono::{Duration as Span, DurationRound, Utc};

    let dir = tempfile::tempdir().expect("tmp");
    let opts = || GatewayOptions {
        data_dir: Some(dir.path().to_owned()),
        ..Default::default()
    };
    let gw = Gateway::start(opts()).await;
    let api = gw.api();
    let guids = [
        "5754578d-1f9a-4720-bc21-3c3042c05b2f",
        "5754578d-1f9a-4720-bc21-3c3042c06c5f",
        "5754578d-1f9a-4720-bc21-3c3042c07d6f",
    ];
    let collection = json!({"EntityCollection": guids.iter().enumerate().map(|(i, g)| json!({
        "msdyn_iotdeviceid": g,
        "msdyn_name": format!(" Coffee maker {i}"),
        "@odata.type": "Microsoft.Dynamics.CRM.msdyn_iotdevice",
    })).collect::<Vec<_>>()});
    let (status, registered) = api
        .post("/api/cfs/v1/register-devices", collection.clone())
        .await;
    assert_eq!(status, 200, "{registered}");
    let results = registered["RegistrationResultsJSON"]
        .as_array()
        .expect("results");
    assert_eq!(results.len(), 3, "{registered}");
    for (r, g) in results.iter().zip(guids) {
        assert_eq!(r["Id"], g);
        assert_eq!(
            r["DeviceId"], g,
            "without msdyn_deviceid the GUID is the device id"
        );
        assert_eq!(r["RegistrationStatus"], json!({"Value": 192350003}), "{r}");
    }
    assert_golden("cfs_register_devices", &registered, &[]);
    // Registering again reports Registered, with why nothing changed.
    let (_, again) = api
        .post("/api/cfs/v1/register-devices", collection.clone())
        .await;
    assert_eq!(
        again["RegistrationResultsJSON"][0]["RegistrationStatus"]["Value"],
        192350003
    );

    // Five minutes of readings of the first device, an hour or more ago, and its state.
    let start = (Utc::now() - Span::hours(2))
        .duration_trunc(Span::hours(1))
        .expect("an hour");
    let mut dev = Device::connect(gw.broker_port, guids[0]).await;
    for i in 0..30 {
        dev.publish_telemetry(json!({
            "message_id": format!("c-{i}"),
            "timestamp": (start + Span::seconds(10 * i)).to_rfc3339(),
            "Temperature": 60 + i,
        }))
        .await;
    }
    dev.publish_raw(
        &format!("devices/{}/reported", guids[0]),
        br#"{"firmware": "2.1", "humidity": 21.5}"#.to_vec(),
    )
    .await;
    dev.publish_raw(&format!("devices/{}/status", guids[0]), b"online".to_vec())
        .await;
    let query = json!({
        "From": start.to_rfc3339(),
        "To": (start + Span::minutes(5)).to_rfc3339(),
        "IoTDeviceId": guids[0],
        "Interval": "PT1M",
    });
    let readings = wait_for("thirty readings in five minutes", || async {
        let (status, body) = api
            .post("/api/cfs/v1/query-device-readings", query.clone())
            .await;
        assert_eq!(status, 200, "{body}");
        let series = body["AggregatedDeviceReadings"][guids[0]]["Temperature"].as_object()?;
        (series
            .values()
            .filter_map(|b| b["count"].as_i64())
            .sum::<i64>()
            == 30)
            .then_some(body)
    })
    .await;
    assert_golden("cfs_query_device_readings", &readings, &[]);
    let first_minute = &readings["AggregatedDeviceReadings"][guids[0]]["Temperature"]
        [start.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)];
    // Readings 0..5 of the first minute: 60..65.
    assert_eq!(
        first_minute,
        &json!({"min": 60.0, "max": 65.0, "avg": 62.5, "sum": 375.0, "count": 6}),
        "{readings}"
    );
    let mut sub_second = query.clone();
    sub_second["Interval"] = json!("PT0.001S");
    let (status, bad) = api
        .post("/api/cfs/v1/query-device-readings", sub_second)
        .await;
    assert_eq!(status, 400, "{bad}");
    assert!(
        bad["error"]["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("invalid Interval:")),
        "{bad}"
    );

    // The aggregates over the last day; `measures` as Field Service passes it, a string.
    let (status, aggregated) = api
        .post(
            "/api/cfs/v1/aggregated-device-readings",
            json!({
                "deviceId": guids[0],
                "measures": json!([
                    {"Measure": "Temperature", "Aggregate": "Max", "TimeRangeType": "Days", "TimeRangeValue": 1},
                    {"Measure": "Temperature", "Aggregate": "Avg", "TimeRangeType": "Days", "TimeRangeValue": 1, "Unit": "F"},
                    {"Measure": "Humidity", "Aggregate": "Min", "TimeRangeType": "Days", "TimeRangeValue": 7},
                ]).to_string(),
            }),
        )
        .await;
    assert_eq!(status, 200, "{aggregated}");
    assert_golden("cfs_aggregated_device_readings", &aggregated, &[]);
    assert_eq!(
        aggregated,
        json!([
            {"Name": "Temperature", "Aggregate": "Max", "Unit": "", "TimeRangeValue": 1, "TimeRangeType": "Days", "Position": 1, "Value": "89"},
            {"Name": "Temperature", "Aggregate": "Avg", "Unit": "F", "TimeRangeValue": 1, "TimeRangeType": "Days", "Position": 2, "Value": "74.5"},
            {"Name": "Humidity", "Aggregate": "Min", "Unit": "", "TimeRangeValue": 7, "TimeRangeType": "Days", "Position": 3, "Value": ""},
        ])
    );

    // An aggregate Field Service does not know is refused, naming it, even with no data.
    let (status, bad) = api
        .post(
            "/api/cfs/v1/aggregated-device-readings",
            json!({"deviceId": guids[2], "measures": [
                {"Measure": "Temperature", "Aggregate": "Median", "TimeRangeType": "Days", "TimeRangeValue": 1},
            ]}),
        )
        .await;
    assert_eq!(status, 400, "{bad}");
    assert!(
        bad["error"]["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("invalid Aggregate:")),
        "{bad}"
    );

    // The state the device reported, then a restart: pull device data answers from the
    // registry.
    let api_for_wait = api.clone();
    wait_for(
        "the reported properties and the connection committed",
        || async {
            let (_, d) = api_for_wait
                .get(&format!("/api/v1/devices/{}", guids[0]))
                .await;
            (d["msdyn_connectionstate"] == json!(true)
                && d["msdyn_devicereportedproperties"]["firmware"] == "2.1")
                .then_some(())
        },
    )
    .await;
    drop(dev);
    gw.stop().await;
    let gw = Gateway::start(opts()).await;
    let api = gw.api();
    let (status, pulled) = api.post("/api/cfs/v1/pull-device-data", collection).await;
    assert_eq!(status, 200, "{pulled}");
    assert_golden("cfs_pull_device_data", &pulled, &[]);
    let pulled = pulled["PullDeviceDataResultsJSON"]
        .as_array()
        .expect("results")
        .clone();
    assert_eq!(pulled.len(), 3);
    assert_eq!(pulled[0]["Id"], guids[0]);
    assert_eq!(
        pulled[0]["DeviceReportedProperties"],
        json!({"firmware": "2.1", "humidity": 21.5})
    );
    assert!(pulled[0]["LastActivityTime"].is_string(), "{pulled:?}");
    assert!(
        pulled[0]["ConnectionStateUpdatedTime"].is_string(),
        "{pulled:?}"
    );
    assert_eq!(pulled[1]["DeviceReportedProperties"], json!({}));
    gw.stop().await;
}

/// Field Service's send command, to every connected device and by definition; a device's
/// reported properties read through property definitions; an alert's case and work order;
/// closing a parent closes its child; the JSON getters. The responses are checked against
/// golden files (`tests/golden/`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn field_service_sends_to_every_connected_device_by_definition_and_links_alerts_to_service_work(
) {
    let gw = Gateway::start(GatewayOptions::default()).await;
    let api = gw.api();
    let ids = ["fs-a", "fs-b", "fs-c"];
    for id in ids {
        let (status, body) = api
            .post(
                "/api/v1/devices",
                json!({"msdyn_deviceid": id, "msdyn_category": "chiller"}),
            )
            .await;
        assert_eq!(status, 201, "{body}");
    }
    // a and b are connected; c is subscribed to its commands but said it is offline.
    let mut devices = Vec::new();
    for (id, state) in ids.iter().zip(["online", "online", "offline"]) {
        let mut d = Device::connect(gw.broker_port, id).await;
        d.publish_raw(&format!("devices/{id}/status"), state.as_bytes().to_vec())
            .await;
        devices.push(d);
    }
    wait_for("a and b connected, c not", || async {
        let (_, on) = api.get("/api/v1/devices?connected=true").await;
        let (_, off) = api.get("/api/v1/devices?connected=false").await;
        let names = |v: &Value| {
            v["items"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|d| d["msdyn_deviceid"].as_str().map(str::to_owned))
                        .collect::<Vec<_>>()
                })
                .unwrap_or_default()
        };
        (names(&on).len() == 2 && names(&off) == ["fs-c"]).then_some(())
    })
    .await;

    // A wrong parameter type is refused, naming the parameter; nothing is stored or sent.
    let by_definition = |params: Value, all: bool| {
        let mut body = json!({
            "msdyn_iotdevicecommandid": "7f1c3c1e-0c8f-4a4e-9d4b-3f7f0f6d2a11",
            "msdyn_name": "Raise the threshold",
            "msdyn_command": "set_threshold",
            "msdyn_message": json!({"CommandName": "set_threshold", "Parameters": params}).to_string(),
            "@odata.type": "Microsoft.Dynamics.CRM.msdyn_iotdevicecommand",
        });
        if all {
            body["msdyn_sendtoallconnecteddevices"] = json!(true);
        } else {
            body["msdyn_deviceid"] = json!("fs-a");
        }
        body
    };
    let (status, refused) = api
        .post(
            "/api/cfs/v1/send-command",
            by_definition(json!({"settings": {"threshold": "hot"}}), true),
        )
        .await;
    assert_eq!(status, 400, "{refused}");
    let message = refused["error"]["message"].as_str().expect("message");
    assert!(
        message.starts_with("invalid Parameters.settings.threshold:")
            && message.contains("is not a Decimal"),
        "{message}"
    );
    let (status, missing) = api
        .post("/api/cfs/v1/send-command", by_definition(json!({}), false))
        .await;
    assert_eq!(status, 400, "{missing}");
    assert!(
        missing["error"]["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("invalid Parameters.settings.threshold: missing")),
        "{missing}"
    );
    let (_, none) = api.get("/api/v1/commands").await;
    assert_eq!(none["items"], json!([]), "a refused command is not stored");

    // Send to all: one command per connected device, all of one request.
    let (status, sent) = api
        .post(
            "/api/cfs/v1/send-command",
            by_definition(json!({"settings": {"threshold": 4.5}}), true),
        )
        .await;
    assert_eq!(status, 202, "{sent}");
    let request = sent["RequestId"].as_str().expect("a request id").to_owned();
    let targets: std::collections::BTreeSet<&str> = sent["Commands"]
        .as_array()
        .expect("commands")
        .iter()
        .map(|c| {
            assert_eq!(c["iotgw_requestid"], request.as_str(), "{c}");
            c["msdyn_deviceid"].as_str().expect("device")
        })
        .collect();
    assert_eq!(targets, ["fs-a", "fs-b"].into(), "{sent}");
    assert_golden(
        "cfs_send_command_to_all",
        &json!({"Id": sent["Id"], "RequestId": sent["RequestId"], "Commands": [sent["Commands"][0]]}),
        &["msdyn_deviceid", "iotgw_correlationid"],
    );
    for d in &mut devices[..2] {
        let cmd = d.next_command().await;
        assert_eq!(cmd.body["CommandName"], "set_threshold", "{:?}", cmd.body);
        assert_eq!(
            cmd.body["Parameters"],
            json!({"settings": {"threshold": 4.5}})
        );
        d.reply(&cmd, true).await;
    }
    assert!(
        devices[2]
            .command_within(Duration::from_millis(500))
            .await
            .is_none(),
        "the disconnected device got no command"
    );
    let (_, of_request) = api
        .get(&format!("/api/v1/commands?request_id={request}"))
        .await;
    assert_eq!(
        of_request["items"].as_array().map(Vec::len),
        Some(2),
        "{of_request}"
    );
    wait_for("both commands Sent", || async {
        let (_, page) = api
            .get(&format!("/api/v1/commands?request_id={request}"))
            .await;
        page["items"]
            .as_array()?
            .iter()
            .all(|c| c["msdyn_commandstatus"] == 192350001)
            .then_some(())
    })
    .await;

    // Reported properties through their definitions.
    devices[0]
        .publish_raw(
            "devices/fs-a/reported",
            br#"{"settings": {"threshold": 4.5}, "firmware": 2}"#.to_vec(),
        )
        .await;
    let props = wait_for("fs-a's reported properties", || async {
        let (status, body) = api.get("/api/v1/devices/fs-a/properties").await;
        assert_eq!(status, 200, "{body}");
        (body["items"].as_array()?.iter().any(|p| p["value"] == 4.5)).then_some(body)
    })
    .await;
    assert_golden("device_properties", &props, &[]);

    // An alert and its child; a work order, then a case; closing the parent closes the child.
    devices[0]
        .publish_telemetry(json!({"message_id": "hot-1", "temperature": 90}))
        .await;
    devices[0]
        .publish_telemetry(json!({"message_id": "hot-2", "temperature": 91}))
        .await;
    let (parent, child) = wait_for("a parent alert and its child", || async {
        let (_, page) = api.get("/api/v1/alerts?device_id=fs-a").await;
        let items = page["items"].as_array()?;
        let parent = items.iter().find(|a| a["msdyn_parentalert"].is_null())?;
        let child = items
            .iter()
            .find(|a| a["msdyn_parentalert"] == parent["msdyn_iotalertid"])?;
        Some((
            parent["msdyn_iotalertid"].as_str()?.to_owned(),
            child["msdyn_iotalertid"].as_str()?.to_owned(),
        ))
    })
    .await;
    let order = "3f2504e0-4f89-11d3-9a0c-0305e82c3301";
    let (status, ordered) = api
        .post(
            &format!("/api/v1/alerts/{parent}/work-order"),
            json!({"msdyn_workorder": order}),
        )
        .await;
    assert_eq!(status, 200, "{ordered}");
    assert_eq!(
        (
            &ordered["msdyn_workorder"],
            &ordered["statecode"],
            &ordered["statuscode"]
        ),
        (&json!(order), &json!(2), &json!(4))
    );
    let case = "3f2504e0-4f89-11d3-9a0c-0305e82c3302";
    let (status, cased) = api
        .post(
            &format!("/api/v1/alerts/{parent}/case"),
            json!({"msdyn_case": case}),
        )
        .await;
    assert_eq!(status, 200, "{cased}");
    assert_eq!(
        (
            &cased["msdyn_case"],
            &cased["msdyn_workorder"],
            &cased["statuscode"]
        ),
        (&json!(case), &json!(order), &json!(3)),
        "the work order stays recorded"
    );
    let (status, bad) = api
        .post(
            &format!("/api/v1/alerts/{parent}/case"),
            json!({"msdyn_case": "case-1"}),
        )
        .await;
    assert_eq!(status, 400, "{bad}");
    assert!(bad["error"]["message"]
        .as_str()
        .is_some_and(|m| m.starts_with("invalid msdyn_case:")));
    let (status, closed) = api
        .post(&format!("/api/v1/alerts/{parent}/close"), json!({}))
        .await;
    assert_eq!((status, &closed["statecode"]), (200, &json!(3)), "{closed}");
    let (_, child_now) = api.get(&format!("/api/v1/alerts/{child}")).await;
    assert_eq!(
        (&child_now["statecode"], &child_now["statuscode"]),
        (&json!(3), &json!(6)),
        "the child is closed with its parent: {child_now}"
    );

    // A test alert: type Test, from a registered device; a second one is its child.
    let (status, test) = api
        .post(
            "/api/cfs/v1/send-test-alert",
            json!({"msdyn_deviceid": "fs-b"}),
        )
        .await;
    assert_eq!(status, 201, "{test}");
    assert_eq!(
        (
            &test["msdyn_alerttype"],
            &test["msdyn_description"],
            &test["msdyn_parentalert"]
        ),
        (
            &json!(192350003),
            &json!("Test alert from fs-b"),
            &Value::Null
        )
    );
    assert_golden("cfs_send_test_alert", &test, &["msdyn_alerttoken"]);
    let (_, again) = api
        .post(
            "/api/cfs/v1/send-test-alert",
            json!({"msdyn_deviceid": "fs-b", "msdyn_alertdata": {"source": "flow"}}),
        )
        .await;
    assert_eq!(
        again["msdyn_parentalert"], test["msdyn_iotalertid"],
        "{again}"
    );
    assert_eq!(again["msdyn_alertdata"], r#"{"source":"flow"}"#);
    let (status, ghost) = api
        .post(
            "/api/cfs/v1/send-test-alert",
            json!({"msdyn_deviceid": "ghost"}),
        )
        .await;
    assert_eq!(status, 404, "{ghost}");

    // Custom entities: an asset linked to an existing device, another to a new one.
    let (status, linked) = api
        .post(
            "/api/cfs/v1/register-custom-entity",
            json!({
                "EntityIds": ["asset-1", "asset-2"],
                "EntityLogicalName": "msdyn_customerasset",
                "DeviceIds": ["fs-a", ""],
                "Names": ["", "Chiller 2"],
            }),
        )
        .await;
    assert_eq!(status, 200, "{linked}");
    assert_golden("cfs_register_custom_entity", &linked, &[]);
    let (_, new_device) = api.get("/api/v1/devices/asset-2").await;
    assert_eq!(
        (
            &new_device["msdyn_name"],
            &new_device["msdyn_registrationstatus"]
        ),
        (&json!("Chiller 2"), &json!(192350003)),
        "{new_device}"
    );
    let (_, links) = api
        .get("/api/v1/entity-links?entity_logical_name=msdyn_customerasset")
        .await;
    let pairs: Vec<(&str, &str)> = links["items"]
        .as_array()
        .expect("links")
        .iter()
        .map(|l| {
            (
                l["EntityId"].as_str().unwrap_or(""),
                l["msdyn_deviceid"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(pairs, [("asset-1", "fs-a"), ("asset-2", "asset-2")]);
    let (status, bad) = api
        .post(
            "/api/cfs/v1/register-custom-entity",
            json!({"EntityIds": ["a"], "EntityLogicalName": "Customer Asset"}),
        )
        .await;
    assert_eq!(status, 400, "{bad}");
    assert!(bad["error"]["message"]
        .as_str()
        .is_some_and(|m| m.starts_with("invalid EntityLogicalName:")));

    // The JSON getters.
    let doc =
        json!({"engine": {"temp": 71.5, "on": true, "name": "main"}, "axes": [1, 2]}).to_string();
    for (getter, path, want) in [
        ("json-get-number", "engine.temp", json!(71.5)),
        ("json-get-number", "/axes/1", json!(2)),
        ("json-get-boolean", "engine.on", json!(true)),
        ("json-get-string", "engine.name", json!("main")),
        ("json-get-string", "engine.temp", json!("71.5")),
        ("json-get-number", "engine.name", Value::Null),
        ("json-get-boolean", "engine.missing", Value::Null),
    ] {
        let (status, got) = api
            .post(
                &format!("/api/cfs/v1/{getter}"),
                json!({"Json": doc, "Path": path}),
            )
            .await;
        assert_eq!(
            (status, &got),
            (200, &json!({"Value": want})),
            "{getter} {path}"
        );
    }
    let (status, bad) = api
        .post(
            "/api/cfs/v1/json-get-number",
            json!({"Json": "{", "Path": "a"}),
        )
        .await;
    assert_eq!(status, 400, "{bad}");
    gw.stop().await;
}

/// The first message a fresh MQTT 5 client subscribing to `topic` receives (a retained
/// one, when the broker holds it), with its retain flag.
async fn first_message_on(port: u16, topic: &str) -> (Value, bool) {
    use rumqttc::v5::mqttbytes::v5::Packet;
    use rumqttc::v5::mqttbytes::QoS;
    use rumqttc::v5::{AsyncClient, Event, MqttOptions};
    let mut opts = MqttOptions::new(
        format!("settings-reader-{}", free_port()),
        "127.0.0.1",
        port,
    );
    opts.set_keep_alive(Duration::from_secs(10));
    let (client, mut events) = AsyncClient::new(opts, 16);
    client
        .subscribe(topic, QoS::AtLeastOnce)
        .await
        .expect("subscribe queued");
    let got = tokio::time::timeout(DEADLINE, async {
        loop {
            match events.poll().await {
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let body: Value = serde_json::from_slice(&p.payload).unwrap_or(Value::Null);
                    return (body, p.retain);
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("nothing on {topic} within {DEADLINE:?}"));
    let _ = client.disconnect().await;
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn field_service_update_device_data_publishes_retained_settings_and_stores_them() {
    let gw = Gateway::start(GatewayOptions::default()).await;
    let api = gw.api();
    let (status, body) = api
        .post("/api/v1/devices", json!({"msdyn_deviceid": "boiler-7"}))
        .await;
    assert_eq!(status, 201, "{body}");

    let settings = json!({"setpoint": 21.5, "mode": "eco", "schedule": {"on": "06:00"}});
    let (status, updated) = api
        .post(
            "/api/cfs/v1/update-device-data",
            json!({
                "msdyn_deviceid": "boiler-7",
                "msdyn_devicesettings": settings,
                "@odata.type": "Microsoft.Dynamics.CRM.msdyn_iotdevice",
            }),
        )
        .await;
    assert_eq!(status, 200, "{updated}");
    assert_eq!(updated["Id"], "boiler-7");
    assert_eq!(updated["DeviceSettings"], settings);
    assert_golden("cfs_update_device_data", &updated, &[]);

    // A device connecting afterwards gets the settings: the broker retained them.
    let (got, retained) = first_message_on(gw.broker_port, "devices/boiler-7/settings").await;
    assert_eq!(got, settings);
    assert!(retained, "the settings message is retained");
    let (_, device) = api.get("/api/v1/devices/boiler-7").await;
    assert_eq!(device["msdyn_devicesettings"], settings, "{device}");

    // The same settings as JSON text (as Dataverse keeps them) replace the stored ones.
    let newer = json!({"mode": "boost"});
    let (status, body) = api
        .post(
            "/api/cfs/v1/update-device-data",
            json!({"msdyn_deviceid": "boiler-7", "msdyn_devicesettings": newer.to_string()}),
        )
        .await;
    assert_eq!((status, &body["DeviceSettings"]), (200, &newer), "{body}");
    let (got, _) = first_message_on(gw.broker_port, "devices/boiler-7/settings").await;
    assert_eq!(got, newer, "the latest settings are the retained ones");

    for bad in [json!([1, 2]), json!(42), json!("not json"), json!("[1]")] {
        let (status, refused) = api
            .post(
                "/api/cfs/v1/update-device-data",
                json!({"msdyn_deviceid": "boiler-7", "msdyn_devicesettings": bad}),
            )
            .await;
        assert_eq!(status, 400, "{bad}: {refused}");
        let message = refused["error"]["message"].as_str().expect("message");
        assert!(
            message.starts_with("invalid msdyn_devicesettings:"),
            "{message}"
        );
    }
    let (status, big) = api
        .post(
            "/api/cfs/v1/update-device-data",
            json!({"msdyn_deviceid": "boiler-7", "msdyn_devicesettings": {"blob": "x".repeat(9000)}}),
        )
        .await;
    assert_eq!(status, 400, "{big}");
    assert!(
        big["error"]["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("invalid msdyn_devicesettings:") && m.contains("8192")),
        "{big}"
    );
    let (_, device) = api.get("/api/v1/devices/boiler-7").await;
    assert_eq!(
        device["msdyn_devicesettings"], newer,
        "refused settings change nothing"
    );

    let (status, missing) = api
        .post(
            "/api/cfs/v1/update-device-data",
            json!({"msdyn_deviceid": "nobody-here", "msdyn_devicesettings": {"a": 1}}),
        )
        .await;
    assert_eq!(status, 404, "{missing}");
    assert!(
        missing["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("register it first")),
        "{missing}"
    );
    let (status, unknown) = api
        .post(
            "/api/cfs/v1/update-device-data",
            json!({"msdyn_deviceid": "boiler-7", "msdyn_devicesettings": {}, "extra": 1}),
        )
        .await;
    assert_eq!(status, 400, "unknown fields are refused: {unknown}");
    gw.stop().await;
}

/// The console at `/ui`, as a browser sees it over HTTP: the login (a wrong token refused,
/// the right one set as a cookie), the overview's counts, the device list, a device page
/// with its alert and the child folded under it and a readings chart, the alert list, and
/// a dead letter replayed from its page.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_logs_in_shows_the_fleet_a_device_page_and_replays_a_dead_letter() {
    let token = "console-token-0123456789";
    let gw = Gateway::start(GatewayOptions {
        token: Some(token.into()),
        ..Default::default()
    })
    .await;
    let api = gw.api();
    for id in ["ui-1", "ui-2", "ui-3"] {
        let (status, body) = api
            .post(
                "/api/v1/devices",
                json!({"msdyn_deviceid": id, "msdyn_category": "chiller"}),
            )
            .await;
        assert_eq!(status, 201, "{body}");
    }
    let mut dev = Device::connect(gw.broker_port, "ui-1").await;
    dev.publish_raw("devices/ui-1/status", b"online".to_vec())
        .await;
    let now = chrono::Utc::now();
    // Two above the rule's 75: an alert and its child.
    for (i, temperature) in [70, 72, 80, 74, 85].into_iter().enumerate() {
        dev.publish_telemetry(json!({
            "message_id": format!("ui-{i}"),
            "timestamp": (now - chrono::Duration::minutes(10 - i as i64)).to_rfc3339(),
            "temperature": temperature,
        }))
        .await;
    }
    // Telemetry of an unknown device: a dead letter.
    dev.publish_raw(
        "devices/ghost-9/telemetry",
        br#"{"temperature": 1}"#.to_vec(),
    )
    .await;
    wait_for("the alerts, the child and the dead letter", || async {
        let (_, alerts) = api.get("/api/v1/alerts?device_id=ui-1").await;
        let (_, letters) = api.get("/api/v1/dead-letters").await;
        (alerts["items"].as_array()?.len() == 2 && !letters["items"].as_array()?.is_empty())
            .then_some(())
    })
    .await;

    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client");
    let url = |p: &str| format!("http://{}{p}", gw.api_addr());
    let get = |path: &str, cookie: Option<&str>| {
        let mut r = http.get(url(path));
        if let Some(c) = cookie {
            r = r.header("cookie", c);
        }
        async move {
            let resp = r.send().await.expect("console reachable");
            let status = resp.status().as_u16();
            let location = resp
                .headers()
                .get("location")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            (status, location, resp.text().await.expect("body"))
        }
    };
    // Without the cookie: to the login form.
    let (status, location, _) = get("/ui", None).await;
    assert_eq!((status, location.as_deref()), (303, Some("/ui/login")));
    let login = |given: &str| {
        http.post(url("/ui/login"))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(format!("token={given}"))
            .send()
    };
    let wrong = login("nope").await.expect("login");
    assert_eq!(wrong.status().as_u16(), 401);
    let ok = login(token).await.expect("login");
    assert_eq!(ok.status().as_u16(), 303);
    let set = ok
        .headers()
        .get("set-cookie")
        .and_then(|v| v.to_str().ok())
        .expect("a cookie")
        .to_owned();
    assert!(
        set.contains("HttpOnly") && set.contains("SameSite=Strict"),
        "{set}"
    );
    let cookie = set.split(';').next().expect("name=value").to_owned();
    let page = |path: &'static str| {
        let cookie = cookie.clone();
        let get = &get;
        async move {
            let (status, _, body) = get(path, Some(&cookie)).await;
            assert_eq!(status, 200, "{path}: {body}");
            body
        }
    };

    let overview = page("/ui").await;
    assert!(overview.contains("data-instance=\"local\""), "{overview}");
    assert!(overview.contains("data-registered=\"3\""), "{overview}");
    assert!(overview.contains("data-connected=\"1\""), "{overview}");

    let devices = page("/ui/devices").await;
    for id in ["ui-1", "ui-2", "ui-3"] {
        assert!(
            devices.contains(&format!("href=\"/ui/devices/{id}\"")),
            "{devices}"
        );
    }
    let (_, _, connected) = get("/ui/devices?connected=yes", Some(&cookie)).await;
    assert!(connected.contains("/ui/devices/ui-1") && !connected.contains("/ui/devices/ui-2"));

    let device = page("/ui/devices/ui-1").await;
    let (_, alerts) = api.get("/api/v1/alerts?device_id=ui-1").await;
    let parent = alerts["items"]
        .as_array()
        .and_then(|a| a.iter().find(|x| x["msdyn_parentalert"].is_null()))
        .and_then(|a| a["msdyn_iotalertid"].as_str())
        .expect("a parent alert")
        .to_owned();
    assert!(
        device.contains(&format!("data-alert=\"{parent}\"")),
        "{device}"
    );
    assert!(
        device.contains(&format!("class=\"child\" data-parent=\"{parent}\"")),
        "the child is folded under its parent: {device}"
    );
    assert!(
        device.contains("data-timeline=\"1\"") && device.contains("connected"),
        "the connection timeline shows ui-1 coming online: {device}"
    );
    let points: usize = device
        .split("data-points=\"")
        .nth(1)
        .and_then(|s| s.split('"').next())
        .and_then(|n| n.parse().ok())
        .expect("a readings chart");
    assert!(points > 0, "{device}");
    let alerts_page = page("/ui/alerts").await;
    assert!(
        alerts_page.contains(&format!("data-parent=\"{parent}\"")),
        "{alerts_page}"
    );

    let letters = page("/ui/dead-letters").await;
    assert!(
        letters.contains("ghost-9") && letters.contains("Replay"),
        "{letters}"
    );
    let id: i64 = letters
        .split("/ui/dead-letters/")
        .nth(1)
        .and_then(|s| s.split('/').next())
        .and_then(|n| n.parse().ok())
        .expect("a replay form");
    let replayed = http
        .post(url(&format!("/ui/dead-letters/{id}/replay")))
        .header("cookie", &cookie)
        .send()
        .await
        .expect("replay");
    assert_eq!(
        replayed.status().as_u16(),
        303,
        "replayed, back to the list"
    );
    // The same form posted from another site's page is refused.
    let forged = http
        .post(url(&format!("/ui/dead-letters/{id}/replay")))
        .header("cookie", &cookie)
        .header("origin", "https://evil.example")
        .send()
        .await
        .expect("forged replay");
    assert_eq!(forged.status().as_u16(), 403);
    // Still unknown, so dead-lettered again under a new id.
    let after = page("/ui/dead-letters").await;
    assert!(
        !after.contains(&format!("/ui/dead-letters/{id}/replay")),
        "{after}"
    );
    assert!(after.contains("ghost-9"), "{after}");
    gw.stop().await;
}

/// The dataverse sink through the whole gateway: readings become alerts, the outbox hands
/// them to the sink, and each is one PATCH of its own record with the lookups bound; a
/// Dataverse 400 becomes a sink dead letter naming Dataverse's error code and message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alerts_reach_dataverse_as_msdyn_iotalert_records_and_a_refusal_names_its_code() {
    let dv = FakeDataverse::start().await;
    let gw = Gateway::start(GatewayOptions {
        dataverse: Some(dv.url()),
        ..Default::default()
    })
    .await;
    let api = gw.api();
    let (status, reg) = api
        .post("/api/v1/devices", json!({"msdyn_deviceid": "dv-pump-1"}))
        .await;
    assert_eq!(status, 201, "{reg}");
    let device = reg["device"]["msdyn_iotdeviceid"]
        .as_str()
        .expect("device record id")
        .to_owned();
    let mut dev = Device::connect(gw.broker_port, "dv-pump-1").await;
    dev.publish_telemetry(json!({"message_id": "d-1", "temperature": 90}))
        .await;
    dev.publish_telemetry(json!({"message_id": "d-2", "temperature": 91}))
        .await;
    let writes = wait_for("two alerts written to Dataverse", || async {
        let w = dv.applied();
        (w.len() >= 2).then_some(w)
    })
    .await;
    let (_, alerts) = api.get("/api/v1/alerts?device_id=dv-pump-1").await;
    let alerts = alerts["items"].as_array().cloned().unwrap_or_default();
    let primary = alerts
        .iter()
        .find(|a| a["msdyn_parentalert"].is_null())
        .expect("a primary alert");
    let child = alerts
        .iter()
        .find(|a| !a["msdyn_parentalert"].is_null())
        .expect("a child alert");
    let id = |a: &Value| a["msdyn_iotalertid"].as_str().expect("id").to_owned();
    // Outbox order: the primary is written before the child that binds it (alone or in
    // one $batch change set).
    assert_eq!(
        (writes[0].set.as_str(), writes[0].key.clone()),
        ("msdyn_iotalerts", id(primary))
    );
    assert_eq!(
        (writes[1].set.as_str(), writes[1].key.clone()),
        ("msdyn_iotalerts", id(child))
    );
    let (p, c) = (&writes[0].body, &writes[1].body);
    assert_eq!(p["msdyn_alerttoken"], "local/dv-pump-1/d-1");
    assert_eq!(p["msdyn_alerttype"], 192_350_000);
    assert_eq!(p["msdyn_deviceid"], "dv-pump-1");
    assert_eq!(
        p["msdyn_Device@odata.bind"],
        format!("/msdyn_iotdevices({device})")
    );
    assert!(p.get("msdyn_ParentAlert@odata.bind").is_none(), "{p}");
    assert_eq!(
        c["msdyn_ParentAlert@odata.bind"],
        format!("/msdyn_iotalerts({})", id(primary))
    );
    assert_eq!(c["msdyn_parentalerttoken"], "local/dv-pump-1/d-1");
    let requests = dv.requests();
    let tokens = requests
        .iter()
        .filter(|r| r.uri == DATAVERSE_TOKEN_PATH)
        .count();
    assert_eq!(tokens, 1, "one token serves both writes");
    assert!(requests
        .iter()
        .filter(|r| r.uri != DATAVERSE_TOKEN_PATH)
        .all(|r| r.authorization == "Bearer token-1"));

    dv.refuse_with(Some((
        axum::http::StatusCode::BAD_REQUEST,
        r#"{"error":{"code":"0x80040217","message":"msdyn_iotdevice With Id = 1 Does Not Exist"}}"#,
    )));
    api.register("dv-pump-2").await;
    let mut dev2 = Device::connect(gw.broker_port, "dv-pump-2").await;
    dev2.publish_telemetry(json!({"message_id": "d-3", "temperature": 99}))
        .await;
    let letter = wait_for("the dataverse sink's dead letter", || async {
        let (_, body) = api.get("/api/v1/dead-letters?limit=100").await;
        body["items"]
            .as_array()
            .and_then(|items| items.iter().find(|l| l["source"] == "sink:d365").cloned())
    })
    .await;
    assert!(
        letter["reason"].as_str().is_some_and(|r| r.contains(
            "400 Bad Request: Dataverse error 0x80040217: msdyn_iotdevice With Id = 1 Does Not Exist"
        )),
        "{letter}"
    );
    drop((dev, dev2));
    gw.stop().await;
}
