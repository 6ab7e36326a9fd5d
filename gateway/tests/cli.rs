//! The `iotgw` binary as a user meets it: help, config checks, exit codes, redaction.
#![allow(
    clippy::disallowed_methods,
    reason = "test code: plain-HTTP clients against in-process servers and local emulators, no TLS roots or timeouts to configure"
)]

use std::process::{Command, Output};

fn iotgw(args: &[&str], dir: &std::path::Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_iotgw"))
        .args(args)
        .current_dir(dir)
        .env_remove("IOTGW_CONFIG")
        .env("IOTGW_LOG", "warn")
        .output()
        .expect("the iotgw binary runs")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn help_names_every_command_and_the_quick_start() {
    let dir = tempfile::tempdir().expect("tmp");
    let out = iotgw(&["--help"], dir.path());
    assert!(out.status.success());
    let help = text(&out.stdout);
    for needle in [
        "run",
        "check-config",
        "config",
        "simulate",
        "devices",
        "Quick start",
        "IOTGW_API__LISTEN",
    ] {
        assert!(help.contains(needle), "--help lacks {needle}:\n{help}");
    }
    let run_help = text(&iotgw(&["run", "--help"], dir.path()).stdout);
    assert!(
        run_help.contains("embedded default") && run_help.contains("--config"),
        "{run_help}"
    );
}

#[test]
fn check_config_accepts_the_example_file() {
    let example = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../gateway.example.toml");
    let dir = tempfile::tempdir().expect("tmp");
    let out = iotgw(
        &[
            "check-config",
            "--no-env",
            example.to_str().expect("utf-8 path"),
        ],
        dir.path(),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("valid"));
}

#[test]
fn check_config_reports_every_typo_with_a_fix_and_exits_64() {
    let dir = tempfile::tempdir().expect("tmp");
    let file = dir.path().join("bad.toml");
    std::fs::write(
        &file,
        "[api]\nlisten = \"0.0.0.0:8080\"\n[pipeline]\ndebounce_windw_secs = 60\n[providers.edge]\nkind = \"mqtt\"\nport = \"x\"\n",
    )
    .expect("write");
    let out = iotgw(&["check-config", "--no-env", "bad.toml"], dir.path());
    assert_eq!(out.status.code(), Some(64), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(
        err.contains("pipeline.debounce_windw_secs")
            && err.contains("did you mean `debounce_window_secs`"),
        "{err}"
    );
    assert!(
        err.contains("providers.edge") && err.contains("port"),
        "{err}"
    );
    assert!(
        err.contains("api.token"),
        "non-loopback without a token is reported too:\n{err}"
    );
}

#[test]
fn a_bad_environment_override_stops_run_with_exit_64_before_binding_anything() {
    let dir = tempfile::tempdir().expect("tmp");
    let out = Command::new(env!("CARGO_BIN_EXE_iotgw"))
        .args(["run"])
        .current_dir(dir.path())
        .env("IOTGW_PIPELINE__UNKNOWN_DEVICES", "shrug")
        .env("IOTGW_LOG", "warn")
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(64));
    let err = text(&out.stderr);
    assert!(
        err.contains("pipeline.unknown_devices") && err.contains("dead_letter"),
        "{err}"
    );
    assert!(!dir.path().join("data").exists(), "nothing was started");
}

#[test]
fn config_show_prints_the_effective_config_with_secrets_redacted() {
    let dir = tempfile::tempdir().expect("tmp");
    let out = Command::new(env!("CARGO_BIN_EXE_iotgw"))
        .args(["config", "show", "--format", "json"])
        .current_dir(dir.path())
        .env_remove("IOTGW_CONFIG")
        .env("IOTGW_API__TOKEN", "super-secret-token-value-123")
        .env("IOTGW_API__LISTEN", "127.0.0.1:9999")
        .output()
        .expect("runs");
    assert!(out.status.success(), "{}", text(&out.stderr));
    let shown = text(&out.stdout);
    assert!(!shown.contains("super-secret-token-value-123"), "{shown}");
    let v: serde_json::Value = serde_json::from_str(&shown).expect("json");
    assert_eq!(v["api"]["token"], "<redacted>");
    assert_eq!(v["api"]["listen"], "127.0.0.1:9999");
    assert_eq!(v["providers"]["local"]["kind"], "mqtt");
}

/// A free port on loopback (bound, read, released).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// `iotgw run` as a child process, killed when dropped.
struct RunningGateway {
    child: std::process::Child,
    log: std::path::PathBuf,
}

impl Drop for RunningGateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl RunningGateway {
    /// Starts `iotgw run --config gw.toml` in `dir`: the embedded broker, an mqtt provider in
    /// registry-only mode, SQLite in `dir`, the API on a free port with `token`; returns once
    /// the API answers `/live`.
    fn start(dir: &std::path::Path, token: &str) -> (Self, String) {
        let (api, broker) = (free_port(), free_port());
        let config = format!(
            "[api]\nlisten = \"127.0.0.1:{api}\"\ntoken = \"{token}\"\n\
             [store]\npath = \"{db}\"\n\
             [embedded_broker]\nenabled = true\nport = {broker}\nv311_port = 0\n\
             [routing]\ndefault = \"local\"\n\
             [providers.local]\nkind = \"mqtt\"\nport = {broker}\nclient_id = \"iotgw-cli-test\"\nshared_group = \"\"\n",
            db = dir.join("iotgw.db").display()
        );
        std::fs::write(dir.join("gw.toml"), config).expect("write config");
        let log = dir.join("gateway.log");
        let child = Command::new(env!("CARGO_BIN_EXE_iotgw"))
            .args(["run", "--config", "gw.toml"])
            .current_dir(dir)
            .env("IOTGW_LOG", "info,rumqttd=warn")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("iotgw run starts");
        let mut gw = Self { child, log };
        let url = format!("http://127.0.0.1:{api}");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            if let Ok(Some(status)) = gw.child.try_wait() {
                panic!("iotgw run exited ({status}):\n{}", gw.log_text());
            }
            let probe = iotgw(
                &[
                    "healthcheck",
                    "--url",
                    // /live answers from the first moment; /ready once the gateway serves.
                    &format!("{url}/ready"),
                    "--timeout-ms",
                    "500",
                ],
                dir,
            );
            if probe.status.success() {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the gateway was not ready within 30 s:\n{}",
                gw.log_text()
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        (gw, url)
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// `iotgw devices import ARGS` in `dir`, without a token from the environment.
fn import(dir: &std::path::Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_iotgw"))
        .args(["devices", "import"])
        .args(args)
        .current_dir(dir)
        .env_remove("IOTGW_CONFIG")
        .env_remove("IOTGW_API_TOKEN")
        .env("IOTGW_LOG", "warn")
        .output()
        .expect("the iotgw binary runs")
}

/// GET `path` from the API with the bearer token: (status, JSON body).
fn get(url: &str, token: &str, path: &str) -> (u16, serde_json::Value) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let r = reqwest::Client::new()
            .get(format!("{url}{path}"))
            .bearer_auth(token)
            .send()
            .await
            .expect("the API answers");
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or_default())
    })
}

