//! `POST|OPTIONS /hooks/{instance}`: Event Grid pushing to an `azure_iot_hub` instance
//! through the gateway's HTTP API, outside the bearer token, into the registry.
//!
//! The hub itself is not needed for pushed events (its REST side is checked against the
//! official SDK in the provider's differential tests), so the instance points at a closed
//! port and only its Event Grid endpoint is exercised.
#![allow(
    clippy::disallowed_methods,
    reason = "test code: plain-HTTP clients against in-process servers and local emulators, no TLS roots or timeouts to configure"
)]
#![cfg(feature = "azure_iot_hub")]

use std::time::Duration;

use iotgw::app::{self, StartOptions};
use iotgw_config::azure_iot_hub::EventGridConfig;
use iotgw_config::{AzureIotHubConfig, Config, ProviderConfig, Secret, UnknownDevicePolicy};
use serde_json::{json, Value};

const SECRET: &str = "event-grid-secret-for-gateway-tests";
const TOKEN: &str = "api-token-for-gateway-tests-0123";

#[tokio::test]
async fn event_grid_pushes_reach_the_registry_through_the_hooks_route_without_the_bearer_token() {
    let dir = tempfile::tempdir().expect("tmp");
    let mut config = Config::default();
    config.store.path = dir.path().join("gw.db").display().to_string();
    config.api.token = Some(Secret::new(TOKEN));
    config.pipeline.unknown_devices = UnknownDevicePolicy::AutoRegister;
    config.providers.insert(
        "hub".into(),
        ProviderConfig::AzureIotHub(AzureIotHubConfig {
            connection_string: Some(Secret::new(
                "HostName=127.0.0.1:9;SharedAccessKeyName=iothubowner;SharedAccessKey=aW90Z3ctdGVzdC1wb2xpY3kta2V5LTAxMjM0NTY3ODk=",
            )),
            event_grid: Some(EventGridConfig {
                secret: Secret::new(SECRET),
                commit_timeout_secs: 10,
            }),
            ..AzureIotHubConfig::default()
        }),
    );
    config.routing.default = Some("hub".into());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let gw = app::start(
        config,
        StartOptions {
            api_listener: Some(listener),
            ..StartOptions::default()
        },
    )
    .await
    .expect("gateway starts");
    let base = format!("http://{}", gw.api_addr);
    let http = reqwest::Client::new();
    let hook = format!("{base}/hooks/hub?secret={SECRET}");
    let post = |url: String, body: Value| {
        let http = http.clone();
        async move {
            http.post(url)
                .header("content-type", "application/json")
                .body(body.to_string())
                .send()
                .await
                .expect("request")
        }
    };

    // The handshake, then telemetry (auto-registers d1), then a connection event.
    let validation = json!([{"id": "v1", "topic": "t", "subject": "", "eventType": "Microsoft.EventGrid.SubscriptionValidationEvent",
                             "eventTime": "2024-05-01T12:00:00Z", "data": {"validationCode": "code-123"}, "dataVersion": "1", "metadataVersion": "1"}]);
    let r = post(hook.clone(), validation).await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.json::<Value>().await.expect("json"),
        json!({"validationResponse": "code-123"})
    );
    let telemetry = json!([{"id": "t-1", "topic": "t", "subject": "devices/d1", "eventType": "Microsoft.Devices.DeviceTelemetry",
        "eventTime": "2024-05-01T12:00:00Z", "dataVersion": "", "metadataVersion": "1",
        "data": {"body": {"temperature": 21}, "properties": {}, "systemProperties": {"iothub-connection-device-id": "d1", "iothub-enqueuedtime": "2024-05-01T12:00:00Z"}}}]);
    // Until the provider's run loop holds the event sender, the endpoint answers 503.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let r = post(hook.clone(), telemetry.clone()).await;
        if r.status() == 200 {
            break;
        }
        assert_eq!(r.status(), 503, "only 'not running yet' may delay it");
        assert!(
            tokio::time::Instant::now() < deadline,
            "the hook never accepted telemetry"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let connected = json!([{"id": "c-1", "topic": "t", "subject": "devices/d1", "eventType": "Microsoft.Devices.DeviceConnected",
        "eventTime": "2024-05-01T12:00:01Z", "dataVersion": "1", "metadataVersion": "1",
        "data": {"deviceConnectionStateEventInfo": {"sequenceNumber": "000000000000000001D4132452F67CE200000002000000000000000000000001"}, "hubName": "h", "deviceId": "d1"}}]);
    assert_eq!(
        post(hook.clone(), connected).await.status(),
        200,
        "200 only once committed"
    );
    let device: Value = http
        .get(format!("{base}/api/v1/devices/d1"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .expect("request")
        .json()
        .await
        .expect("json");
    assert_eq!(device["msdyn_connectionstate"], json!(true), "{device}");

    // Wrong secret, unknown instance, and the API itself still guarded.
    assert_eq!(
        post(format!("{base}/hooks/hub?secret=nope"), json!([]))
            .await
            .status(),
        401
    );
    assert_eq!(
        post(format!("{base}/hooks/ghost?secret={SECRET}"), json!([]))
            .await
            .status(),
        404
    );
    let unguarded = http
        .get(format!("{base}/api/v1/devices/d1"))
        .send()
        .await
        .expect("request");
    assert_eq!(unguarded.status(), 401);
    gw.stop(Duration::from_secs(2)).await;
}
