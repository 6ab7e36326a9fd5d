//! The console's pages. Each reads what it shows through the store and the live state,
//! one page of a list at a time.

use std::collections::BTreeMap;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect, Response};
use chrono::{DateTime, Duration, Utc};
use iotgw_registry::{
    AlertFilter, AlertStatus, AlertType, CommandFilter, DeviceFilter, DeviceId, PageRequest,
    ReadingBucket, ReadingQuery, RegistrationStatus,
};
use maud::{html, Markup};
use serde::Deserialize;

use super::{chart, page};
use crate::api::ApiState;

/// Rows per list page.
const PAGE: u32 = 50;
/// Children shown under one parent alert.
const CHILDREN: u32 = 20;
/// Characters of a dead letter's payload shown.
const PREVIEW: usize = 300;
/// Connected devices counted per instance before the overview says "or more".
const COUNT_LIMIT: usize = 10_000;

fn when(t: Option<DateTime<Utc>>) -> String {
    t.map_or_else(
        || "—".to_owned(),
        |t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string(),
    )
}

fn error_page(status: StatusCode, what: &str) -> Response {
    (
        status,
        page("Error", html! { p class="error" role="alert" { (what) } }),
    )
        .into_response()
}

fn store_error(e: impl std::fmt::Display) -> Response {
    error_page(
        StatusCode::SERVICE_UNAVAILABLE,
        &format!("The store did not answer: {e}"),
    )
}

fn pager(next: Option<&String>, query: &[(&str, Option<String>)]) -> Markup {
    let Some(next) = next else {
        return html! {};
    };
    let mut qs: Vec<String> = query
        .iter()
        .filter_map(|(k, v)| v.as_ref().map(|v| format!("{k}={}", urlencode(v))))
        .collect();
    qs.push(format!("after={}", urlencode(next)));
    html! { p { a href=(format!("?{}", qs.join("&"))) rel="next" { "Next page →" } } }
}

