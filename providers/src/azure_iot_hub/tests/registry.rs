//! The SDK and iotgw against the same fake: SAS tokens and REST requests compared.

use std::collections::BTreeMap;
use std::sync::Arc;

use base64::Engine as _;
use iotgw_config::{AzureIotHubConfig, Secret};
use iotgw_ids::DeviceId;
use serde_json::{json, Value};

use super::fake_hub::{sas_fields, FakeHub, Recorded};
use super::pki::pki;
use super::sdk::Sdk;
use crate::azure_iot_hub::rest::HubClient;
use crate::azure_iot_hub::rest::{
    Authentication, Capabilities, CloudToDeviceMethod, Device, ExportImportDevice, Twin,
    TwinProperties,
};
use crate::azure_iot_hub::{sas, AzureIotHubProvider};
use crate::{CommandRequest, DeviceSpec, Provider};

/// The provider settings of a test against `fake`.
pub fn config(fake: &FakeHub) -> AzureIotHubConfig {
    AzureIotHubConfig {
        connection_string: Some(Secret::new(fake.connection_string())),
        ca_file: Some(pki().ca_file.display().to_string()),
        request_timeout_ms: 10_000,
        ..AzureIotHubConfig::default()
    }
}

/// Asserts two recorded requests are equivalent: method, raw path, query, `Accept`,
/// `Content-Type`, `If-Match`, the `Authorization` token's shape (field order, `sr`, `skn`;
/// both signatures verified by the fake), and the JSON bodies.
pub fn assert_equivalent(what: &str, sdk: &Recorded, ours: &Recorded) {
    let ctx = format!(
        "{what}:\n  sdk:   {} {}?{} {:?}\n  iotgw: {} {}?{} {:?}",
        sdk.method,
        sdk.path,
        sdk.query,
        sdk.headers,
        ours.method,
        ours.path,
        ours.query,
        ours.headers
    );
    assert_eq!(sdk.method, ours.method, "method differs — {ctx}");
    assert_eq!(sdk.path, ours.path, "path differs — {ctx}");
    assert_eq!(sdk.query, ours.query, "query differs — {ctx}");
    for h in ["accept", "content-type", "if-match"] {
        assert_eq!(
            sdk.headers.get(h),
            ours.headers.get(h),
            "header {h} differs — {ctx}"
        );
    }
    assert!(
        sdk.authorized && ours.authorized,
        "a SAS token did not verify — {ctx}"
    );
    let shape = |r: &Recorded| {
        let raw = r.headers.get("authorization").cloned().unwrap_or_default();
        let rest = raw
            .strip_prefix("SharedAccessSignature ")
            .unwrap_or_default()
            .to_owned();
        let names: Vec<String> = rest
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, _)| k.to_owned())
            .collect();
        let f = sas_fields(&raw).unwrap_or_default();
        (names, f.get("sr").cloned(), f.get("skn").cloned())
    };
    assert_eq!(
        shape(sdk),
        shape(ours),
        "Authorization differs in shape — {ctx}"
    );
    assert_eq!(sdk.json(), ours.json(), "body differs — {ctx}");
}

/// Asserts two request sequences are equivalent, request by request.
pub fn assert_all_equivalent(what: &str, sdk: &[Recorded], ours: &[Recorded]) {
    let line = |r: &Recorded| format!("{} {}", r.method, r.path);
    assert_eq!(
        sdk.iter().map(line).collect::<Vec<_>>(),
        ours.iter().map(line).collect::<Vec<_>>(),
        "{what}: the SDK and iotgw sent different request sequences"
    );
    for (i, (a, b)) in sdk.iter().zip(ours).enumerate() {
        assert_equivalent(&format!("{what}, request {i}"), a, b);
    }
}

fn key(seed: u8) -> String {
    base64::engine::general_purpose::STANDARD.encode([seed; 32])
}

