//! The rustls client configuration of a simulated MQTT device over TLS: the CAs it trusts
//! for the broker (a PEM file, else the system's roots) and, for mutual TLS (AWS IoT
//! Core), the certificate and key registration returned. ring, as everywhere in iotgw.

use std::sync::Arc;

use anyhow::Context;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore};

/// What one device's TLS needs.
#[derive(Debug, Default)]
pub struct TlsSpec<'a> {
    /// PEM file of the CAs signing the broker's certificate; `None`: the system's roots.
    pub ca_file: Option<&'a str>,
    /// The device's certificate chain and private key, both PEM text (mutual TLS).
    pub client: Option<(&'a str, &'a str)>,
    /// ALPN protocols to offer (AWS IoT Core on port 443 wants `x-amzn-mqtt-ca`).
    pub alpn: Vec<Vec<u8>>,
}

/// The rumqttc transport for `spec`.
pub fn transport(spec: &TlsSpec<'_>) -> anyhow::Result<rumqttc::Transport> {
    Ok(rumqttc::Transport::tls_with_config(
        rumqttc::TlsConfiguration::Rustls(client_config(spec)?),
    ))
}

/// The rustls configuration for `spec`.
pub fn client_config(spec: &TlsSpec<'_>) -> anyhow::Result<Arc<ClientConfig>> {
    let mut roots = RootCertStore::empty();
    match spec.ca_file {
        Some(path) => {
            let cas = CertificateDer::pem_file_iter(path)
                .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                .with_context(|| format!("reading the CA certificates of {path}"))?;
            let (added, _) = roots.add_parsable_certificates(cas);
            anyhow::ensure!(
                added > 0,
                "{path} holds no usable CA certificate (-----BEGIN CERTIFICATE-----)"
            );
        }
        None => {
            let native = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(native.certs);
            anyhow::ensure!(
                !roots.is_empty(),
                "the system trust store has no CA certificates: install ca-certificates or give --ca-file"
            );
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS setup")?
        .with_root_certificates(roots);
    let mut config = match spec.client {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            let chain = CertificateDer::pem_slice_iter(cert.as_bytes())
                .collect::<Result<Vec<_>, _>>()
                .context("the device certificate is not PEM")?;
            anyhow::ensure!(
                !chain.is_empty(),
                "the device certificate holds no -----BEGIN CERTIFICATE-----"
            );
            let key = PrivateKeyDer::from_pem_slice(key.as_bytes())
                .context("the device's private key is not a PEM key (PKCS#8, PKCS#1 or SEC1)")?;
            builder
                .with_client_auth_cert(chain, key)
                .context("the device certificate and key do not make a TLS identity")?
        }
    };
    config.alpn_protocols.clone_from(&spec.alpn);
    Ok(Arc::new(config))
}