fn device_href(id: &DeviceId) -> String {
    format!("/ui/devices/{}", urlencode(id.as_str()))
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Counts a listing's items, page by page, up to `limit`.
async fn count_devices(s: &ApiState, filter: &DeviceFilter, limit: usize) -> Result<usize, String> {
    let mut page = PageRequest {
        after: None,
        limit: 1000,
    };
    let mut n = 0;
    loop {
        let got = s
            .core
            .store
            .list_devices(filter, &page)
            .await
            .map_err(|e| e.to_string())?;
        n += got.items.len();
        match got.next {
            Some(next) if n < limit => page.after = Some(next),
            _ => return Ok(n),
        }
    }
}

/// The overview: instances, devices, events, outboxes, dead letters.
pub(super) async fn overview(State(s): State<ApiState>) -> Response {
    let live = s.core.live();
    let registered: BTreeMap<String, u64> = match s.core.store.device_counts().await {
        Ok(c) => c.into_iter().collect(),
        Err(e) => return store_error(e),
    };
    let mut rows = Vec::new();
    for (name, p) in &live.providers {
        let h = p.health();
        let connected = count_devices(
            &s,
            &DeviceFilter {
                provider_instance: Some(name.clone()),
                connected: Some(true),
                ..DeviceFilter::default()
            },
            COUNT_LIMIT,
        )
        .await;
        rows.push((
            name.clone(),
            p.kind().as_str(),
            h,
            registered.get(name).copied().unwrap_or(0),
            connected,
        ));
    }
    let depths = s.core.store.outbox_depth().await.unwrap_or_default();
    let letters = s
        .core
        .store
        .list_dead_letters(&PageRequest {
            after: None,
            limit: 1000,
        })
        .await;
    let hour_ago = Utc::now() - Duration::hours(1);
    let metrics = s.core.metrics.encode();
    // Whole counts (an empty sum of floats would print as -0).
    let total = |name: &str| -> u64 {
        let sum: f64 = metrics
            .lines()
            .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
            .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
            .sum();
        sum.max(0.0).round() as u64
    };
    let ready = s.readiness.check(&s.core).await;
    // The rates as one-sample buckets, so the readings chart draws them.
    let rate_from = Utc::now() - Duration::minutes(5);
    let rates: Vec<ReadingBucket> = s
        .core
        .metrics
        .acked_rates()
        .into_iter()
        .map(|(at, r)| ReadingBucket {
            measure: "events/s".into(),
            start: at,
            min: r,
            max: r,
            sum: r,
            count: 1,
        })
        .collect();
    let body = html! {
        p {
            @if ready.ready { span class="good" { "Ready" } }
            @else { span class="bad" { "Not ready" } ": " (ready.reasons.join("; ")) }
        }
        h2 { "Provider instances" }
        table {
            thead { tr { th { "Instance" } th { "Kind" } th { "Health" } th { "Registered devices" } th { "Connected devices" } } }
            tbody {
                @for (name, kind, h, reg, conn) in &rows {
                    tr data-instance=(name) {
                        td { (name) }
                        td { (kind) }
                        td {
                            @if h.connected { span class="good" { "connected" } }
                            @else if !h.receiving { span class="muted" { "control plane only" } }
                            @else { span class="bad" { "down since " (when(Some(h.since))) } }
                            @if let Some(e) = &h.last_error { br; span class="muted" { (e) } }
                        }
                        td data-registered=(reg) { (reg) }
                        td {
                            @match conn {
                                Ok(n) if *n >= COUNT_LIMIT => { (n) " or more" }
                                Ok(n) => span data-connected=(n) { (n) },
                                Err(e) => span class="bad" { (e) },
                            }
                        }
                    }
                }
            }
        }
        h2 { "Events acked per second, last five minutes" }
        @if rates.is_empty() {
            p class="muted" { "Measured every " (crate::metrics::RATE_EVERY.as_secs()) " s: shown from the second sample." }
        } @else {
            p data-rate=(format!("{:.1}", rates.last().map_or(0.0, |b| b.avg()))) {
                "Now " strong { (format!("{:.1}", rates.last().map_or(0.0, |b| b.avg()))) } " events/s; "
                "average " (format!("{:.1}", rates.iter().map(ReadingBucket::avg).sum::<f64>() / rates.len() as f64)) " events/s."
            }
            (chart::svg("events acked per second", &rates.iter().collect::<Vec<_>>(), rate_from.timestamp_millis(), Utc::now().timestamp_millis()))
        }
        h2 { "Events since start" }
        table {
            thead { tr { th { "Received" } th { "Acked" } th { "Nacked" } th { "In flight" } } }
            tbody { tr {
                td { (total("iotgw_events_received_total")) }
                td { (total("iotgw_events_acked_total")) }
                td { (total("iotgw_events_nacked_total")) }
                td { (total("iotgw_in_flight")) }
            } }
        }
        h2 { "Outbox per sink" }
        @if live.sinks.is_empty() { p class="muted" { "No sinks configured." } }
        @else {
            table {
                thead { tr { th { "Sink" } th { "Items waiting" } } }
                tbody {
                    @for sink in &live.sinks {
                        tr { td { (sink) } td { (depths.iter().find(|(n, _)| n == sink).map_or(0, |(_, d)| *d)) } }
                    }
                }
            }
        }
        h2 { "Dead letters" }
        @match &letters {
            Ok(p) => {
                p {
                    (p.items.iter().filter(|l| l.created_at >= hour_ago).count())
                    @if p.next.is_some() { " or more" }
                    " in the last hour. " a href="/ui/dead-letters" { "See them" }
                }
            }
            Err(e) => p class="bad" { (e.to_string()) },
        }
    };
    page("Overview", body).into_response()
}

#[derive(Deserialize, Default)]
pub(super) struct DeviceQuery {
    instance: Option<String>,
    category: Option<String>,
    status: Option<String>,
    connected: Option<String>,
    after: Option<String>,
}

fn nonempty(v: &Option<String>) -> Option<String> {
    v.as_ref()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
}

/// Devices, filtered and paged.
pub(super) async fn devices(
    State(s): State<ApiState>,
    q: Result<Query<DeviceQuery>, QueryRejection>,
) -> Response {
    let q = q.map(|Query(q)| q).unwrap_or_default();
    let status = nonempty(&q.status).and_then(|v| RegistrationStatus::from_label(&v));
    let connected = match nonempty(&q.connected).as_deref() {
        Some("yes") => Some(true),
        Some("no") => Some(false),
        _ => None,
    };
    let filter = DeviceFilter {
        provider_instance: nonempty(&q.instance),
        category: nonempty(&q.category),
        registration_status: status,
        connected,
    };
    let got = match s
        .core
        .store
        .list_devices(
            &filter,
            &PageRequest {
                after: nonempty(&q.after),
                limit: PAGE,
            },
        )
        .await
    {
        Ok(p) => p,
        Err(e) => return error_page(StatusCode::BAD_REQUEST, &e.to_string()),
    };
    let live = s.core.live();
    let body = html! {
        form class="filters" method="get" action="/ui/devices" {
            label { "Instance " select name="instance" {
                option value="" { "any" }
                @for name in live.providers.keys() {
                    option value=(name) selected[filter.provider_instance.as_deref() == Some(name.as_str())] { (name) }
                }
            } }
            label { "Category " input name="category" value=[filter.category.as_deref()]; }
            label { "Status " select name="status" {
                option value="" { "any" }
                @for st in RegistrationStatus::ALL {
                    option value=(st.label()) selected[status == Some(*st)] { (st.label()) }
                }
            } }
            label { "Connected " select name="connected" {
                option value="" { "any" }
                option value="yes" selected[connected == Some(true)] { "yes" }
                option value="no" selected[connected == Some(false)] { "no" }
            } }
            button type="submit" { "Filter" }
        }
        table {
            thead { tr { th { "Device" } th { "Name" } th { "Instance" } th { "Category" } th { "Status" } th { "Connected" } th { "Last activity" } } }
            tbody {
                @for d in &got.items {
                    tr {
                        td { a href=(device_href(&d.device_id)) { (d.device_id.as_str()) } }
                        td { (d.name) }
                        td { (d.provider_instance) }
                        td { (d.category.as_deref().unwrap_or("—")) }
                        td { (d.registration_status.label()) }
                        td { @if d.connection_state { span class="good" { "yes" } } @else { "no" } }
                        td { (when(d.last_activity_time)) }
                    }
                }
            }
        }
        @if got.items.is_empty() { p class="muted" { "No device matches." } }
        (pager(got.next.as_ref(), &[
            ("instance", filter.provider_instance.clone()),
            ("category", filter.category.clone()),
            ("status", status.map(|s| s.label().to_owned())),
            ("connected", nonempty(&q.connected)),
        ]))
    };
    page("Devices", body).into_response()
}

#[derive(Deserialize, Default)]
pub(super) struct RangeQuery {
    hours: Option<i64>,
}

/// One device: its record, history, commands, alerts and a chart per measure.
pub(super) async fn device(
    State(s): State<ApiState>,
    Path(raw): Path<String>,
    q: Result<Query<RangeQuery>, QueryRejection>,
) -> Response {
    let Ok(id) = DeviceId::parse(&raw) else {
        return error_page(
            StatusCode::BAD_REQUEST,
            &format!("`{raw}` is not a device id"),
        );
    };
    let d = match s.core.store.get_device(&id).await {
        Ok(Some(d)) => d,
        Ok(None) => {
            return error_page(
                StatusCode::NOT_FOUND,
                &format!("Device {id} is not registered."),
            )
        }
        Err(e) => return store_error(e),
    };
    let hours = q
        .ok()
        .and_then(|Query(q)| q.hours)
        .unwrap_or(1)
        .clamp(1, 24 * 365);
    let to = Utc::now();
    let from = to - Duration::hours(hours);
    // About 300 points at most, in whole minutes.
    let interval_s = ((hours * 3600 / 300).max(60) / 60) * 60;
    let store = &s.core.store;
    let history = store.history(&id).await.unwrap_or_default();
    let timeline = store.connection_history(&id, 20).await.unwrap_or_default();
    let commands = store
        .list_commands(
            &CommandFilter {
                device_id: Some(id.clone()),
                ..CommandFilter::default()
            },
            &PageRequest {
                after: None,
                limit: 20,
            },
        )
        .await
        .map(|p| p.items)
        .unwrap_or_default();
    let alerts = store
        .list_alerts(
            &AlertFilter {
                device_id: Some(id.clone()),
                ..AlertFilter::default()
            },
            &PageRequest {
                after: None,
                limit: PAGE,
            },
        )
        .await
        .map(|p| p.items)
        .unwrap_or_default();
    let buckets = store
        .query_readings(&ReadingQuery {
            device_id: id.clone(),
            from,
            to,
            interval_s,
            measures: Vec::new(),
        })
        .await
        .unwrap_or_default();
    let mut series: BTreeMap<&str, Vec<&ReadingBucket>> = BTreeMap::new();
    for b in &buckets {
        series.entry(b.measure.as_str()).or_default().push(b);
    }
    let json = |v: &Option<serde_json::Value>| {
        v.as_ref()
            .map(|v| serde_json::to_string_pretty(v).unwrap_or_default())
            .unwrap_or_else(|| "—".into())
    };
    let body = html! {
        table {
            tbody {
                tr { th { "Name" } td { (d.name) } }
                tr { th { "Provider instance" } td { (d.provider_instance) } }
                tr { th { "Category" } td { (d.category.as_deref().unwrap_or("—")) } }
                tr { th { "Registration" } td { (d.registration_status.label()) @if let Some(m) = &d.registration_message { br; span class="muted" { (m) } } } }
                tr { th { "Connected" } td { @if d.connection_state { span class="good" { "yes" } } @else { "no" } " since " (when(d.connection_state_updated_at)) } }
                tr { th { "Last activity" } td { (when(d.last_activity_time)) } }
            }
        }
        h2 { "Connection timeline" }
        @if timeline.is_empty() { p class="muted" { "No connection change recorded yet." } }
        @else {
            table data-timeline=(timeline.len()) {
                thead { tr { th { "When" } th { "State" } } }
                tbody {
                    @for (at, connected) in &timeline {
                        tr { td { (when(Some(*at))) } td { @if *connected { span class="good" { "connected" } } @else { span class="bad" { "disconnected" } } } }
                    }
                }
            }
        }
        h2 { "Readings, last " (hours) " h" }
        form method="get" {
            label { "Hours " input type="number" name="hours" min="1" max="8760" value=(hours); }
            button type="submit" { "Show" }
        }
        @if series.is_empty() { p class="muted" { "No readings in this range." } }
        @for (measure, points) in &series {
            (chart::svg(measure, points, from.timestamp_millis(), to.timestamp_millis()))
        }
        h2 { "Alerts" }
        (alert_table(&alerts))
        h2 { "Recent commands" }
        table {
            thead { tr { th { "Command" } th { "Status" } th { "Reason" } th { "Created" } } }
            tbody {
                @for c in &commands {
                    tr { td { (c.name) } td { (c.status.label()) } td { (c.status_reason.as_deref().unwrap_or("")) } td { (when(Some(c.created_at))) } }
                }
            }
        }
        h2 { "Reported properties" }
        pre { (json(&d.reported_properties)) }
        h2 { "Settings" }
        pre { (json(&d.settings)) }
        h2 { "Registration history" }
        table {
            thead { tr { th { "When" } th { "Action" } th { "Instance" } } }
            tbody {
                @for h in &history {
                    tr { td { (when(Some(h.created_at))) } td { (h.action.label()) } td { (h.provider_instance) } }
                }
            }
        }
    };
    page(&format!("Device {id}"), body).into_response()
}

fn alert_state(a: &iotgw_registry::Alert) -> &'static str {
    match a.status() {
        Some(AlertStatus::Active) => "Active",
        Some(AlertStatus::Inactive) => "Inactive",
        Some(AlertStatus::CaseCreated) => "In Progress – Case Created",
        Some(AlertStatus::WorkOrderCreated) => "In Progress – Work Order Created",
        Some(AlertStatus::CommandSent) => "In Progress – Command Sent",
        Some(AlertStatus::Closed) => "Closed",
        Some(AlertStatus::CommandFailed) => "In Progress – Command Failed",
        None => "?",
    }
}

