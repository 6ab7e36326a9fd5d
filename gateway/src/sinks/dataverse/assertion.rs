//! The sink's client credential: a client secret, or a certificate whose private key signs a
//! fresh client assertion (a JWT) for every token request.
//!
//! The assertion is what the Microsoft identity platform documents ("Microsoft identity
//! platform application authentication certificate credentials") and what Microsoft's msal
//! 1.39 (Python) sends for a certificate given with its private key:
//! - header `{"alg": "PS256", "typ": "JWT", "x5t#S256": <base64url SHA-256 of the
//!   certificate's DER>, "x5c": [<base64 DER of the certificate>]}` (`x5c` is what
//!   subject name/issuer authentication needs; ignored otherwise);
//! - claims `aud` = the token endpoint, `iss` = `sub` = the client id, `jti` = a fresh
//!   UUID, `nbf` = `iat` = now, `exp` = now + 10 minutes (the docs: "5-10 minutes after
//!   `nbf` at most"; msal uses 600 s);
//! - the signature RSASSA-PSS with SHA-256 (salt as long as the hash), i.e. JWS `PS256`.
//!
//! The form then carries `client_assertion_type=urn:ietf:params:oauth:client-assertion-type:jwt-bearer`
//! and `client_assertion=<JWT>` instead of `client_secret`.

use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context};
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use iotgw_config::{DataverseSinkConfig, Secret};
use ring::rand::SystemRandom;
use ring::signature::{RsaKeyPair, RSA_PSS_SHA256};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::json;

/// `client_assertion_type` of a JWT client assertion (RFC 7523 section 2.2).
pub const JWT_BEARER: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// How long an assertion is valid, in seconds.
pub const LIFETIME_SECS: u64 = 600;

/// How the sink proves it is the app registration.
pub enum Credential {
    /// `client_secret`.
    Secret(Secret),
    /// `client_assertion` signed with a certificate's key.
    Certificate(Box<ClientCertificate>),
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Secret(_) => f.write_str("Secret(<redacted>)"),
            Self::Certificate(c) => f
                .debug_struct("Certificate")
                .field("x5t#S256", &c.x5t_s256())
                .finish_non_exhaustive(),
        }
    }
}

impl Credential {
    /// The credential `cfg` names: its certificate (and key) files read and checked, else
    /// its client secret. The config's validation already refused both or neither.
    pub fn from_config(cfg: &DataverseSinkConfig) -> anyhow::Result<Self> {
        match (&cfg.client_certificate, &cfg.client_secret) {
            (Some(cert), _) => ClientCertificate::load(cert, cfg.client_certificate_key.as_deref())
                .map(|c| Self::Certificate(Box::new(c))),
            (None, Some(secret)) => Ok(Self::Secret(secret.clone())),
            (None, None) => bail!("neither client_secret nor client_certificate is given"),
        }
    }

    /// The form fields that authenticate a token request to `token_url` as `client_id`
    /// (a certificate: a fresh assertion each call).
    pub fn form_fields(
        &self,
        token_url: &str,
        client_id: &str,
    ) -> anyhow::Result<Vec<(&'static str, String)>> {
        Ok(match self {
            Self::Secret(s) => vec![("client_secret", s.expose().to_owned())],
            Self::Certificate(c) => vec![
                ("client_assertion_type", JWT_BEARER.to_owned()),
                (
                    "client_assertion",
                    c.assertion(token_url, client_id, unix_now(), uuid::Uuid::new_v4())?,
                ),
            ],
        })
    }

