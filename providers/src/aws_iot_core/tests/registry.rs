//! Registration against moto: what is created, idempotency, conflicts, unregistration,
//! rollback of a registration that fails part-way (checked by listing moto directly).

use std::collections::BTreeMap;

use iotgw_ids::DeviceId;

use super::proxy::{Fault, FaultProxy};
use super::{env_or_skip, unique, Env};
use crate::aws_iot_core::AwsIotCoreProvider;
use crate::{DeviceSpec, Provider, ProviderError};

fn spec(id: &str) -> DeviceSpec {
    DeviceSpec {
        device_id: DeviceId::parse(id).expect("valid id"),
        name: format!("Device {id}"),
        category: Some("chiller".into()),
        tags: BTreeMap::from([
            ("site".to_owned(), "plant-7".to_owned()),
            ("floor".to_owned(), "2".to_owned()),
        ]),
        settings: Some(serde_json::json!({"setpoint": 4.5, "mode": "eco"})),
    }
}

/// Every thing name in moto.
async fn things(iot: &aws_sdk_iot::Client) -> Vec<String> {
    let mut out = Vec::new();
    let mut token = None;
    loop {
        let page = iot
            .list_things()
            .set_next_token(token)
            .send()
            .await
            .expect("ListThings");
        out.extend(
            page.things()
                .iter()
                .filter_map(|t| t.thing_name())
                .map(str::to_owned),
        );
        token = page
            .next_token()
            .filter(|t| !t.is_empty())
            .map(str::to_owned);
        if token.is_none() {
            return out;
        }
    }
}

/// Every certificate id in moto.
async fn certificates(iot: &aws_sdk_iot::Client) -> Vec<String> {
    iot.list_certificates()
        .send()
        .await
        .expect("ListCertificates")
        .certificates()
        .iter()
        .filter_map(|c| c.certificate_id())
        .map(str::to_owned)
        .collect()
}

/// Every policy name in moto.
async fn policies(iot: &aws_sdk_iot::Client) -> Vec<String> {
    iot.list_policies()
        .send()
        .await
        .expect("ListPolicies")
        .policies()
        .iter()
        .filter_map(|p| p.policy_name())
        .map(str::to_owned)
        .collect()
}

async fn provider_via(env: &Env, proxy: &FaultProxy) -> AwsIotCoreProvider {
    let mut c = env.config(&unique("gw"));
    c.endpoint_url = Some(proxy.url.clone());
    AwsIotCoreProvider::new(&crate::InstanceName::from("aws-test"), &c)
        .await
        .expect("valid test config")
}

#[tokio::test]
async fn registration_creates_thing_certificate_policy_and_desired_shadow_and_unregistration_removes_them(
) {
    let env = env_or_skip!();
    let p = env.provider(&unique("gw")).await;
    let iot = env.inspector().await;
    let id = unique("reg");
    let reg = p.register(&spec(&id)).await.expect("registered");

    let creds = reg.credentials.expect("credentials handed out once");
    let pem = creds["certificate_pem"].as_str().expect("certificate PEM");
    assert!(pem.starts_with("-----BEGIN CERTIFICATE-----"), "{pem}");
    assert!(creds["private_key"]
        .as_str()
        .is_some_and(|k| k.contains("PRIVATE KEY")));
    assert_eq!(creds["client_id"], id.as_str());
    assert_eq!(creds["endpoint"], env.host.as_str());
    assert_eq!(creds["topics"]["commands"], format!("cmd/iotgw/{id}/req"));
    let cert_id = creds["certificate_id"]
        .as_str()
        .expect("certificate id")
        .to_owned();
    let cert_arn = creds["certificate_arn"]
        .as_str()
        .expect("certificate ARN")
        .to_owned();
    assert!(reg.message.is_some_and(|m| m.contains(&cert_id)));

    let thing = iot
        .describe_thing()
        .thing_name(&id)
        .send()
        .await
        .expect("thing exists");
    assert_eq!(
        thing.thing_type_name(),
        Some("chiller"),
        "thing type from the category"
    );
    let attrs = thing.attributes().expect("attributes");
    assert_eq!(attrs.get("site").map(String::as_str), Some("plant-7"));
    assert_eq!(attrs.get("floor").map(String::as_str), Some("2"));
    let principals = iot
        .list_thing_principals()
        .thing_name(&id)
        .send()
        .await
        .expect("principals");
    assert_eq!(principals.principals(), std::slice::from_ref(&cert_arn));
    let cert = iot
        .describe_certificate()
        .certificate_id(&cert_id)
        .send()
        .await
        .expect("certificate exists");
    assert_eq!(
        cert.certificate_description().and_then(|d| d.status()),
        Some(&aws_sdk_iot::types::CertificateStatus::Active)
    );
    let attached = iot
        .list_attached_policies()
        .target(&cert_arn)
        .send()
        .await
        .expect("attached policies");
    let policy_name = format!("iotgw-device-{id}");
    assert_eq!(
        attached
            .policies()
            .iter()
            .filter_map(|p| p.policy_name())
            .collect::<Vec<_>>(),
        [policy_name.as_str()]
    );
    let doc = iot
        .get_policy()
        .policy_name(&policy_name)
        .send()
        .await
        .expect("policy")
        .policy_document()
        .expect("document")
        .to_owned();
    assert!(doc.contains(&format!(":client/{id}")), "{doc}");
    assert!(
        doc.contains(&format!("topic/dt/iotgw/{id}/telemetry")),
        "{doc}"
    );
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
        shadow["state"]["desired"],
        serde_json::json!({"setpoint": 4.5, "mode": "eco"}),
        "device settings are the shadow's desired state"
    );

    p.unregister(&spec(&id).device_id)
        .await
        .expect("unregistered");
    assert!(!things(&iot).await.contains(&id), "thing deleted");
    assert!(
        !certificates(&iot).await.contains(&cert_id),
        "certificate deleted"
    );
    assert!(
        !policies(&iot).await.contains(&policy_name),
        "policy deleted"
    );
    match p.unregister(&spec(&id).device_id).await {
        Err(ProviderError::NotFound { .. }) => {}
        other => panic!("a second unregistration is NotFound, got {other:?}"),
    }
}