#[tokio::test]
async fn sas_tokens_equal_the_python_sdk_tokens_for_the_same_key_resource_and_expiry() {
    let keys = [
        base64::engine::general_purpose::STANDARD.encode((0u8..32).collect::<Vec<_>>()),
        base64::engine::general_purpose::STANDARD.encode((100u8..116).collect::<Vec<_>>()),
        base64::engine::general_purpose::STANDARD
            .encode((0u8..64).map(|b| b.wrapping_mul(37)).collect::<Vec<_>>()),
    ];
    let resources = [
        "myhub.azure-devices.net",
        "127.0.0.1:8443",
        "MyHub.Azure-Devices.NET/devices/pump-1",
        "myhub.azure-devices.net/devices/a b+c",
    ];
    let mut vectors = Vec::new();
    for (i, key) in keys.iter().enumerate() {
        for (j, resource) in resources.iter().enumerate() {
            for (name, expiry) in [
                (Some("iothubowner"), 1_700_000_000u64 + (i * 7 + j) as u64),
                (None, 4_102_444_800),
            ] {
                vectors.push((
                    resource.to_string(),
                    key.clone(),
                    name.map(str::to_owned),
                    expiry,
                ));
            }
        }
    }
    // Our own tokens always hold; the SDK's are the reference when it is installed.
    let ours: Vec<String> = vectors
        .iter()
        .map(|(r, k, n, e)| sas::token(r, k, n.as_deref(), *e).expect("valid key"))
        .collect();
    let Some(sdk) = Sdk::find("sas_tokens_equal_the_python_sdk_tokens") else {
        return;
    };
    let ops: Vec<Value> = vectors
        .iter()
        .map(|(r, k, n, e)| json!({"op": "sas", "uri": r, "key": k, "key_name": n, "expiry": e}))
        .collect();
    let theirs = sdk.run(None, None, &ops).await;
    for ((v, ours), theirs) in vectors.iter().zip(&ours).zip(theirs) {
        let theirs = theirs.expect("the SDK built a token");
        assert_eq!(
            Value::String(ours.clone()),
            theirs,
            "token differs for {v:?}"
        );
    }
    // At least one signature needed percent-encoding (`+`, `/` or `=`), so the encoding
    // rules were exercised, not just the happy path.
    assert!(ours.iter().any(|t| t.contains("%2B") || t.contains("%3D")));
}

