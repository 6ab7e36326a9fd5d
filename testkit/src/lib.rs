//! Test support for every iotgw crate, in one place: the emulators the providers are
//! tested against, in Docker through testcontainers, under the public image names a user
//! would pull (`eclipse-mosquitto:2`, `motoserver/moto:5.1.4`,
//! `gcr.io/google.com/cloudsdktool/google-cloud-cli:emulators`, `postgres:15`). Without a
//! registry, `deploy/images/build-local-images.sh` builds images under exactly those names.
//!
//! Nothing here ships, and this crate depends on no iotgw crate, so the providers' in-crate
//! tests, the gateway's tests and benches and the behaviour tests (`tests/`) all take it as
//! a (dev-)dependency: one starter per emulator, written once.
//!
//! # Layout
//! - this file: Docker availability and the skip/fail policy ([`init`], [`require_docker`]),
//!   the runtime every Docker call runs on ([`on_docker`]), labels, [`Running`] (a started
//!   container) and cleanup.
//! - [`docker`]: the engine below testcontainers (endpoint, API version shim, raw calls).
//! - [`mosquitto`], [`moto`], [`pubsub`], [`postgres`]: one module per emulator, each with
//!   three ways to hold one:
//!   - `shared()`: one container per test binary, for the `harness = false` binaries
//!     (reused by every test of the binary; tests keep apart by using their own names;
//!     removed by [`cleanup`] at the end of `main`);
//!   - `leased()` (where a libtest binary shares one): one container while any test of the
//!     binary holds it, removed when the last holder lets go (libtest has no end-of-run
//!     hook to call [`cleanup`] from);
//!   - `dedicated()`: a container of the caller's own, on fixed host ports, for a test that
//!     stops and starts its emulator (restart scenarios), so a shared one is never
//!     disturbed; removed by `remove()` or when dropped.
//! - [`pki`]: a throwaway certificate authority (TLS brokers, client certificates).
//!
//! # Lifecycle
//! Shared containers live in statics and are never dropped, so each container carries the
//! labels [`docker::LABEL`] (`org.iotgw.test=1`), the test binary's pid and host name.
//! [`cleanup`] (called at the end of the harness=false mains) removes this process's
//! containers; [`init`] removes the leftovers of runs that are no longer alive, and
//! `scripts/test.sh` does the same before and after the whole run.
//!
//! # Docker missing
//! [`require_docker`]: with `CI=true` a test that needs Docker fails with the reason;
//! elsewhere it prints `SKIPPED: <why>` and returns.
#![allow(
    clippy::disallowed_methods,
    reason = "test support: plain-HTTP clients against local emulators; DOCKER_HOST is set once, inside a OnceLock, before any container starts"
)]

pub mod docker;
pub mod mosquitto;
pub mod moto;
pub mod pki;
pub mod postgres;
pub mod pubsub;

use std::future::Future;
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use anyhow::Context;
use testcontainers::core::{ContainerPort, ExecCommand, IntoContainerPort};
use testcontainers::runners::AsyncRunner;
use testcontainers::{ContainerAsync, ContainerRequest, GenericImage, Image, ImageExt};

use docker::Endpoint;

/// What [`init`] found.
#[derive(Clone, Debug)]
pub enum DockerStatus {
    /// Docker answers.
    Available {
        /// Where.
        endpoint: String,
        /// Its highest API version.
        api_version: String,
        /// The API-version shim's socket, when the engine is older than the client.
        shim: Option<String>,
    },
    /// Docker does not answer; why.
    Unavailable(String),
}

