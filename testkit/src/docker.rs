//! The Docker engine below testcontainers: where it is, whether it answers, which API
//! version it speaks, the labelled containers of test runs, and a small API-version shim.
//!
//! testcontainers 0.28 talks to Docker through bollard 0.21, which puts API version 1.53 in
//! every request path (`/v1.53/containers/create`) and never negotiates. Engines older than
//! Docker 29 answer "client version 1.53 is too new" (Debian bookworm's docker.io 20.10
//! speaks 1.41). When the engine is older than the client, [`init`] starts an in-process
//! shim on a Unix socket that rewrites the version in request lines down to the engine's
//! and points `DOCKER_HOST` at it; every request the harness makes stays one Docker knows
//! since 1.41 (create, start, stop, inspect, logs, exec, archive, remove). With a current
//! engine nothing is rewritten and testcontainers talks to Docker directly.
//!
//! The raw requests here (version, list, remove) use HTTP/1.0 over the socket so they need
//! no HTTP client and work before any async runtime exists.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream as StdUnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The API version bollard 0.21 (testcontainers 0.28) writes into every request path.
pub const CLIENT_API_VERSION: (u32, u32) = (1, 53);

/// Label every container of the harness carries (value `1`).
pub const LABEL: &str = "org.iotgw.test";
/// Label with the process id of the test binary that started the container.
pub const LABEL_PID: &str = "org.iotgw.test.pid";
/// Label with the host name of the machine that ran the test binary.
pub const LABEL_HOST: &str = "org.iotgw.test.host";
/// Label naming what the container is for (`mosquitto/shared`, `moto/dedicated`, ...).
pub const LABEL_ROLE: &str = "org.iotgw.test.role";

/// How long one raw request may take.
const RAW_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the Docker engine listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// A Unix socket (the default `/var/run/docker.sock`, rootless or Desktop sockets).
    Unix(PathBuf),
    /// Plain TCP `host:port` (`DOCKER_HOST=tcp://...` without TLS).
    Tcp(String),
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Unix(p) => write!(f, "unix://{}", p.display()),
            Self::Tcp(a) => write!(f, "tcp://{a}"),
        }
    }
}

/// Where testcontainers will look for Docker: `DOCKER_HOST`, else the first socket that
/// exists among the system one, the rootless one and Docker Desktop's. `Err` explains an
/// endpoint the harness cannot probe (TLS, SSH): testcontainers is then left to try.
pub fn endpoint() -> Result<Endpoint, String> {
    if let Ok(host) = std::env::var("DOCKER_HOST") {
        if let Some(path) = host.strip_prefix("unix://") {
            return Ok(Endpoint::Unix(PathBuf::from(path)));
        }
        if let Some(addr) = host.strip_prefix("tcp://") {
            if std::env::var("DOCKER_TLS_VERIFY").is_ok_and(|v| !v.is_empty() && v != "0") {
                return Err(format!("DOCKER_HOST={host} uses TLS"));
            }
            return Ok(Endpoint::Tcp(addr.trim_end_matches('/').to_owned()));
        }
        return Err(format!("DOCKER_HOST={host} is neither unix:// nor tcp://"));
    }
    let mut candidates = vec![PathBuf::from("/var/run/docker.sock")];
    if let Some(dir) = std::env::var_os("XDG_RUNTIME_DIR") {
        candidates.push(Path::new(&dir).join("docker.sock"));
    }
    if let Some(home) = std::env::var_os("HOME") {
        candidates.push(Path::new(&home).join(".docker/run/docker.sock"));
    }
    Ok(Endpoint::Unix(
        candidates
            .iter()
            .find(|p| p.exists())
            .cloned()
            .unwrap_or_else(|| candidates[0].clone()),
    ))
}

/// One raw HTTP/1.0 request to the engine: `(status, body)`.
pub fn request(ep: &Endpoint, method: &str, path: &str) -> std::io::Result<(u16, String)> {
    request_with_body(ep, method, path, "")
}

/// One raw HTTP/1.0 request with a JSON `body` (none when empty): `(status, body)`.
pub fn request_with_body(
    ep: &Endpoint,
    method: &str,
    path: &str,
    body: &str,
) -> std::io::Result<(u16, String)> {
    let content_type = if body.is_empty() {
        ""
    } else {
        "Content-Type: application/json\r\n"
    };
    let req = format!(
        "{method} {path} HTTP/1.0\r\nHost: docker\r\n{content_type}Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let mut raw = Vec::new();
    match ep {
        Endpoint::Unix(p) => {
            let mut s = StdUnixStream::connect(p)?;
            s.set_read_timeout(Some(RAW_TIMEOUT))?;
            s.set_write_timeout(Some(RAW_TIMEOUT))?;
            s.write_all(req.as_bytes())?;
            s.read_to_end(&mut raw)?;
        }
        Endpoint::Tcp(a) => {
            let mut s = std::net::TcpStream::connect(a)?;
            s.set_read_timeout(Some(RAW_TIMEOUT))?;
            s.set_write_timeout(Some(RAW_TIMEOUT))?;
            s.write_all(req.as_bytes())?;
            s.read_to_end(&mut raw)?;
        }
    }
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("not an HTTP answer from the Docker engine: {head:?}"),
            )
        })?;
    Ok((status, body.to_owned()))
}

