//! Route handlers: thin adapters between HTTP and [`crate::core::Core`] / the store.

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Json;
use iotgw_registry::{
    Alert, AlertFilter, AlertStatus, CommandFilter, DeviceFilter, DeviceId, PageRequest,
    ServiceWork,
};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::schemas::{
    self, BadRequest, BadRequestOrProviderInvalid, Conflict, MisdirectedRequest, NotFound,
    PayloadTooLarge, ProviderFailed, RegisterConflict, StoreUnavailable, Throttled, Unauthorized,
    Unsupported,
};
use super::{ApiError, ApiState};
use crate::core::{RegisterRequest, Registered};

type ApiResult<T> = Result<T, ApiError>;

fn body<T>(b: Result<Json<T>, JsonRejection>) -> ApiResult<T> {
    b.map(|Json(v)| v).map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::too_large(format!(
                "the request body exceeds this route's limit ({} bytes; the batch route takes {} bytes): send less",
                super::MAX_BODY_BYTES,
                MAX_BATCH_BODY_BYTES
            ))
        } else {
            ApiError::invalid("request body", e.body_text())
        }
    })
}

/// A route's `{id}` segment. axum's own refusal of one that is not UTF-8 once
/// percent-decoded is plain text; this one is the API's JSON error naming `id`.
pub(super) struct IdPath(pub(super) String);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for IdPath {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, Self::Rejection> {
        Path::<String>::from_request_parts(parts, state)
            .await
            .map(|Path(id)| Self(id))
            .map_err(|e| ApiError::invalid("id", e.body_text()))
    }
}

fn device_id(raw: &str) -> ApiResult<DeviceId> {
    DeviceId::parse(raw).map_err(|e| ApiError::invalid("msdyn_deviceid", e))
}

fn uuid(raw: &str, what: &str) -> ApiResult<Uuid> {
    Uuid::parse_str(raw)
        .map_err(|e| ApiError::invalid(what, format!("`{raw}` is not a UUID ({e})")))
}

fn page(
    p: Result<Query<PageRequest>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<PageRequest> {
    let Query(mut p) = p.map_err(|e| ApiError::invalid("paging", e.body_text()))?;
    p.limit = p.limit.clamp(1, 1000);
    Ok(p)
}

/// Liveness: 200 while every long-running task of the gateway is alive; 503 naming the
/// ones that ended before their time (a restart is the remedy). Why they ended (a panic's
/// message may quote input) only with the token when one is configured, as for `/ready`.
#[utoipa::path(
    get,
    path = "/live",
    tag = "operations",
    operation_id = "get_live",
    summary = "Liveness - whether the gateway's long-running tasks are all alive.",
    description = "Open to probes: no token needed. 503 names the gateway tasks that ended before \
their time (a restart is the remedy); why they ended only when the caller is authorized (no \
`api.token` configured, or the right bearer token sent): `ended` is then a map of task to \
reason, else a list of task names with `details`.",
    security(()),
    responses(
        (status = 200, description = "Every long-running task is alive.", body = schemas::Live),
        MisdirectedRequest,
        (status = 503, description = "Some task ended before its time.", body = schemas::Live),
    )
)]
pub(super) async fn live(
    State(s): State<ApiState>,
    headers: axum::http::HeaderMap,
) -> impl IntoResponse {
    let ended = s.core.vitals.ended();
    if ended.is_empty() {
        return (StatusCode::OK, Json(serde_json::json!({"live": true})));
    }
    let body = if super::authorized(&s, &headers) {
        serde_json::json!({"live": false, "ended": ended})
    } else {
        serde_json::json!({
            "live": false,
            "ended": ended.keys().collect::<Vec<_>>(),
            "details": "send the API token (Authorization: Bearer ...) to see why",
        })
    };
    (StatusCode::SERVICE_UNAVAILABLE, Json(body))
}

/// The readiness verdict; its reasons (store errors, provider errors) only with the token
/// when one is configured, since `/ready` is open to probes.
#[utoipa::path(
    get,
    path = "/ready",
    tag = "operations",
    operation_id = "get_ready",
    summary = "Readiness - store answers and takes writes, required providers connected.",
    description = "Open to probes: no token needed. An authorized caller (no `api.token` \
configured, or the right bearer token sent) gets the full report (`store`, `providers`, \
`reasons`, `degraded`); any other caller only `ready` and `details`.",
    security(()),
    responses(
        (status = 200, description = "Ready.", body = schemas::Ready),
        MisdirectedRequest,
        (status = 503, description = "Not ready.", body = schemas::Ready),
    )
)]
pub(super) async fn ready(
    State(s): State<ApiState>,
    headers: axum::http::HeaderMap,
) -> impl IntoResponse {
    let report = s.readiness.check(&s.core).await;
    let status = if report.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    if super::authorized(&s, &headers) {
        (
            status,
            Json(serde_json::to_value(report).unwrap_or_default()),
        )
    } else {
        (
            status,
            Json(serde_json::json!({
                "ready": report.ready,
                "details": "send the API token (Authorization: Bearer ...) to see why",
            })),
        )
    }
}