static STATUS: OnceLock<DockerStatus> = OnceLock::new();
/// The engine itself (not the shim), for the harness's own raw calls.
static ENDPOINT: OnceLock<Endpoint> = OnceLock::new();
static SHIM_DIR: Mutex<Option<tempfile::TempDir>> = Mutex::new(None);
static STARTED: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// Finds Docker, removes stale test containers, and starts the API-version shim when the
/// engine is older than testcontainers' client (see [`docker`]).
///
/// Call it first thing in `main`, before any other thread exists: it may set
/// `DOCKER_HOST` (for testcontainers) and setting the environment is only sound while the
/// process is single-threaded. Later calls return the first answer.
pub fn init() -> &'static DockerStatus {
    STATUS.get_or_init(|| {
        let ep = match docker::endpoint() {
            Ok(ep) => ep,
            Err(why) => {
                // An endpoint the harness cannot probe (TLS, SSH): let testcontainers try.
                return DockerStatus::Available {
                    endpoint: why,
                    api_version: "unknown".into(),
                    shim: None,
                };
            }
        };
        let _ = ENDPOINT.set(ep.clone());
        let version = match docker::api_version(&ep) {
            Ok(v) => v,
            Err(why) => return DockerStatus::Unavailable(why),
        };
        let removed = docker::remove_stale(&ep);
        if !removed.is_empty() {
            eprintln!(
                "testkit: removed {} test container(s) left by runs that are gone",
                removed.len()
            );
        }
        let mut shim = None;
        if version < docker::CLIENT_API_VERSION {
            match start_shim(&ep, version) {
                Ok(path) => shim = Some(path),
                Err(e) => {
                    let (have, want) = (version, docker::CLIENT_API_VERSION);
                    return DockerStatus::Unavailable(format!(
                        "{ep} speaks API {}.{}, older than testcontainers' {}.{}, \
                         and the version shim did not start: {e}",
                        have.0, have.1, want.0, want.1
                    ));
                }
            }
        } else if let Endpoint::Unix(p) = &ep {
            // testcontainers only looks at /var/run/docker.sock by itself.
            let default = std::path::Path::new("/var/run/docker.sock");
            if std::env::var_os("DOCKER_HOST").is_none() && p.as_path() != default {
                std::env::set_var("DOCKER_HOST", format!("unix://{}", p.display()));
            }
        }
        DockerStatus::Available {
            endpoint: ep.to_string(),
            api_version: format!("{}.{}", version.0, version.1),
            shim,
        }
    })
}

fn start_shim(ep: &Endpoint, version: (u32, u32)) -> anyhow::Result<String> {
    let dir = tempfile::Builder::new()
        .prefix("iotgw-docker-shim")
        .tempdir()
        .context("a temp dir for the shim socket")?;
    let path = dir.path().join("docker-api-shim.sock");
    // Set before the shim thread starts: see init's note on the environment.
    std::env::set_var("DOCKER_HOST", format!("unix://{}", path.display()));
    docker::start_shim(ep.clone(), version, dir.path()).context("binding the shim socket")?;
    *SHIM_DIR
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(dir);
    Ok(path.display().to_string())
}

/// Docker's status ([`init`] on first use).
pub fn status() -> &'static DockerStatus {
    init()
}

/// Whether a test that needs Docker can run. `Err` carries the `SKIPPED:` line already
/// printed. Panics with the reason under `CI=true` (a CI run must not pass by skipping).
pub fn require_docker(what: &str) -> Result<(), String> {
    match status() {
        DockerStatus::Available { .. } => Ok(()),
        DockerStatus::Unavailable(why) => {
            let msg = format!(
                "{what} needs Docker, which is unreachable: {why}. Start Docker (or set DOCKER_HOST) and run scripts/test.sh"
            );
            assert!(!ci(), "CI=true: {msg}");
            eprintln!("SKIPPED: {msg}");
            Err(msg)
        }
    }
}

/// Whether this is a CI run (`CI=true`).
pub fn ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// The runtime every Docker call of the harness runs on: one for the whole process, so
/// containers created by one test's runtime stay usable from the next test's.
fn docker_runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("harness-docker")
            .enable_all()
            .build()
            .expect("the harness's Docker runtime starts")
    })
}

