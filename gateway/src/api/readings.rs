//! `GET /api/v1/devices/{id}/readings`: one device's readings in buckets, shaped as Field
//! Service's "query device readings" answer: `{device: {measure: {bucket start: {min, max,
//! avg, sum, count}}}}`.

use axum::extract::{Query, State};
use axum::response::IntoResponse;
use axum::Json;
use chrono::{DateTime, Utc};
use iotgw_registry::{DeviceId, ReadingQuery};
use serde::Deserialize;

use super::handlers::IdPath;
use super::schemas::{self, BadRequest, MisdirectedRequest, StoreUnavailable, Unauthorized};
use super::{ApiError, ApiState};

/// The query string.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(super) struct ReadingsParams {
    /// First instant (RFC 3339); default: an hour before `to`.
    #[param(value_type = Option<DateTime<Utc>>)]
    from: Option<String>,
    /// End, excluded (RFC 3339); default: now.
    #[param(value_type = Option<DateTime<Utc>>)]
    to: Option<String>,
    /// Bucket width, an ISO-8601 duration of whole seconds (`PT1M`, `PT5M`, `PT1H`, `P1D`,
    /// `PT30S`; a month is 30 days, a year 365); default `PT1M`.
    #[param(
        pattern = "^P([0-9]+Y)?([0-9]+M)?([0-9]+W)?([0-9]+D)?(T([0-9]+H)?([0-9]+M)?([0-9]+S)?)?$"
    )]
    interval: Option<String>,
    /// Only these measures, comma-separated JSON pointers (`/temp,/engine/rpm`).
    measures: Option<String>,
}

/// Seconds in an ISO-8601 duration (`P1DT2H`, `PT90S`, `P1M`), whole seconds only. As Field
/// Service counts them, a year is 365 days and a month 30.
pub(crate) fn iso8601_seconds(raw: &str) -> Result<i64, String> {
    let bad = || {
        format!("`{raw}` is not an ISO-8601 duration of whole seconds (e.g. PT1M, PT5M, PT1H, P1D, P1M)")
    };
    let rest = raw.strip_prefix('P').ok_or_else(bad)?;
    let (days, time) = match rest.split_once('T') {
        Some((d, t)) => (d, Some(t)),
        None => (rest, None),
    };
    let mut total: i64 = 0;
    let mut add = |part: &str, units: &[(char, i64)]| -> Result<(), String> {
        let mut number = String::new();
        let mut allowed = units.iter();
        for c in part.chars() {
            if c.is_ascii_digit() {
                number.push(c);
                continue;
            }
            let scale = allowed
                .by_ref()
                .find(|(u, _)| *u == c)
                .map(|(_, s)| *s)
                .ok_or_else(bad)?;
            let n: i64 = number.parse().map_err(|_| bad())?;
            total = n
                .checked_mul(scale)
                .and_then(|v| total.checked_add(v))
                .ok_or_else(bad)?;
            number.clear();
        }
        if number.is_empty() {
            Ok(())
        } else {
            Err(bad())
        }
    };
    add(
        days,
        &[
            ('Y', 365 * 86_400),
            ('M', 30 * 86_400),
            ('W', 7 * 86_400),
            ('D', 86_400),
        ],
    )?;
    if let Some(time) = time {
        if time.is_empty() {
            return Err(bad());
        }
        add(time, &[('H', 3600), ('M', 60), ('S', 1)])?;
    }
    if total <= 0 {
        return Err(bad());
    }
    Ok(total)
}

fn time(field: &str, raw: &str) -> Result<DateTime<Utc>, ApiError> {
    DateTime::parse_from_rfc3339(raw)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| {
            ApiError::invalid(
                field,
                format!("`{raw}` is not an RFC 3339 time ({e}), e.g. 2026-12-07T10:00:00Z"),
            )
        })
}

#[utoipa::path(
    get,
    path = "/api/v1/devices/{id}/readings",
    tag = "devices",
    operation_id = "get_device_readings",
    summary = "The device's readings in buckets (Field Service's \"query device readings\").",
    description = "Every number and boolean of the device's accepted telemetry, by JSON pointer, \
in buckets of `interval` aligned on the Unix epoch; a bucket is answered when its start lies in \
`from` (included) to `to` (excluded), and an empty bucket is left out. Whole minutes and hours \
are read from the rollups, other intervals from the readings themselves. A device with no \
readings (or none stored) answers an empty object under its id.",
    params(schemas::DeviceIdPath, ReadingsParams),
    responses(
        (status = 200, description = "`{device id: {measure: {bucket start: {min, max, avg, sum, count}}}}`.", body = schemas::DeviceReadings),
        BadRequest, Unauthorized, MisdirectedRequest, StoreUnavailable,
    )
)]
pub(super) async fn device_readings(
    State(s): State<ApiState>,
    IdPath(id): IdPath,
    params: Result<Query<ReadingsParams>, axum::extract::rejection::QueryRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let Query(p) = params.map_err(|e| ApiError::invalid("query", e.body_text()))?;
    let device_id = DeviceId::parse(&id).map_err(|e| ApiError::invalid("msdyn_deviceid", e))?;
    let to =
        p.to.as_deref()
            .map_or_else(|| Ok(Utc::now()), |t| time("to", t))?;
    let from = p
        .from
        .as_deref()
        .map_or_else(|| Ok(to - chrono::Duration::hours(1)), |t| time("from", t))?;
    let interval_s = iso8601_seconds(p.interval.as_deref().unwrap_or("PT1M"))
        .map_err(|e| ApiError::invalid("interval", e))?;
    let measures = p
        .measures
        .map(|m| m.split(',').map(str::to_owned).collect())
        .unwrap_or_default();
    let buckets = s
        .core
        .store
        .query_readings(&ReadingQuery {
            device_id: device_id.clone(),
            from,
            to,
            interval_s,
            measures,
        })
        .await
        .map_err(crate::core::GatewayError::from)?;
    let mut by_measure = serde_json::Map::new();
    for b in buckets {
        let series = by_measure
            .entry(b.measure.clone())
            .or_insert_with(|| serde_json::Value::Object(serde_json::Map::new()));
        if let serde_json::Value::Object(series) = series {
            series.insert(
                b.start.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                serde_json::json!({
                    "min": b.min, "max": b.max, "avg": b.avg(), "sum": b.sum, "count": b.count,
                }),
            );
        }
    }
    Ok(Json(serde_json::json!({ device_id.as_str(): by_measure })))
}

#[cfg(test)]
mod tests {
    use super::iso8601_seconds;

    #[test]
    fn iso8601_durations_of_days_hours_minutes_and_seconds_are_read() {
        for (raw, secs) in [
            ("PT1M", 60),
            ("PT5M", 300),
            ("PT1H", 3600),
            ("P1D", 86_400),
            ("PT30S", 30),
            ("P1DT2H3M4S", 93_784),
            ("PT90S", 90),
            ("P1M", 30 * 86_400),
            ("P1W", 7 * 86_400),
            ("P1Y", 365 * 86_400),
        ] {
            assert_eq!(iso8601_seconds(raw), Ok(secs), "{raw}");
        }
        for bad in [
            "", "P", "PT", "1M", "PT1", "PT0S", "PTM", "PT1H1H", "P1D1Y", "PT-1M", "PT0.5S",
        ] {
            assert!(iso8601_seconds(bad).is_err(), "{bad}");
        }
    }
}
