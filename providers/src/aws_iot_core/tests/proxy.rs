//! A fault-injecting HTTP proxy between the SDK and moto: it answers one chosen operation
//! with an AWS-shaped error and forwards everything else unchanged. It also notes the
//! certificate ids moto hands out, so a test knows which certificate a failed
//! registration created even though the provider never returned it.

use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderName, HeaderValue, StatusCode};
use axum::response::Response;
use axum::Router;
use tokio::task::JoinHandle;

/// The operation to fail, by HTTP method and path (the IoT APIs are REST: AttachPolicy
/// is `PUT /target-policies/{policy}`, AttachThingPrincipal `PUT /things/{thing}/principals`,
/// Publish `POST /topics/{topic}`).
#[derive(Clone, Debug)]
pub struct Fault {
    /// HTTP method.
    pub method: &'static str,
    /// The path starts with this.
    pub path_starts: &'static str,
    /// The path ends with this.
    pub path_ends: &'static str,
    /// HTTP status to answer.
    pub status: u16,
    /// AWS error code (`x-amzn-ErrorType` and `__type`).
    pub code: &'static str,
    /// `Retry-After` seconds to announce.
    pub retry_after: Option<u32>,
}

impl Fault {
    fn matches(&self, method: &str, path: &str) -> bool {
        method == self.method
            && path.starts_with(self.path_starts)
            && path.ends_with(self.path_ends)
    }
}

struct ProxyState {
    upstream: String,
    fault: Fault,
    http: reqwest::Client,
    certificates: Mutex<Vec<String>>,
    injected: Mutex<u32>,
}

/// A running proxy.
pub struct FaultProxy {
    /// The URL to give the SDK as `endpoint_url`.
    pub url: String,
    state: Arc<ProxyState>,
    task: JoinHandle<()>,
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FaultProxy {
    /// Listens on a free loopback port, forwarding to `upstream` except `fault`.
    pub async fn start(upstream: &str, fault: Fault) -> Self {
        let state = Arc::new(ProxyState {
            upstream: upstream.trim_end_matches('/').to_owned(),
            fault,
            http: reqwest::Client::new(),
            certificates: Mutex::new(Vec::new()),
            injected: Mutex::new(0),
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("proxy port");
        let url = format!("http://{}", listener.local_addr().expect("proxy address"));
        let app = Router::new().fallback(handle).with_state(state.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self { url, state, task }
    }

    /// Certificate ids CreateKeysAndCertificate answered with, in order.
    pub fn certificates_created(&self) -> Vec<String> {
        self.state.certificates.lock().expect("proxy lock").clone()
    }

    /// How many times the fault was answered.
    pub fn faults_injected(&self) -> u32 {
        *self.state.injected.lock().expect("proxy lock")
    }
}

async fn handle(State(s): State<Arc<ProxyState>>, req: Request) -> Response {
    let method = req.method().as_str().to_owned();
    let path = req.uri().path().to_owned();
    if s.fault.matches(&method, &path) {
        *s.injected.lock().expect("proxy lock") += 1;
        let body = serde_json::json!({
            "__type": s.fault.code,
            "message": format!("injected by the test proxy for {method} {path}"),
        });
        let mut res = Response::new(Body::from(body.to_string()));
        *res.status_mut() = StatusCode::from_u16(s.fault.status).expect("valid status");
        let h = res.headers_mut();
        h.insert("content-type", HeaderValue::from_static("application/json"));
        h.insert("x-amzn-errortype", HeaderValue::from_static(s.fault.code));
        if let Some(secs) = s.fault.retry_after {
            h.insert("retry-after", HeaderValue::from(secs));
        }
        return res;
    }
    let path_and_query = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| path.clone());
    let headers = req.headers().clone();
    let body = axum::body::to_bytes(req.into_body(), 16 * 1024 * 1024)
        .await
        .expect("request body");
    let mut forward = s.http.request(
        reqwest::Method::from_bytes(method.as_bytes()).expect("method"),
        format!("{}{path_and_query}", s.upstream),
    );
    for (name, value) in &headers {
        if name != "host" && name != "content-length" {
            forward = forward.header(name.as_str(), value.as_bytes());
        }
    }
    let upstream = forward
        .body(body)
        .send()
        .await
        .expect("moto answers the proxy");
    let status = upstream.status().as_u16();
    let up_headers = upstream.headers().clone();
    let bytes = upstream.bytes().await.expect("moto's body");
    if path.starts_with("/keys-and-certificate") {
        if let Some(id) = serde_json::from_slice::<serde_json::Value>(&bytes)
            .ok()
            .and_then(|v| {
                v.get("certificateId")
                    .and_then(|i| i.as_str())
                    .map(str::to_owned)
            })
        {
            s.certificates.lock().expect("proxy lock").push(id);
        }
    }
    let mut res = Response::new(Body::from(bytes));
    *res.status_mut() = StatusCode::from_u16(status).expect("valid status");
    for (name, value) in &up_headers {
        if name == "content-length" || name == "transfer-encoding" || name == "connection" {
            continue;
        }
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(name.as_str().as_bytes()),
            HeaderValue::from_bytes(value.as_bytes()),
        ) {
            res.headers_mut().append(n, v);
        }
    }
    res
}