/// Alerts of one device, parents first with their children folded under them (children
/// whose parent is on the page).
fn alert_table(alerts: &[iotgw_registry::Alert]) -> Markup {
    let parents: Vec<&iotgw_registry::Alert> =
        alerts.iter().filter(|a| a.parent_alert.is_none()).collect();
    html! {
        table {
            thead { tr { th { "Alert" } th { "Device" } th { "Type" } th { "State" } th { "Time" } } }
            tbody {
                @for p in &parents {
                    tr data-alert=(p.id) {
                        td { (p.description) }
                        td { a href=(device_href(&p.device_id)) { (p.device_id.as_str()) } }
                        td { (p.alert_type.label()) } td { (alert_state(p)) } td { (when(Some(p.alert_time))) }
                    }
                    @for c in alerts.iter().filter(|c| c.parent_alert == Some(p.id)) {
                        tr class="child" data-parent=(p.id) {
                            td { "↳ " (c.description) }
                            td { (c.device_id.as_str()) }
                            td { (c.alert_type.label()) } td { (alert_state(c)) } td { (when(Some(c.alert_time))) }
                        }
                    }
                }
            }
        }
    }
}

#[derive(Deserialize, Default)]
pub(super) struct AlertQuery {
    device: Option<String>,
    r#type: Option<String>,
    state: Option<String>,
    after: Option<String>,
}