/// Runs `f` on the harness's Docker runtime and waits for it from any runtime.
pub async fn on_docker<F, T>(f: F) -> T
where
    F: Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    match docker_runtime().spawn(f).await {
        Ok(v) => v,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}

/// Starts a container with the harness's labels (`role` says what it is for) and records
/// it for [`cleanup`]. The error names the image and how to get it.
pub async fn start_container<I>(
    request: ContainerRequest<I>,
    role: &str,
) -> anyhow::Result<ContainerAsync<I>>
where
    I: Image + Send + Sync + 'static,
{
    let image = format!("{}:{}", request.image().name(), request.image().tag());
    let request = request
        .with_label(docker::LABEL, "1")
        .with_label(docker::LABEL_PID, std::process::id().to_string())
        .with_label(docker::LABEL_HOST, docker::host_name())
        .with_label(docker::LABEL_ROLE, role)
        .with_startup_timeout(Duration::from_secs(120));
    let container = on_docker(async move { request.start().await })
        .await
        .with_context(|| {
            format!(
                "starting {role} from image {image}: if the image is missing and no registry is reachable, \
                 build it with deploy/images/build-local-images.sh (or run scripts/test.sh, which does)"
            )
        })?;
    STARTED
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .push(container.id().to_owned());
    Ok(container)
}

/// The host port of `port` of a running container.
pub async fn host_port<I: Image>(
    c: &ContainerAsync<I>,
    port: ContainerPort,
) -> anyhow::Result<u16> {
    let id = c.id().to_owned();
    c.get_host_port_ipv4(port)
        .await
        .with_context(|| format!("the host port of {port:?} of container {id}"))
}

/// Removes every container this process started (shared ones included) and the shim's
/// socket. Call at the end of a test binary's `main`; leftovers of a killed run are
/// removed by the next [`init`].
pub fn cleanup() {
    drop(
        SHIM_DIR
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take(),
    );
    let ids = std::mem::take(
        &mut *STARTED
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner),
    );
    let Some(ep) = ENDPOINT.get() else {
        return;
    };
    for id in ids {
        if let Err(e) = docker::remove(ep, &id) {
            eprintln!("testkit: {e}");
        }
    }
}

/// A free loopback TCP port (for fixed host-port mappings that must survive a restart).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// A started container with its published ports; what every emulator module wraps.
/// Dropping it removes the container (waiting for Docker, bounded); shared ones live in
/// statics, are never dropped, and go in [`cleanup`].
pub struct Running {
    /// `None` once removed.
    container: Option<Arc<ContainerAsync<GenericImage>>>,
    id: String,
    /// `(container port, host port)`.
    ports: Vec<(u16, u16)>,
}

impl std::fmt::Debug for Running {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Running")
            .field("id", &self.id)
            .field("ports", &self.ports)
            .finish()
    }
}

impl Running {
    /// Starts `request` publishing `ports`: on fixed free host ports when `fixed` (the
    /// mapping then survives a stop and start; Docker may pick new ports otherwise).
    pub async fn start(
        mut request: ContainerRequest<GenericImage>,
        ports: &[u16],
        fixed: bool,
        role: &str,
    ) -> anyhow::Result<Self> {
        let mut mapped = Vec::new();
        for &p in ports {
            if fixed {
                let host = free_port();
                request = request.with_mapped_port(host, p.tcp());
                mapped.push((p, host));
            }
        }
        let container = start_container(request, role).await?;
        if !fixed {
            for &p in ports {
                mapped.push((p, host_port(&container, p.tcp()).await?));
            }
        }
        Ok(Self {
            id: container.id().to_owned(),
            container: Some(Arc::new(container)),
            ports: mapped,
        })
    }

    fn handle(&self) -> Arc<ContainerAsync<GenericImage>> {
        self.container
            .clone()
            .expect("the container is only taken by remove(self) and drop")
    }