/// The engine's highest API version (`GET /version`).
pub fn api_version(ep: &Endpoint) -> Result<(u32, u32), String> {
    let (status, body) =
        request(ep, "GET", "/version").map_err(|e| format!("{ep} does not answer: {e}"))?;
    if status != 200 {
        return Err(format!("{ep} answered GET /version with {status}: {body}"));
    }
    let v: Value =
        serde_json::from_str(&body).map_err(|e| format!("{ep}: GET /version is not JSON ({e})"))?;
    v["ApiVersion"]
        .as_str()
        .and_then(parse_version)
        .ok_or_else(|| format!("{ep}: GET /version has no ApiVersion: {body}"))
}

fn parse_version(s: &str) -> Option<(u32, u32)> {
    let (a, b) = s.split_once('.')?;
    Some((a.parse().ok()?, b.parse().ok()?))
}

/// Containers carrying [`LABEL`], as `(id, labels)`.
pub fn labelled_containers(ep: &Endpoint) -> Result<Vec<(String, Value)>, String> {
    // filters={"label":["org.iotgw.test=1"]}, URL-encoded.
    let path =
        format!("/containers/json?all=1&filters=%7B%22label%22%3A%5B%22{LABEL}%3D1%22%5D%7D");
    let (status, body) = request(ep, "GET", &path).map_err(|e| e.to_string())?;
    if status != 200 {
        return Err(format!("listing test containers: {status} {body}"));
    }
    let list: Vec<Value> = serde_json::from_str(&body).map_err(|e| e.to_string())?;
    Ok(list
        .into_iter()
        .filter_map(|c| Some((c["Id"].as_str()?.to_owned(), c["Labels"].clone())))
        .collect())
}

/// Removes a container with its anonymous volumes (gone already counts as done).
pub fn remove(ep: &Endpoint, id: &str) -> Result<(), String> {
    let (status, body) = request(ep, "DELETE", &format!("/containers/{id}?force=1&v=1"))
        .map_err(|e| e.to_string())?;
    match status {
        204 | 404 => Ok(()),
        _ => Err(format!("removing container {id}: {status} {body}")),
    }
}

/// This machine's host name (labels tell whose containers are whose on a shared engine).
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown".into())
}

/// Whether a process with this id runs on this machine (Linux `/proc`; elsewhere the
/// answer is "yes", so nothing of a live run is ever removed).
pub fn process_alive(pid: u32) -> bool {
    let proc = Path::new("/proc");
    !proc.is_dir() || proc.join(pid.to_string()).exists()
}

/// Removes the labelled containers left by test binaries of this machine that are no
/// longer running (a killed run, or the shared containers of a binary that exited without
/// its cleanup). Containers of live runs, and of other machines, are left alone.
pub fn remove_stale(ep: &Endpoint) -> Vec<String> {
    let me = host_name();
    let Ok(list) = labelled_containers(ep) else {
        return Vec::new();
    };
    let mut removed = Vec::new();
    for (id, labels) in list {
        let host = labels[LABEL_HOST].as_str().unwrap_or_default();
        let pid = labels[LABEL_PID]
            .as_str()
            .and_then(|p| p.parse::<u32>().ok());
        let stale = host == me && pid.is_none_or(|p| !process_alive(p));
        if stale && remove(ep, &id).is_ok() {
            removed.push(id);
        }
    }
    removed
}

/// Starts the API-version shim on a Unix socket in `dir`, forwarding to `upstream` and
/// rewriting `/vX.Y/` request paths above `max` down to `max`. Runs on its own thread
/// (with its own runtime) for the life of the process; returns the socket path.
pub fn start_shim(upstream: Endpoint, max: (u32, u32), dir: &Path) -> std::io::Result<PathBuf> {
    let path = dir.join("docker-api-shim.sock");
    let listener = std::os::unix::net::UnixListener::bind(&path)?;
    listener.set_nonblocking(true)?;
    std::thread::Builder::new()
        .name("docker-api-shim".into())
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime for the Docker API shim");
            rt.block_on(async move {
                let listener = tokio::net::UnixListener::from_std(listener)
                    .expect("the shim socket joins the runtime");
                while let Ok((client, _)) = listener.accept().await {
                    let upstream = upstream.clone();
                    tokio::spawn(async move {
                        let result = match &upstream {
                            Endpoint::Unix(p) => match tokio::net::UnixStream::connect(p).await {
                                Ok(s) => relay(client, s, max).await,
                                Err(e) => Err(e),
                            },
                            Endpoint::Tcp(a) => match tokio::net::TcpStream::connect(a).await {
                                Ok(s) => relay(client, s, max).await,
                                Err(e) => Err(e),
                            },
                        };
                        if let Err(e) = result {
                            use std::io::ErrorKind::{BrokenPipe, ConnectionReset, NotConnected};
                            // A side hanging up mid-copy is how HTTP connections end.
                            if !matches!(e.kind(), BrokenPipe | ConnectionReset | NotConnected) {
                                eprintln!("docker API shim: connection to {upstream} failed: {e}");
                            }
                        }
                    });
                }
            });
        })?;
    Ok(path)
}

