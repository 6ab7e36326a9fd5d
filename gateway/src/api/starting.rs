//! What the API listener answers while the gateway starts (the store may take a while:
//! PostgreSQL that is not up yet): `/live` 200, `/ready` 503 with the reason, and 503 for
//! every other route. So an orchestrator sees a live process that is not ready yet (no
//! restart loop), and an operator sees why.
//!
//! The listening socket is shared with the real API: this server gets a clone of it and
//! stops accepting when the gateway is up; connections that arrive meanwhile wait in the
//! socket's backlog for the real API.

use std::sync::{Arc, Mutex};

use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Why the gateway is not ready yet, updated while it starts.
#[derive(Clone, Debug, Default)]
pub struct StartingReason(Arc<Mutex<String>>);

impl StartingReason {
    /// Records the current reason.
    pub fn set(&self, why: impl Into<String>) {
        *self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = why.into();
    }

    fn get(&self) -> String {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

/// The running start-up server.
#[derive(Debug)]
pub struct StartingServer {
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl StartingServer {
    /// Serves on a clone of `listener` until [`StartingServer::stop`]; `listener` stays
    /// open for the real API.
    /// With `token` (api.token), `/ready` names the reason only to a caller that sends it.
    pub fn start(
        listener: &TcpListener,
        reason: StartingReason,
        token: Option<String>,
    ) -> std::io::Result<Self> {
        let clone = TcpListener::from_std(socket_clone(listener)?)?;
        let why = reason.clone();
        let app = Router::new()
            .route(
                "/live",
                get(|| async { Json(serde_json::json!({"live": true, "starting": true})) }),
            )
            .route(
                "/ready",
                get(move |headers: axum::http::HeaderMap| {
                    let shown = token
                        .as_deref()
                        .is_none_or(|t| super::carries_token(&headers, t));
                    let why = if shown {
                        why.get()
                    } else {
                        "starting (send the API token to see why)".to_owned()
                    };
                    async move {
                        (
                            StatusCode::SERVICE_UNAVAILABLE,
                            Json(serde_json::json!({
                                "ready": false,
                                "store": false,
                                "providers": {},
                                "reasons": [why],
                            })),
                        )
                    }
                }),
            )
            .fallback(|| async {
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    Json(serde_json::json!({"error": {
                        "code": "starting",
                        "message": "the gateway is starting (see /ready for why it is not ready yet); try again shortly",
                    }})),
                )
            });
        let stop = CancellationToken::new();
        let cancelled = stop.clone();
        let task = tokio::spawn(async move {
            if let Err(e) = axum::serve(clone, app)
                .with_graceful_shutdown(async move { cancelled.cancelled().await })
                .await
            {
                tracing::warn!(error = %e, "the start-up API server failed");
            }
        });
        Ok(Self { stop, task })
    }

    /// Stops accepting and waits for the requests in progress.
    pub async fn stop(mut self) {
        self.stop.cancel();
        let _ = (&mut self.task).await;
    }
}

impl Drop for StartingServer {
    /// A start that fails stops answering too.
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// A second handle on the same listening socket.
fn socket_clone(listener: &TcpListener) -> std::io::Result<std::net::TcpListener> {
    use std::os::fd::AsFd;
    let fd = listener.as_fd().try_clone_to_owned()?;
    let std_listener = std::net::TcpListener::from(fd);
    std_listener.set_nonblocking(true)?;
    Ok(std_listener)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn while_starting_live_is_200_ready_is_503_with_the_reason_and_the_socket_survives() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let reason = StartingReason::default();
        reason.set("store: waiting for PostgreSQL at postgres://iotgw:<redacted>@db/iotgw");
        let server = StartingServer::start(&listener, reason, None).expect("start");
        let http = reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(10))
            .build()
            .expect("client");
        let live = http
            .get(format!("http://{addr}/live"))
            .send()
            .await
            .expect("live");
        assert_eq!(live.status(), 200);
        let ready = http
            .get(format!("http://{addr}/ready"))
            .send()
            .await
            .expect("ready");
        assert_eq!(ready.status(), 503);
        let body: serde_json::Value = ready.json().await.expect("json");
        assert_eq!(
            body["reasons"][0],
            "store: waiting for PostgreSQL at postgres://iotgw:<redacted>@db/iotgw"
        );
        let other = http
            .get(format!("http://{addr}/api/v1/devices"))
            .send()
            .await
            .expect("other");
        assert_eq!(other.status(), 503);
        server.stop().await;

        // The original listener still accepts: the real API takes over the same port.
        let app = Router::new().route("/live", get(|| async { "real" }));
        tokio::spawn(async move { axum::serve(listener, app).await });
        let body = http
            .get(format!("http://{addr}/live"))
            .send()
            .await
            .expect("real live")
            .text()
            .await
            .expect("text");
        assert_eq!(body, "real");
    }
}