/// `GET /api/openapi.json`: the API's OpenAPI document, generated from the code.
#[utoipa::path(
    get,
    path = "/api/openapi.json",
    tag = "operations",
    operation_id = "openapi_json",
    summary = "This document (OpenAPI 3.1, JSON).",
    description = "Generated from the code: the operations of the routes the API router serves. \
Open like `/live` and `/ready`: no token needed.",
    security(()),
    responses(
        (status = 200, description = "The OpenAPI document of this gateway's version.", body = schemas::OpenApiDocument),
        MisdirectedRequest,
    )
)]
pub(super) async fn openapi_json_document() -> impl IntoResponse {
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        super::openapi_json(),
    )
}

/// `GET /api/v1/openapi.yaml`: the same document as YAML.
#[utoipa::path(
    get,
    path = "/api/v1/openapi.yaml",
    tag = "operations",
    operation_id = "openapi_yaml",
    summary = "This document (OpenAPI 3.1) as YAML.",
    description = "The document `GET /api/openapi.json` serves, as YAML.",
    responses(
        (status = 200, description = "The OpenAPI document of this gateway's version.", body = schemas::OpenApiDocument, content_type = "application/yaml"),
        Unauthorized,
        MisdirectedRequest,
    )
)]
pub(super) async fn openapi_yaml_document() -> impl IntoResponse {
    (
        [(axum::http::header::CONTENT_TYPE, "application/yaml")],
        super::openapi_yaml(),
    )
}

#[utoipa::path(
    get,
    path = "/metrics",
    tag = "operations",
    operation_id = "get_metrics",
    summary = "Prometheus metrics (OpenMetrics text).",
    description = "The metrics in the OpenMetrics text format; the response's `Content-Type` is \
`application/openmetrics-text; version=1.0.0; charset=utf-8`.",
    responses(
        (status = 200, description = "The metrics.", body = String, content_type = "application/openmetrics-text"),
        Unauthorized,
        MisdirectedRequest,
    )
)]
pub(super) async fn metrics(State(s): State<ApiState>) -> impl IntoResponse {
    if let Ok(depths) = s.core.store.outbox_depth().await {
        for sink in &s.core.live().sinks {
            let d = depths
                .iter()
                .find(|(n, _)| n == sink)
                .map_or(0, |(_, d)| *d);
            s.core.metrics.set_outbox_depth(sink, d);
        }
    }
    // The readiness verdict as `/ready` gives it, into `iotgw_ready` and
    // `iotgw_provider_connected`: a scrape alone keeps them true.
    let _ = s.readiness.check(&s.core).await;
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.core.metrics.encode(),
    )
}

#[utoipa::path(
    post,
    path = "/api/v1/devices",
    tag = "devices",
    operation_id = "register_device",
    summary = "Register a device with its provider instance.",
    description = "Routes the device (the request's `msdyn_iotproviderinstance`, else the routing \
rules, else `routing.default`), marks it In Progress, calls the provider, then stores it \
Registered (with a Register history row) or Error (with the provider's message). A device that \
is Unregistered, Unknown or Error is registered again; a Registered one is a 409 \
`already_registered`, an In Progress one a 409 `conflict`. The category is created when it does \
not exist. Credentials, when the provider hands some out, are in this answer only and never \
stored.",
    request_body = schemas::RegisterRequest,
    responses(
        (status = 201, description = "Registered. The record, and the credentials shown this once.", body = schemas::Registered),
        BadRequestOrProviderInvalid, Unauthorized, NotFound, RegisterConflict, PayloadTooLarge,
        MisdirectedRequest, Throttled, Unsupported, ProviderFailed, StoreUnavailable,
    )
)]
pub(super) async fn register_device(
    State(s): State<ApiState>,
    b: Result<Json<RegisterRequest>, JsonRejection>,
) -> ApiResult<impl IntoResponse> {
    let req = body(b)?;
    let reg = s.core.register(req).await?;
    Ok((StatusCode::CREATED, Json(reg)))
}

/// Most devices in one `POST /api/v1/devices/batch`.
pub const MAX_BATCH_DEVICES: usize = 1000;

/// Largest `POST /api/v1/devices/batch` body: a full batch of devices with settings near
/// their 8000-byte limit.
pub const MAX_BATCH_BODY_BYTES: usize = 16 * 1024 * 1024;

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = BatchRequest)]
pub(super) struct BatchBody {
    /// Each item is read on its own, so a malformed one fails alone.
    #[schema(schema_with = schemas::batch_items)]
    devices: Vec<serde_json::Value>,
}

/// The answer of `POST /api/v1/devices/batch`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(super) struct BatchAnswer {
    /// How many devices were registered.
    registered: usize,
    /// The devices that were not registered, by index.
    failed: Vec<BatchFailure>,
    /// The devices that were registered, by index.
    devices: Vec<BatchRegistered>,
}

/// One device of a batch that was not registered: what the single route would have said.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(super) struct BatchFailure {
    /// Position in the request's `devices`.
    index: usize,
    /// The id as given (null when the item had no string id).
    #[schema(required = true)]
    msdyn_deviceid: Option<String>,
    /// The status the single route would answer (400, 404, 409, 429, 501, 502, 503).
    status: u16,
    /// The error code (`invalid_input`, `already_registered`, `conflict`, ...).
    code: &'static str,
    /// What went wrong and what to do.
    error: String,
}

