//! The `iotgw` binary as a user meets it: help, config checks, exit codes, redaction.

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