/// Copies both ways; the client's bytes go through [`VersionRewriter`].
async fn relay<U>(
    client: tokio::net::UnixStream,
    upstream: U,
    max: (u32, u32),
) -> std::io::Result<()>
where
    U: AsyncRead + AsyncWrite + Unpin,
{
    let (mut cr, mut cw) = client.into_split();
    let (mut ur, mut uw) = tokio::io::split(upstream);
    let up = async move {
        let mut rw = VersionRewriter::new(max);
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            // A held-back tail (a possible start of a version) is flushed when the client
            // pauses, so a request never waits on bytes that will not come.
            let n = if rw.holding() {
                match tokio::time::timeout(Duration::from_millis(20), cr.read(&mut buf)).await {
                    Ok(r) => r?,
                    Err(_) => {
                        uw.write_all(&rw.flush()).await?;
                        continue;
                    }
                }
            } else {
                cr.read(&mut buf).await?
            };
            if n == 0 {
                uw.write_all(&rw.flush()).await?;
                uw.shutdown().await?;
                return Ok::<_, std::io::Error>(());
            }
            let out = rw.feed(&buf[..n]);
            uw.write_all(&out).await?;
        }
    };
    let down = async move {
        tokio::io::copy(&mut ur, &mut cw).await?;
        cw.shutdown().await
    };
    let (a, b) = tokio::join!(up, down);
    a.and(b)
}

/// Rewrites ` /v1.NN/` (a request path's version, same length before and after) when
/// `1.NN` is above the engine's maximum. Streaming: a tail that could be the start of
/// such a path is held back until the next bytes (or [`VersionRewriter::flush`]).
#[derive(Debug)]
pub struct VersionRewriter {
    max: (u32, u32),
    held: Vec<u8>,
}

const PREFIX: &[u8] = b" /v";
/// ` /v` + `d.dd` + `/`.
const MATCH_LEN: usize = 8;

impl VersionRewriter {
    /// A rewriter down to `max`.
    pub fn new(max: (u32, u32)) -> Self {
        Self {
            max,
            held: Vec::new(),
        }
    }

    /// Whether bytes are held back.
    pub fn holding(&self) -> bool {
        !self.held.is_empty()
    }

    /// Everything held back.
    pub fn flush(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.held)
    }

    /// Takes `input`, returns what can be forwarded now.
    pub fn feed(&mut self, input: &[u8]) -> Vec<u8> {
        let mut data = std::mem::take(&mut self.held);
        data.extend_from_slice(input);
        let target = format!("{}.{}", self.max.0, self.max.1).into_bytes();
        let mut i = 0;
        while i + MATCH_LEN <= data.len() {
            if data[i..].starts_with(PREFIX) && data[i + MATCH_LEN - 1] == b'/' {
                let v = &data[i + 3..i + MATCH_LEN - 1];
                let parsed = std::str::from_utf8(v).ok().and_then(parse_version);
                if let Some(ver) = parsed {
                    if ver > self.max && target.len() == v.len() {
                        data[i + 3..i + MATCH_LEN - 1].copy_from_slice(&target);
                    }
                }
            }
            i += 1;
        }
        // Hold back a tail that is a proper prefix of a match.
        let start = data.len().saturating_sub(MATCH_LEN - 1);
        let keep_from = (start..data.len())
            .find(|&j| could_start_match(&data[j..]))
            .unwrap_or(data.len());
        self.held = data.split_off(keep_from);
        data
    }
}

fn could_start_match(tail: &[u8]) -> bool {
    let n = tail.len().min(PREFIX.len());
    if tail[..n] != PREFIX[..n] {
        return false;
    }
    tail.iter()
        .skip(PREFIX.len())
        .all(|b| b.is_ascii_digit() || *b == b'.')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(max: (u32, u32), chunks: &[&[u8]]) -> Vec<u8> {
        let mut rw = VersionRewriter::new(max);
        let mut out = Vec::new();
        for c in chunks {
            out.extend(rw.feed(c));
        }
        out.extend(rw.flush());
        out
    }

    #[test]
    fn a_newer_version_in_a_request_line_is_lowered_to_the_engine_maximum() {
        let out = run((1, 41), &[b"GET /v1.53/containers/json HTTP/1.1\r\n\r\n"]);
        assert_eq!(out, b"GET /v1.41/containers/json HTTP/1.1\r\n\r\n");
    }

    #[test]
    fn a_version_split_across_reads_is_still_rewritten() {
        let out = run(
            (1, 41),
            &[b"POST /v1", b".5", b"3/containers/create HTTP/1.1\r\n"],
        );
        assert_eq!(out, b"POST /v1.41/containers/create HTTP/1.1\r\n");
    }

    #[test]
    fn versions_the_engine_knows_and_other_bytes_pass_unchanged() {
        let input: &[u8] = b"GET /v1.40/x HTTP/1.1\r\n\r\n{\"a\":\" /v9\"} /va/";
        assert_eq!(run((1, 41), &[input]), input);
    }
}