/// One device of a batch that was registered.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(super) struct BatchRegistered {
    /// Position in the request's `devices`.
    index: usize,
    /// The record and the credentials shown this once.
    #[serde(flatten)]
    #[schema(value_type = schemas::Registered)]
    registered: Registered,
}

#[utoipa::path(
    post,
    path = "/api/v1/devices/batch",
    tag = "devices",
    operation_id = "register_devices_batch",
    summary = "Register 1 to 1,000 devices in one request.",
    description = "Each device is registered as `POST /api/v1/devices` would register it, with \
the store work in two transactions and at most 32 provider calls in flight. One device's failure \
never fails the others: the answer is 200 whenever the request itself is well formed, and each \
device is reported by its `index` in `devices`, under `devices` (registered) or `failed` (with \
the status and code the single route would have answered). Each item is read on its own, so an \
item that is not a valid registration (any JSON value) fails alone with status 400 in `failed`. \
An empty list, or more than 1,000 items, is a 400 naming `devices`. Bodies may be up to 16 MiB.",
    request_body = BatchBody,
    responses(
        (status = 200, description = "One result per device, in request order within each list.", body = BatchAnswer),
        BadRequest, Unauthorized, PayloadTooLarge, MisdirectedRequest,
    )
)]
pub(super) async fn register_batch(
    State(s): State<ApiState>,
    b: Result<Json<BatchBody>, JsonRejection>,
) -> ApiResult<impl IntoResponse> {
    let items = body(b)?.devices;
    if items.is_empty() {
        return Err(ApiError::invalid(
            "devices",
            format!("the list is empty: give 1 to {MAX_BATCH_DEVICES} devices"),
        ));
    }
    if items.len() > MAX_BATCH_DEVICES {
        return Err(ApiError::invalid(
            "devices",
            format!(
                "{} devices in one request; at most {MAX_BATCH_DEVICES} fit: split the list into requests of {MAX_BATCH_DEVICES} or fewer",
                items.len()
            ),
        ));
    }
    let mut failed = Vec::new();
    let mut indexes = Vec::with_capacity(items.len());
    let mut reqs = Vec::with_capacity(items.len());
    for (index, item) in items.into_iter().enumerate() {
        let given_id = item
            .get("msdyn_deviceid")
            .and_then(|v| v.as_str())
            .map(str::to_owned);
        match RegisterRequest::deserialize(item) {
            Ok(req) => {
                indexes.push(index);
                reqs.push(req);
            }
            Err(e) => failed.push(BatchFailure {
                index,
                msdyn_deviceid: given_id,
                status: StatusCode::BAD_REQUEST.as_u16(),
                code: "invalid_input",
                error: format!("invalid devices[{index}]: {e}"),
            }),
        }
    }
    let mut devices = Vec::with_capacity(reqs.len());
    let ids: Vec<String> = reqs.iter().map(|r| r.msdyn_deviceid.clone()).collect();
    for ((index, id), answer) in indexes
        .into_iter()
        .zip(ids)
        .zip(s.core.register_many(reqs).await)
    {
        match answer {
            Ok(registered) => devices.push(BatchRegistered { index, registered }),
            Err(e) => {
                let e = ApiError::from(e);
                failed.push(BatchFailure {
                    index,
                    msdyn_deviceid: Some(id),
                    status: e.status.as_u16(),
                    code: e.code,
                    error: e.message,
                });
            }
        }
    }
    failed.sort_by_key(|f| f.index);
    Ok(Json(BatchAnswer {
        registered: devices.len(),
        failed,
        devices,
    }))
}

#[utoipa::path(
    get,
    path = "/api/v1/devices",
    tag = "devices",
    operation_id = "list_devices",
    summary = "List devices, filtered and paged by device id.",
    params(schemas::DeviceFilterParams, schemas::PageParams),
    responses(
        (status = 200, description = "A page of devices, in device id order.", body = schemas::DevicePage),
        BadRequest, Unauthorized, MisdirectedRequest, StoreUnavailable,
    )
)]
pub(super) async fn list_devices(
    State(s): State<ApiState>,
    f: Result<Query<DeviceFilter>, axum::extract::rejection::QueryRejection>,
    p: Result<Query<PageRequest>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<impl IntoResponse> {
    let Query(f) = f.map_err(|e| ApiError::invalid("filter", e.body_text()))?;
    Ok(Json(s.core.store.list_devices(&f, &page(p)?).await?))
}

#[utoipa::path(
    get,
    path = "/api/v1/devices/{id}",
    tag = "devices",
    operation_id = "get_device",
    summary = "Get one device.",
    params(schemas::DeviceIdPath),
    responses(
        (status = 200, description = "The device.", body = schemas::Device),
        BadRequest, Unauthorized, NotFound, MisdirectedRequest, StoreUnavailable,
    )
)]
pub(super) async fn get_device(
    State(s): State<ApiState>,
    IdPath(id): IdPath,
) -> ApiResult<impl IntoResponse> {
    device_by_id(&s, &id).await
}

