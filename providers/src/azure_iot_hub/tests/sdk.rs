//! Runs the official Python service SDK (`azure-iot-hub`) through
//! `testdata/sdk_driver.py` in the venv `scripts/install-azure-test-deps.sh` creates
//! (`IOTGW_AZURE_VENV`, else `<repo>/target/azure-venv`).

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::AsyncWriteExt as _;

use super::pki::pki;

/// The driver script.
const DRIVER: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/src/azure_iot_hub/testdata/sdk_driver.py"
);

/// The Python SDK, ready to run.
pub struct Sdk {
    python: PathBuf,
}

/// What one op of the plan returned.
pub type OpResult = Result<Value, String>;

impl Sdk {
    /// The SDK, or `None` after printing `SKIPPED: <why>` (a failure under `CI=true`).
    pub fn find(test: &str) -> Option<Self> {
        let venv = std::env::var_os("IOTGW_AZURE_VENV")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../target/azure-venv"))
            });
        let python = venv.join("bin/python");
        let ok = std::process::Command::new(&python)
            .args(["-c", "import six, azure.iot.hub"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            return Some(Self { python });
        }
        let why = format!(
            "{test}: the official Python SDK (azure-iot-hub) is not installed in {}; run scripts/install-azure-test-deps.sh (or set IOTGW_AZURE_VENV)",
            venv.display()
        );
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("CI=true and {why}");
        }
        println!("SKIPPED: {why}");
        None
    }

    /// Whether uamqp (the SDK's AMQP stack, for C2D) imports.
    pub fn has_uamqp(&self) -> bool {
        std::process::Command::new(&self.python)
            .args(["-c", "import uamqp"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    /// Runs `ops` with the SDK against `connection_string` (trusting the test CA), one
    /// result per op.
    pub async fn run(
        &self,
        connection_string: Option<&str>,
        amqp_port: Option<u16>,
        ops: &[Value],
    ) -> Vec<OpResult> {
        let plan =
            json!({"connection_string": connection_string, "amqp_port": amqp_port, "ops": ops});
        let ca = &pki().ca_file;
        let mut child = tokio::process::Command::new(&self.python)
            .arg(DRIVER)
            .env("REQUESTS_CA_BUNDLE", ca)
            .env("IOTGW_TEST_CA", ca)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(if std::env::var_os("IOTGW_SDK_DEBUG").is_some() {
                Stdio::inherit()
            } else {
                Stdio::piped()
            })
            .kill_on_drop(true)
            .spawn()
            .expect("start the SDK driver");
        let mut stdin = child.stdin.take().expect("stdin");
        stdin
            .write_all(plan.to_string().as_bytes())
            .await
            .expect("write the plan");
        drop(stdin);
        let out = tokio::time::timeout(Duration::from_secs(90), child.wait_with_output())
            .await
            .expect("the SDK driver finishes within 90 s")
            .expect("the SDK driver ran");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let results: Vec<OpResult> = stdout
            .lines()
            .filter(|l| l.starts_with('{'))
            .map(|l| {
                let v: Value = serde_json::from_str(l).expect("a JSON line");
                if v["ok"] == json!(true) {
                    Ok(v["result"].clone())
                } else {
                    Err(v["error"].as_str().unwrap_or_default().to_owned())
                }
            })
            .collect();
        assert_eq!(
            results.len(),
            ops.len(),
            "the SDK driver answered {} of {} ops; stderr:\n{}",
            results.len(),
            ops.len(),
            String::from_utf8_lossy(&out.stderr)
        );
        results
    }
}
