//! The aws_iot_core provider against real stand-ins, in Docker (testcontainers):
//! - `motoserver/moto:5.1.4` for the `iot` and `iot-data` APIs (things, certificates,
//!   policies, shadows, Publish), with moto's request recorder on, so published
//!   commands are checked in what moto received;
//! - `eclipse-mosquitto:2` for the AWS IoT Core MQTT endpoint: the same topic scheme,
//!   TLS with client certificates required (`require_certificate`), a throwaway CA made
//!   here with rcgen issuing the server's, the gateway's and the devices' certificates.
//!
//! Both containers are shared by the tests of this binary (started by the first test,
//! removed when the last test holding them ends); every test uses its own device ids,
//! client ids and shared-subscription group. Without Docker the tests print `SKIPPED`,
//! and fail when `CI=true`. The images are the public ones; without registry access
//! `deploy/images/build-local-images.sh` builds them locally under the same names.

mod commands;
mod mqtt;
mod proxy;
mod registry;

use std::net::IpAddr;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use iotgw_config::{AwsIotCoreConfig, Secret};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use testcontainers::core::{IntoContainerPort, WaitFor};
use testcontainers::runners::AsyncRunner;
use testcontainers::{GenericImage, ImageExt};
use tokio::time::Instant;

use super::AwsIotCoreProvider;

/// The moto image (the version the local image builder installs).
pub const MOTO_IMAGE: (&str, &str) = ("motoserver/moto", "5.1.4");
/// The Mosquitto image.
pub const MOSQUITTO_IMAGE: (&str, &str) = ("eclipse-mosquitto", "2");
/// The TLS port of the Mosquitto stand-in inside its container.
const MQTT_TLS_PORT: u16 = 8883;
/// moto's port inside its container.
const MOTO_PORT: u16 = 5000;
/// Region of the moto account.
pub const REGION: &str = "us-east-1";
/// The longest any single wait in these tests may take.
pub const WAIT: Duration = Duration::from_secs(10);

/// A throwaway certificate authority and the files it issued.
pub struct Pki {
    dir: tempfile::TempDir,
    ca_params: CertificateParams,
    ca_key: KeyPair,
    /// The CA certificate (PEM).
    pub ca_pem: String,
}

impl Pki {
    fn new() -> Self {
        let ca_key = KeyPair::generate().expect("CA key");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "iotgw test CA");
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_pem = ca_params
            .self_signed(&ca_key)
            .expect("CA certificate")
            .pem();
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(dir.path().join("ca.crt"), &ca_pem).expect("CA file written");
        Self {
            dir,
            ca_params,
            ca_key,
            ca_pem,
        }
    }

    /// A certificate for `cn` (PEM certificate, PEM key).
    fn issue(&self, cn: &str, server_names: &[String]) -> (String, String) {
        let key = KeyPair::generate().expect("leaf key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("leaf params");
        params.distinguished_name.push(DnType::CommonName, cn);
        params.subject_alt_names = server_names
            .iter()
            .map(|n| match n.parse::<IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName(n.clone().try_into().expect("DNS name")),
            })
            .collect();
        params.extended_key_usages = if server_names.is_empty() {
            vec![ExtendedKeyUsagePurpose::ClientAuth]
        } else {
            vec![ExtendedKeyUsagePurpose::ServerAuth]
        };
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let issuer = Issuer::from_params(&self.ca_params, &self.ca_key);
        let cert = params.signed_by(&key, &issuer).expect("leaf certificate");
        (cert.pem(), key.serialize_pem())
    }

    /// Writes a client certificate and key for `cn`; their paths.
    pub fn client_files(&self, cn: &str) -> (String, String) {
        let (cert, key) = self.issue(cn, &[]);
        let cert_path = self.dir.path().join(format!("{cn}.crt"));
        let key_path = self.dir.path().join(format!("{cn}.key"));
        std::fs::write(&cert_path, cert).expect("client certificate written");
        std::fs::write(&key_path, key).expect("client key written");
        (
            cert_path.display().to_string(),
            key_path.display().to_string(),
        )
    }

    /// The CA file.
    pub fn ca_path(&self) -> String {
        self.dir.path().join("ca.crt").display().to_string()
    }
}