/// `GET /api/v1/devices/batch`: the device whose id is `batch` (the batch route is POST
/// only; without this the static path would hide that device).
#[utoipa::path(
    get,
    path = "/api/v1/devices/batch",
    tag = "devices",
    operation_id = "get_device_named_batch",
    summary = "Get the device whose id is `batch`.",
    description = "`GET /api/v1/devices/{id}` for the id `batch`, which the static batch route \
would otherwise hide.",
    responses(
        (status = 200, description = "The device.", body = schemas::Device),
        Unauthorized, NotFound, MisdirectedRequest, StoreUnavailable,
    )
)]
pub(super) async fn get_device_named_batch(
    State(s): State<ApiState>,
) -> ApiResult<impl IntoResponse> {
    device_by_id(&s, "batch").await
}

/// `DELETE /api/v1/devices/batch`: unregisters the device whose id is `batch`.
#[utoipa::path(
    delete,
    path = "/api/v1/devices/batch",
    tag = "devices",
    operation_id = "unregister_device_named_batch",
    summary = "Unregister the device whose id is `batch`.",
    description = "`DELETE /api/v1/devices/{id}` for the id `batch`, which the static batch route \
would otherwise hide.",
    responses(
        (status = 200, description = "The device, now Unregistered.", body = schemas::Device),
        BadRequestOrProviderInvalid, Unauthorized, NotFound, Conflict, MisdirectedRequest,
        Throttled, Unsupported, ProviderFailed, StoreUnavailable,
    )
)]
pub(super) async fn unregister_device_named_batch(
    State(s): State<ApiState>,
) -> ApiResult<impl IntoResponse> {
    Ok(Json(s.core.unregister("batch").await?))
}

async fn device_by_id(s: &ApiState, id: &str) -> ApiResult<Json<iotgw_registry::Device>> {
    let id = device_id(id)?;
    let d = s
        .core
        .store
        .get_device(&id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("device {id} not found")))?;
    Ok(Json(d))
}

#[utoipa::path(
    delete,
    path = "/api/v1/devices/{id}",
    tag = "devices",
    operation_id = "unregister_device",
    summary = "Unregister a device (its provider removes it; a history row is written).",
    description = "The provider removes what registration created (a device the provider no \
longer knows is still unregistered here), then the record becomes Unregistered with an \
Unregister history row. 404 for a device never stored, 409 for one already Unregistered.",
    params(schemas::DeviceIdPath),
    responses(
        (status = 200, description = "The device, now Unregistered.", body = schemas::Device),
        BadRequestOrProviderInvalid, Unauthorized, NotFound, Conflict, MisdirectedRequest,
        Throttled, Unsupported, ProviderFailed, StoreUnavailable,
    )
)]
pub(super) async fn unregister_device(
    State(s): State<ApiState>,
    IdPath(id): IdPath,
) -> ApiResult<impl IntoResponse> {
    Ok(Json(s.core.unregister(&id).await?))
}

/// `POST /api/v1/devices/{id}/move`'s body.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = MoveRequest)]
pub(super) struct MoveBody {
    /// The target provider instance (a configured one, else a 400 naming `to`).
    to: String,
}

#[utoipa::path(
    post,
    path = "/api/v1/devices/{id}/move",
    tag = "devices",
    operation_id = "move_device",
    summary = "Move a device to another provider instance.",
    description = "The target registers the device first (if that fails nothing changed), the \
cut-over is one store transaction (commands still In Progress end in Error), then the source \
unregisters it (a failure there is reported in `source_error` and retried in the background; \
the move stands). An invalid id is a 400 naming `id`, an unconfigured target a 400 naming `to`; \
a device that is not Registered (or Unknown), or is already on `to`, is a 409.",
    params(schemas::DeviceIdPath),
    request_body = MoveBody,
    responses(
        (status = 200, description = "Moved.", body = schemas::Moved),
        BadRequestOrProviderInvalid, Unauthorized, NotFound, Conflict, PayloadTooLarge,
        MisdirectedRequest, Throttled, Unsupported, ProviderFailed, StoreUnavailable,
    )
)]
pub(super) async fn move_device(
    State(s): State<ApiState>,
    IdPath(id): IdPath,
    b: Result<Json<MoveBody>, JsonRejection>,
) -> ApiResult<impl IntoResponse> {
    let b = body(b)?;
    Ok(Json(crate::moves::move_device(&s.core, &id, &b.to).await?))
}

#[utoipa::path(
    get,
    path = "/api/v1/devices/{id}/history",
    tag = "devices",
    operation_id = "get_device_history",
    summary = "The device's registration history (not paged).",
    params(schemas::DeviceIdPath),
    responses(
        (status = 200, description = "Every history row of the device.", body = schemas::HistoryList),
        BadRequest, Unauthorized, NotFound, MisdirectedRequest, StoreUnavailable,
    )
)]
pub(super) async fn device_history(
    State(s): State<ApiState>,
    IdPath(id): IdPath,
) -> ApiResult<impl IntoResponse> {
    let id = device_id(&id)?;
    if s.core.store.get_device(&id).await?.is_none() {
        return Err(ApiError::not_found(format!("device {id} not found")));
    }
    Ok(Json(
        serde_json::json!({"items": s.core.store.history(&id).await?}),
    ))
}

