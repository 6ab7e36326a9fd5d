//! The rustls client configuration of an MQTT connection to a broker over TLS: the
//! trusted CAs (a file, or the system's roots) and, for mutual TLS, the client's
//! certificate and key. Used by the `mqtt` provider (`[providers.NAME.tls]`) and by
//! `aws_iot_core` (which requires a client certificate).
//!
//! rustls runs on ring, chosen explicitly here (not through a process-wide default), the
//! same crypto provider as the AWS SDK's HTTPS client: one TLS stack in the binary.

use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore};

use crate::ProviderError;

/// Where the TLS files are, each with the config key that names it (for errors).
pub(crate) struct TlsFiles<'a> {
    /// The client's certificate chain (PEM), for mutual TLS.
    pub cert: Option<(&'static str, &'a str)>,
    /// The client's private key (PEM), with `cert`.
    pub key: Option<(&'static str, &'a str)>,
    /// The CA certificates to trust (PEM); the system's roots when the path is `None`.
    pub ca: (&'static str, Option<&'a str>),
}

/// The TLS configuration `files` describe. Errors name the config key of the bad file and
/// what to do.
pub(crate) fn client_config(
    instance: &str,
    files: &TlsFiles<'_>,
) -> Result<ClientConfig, ProviderError> {
    let invalid = |field: &str, message: String| ProviderError::InvalidInput {
        instance: instance.to_owned(),
        field: field.to_owned(),
        message,
    };
    let mut roots = RootCertStore::empty();
    let (ca_field, ca_path) = files.ca;
    match ca_path {
        Some(ca_path) => {
            let cas = CertificateDer::pem_file_iter(ca_path)
                .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                .map_err(|e| {
                    invalid(
                        ca_field,
                        format!("cannot read the CA certificates of {ca_path}: {e}"),
                    )
                })?;
            let (added, _) = roots.add_parsable_certificates(cas);
            if added == 0 {
                return Err(invalid(
                    ca_field,
                    format!(
                        "{ca_path} holds no usable CA certificate (-----BEGIN CERTIFICATE-----)"
                    ),
                ));
            }
        }
        None => {
            let native = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(native.certs);
            if roots.is_empty() {
                return Err(invalid(
                    ca_field,
                    format!(
                        "the system trust store has no CA certificates ({} errors): install ca-certificates or set {ca_field}",
                        native.errors.len()
                    ),
                ));
            }
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| invalid(ca_field, format!("TLS setup failed: {e}")))?
        .with_root_certificates(roots);
    let (Some((cert_field, cert_path)), Some((key_field, key_path))) = (files.cert, files.key)
    else {
        return Ok(builder.with_no_client_auth());
    };
    let certs = CertificateDer::pem_file_iter(cert_path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| {
            invalid(
                cert_field,
                format!("cannot read the certificates of {cert_path}: {e}"),
            )
        })?;
    if certs.is_empty() {
        return Err(invalid(
            cert_field,
            format!("{cert_path} holds no PEM certificate: give the gateway's certificate (-----BEGIN CERTIFICATE-----)"),
        ));
    }
    let key = PrivateKeyDer::from_pem_file(key_path).map_err(|e| {
        invalid(
            key_field,
            format!("cannot read a private key from {key_path} (PKCS#8, PKCS#1 or SEC1 PEM): {e}"),
        )
    })?;
    builder.with_client_auth_cert(certs, key).map_err(|e| {
        invalid(
            key_field,
            format!("{key_path} does not fit the certificate of {cert_path}: {e}"),
        )
    })
}
