//! A throwaway certificate authority for TLS in tests (rcgen on ring, as the gateway):
//! server certificates for brokers, client certificates as files (what a provider config
//! names) or as a rustls client config (what a test device connects with).

use std::net::IpAddr;
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

/// A CA and the directory its files go to (removed with it).
pub struct Pki {
    dir: tempfile::TempDir,
    ca_params: CertificateParams,
    ca_key: KeyPair,
    /// The CA certificate (PEM).
    pub ca_pem: String,
}

impl std::fmt::Debug for Pki {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pki")
            .field("dir", &self.dir.path())
            .finish_non_exhaustive()
    }
}

impl Pki {
    /// A new CA named `name` (its certificate is also written to [`Pki::ca_path`]).
    pub fn new(name: &str) -> anyhow::Result<Self> {
        let ca_key = KeyPair::generate()?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.distinguished_name.push(DnType::CommonName, name);
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_pem = ca_params.self_signed(&ca_key)?.pem();
        let dir = tempfile::tempdir()?;
        std::fs::write(dir.path().join("ca.crt"), &ca_pem)?;
        Ok(Self {
            dir,
            ca_params,
            ca_key,
            ca_pem,
        })
    }

    /// A certificate for `cn` (PEM certificate, PEM key): a server's for `server_names`
    /// (DNS names or IP addresses) when there are any, else a client's.
    pub fn issue(&self, cn: &str, server_names: &[&str]) -> anyhow::Result<(String, String)> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(DnType::CommonName, cn);
        params.subject_alt_names = server_names
            .iter()
            .map(|n| match n.parse::<IpAddr>() {
                Ok(ip) => Ok(SanType::IpAddress(ip)),
                Err(_) => Ok(SanType::DnsName(n.to_string().try_into()?)),
            })
            .collect::<anyhow::Result<_>>()?;
        params.extended_key_usages = if server_names.is_empty() {
            vec![ExtendedKeyUsagePurpose::ClientAuth]
        } else {
            vec![ExtendedKeyUsagePurpose::ServerAuth]
        };
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let cert = params.signed_by(&key, &Issuer::from_params(&self.ca_params, &self.ca_key))?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    /// Writes a new client certificate and key for `cn`; their paths.
    pub fn client_files(&self, cn: &str) -> anyhow::Result<(String, String)> {
        let (cert, key) = self.issue(cn, &[])?;
        let cert_path = self.dir.path().join(format!("{cn}.crt"));
        let key_path = self.dir.path().join(format!("{cn}.key"));
        std::fs::write(&cert_path, cert)?;
        std::fs::write(&key_path, key)?;
        Ok((
            cert_path.display().to_string(),
            key_path.display().to_string(),
        ))
    }

    /// The CA certificate's file.
    pub fn ca_path(&self) -> String {
        self.dir.path().join("ca.crt").display().to_string()
    }

    /// TLS (ring) for a client connecting as `cn` with a new certificate of this CA and
    /// trusting only this CA.
    pub fn client_tls(&self, cn: &str) -> anyhow::Result<Arc<rustls::ClientConfig>> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let (cert, key) = self.issue(cn, &[])?;
        let mut roots = rustls::RootCertStore::empty();
        roots.add(CertificateDer::from_pem_slice(self.ca_pem.as_bytes())?)?;
        let certs =
            CertificateDer::pem_slice_iter(cert.as_bytes()).collect::<Result<Vec<_>, _>>()?;
        let key = PrivateKeyDer::from_pem_slice(key.as_bytes())?;
        Ok(Arc::new(
            rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_client_auth_cert(certs, key)?,
        ))
    }
}
