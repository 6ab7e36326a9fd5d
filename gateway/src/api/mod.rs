//! The HTTP API (axum): Field Service-shaped JSON for devices, categories, commands, alerts
//! and dead letters; provider health; `/live`, `/ready`, `/metrics`.
//!
//! Every route but `/live` and `/ready` requires `Authorization: Bearer <api.token>` when a
//! token is configured (always, when listening beyond loopback). Errors are JSON:
//! `{"error": {"code": "...", "message": "..."}}`.
//!
//! Limits: request bodies of at most [`MAX_BODY_BYTES`] (the batch route
//! [`MAX_BATCH_BODY_BYTES`], a webhook [`MAX_HOOK_BODY_BYTES`], read only after the
//! webhook's credentials passed); [`MAX_CONCURRENT_REQUESTS`] requests at once (more wait);
//! [`REQUEST_TIMEOUT`] per request. Without a token (a loopback API), requests must name a
//! loopback host (`Host: localhost:8080`, `127.0.0.1`, `[::1]`), so a web page cannot reach
//! the API through a DNS name rebound to 127.0.0.1. Without the token `/ready` answers only
//! whether the gateway is ready, not why.

mod cfs;
mod handlers;
mod readings;
pub mod starting;

pub use handlers::{MAX_BATCH_BODY_BYTES, MAX_BATCH_DEVICES};

/// The largest request body of a route without a limit of its own.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;
/// The largest body a provider's webhook takes (Event Grid sends at most 1 MB per batch).
pub const MAX_HOOK_BODY_BYTES: usize = 1024 * 1024;
/// Requests served at once; more wait for a slot.
pub const MAX_CONCURRENT_REQUESTS: usize = 256;
/// How long one request may take before it is answered 408 (a batch of 1,000
/// registrations, or a move waiting for a cloud, stays well inside it).
pub const REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(300);

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use iotgw_providers::ProviderError;

use crate::core::{Core, GatewayError};
use crate::health::Readiness;

/// State shared by the handlers.
#[derive(Clone, Debug)]
pub struct ApiState {
    /// The gateway.
    pub core: Arc<Core>,
    /// Readiness tracking.
    pub readiness: Arc<Readiness>,
    /// Config hot reload.
    pub reloader: Arc<crate::reload::Reloader>,
}

/// An API error: status, code, message.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    /// A 400 naming the field.
    pub fn invalid(field: &str, message: impl std::fmt::Display) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            code: "invalid_input",
            message: format!("invalid {field}: {message}"),
        }
    }
    /// 413: the body is over the route's limit.
    pub fn too_large(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::PAYLOAD_TOO_LARGE,
            code: "payload_too_large",
            message: message.into(),
        }
    }

    /// A 405: the route exists, the method does not.
    pub fn method_not_allowed() -> Self {
        Self {
            status: StatusCode::METHOD_NOT_ALLOWED,
            code: "method_not_allowed",
            message:
                "this route does not take this method; the `Allow` header lists the ones it takes"
                    .into(),
        }
    }

    /// A 404.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::NOT_FOUND,
            code: "not_found",
            message: message.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({"error": {"code": self.code, "message": self.message}});
        (self.status, Json(body)).into_response()
    }
}

impl From<GatewayError> for ApiError {
    fn from(e: GatewayError) -> Self {
        let message = e.to_string();
        let (status, code) = match &e {
            GatewayError::Invalid { .. } => (StatusCode::BAD_REQUEST, "invalid_input"),
            GatewayError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            GatewayError::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
            GatewayError::AlreadyRegistered(_) => (StatusCode::CONFLICT, "already_registered"),
            GatewayError::Store(_) => (StatusCode::SERVICE_UNAVAILABLE, "store_unavailable"),
            GatewayError::Provider(p) => match p {
                ProviderError::InvalidInput { .. } => (StatusCode::BAD_REQUEST, "invalid_input"),
                ProviderError::NotFound { .. } => (StatusCode::NOT_FOUND, "not_found"),
                ProviderError::Conflict { .. } => (StatusCode::CONFLICT, "conflict"),
                ProviderError::Throttled { .. } => (StatusCode::TOO_MANY_REQUESTS, "throttled"),
                ProviderError::Unauthorized { .. } => {
                    (StatusCode::BAD_GATEWAY, "provider_unauthorized")
                }
                ProviderError::Unsupported { .. } => (StatusCode::NOT_IMPLEMENTED, "unsupported"),
                ProviderError::Transient { .. } => {
                    (StatusCode::BAD_GATEWAY, "provider_unavailable")
                }
            },
        };
        Self {
            status,
            code,
            message,
        }
    }
}

