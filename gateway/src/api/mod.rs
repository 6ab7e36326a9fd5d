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
mod schemas;
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
use axum::routing::post;
use axum::{Json, Router};
use iotgw_providers::ProviderError;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

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

/// The API's OpenAPI document, as `derive(OpenApi)` starts it: what is not an operation.
#[derive(utoipa::OpenApi)]
#[openapi(
    servers((url = "/")),
    security(("bearerAuth" = [])),
    tags(
        (name = "devices", description = "Devices, their registration, state, readings and linked records."),
        (name = "categories", description = "Device categories."),
        (name = "commands", description = "Commands to devices."),
        (name = "alerts", description = "Alerts and what Field Service made of them."),
        (name = "dead-letters", description = "Refused telemetry and undeliverable outbox items."),
        (name = "operations", description = "Health, metrics, configuration and this document."),
        (name = "field-service", description = "Field Service's IoT provider actions."),
    ),
    components(
        // What only parameters and hand-built schemas refer to (an operation's bodies
        // bring in their own schemas).
        schemas(
            schemas::Error,
            schemas::DeviceId,
            schemas::RegistrationStatus,
            schemas::RegistrationStatusFilter,
            schemas::CommandStatus,
            schemas::CommandStatusFilter,
            schemas::AlertType,
            schemas::AlertTypeFilter,
            cfs::AggregateMeasure,
            schemas::Reload,
        ),
        responses(
            schemas::BadRequest,
            schemas::BadRequestOrProviderInvalid,
            schemas::Unauthorized,
            schemas::NotFound,
            schemas::Conflict,
            schemas::RegisterConflict,
            schemas::PayloadTooLarge,
            schemas::MisdirectedRequest,
            schemas::Throttled,
            schemas::Unsupported,
            schemas::ProviderFailed,
            schemas::StoreUnavailable,
        ),
    ),
    modifiers(&BearerAuth),
)]
struct ApiDoc;

/// The `bearerAuth` security scheme.
struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        doc.components
            .get_or_insert_with(Default::default)
            .add_security_scheme(
                "bearerAuth",
                SecurityScheme::Http(
                    HttpBuilder::new()
                        .scheme(HttpAuthScheme::Bearer)
                        .description(Some(
                            "`Authorization: Bearer <api.token>` (the scheme in any case). Needed on every \
                             route but `/live`, `/ready` and `/api/openapi.json` when `api.token` is \
                             configured; without `api.token` configured no token is needed (and the API \
                             answers only loopback `Host` names).",
                        ))
                        .build(),
                ),
            );
    }
}

/// The document's description.
const OPENAPI_DESCRIPTION: &str = include_str!("openapi_description.md");

/// Routes outside the bearer token, each with its OpenAPI operation.
fn open_routes() -> OpenApiRouter<ApiState> {
    OpenApiRouter::new()
        .routes(routes!(handlers::live))
        .routes(routes!(handlers::ready))
        .routes(routes!(handlers::openapi_json_document))
}

/// Routes behind the bearer token, each with its OpenAPI operation: the router and the
/// document come from these same registrations.
fn token_routes() -> OpenApiRouter<ApiState> {
    use handlers::*;
    use utoipa_axum::router::UtoipaMethodRouterExt;
    OpenApiRouter::new()
        .routes(routes!(register_device, list_devices))
        .routes(
            routes!(register_batch)
                .layer(axum::extract::DefaultBodyLimit::max(MAX_BATCH_BODY_BYTES)),
        )
        .routes(routes!(
            get_device_named_batch,
            unregister_device_named_batch
        ))
        .routes(routes!(get_device, unregister_device))
        .routes(routes!(move_device))
        .routes(routes!(device_history))
        .routes(routes!(device_state))
        .routes(routes!(device_properties))
        .routes(routes!(readings::device_readings))
        .routes(routes!(list_categories, upsert_category))
        .routes(routes!(send_command, list_commands))
        .routes(routes!(get_command))
        .routes(routes!(list_entity_links))
        .routes(routes!(list_alerts))
        .routes(routes!(get_alert))
        .routes(routes!(close_alert))
        .routes(routes!(alert_case))
        .routes(routes!(alert_work_order))
        .routes(routes!(list_dead_letters))
        .routes(routes!(replay_dead_letters))
        .routes(routes!(replay_dead_letter))
        .routes(routes!(providers))
        .routes(routes!(config_version))
        .routes(routes!(config_reload))
        .routes(routes!(openapi_yaml_document))
        .routes(routes!(cfs::register_devices))
        .routes(routes!(cfs::pull_device_data))
        .routes(routes!(cfs::send_command))
        .routes(routes!(cfs::send_test_alert))
        .routes(routes!(cfs::update_device_data))
        .routes(routes!(cfs::register_custom_entity))
        .routes(routes!(cfs::json_get_boolean))
        .routes(routes!(cfs::json_get_number))
        .routes(routes!(cfs::json_get_string))
        .routes(routes!(cfs::query_device_readings))
        .routes(routes!(cfs::aggregated_device_readings))
        .routes(routes!(metrics))
}