    /// The container id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The host port published for `container_port` (one passed to [`Running::start`]).
    pub fn port(&self, container_port: u16) -> u16 {
        self.ports
            .iter()
            .find(|(c, _)| *c == container_port)
            .map(|(_, h)| *h)
            .unwrap_or_else(|| panic!("container port {container_port} was not published"))
    }

    /// Stops the container: SIGTERM, SIGKILL after `grace_secs`.
    pub async fn stop(&self, grace_secs: i32) -> anyhow::Result<()> {
        let c = self.handle();
        on_docker(async move { c.stop_with_timeout(Some(grace_secs)).await })
            .await
            .with_context(|| format!("stopping container {}", self.id()))
    }

    /// Kills the container's process at once (SIGKILL: nothing is saved, no client is
    /// told), as a crash or power loss would, and returns once it is down.
    pub async fn kill(&self) -> anyhow::Result<()> {
        let ep = ENDPOINT.get().cloned().context(
            "killing a container: the Docker engine's endpoint is unknown (init did not probe it)",
        )?;
        let id = self.id.clone();
        let (status, body) = tokio::task::spawn_blocking(move || {
            docker::request(
                &ep,
                "POST",
                &format!("/containers/{id}/kill?signal=SIGKILL"),
            )
        })
        .await
        .context("the kill request's thread")?
        .with_context(|| format!("killing container {}", self.id))?;
        anyhow::ensure!(
            status == 204,
            "killing container {}: {status} {body}",
            self.id
        );
        let id = self.id.clone();
        wait_ready(
            &format!("container {id} to be down"),
            Duration::from_secs(30),
            || {
                let ep = ENDPOINT.get().cloned();
                let id = id.clone();
                async move {
                    let ep = ep.ok_or("no endpoint")?;
                    let (status, body) = tokio::task::spawn_blocking(move || {
                        docker::request(&ep, "GET", &format!("/containers/{id}/json"))
                    })
                    .await
                    .map_err(|e| e.to_string())?
                    .map_err(|e| e.to_string())?;
                    let running = serde_json::from_str::<serde_json::Value>(&body)
                        .ok()
                        .and_then(|v| v["State"]["Running"].as_bool());
                    match (status, running) {
                        (200, Some(false)) => Ok(()),
                        _ => Err(format!("{status}: still running")),
                    }
                }
            },
        )
        .await
    }

    /// Starts the stopped container again (the caller waits for its readiness).
    pub async fn start_again(&self) -> anyhow::Result<()> {
        let c = self.handle();
        on_docker(async move { c.start().await })
            .await
            .with_context(|| format!("starting container {} again", self.id()))
    }

    /// Runs a command in the container: `(exit code, stdout + stderr)`.
    pub async fn exec(&self, cmd: Vec<String>) -> anyhow::Result<(i64, String)> {
        let c = self.handle();
        let shown = cmd.join(" ");
        // The exec handle is not Sync, so its future is not Send: drive it on a blocking
        // thread of the Docker runtime instead of as a task.
        let handle = docker_runtime().handle().clone();
        let blocking = docker_runtime().spawn_blocking(move || {
            handle.block_on(async move {
                let mut r = c.exec(ExecCommand::new(cmd)).await?;
                let out = r.stdout_to_vec().await?;
                let err = r.stderr_to_vec().await?;
                let code = r.exit_code().await?.unwrap_or(-1);
                Ok::<_, testcontainers::TestcontainersError>((
                    code,
                    format!(
                        "{}{}",
                        String::from_utf8_lossy(&out),
                        String::from_utf8_lossy(&err)
                    ),
                ))
            })
        });
        match blocking.await {
            Ok(r) => r.with_context(|| format!("running `{shown}` in container {}", self.id())),
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        }
    }

    /// The container's stdout and stderr so far (for failure messages).
    pub async fn logs(&self) -> String {
        let c = self.handle();
        on_docker(async move {
            let out = c.stdout_to_vec().await.unwrap_or_default();
            let err = c.stderr_to_vec().await.unwrap_or_default();
            format!(
                "{}{}",
                String::from_utf8_lossy(&out),
                String::from_utf8_lossy(&err)
            )
        })
        .await
    }

