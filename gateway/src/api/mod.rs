//! The HTTP API (axum): Field Service-shaped JSON for devices, categories, commands, alerts
//! and dead letters; provider health; `/live`, `/ready`, `/metrics`.
//!
//! Every route but `/live` and `/ready` requires `Authorization: Bearer <api.token>` when a
//! token is configured (always, when listening beyond loopback). Errors are JSON:
//! `{"error": {"code": "...", "message": "..."}}`.

mod handlers;
pub mod starting;

pub use handlers::{MAX_BATCH_BODY_BYTES, MAX_BATCH_DEVICES};

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

async fn require_token(State(state): State<ApiState>, req: Request, next: Next) -> Response {
    let live = state.core.live();
    let Some(token) = live.config.api.token.as_ref() else {
        return next.run(req).await;
    };
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if given.is_some_and(|g| constant_time_eq(g.as_bytes(), token.expose().as_bytes())) {
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
    body: bytes::Bytes,
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
    let request = iotgw_providers::PushRequest {
        method: method.to_string(),
        headers: headers
            .iter()
            .filter_map(|(k, v)| Some((k.as_str().to_owned(), v.to_str().ok()?.to_owned())))
            .collect(),
        query,
        body,
    };
    let answer = endpoint.handle(request).await;
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

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

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
        .route(
            "/api/v1/categories",
            get(list_categories).post(upsert_category),
        )
        .route("/api/v1/commands", post(send_command).get(list_commands))
        .route("/api/v1/commands/{id}", get(get_command))
        .route("/api/v1/alerts", get(list_alerts))
        .route("/api/v1/alerts/{id}", get(get_alert))
        .route("/api/v1/alerts/{id}/close", post(close_alert))
        .route("/api/v1/dead-letters", get(list_dead_letters))
        .route("/api/v1/providers", get(providers))
        .route("/api/v1/config/version", get(config_version))
        .route("/api/v1/config/reload", post(config_reload))
        .route("/metrics", get(metrics))
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
        .fallback(|| async { ApiError::not_found("no such route; see the README's API summary") })
        .with_state(state)
}