#[tokio::test]
async fn registry_requests_match_the_python_sdk_request_by_request() {
    let fake = FakeHub::start().await;
    let cfg = config(&fake);
    let cs = iotgw_config::azure_iot_hub::ServiceConnectionString::parse(&fake.connection_string())
        .expect("valid");
    let hub = HubClient::new("hub", &cs, &cfg).expect("client");
    // Device ids with the punctuation IoT Hub allows, to compare path encoding.
    let id = "pump-1:line(a)=b@c$'d.e_f*g?h!i,j%k";
    let (pk, sk) = (key(1), key(2));
    let tags = json!({"site": "north", "line": "2"});
    let desired = json!({"interval_s": 30, "mode": {"eco": true}});
    fake.set_online(id);
    let created = hub
        .create_device(&Device {
            device_id: id.into(),
            status: Some("enabled".into()),
            authentication: Some(Authentication::sas(&pk, &sk)),
            capabilities: Some(Capabilities { iot_edge: false }),
            ..Device::default()
        })
        .await
        .expect("created");
    assert_eq!(
        created
            .authentication
            .as_ref()
            .and_then(Authentication::primary_key),
        Some(pk.as_str())
    );
    hub.get_device(id).await.expect("got");
    hub.update_twin(
        id,
        &Twin {
            tags: tags.as_object().cloned(),
            properties: Some(TwinProperties {
                desired: desired.as_object().cloned(),
                reported: None,
            }),
            ..Twin::default()
        },
    )
    .await
    .expect("twin patched");
    let answer = hub
        .invoke_method(
            id,
            &CloudToDeviceMethod {
                method_name: "reboot".into(),
                payload: json!({"delay_s": 5}),
                response_timeout_in_seconds: 30,
                connect_timeout_in_seconds: 10,
            },
        )
        .await
        .expect("method answered");
    assert_eq!(answer.status, 200);
    hub.get_twin(id).await.expect("twin");
    hub.update_device(
        &Device {
            device_id: id.into(),
            status: Some("disabled".into()),
            authentication: Some(Authentication::sas(&pk, &sk)),
            capabilities: Some(Capabilities { iot_edge: false }),
            ..Device::default()
        },
        "*",
    )
    .await
    .expect("updated");
    hub.delete_device(id).await.expect("deleted");
    let bulk = hub
        .bulk(
            &[("bulk-1", key(3), key(4)), ("bulk-2", key(5), key(6))].map(|(id, p, s)| {
                ExportImportDevice {
                    id: id.into(),
                    import_mode: "create".into(),
                    status: Some("enabled".into()),
                    authentication: Some(Authentication::sas(&p, &s)),
                }
            }),
        )
        .await
        .expect("bulk");
    assert!(bulk.is_successful);
    hub.service_statistics().await.expect("statistics");
    let ours = fake.take();
    assert!(
        ours.iter().all(|r| r.authorized),
        "iotgw's SAS tokens verify with the policy key"
    );

    let Some(sdk) = Sdk::find("registry_requests_match_the_python_sdk") else {
        return;
    };
    fake.reset();
    let results = sdk
        .run(Some(&fake.connection_string()), None, &[
            json!({"op": "create_device_with_sas", "device_id": id, "primary_key": pk, "secondary_key": sk}),
            json!({"op": "get_device", "device_id": id}),
            json!({"op": "update_twin", "device_id": id, "twin": {"tags": tags, "properties": {"desired": desired}}}),
            json!({"op": "invoke_device_method", "device_id": id, "method_name": "reboot", "payload": {"delay_s": 5}, "response_timeout": 30, "connect_timeout": 10}),
            json!({"op": "get_twin", "device_id": id}),
            json!({"op": "update_device_with_sas", "device_id": id, "etag": "*", "primary_key": pk, "secondary_key": sk, "status": "disabled"}),
            json!({"op": "delete_device", "device_id": id}),
            json!({"op": "bulk_create", "devices": [{"id": "bulk-1", "primary_key": key(3), "secondary_key": key(4)}, {"id": "bulk-2", "primary_key": key(5), "secondary_key": key(6)}]}),
            json!({"op": "get_service_statistics"}),
        ])
        .await;
    for (i, r) in results.iter().enumerate() {
        assert!(r.is_ok(), "SDK op {i} failed against the fake: {r:?}");
    }
    // The SDK parsed the fake's answers with its own models: the shapes are as documented.
    assert_eq!(results[3].as_ref().expect("method")["status"], json!(200));
    assert_eq!(
        results[7].as_ref().expect("bulk")["is_successful"],
        json!(true)
    );
    let theirs = fake.take();
    assert_all_equivalent("registry operations", &theirs, &ours);
}

