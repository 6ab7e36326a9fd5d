//! The rustls client configuration of the gateway's MQTT connection to AWS IoT Core: its
//! own certificate and key (mutual TLS, required), the trusted CAs ([`crate::tls`]), ALPN
//! `x-amzn-mqtt-ca` on port 443.

use std::sync::Arc;

use iotgw_config::AwsIotCoreConfig;
use rustls::ClientConfig;

use crate::ProviderError;

/// The ALPN protocol AWS IoT Core requires for MQTT with client certificates on port 443.
pub const AWS_MQTT_ALPN: &[u8] = b"x-amzn-mqtt-ca";

/// The TLS configuration for MQTT, or `None` when no client certificate is configured
/// (then the provider does not connect). Errors name the config key of the bad file.
pub fn client_config(
    instance: &str,
    c: &AwsIotCoreConfig,
) -> Result<Option<Arc<ClientConfig>>, ProviderError> {
    let (Some(cert_path), Some(key_path)) = (&c.client_cert_path, &c.client_key_path) else {
        return Ok(None);
    };
    let mut config = crate::tls::client_config(
        instance,
        &crate::tls::TlsFiles {
            cert: Some(("client_cert_path", cert_path)),
            key: Some(("client_key_path", key_path)),
            ca: ("ca_cert_path", c.ca_cert_path.as_deref()),
        },
    )?;
    if c.mqtt_port == 443 {
        config.alpn_protocols = vec![AWS_MQTT_ALPN.to_vec()];
    }
    Ok(Some(Arc::new(config)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &tempfile::TempDir, name: &str, text: &str) -> String {
        let p = dir.path().join(name);
        std::fs::write(&p, text).expect("temp file written");
        p.display().to_string()
    }

    fn with_files(port: u16) -> (tempfile::TempDir, AwsIotCoreConfig) {
        let dir = tempfile::tempdir().expect("temp dir");
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = rcgen::CertificateParams::new(vec!["iotgw".into()])
            .expect("params")
            .self_signed(&key)
            .expect("self-signed");
        let config = AwsIotCoreConfig {
            client_cert_path: Some(write(&dir, "gw.crt", &cert.pem())),
            client_key_path: Some(write(&dir, "gw.key", &key.serialize_pem())),
            ca_cert_path: Some(write(&dir, "ca.crt", &cert.pem())),
            mqtt_port: port,
            ..AwsIotCoreConfig::default()
        };
        (dir, config)
    }

    #[test]
    fn alpn_is_sent_only_on_port_443() {
        let (_dir, c) = with_files(443);
        let tls = client_config("aws", &c)
            .expect("valid files")
            .expect("configured");
        assert_eq!(tls.alpn_protocols, vec![AWS_MQTT_ALPN.to_vec()]);
        let (_dir, c) = with_files(8883);
        let tls = client_config("aws", &c)
            .expect("valid files")
            .expect("configured");
        assert!(tls.alpn_protocols.is_empty());
    }

    #[test]
    fn unreadable_or_mismatched_files_are_refused_naming_the_key() {
        let (dir, mut c) = with_files(8883);
        c.client_cert_path = Some(dir.path().join("missing.crt").display().to_string());
        match client_config("aws", &c) {
            Err(ProviderError::InvalidInput { field, .. }) => assert_eq!(field, "client_cert_path"),
            other => panic!("{other:?}"),
        }
        let (dir, mut c) = with_files(8883);
        let other_key = rcgen::KeyPair::generate().expect("key");
        c.client_key_path = Some(write(&dir, "other.key", &other_key.serialize_pem()));
        match client_config("aws", &c) {
            Err(ProviderError::InvalidInput { field, message, .. }) => {
                assert_eq!(field, "client_key_path");
                assert!(message.contains("does not fit"), "{message}");
            }
            other => panic!("{other:?}"),
        }
        let (dir, mut c) = with_files(8883);
        c.ca_cert_path = Some(write(&dir, "empty.crt", ""));
        match client_config("aws", &c) {
            Err(ProviderError::InvalidInput { field, .. }) => assert_eq!(field, "ca_cert_path"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn without_a_client_certificate_there_is_no_tls_configuration() {
        assert!(client_config("aws", &AwsIotCoreConfig::default())
            .expect("nothing to read")
            .is_none());
    }
}