/// The running stand-ins.
pub struct Env {
    /// moto's base URL (`http://host:port`).
    pub moto_url: String,
    /// Host of both containers' published ports.
    pub host: String,
    /// The Mosquitto TLS port on the host.
    pub mqtt_port: u16,
    /// The CA all certificates come from.
    pub pki: Pki,
    stop: Mutex<Option<std::sync::mpsc::Sender<()>>>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Drop for Env {
    fn drop(&mut self) {
        let stop = self.stop.lock().unwrap_or_else(|p| p.into_inner()).take();
        drop(stop);
        if let Some(t) = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = t.join();
        }
    }
}

impl Env {
    /// A provider config for these stand-ins: static test credentials, moto as the
    /// endpoint, Mosquitto as the MQTT host with a fresh gateway certificate for
    /// `client_id`, fast reconnects, no SDK retries, `client_id` as shared group.
    pub fn config(&self, client_id: &str) -> AwsIotCoreConfig {
        let (cert, key) = self.pki.client_files(client_id);
        AwsIotCoreConfig {
            region: Some(REGION.into()),
            access_key_id: Some("testing".into()),
            secret_access_key: Some(Secret::new("testing")),
            endpoint_url: Some(self.moto_url.clone()),
            mqtt_host: Some(self.host.clone()),
            mqtt_port: self.mqtt_port,
            client_id: client_id.into(),
            client_cert_path: Some(cert),
            client_key_path: Some(key),
            ca_cert_path: Some(self.pki.ca_path()),
            shared_group: client_id.into(),
            keep_alive_secs: 5,
            reconnect_min_ms: 50,
            reconnect_max_ms: 400,
            api_timeout_ms: 5_000,
            max_attempts: 1,
            ..AwsIotCoreConfig::default()
        }
    }

    /// A provider on [`Env::config`].
    pub async fn provider(&self, client_id: &str) -> Arc<AwsIotCoreProvider> {
        Arc::new(
            AwsIotCoreProvider::new(
                &crate::InstanceName::from("aws-test"),
                &self.config(client_id),
            )
            .await
            .expect("valid test config"),
        )
    }

    /// A control-plane client straight to moto (to inspect what the provider left).
    pub async fn inspector(&self) -> aws_sdk_iot::Client {
        let mut c = self.config("inspector");
        c.client_cert_path = None;
        c.client_key_path = None;
        super::clients::Clients::new("inspector", &c)
            .await
            .expect("inspector config")
            .iot
    }

    /// A data-plane client straight to moto.
    pub async fn data_inspector(&self) -> aws_sdk_iotdataplane::Client {
        let mut c = self.config("inspector");
        c.client_cert_path = None;
        c.client_key_path = None;
        super::clients::Clients::new("inspector", &c)
            .await
            .expect("inspector config")
            .data()
            .await
            .expect("data client on the endpoint URL")
            .clone()
    }
}

/// The shared environment, alive while a test holds it.
static ENV: tokio::sync::Mutex<Weak<Env>> = tokio::sync::Mutex::const_new(Weak::new());

/// A device or gateway id unique to this test run.
pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..10]
    )
}

/// The stand-ins, or `None` (after printing why) when Docker is unreachable outside CI.
pub async fn env() -> Option<Arc<Env>> {
    let mut slot = ENV.lock().await;
    if let Some(env) = slot.upgrade() {
        return Some(env);
    }
    if let Err(why) = docker_reachable() {
        let msg = format!("Docker is unreachable ({why}): the aws_iot_core integration tests need Docker with the moto and Mosquitto images");
        assert!(
            !std::env::var("CI").is_ok_and(|v| v == "true"),
            "{msg} (CI=true: failing instead of skipping)"
        );
        eprintln!("SKIPPED: {msg}");
        return None;
    }
    eprintln!("aws_iot_core tests: starting the moto and Mosquitto containers");
    let env = Arc::new(start().await);
    *slot = Arc::downgrade(&env);
    Some(env)
}

/// Unwraps [`env`] or returns from the test (skipped).
macro_rules! env_or_skip {
    () => {
        match super::env().await {
            Some(env) => env,
            None => return,
        }
    };
}
pub(crate) use env_or_skip;