    /// What to check when the token endpoint refuses the credential.
    pub fn hint(&self) -> &'static str {
        match self {
            Self::Secret(_) => "client_secret",
            Self::Certificate(_) => {
                "client_certificate (is this certificate uploaded to the app registration, and not expired?)"
            }
        }
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A certificate of the app registration and its RSA private key.
pub struct ClientCertificate {
    key: RsaKeyPair,
    /// base64url (unpadded) SHA-256 of the certificate's DER.
    x5t_s256: String,
    /// base64 of the certificate's DER.
    x5c: String,
}

impl ClientCertificate {
    /// Reads `cert_path` (PEM: the certificate, first, and its private key unless
    /// `key_path` names the key's own PEM file).
    pub fn load(cert_path: &str, key_path: Option<&str>) -> anyhow::Result<Self> {
        let read = |path: &str, key: &str| {
            std::fs::read(path).with_context(|| format!("{key} `{path}` cannot be read"))
        };
        let cert_pem = read(cert_path, "client_certificate")?;
        let key_pem = match key_path {
            Some(k) => read(k, "client_certificate_key")?,
            None => cert_pem.clone(),
        };
        let key_source = match key_path {
            Some(k) => format!("client_certificate_key `{k}`"),
            None => format!("client_certificate `{cert_path}`"),
        };
        Self::from_pem(&cert_pem, &key_pem)
            .with_context(|| format!("client_certificate `{cert_path}` (key from {key_source})"))
    }

    /// The certificate (the first `CERTIFICATE` block of `cert_pem`) and the RSA key of
    /// `key_pem` (PKCS#8 `PRIVATE KEY` or PKCS#1 `RSA PRIVATE KEY`, unencrypted), which
    /// must be the certificate's.
    pub fn from_pem(cert_pem: &[u8], key_pem: &[u8]) -> anyhow::Result<Self> {
        let cert = CertificateDer::pem_slice_iter(cert_pem)
            .next()
            .ok_or_else(|| anyhow!("no -----BEGIN CERTIFICATE----- block"))?
            .map_err(|e| anyhow!("the certificate PEM cannot be read: {e}"))?;
        let parsed = webpki::EndEntityCert::try_from(&cert)
            .map_err(|e| anyhow!("the certificate cannot be parsed: {e}"))?;
        let key = match PrivateKeyDer::from_pem_slice(key_pem) {
            Ok(PrivateKeyDer::Pkcs8(k)) => RsaKeyPair::from_pkcs8(k.secret_pkcs8_der()),
            Ok(PrivateKeyDer::Pkcs1(k)) => RsaKeyPair::from_der(k.secret_pkcs1_der()),
            Ok(_) => bail!(
                "the private key is not RSA (certificate credentials of the Microsoft identity platform are RSA)"
            ),
            Err(e) => bail!(
                "no unencrypted -----BEGIN PRIVATE KEY----- or -----BEGIN RSA PRIVATE KEY----- block ({e}); an encrypted key can be decrypted with `openssl pkey -in key.pem -out plain.pem`"
            ),
        }
        .map_err(|e| anyhow!("the private key is not a usable RSA key (2048 to 8192 bits): {e}"))?;
        // The key must be the certificate's: sign and verify with the certificate.
        let probe = b"iotgw: does this key belong to the certificate?";
        let signature = sign(&key, probe)?;
        parsed
            .verify_signature(
                webpki::ring::RSA_PSS_2048_8192_SHA256_LEGACY_KEY,
                probe,
                &signature,
            )
            .map_err(|_| anyhow!("the private key does not belong to the certificate"))?;
        Ok(Self {
            key,
            x5t_s256: URL_SAFE_NO_PAD.encode(ring::digest::digest(&ring::digest::SHA256, &cert)),
            x5c: STANDARD.encode(&cert),
        })
    }

    /// The certificate's SHA-256 thumbprint as the JWT header's `x5t#S256`.
    pub fn x5t_s256(&self) -> &str {
        &self.x5t_s256
    }