#[utoipa::path(
    get,
    path = "/api/v1/devices/{id}/state",
    tag = "devices",
    operation_id = "get_device_state",
    summary = "What the device's provider reports for it now.",
    description = "Field Service's \"pull device data\". 404 for a device not stored (or one the \
provider does not know); a device whose provider instance is no longer configured is a 400 \
naming `msdyn_iotproviderinstance`.",
    params(schemas::DeviceIdPath),
    responses(
        (status = 200, description = "The provider's view of the device.", body = schemas::DeviceState),
        BadRequestOrProviderInvalid, Unauthorized, NotFound, Conflict, MisdirectedRequest,
        Throttled, Unsupported, ProviderFailed, StoreUnavailable,
    )
)]
pub(super) async fn device_state(
    State(s): State<ApiState>,
    IdPath(id): IdPath,
) -> ApiResult<impl IntoResponse> {
    Ok(Json(s.core.device_state(&id).await?))
}

/// `POST /api/v1/categories`'s body.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = CategoryRequest)]
pub(super) struct CategoryBody {
    /// 1 to 100 characters, not all whitespace (else a 400 naming `msdyn_name`).
    #[schema(min_length = 1, max_length = 100, pattern = r"\S")]
    msdyn_name: String,
    /// Free text; null or absent keeps an existing category's description.
    msdyn_description: Option<String>,
}

#[utoipa::path(
    get,
    path = "/api/v1/categories",
    tag = "categories",
    operation_id = "list_categories",
    summary = "List every device category (not paged), by name.",
    responses(
        (status = 200, description = "All categories.", body = schemas::CategoryList),
        Unauthorized, MisdirectedRequest, StoreUnavailable,
    )
)]
pub(super) async fn list_categories(State(s): State<ApiState>) -> ApiResult<impl IntoResponse> {
    Ok(Json(
        serde_json::json!({"items": s.core.store.list_categories().await?}),
    ))
}

#[utoipa::path(
    post,
    path = "/api/v1/categories",
    tag = "categories",
    operation_id = "upsert_category",
    summary = "Create a category, or update its description.",
    description = "Creates the category, or, when one of that name exists, sets its description \
(a null or absent description keeps the old one). Answers 201 either way.",
    request_body = CategoryBody,
    responses(
        (status = 201, description = "The category as stored.", body = schemas::Category),
        BadRequest, Unauthorized, PayloadTooLarge, MisdirectedRequest, StoreUnavailable,
    )
)]
pub(super) async fn upsert_category(
    State(s): State<ApiState>,
    b: Result<Json<CategoryBody>, JsonRejection>,
) -> ApiResult<impl IntoResponse> {
    let c = body(b)?;
    if c.msdyn_name.trim().is_empty() || c.msdyn_name.chars().count() > 100 {
        return Err(ApiError::invalid("msdyn_name", "give 1 to 100 characters"));
    }
    Ok((
        StatusCode::CREATED,
        Json(
            s.core
                .store
                .upsert_category(&c.msdyn_name, c.msdyn_description.as_deref())
                .await?,
        ),
    ))
}

/// `POST /api/v1/commands`'s body.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = CommandRequest)]
pub(super) struct CommandBody {
    #[schema(value_type = schemas::DeviceId)]
    msdyn_deviceid: String,
    /// The command name the device expects (not blank, else a 400 naming `msdyn_name`).
    #[schema(pattern = r"\S")]
    msdyn_name: String,
    /// The command's parameters, any JSON (default null). The whole message must fit the
    /// provider's limit and 8192 bytes, else a 400 naming `msdyn_message`.
    #[serde(default)]
    #[schema(schema_with = schemas::command_parameters)]
    parameters: serde_json::Value,
}

#[utoipa::path(
    post,
    path = "/api/v1/commands",
    tag = "commands",
    operation_id = "send_command",
    summary = "Send a command to a device (answered before it is delivered).",
    description = "Creates the command In Progress, with the message \
`{\"<CommandName>\": name, \"<Parameters>\": parameters}` (property names from the rules \
configuration; at most the provider's limit and 8192 bytes, else a 400 naming \
`msdyn_message`), and sends it in the background: `iotgw_publishedon` is set once the provider \
took it, and its status (Sent, or Error with the reason) follows on the record. 404 for an \
unknown device, 409 for a device that is Unregistered, Error or In Progress.",
    request_body = CommandBody,
    responses(
        (status = 202, description = "The command, In Progress.", body = schemas::Command),
        BadRequest, Unauthorized, NotFound, Conflict, PayloadTooLarge, MisdirectedRequest,
        StoreUnavailable,
    )
)]
pub(super) async fn send_command(
    State(s): State<ApiState>,
    b: Result<Json<CommandBody>, JsonRejection>,
) -> ApiResult<impl IntoResponse> {
    let c = body(b)?;
    let cmd = s
        .core
        .send_command(&c.msdyn_deviceid, &c.msdyn_name, &c.parameters)
        .await?;
    Ok((StatusCode::ACCEPTED, Json(cmd)))
}

#[utoipa::path(
    get,
    path = "/api/v1/commands/{id}",
    tag = "commands",
    operation_id = "get_command",
    summary = "Get one command.",
    params(schemas::CommandIdPath),
    responses(
        (status = 200, description = "The command.", body = schemas::Command),
        BadRequest, Unauthorized, NotFound, MisdirectedRequest, StoreUnavailable,
    )
)]
pub(super) async fn get_command(
    State(s): State<ApiState>,
    IdPath(id): IdPath,
) -> ApiResult<impl IntoResponse> {
    let id = uuid(&id, "command id")?;
    Ok(Json(s.core.store.get_command(id).await?.ok_or_else(
        || ApiError::not_found(format!("command {id} not found")),
    )?))
}