impl From<iotgw_registry::StoreError> for ApiError {
    fn from(e: iotgw_registry::StoreError) -> Self {
        GatewayError::from(e).into()
    }
}

/// The credentials of an `Authorization` header value of scheme Bearer (any case).
fn bearer(value: &str) -> Option<&str> {
    let (scheme, credentials) = value.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| credentials.trim())
}

/// Whether the request may use the API: no token is configured, or it carries it.
pub(crate) fn authorized(state: &ApiState, headers: &header::HeaderMap) -> bool {
    let live = state.core.live();
    live.config
        .api
        .token
        .as_ref()
        .is_none_or(|token| carries_token(headers, token.expose()))
}

/// Whether the headers carry `token` as a bearer token (compared in constant time).
pub(crate) fn carries_token(headers: &header::HeaderMap, token: &str) -> bool {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(bearer)
        .is_some_and(|given| {
            bool::from(subtle::ConstantTimeEq::ct_eq(
                given.as_bytes(),
                token.as_bytes(),
            ))
        })
}

async fn require_token(State(state): State<ApiState>, req: Request, next: Next) -> Response {
    if authorized(&state, req.headers()) {
        next.run(req).await
    } else {
        state.core.metrics.api_auth_failure();
        let mut resp = ApiError {
            status: StatusCode::UNAUTHORIZED,
            code: "unauthorized",
            message: "missing or wrong bearer token: send `Authorization: Bearer <api.token>`"
                .into(),
        }
        .into_response();
        resp.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Bearer"),
        );
        resp
    }
}