    /// A signed client assertion for `audience` (the token endpoint) from `client_id`,
    /// issued at `now` (seconds since the Unix epoch), with the id `jti`.
    pub fn assertion(
        &self,
        audience: &str,
        client_id: &str,
        now: u64,
        jti: uuid::Uuid,
    ) -> anyhow::Result<String> {
        let header = json!({
            "alg": "PS256",
            "typ": "JWT",
            "x5t#S256": self.x5t_s256,
            "x5c": [self.x5c],
        });
        let claims = json!({
            "aud": audience,
            "iss": client_id,
            "sub": client_id,
            "jti": jti.to_string(),
            "nbf": now,
            "iat": now,
            "exp": now + LIFETIME_SECS,
        });
        let signing_input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let signature = sign(&self.key, signing_input.as_bytes())?;
        Ok(format!(
            "{signing_input}.{}",
            URL_SAFE_NO_PAD.encode(signature)
        ))
    }
}

/// RSASSA-PSS with SHA-256 (JWS `PS256`).
fn sign(key: &RsaKeyPair, message: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut signature = vec![0; key.public().modulus_len()];
    key.sign(
        &RSA_PSS_SHA256,
        &SystemRandom::new(),
        message,
        &mut signature,
    )
    .map_err(|_| anyhow!("the client assertion cannot be signed"))?;
    Ok(signature)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use serde_json::Value;

    /// A throwaway RSA key and its self-signed certificate (PEM, PEM), made by the
    /// `openssl` command (rcgen on ring cannot generate RSA keys). `pkcs1` writes the key
    /// as `RSA PRIVATE KEY`.
    pub(crate) fn throwaway_certificate(pkcs1: bool) -> (String, String) {
        let dir = tempfile::tempdir().expect("tmp");
        let (key, cert) = (dir.path().join("key.pem"), dir.path().join("cert.pem"));
        let status = std::process::Command::new("openssl")
            .args([
                "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            ])
            .args(["-subj", "/CN=iotgw-dataverse-test"])
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .stderr(std::process::Stdio::null())
            .status()
            .expect("the openssl command (to make a throwaway RSA certificate)");
        assert!(status.success(), "openssl req failed");
        if pkcs1 {
            let status = std::process::Command::new("openssl")
                .args(["rsa", "-traditional", "-in"])
                .arg(&key)
                .arg("-out")
                .arg(&key)
                .stderr(std::process::Stdio::null())
                .status()
                .expect("openssl rsa");
            assert!(status.success(), "openssl rsa failed");
        }
        (
            std::fs::read_to_string(cert).expect("cert"),
            std::fs::read_to_string(key).expect("key"),
        )
    }

    /// The JWT's decoded header and claims, its signing input and signature.
    pub(crate) fn decode(jwt: &str) -> (Value, Value, String, Vec<u8>) {
        let parts: Vec<&str> = jwt.split('.').collect();
        assert_eq!(parts.len(), 3, "{jwt}");
        let json = |s: &str| -> Value {
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(s).expect("base64url")).expect("JSON")
        };
        (
            json(parts[0]),
            json(parts[1]),
            format!("{}.{}", parts[0], parts[1]),
            URL_SAFE_NO_PAD
                .decode(parts[2])
                .expect("base64url signature"),
        )
    }

    /// Whether `signature` over `message` is PS256 by the key of `cert_pem`'s certificate.
    pub(crate) fn verifies(cert_pem: &str, message: &[u8], signature: &[u8]) -> bool {
        let cert = CertificateDer::from_pem_slice(cert_pem.as_bytes()).expect("cert PEM");
        let cert = webpki::EndEntityCert::try_from(&cert).expect("cert");
        cert.verify_signature(
            webpki::ring::RSA_PSS_2048_8192_SHA256_LEGACY_KEY,
            message,
            signature,
        )
        .is_ok()
    }

    fn der(cert_pem: &str) -> Vec<u8> {
        CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .expect("cert PEM")
            .to_vec()
    }

    const TOKEN_URL: &str =
        "https://login.microsoftonline.com/contoso.onmicrosoft.com/oauth2/v2.0/token";
    const CLIENT_ID: &str = "11111111-2222-3333-4444-555555555555";

    #[test]
    fn the_assertion_has_the_documented_header_and_claims_and_verifies_with_the_certificate() {
        let (cert, key) = throwaway_certificate(false);
        let both = format!("{cert}{key}");
        let c = ClientCertificate::from_pem(both.as_bytes(), both.as_bytes()).expect("loads");
        let jti = uuid::Uuid::new_v4();
        let jwt = c
            .assertion(TOKEN_URL, CLIENT_ID, 1_700_000_000, jti)
            .expect("signed");
        let (header, claims, input, signature) = decode(&jwt);
        // Docs (certificate credentials): alg "Should be PS256", typ "Should be JWT",
        // x5t#S256 "Base64url-encoded SHA-256 thumbprint of the X.509 certificate's DER
        // encoding".
        let thumbprint = ring::digest::digest(&ring::digest::SHA256, &der(&cert));
        assert_eq!(
            header,
            json!({
                "alg": "PS256",
                "typ": "JWT",
                "x5t#S256": URL_SAFE_NO_PAD.encode(thumbprint),
                "x5c": [STANDARD.encode(der(&cert))],
            })
        );
        assert_eq!(
            c.x5t_s256().len(),
            43,
            "32 bytes, base64url without padding"
        );
        // Docs: aud the token endpoint, iss = sub = the client id, jti a GUID, nbf now,
        // exp "5-10 minutes after nbf at most", iat.
        assert_eq!(
            claims,
            json!({
                "aud": TOKEN_URL,
                "iss": CLIENT_ID,
                "sub": CLIENT_ID,
                "jti": jti.to_string(),
                "nbf": 1_700_000_000_u64,
                "iat": 1_700_000_000_u64,
                "exp": 1_700_000_600_u64,
            })
        );
        assert_eq!(signature.len(), 256, "a 2048-bit RSA signature");
        assert!(verifies(&cert, input.as_bytes(), &signature));
        // ... and not over anything else.
        assert!(!verifies(&cert, format!("{input}x").as_bytes(), &signature));
    }

    #[test]
    fn every_token_request_gets_a_fresh_assertion() {
        let (cert, key) = throwaway_certificate(false);
        let c = ClientCertificate::from_pem(cert.as_bytes(), key.as_bytes()).expect("loads");
        let credential = Credential::Certificate(Box::new(c));
        let jti = |fields: Vec<(&'static str, String)>| {
            assert_eq!(fields[0], ("client_assertion_type", JWT_BEARER.to_owned()));
            assert_eq!(fields[1].0, "client_assertion");
            decode(&fields[1].1).1["jti"].clone()
        };
        let a = jti(credential
            .form_fields(TOKEN_URL, CLIENT_ID)
            .expect("fields"));
        let b = jti(credential
            .form_fields(TOKEN_URL, CLIENT_ID)
            .expect("fields"));
        assert_ne!(a, b);
        assert!(!format!("{credential:?}").contains("PRIVATE"));
        let secret = Credential::Secret(Secret::new("s3cr3t"));
        assert_eq!(
            secret.form_fields(TOKEN_URL, CLIENT_ID).expect("fields"),
            [("client_secret", "s3cr3t".to_owned())]
        );
        assert!(!format!("{secret:?}").contains("s3cr3t"));
    }

    #[test]
    fn a_pkcs1_key_in_its_own_file_loads_and_a_foreign_or_missing_key_is_refused() {
        let (cert, key) = throwaway_certificate(true);
        assert!(key.contains("BEGIN RSA PRIVATE KEY"), "{key}");
        let dir = tempfile::tempdir().expect("tmp");
        let (cert_path, key_path) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
        std::fs::write(&cert_path, &cert).expect("write");
        std::fs::write(&key_path, &key).expect("write");
        let (cert_path, key_path) = (
            cert_path.to_str().expect("utf-8"),
            key_path.to_str().expect("utf-8"),
        );
        ClientCertificate::load(cert_path, Some(key_path)).expect("certificate and PKCS#1 key");

        let err = |r: anyhow::Result<ClientCertificate>| match r {
            Ok(_) => panic!("accepted"),
            Err(e) => format!("{e:#}"),
        };
        let e = err(ClientCertificate::load(cert_path, None));
        assert!(e.contains("no unencrypted -----BEGIN PRIVATE KEY"), "{e}");
        let e = err(ClientCertificate::load("/nonexistent/cert.pem", None));
        assert!(
            e.contains("client_certificate `/nonexistent/cert.pem` cannot be read"),
            "{e}"
        );
        let (_, other_key) = throwaway_certificate(false);
        let e = err(ClientCertificate::from_pem(
            cert.as_bytes(),
            other_key.as_bytes(),
        ));
        assert!(e.contains("does not belong to the certificate"), "{e}");
        let e = err(ClientCertificate::from_pem(key.as_bytes(), key.as_bytes()));
        assert!(e.contains("no -----BEGIN CERTIFICATE-----"), "{e}");
    }
}