#[tokio::test]
async fn registering_an_identical_device_again_creates_nothing_and_a_different_one_conflicts() {
    let env = env_or_skip!();
    let p = env.provider(&unique("gw")).await;
    let iot = env.inspector().await;
    let id = unique("idem");
    let first = p.register(&spec(&id)).await.expect("registered");
    let cert_id = first.credentials.expect("credentials")["certificate_id"]
        .as_str()
        .expect("id")
        .to_owned();

    let again = p.register(&spec(&id)).await.expect("idempotent");
    assert!(
        again.credentials.is_none(),
        "the key is never handed out twice"
    );
    assert!(
        again
            .message
            .as_deref()
            .is_some_and(|m| m.starts_with("already registered") && m.contains(&cert_id)),
        "{:?}",
        again.message
    );
    let principals = iot
        .list_thing_principals()
        .thing_name(&id)
        .send()
        .await
        .expect("principals");
    assert_eq!(principals.principals().len(), 1, "no second certificate");

    let mut other = spec(&id);
    other.tags.insert("site".into(), "plant-8".into());
    match p.register(&other).await {
        Err(ProviderError::Conflict { message, .. }) => {
            assert!(message.contains("unregister"), "{message}")
        }
        other => panic!("different attributes must conflict, got {other:?}"),
    }
    p.unregister(&spec(&id).device_id)
        .await
        .expect("unregistered");
}

#[tokio::test]
async fn tags_aws_cannot_hold_are_refused_before_anything_is_created() {
    let env = env_or_skip!();
    let p = env.provider(&unique("gw")).await;
    let iot = env.inspector().await;
    let id = unique("bad");
    let mut s = spec(&id);
    s.tags.insert("note".into(), "has spaces".into());
    match p.register(&s).await {
        Err(ProviderError::InvalidInput { field, message, .. }) => {
            assert_eq!(field, "msdyn_tags");
            assert!(message.contains("note"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    assert!(!things(&iot).await.contains(&id));
}

/// Registers through a proxy failing `fault`; checks the error and that nothing is left.
async fn assert_rolled_back(env: &Env, fault: Fault, class: &str) {
    let proxy = FaultProxy::start(&env.moto_url, fault).await;
    let p = provider_via(env, &proxy).await;
    let iot = env.inspector().await;
    let id = unique("rb");
    let err = p
        .register(&spec(&id))
        .await
        .expect_err("the injected fault fails it");
    assert_eq!(
        proxy.faults_injected(),
        1,
        "the fault was hit once (no SDK retry)"
    );
    assert_eq!(err.class(), class, "{err}");
    let text = err.to_string();
    assert!(text.contains("rolled back"), "{text}");
    let created = proxy.certificates_created();
    assert_eq!(created.len(), 1, "one certificate was created: {created:?}");

    assert!(!things(&iot).await.contains(&id), "no orphan thing: {text}");
    assert!(
        !certificates(&iot).await.contains(&created[0]),
        "no orphan certificate: {text}"
    );
    match iot
        .describe_certificate()
        .certificate_id(&created[0])
        .send()
        .await
    {
        Err(e) => assert_eq!(
            e.as_service_error()
                .map(|s| s.is_resource_not_found_exception()),
            Some(true),
            "{e:?}"
        ),
        Ok(c) => panic!("certificate left behind: {c:?}"),
    }
    assert!(
        !policies(&iot).await.contains(&format!("iotgw-device-{id}")),
        "no orphan policy: {text}"
    );
}

#[tokio::test]
async fn a_refused_attach_policy_mid_registration_rolls_back_certificate_policy_and_thing() {
    let env = env_or_skip!();
    let fault = Fault {
        method: "PUT",
        path_starts: "/target-policies/",
        path_ends: "",
        status: 403,
        code: "UnauthorizedException",
        retry_after: None,
    };
    assert_rolled_back(&env, fault, "unauthorized").await;
}

#[tokio::test]
async fn a_failed_attach_thing_principal_rolls_back_the_attached_policy_too() {
    let env = env_or_skip!();
    let fault = Fault {
        method: "PUT",
        path_starts: "/things/",
        path_ends: "/principals",
        status: 409,
        code: "ConflictingResourceUpdateException",
        retry_after: None,
    };
    assert_rolled_back(&env, fault, "conflict").await;
}
