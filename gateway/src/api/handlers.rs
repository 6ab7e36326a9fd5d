//! Route handlers: thin adapters between HTTP and [`crate::core::Core`] / the store.

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Json;
use iotgw_registry::{
    AlertFilter, AlertStatus, CommandFilter, DeviceFilter, DeviceId, PageRequest,
};
use serde::Deserialize;
use uuid::Uuid;

use super::{ApiError, ApiState};
use crate::core::RegisterRequest;

type ApiResult<T> = Result<T, ApiError>;

fn body<T>(b: Result<Json<T>, JsonRejection>) -> ApiResult<T> {
    b.map(|Json(v)| v)
        .map_err(|e| ApiError::invalid("request body", e.body_text()))
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

pub(super) async fn live() -> impl IntoResponse {
    Json(serde_json::json!({"live": true}))
}

pub(super) async fn ready(State(s): State<ApiState>) -> impl IntoResponse {
    let report = s.readiness.check(&s.core).await;
    let status = if report.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(report))
}

pub(super) async fn metrics(State(s): State<ApiState>) -> impl IntoResponse {
    if let Ok(depths) = s.core.store.outbox_depth().await {
        for sink in &s.core.sinks {
            let d = depths
                .iter()
                .find(|(n, _)| n == sink)
                .map_or(0, |(_, d)| *d);
            s.core.metrics.set_outbox_depth(sink, d);
        }
    }
    for (name, p) in &s.core.providers {
        s.core
            .metrics
            .set_provider_connected(name, p.health().connected);
    }
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
    Path(id): Path<String>,
) -> ApiResult<impl IntoResponse> {
    let id = device_id(&id)?;
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
    Path(id): Path<String>,
) -> ApiResult<impl IntoResponse> {
    Ok(Json(s.core.unregister(&id).await?))
}

pub(super) async fn device_history(
    State(s): State<ApiState>,
    Path(id): Path<String>,
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
    Path(id): Path<String>,
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
    Path(id): Path<String>,
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
    Path(id): Path<String>,
) -> ApiResult<impl IntoResponse> {
    let id = uuid(&id, "alert id")?;
    Ok(Json(s.core.store.get_alert(id).await?.ok_or_else(
        || ApiError::not_found(format!("alert {id} not found")),
    )?))
}

pub(super) async fn close_alert(
    State(s): State<ApiState>,
    Path(id): Path<String>,
) -> ApiResult<impl IntoResponse> {
    let id = uuid(&id, "alert id")?;
    if s.core.store.get_alert(id).await?.is_none() {
        return Err(ApiError::not_found(format!("alert {id} not found")));
    }
    Ok(Json(
        s.core
            .store
            .set_alert_status(id, AlertStatus::Closed, None)
            .await?,
    ))
}

pub(super) async fn list_dead_letters(
    State(s): State<ApiState>,
    p: Result<Query<PageRequest>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<impl IntoResponse> {
    Ok(Json(s.core.store.list_dead_letters(&page(p)?).await?))
}

pub(super) async fn providers(State(s): State<ApiState>) -> impl IntoResponse {
    let list: Vec<_> = s
        .core
        .providers
        .iter()
        .map(|(name, p)| serde_json::json!({"name": name, "kind": p.kind(), "health": p.health(), "limits": p.limits()}))
        .collect();
    Json(serde_json::json!({"items": list}))
}