/// Parent alerts, newest first, each with (up to 20 of) its children folded under it.
pub(super) async fn alerts(
    State(s): State<ApiState>,
    q: Result<Query<AlertQuery>, QueryRejection>,
) -> Response {
    let q = q.map(|Query(q)| q).unwrap_or_default();
    let device = match nonempty(&q.device).map(|d| DeviceId::parse(&d)).transpose() {
        Ok(d) => d,
        Err(e) => return error_page(StatusCode::BAD_REQUEST, &format!("not a device id: {e}")),
    };
    let alert_type = nonempty(&q.r#type).and_then(|t| AlertType::from_label(&t));
    let state = nonempty(&q.state).and_then(|v| v.parse::<i32>().ok());
    let filter = AlertFilter {
        device_id: device,
        statecode: state,
        primary: Some(true),
        alert_type,
        ..AlertFilter::default()
    };
    let store = &s.core.store;
    let parents = match store
        .list_alerts(
            &filter,
            &PageRequest {
                after: nonempty(&q.after),
                limit: PAGE,
            },
        )
        .await
    {
        Ok(p) => p,
        Err(e) => return error_page(StatusCode::BAD_REQUEST, &e.to_string()),
    };
    let mut all = Vec::new();
    for p in &parents.items {
        all.push(p.clone());
        if let Ok(children) = store
            .list_alerts(
                &AlertFilter {
                    parent_alert: Some(p.id),
                    ..AlertFilter::default()
                },
                &PageRequest {
                    after: None,
                    limit: CHILDREN,
                },
            )
            .await
        {
            all.extend(children.items);
        }
    }
    let body = html! {
        form class="filters" method="get" action="/ui/alerts" {
            label { "Device " input name="device" value=[filter.device_id.as_ref().map(DeviceId::as_str)]; }
            label { "Type " select name="type" {
                option value="" { "any" }
                @for t in AlertType::ALL { option value=(t.label()) selected[alert_type == Some(*t)] { (t.label()) } }
            } }
            label { "State " select name="state" {
                option value="" { "any" }
                @for (v, l) in [(0, "Active"), (1, "Inactive"), (2, "In Progress"), (3, "Closed")] {
                    option value=(v) selected[state == Some(v)] { (l) }
                }
            } }
            button type="submit" { "Filter" }
        }
        (alert_table(&all))
        @if parents.items.is_empty() { p class="muted" { "No alert matches." } }
        (pager(parents.next.as_ref(), &[
            ("device", nonempty(&q.device)),
            ("type", alert_type.map(|t| t.label().to_owned())),
            ("state", state.map(|s| s.to_string())),
        ]))
    };
    page("Alerts", body).into_response()
}

#[derive(Deserialize, Default)]
pub(super) struct AfterQuery {
    after: Option<String>,
}

/// Dead letters, newest first, with a payload preview and a replay button.
pub(super) async fn dead_letters(
    State(s): State<ApiState>,
    q: Result<Query<AfterQuery>, QueryRejection>,
) -> Response {
    let q = q.map(|Query(q)| q).unwrap_or_default();
    let got = match s
        .core
        .store
        .list_dead_letters(&PageRequest {
            after: nonempty(&q.after),
            limit: PAGE,
        })
        .await
    {
        Ok(p) => p,
        Err(e) => return error_page(StatusCode::BAD_REQUEST, &e.to_string()),
    };
    let body = html! {
        table {
            thead { tr { th { "When" } th { "Source" } th { "Device" } th { "Reason" } th { "Payload" } th { "Replay" } } }
            tbody {
                @for l in &got.items {
                    tr {
                        td { (when(Some(l.created_at))) }
                        td { (l.source) }
                        td { (l.device_id.as_deref().unwrap_or("—")) }
                        td { (l.reason) }
                        td { code { (l.payload.chars().take(PREVIEW).collect::<String>()) @if l.payload.chars().count() > PREVIEW { "…" } } }
                        td {
                            form method="post" action=(format!("/ui/dead-letters/{}/replay", l.id)) {
                                button type="submit" aria-label=(format!("Replay dead letter {}", l.id)) { "Replay" }
                            }
                        }
                    }
                }
            }
        }
        @if got.items.is_empty() { p class="muted" { "No dead letters." } }
        (pager(got.next.as_ref(), &[]))
    };
    page("Dead letters", body).into_response()
}

/// Replays one dead letter, then shows the list again.
pub(super) async fn replay(State(s): State<ApiState>, Path(id): Path<i64>) -> Response {
    match crate::replay::replay(&s.core, id).await {
        Ok(_) => Redirect::to("/ui/dead-letters").into_response(),
        Err(e) => error_page(StatusCode::CONFLICT, &format!("Dead letter {id}: {e}")),
    }
}