/// The API's OpenAPI 3.1 document, generated from the handlers' `#[utoipa::path]`
/// annotations and the types they name, for the routes [`router`] serves (the cloud
/// webhooks and the console are not part of it).
pub fn openapi() -> utoipa::openapi::OpenApi {
    use utoipa::OpenApi as _;
    let mut doc = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .merge(open_routes())
        .merge(token_routes())
        .into_openapi();
    doc.info.title = "iotgw".into();
    doc.info.version = env!("CARGO_PKG_VERSION").into();
    doc.info.description = Some(OPENAPI_DESCRIPTION.into());
    // The open routes take no token: `security: []`, not the document's bearerAuth.
    for item in doc.paths.paths.values_mut() {
        for op in [&mut item.get, &mut item.post].into_iter().flatten() {
            if op
                .security
                .as_ref()
                .is_some_and(|s| s.iter().all(|r| r == &Default::default()))
            {
                op.security = Some(Vec::new());
            }
        }
    }
    doc
}

/// [`openapi`] as JSON, built once.
pub fn openapi_json() -> &'static str {
    static JSON: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    JSON.get_or_init(|| {
        let mut text = openapi()
            .to_pretty_json()
            .unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"));
        text.push('\n');
        text
    })
}

/// [`openapi`] as YAML, built once.
pub fn openapi_yaml() -> &'static str {
    static YAML: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    YAML.get_or_init(|| {
        openapi()
            .to_yaml()
            .unwrap_or_else(|e| format!("error: {e}\n"))
    })
}

