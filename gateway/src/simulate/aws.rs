//! Simulated AWS IoT Core devices: MQTT 5 over mutual TLS to the account's data endpoint,
//! with the certificate and private key registration returned (AWS shows them once, so
//! the devices must be registered by this run: `--register`). Telemetry goes to the
//! first of the instance's telemetry topics, replies to its reply topic, reported
//! properties to the thing's classic shadow (`$aws/things/<thing>/shadow/update`); AWS
//! publishes the presence events and shadow documents the gateway reads.

use anyhow::Context;
use iotgw_config::AwsIotCoreConfig;
use serde_json::Value;

use super::mqtt::{Link, Protocol, Reported};
use super::tls::{self, TlsSpec};

/// The ALPN protocol AWS IoT Core wants for MQTT on port 443.
const ALPN_443: &[u8] = b"x-amzn-mqtt-ca";

/// The device `id`'s link from its registration credentials `creds` on an instance
/// configured as `cfg`. `ca_file` overrides the CA the endpoint is checked against (else
/// the instance's `ca_cert_path`, else the system's roots, which hold Amazon's).
pub fn link(
    id: &str,
    creds: Option<&Value>,
    cfg: &AwsIotCoreConfig,
    ca_file: Option<&str>,
) -> anyhow::Result<Link> {
    let c = creds.filter(|c| c.is_object()).with_context(|| {
        format!(
            "{id} has no certificate: AWS IoT Core shows a device's certificate and key once, at registration; \
             run with --register (a device registered before keeps its certificate elsewhere: unregister it \
             or pick another --prefix)"
        )
    })?;
    let text = |k: &str| {
        c[k].as_str()
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .with_context(|| format!("registration of {id} returned no {k}: {c}"))
    };
    let cert = text("certificate_pem")?;
    let key = text("private_key")?;
    let thing = text("thing_name").unwrap_or_else(|_| id.to_owned());
    let client_id = text("client_id").unwrap_or_else(|_| thing.clone());
    let host = text("endpoint")
        .ok()
        .or_else(|| cfg.mqtt_host.clone())
        .or_else(|| cfg.data_endpoint.clone())
        .with_context(|| {
            format!(
                "no data endpoint for {id}: registration named none; set data_endpoint (aws iot describe-endpoint --endpoint-type iot:Data-ATS) on the instance"
            )
        })?;
    let port = c["port"]
        .as_u64()
        .and_then(|p| u16::try_from(p).ok())
        .unwrap_or(cfg.mqtt_port);
    let topics = &c["topics"];
    let topic = |k: &str, fallback: &str| {
        let t = &topics[k];
        t.as_str()
            .or_else(|| t[0].as_str())
            .map(str::to_owned)
            .unwrap_or_else(|| fallback.replace("{device_id}", &thing))
    };
    let first_telemetry = cfg
        .telemetry_topics
        .first()
        .map_or("dt/iotgw/{device_id}/telemetry", String::as_str);
    let ca = ca_file.or(cfg.ca_cert_path.as_deref());
    let transport = tls::transport(&TlsSpec {
        ca_file: ca,
        client: Some((&cert, &key)),
        alpn: if port == 443 {
            vec![ALPN_443.to_vec()]
        } else {
            Vec::new()
        },
    })
    .with_context(|| format!("the TLS identity of {id}"))?;
    Ok(Link {
        host,
        port,
        client_id,
        credentials: None,
        transport: Some(transport),
        protocol: Protocol::V5,
        telemetry: topic("telemetry", first_telemetry),
        status: None,
        command: topic("commands", &cfg.command_topic),
        reply: topic("replies", &cfg.reply_topic),
        reported: Some(Reported::AwsShadow(format!(
            "$aws/things/{thing}/shadow/update"
        ))),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn without_the_registration_certificate_the_error_says_to_register() {
        let e =
            link("sim-001", None, &AwsIotCoreConfig::default(), None).expect_err("no certificate");
        assert!(format!("{e:#}").contains("--register"), "{e:#}");
        let e = link(
            "sim-001",
            Some(&json!({"thing_name": "sim-001"})),
            &AwsIotCoreConfig::default(),
            None,
        )
        .expect_err("no certificate");
        assert!(format!("{e:#}").contains("certificate_pem"), "{e:#}");
    }
}