#[utoipa::path(
    get,
    path = "/api/v1/commands",
    tag = "commands",
    operation_id = "list_commands",
    summary = "List commands, newest first, filtered and paged.",
    params(schemas::CommandFilterParams, schemas::PageParams),
    responses(
        (status = 200, description = "A page of commands.", body = schemas::CommandPage),
        BadRequest, Unauthorized, MisdirectedRequest, StoreUnavailable,
    )
)]
pub(super) async fn list_commands(
    State(s): State<ApiState>,
    f: Result<Query<CommandFilter>, axum::extract::rejection::QueryRejection>,
    p: Result<Query<PageRequest>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<impl IntoResponse> {
    let Query(f) = f.map_err(|e| ApiError::invalid("filter", e.body_text()))?;
    Ok(Json(s.core.store.list_commands(&f, &page(p)?).await?))
}

#[utoipa::path(
    get,
    path = "/api/v1/alerts",
    tag = "alerts",
    operation_id = "list_alerts",
    summary = "List alerts, newest first, filtered and paged.",
    params(schemas::AlertFilterParams, schemas::PageParams),
    responses(
        (status = 200, description = "A page of alerts.", body = schemas::AlertPage),
        BadRequest, Unauthorized, MisdirectedRequest, StoreUnavailable,
    )
)]
pub(super) async fn list_alerts(
    State(s): State<ApiState>,
    f: Result<Query<AlertFilter>, axum::extract::rejection::QueryRejection>,
    p: Result<Query<PageRequest>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<impl IntoResponse> {
    let Query(f) = f.map_err(|e| ApiError::invalid("filter", e.body_text()))?;
    Ok(Json(s.core.store.list_alerts(&f, &page(p)?).await?))
}

#[utoipa::path(
    get,
    path = "/api/v1/alerts/{id}",
    tag = "alerts",
    operation_id = "get_alert",
    summary = "Get one alert.",
    params(schemas::AlertIdPath),
    responses(
        (status = 200, description = "The alert.", body = schemas::Alert),
        BadRequest, Unauthorized, NotFound, MisdirectedRequest, StoreUnavailable,
    )
)]
pub(super) async fn get_alert(
    State(s): State<ApiState>,
    IdPath(id): IdPath,
) -> ApiResult<impl IntoResponse> {
    let id = uuid(&id, "alert id")?;
    Ok(Json(s.core.store.get_alert(id).await?.ok_or_else(
        || ApiError::not_found(format!("alert {id} not found")),
    )?))
}

#[utoipa::path(
    post,
    path = "/api/v1/alerts/{id}/close",
    tag = "alerts",
    operation_id = "close_alert",
    summary = "Close an alert (statecode 3, statuscode 6).",
    description = "Takes no body (any body is ignored). Closing a closed alert answers it again. \
Closing a parent closes its children too, unless `alerts.close_children_with_parent` is false in \
the config.",
    params(schemas::AlertIdPath),
    responses(
        (status = 200, description = "The alert, now Closed.", body = schemas::Alert),
        BadRequest, Unauthorized, NotFound, MisdirectedRequest, StoreUnavailable,
    )
)]
pub(super) async fn close_alert(
    State(s): State<ApiState>,
    IdPath(id): IdPath,
) -> ApiResult<impl IntoResponse> {
    let id = uuid(&id, "alert id")?;
    let Some(before) = s.core.store.get_alert(id).await? else {
        return Err(ApiError::not_found(format!("alert {id} not found")));
    };
    let closed = s
        .core
        .store
        .set_alert_status(id, AlertStatus::Closed, None)
        .await?;
    if before.parent_alert.is_none() && s.core.live().config.alerts.close_children_with_parent {
        s.core.store.close_child_alerts(id).await?;
    }
    Ok(Json(closed))
}

/// `POST /api/v1/alerts/{id}/case`'s body: the case Field Service created.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = CaseRequest)]
pub(super) struct CaseBody {
    /// The case's record id in Dataverse.
    #[schema(format = Uuid)]
    msdyn_case: String,
}

/// `POST /api/v1/alerts/{id}/work-order`'s body: the work order Field Service created.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = WorkOrderRequest)]
pub(super) struct WorkOrderBody {
    /// The work order's record id in Dataverse.
    #[schema(format = Uuid)]
    msdyn_workorder: String,
}

async fn service_work(s: &ApiState, id: &str, work: ServiceWork) -> ApiResult<Json<Alert>> {
    let id = uuid(id, "alert id")?;
    if s.core.store.get_alert(id).await?.is_none() {
        return Err(ApiError::not_found(format!("alert {id} not found")));
    }
    Ok(Json(s.core.store.set_alert_service_work(id, work).await?))
}