#[test]
fn devices_import_registers_a_csv_and_a_jsonl_through_a_running_gateway() {
    let dir = tempfile::tempdir().expect("tmp");
    let token = "cli-import-test-token-0123456789";
    let (gw, url) = RunningGateway::start(dir.path(), token);

    let help = text(&iotgw(&["devices", "import", "--help"], dir.path()).stdout);
    for needle in [
        "msdyn_deviceid,msdyn_name",
        "tag.KEY",
        ".jsonl",
        "\"msdyn_deviceid\": \"pump-001\"",
        "64",
    ] {
        assert!(
            help.contains(needle),
            "devices import --help lacks {needle}:\n{help}"
        );
    }

    std::fs::write(
        dir.path().join("fleet.csv"),
        "msdyn_deviceid,msdyn_name,msdyn_category,tag.site\n\
         pump-001,Pump 1,chiller,north\n\
         pump-002,,chiller,\"south, east\"\n\
         pump-003,Pump 3,,\n\
         pump-004,,meter,north\n\
         pump-005,,,\n",
    )
    .expect("write csv");
    // URL and token come from the config, as for `iotgw run`; three batches of at most 2.
    let out = import(
        dir.path(),
        &["--config", "gw.toml", "--batch-size", "2", "fleet.csv"],
    );
    let stdout = text(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}{}\n{}",
        text(&out.stderr),
        gw.log_text()
    );
    assert!(
        stdout.contains("5 device(s) sent in 3 batch(es)"),
        "{stdout}"
    );
    assert!(stdout.contains("registered                  5"), "{stdout}");
    let (status, d) = get(&url, token, "/api/v1/devices/pump-002");
    assert_eq!(status, 200, "{d}");
    assert_eq!(d["msdyn_registrationstatus"], 192350003);
    assert_eq!(d["msdyn_category"], "chiller");
    assert_eq!(d["msdyn_tags"]["site"], "south, east");
    assert_eq!(
        d["msdyn_name"], "pump-002",
        "an empty name defaults to the id"
    );

    // The same file again: nothing new, nothing failed.
    let out = import(dir.path(), &["--config", "gw.toml", "fleet.csv"]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}{}", text(&out.stderr));
    assert!(stdout.contains("already registered          5"), "{stdout}");

    // A JSON Lines file with one bad line: reported with its line and the fix, nothing sent.
    std::fs::write(
        dir.path().join("more.jsonl"),
        "{\"msdyn_deviceid\": \"valve-001\", \"msdyn_tags\": {\"site\": \"north\"}}\n\
         {\"msdyn_deviceid\": \"valve-002\"}\n\
         {\"msdyn_deviceid\": \"valve-003\", \"msdyn_colour\": \"red\"}\n\
         {\"msdyn_deviceid\": \"valve-004\", \"msdyn_iotproviderinstance\": \"nowhere\"}\n",
    )
    .expect("write jsonl");
    let out = import(dir.path(), &["--url", &url, "--token", token, "more.jsonl"]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{}{stderr}", text(&out.stdout));
    assert!(
        stderr.contains("line 3") && stderr.contains("msdyn_colour") && stderr.contains("fix:"),
        "{stderr}"
    );
    assert!(stderr.contains("nothing was imported"), "{stderr}");
    assert_eq!(get(&url, token, "/api/v1/devices/valve-001").0, 404);

    // Fixed, the file imports; the device the gateway cannot route is a failure with its
    // reason and line, and the exit code says so.
    let fixed = std::fs::read_to_string(dir.path().join("more.jsonl"))
        .expect("read")
        .replace(", \"msdyn_colour\": \"red\"", "");
    std::fs::write(dir.path().join("more.jsonl"), fixed).expect("write");
    let out = import(dir.path(), &["--url", &url, "--token", token, "more.jsonl"]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}{}", text(&out.stderr));
    assert!(stdout.contains("registered                  3"), "{stdout}");
    assert!(stdout.contains("failed                      1"), "{stdout}");
    assert!(
        stdout.contains(
            "1 × invalid msdyn_iotproviderinstance: provider instance `nowhere` is not configured"
        ) && stdout.contains("line 4: valve-004"),
        "{stdout}"
    );
    assert_eq!(get(&url, token, "/api/v1/devices/valve-001").0, 200);

    // Without the token the gateway refuses, and the importer says what to do.
    let out = import(dir.path(), &["--url", &url, "fleet.csv"]);
    assert_eq!(out.status.code(), Some(1));
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("refused the token") && stdout.contains("--token"),
        "{stdout}"
    );
    drop(gw);
}