/// Forwards `POST|OPTIONS /hooks/{instance}` to the provider's push endpoint (404 when
/// the instance has none).
async fn push_hook(
    State(state): State<ApiState>,
    axum::extract::Path(instance): axum::extract::Path<String>,
    axum::extract::Query(query): axum::extract::Query<Vec<(String, String)>>,
    method: axum::http::Method,
    headers: axum::http::HeaderMap,
    body: axum::body::Body,
) -> Response {
    let Some(endpoint) = state
        .core
        .live()
        .providers
        .get(&instance)
        .and_then(|p| p.push_endpoint())
    else {
        return ApiError::not_found(format!(
            "provider instance `{instance}` has no webhook (configure its event_grid section)"
        ))
        .into_response();
    };
    let mut request = iotgw_providers::PushRequest {
        method: method.to_string(),
        headers: headers
            .iter()
            .filter_map(|(k, v)| Some((k.as_str().to_owned(), v.to_str().ok()?.to_owned())))
            .collect(),
        query,
        body: bytes::Bytes::new(),
    };
    // The credentials first: a caller without them never gets the body read.
    let answer = match endpoint.authorize(&request) {
        Some(refused) => refused,
        None => match axum::body::to_bytes(body, MAX_HOOK_BODY_BYTES).await {
            Ok(body) => {
                request.body = body;
                endpoint.handle(request).await
            }
            Err(_) => {
                return ApiError::too_large(format!(
                    "the body exceeds {MAX_HOOK_BODY_BYTES} bytes (or could not be read): send smaller batches"
                ))
                .into_response()
            }
        },
    };
    let mut resp = Response::new(axum::body::Body::from(answer.body));
    *resp.status_mut() =
        StatusCode::from_u16(answer.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    for (k, v) in answer.headers {
        if let (Ok(k), Ok(v)) = (
            header::HeaderName::try_from(k),
            header::HeaderValue::try_from(v),
        ) {
            resp.headers_mut().insert(k, v);
        }
    }
    resp
}

/// Whether `host` (a `Host` header value) names this machine's loopback.
fn loopback_host(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => host.rsplit_once(':').map_or(host, |(name, _)| name),
    };
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Without a token the API answers only requests that name a loopback host.
async fn guard_host(State(state): State<ApiState>, req: Request, next: Next) -> Response {
    if state.core.live().config.api.token.is_some() {
        return next.run(req).await;
    }
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .or_else(|| req.uri().authority().map(|a| a.to_string()));
    match host {
        Some(h) if !loopback_host(&h) => ApiError {
            status: StatusCode::MISDIRECTED_REQUEST,
            code: "host_not_allowed",
            message: format!(
                "Host `{h}` is not this gateway's: without api.token the API answers only to localhost, 127.0.0.1 or [::1] (set api.token to serve other names)"
            ),
        }
        .into_response(),
        _ => next.run(req).await,
    }
}

/// The API's OpenAPI document; a test keeps it and [`router`] describing the same routes.
pub const OPENAPI_YAML: &str = include_str!("../../../docs/openapi.yaml");

/// The API router.
pub fn router(state: ApiState) -> Router {
    use handlers::*;
    let api = Router::new()
        .route("/api/v1/devices", post(register_device).get(list_devices))
        .route(
            "/api/v1/devices/batch",
            post(register_batch)
                .layer(axum::extract::DefaultBodyLimit::max(MAX_BATCH_BODY_BYTES))
                .get(get_device_named_batch)
                .delete(unregister_device_named_batch),
        )
        .route(
            "/api/v1/devices/{id}",
            get(get_device).delete(unregister_device),
        )
        .route("/api/v1/devices/{id}/move", post(move_device))
        .route("/api/v1/devices/{id}/history", get(device_history))
        .route("/api/v1/devices/{id}/state", get(device_state))
        .route("/api/v1/devices/{id}/properties", get(device_properties))
        .route(
            "/api/v1/devices/{id}/readings",
            get(readings::device_readings),
        )
        .route(
            "/api/v1/categories",
            get(list_categories).post(upsert_category),
        )
        .route("/api/v1/commands", post(send_command).get(list_commands))
        .route("/api/v1/commands/{id}", get(get_command))
        .route("/api/v1/entity-links", get(list_entity_links))
        .route("/api/v1/alerts", get(list_alerts))
        .route("/api/v1/alerts/{id}", get(get_alert))
        .route("/api/v1/alerts/{id}/close", post(close_alert))
        .route("/api/v1/alerts/{id}/case", post(alert_case))
        .route("/api/v1/alerts/{id}/work-order", post(alert_work_order))
        .route("/api/v1/dead-letters", get(list_dead_letters))
        .route("/api/v1/dead-letters/replay", post(replay_dead_letters))
        .route("/api/v1/dead-letters/{id}/replay", post(replay_dead_letter))
        .route("/api/v1/providers", get(providers))
        .route("/api/v1/config/version", get(config_version))
        .route("/api/v1/config/reload", post(config_reload))
        .route("/api/v1/openapi.yaml", get(openapi))
        .route("/api/cfs/v1/register-devices", post(cfs::register_devices))
        .route("/api/cfs/v1/pull-device-data", post(cfs::pull_device_data))
        .route("/api/cfs/v1/send-command", post(cfs::send_command))
        .route("/api/cfs/v1/send-test-alert", post(cfs::send_test_alert))
        .route(
            "/api/cfs/v1/update-device-data",
            post(cfs::update_device_data),
        )
        .route(
            "/api/cfs/v1/register-custom-entity",
            post(cfs::register_custom_entity),
        )
        .route("/api/cfs/v1/json-get-boolean", post(cfs::json_get_boolean))
        .route("/api/cfs/v1/json-get-number", post(cfs::json_get_number))
        .route("/api/cfs/v1/json-get-string", post(cfs::json_get_string))
        .route(
            "/api/cfs/v1/query-device-readings",
            post(cfs::query_device_readings),
        )
        .route(
            "/api/cfs/v1/aggregated-device-readings",
            post(cfs::aggregated_device_readings),
        )
        .route("/metrics", get(metrics))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            require_token,
        ));
    Router::new()
        .route("/live", get(live))
        .route("/ready", get(ready))
        // Cloud webhooks (Azure Event Grid): outside the bearer token; each provider's
        // endpoint checks its own shared secret.
        .route("/hooks/{instance}", post(push_hook).options(push_hook))
        .merge(api)
        .merge(crate::console::router(state.clone()))
        .fallback(|| async { ApiError::not_found("no such route; see the README's API summary") })
        .method_not_allowed_fallback(|| async { ApiError::method_not_allowed() })
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            guard_host,
        ))
        .layer(tower_http::timeout::TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            REQUEST_TIMEOUT,
        ))
        .layer(tower::limit::GlobalConcurrencyLimitLayer::new(
            MAX_CONCURRENT_REQUESTS,
        ))
        .with_state(state)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    const METHODS: [&str; 6] = ["get", "post", "put", "patch", "delete", "options"];

    /// Every (path, method) [`super::router`] registers, read from this file's source (axum
    /// cannot list a router's routes). The cloud webhooks are not part of the API.
    fn routed() -> BTreeSet<(String, String)> {
        let src = include_str!("mod.rs");
        let start = src.find("pub fn router(").expect("the router");
        let body = &src[start..];
        let body = &body[..body.find("\n}\n").expect("its end")];
        let mut routes = BTreeSet::new();
        for chunk in body.split(".route(").skip(1) {
            let path = chunk.split('"').nth(1).expect("a route's path");
            if path.starts_with("/hooks/") {
                continue;
            }
            for (i, _) in chunk.match_indices('(') {
                let before = &chunk[..i];
                let word = before
                    .rsplit(|c: char| !c.is_ascii_alphanumeric() && c != '_')
                    .next()
                    .unwrap_or_default();
                if METHODS.contains(&word) {
                    routes.insert((path.to_owned(), word.to_owned()));
                }
            }
        }
        routes
    }

    fn documented() -> BTreeSet<(String, String)> {
        let docs = yaml_rust2::YamlLoader::load_from_str(super::OPENAPI_YAML).expect("YAML");
        let paths = docs[0]["paths"].as_hash().expect("paths");
        let mut routes = BTreeSet::new();
        for (path, ops) in paths {
            for method in ops.as_hash().expect("operations").keys() {
                let method = method.as_str().expect("a method");
                if METHODS.contains(&method) {
                    routes.insert((path.as_str().expect("a path").to_owned(), method.to_owned()));
                }
            }
        }
        routes
    }

    #[test]
    fn the_openapi_document_describes_exactly_the_routes_the_router_serves() {
        let (routed, documented) = (routed(), documented());
        assert!(routed.len() > 20, "the source scan found {routed:?}");
        let undocumented: Vec<_> = routed.difference(&documented).collect();
        let unrouted: Vec<_> = documented.difference(&routed).collect();
        assert!(
            undocumented.is_empty() && unrouted.is_empty(),
            "served but not in docs/openapi.yaml: {undocumented:?}; in docs/openapi.yaml but not served: {unrouted:?}"
        );
    }

    #[test]
    fn the_openapi_document_names_the_workspace_version() {
        let docs = yaml_rust2::YamlLoader::load_from_str(super::OPENAPI_YAML).expect("YAML");
        assert_eq!(
            docs[0]["info"]["version"].as_str(),
            Some(env!("CARGO_PKG_VERSION"))
        );
    }
}