/// The API router.
pub fn router(state: ApiState) -> Router {
    let (api, _) = token_routes()
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            require_token,
        ))
        .split_for_parts();
    let (open, _) = open_routes().split_for_parts();
    Router::new()
        // Cloud webhooks (Azure Event Grid): outside the bearer token; each provider's
        // endpoint checks its own shared secret. Not part of the API's document.
        .route("/hooks/{instance}", post(push_hook).options(push_hook))
        .merge(open)
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
    use std::collections::{BTreeMap, BTreeSet};
    use std::sync::Arc;
    use std::time::Duration;

    use axum::body::Body;
    use axum::http::{Method, Request, StatusCode};
    use tower::ServiceExt;

    use super::ApiState;

    const METHODS: [&str; 6] = ["get", "post", "put", "patch", "delete", "options"];

    /// Every (path, method) of the generated document.
    fn documented() -> BTreeSet<(String, String)> {
        let doc: serde_json::Value =
            serde_json::from_str(super::openapi_json()).expect("the document is JSON");
        let mut routes = BTreeSet::new();
        for (path, item) in doc["paths"].as_object().expect("paths") {
            for method in item.as_object().expect("a path item").keys() {
                if METHODS.contains(&method.as_str()) {
                    routes.insert((path.clone(), method.clone()));
                }
            }
        }
        routes
    }

    /// A gateway's API state on an in-memory store, with no provider, no sink and no token.
    async fn state() -> ApiState {
        let mut config = iotgw_config::Config::embedded_default();
        config.sinks.clear();
        let store: Arc<dyn iotgw_registry::Store> = Arc::new(
            iotgw_registry::SqliteStore::memory()
                .await
                .expect("in-memory store"),
        );
        let metrics = Arc::new(crate::metrics::Metrics::new());
        let core = Arc::new(crate::core::Core::new(
            store.clone(),
            metrics.clone(),
            Arc::new(tokio::sync::Notify::new()),
            "test".into(),
            crate::live::Live::new(1, Arc::new(config), BTreeMap::new()),
        ));
        let (events, _) = tokio::sync::mpsc::channel(1);
        let instances = Arc::new(crate::instances::Instances::new(
            events,
            store.clone(),
            "test".into(),
            metrics.clone(),
        ));
        let (_, drain) = tokio::sync::watch::channel(None);
        let outbox = crate::sinks::spawn_workers(
            store,
            Vec::new(),
            Arc::new(tokio::sync::Notify::new()),
            metrics,
            tokio_util::sync::CancellationToken::new(),
            drain,
            crate::sinks::Leasing {
                holder: "test".into(),
                lease: Duration::from_secs(30),
            },
        );
        let reloader = Arc::new(crate::reload::Reloader::new(
            core.clone(),
            None,
            Arc::new(tokio::sync::Mutex::new(outbox)),
            instances,
        ));
        ApiState {
            core,
            readiness: Arc::new(crate::health::Readiness::new(Duration::from_secs(0))),
            reloader,
        }
    }

    /// What the real router answers `method path` (an empty body, a loopback `Host`): the
    /// status, and whether it is the router's own "no such route" 404.
    async fn probe(app: &axum::Router, method: &str, path: &str) -> (StatusCode, bool) {
        let uri = path.replace("{id}", "probe-1");
        let req = Request::builder()
            .method(Method::from_bytes(method.to_ascii_uppercase().as_bytes()).expect("method"))
            .uri(&uri)
            .header("host", "localhost")
            .body(Body::empty())
            .expect("request");
        let resp = app.clone().oneshot(req).await.expect("an answer");
        let status = resp.status();
        let body = axum::body::to_bytes(resp.into_body(), 1 << 20)
            .await
            .expect("body");
        let unrouted = status == StatusCode::NOT_FOUND
            && String::from_utf8_lossy(&body).contains("no such route");
        (status, unrouted)
    }

    /// The router side is the real router, asked: every documented (path, method) is served
    /// (not the router's 404, not 405), and every other method on a documented path is a
    /// 405. And no route reaches the router but through `routes!` (which documents it),
    /// apart from the cloud webhooks, which are not part of the API: so a path the document
    /// lacks cannot be served either.
    #[tokio::test]
    async fn the_openapi_document_describes_exactly_the_routes_the_router_serves() {
        let documented = documented();
        assert!(documented.len() > 40, "{documented:?}");
        let app = super::router(state().await);
        let mut wrong = Vec::new();
        let paths: BTreeSet<&String> = documented.iter().map(|(p, _)| p).collect();
        for path in paths {
            for method in METHODS {
                let (status, unrouted) = probe(&app, method, path).await;
                let served = !unrouted && status != StatusCode::METHOD_NOT_ALLOWED;
                if served != documented.contains(&(path.clone(), method.to_owned())) {
                    wrong.push(format!(
                        "{method} {path}: {status} (documented: {})",
                        !served
                    ));
                }
            }
        }
        assert!(
            wrong.is_empty(),
            "the router and the document disagree:\n{}",
            wrong.join("\n")
        );

        // The batch route keeps its own body limit (16 MiB), the others 1 MiB.
        let padded = format!("{{\"devices\": []{}}}", " ".repeat(2 << 20));
        for (path, want) in [
            ("/api/v1/devices/batch", StatusCode::BAD_REQUEST),
            ("/api/v1/devices", StatusCode::PAYLOAD_TOO_LARGE),
        ] {
            let req = Request::builder()
                .method(Method::POST)
                .uri(path)
                .header("host", "localhost")
                .header("content-type", "application/json")
                .body(Body::from(padded.clone()))
                .expect("request");
            let resp = app.clone().oneshot(req).await.expect("an answer");
            assert_eq!(resp.status(), want, "a 2 MiB body to {path}");
        }

        // Every route but the webhooks goes through `routes!`: a plain `.route(` would be
        // served without an operation in the document.
        let src = include_str!("mod.rs");
        let start = src.find("fn open_routes(").expect("the routes");
        let end = src.find("#[cfg(test)]").expect("the tests");
        let plain: Vec<&str> = src[start..end]
            .split(".route(")
            .skip(1)
            .map(|chunk| chunk.split('"').nth(1).unwrap_or_default())
            .collect();
        assert_eq!(
            plain,
            ["/hooks/{instance}"],
            "routes served outside `routes!`"
        );
    }

    #[test]
    fn the_openapi_document_is_openapi_3_1_and_names_the_workspace_version() {
        let doc: serde_json::Value =
            serde_json::from_str(super::openapi_json()).expect("the document is JSON");
        assert!(
            doc["openapi"]
                .as_str()
                .is_some_and(|v| v.starts_with("3.1.")),
            "{}",
            doc["openapi"]
        );
        assert_eq!(doc["info"]["version"], env!("CARGO_PKG_VERSION"));
        assert_eq!(doc["info"]["title"], "iotgw");
        // The YAML route serves the same document.
        let yaml = yaml_rust2::YamlLoader::load_from_str(super::openapi_yaml()).expect("YAML");
        assert_eq!(yaml[0]["openapi"].as_str(), doc["openapi"].as_str());
        assert_eq!(
            yaml[0]["paths"].as_hash().map(|p| p.len()),
            doc["paths"].as_object().map(|p| p.len())
        );
    }

    /// Every `$ref` names a component the document has, and every operation has an id,
    /// a tag and a summary.
    #[test]
    fn every_reference_of_the_openapi_document_resolves_and_every_operation_is_described() {
        fn refs<'v>(v: &'v serde_json::Value, out: &mut Vec<&'v str>) {
            match v {
                serde_json::Value::Object(map) => {
                    for (k, v) in map {
                        match (k.as_str(), v) {
                            ("$ref", serde_json::Value::String(r)) => out.push(r),
                            _ => refs(v, out),
                        }
                    }
                }
                serde_json::Value::Array(items) => items.iter().for_each(|v| refs(v, out)),
                _ => {}
            }
        }
        let doc: serde_json::Value =
            serde_json::from_str(super::openapi_json()).expect("the document is JSON");
        let mut found = Vec::new();
        refs(&doc, &mut found);
        assert!(!found.is_empty());
        let dangling: Vec<_> = found
            .into_iter()
            .filter(|r| {
                let pointer = r.strip_prefix('#').unwrap_or(r);
                doc.pointer(pointer).is_none()
            })
            .collect();
        assert!(dangling.is_empty(), "unresolved references: {dangling:?}");
        let mut ids = BTreeSet::new();
        for (path, item) in doc["paths"].as_object().expect("paths") {
            for (method, op) in item.as_object().expect("a path item") {
                let id = op["operationId"].as_str().unwrap_or_default();
                assert!(
                    ids.insert(id.to_owned()),
                    "{method} {path}: id {id:?} twice"
                );
                assert!(op["tags"][0].is_string(), "{method} {path} has no tag");
                assert!(op["summary"].is_string(), "{method} {path} has no summary");
            }
        }
    }

    /// `docs/openapi.json` is the generated document, for readers of the repository;
    /// `OPENAPI_UPDATE=1 cargo test -p iotgw --lib api::` rewrites it.
    #[test]
    fn docs_openapi_json_is_the_generated_document() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/openapi.json");
        let generated = super::openapi_json();
        if std::env::var("OPENAPI_UPDATE").as_deref() == Ok("1") {
            std::fs::write(&path, generated).expect("write docs/openapi.json");
        }
        let committed = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            committed == generated,
            "docs/openapi.json differs from the document the code generates: run \
             `OPENAPI_UPDATE=1 cargo test -p iotgw --lib api::` and commit the result"
        );
    }
}