#[tokio::test]
async fn provider_operations_send_what_the_sdk_sends_for_the_same_operations() {
    let fake = FakeHub::start().await;
    let mut cfg = config(&fake);
    cfg.direct_method.connect_timeout_secs = 5;
    let provider = Arc::new(
        AzureIotHubProvider::new(&crate::InstanceName::from("hub"), &cfg).expect("provider"),
    );
    let id = DeviceId::parse("pump-7").expect("id");
    let tags = BTreeMap::from([("site".to_owned(), "north".to_owned())]);
    let settings = json!({"interval_s": 15});
    let reg = provider
        .register(&DeviceSpec {
            device_id: id.clone(),
            name: "Pump 7".into(),
            category: None,
            tags: tags.clone(),
            settings: Some(settings.clone()),
        })
        .await
        .expect("registered");
    let cs = reg
        .credentials
        .as_ref()
        .and_then(|c| c["connection_string"].as_str())
        .expect("a connection string")
        .to_owned();
    assert!(
        cs.starts_with(&format!(
            "HostName={};DeviceId=pump-7;SharedAccessKey=",
            fake.host()
        )),
        "{cs}"
    );
    fake.set_online("pump-7");
    let cmd = CommandRequest {
        id: uuid::Uuid::new_v4(),
        device_id: id.clone(),
        name: "cool_down".into(),
        message: r#"{"CommandName":"cool_down","Parameters":{"target_celsius":60}}"#.into(),
        correlation_id: "corr-1".into(),
    };
    provider.send_command(&cmd).await.expect("delivered");
    let state = provider.device_state(&id).await.expect("state");
    assert_eq!(state.connected, Some(true));
    provider.unregister(&id).await.expect("unregistered");
    let ours = fake.take();
    let put = ours[0].json();
    let (pk, sk) = (
        put.pointer("/authentication/symmetricKey/primaryKey")
            .and_then(Value::as_str)
            .expect("generated primary key")
            .to_owned(),
        put.pointer("/authentication/symmetricKey/secondaryKey")
            .and_then(Value::as_str)
            .expect("generated secondary key")
            .to_owned(),
    );
    for k in [&pk, &sk] {
        let raw = base64::engine::general_purpose::STANDARD
            .decode(k)
            .expect("base64 key");
        assert_eq!(raw.len(), 32, "keys are 256-bit like the portal's");
    }
    assert!(
        cs.ends_with(&pk),
        "the connection string carries the primary key"
    );

    let Some(sdk) = Sdk::find("provider_operations_send_what_the_sdk_sends") else {
        return;
    };
    fake.reset();
    let results = sdk
        .run(Some(&fake.connection_string()), None, &[
            json!({"op": "create_device_with_sas", "device_id": "pump-7", "primary_key": pk, "secondary_key": sk}),
            json!({"op": "update_twin", "device_id": "pump-7", "twin": {"tags": {"site": "north"}, "properties": {"desired": settings}}}),
            json!({"op": "invoke_device_method", "device_id": "pump-7", "method_name": "cool_down", "payload": {"CommandName": "cool_down", "Parameters": {"target_celsius": 60}}, "response_timeout": 30, "connect_timeout": 5}),
            json!({"op": "get_twin", "device_id": "pump-7"}),
            json!({"op": "delete_device", "device_id": "pump-7"}),
        ])
        .await;
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    assert_all_equivalent("register, command, state, unregister", &fake.take(), &ours);
}

/// Update Device Data: the provider's twin update is `PATCH /twins/{id}` with the settings
/// as desired properties, request for request what the SDK's `update_twin` sends for a
/// twin of only those desired properties.
#[tokio::test]
async fn update_settings_patches_the_twins_desired_properties_as_the_sdk_does() {
    let fake = FakeHub::start().await;
    let provider = AzureIotHubProvider::new(&crate::InstanceName::from("hub"), &config(&fake))
        .expect("provider");
    let id = DeviceId::parse("boiler-2").expect("id");
    provider
        .register(&DeviceSpec {
            device_id: id.clone(),
            name: "Boiler 2".into(),
            category: None,
            tags: BTreeMap::new(),
            settings: None,
        })
        .await
        .expect("registered");
    let _ = fake.take();
    let settings = json!({"setpoint": 21.5, "schedule": {"on": "06:00"}});
    provider
        .update_settings(&id, &settings)
        .await
        .expect("settings sent");
    let ours = fake.take();
    assert_eq!(ours.len(), 1, "one request: {ours:?}");
    let patch = &ours[0];
    assert_eq!(
        (patch.method.as_str(), patch.path.as_str()),
        ("PATCH", "/twins/boiler-2")
    );
    assert!(
        patch.query.contains("api-version=2021-04-12"),
        "{}",
        patch.query
    );
    assert_eq!(patch.json(), json!({"properties": {"desired": settings}}));
    let refused = provider
        .update_settings(&id, &json!([1, 2]))
        .await
        .expect_err("not an object");
    assert!(
        refused.to_string().contains("msdyn_devicesettings"),
        "{refused}"
    );

    let Some(sdk) = Sdk::find("update_settings_patches_the_twins_desired_properties") else {
        return;
    };
    let _ = fake.take();
    let results = sdk
        .run(Some(&fake.connection_string()), None, &[json!(
            {"op": "update_twin", "device_id": "boiler-2", "twin": {"properties": {"desired": settings}}}
        )])
        .await;
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    assert_all_equivalent("update settings", &fake.take(), &ours);
}
