//! iotgw deployed as a sidecar (`deploy/`), checked for real.
//!
//! - [`sidecar_pair_registers_over_localhost_delivers_alerts_and_drains_on_docker_stop`]
//!   packages the binary cargo built for this test run with `deploy/Dockerfile.prebuilt`
//!   and starts what `deploy/compose/docker-compose.yml` describes, with the docker CLI:
//!   Mosquitto, iotgw (with the compose example's `gateway.toml`), the example app in
//!   iotgw's network namespace (`--network container:`, compose's `network_mode:
//!   service:`) and a device container. The app registers devices over localhost, the
//!   device publishes telemetry, the alert reaches the app's webhook on localhost, and
//!   `docker stop` makes iotgw drain its outbox and exit 0 within the grace period.
//! - The other tests check the compose file, the Kubernetes manifests (wiring, and the
//!   Kubernetes schemas through `deploy/k8s/validate.sh`) and their gateway configs, and the
//!   same for the scale-out examples: `deploy/compose/replicas.yml` (three replicas on
//!   PostgreSQL) and `deploy/k8s/replicas` (a StatefulSet of three with a
//!   PodDisruptionBudget).
//!
//! Docker missing: the test fails under `CI=true`, elsewhere it prints `SKIPPED: ...`.

use std::collections::{BTreeMap, BTreeSet};
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use iotgw_testkit::mosquitto::{Mosquitto, MosquittoSpec};
use serde_json::Value;
use yaml_rust2::{Yaml, YamlLoader};

/// Longest wait for any one condition.
const DEADLINE: Duration = Duration::from_secs(45);
/// `shutdown.grace_secs` given to the containerised gateway.
const GRACE_SECS: u64 = 8;
/// How long the example app takes to answer each alert (keeps the outbox busy at stop time).
const WEBHOOK_DELAY_MS: u64 = 600;
/// The API token and webhook secret of the test pair.
const API_TOKEN: &str = "sidecar-test-token-0123456789";
const WEBHOOK_SECRET: &str = "sidecar-test-webhook-secret";

const MOSQUITTO_IMAGE: &str = "eclipse-mosquitto:2";
const DEBIAN_IMAGE: &str = "debian:bookworm-slim";
const DISTROLESS_IMAGE: &str = "gcr.io/distroless/cc-debian12:nonroot";

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the gateway crate sits in the workspace root")
        .to_path_buf()
}

fn on_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// Fails under CI, prints a skip line elsewhere.
fn skip(why: &str) {
    assert!(!on_ci(), "{why} (CI=true: this test must run)");
    eprintln!("SKIPPED: {why}");
}

fn output(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

/// `docker ARGS`: stdout on success, stderr (with stdout) on failure.
fn docker(args: &[&str]) -> Result<String, String> {
    let out = output(Command::new("docker").args(args));
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(format!(
            "`docker {}` failed ({}): {}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim()
        ))
    }
}

fn docker_ok(args: &[&str]) -> String {
    docker(args).unwrap_or_else(|e| panic!("{e}"))
}

