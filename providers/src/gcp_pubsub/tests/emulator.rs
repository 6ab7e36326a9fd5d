//! The official Pub/Sub emulator in Docker through testcontainers, under the public image
//! `gcr.io/google.com/cloudsdktool/google-cloud-cli:emulators` (built locally by
//! `deploy/images/build-local-images.sh` where no registry is reachable), started as
//! `gcloud beta emulators pubsub start --project=iotgw-test --host-port=0.0.0.0:8085`.
//!
//! One container is shared by the tests running at the same time: the first
//! [`Emulator::acquire`] starts it, the last [`Emulator`] dropped removes it (tests keep
//! apart by names of their own). It carries the test harness's labels (`org.iotgw.test`,
//! the pid and host), so a run killed before its cleanup is tidied up by the next one.
//!
//! Docker itself comes from the workspace's test harness (`tests/src/harness/docker.rs`):
//! finding the engine, and the API-version shim that lets testcontainers 0.28 (API 1.53)
//! talk to older engines. Without Docker a test prints `SKIPPED: <why>` and returns; with
//! `CI=true` it fails.

use std::future::Future;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use testcontainers::core::{IntoContainerPort, WaitFor};
use testcontainers::runners::AsyncRunner;
use testcontainers::{ContainerAsync, GenericImage, ImageExt};

#[path = "../../../../tests/src/harness/docker.rs"]
#[allow(dead_code)]
mod docker;

/// Image name.
pub const IMAGE: &str = "gcr.io/google.com/cloudsdktool/google-cloud-cli";
/// Image tag.
pub const TAG: &str = "emulators";
/// The emulator's port in the container.
pub const PORT: u16 = 8085;
/// The project of every test (the emulator takes any).
pub const PROJECT: &str = "iotgw-test";

/// The running shared container and how many tests use it.
struct Live {
    container: ContainerAsync<GenericImage>,
    host: String,
    users: usize,
}

static LIVE: Mutex<Option<Live>> = Mutex::new(None);
/// Serialises starts, so concurrent first users share one container.
static STARTING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A test's hold on the shared emulator.
#[derive(Debug)]
pub struct Emulator {
    /// `127.0.0.1:<port>`: what `emulator_host` / `PUBSUB_EMULATOR_HOST` take.
    pub host: String,
}

fn ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// Finds Docker once: removes stale test containers, starts the API-version shim when
/// the engine is older than testcontainers' client. `Err` says why Docker is unusable.
fn docker_ready() -> Result<(), String> {
    static READY: OnceLock<Result<(), String>> = OnceLock::new();
    READY
        .get_or_init(|| {
            let ep = match docker::endpoint() {
                Ok(ep) => ep,
                // An endpoint that cannot be probed here (TLS, SSH): testcontainers tries it.
                Err(_) => return Ok(()),
            };
            let version = docker::api_version(&ep)?;
            docker::remove_stale(&ep);
            if std::env::var_os("DOCKER_HOST").is_some() {
                // Set by the caller (or a shim already running in this process): keep it.
                return Ok(());
            }
            if version < docker::CLIENT_API_VERSION {
                let dir = tempfile::Builder::new()
                    .prefix("iotgw-gcp-docker-shim")
                    .tempdir()
                    .map_err(|e| format!("a temp dir for the Docker API shim: {e}"))?;
                let path = docker::start_shim(ep.clone(), version, dir.path())
                    .map_err(|e| format!("the Docker API shim for {ep} did not start: {e}"))?;
                // The socket lives as long as the process.
                std::mem::forget(dir);
                // Once, before the first container starts; testcontainers reads it per client.
                #[allow(
                    clippy::disallowed_methods,
                    reason = "once, inside a OnceLock, before any container starts"
                )]
                std::env::set_var("DOCKER_HOST", format!("unix://{}", path.display()));
            } else if let docker::Endpoint::Unix(p) = &ep {
                if p.as_path() != std::path::Path::new("/var/run/docker.sock") {
                    #[allow(
                        clippy::disallowed_methods,
                        reason = "once, inside a OnceLock, before any container starts"
                    )]
                    std::env::set_var("DOCKER_HOST", format!("unix://{}", p.display()));
                }
            }
            Ok(())
        })
        .clone()
}

/// The runtime every Docker call runs on: containers outlive the runtime of the test that
/// started them.
fn docker_runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("gcp-emulator-docker")
            .enable_all()
            .build()
            .expect("a runtime for Docker calls")
    })
}

async fn on_docker<T: Send + 'static>(f: impl Future<Output = T> + Send + 'static) -> T {
    match docker_runtime().spawn(f).await {
        Ok(v) => v,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}

impl Emulator {
    /// Joins (or starts) the shared emulator. `None` after printing `SKIPPED: ...` when
    /// Docker is unreachable outside CI; panics under `CI=true` or when the emulator does
    /// not start.
    pub async fn acquire() -> Option<Emulator> {
        if let Err(why) = docker_ready() {
            let msg = format!(
                "the Pub/Sub emulator tests need Docker, which is unreachable: {why}. Start Docker (or set DOCKER_HOST)"
            );
            assert!(!ci(), "CI=true: {msg}");
            eprintln!("SKIPPED: {msg}");
            return None;
        }
        let _starting = STARTING.lock().await;
        if let Some(live) = LIVE
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .as_mut()
        {
            live.users += 1;
            return Some(Emulator {
                host: live.host.clone(),
            });
        }
        let (container, port) = start_container("pubsub/providers-gcp", None).await;
        let host = format!("127.0.0.1:{port}");
        *LIVE
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(Live {
            container,
            host: host.clone(),
            users: 1,
        });
        Some(Emulator { host })
    }

    /// `http://127.0.0.1:<port>`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.host)
    }
}

