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

/// The API's OpenAPI document (`docs/openapi.yaml`, compiled in).
pub(super) async fn openapi() -> impl IntoResponse {
    (
        [(axum::http::header::CONTENT_TYPE, "application/yaml")],
        super::OPENAPI_YAML,
    )
}

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

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct BatchBody {
    /// Each item is read on its own, so a malformed one fails alone.
    devices: Vec<serde_json::Value>,
}

/// The answer of `POST /api/v1/devices/batch`.
#[derive(Debug, Serialize)]
pub(super) struct BatchAnswer {
    /// How many devices were registered.
    registered: usize,
    /// The devices that were not, in request order.
    failed: Vec<BatchFailure>,
    /// The devices that were, in request order.
    devices: Vec<BatchRegistered>,
}

/// One device of a batch that was not registered: what the single route would have said.
#[derive(Debug, Serialize)]
pub(super) struct BatchFailure {
    /// Position in the request's `devices`.
    index: usize,
    /// The id as given (absent when the item had none).
    msdyn_deviceid: Option<String>,
    /// The status the single route would answer (400, 409, 502, ...).
    status: u16,
    /// The error code (`invalid_input`, `already_registered`, `conflict`, ...).
    code: &'static str,
    /// What went wrong and what to do.
    error: String,
}

/// One device of a batch that was registered.
#[derive(Debug, Serialize)]
pub(super) struct BatchRegistered {
    /// Position in the request's `devices`.
    index: usize,
    /// The record and the credentials shown this once.
    #[serde(flatten)]
    registered: Registered,
}

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

pub(super) async fn list_devices(
    State(s): State<ApiState>,
    f: Result<Query<DeviceFilter>, axum::extract::rejection::QueryRejection>,
    p: Result<Query<PageRequest>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<impl IntoResponse> {
    let Query(f) = f.map_err(|e| ApiError::invalid("filter", e.body_text()))?;
    Ok(Json(s.core.store.list_devices(&f, &page(p)?).await?))
}

pub(super) async fn get_device(
    State(s): State<ApiState>,
    IdPath(id): IdPath,
) -> ApiResult<impl IntoResponse> {
    device_by_id(&s, &id).await
}

/// `GET /api/v1/devices/batch`: the device whose id is `batch` (the batch route is POST
/// only; without this the static path would hide that device).
pub(super) async fn get_device_named_batch(
    State(s): State<ApiState>,
) -> ApiResult<impl IntoResponse> {
    device_by_id(&s, "batch").await
}

/// `DELETE /api/v1/devices/batch`: unregisters the device whose id is `batch`.
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

pub(super) async fn unregister_device(
    State(s): State<ApiState>,
    IdPath(id): IdPath,
) -> ApiResult<impl IntoResponse> {
    Ok(Json(s.core.unregister(&id).await?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct MoveBody {
    to: String,
}

pub(super) async fn move_device(
    State(s): State<ApiState>,
    IdPath(id): IdPath,
    b: Result<Json<MoveBody>, JsonRejection>,
) -> ApiResult<impl IntoResponse> {
    let b = body(b)?;
    Ok(Json(crate::moves::move_device(&s.core, &id, &b.to).await?))
}

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

pub(super) async fn device_state(
    State(s): State<ApiState>,
    IdPath(id): IdPath,
) -> ApiResult<impl IntoResponse> {
    Ok(Json(s.core.device_state(&id).await?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct CategoryBody {
    msdyn_name: String,
    msdyn_description: Option<String>,
}

pub(super) async fn list_categories(State(s): State<ApiState>) -> ApiResult<impl IntoResponse> {
    Ok(Json(
        serde_json::json!({"items": s.core.store.list_categories().await?}),
    ))
}

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

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct CommandBody {
    msdyn_deviceid: String,
    msdyn_name: String,
    #[serde(default)]
    parameters: serde_json::Value,
}

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

pub(super) async fn get_command(
    State(s): State<ApiState>,
    IdPath(id): IdPath,
) -> ApiResult<impl IntoResponse> {
    let id = uuid(&id, "command id")?;
    Ok(Json(s.core.store.get_command(id).await?.ok_or_else(
        || ApiError::not_found(format!("command {id} not found")),
    )?))
}

pub(super) async fn list_commands(
    State(s): State<ApiState>,
    f: Result<Query<CommandFilter>, axum::extract::rejection::QueryRejection>,
    p: Result<Query<PageRequest>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<impl IntoResponse> {
    let Query(f) = f.map_err(|e| ApiError::invalid("filter", e.body_text()))?;
    Ok(Json(s.core.store.list_commands(&f, &page(p)?).await?))
}

pub(super) async fn list_alerts(
    State(s): State<ApiState>,
    f: Result<Query<AlertFilter>, axum::extract::rejection::QueryRejection>,
    p: Result<Query<PageRequest>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<impl IntoResponse> {
    let Query(f) = f.map_err(|e| ApiError::invalid("filter", e.body_text()))?;
    Ok(Json(s.core.store.list_alerts(&f, &page(p)?).await?))
}

pub(super) async fn get_alert(
    State(s): State<ApiState>,
    IdPath(id): IdPath,
) -> ApiResult<impl IntoResponse> {
    let id = uuid(&id, "alert id")?;
    Ok(Json(s.core.store.get_alert(id).await?.ok_or_else(
        || ApiError::not_found(format!("alert {id} not found")),
    )?))
}

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
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct CaseBody {
    msdyn_case: String,
}

/// `POST /api/v1/alerts/{id}/work-order`'s body: the work order Field Service created.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct WorkOrderBody {
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

pub(super) async fn replay_dead_letters(
    State(s): State<ApiState>,
    b: Result<Json<crate::replay::ReplayFilter>, JsonRejection>,
) -> ApiResult<impl IntoResponse> {
    let filter = body(b)?;
    Ok(Json(crate::replay::replay_many(&s.core, &filter).await?))
}

pub(super) async fn list_dead_letters(
    State(s): State<ApiState>,
    p: Result<Query<PageRequest>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<impl IntoResponse> {
    Ok(Json(s.core.store.list_dead_letters(&page(p)?).await?))
}

pub(super) async fn config_version(State(s): State<ApiState>) -> impl IntoResponse {
    Json(s.reloader.version())
}

/// `POST /api/v1/config/reload`: what SIGHUP does, answered with the outcome (200 when
/// applied or unchanged, 422 with the problems when refused).
pub(super) async fn config_reload(State(s): State<ApiState>) -> impl IntoResponse {
    let done = s.reloader.reload("API").await;
    let status = if done.outcome == "refused" {
        StatusCode::UNPROCESSABLE_ENTITY
    } else {
        StatusCode::OK
    };
    (status, Json(done))
}

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