/// Records the case created from an alert: statuscode 3 (In Progress – Case Created).
#[utoipa::path(
    post,
    path = "/api/v1/alerts/{id}/case",
    tag = "alerts",
    operation_id = "alert_case",
    summary = "Record the case Field Service created from an alert (statecode 2, statuscode 3).",
    params(schemas::AlertIdPath),
    request_body = CaseBody,
    responses(
        (status = 200, description = "The alert, with the case and its new status.", body = schemas::Alert),
        BadRequest, Unauthorized, NotFound, PayloadTooLarge, MisdirectedRequest, StoreUnavailable,
    )
)]
pub(super) async fn alert_case(
    State(s): State<ApiState>,
    IdPath(id): IdPath,
    b: Result<Json<CaseBody>, JsonRejection>,
) -> ApiResult<impl IntoResponse> {
    let case = uuid(&body(b)?.msdyn_case, "msdyn_case")?;
    service_work(&s, &id, ServiceWork::Case(case)).await
}

/// Records the work order created from an alert: statuscode 4 (In Progress – Work Order
/// Created).
#[utoipa::path(
    post,
    path = "/api/v1/alerts/{id}/work-order",
    tag = "alerts",
    operation_id = "alert_work_order",
    summary = "Record the work order Field Service created from an alert (statecode 2, statuscode 4).",
    params(schemas::AlertIdPath),
    request_body = WorkOrderBody,
    responses(
        (status = 200, description = "The alert, with the work order and its new status.", body = schemas::Alert),
        BadRequest, Unauthorized, NotFound, PayloadTooLarge, MisdirectedRequest, StoreUnavailable,
    )
)]
pub(super) async fn alert_work_order(
    State(s): State<ApiState>,
    IdPath(id): IdPath,
    b: Result<Json<WorkOrderBody>, JsonRejection>,
) -> ApiResult<impl IntoResponse> {
    let order = uuid(&body(b)?.msdyn_workorder, "msdyn_workorder")?;
    service_work(&s, &id, ServiceWork::WorkOrder(order)).await
}

/// The Field Service records linked to devices (Register Custom Entity), by entity or by
/// device, at most 1,000.
#[utoipa::path(
    get,
    path = "/api/v1/entity-links",
    tag = "devices",
    operation_id = "list_entity_links",
    summary = "Field Service records linked to devices (Register Custom Entity), at most 1,000.",
    params(schemas::EntityLinkFilterParams),
    responses(
        (status = 200, description = "The links, by entity then device.", body = schemas::EntityLinkList),
        BadRequest, Unauthorized, MisdirectedRequest, StoreUnavailable,
    )
)]
pub(super) async fn list_entity_links(
    State(s): State<ApiState>,
    f: Result<Query<iotgw_registry::EntityLinkFilter>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<impl IntoResponse> {
    let Query(f) = f.map_err(|e| ApiError::invalid("filter", e.body_text()))?;
    Ok(Json(
        serde_json::json!({"items": s.core.store.entity_links(&f).await?}),
    ))
}

/// A device's reported properties read through the property definitions
/// (`[definitions.properties]`).
#[utoipa::path(
    get,
    path = "/api/v1/devices/{id}/properties",
    tag = "devices",
    operation_id = "get_device_properties",
    summary = "The device's reported properties, read through the property definitions.",
    description = "One item per `[definitions.properties.NAME]` of the config, in name order: \
where it sits in the reported properties (a property with a parent sits inside its parent's \
object), its type and unit, the reported value (null when not reported), and why the value does \
not have the defined type, if it does not.",
    params(schemas::DeviceIdPath),
    responses(
        (status = 200, description = "The properties.", body = schemas::DeviceProperties),
        BadRequest, Unauthorized, NotFound, MisdirectedRequest, StoreUnavailable,
    )
)]
pub(super) async fn device_properties(
    State(s): State<ApiState>,
    IdPath(id): IdPath,
) -> ApiResult<impl IntoResponse> {
    let did = DeviceId::parse(&id).map_err(|e| ApiError::invalid("id", e))?;
    let device = s
        .core
        .store
        .get_device(&did)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("device {did} not found")))?;
    let reported = device
        .reported_properties
        .unwrap_or(serde_json::Value::Null);
    let live = s.core.live();
    Ok(Json(serde_json::json!({
        "msdyn_deviceid": did,
        "items": crate::definitions::read_properties(&live.config.definitions, &reported),
    })))
}

#[utoipa::path(
    post,
    path = "/api/v1/dead-letters/{id}/replay",
    tag = "dead-letters",
    operation_id = "replay_dead_letter",
    summary = "Replay one dead letter, then delete it.",
    description = "A refused reading (`telemetry:<instance>`) goes through the pipeline again as \
it was (same instance, device, message id and time): it commits, or becomes a dead letter again \
with today's reason. A sink's item (`sink:<name>`) is queued for that sink again with its \
idempotency key. The old dead letter is then deleted. 409 for a dead letter whose payload was \
cut at 64 KiB, one of another source, or a sink's item whose sink is no longer configured. \
Takes no body (any body is ignored).",
    params(schemas::DeadLetterIdPath),
    responses(
        (status = 200, description = "What the replay came to.", body = schemas::Replayed),
        BadRequest, Unauthorized, NotFound, Conflict, MisdirectedRequest, StoreUnavailable,
    )
)]
pub(super) async fn replay_dead_letter(
    State(s): State<ApiState>,
    IdPath(id): IdPath,
) -> ApiResult<impl IntoResponse> {
    let id: i64 = id.parse().map_err(|_| {
        ApiError::invalid(
            "id",
            format!("`{id}` is not a dead letter id: use the number from GET /api/v1/dead-letters"),
        )
    })?;
    Ok(Json(crate::replay::replay(&s.core, id).await?))
}