/// The API fuzzed from its OpenAPI document (`docs/openapi.yaml`) by schemathesis, from
/// PyPI, installed under `target/` by `scripts/install-api-fuzz-deps.sh` (which
/// `scripts/test.sh` runs): generated and mutated requests for every operation, schema
/// coverage, and stateful sequences, against the real binary with a token. Every
/// schemathesis check runs (no 5xx, responses as documented, invalid input refused, no
/// route that ignores the token...) but `positive_data_acceptance`: what the API accepts
/// also depends on its running state (the configured instance names, the cursors earlier
/// pages gave out), which a static document cannot express. Plus iotgw's own check
/// (`scripts/api-fuzz/iotgw_checks.py`): every 4xx is the API's JSON error, and every 400
/// names the field.
#[test]
fn schemathesis_fuzzing_from_the_openapi_document_finds_no_5xx_and_every_400_names_the_field() {
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let schemathesis = repo.join("target/api-fuzz-venv/bin/schemathesis");
    if !schemathesis.exists() {
        let why = format!(
            "{} is missing: run `bash scripts/install-api-fuzz-deps.sh` (scripts/test.sh does)",
            schemathesis.display()
        );
        assert!(std::env::var("CI").as_deref() != Ok("true"), "{why}");
        eprintln!("SKIPPED: {why}");
        return;
    }
    let dir = tempfile::tempdir().expect("tmp");
    let token = "api-fuzz-token-0123456789";
    let (gw, url) = RunningGateway::start(dir.path(), token);
    let out = Command::new(&schemathesis)
        .arg("run")
        .arg(repo.join("docs/openapi.yaml"))
        .args(["--url", &url])
        .args(["--header", &format!("Authorization: Bearer {token}")])
        .args(["--exclude-checks", "positive_data_acceptance"])
        .args(["--max-examples", "30", "--workers", "2"])
        .args(["--request-timeout", "30"])
        .env("PYTHONPATH", repo.join("scripts/api-fuzz"))
        .env("SCHEMATHESIS_HOOKS", "iotgw_checks")
        .env("NO_COLOR", "1")
        .current_dir(dir.path())
        .output()
        .expect("schemathesis runs");
    let report = text(&out.stdout);
    let summary = report
        .rfind("SUMMARY")
        .map_or(report.as_str(), |i| &report[i..]);
    eprintln!("{summary}");
    assert!(
        out.status.success(),
        "schemathesis found problems:\n{report}\n{}\n--- gateway log ---\n{}",
        text(&out.stderr),
        gw.log_text()
    );
}