/// Whether the Docker daemon answers on `DOCKER_HOST` or the default socket.
fn docker_reachable() -> Result<(), String> {
    let host =
        std::env::var("DOCKER_HOST").unwrap_or_else(|_| "unix:///var/run/docker.sock".into());
    if let Some(path) = host.strip_prefix("unix://") {
        std::os::unix::net::UnixStream::connect(path)
            .map(|_| ())
            .map_err(|e| format!("{path}: {e}"))
    } else if let Some(addr) = host.strip_prefix("tcp://") {
        std::net::TcpStream::connect(addr.trim_end_matches('/'))
            .map(|_| ())
            .map_err(|e| format!("{addr}: {e}"))
    } else {
        Ok(())
    }
}

/// The host name test clients use for published ports (what testcontainers reports).
fn docker_host_name() -> String {
    std::env::var("DOCKER_HOST")
        .ok()
        .and_then(|h| {
            h.strip_prefix("tcp://")
                .and_then(|a| a.split(':').next().map(str::to_owned))
        })
        .unwrap_or_else(|| "localhost".into())
}

fn mosquitto_conf() -> String {
    format!(
        "# The AWS IoT Core MQTT endpoint's stand-in: TLS, client certificates required,\n\
         # the certificate's CN is the client's identity.\n\
         listener {MQTT_TLS_PORT}\n\
         cafile /mosquitto/config/ca.crt\n\
         certfile /mosquitto/config/server.crt\n\
         keyfile /mosquitto/config/server.key\n\
         require_certificate true\n\
         use_identity_as_username true\n\
         allow_anonymous false\n\
         persistence false\n\
         log_dest stderr\n\
         log_type error\nlog_type warning\nlog_type notice\nlog_type information\n"
    )
}

/// Starts both containers on a thread of their own (so they outlive any one test's
/// runtime) and returns once both accept connections.
async fn start() -> Env {
    let pki = Pki::new();
    let host = docker_host_name();
    let names: Vec<String> = ["localhost", "127.0.0.1", "::1", host.as_str()]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let (server_cert, server_key) = pki.issue("mosquitto", &names);
    let ca = pki.ca_pem.clone();
    let (ready_tx, ready_rx) =
        tokio::sync::oneshot::channel::<Result<(String, u16, u16), String>>();
    let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
    let thread = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("container runtime");
        rt.block_on(async move {
            let moto = GenericImage::new(MOTO_IMAGE.0, MOTO_IMAGE.1)
                .with_exposed_port(MOTO_PORT.tcp())
                .with_wait_for(WaitFor::message_on_stderr("Running on http"))
                .with_startup_timeout(Duration::from_secs(60))
                .start()
                .await;
            let moto = match moto {
                Ok(c) => c,
                Err(e) => {
                    let _ = ready_tx.send(Err(format!("{}:{}: {e}", MOTO_IMAGE.0, MOTO_IMAGE.1)));
                    return;
                }
            };
            let mosquitto = GenericImage::new(MOSQUITTO_IMAGE.0, MOSQUITTO_IMAGE.1)
                .with_exposed_port(MQTT_TLS_PORT.tcp())
                .with_wait_for(WaitFor::message_on_stderr("running"))
                .with_copy_to(
                    "/mosquitto/config/mosquitto.conf",
                    mosquitto_conf().into_bytes(),
                )
                .with_copy_to("/mosquitto/config/ca.crt", ca.into_bytes())
                .with_copy_to("/mosquitto/config/server.crt", server_cert.into_bytes())
                .with_copy_to("/mosquitto/config/server.key", server_key.into_bytes())
                .with_startup_timeout(Duration::from_secs(30))
                .start()
                .await;
            let mosquitto = match mosquitto {
                Ok(c) => c,
                Err(e) => {
                    let _ = moto.rm().await;
                    let _ = ready_tx.send(Err(format!(
                        "{}:{}: {e}",
                        MOSQUITTO_IMAGE.0, MOSQUITTO_IMAGE.1
                    )));
                    return;
                }
            };
            let ports = async {
                Ok::<_, testcontainers::TestcontainersError>((
                    moto.get_host_port_ipv4(MOTO_PORT).await?,
                    mosquitto.get_host_port_ipv4(MQTT_TLS_PORT).await?,
                ))
            }
            .await;
            match ports {
                Ok((moto_port, mqtt_port)) => {
                    let _ = ready_tx.send(Ok((host_of(&moto).await, moto_port, mqtt_port)));
                    // Until the last test lets go of the environment.
                    let _ = tokio::task::spawn_blocking(move || stop_rx.recv()).await;
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(format!("published ports: {e}")));
                }
            }
            let _ = moto.rm().await;
            let _ = mosquitto.rm().await;
        });
    });
    let (host, moto_port, mqtt_port) = match ready_rx.await {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => panic!(
            "starting the stand-in containers failed: {e}\n(without registry access, build the images with deploy/images/build-local-images.sh)"
        ),
        Err(_) => panic!("the container thread ended before the containers started"),
    };
    let moto_url = format!("http://{host}:{moto_port}");
    start_recording(&moto_url).await;
    Env {
        moto_url,
        host,
        mqtt_port,
        pki,
        stop: Mutex::new(Some(stop_tx)),
        thread: Mutex::new(Some(thread)),
    }
}