/// Starts an emulator container (on `fixed_port` when given, so a restart keeps it);
/// panics with what to do when it does not start.
async fn start_container(
    role: &str,
    fixed_port: Option<u16>,
) -> (ContainerAsync<GenericImage>, u16) {
    let mut request = GenericImage::new(IMAGE, TAG)
        .with_exposed_port(PORT.tcp())
        .with_wait_for(WaitFor::message_on_either_std(format!(
            "Server started, listening on {PORT}"
        )))
        .with_cmd([
            "gcloud".to_owned(),
            "beta".into(),
            "emulators".into(),
            "pubsub".into(),
            "start".into(),
            format!("--project={PROJECT}"),
            format!("--host-port=0.0.0.0:{PORT}"),
        ])
        .with_label(docker::LABEL, "1")
        .with_label(docker::LABEL_PID, std::process::id().to_string())
        .with_label(docker::LABEL_HOST, docker::host_name())
        .with_label(docker::LABEL_ROLE, role)
        .with_startup_timeout(Duration::from_secs(120));
    if let Some(port) = fixed_port {
        request = request.with_mapped_port(port, PORT.tcp());
    }
    let started = on_docker(async move {
        let c = request.start().await?;
        let port = c.get_host_port_ipv4(PORT.tcp()).await?;
        Ok::<_, testcontainers::TestcontainersError>((c, port))
    })
    .await;
    started.unwrap_or_else(|e| {
        panic!(
            "the Pub/Sub emulator ({IMAGE}:{TAG}) did not start: {e}. Without a registry, build the image with \
             IOTGW_IMAGES=pubsub bash deploy/images/build-local-images.sh"
        )
    })
}

/// Removes `container` on the Docker runtime and waits for it (bounded), so a test binary
/// that ends right after leaves nothing behind.
fn remove_blocking(container: ContainerAsync<GenericImage>) {
    let (tx, rx) = std::sync::mpsc::channel();
    docker_runtime().spawn(async move {
        let _ = container.rm().await;
        let _ = tx.send(());
    });
    let _ = rx.recv_timeout(Duration::from_secs(20));
}

/// An emulator of one test's own, on a fixed host port, that it may restart.
#[derive(Debug)]
pub struct Dedicated {
    /// `127.0.0.1:<port>`.
    pub host: String,
    container: Option<std::sync::Arc<ContainerAsync<GenericImage>>>,
}

impl Dedicated {
    /// Starts one; `None` (after `SKIPPED: ...`) without Docker outside CI.
    pub async fn start() -> Option<Dedicated> {
        if let Err(why) = docker_ready() {
            let msg =
                format!("the Pub/Sub emulator tests need Docker, which is unreachable: {why}");
            assert!(!ci(), "CI=true: {msg}");
            eprintln!("SKIPPED: {msg}");
            return None;
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free loopback port");
        let (container, port) = start_container("pubsub/providers-gcp-dedicated", Some(port)).await;
        Some(Dedicated {
            host: format!("127.0.0.1:{port}"),
            container: Some(std::sync::Arc::new(container)),
        })
    }

    /// `http://127.0.0.1:<port>`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.host)
    }

    /// Stops the emulator (it forgets every topic and subscription) and starts it again
    /// on the same port; returns once it accepts connections.
    pub async fn restart(&self) {
        let c = self.container.clone().expect("running");
        on_docker(async move {
            c.stop_with_timeout(Some(2)).await?;
            c.start().await
        })
        .await
        .expect("the emulator restarts");
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        let path = format!("/v1/projects/{PROJECT}/topics");
        loop {
            // The REST surface answers once the JVM listens.
            let up = std::net::TcpStream::connect(&self.host).is_ok_and(|mut s| {
                use std::io::{Read, Write};
                let req = format!("GET {path} HTTP/1.0\r\nHost: {}\r\n\r\n", self.host);
                let mut head = [0u8; 12];
                s.set_read_timeout(Some(Duration::from_secs(2))).is_ok()
                    && s.write_all(req.as_bytes()).is_ok()
                    && s.read_exact(&mut head).is_ok()
                    && head.starts_with(b"HTTP/1.")
                    && &head[9..12] == b"200"
            });
            if up {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the emulator did not answer within 60 s of its restart"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Dedicated {
    fn drop(&mut self) {
        if let Some(c) = self
            .container
            .take()
            .and_then(|c| std::sync::Arc::try_unwrap(c).ok())
        {
            remove_blocking(c);
        }
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        let last = {
            let mut live = LIVE
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            match live.as_mut() {
                Some(l) if l.host == self.host => {
                    l.users -= 1;
                    if l.users == 0 {
                        live.take()
                    } else {
                        None
                    }
                }
                _ => None,
            }
        };
        if let Some(l) = last {
            remove_blocking(l.container);
        }
    }
}