fn docker_reachable() -> Result<(), String> {
    match Command::new("docker")
        .args(["info", "--format", "{{.ServerVersion}}"])
        .stdin(Stdio::null())
        .output()
    {
        Err(e) => Err(format!("the docker CLI cannot run ({e})")),
        Ok(o) if !o.status.success() => Err(format!(
            "the Docker engine is unreachable: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Ok(_) => Ok(()),
    }
}

/// Polls `f` every 200 ms until it returns Some, panicking after `deadline`.
fn wait_for<T>(what: &str, deadline: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let end = Instant::now() + deadline;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < end,
            "timed out after {deadline:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Makes `image` available: present, pulled from its registry, or built by the repository's
/// local image script (machines without a registry).
fn ensure_image(image: &str, local_build: &[(&str, &str)]) -> Result<(), String> {
    if docker(&["image", "inspect", "--format", "{{.Id}}", image]).is_ok() {
        return Ok(());
    }
    if docker(&["pull", "--quiet", image]).is_ok() {
        return Ok(());
    }
    let root = repo_root();
    for (script, selection) in local_build {
        eprintln!("{image} is missing and cannot be pulled: building it with {script}");
        let status = Command::new("bash")
            .arg(root.join(script))
            .env("IOTGW_IMAGES", selection)
            .stdin(Stdio::null())
            .status()
            .map_err(|e| format!("cannot run {script}: {e}"))?;
        if !status.success() {
            return Err(format!("{script} failed ({status}) building {image}"));
        }
    }
    docker(&["image", "inspect", "--format", "{{.Id}}", image])
        .map(|_| ())
        .map_err(|_| format!("{image} is missing, cannot be pulled and was not built locally"))
}

/// Runs `docker build` of `context` (tagged `tag`), on the default build network first and
/// on the host network when apt cannot get out of the default one.
fn docker_build(tag: &str, context: &Path, extra: &[&str]) -> Result<(), String> {
    let ctx = context.display().to_string();
    let networks: Vec<String> = match std::env::var("IOTGW_BUILD_NETWORK") {
        Ok(n) if !n.is_empty() => vec![n],
        _ => vec!["default".into(), "host".into()],
    };
    let mut last = String::new();
    for net in &networks {
        let mut args = vec!["build", "--quiet", "--network", net.as_str(), "-t", tag];
        args.extend_from_slice(extra);
        args.push(&ctx);
        match docker(&args) {
            Ok(_) => return Ok(()),
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// Containers, networks and images of one test run, removed on drop (also when the test
/// fails; then the containers' last log lines are printed first).
#[derive(Default)]
struct Cleanup {
    containers: Vec<String>,
    /// Containers removed by their own handle, whose logs are printed on a failure too.
    logged: Vec<String>,
    networks: Vec<String>,
    images: Vec<String>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for c in self.logged.iter().chain(&self.containers) {
                if let Ok(o) = Command::new("docker")
                    .args(["logs", "--tail", "60", c])
                    .output()
                {
                    eprintln!(
                        "--- last logs of {c} ---\n{}{}",
                        String::from_utf8_lossy(&o.stdout),
                        String::from_utf8_lossy(&o.stderr)
                    );
                }
            }
        }
        for c in self.containers.iter().rev() {
            let _ = docker(&["rm", "--force", "--volumes", c]);
        }
        for n in &self.networks {
            let _ = docker(&["network", "rm", n]);
        }
        for i in &self.images {
            let _ = docker(&["rmi", "--force", i]);
        }
        // The legacy builder keeps Dockerfile.prebuilt's prep stage as an untagged image.
        let _ = docker(&[
            "image",
            "prune",
            "--force",
            "--filter",
            "label=org.iotgw.image.stage=prep",
        ]);
    }
}

/// A name unique to this run.
fn unique(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default();
    format!("{prefix}-{}-{nanos:x}", std::process::id())
}

/// Builds the iotgw image around the binary cargo built for this test (stripped copy).
fn build_gateway_image(tag: &str) -> Result<(), String> {
    let ctx = tempfile::tempdir().map_err(|e| format!("temp dir: {e}"))?;
    let binary = ctx.path().join("iotgw");
    std::fs::copy(env!("CARGO_BIN_EXE_iotgw"), &binary)
        .map_err(|e| format!("copying the iotgw binary: {e}"))?;
    // Debug builds carry debug info; strip a copy when binutils are there (smaller context).
    if let Err(e) = Command::new("strip").arg(&binary).status() {
        eprintln!("note: strip is not available ({e}); packaging the unstripped binary");
    }
    std::fs::copy(
        repo_root().join("deploy/Dockerfile.prebuilt"),
        ctx.path().join("Dockerfile"),
    )
    .map_err(|e| format!("copying deploy/Dockerfile.prebuilt: {e}"))?;
    docker_build(tag, ctx.path(), &[])
}

/// Builds (once per content) the example app of deploy/sidecar-test/app.
fn build_app_image() -> Result<String, String> {
    let dir = repo_root().join("deploy/sidecar-test/app");
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    for f in ["Dockerfile", "app.py"] {
        std::fs::read(dir.join(f))
            .map_err(|e| format!("reading deploy/sidecar-test/app/{f}: {e}"))?
            .hash(&mut hasher);
    }
    let tag = format!("iotgw-example-app:sidecar-test-{:016x}", hasher.finish());
    if docker(&["image", "inspect", "--format", "{{.Id}}", &tag]).is_err() {
        docker_build(&tag, &dir, &[])?;
    }
    Ok(tag)
}

/// The JSON lines an app container printed on stdout.
fn app_events(container: &str) -> Vec<Value> {
    let out = output(Command::new("docker").args(["logs", container]));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .collect()
}

fn events_of<'a>(events: &'a [Value], kind: &str) -> Vec<&'a Value> {
    events.iter().filter(|e| e["event"] == kind).collect()
}

/// `docker logs` of a container, stdout and stderr together.
fn logs(container: &str) -> String {
    let out = output(Command::new("docker").args(["logs", container]));
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn running(container: &str) -> bool {
    docker(&["inspect", "--format", "{{.State.Running}}", container]).is_ok_and(|s| s == "true")
}

/// Publishes readings as a device would, from its own container on the pair's network.
fn publish_from_device(cleanup: &mut Cleanup, name: &str, network: &str, readings: &[(&str, f64)]) {
    let script = readings
        .iter()
        .enumerate()
        .map(|(i, (device, t))| {
            format!(
                "mosquitto_pub -h mosquitto -q 1 -t devices/{device}/telemetry \
                 -m '{{\"temperature\": {t}, \"message_id\": \"{name}-{i}\"}}'"
            )
        })
        .collect::<Vec<_>>()
        .join(" && ");
    cleanup.containers.push(name.into());
    docker_ok(&[
        "run",
        "--detach",
        "--name",
        name,
        "--network",
        network,
        MOSQUITTO_IMAGE,
        "sh",
        "-c",
        &script,
    ]);
    wait_for(
        &format!("device container {name} to publish"),
        DEADLINE,
        || (!running(name)).then_some(()),
    );
    let code = docker_ok(&["inspect", "--format", "{{.State.ExitCode}}", name]);
    assert_eq!(code, "0", "mosquitto_pub in {name} failed:\n{}", logs(name));
}

#[test]
fn sidecar_pair_registers_over_localhost_delivers_alerts_and_drains_on_docker_stop() {
    if let Err(why) = docker_reachable() {
        skip(&format!("{why}; the sidecar test needs Docker"));
        return;
    }
    if iotgw_testkit::require_docker("the sidecar test").is_err() {
        return;
    }
    for (image, builds) in [
        (
            DEBIAN_IMAGE,
            &[("deploy/images/build-local-images.sh", "base")][..],
        ),
        (
            MOSQUITTO_IMAGE,
            &[("deploy/images/build-local-images.sh", "mosquitto")][..],
        ),
        (
            DISTROLESS_IMAGE,
            &[("deploy/images/build-distroless-cc.sh", "")][..],
        ),
    ] {
        if let Err(e) = ensure_image(image, builds) {
            panic!("{e}");
        }
    }
    let root = repo_root();
    let id = unique("iotgw-sidecar");
    // Declared before `cleanup`, so it outlives it: on a failure its log is printed first.
    let _broker: Mosquitto;
    let mut cleanup = Cleanup::default();

    // The image, around this test run's binary.
    let gw_image = format!(
        "iotgw-sidecar-test:{}",
        id.trim_start_matches("iotgw-sidecar-")
    );
    cleanup.images.push(gw_image.clone());
    if let Err(e) = build_gateway_image(&gw_image) {
        panic!("building the iotgw image with deploy/Dockerfile.prebuilt: {e}");
    }
    assert_eq!(
        docker_ok(&[
            "image",
            "inspect",
            "--format",
            "{{.Config.User}}",
            &gw_image
        ]),
        "65532:65532",
        "the image must run as the non-root uid 65532"
    );
    let app_image = build_app_image()
        .unwrap_or_else(|e| panic!("building the example app (deploy/sidecar-test/app): {e}"));

    let network = format!("{id}-net");
    docker_ok(&["network", "create", &network]);
    cleanup.networks.push(network.clone());

    // Mosquitto with the compose example's config, named `mosquitto` on the network as in
    // the compose file (the one Mosquitto starter of the workspace, iotgw_testkit's).
    let conf = std::fs::read_to_string(root.join("deploy/compose/mosquitto.conf"))
        .expect("deploy/compose/mosquitto.conf");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime for the broker's start");
    let mosquitto = rt
        .block_on(Mosquitto::dedicated(MosquittoSpec {
            config: Some(conf),
            ..MosquittoSpec::default()
        }))
        .unwrap_or_else(|e| panic!("Mosquitto with deploy/compose/mosquitto.conf: {e:#}"));
    rt.block_on(mosquitto.container().connect_network(&network, "mosquitto"))
        .unwrap_or_else(|e| panic!("{e:#}"));
    cleanup.logged.push(mosquitto.container().id().to_owned());
    _broker = mosquitto;

    // iotgw with the compose example's gateway.toml, copied in like a mounted file.
    let gateway = format!("{id}-iotgw");
    cleanup.containers.push(gateway.clone());
    let grace_env = format!("IOTGW_SHUTDOWN__GRACE_SECS={GRACE_SECS}");
    let token_env = format!("IOTGW_API__TOKEN={API_TOKEN}");
    let secret_env = format!("IOTGW_SINKS__APP__SECRET={WEBHOOK_SECRET}");
    docker_ok(&[
        "create",
        "--name",
        &gateway,
        "--network",
        &network,
        "--env",
        "IOTGW_CONFIG=/etc/iotgw/gateway.toml",
        "--env",
        &token_env,
        "--env",
        &secret_env,
        "--env",
        &grace_env,
        // The image's HEALTHCHECK command, checked every second instead of every 10 s.
        "--health-interval",
        "1s",
        &gw_image,
    ]);
    let config_dir = tempfile::tempdir().expect("temp dir");
    std::fs::create_dir(config_dir.path().join("iotgw")).expect("config dir");
    std::fs::copy(
        root.join("deploy/compose/gateway.toml"),
        config_dir.path().join("iotgw/gateway.toml"),
    )
    .expect("deploy/compose/gateway.toml copied");
    let src = config_dir.path().join("iotgw").display().to_string();
    docker_ok(&["cp", &src, &format!("{gateway}:/etc/")]);
    let started = Instant::now();
    docker_ok(&["start", &gateway]);

    // The app in iotgw's network namespace: it waits for /ready, registers over localhost.
    let devices = ["pump-1", "pump-2", "pump-3", "pump-4", "pump-5", "pump-6"];
    let app = format!("{id}-app");
    cleanup.containers.push(app.clone());
    let app_net = format!("container:{gateway}");
    let devices_env = format!("DEVICES={}", devices.join(","));
    let delay_env = format!("WEBHOOK_DELAY_MS={WEBHOOK_DELAY_MS}");
    let app_token_env = format!("IOTGW_API_TOKEN={API_TOKEN}");
    let app_secret_env = format!("WEBHOOK_SECRET={WEBHOOK_SECRET}");
    docker_ok(&[
        "run",
        "--detach",
        "--name",
        &app,
        "--network",
        &app_net,
        "--env",
        &app_token_env,
        "--env",
        &app_secret_env,
        "--env",
        &devices_env,
        "--env",
        &delay_env,
        &app_image,
    ]);
    let registered = wait_for(
        "the app to register its devices over localhost",
        DEADLINE,
        || {
            assert!(running(&gateway), "iotgw exited:\n{}", logs(&gateway));
            assert!(running(&app), "the app exited:\n{}", logs(&app));
            let ev = app_events(&app);
            assert!(
                events_of(&ev, "register_failed").is_empty()
                    && events_of(&ev, "not_ready").is_empty(),
                "the app could not use the API: {ev:?}"
            );
            let done: BTreeSet<String> = events_of(&ev, "registered")
                .iter()
                .filter_map(|e| e["device"].as_str().map(str::to_string))
                .collect();
            (done.len() == devices.len()).then_some(done)
        },
    );
    eprintln!(
        "iotgw ready and {} devices registered {:?} after docker start",
        registered.len(),
        started.elapsed()
    );
    wait_for(
        "the image's HEALTHCHECK to report healthy",
        DEADLINE,
        || {
            let s = docker_ok(&["inspect", "--format", "{{.State.Health.Status}}", &gateway]);
            assert_ne!(
                s,
                "unhealthy",
                "HEALTHCHECK failed:\n{}",
                docker_ok(&["inspect", "--format", "{{json .State.Health}}", &gateway])
            );
            (s == "healthy").then_some(())
        },
    );

    // A device publishes: one reading over the rule, one under it.
    publish_from_device(
        &mut cleanup,
        &format!("{id}-device-1"),
        &network,
        &[("pump-1", 80.5), ("pump-1", 21.0)],
    );
    let first = wait_for("the alert on the app's webhook", DEADLINE, || {
        events_of(&app_events(&app), "alert")
            .first()
            .map(|e| (*e).clone())
    });
    assert_eq!(first["device"], "pump-1", "{first}");
    assert_eq!(first["signature_ok"], true, "webhook signature: {first}");

    // Five more alerts; stop iotgw as soon as it has recorded them, while the slow webhook
    // still has most of them ahead in the outbox.
    let burst: Vec<(&str, f64)> = devices[1..].iter().map(|d| (*d, 90.0)).collect();
    publish_from_device(&mut cleanup, &format!("{id}-device-2"), &network, &burst);
    wait_for("iotgw to record the burst's alerts", DEADLINE, || {
        let out = docker(&[
            "exec",
            &app,
            "python3",
            "/app/app.py",
            "api",
            "GET",
            "/api/v1/alerts?limit=100",
        ])
        .ok()?;
        let v: Value = serde_json::from_str(&out).ok()?;
        let n = v["body"]["items"].as_array().map_or(0, Vec::len);
        (n >= devices.len()).then_some(())
    });
    let delivered_before_stop = events_of(&app_events(&app), "alert").len();

    let stop_started = Instant::now();
    docker_ok(&["stop", "--time", &(GRACE_SECS + 10).to_string(), &gateway]);
    let stop_took = stop_started.elapsed();
    let exit_code = docker_ok(&["inspect", "--format", "{{.State.ExitCode}}", &gateway]);
    let gw_logs = logs(&gateway);
    assert_eq!(
        exit_code, "0",
        "iotgw exit code after docker stop:\n{gw_logs}"
    );
    assert!(
        stop_took < Duration::from_secs(GRACE_SECS + 3),
        "docker stop took {stop_took:?}, beyond the {GRACE_SECS} s grace:\n{gw_logs}"
    );
    assert!(gw_logs.contains("SIGTERM received"), "{gw_logs}");
    assert!(
        gw_logs.contains("stopped; outbox drained"),
        "iotgw stopped with undelivered alerts:\n{gw_logs}"
    );
    let alerts = app_events(&app);
    let delivered: BTreeSet<&str> = events_of(&alerts, "alert")
        .iter()
        .filter_map(|e| e["device"].as_str())
        .collect();
    for d in devices {
        assert!(
            delivered.contains(d),
            "no alert for {d} reached the app: {alerts:?}"
        );
    }
    eprintln!(
        "docker stop: exit 0 after {stop_took:?}; {} of {} alerts were in the outbox at SIGTERM \
         and were delivered during the drain",
        devices.len().saturating_sub(delivered_before_stop),
        devices.len()
    );
}

// --- offline checks of the compose example and the Kubernetes manifests ----------------

/// `docker-compose config` accepts the file (where docker-compose is installed; elsewhere
/// the file was checked by parsing only).
fn assert_compose_accepts(file: &Path) {
    match Command::new("docker-compose")
        .args(["-f"])
        .arg(file)
        .args(["config", "--quiet"])
        .output()
    {
        Ok(o) => assert!(
            o.status.success(),
            "docker-compose config rejects {}: {}",
            file.display(),
            String::from_utf8_lossy(&o.stderr)
        ),
        Err(e) => eprintln!("note: docker-compose not installed ({e}); checked by parsing only"),
    }
}

fn yaml_file(path: &Path) -> Vec<Yaml> {
    let text =
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    YamlLoader::load_from_str(&text)
        .unwrap_or_else(|e| panic!("{} is not YAML: {e}", path.display()))
}

fn toml_file(path: &Path) -> toml::Value {
    let text =
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    text.parse()
        .unwrap_or_else(|e| panic!("{} is not TOML: {e}", path.display()))
}

fn str_list(y: &Yaml) -> Vec<String> {
    y.as_vec()
        .map(|v| {
            v.iter()
                .filter_map(|s| s.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

fn grace_secs_of(config: &toml::Value) -> i64 {
    config["shutdown"]["grace_secs"]
        .as_integer()
        .expect("shutdown.grace_secs is set")
}

/// Runs `iotgw check-config FILE` with exactly `env` as the IOTGW_* environment.
fn check_config(file: &Path, env: &[(&str, &str)]) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_iotgw"));
    cmd.arg("check-config").arg(file);
    for (k, _) in std::env::vars() {
        if k.starts_with("IOTGW_") {
            cmd.env_remove(k);
        }
    }
    cmd.envs(env.iter().copied());
    let out = output(&mut cmd);
    assert!(
        out.status.success(),
        "{} is not a valid gateway config:\n{}{}",
        file.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs `deploy/k8s/validate.sh DIR`: the manifests rendered and checked strictly against
/// the Kubernetes schemas. Skips (fails under CI) when the validator cannot be installed.
fn validate_manifests(dir: &Path) {
    let script = repo_root().join("deploy/k8s/validate.sh");
    let out = output(Command::new("bash").arg(&script).arg(dir));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    match out.status.code() {
        Some(0) => eprintln!("{text}"),
        Some(3) => skip(&format!("kubernetes-validate cannot be installed: {text}")),
        _ => panic!(
            "deploy/k8s/validate.sh {}: the manifests are not valid Kubernetes objects:\n{text}",
            dir.display()
        ),
    }
}

#[test]
fn compose_example_runs_the_app_in_the_gateways_network_namespace_and_outwaits_the_drain() {
    let dir = repo_root().join("deploy/compose");
    let file = dir.join("docker-compose.yml");
    let doc = &yaml_file(&file)[0];
    let services = &doc["services"];
    for s in ["mosquitto", "iotgw", "app", "device"] {
        assert!(
            !services[s].is_badvalue(),
            "service {s} missing in {}",
            file.display()
        );
    }
    assert_eq!(
        services["app"]["network_mode"].as_str(),
        Some("service:iotgw")
    );
    assert_eq!(
        services["iotgw"]["environment"]["IOTGW_CONFIG"].as_str(),
        Some("/etc/iotgw/gateway.toml")
    );
    assert!(
        str_list(&services["iotgw"]["volumes"])
            .iter()
            .any(|v| v.starts_with("./gateway.toml:/etc/iotgw/gateway.toml")),
        "gateway.toml is not mounted where IOTGW_CONFIG points"
    );
    let health = str_list(&services["iotgw"]["healthcheck"]["test"]).join(" ");
    assert!(
        health.contains("healthcheck") && health.contains("/ready"),
        "{health}"
    );
    let grace = grace_secs_of(&toml_file(&dir.join("gateway.toml")));
    let stop: i64 = services["iotgw"]["stop_grace_period"]
        .as_str()
        .and_then(|s| s.strip_suffix('s'))
        .and_then(|s| s.parse().ok())
        .expect("iotgw has stop_grace_period in seconds");
    assert!(
        stop > grace,
        "stop_grace_period {stop}s must exceed shutdown.grace_secs {grace}"
    );

    assert_compose_accepts(&file);
}

#[test]
fn example_gateway_configs_of_compose_and_kubernetes_pass_check_config() {
    let root = repo_root();
    check_config(
        &root.join("deploy/compose/gateway.toml"),
        &[
            ("IOTGW_API__TOKEN", API_TOKEN),
            ("IOTGW_SINKS__APP__SECRET", WEBHOOK_SECRET),
        ],
    );
    // The Kubernetes config with the values of the example Secret, wired as the
    // Deployment wires them.
    let secret = &yaml_file(&root.join("deploy/k8s/base/secret.yaml"))[0];
    let value = |k: &str| {
        secret["stringData"][k]
            .as_str()
            .unwrap_or_else(|| panic!("secret.yaml has no stringData.{k}"))
            .to_string()
    };
    let (token, hook) = (value("api-token"), value("webhook-secret"));
    check_config(
        &root.join("deploy/k8s/base/gateway.toml"),
        &[
            ("IOTGW_API__TOKEN", &token),
            ("IOTGW_SINKS__APP__SECRET", &hook),
        ],
    );
}

#[test]
fn kubernetes_manifests_wire_probes_resources_grace_config_and_secrets() {
    let base = repo_root().join("deploy/k8s/base");
    let kustomization = &yaml_file(&base.join("kustomization.yaml"))[0];
    let mut objects = Vec::new();
    for res in str_list(&kustomization["resources"]) {
        objects.extend(yaml_file(&base.join(&res)));
    }
    let by_kind = |kind: &str| -> Vec<&Yaml> {
        objects
            .iter()
            .filter(|o| o["kind"].as_str() == Some(kind))
            .collect()
    };

    // ConfigMaps come from the generator; Secrets and PVCs from the resources.
    let generated: BTreeMap<String, Vec<String>> = kustomization["configMapGenerator"]
        .as_vec()
        .expect("a configMapGenerator")
        .iter()
        .map(|g| {
            (
                g["name"].as_str().expect("generator name").to_string(),
                str_list(&g["files"]),
            )
        })
        .collect();
    let secrets: BTreeMap<String, BTreeSet<String>> = by_kind("Secret")
        .iter()
        .map(|s| {
            let keys = ["stringData", "data"]
                .iter()
                .filter_map(|f| s[*f].as_hash())
                .flat_map(|h| h.keys().filter_map(|k| k.as_str().map(str::to_string)))
                .collect();
            (
                s["metadata"]["name"]
                    .as_str()
                    .expect("secret name")
                    .to_string(),
                keys,
            )
        })
        .collect();
    let claims: BTreeSet<&str> = by_kind("PersistentVolumeClaim")
        .iter()
        .filter_map(|p| p["metadata"]["name"].as_str())
        .collect();

    let deployments = by_kind("Deployment");
    assert_eq!(deployments.len(), 1, "one Deployment");
    let pod = &deployments[0]["spec"]["template"]["spec"];
    let containers = pod["containers"].as_vec().expect("containers");
    let find = |name: &str| {
        containers
            .iter()
            .find(|c| c["name"].as_str() == Some(name))
            .unwrap_or_else(|| panic!("no container {name}"))
    };
    let (gw, app) = (find("iotgw"), find("app"));
    assert_eq!(pod["securityContext"]["runAsNonRoot"].as_bool(), Some(true));
    assert_eq!(gw["securityContext"]["runAsUser"].as_i64(), Some(65532));

    // Probes: liveness on /live, readiness on /ready, through `iotgw healthcheck`.
    for (probe, path) in [
        ("livenessProbe", "/live"),
        ("readinessProbe", "/ready"),
        ("startupProbe", "/live"),
    ] {
        let cmd = str_list(&gw[probe]["exec"]["command"]).join(" ");
        assert!(
            cmd.contains("healthcheck") && cmd.contains(&format!("--path {path}")),
            "{probe} should run `iotgw healthcheck --path {path}`, runs `{cmd}`"
        );
    }
    // Requests and limits on both containers.
    for c in [gw, app] {
        for kind in ["requests", "limits"] {
            for res in ["cpu", "memory"] {
                assert!(
                    c["resources"][kind][res].as_str().is_some(),
                    "container {:?} lacks resources.{kind}.{res}",
                    c["name"]
                );
            }
        }
    }

    // Config: the ConfigMap volume is mounted where IOTGW_CONFIG points.
    let env: BTreeMap<&str, &Yaml> = gw["env"]
        .as_vec()
        .expect("iotgw env")
        .iter()
        .map(|e| (e["name"].as_str().expect("env name"), e))
        .collect();
    let config_path = env["IOTGW_CONFIG"]["value"]
        .as_str()
        .expect("IOTGW_CONFIG value");
    let volumes = pod["volumes"].as_vec().expect("volumes");
    let volume = |name: &str| {
        volumes
            .iter()
            .find(|v| v["name"].as_str() == Some(name))
            .unwrap_or_else(|| panic!("no volume {name}"))
    };
    let mount = |c: &Yaml, path: &str| -> String {
        c["volumeMounts"]
            .as_vec()
            .expect("volumeMounts")
            .iter()
            .find(|m| m["mountPath"].as_str().is_some_and(|p| path.starts_with(p)))
            .and_then(|m| m["name"].as_str())
            .unwrap_or_else(|| panic!("nothing mounted at {path}"))
            .to_string()
    };
    let config_volume = volume(&mount(gw, config_path));
    let map = config_volume["configMap"]["name"]
        .as_str()
        .expect("a configMap volume");
    let file = Path::new(config_path)
        .file_name()
        .and_then(|f| f.to_str())
        .expect("a file name");
    assert!(
        generated
            .get(map)
            .is_some_and(|files| files.iter().any(|f| f == file)),
        "ConfigMap {map} does not carry {file} (generators: {generated:?})"
    );
    let config = toml_file(&base.join(file));

    // Store: store.path lies on the PersistentVolumeClaim's mount.
    let store_path = config["store"]["path"].as_str().expect("store.path");
    let data_volume = volume(&mount(gw, store_path));
    let claim = data_volume["persistentVolumeClaim"]["claimName"]
        .as_str()
        .expect("the store is on a PersistentVolumeClaim");
    assert!(claims.contains(claim), "no PersistentVolumeClaim {claim}");

    // Sidecar: the API stays on loopback.
    let listen = config["api"]["listen"].as_str().expect("api.listen");
    assert!(
        listen.starts_with("127.0.0.1:"),
        "api.listen {listen} leaves the pod"
    );

    // Secrets: every secretKeyRef exists; token and webhook secret come from one.
    for c in [gw, app] {
        for e in c["env"].as_vec().into_iter().flatten() {
            let r = &e["valueFrom"]["secretKeyRef"];
            if r.is_badvalue() {
                continue;
            }
            let (name, key) = (
                r["name"].as_str().expect("name"),
                r["key"].as_str().expect("key"),
            );
            assert!(
                secrets.get(name).is_some_and(|keys| keys.contains(key)),
                "{:?} refers to {name}/{key}, which no Secret holds",
                e["name"]
            );
        }
    }
    for var in ["IOTGW_API__TOKEN", "IOTGW_SINKS__APP__SECRET"] {
        assert!(
            !env[var]["valueFrom"]["secretKeyRef"].is_badvalue(),
            "{var} must come from a Secret"
        );
    }

    // Termination: the drain and the app's preStop fit in the grace period.
    let grace = grace_secs_of(&config);
    let termination = pod["terminationGracePeriodSeconds"]
        .as_i64()
        .expect("terminationGracePeriodSeconds");
    let pre_stop = str_list(&app["lifecycle"]["preStop"]["exec"]["command"]);
    let pre_stop_secs: i64 = pre_stop
        .last()
        .and_then(|s| s.parse().ok())
        .expect("the app's preStop ends with its bound in seconds");
    assert!(
        pre_stop.iter().any(|a| a == "wait-gateway-stopped") && pre_stop_secs > grace,
        "the app's preStop must wait for iotgw's drain ({grace} s): {pre_stop:?}"
    );
    assert!(
        termination > pre_stop_secs && termination >= grace + 5,
        "terminationGracePeriodSeconds {termination} leaves no room for the drain \
         ({grace} s) and the preStop ({pre_stop_secs} s)"
    );
}

#[test]
fn kubernetes_manifests_validate_against_the_kubernetes_schemas() {
    validate_manifests(&repo_root().join("deploy/k8s/base"));
}

// --- offline checks of the scale-out examples: compose and Kubernetes replicas ----------

/// `y` with YAML merge keys (`<<: *anchor`) resolved as compose resolves them: the keys of
/// the merged mapping first, the node's own keys win. (yaml-rust2 substitutes aliases but
/// leaves `<<` as an ordinary key.)
fn merge_keys(y: &Yaml) -> Yaml {
    match y {
        Yaml::Hash(h) => {
            let mut out = yaml_rust2::yaml::Hash::new();
            let bases = match h.get(&Yaml::String("<<".into())) {
                Some(Yaml::Array(a)) => a.clone(),
                Some(b) => vec![b.clone()],
                None => Vec::new(),
            };
            for b in &bases {
                match merge_keys(b) {
                    Yaml::Hash(bh) => out.extend(bh),
                    other => panic!("`<<` merges a mapping, not {other:?}"),
                }
            }
            for (k, v) in h {
                if k.as_str() != Some("<<") {
                    out.insert(k.clone(), merge_keys(v));
                }
            }
            Yaml::Hash(out)
        }
        Yaml::Array(a) => Yaml::Array(a.iter().map(merge_keys).collect()),
        other => other.clone(),
    }
}

/// A compose value with each `${NAME:-default}` replaced by its default, as compose reads
/// it when NAME is not set. A `${NAME}` without a default is an error: the try-out must
/// run without an .env file.
fn compose_default(value: &str) -> String {
    let mut out = String::new();
    let mut rest = value;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let end = rest[start..]
            .find('}')
            .unwrap_or_else(|| panic!("unclosed ${{ in {value:?}"))
            + start;
        let (name, default) = rest[start + 2..end]
            .split_once(":-")
            .unwrap_or_else(|| panic!("{value:?} has a variable without a default"));
        assert!(!name.is_empty() && !default.is_empty(), "{value:?}");
        out.push_str(default);
        rest = &rest[end + 1..];
    }
    out.push_str(rest);
    out
}

/// The port of a `HOST:PORT` listen address.
fn port_of(listen: &str) -> i64 {
    listen
        .rsplit_once(':')
        .and_then(|(_, p)| p.parse().ok())
        .unwrap_or_else(|| panic!("{listen:?} has no port"))
}

/// `USER@HOST:PORT/DATABASE` of a `postgres://` URL without a password.
fn postgres_url_parts(url: &str) -> (String, String, String) {
    let rest = url
        .strip_prefix("postgres://")
        .unwrap_or_else(|| panic!("{url} is not a postgres:// URL"));
    let (user, rest) = rest
        .split_once('@')
        .unwrap_or_else(|| panic!("{url} names no user"));
    assert!(
        !user.contains(':'),
        "{url} carries a password; it belongs in IOTGW_STORE__POSTGRES__PASSWORD"
    );
    let (host_port, db) = rest
        .split_once('/')
        .unwrap_or_else(|| panic!("{url} names no database"));
    (user.into(), host_port.into(), db.into())
}

/// The seconds of a compose duration such as `15s`.
fn compose_secs(y: &Yaml, what: &str) -> i64 {
    y.as_str()
        .and_then(|s| s.strip_suffix('s'))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("{what} is not a duration in seconds: {y:?}"))
}

#[test]
fn scale_out_compose_runs_three_replicas_on_postgres_with_distinct_replica_ids_and_outwaits_the_drain(
) {
    let dir = repo_root().join("deploy/compose");
    let file = dir.join("replicas.yml");
    let doc = merge_keys(&yaml_file(&file)[0]);
    let services = doc["services"]
        .as_hash()
        .unwrap_or_else(|| panic!("{} has no services", file.display()));
    let service = |name: &str| -> &Yaml {
        services
            .get(&Yaml::String(name.into()))
            .unwrap_or_else(|| panic!("service {name} missing in {}", file.display()))
    };

    // PostgreSQL: user and database iotgw, the password from the environment, pg_isready,
    // a named volume.
    let pg = service("postgres");
    assert!(
        pg["image"]
            .as_str()
            .is_some_and(|i| i.starts_with("postgres:")),
        "{:?}",
        pg["image"]
    );
    let pg_env = |k: &str| {
        pg["environment"][k]
            .as_str()
            .unwrap_or_else(|| panic!("postgres has no {k}"))
            .to_string()
    };
    let pg_password = pg_env("POSTGRES_PASSWORD");
    assert!(
        pg_password.starts_with("${") && compose_default(&pg_password) != pg_password,
        "the database password comes from the environment, with a try-out default: {pg_password}"
    );
    let pg_health = str_list(&pg["healthcheck"]["test"]).join(" ");
    assert!(pg_health.contains("pg_isready"), "{pg_health}");
    let pg_volume = str_list(&pg["volumes"])
        .into_iter()
        .find(|v| v.ends_with(":/var/lib/postgresql/data"))
        .expect("the database lives on a volume");
    let volume_name = pg_volume.split(':').next().unwrap_or_default();
    assert!(
        doc["volumes"]
            .as_hash()
            .is_some_and(|v| v.contains_key(&Yaml::String(volume_name.into()))),
        "{volume_name} is not a named volume"
    );
    let mosquitto = service("mosquitto");
    assert!(
        str_list(&mosquitto["volumes"])
            .iter()
            .any(|v| v.starts_with("./mosquitto.conf:")),
        "mosquitto runs the example's mosquitto.conf"
    );
    assert!(!mosquitto["healthcheck"]["test"].is_badvalue());

    // The gateways: every service that runs the iotgw image.
    let gateways: BTreeMap<String, &Yaml> = services
        .iter()
        .filter(|(_, s)| !s["environment"]["IOTGW_CONFIG"].is_badvalue())
        .map(|(n, s)| (n.as_str().expect("service name").to_string(), s))
        .collect();
    assert_eq!(
        gateways.keys().map(String::as_str).collect::<Vec<_>>(),
        ["iotgw-1", "iotgw-2", "iotgw-3"],
        "three gateway replicas"
    );

    let config_file = dir.join("replicas.toml");
    let config = toml_file(&config_file);
    let grace = grace_secs_of(&config);
    let api_port = port_of(config["api"]["listen"].as_str().expect("api.listen"));
    let mut replica_ids = BTreeSet::new();
    let mut host_ports = BTreeSet::new();
    for (name, gw) in &gateways {
        let env = |k: &str| -> String {
            gw["environment"][k]
                .as_str()
                .unwrap_or_else(|| panic!("{name} has no {k}"))
                .to_string()
        };
        // One image, built as the sidecar example builds it, with the MQTT provider.
        let build = &gw["build"];
        let dockerfile = dir
            .join(build["context"].as_str().expect("build.context"))
            .join(build["dockerfile"].as_str().expect("build.dockerfile"));
        assert!(dockerfile.is_file(), "{name}: no {}", dockerfile.display());
        assert!(
            build["args"]["FEATURES"]
                .as_str()
                .is_some_and(|f| f.split_whitespace().any(|f| f == "mqtt")),
            "{name} is built with the mqtt provider"
        );
        assert_eq!(gw["image"].as_str(), Some("iotgw:local"), "{name}");

        // Its own replica id, also its host name.
        let id = env("IOTGW_REPLICA__ID");
        assert_eq!(
            gw["hostname"].as_str(),
            Some(id.as_str()),
            "{name}: host name and replica id"
        );
        assert!(
            replica_ids.insert(id.clone()),
            "{name} repeats replica id {id}"
        );

        // Started once PostgreSQL and the broker are healthy; healthy itself once ready.
        for dep in ["postgres", "mosquitto"] {
            assert_eq!(
                gw["depends_on"][dep]["condition"].as_str(),
                Some("service_healthy"),
                "{name} waits for {dep} to be healthy"
            );
        }
        let health = str_list(&gw["healthcheck"]["test"]).join(" ");
        assert!(
            health.contains("healthcheck") && health.contains("--path /ready"),
            "{name}: {health}"
        );
        let stop = compose_secs(&gw["stop_grace_period"], "stop_grace_period");
        assert!(
            stop > grace,
            "{name}: stop_grace_period {stop}s must exceed shutdown.grace_secs {grace}"
        );

        // The config where IOTGW_CONFIG points; secrets from the environment.
        let config_path = env("IOTGW_CONFIG");
        assert!(
            str_list(&gw["volumes"])
                .iter()
                .any(|v| v.starts_with(&format!("./replicas.toml:{config_path}"))),
            "{name}: replicas.toml is not mounted at {config_path}"
        );
        assert_eq!(
            env("IOTGW_STORE__POSTGRES__PASSWORD"),
            pg_password,
            "{name} uses the database's password variable"
        );
        assert!(
            env("IOTGW_API__TOKEN").starts_with("${"),
            "{name}: token from env"
        );

        // The API on its own loopback port of the host.
        for p in str_list(&gw["ports"]) {
            let parts: Vec<&str> = p.split(':').collect();
            assert!(
                parts.len() == 3 && parts[0] == "127.0.0.1",
                "{name} publishes {p} beyond loopback"
            );
            assert_eq!(parts[2].parse::<i64>().ok(), Some(api_port), "{name}: {p}");
            assert!(host_ports.insert(parts[1].to_string()), "{name} reuses {p}");
        }

        // What this replica's environment makes of the config.
        let vars: Vec<(String, String)> = gw["environment"]
            .as_hash()
            .expect("environment as a mapping")
            .iter()
            .filter_map(|(k, v)| Some((k.as_str()?.to_string(), v.as_str()?.to_string())))
            .filter(|(k, _)| k.starts_with("IOTGW_") && k != "IOTGW_CONFIG")
            .map(|(k, v)| (k, compose_default(&v)))
            .collect();
        let vars: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (&**k, &**v)).collect();
        check_config(&config_file, &vars);
    }
    assert!(!host_ports.is_empty(), "no replica publishes the API");

    // The config: the compose file's database and broker, telemetry split by a group.
    assert_eq!(config["store"]["kind"].as_str(), Some("postgres"));
    let (user, host_port, db) = postgres_url_parts(
        config["store"]["postgres"]["url"]
            .as_str()
            .expect("store.postgres.url"),
    );
    assert_eq!(user, pg_env("POSTGRES_USER"));
    assert_eq!(db, pg_env("POSTGRES_DB"));
    assert_eq!(host_port, "postgres:5432", "the postgres service");
    let plant = &config["providers"]["plant"];
    assert_eq!(plant["kind"].as_str(), Some("mqtt"));
    assert_eq!(plant["host"].as_str(), Some("mosquitto"));
    assert!(
        plant["shared_group"]
            .as_str()
            .is_some_and(|g| !g.is_empty()),
        "without a shared_group every replica would get every reading"
    );

    assert_compose_accepts(&file);
}

#[test]
fn kubernetes_replicas_are_a_statefulset_of_three_with_a_pdb_a_postgres_secret_and_a_store_readiness_gate(
) {
    let dir = repo_root().join("deploy/k8s/replicas");
    let kustomization = &yaml_file(&dir.join("kustomization.yaml"))[0];
    let mut objects = Vec::new();
    for res in str_list(&kustomization["resources"]) {
        objects.extend(yaml_file(&dir.join(&res)));
    }
    let by_kind = |kind: &str| -> Vec<&Yaml> {
        objects
            .iter()
            .filter(|o| o["kind"].as_str() == Some(kind))
            .collect()
    };
    // Whether every label of `selector` is on `labels`.
    let selects = |selector: &Yaml, labels: &Yaml| -> bool {
        selector.as_hash().is_some_and(|s| {
            !s.is_empty()
                && s.iter()
                    .all(|(k, v)| labels.as_hash().and_then(|l| l.get(k)) == Some(v))
        })
    };

    let sets = by_kind("StatefulSet");
    assert_eq!(sets.len(), 1, "one StatefulSet");
    assert!(
        by_kind("Deployment").is_empty(),
        "replicas need stable names"
    );
    let set = sets[0];
    assert_eq!(set["metadata"]["name"].as_str(), Some("iotgw"));
    let replicas = set["spec"]["replicas"].as_i64().expect("spec.replicas");
    assert_eq!(replicas, 3);
    let template = &set["spec"]["template"];
    let labels = &template["metadata"]["labels"];
    assert!(
        selects(&set["spec"]["selector"]["matchLabels"], labels),
        "the StatefulSet's selector does not match its pods"
    );

    // The governing Service is headless and selects the pods; the API Service too.
    let services = by_kind("Service");
    let governing = set["spec"]["serviceName"].as_str().expect("serviceName");
    let headless = services
        .iter()
        .find(|s| s["metadata"]["name"].as_str() == Some(governing))
        .unwrap_or_else(|| panic!("no Service {governing}"));
    assert_eq!(headless["spec"]["clusterIP"].as_str(), Some("None"));
    assert!(selects(&headless["spec"]["selector"], labels));
    let api_services: Vec<&&Yaml> = services
        .iter()
        .filter(|s| s["spec"]["clusterIP"].as_str() != Some("None"))
        .collect();
    assert_eq!(api_services.len(), 1, "one Service for the API");
    assert!(
        selects(&api_services[0]["spec"]["selector"], labels),
        "the API Service does not select the replicas"
    );

    // The PodDisruptionBudget keeps two of three up and lets one go.
    let pdbs = by_kind("PodDisruptionBudget");
    assert_eq!(pdbs.len(), 1, "one PodDisruptionBudget");
    let pdb = pdbs[0];
    assert_eq!(pdb["apiVersion"].as_str(), Some("policy/v1"));
    assert!(
        selects(&pdb["spec"]["selector"]["matchLabels"], labels),
        "the PodDisruptionBudget's selector does not match the replicas"
    );
    let may_go = match (
        pdb["spec"]["maxUnavailable"].as_i64(),
        pdb["spec"]["minAvailable"].as_i64(),
    ) {
        (Some(max), None) => max,
        (None, Some(min)) => replicas - min,
        other => panic!(
            "give the PodDisruptionBudget maxUnavailable or minAvailable as a number: {other:?}"
        ),
    };
    assert_eq!(may_go, 1, "one replica at a time may be disrupted");

    // The container.
    let pod = &template["spec"];
    let containers = pod["containers"].as_vec().expect("containers");
    assert_eq!(containers.len(), 1, "the replicas are iotgw alone");
    let gw = &containers[0];
    assert_eq!(pod["securityContext"]["runAsNonRoot"].as_bool(), Some(true));
    assert_eq!(gw["securityContext"]["runAsUser"].as_i64(), Some(65532));
    let env: BTreeMap<&str, &Yaml> = gw["env"]
        .as_vec()
        .expect("iotgw env")
        .iter()
        .map(|e| (e["name"].as_str().expect("env name"), e))
        .collect();

    // Secrets: every secretKeyRef names a key of a Secret of the kustomization; the
    // database password and the API token come from one.
    let secrets: BTreeMap<&str, &Yaml> = by_kind("Secret")
        .into_iter()
        .map(|s| (s["metadata"]["name"].as_str().expect("secret name"), s))
        .collect();
    // (stringData: the values are placeholders to replace, readable in the file.)
    let secret_value = |name: &str, key: &str| -> Option<String> {
        secrets.get(name)?["stringData"][key]
            .as_str()
            .map(str::to_string)
    };
    for (var, e) in &env {
        let r = &e["valueFrom"]["secretKeyRef"];
        if r.is_badvalue() {
            continue;
        }
        let (name, key) = (
            r["name"].as_str().expect("name"),
            r["key"].as_str().expect("key"),
        );
        assert!(
            secret_value(name, key).is_some(),
            "{var} refers to {name}/{key}, which no Secret holds"
        );
    }
    let from_secret = |var: &str| -> String {
        let r = &env.get(var).unwrap_or_else(|| panic!("{var} is not set"))["valueFrom"]
            ["secretKeyRef"];
        assert!(!r.is_badvalue(), "{var} must come from a Secret");
        secret_value(
            r["name"].as_str().expect("name"),
            r["key"].as_str().expect("key"),
        )
        .expect("checked above")
    };
    let pg_password = from_secret("IOTGW_STORE__POSTGRES__PASSWORD");
    let token = from_secret("IOTGW_API__TOKEN");

    // The replica id is the stable pod name: set from it, or left to the host name.
    if let Some(e) = env.get("IOTGW_REPLICA__ID") {
        assert_eq!(
            e["valueFrom"]["fieldRef"]["fieldPath"].as_str(),
            Some("metadata.name"),
            "the replica id must be the pod name, stable across restarts"
        );
    }

    // Config: the generated ConfigMap is mounted where IOTGW_CONFIG points.
    let config_path = env["IOTGW_CONFIG"]["value"]
        .as_str()
        .expect("IOTGW_CONFIG value");
    let mount = gw["volumeMounts"]
        .as_vec()
        .expect("volumeMounts")
        .iter()
        .find(|m| {
            m["mountPath"]
                .as_str()
                .is_some_and(|p| Path::new(config_path).parent() == Some(Path::new(p)))
        })
        .unwrap_or_else(|| panic!("nothing mounted at {config_path}"));
    let volume = pod["volumes"]
        .as_vec()
        .expect("volumes")
        .iter()
        .find(|v| v["name"] == mount["name"])
        .expect("the mount's volume");
    let map = volume["configMap"]["name"]
        .as_str()
        .expect("a configMap volume");
    let file = Path::new(config_path)
        .file_name()
        .and_then(|f| f.to_str())
        .expect("a file name");
    assert!(
        kustomization["configMapGenerator"]
            .as_vec()
            .expect("a configMapGenerator")
            .iter()
            .any(|g| g["name"].as_str() == Some(map)
                && str_list(&g["files"]).iter().any(|f| f == file)),
        "no configMapGenerator {map} carries {file}"
    );
    let config_file = dir.join(file);
    let config = toml_file(&config_file);
    assert_eq!(config["store"]["kind"].as_str(), Some("postgres"));
    postgres_url_parts(
        config["store"]["postgres"]["url"]
            .as_str()
            .expect("store.postgres.url"),
    );
    assert!(
        config["providers"]["plant"]["shared_group"]
            .as_str()
            .is_some_and(|g| !g.is_empty()),
        "without a shared_group every replica would get every reading"
    );

    // Probes: readiness on /ready (the store gate), liveness and startup on /live, at the
    // port the API listens on.
    let api_port = port_of(config["api"]["listen"].as_str().expect("api.listen"));
    let ports: BTreeMap<&str, i64> = gw["ports"]
        .as_vec()
        .expect("container ports")
        .iter()
        .map(|p| {
            (
                p["name"].as_str().unwrap_or_default(),
                p["containerPort"].as_i64().expect("containerPort"),
            )
        })
        .collect();
    assert!(ports.values().any(|p| *p == api_port), "{ports:?}");
    for (probe, path) in [
        ("readinessProbe", "/ready"),
        ("livenessProbe", "/live"),
        ("startupProbe", "/live"),
    ] {
        let p = &gw[probe];
        if p["httpGet"].is_badvalue() {
            let cmd = str_list(&p["exec"]["command"]).join(" ");
            assert!(
                cmd.contains("healthcheck") && cmd.contains(&format!("--path {path}")),
                "{probe} should check {path}, runs `{cmd}`"
            );
        } else {
            assert_eq!(p["httpGet"]["path"].as_str(), Some(path), "{probe}");
            let port = &p["httpGet"]["port"];
            let port = port
                .as_i64()
                .or_else(|| port.as_str().and_then(|n| ports.get(n).copied()));
            assert_eq!(port, Some(api_port), "{probe} probes another port");
        }
    }
    let service_port = &api_services[0]["spec"]["ports"][0]["targetPort"];
    let service_port = service_port
        .as_i64()
        .or_else(|| service_port.as_str().and_then(|n| ports.get(n).copied()));
    assert_eq!(service_port, Some(api_port), "the API Service's targetPort");

    // Termination: the drain fits in the grace period.
    let grace = grace_secs_of(&config);
    let termination = pod["terminationGracePeriodSeconds"]
        .as_i64()
        .expect("terminationGracePeriodSeconds");
    assert!(
        termination >= grace + 5,
        "terminationGracePeriodSeconds {termination} leaves no room for the drain ({grace} s)"
    );

    // The config with the Secret's values, as the StatefulSet wires them, for replica 0.
    check_config(
        &config_file,
        &[
            ("IOTGW_STORE__POSTGRES__PASSWORD", &pg_password),
            ("IOTGW_API__TOKEN", &token),
            ("IOTGW_REPLICA__ID", "iotgw-0"),
        ],
    );

    validate_manifests(&dir);
}