async fn host_of<I: testcontainers::Image>(c: &testcontainers::ContainerAsync<I>) -> String {
    c.get_host()
        .await
        .map(|h| h.to_string())
        .unwrap_or_else(|_| "localhost".into())
}

/// Turns moto's request recorder on (it records every later API request).
async fn start_recording(moto_url: &str) {
    let deadline = Instant::now() + WAIT;
    loop {
        let res = reqwest::Client::new()
            .post(format!("{moto_url}/moto-api/recorder/start-recording"))
            .send()
            .await;
        match res {
            Ok(r) if r.status().is_success() => return,
            other => {
                assert!(
                    Instant::now() < deadline,
                    "moto's recorder did not start: {other:?}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// One request moto recorded.
#[derive(Debug, serde::Deserialize)]
pub struct Recorded {
    /// Request headers as moto saw them.
    pub headers: std::collections::HashMap<String, String>,
    /// HTTP method.
    pub method: String,
    /// Full URL (path percent-encoded as sent).
    pub url: String,
    /// Body, base64 when `body_encoded`.
    #[serde(default)]
    pub body: Option<String>,
    /// Whether `body` is base64.
    #[serde(default)]
    pub body_encoded: bool,
}

impl Recorded {
    /// The header `name`, case-insensitively.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The URL with its `%XX` escapes decoded.
    pub fn decoded_url(&self) -> String {
        let bytes = self.url.as_bytes();
        let mut out = Vec::with_capacity(bytes.len());
        let mut i = 0;
        while i < bytes.len() {
            let escaped = bytes
                .get(i + 1..i + 3)
                .filter(|_| bytes[i] == b'%')
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok());
            match escaped {
                Some(b) => {
                    out.push(b);
                    i += 3;
                }
                None => {
                    out.push(bytes[i]);
                    i += 1;
                }
            }
        }
        String::from_utf8_lossy(&out).into_owned()
    }

    /// The body bytes.
    pub fn body_bytes(&self) -> Vec<u8> {
        use base64::Engine as _;
        let body = self.body.clone().unwrap_or_default();
        if self.body_encoded {
            base64::engine::general_purpose::STANDARD
                .decode(body)
                .expect("recorded body is base64")
        } else {
            body.into_bytes()
        }
    }
}

/// Everything moto recorded so far.
pub async fn recording(moto_url: &str) -> Vec<Recorded> {
    let text = reqwest::get(format!("{moto_url}/moto-api/recorder/download-recording"))
        .await
        .expect("moto answers")
        .text()
        .await
        .expect("recording text");
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).expect("recorded request is JSON"))
        .collect()
}

/// Polls `cond` every 20 ms until it holds; panics after [`WAIT`].
pub async fn wait_until<F, Fut>(what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + WAIT;
    while !cond().await {
        assert!(Instant::now() < deadline, "not within {WAIT:?}: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
