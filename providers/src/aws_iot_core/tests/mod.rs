//! The aws_iot_core provider against real stand-ins, in Docker, started by
//! `iotgw_testkit` as everywhere else in the workspace:
//! - `motoserver/moto:5.1.4` for the `iot` and `iot-data` APIs (things, certificates,
//!   policies, shadows, Publish), with moto's request recorder on, so published
//!   commands are checked in what moto received;
//! - `eclipse-mosquitto:2` for the AWS IoT Core MQTT endpoint
//!   (`MosquittoSpec::client_certificate_tls`): the same topic scheme, TLS with client
//!   certificates required, a throwaway CA (`iotgw_testkit::pki`) issuing the server's, the
//!   gateway's and the devices' certificates.
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

use std::sync::{Arc, Weak};
use std::time::Duration;

use iotgw_config::{AwsIotCoreConfig, Secret};
use iotgw_testkit::mosquitto::{Mosquitto, MosquittoSpec, TLS_PORT};
use iotgw_testkit::moto::{self, Moto, Recorded};
use iotgw_testkit::pki::Pki;
use tokio::time::Instant;

use super::AwsIotCoreProvider;

/// Region of the moto account.
pub const REGION: &str = moto::REGION;
/// The longest any single wait in these tests may take.
pub const WAIT: Duration = Duration::from_secs(10);

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
    moto: Arc<Moto>,
    /// Held for its lifetime (removed with the environment).
    _broker: Mosquitto,
}

impl Env {
    /// A provider config for these stand-ins: static test credentials, moto as the
    /// endpoint, Mosquitto as the MQTT host with a fresh gateway certificate for
    /// `client_id`, fast reconnects, no SDK retries, `client_id` as shared group.
    pub fn config(&self, client_id: &str) -> AwsIotCoreConfig {
        let (cert, key) = self
            .pki
            .client_files(client_id)
            .expect("a client certificate of the test CA");
        AwsIotCoreConfig {
            region: Some(REGION.into()),
            access_key_id: Some(moto::ACCESS_KEY_ID.into()),
            secret_access_key: Some(Secret::new(moto::SECRET_ACCESS_KEY)),
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
    iotgw_testkit::require_docker("this aws_iot_core provider test (moto and Mosquitto)").ok()?;
    let mut slot = ENV.lock().await;
    if let Some(env) = slot.upgrade() {
        return Some(env);
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

/// Starts moto (recorder on) and the TLS broker; returns once both answer.
async fn start() -> Env {
    let pki = Pki::new("iotgw test CA").expect("a test CA");
    let (server_cert, server_key) = pki
        .issue("mosquitto", &["localhost", "127.0.0.1", "::1"])
        .expect("the broker's certificate");
    let moto = Moto::leased().await.expect("moto starts");
    moto.start_recording()
        .await
        .expect("moto's request recorder starts");
    let broker = Mosquitto::dedicated(MosquittoSpec::client_certificate_tls(
        &pki.ca_pem,
        &server_cert,
        &server_key,
    ))
    .await
    .expect("the TLS Mosquitto starts");
    Env {
        moto_url: moto.endpoint(),
        host: broker.host().to_owned(),
        mqtt_port: broker.mapped_port(TLS_PORT),
        pki,
        moto,
        _broker: broker,
    }
}

/// Everything moto recorded so far.
pub async fn recording(env: &Env) -> Vec<Recorded> {
    env.moto
        .recording()
        .await
        .expect("moto's recording downloads")
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