    /// Connects the container to the Docker network `network` under `alias` (what
    /// compose's service names are), e.g. for containers that reach it by name.
    pub async fn connect_network(&self, network: &str, alias: &str) -> anyhow::Result<()> {
        let ep = ENDPOINT
            .get()
            .cloned()
            .context("the Docker engine's endpoint is unknown (init did not probe it)")?;
        let body = serde_json::json!({
            "Container": self.id,
            "EndpointConfig": {"Aliases": [alias]},
        })
        .to_string();
        let path = format!("/networks/{network}/connect");
        let (status, answer) = tokio::task::spawn_blocking(move || {
            docker::request_with_body(&ep, "POST", &path, &body)
        })
        .await
        .context("the network request's thread")?
        .with_context(|| format!("connecting container {} to {network}", self.id))?;
        anyhow::ensure!(
            status == 200,
            "connecting container {} to network {network} as {alias}: {status} {answer}",
            self.id
        );
        Ok(())
    }

    /// Removes the container now, waiting for Docker.
    pub async fn remove(mut self) {
        if let Some(c) = self.container.take() {
            remove_now(&self.id, c).await;
        }
    }
}

/// Removes `c` on the Docker runtime when this is its last handle.
async fn remove_now(id: &str, c: Arc<ContainerAsync<GenericImage>>) {
    match Arc::try_unwrap(c) {
        Ok(c) => {
            if let Err(e) = on_docker(async move { c.rm().await }).await {
                eprintln!("testkit: removing container {id}: {e}");
            }
        }
        Err(_) => eprintln!("testkit: container {id} still in use; cleanup() removes it"),
    }
}

impl Drop for Running {
    /// Removes the container (bounded wait), so a test that ends, or panics, leaves
    /// nothing behind; [`init`] and `scripts/test.sh` catch what a killed run left.
    fn drop(&mut self) {
        let Some(c) = self.container.take() else {
            return;
        };
        let id = self.id.clone();
        let (done, wait) = std::sync::mpsc::channel();
        docker_runtime().spawn(async move {
            remove_now(&id, c).await;
            let _ = done.send(());
        });
        let _ = wait.recv_timeout(Duration::from_secs(30));
    }
}

/// The emulator `slot` holds while any test holds it, started with `start` when no test
/// does: what `leased()` of each emulator module returns. It is removed when the last
/// holder drops it.
pub async fn lease<T, F, Fut>(
    slot: &'static tokio::sync::Mutex<Weak<T>>,
    start: F,
) -> anyhow::Result<Arc<T>>
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = anyhow::Result<T>>,
{
    let mut held = slot.lock().await;
    if let Some(t) = held.upgrade() {
        return Ok(t);
    }
    let t = Arc::new(start().await?);
    *held = Arc::downgrade(&t);
    Ok(t)
}

/// Polls `probe` every 100 ms until it answers `Ok`, for at most `limit`; the error
/// carries the last failure.
/// Polls `f` every 100 ms until it gives a value; panics with `what` and `context()` (the
/// logs of whatever is being waited on) after `deadline`. For tests that wait on a
/// condition, never on a bare sleep.
pub async fn wait_for<T, F, Fut>(
    what: &str,
    deadline: Duration,
    mut f: F,
    context: impl Fn() -> String,
) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let until = std::time::Instant::now() + deadline;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            std::time::Instant::now() < until,
            "{what}: not within {deadline:?}\n{}",
            context()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub async fn wait_ready<F, Fut>(what: &str, limit: Duration, mut probe: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), String>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match probe().await {
            Ok(()) => return Ok(()),
            Err(e) if tokio::time::Instant::now() >= deadline => {
                anyhow::bail!("{what} not ready within {limit:?}: {e}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}