#[utoipa::path(
    post,
    path = "/api/v1/dead-letters/replay",
    tag = "dead-letters",
    operation_id = "replay_dead_letters",
    summary = "Replay every dead letter a filter selects, oldest first.",
    description = "Each selected dead letter is replayed as \
`POST /api/v1/dead-letters/{id}/replay` would replay it; one that cannot be replayed is listed \
in `failed` and does not fail the others. All conditions given must hold; `{}` selects every \
dead letter (at most `limit`, default and most 10,000; 0 counts as 1).",
    request_body = schemas::ReplayFilter,
    responses(
        (status = 200, description = "What the replay did.", body = schemas::BulkReplay),
        BadRequest, Unauthorized, PayloadTooLarge, MisdirectedRequest, StoreUnavailable,
    )
)]
pub(super) async fn replay_dead_letters(
    State(s): State<ApiState>,
    b: Result<Json<crate::replay::ReplayFilter>, JsonRejection>,
) -> ApiResult<impl IntoResponse> {
    let filter = body(b)?;
    Ok(Json(crate::replay::replay_many(&s.core, &filter).await?))
}

#[utoipa::path(
    get,
    path = "/api/v1/dead-letters",
    tag = "dead-letters",
    operation_id = "list_dead_letters",
    summary = "List dead letters (refused telemetry, undeliverable outbox items), newest first.",
    params(schemas::PageParams),
    responses(
        (status = 200, description = "A page of dead letters.", body = schemas::DeadLetterPage),
        BadRequest, Unauthorized, MisdirectedRequest, StoreUnavailable,
    )
)]
pub(super) async fn list_dead_letters(
    State(s): State<ApiState>,
    p: Result<Query<PageRequest>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<impl IntoResponse> {
    Ok(Json(s.core.store.list_dead_letters(&page(p)?).await?))
}

#[utoipa::path(
    get,
    path = "/api/v1/config/version",
    tag = "operations",
    operation_id = "get_config_version",
    summary = "The live configuration's version and the last reload.",
    responses(
        (status = 200, description = "The live configuration's version.", body = schemas::ConfigVersion),
        Unauthorized, MisdirectedRequest,
    )
)]
pub(super) async fn config_version(State(s): State<ApiState>) -> impl IntoResponse {
    Json(s.reloader.version())
}

/// `POST /api/v1/config/reload`: what SIGHUP does, answered with the outcome (200 when
/// applied or unchanged, 422 with the problems when refused).
#[utoipa::path(
    post,
    path = "/api/v1/config/reload",
    tag = "operations",
    operation_id = "reload_config",
    summary = "Reload the configuration file now (what SIGHUP does).",
    description = "200 when the file was applied or meant what is live already (`outcome` \
`applied` or `unchanged`); 422 when it was refused (it does not load or validate, changes what \
only a restart can, or there is no config file), with the problems (`outcome` `refused`). The \
running configuration stays on a refusal. Takes no body (any body is ignored).",
    responses(
        (status = 200, description = "Applied, or unchanged.", body = schemas::ReloadDone),
        Unauthorized, MisdirectedRequest,
        (status = 422, description = "Refused; the running configuration stays.", body = schemas::ReloadRefused),
    )
)]
pub(super) async fn config_reload(State(s): State<ApiState>) -> impl IntoResponse {
    let done = s.reloader.reload("API").await;
    let status = if done.outcome == "refused" {
        StatusCode::UNPROCESSABLE_ENTITY
    } else {
        StatusCode::OK
    };
    (status, Json(done))
}

#[utoipa::path(
    get,
    path = "/api/v1/providers",
    tag = "operations",
    operation_id = "list_providers",
    summary = "Each configured provider instance with its health, limits and device count.",
    responses(
        (status = 200, description = "Every configured provider instance, by name.", body = schemas::ProviderList),
        Unauthorized, MisdirectedRequest, StoreUnavailable,
    )
)]
pub(super) async fn providers(State(s): State<ApiState>) -> ApiResult<impl IntoResponse> {
    let counts = s.core.store.device_counts().await?;
    let now = chrono::Utc::now();
    let live = s.core.live();
    let list: Vec<_> = live
        .providers
        .iter()
        .map(|(name, p)| {
            let health = p.health();
            let down_for = crate::health::unhealthy_for(&health, now);
            let devices = counts
                .iter()
                .find(|(n, _)| n == name)
                .map_or(0, |(_, c)| *c);
            serde_json::json!({
                "name": name,
                "kind": p.kind(),
                "healthy": down_for.is_none(),
                "since": health.since,
                "down_for_secs": down_for.map(|d| d.as_secs()),
                "failed_over": s.core.instance_down(name),
                "required": !live.config.health.optional.contains(name),
                "devices": devices,
                "health": health,
                "limits": p.limits(),
            })
        })
        .collect();
    Ok(Json(serde_json::json!({"items": list})))
}
