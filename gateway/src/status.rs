//! `iotgw status`: the operator's overview of a running gateway in the terminal, read from
//! its HTTP API only — readiness and its reasons (`GET /ready`), each provider instance's
//! health and device count (`GET /api/v1/providers`), its connected devices (`GET
//! /api/v1/devices?provider_instance=X&connected=true`, paged), the outbox depth per sink
//! and the events received, acked and nacked (`GET /metrics`), and the dead letters (first
//! page of `GET /api/v1/dead-letters`) — printed as plain-text tables.
//!
//! Fetching ([`fetch`]) and formatting ([`Overview::render`] and the functions it uses) are
//! apart, so the formatting is tested without a gateway.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use serde::Deserialize;

use crate::errors::error_chain;

/// Exit code when the gateway cannot be reached (EX_UNAVAILABLE).
pub const EXIT_UNAVAILABLE: u8 = 69;

/// `msdyn_registrationstatus` Unregistered: such a device no longer counts as connected.
const UNREGISTERED: i64 = 192_350_001;

/// How a part that answered 401 says so; [`Overview::render`] then adds what to do, once.
const TOKEN_REFUSED: &str = "the gateway refused the token (HTTP 401)";

/// The largest page the API gives.
const PAGE_LIMIT: &str = "1000";
/// Dead letters read to count them: each carries its payload (up to 64 KiB), so the
/// overview reads one page of 100 at most and says "100 or more" beyond.
const DEAD_LETTER_LIMIT: &str = "100";

/// Where the gateway is.
#[derive(Debug, Clone)]
pub struct Options {
    /// API base URL, e.g. `http://127.0.0.1:8080`.
    pub url: String,
    /// Bearer token.
    pub token: Option<String>,
    /// Per request.
    pub timeout: Duration,
}

/// `GET /ready`'s answer.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Ready {
    /// The verdict.
    pub ready: bool,
    /// Why not ready (only with the token, when one is configured).
    #[serde(default)]
    pub reasons: Vec<String>,
    /// Optional instances that are down.
    #[serde(default)]
    pub degraded: Vec<String>,
    /// Present when the gateway withheld the reasons (no token, or a wrong one).
    #[serde(default)]
    pub details: Option<String>,
}

/// One provider instance as `GET /api/v1/providers` lists it, plus its connected devices.
#[derive(Debug, Clone, Deserialize)]
pub struct Instance {
    /// Instance name.
    pub name: String,
    /// Provider kind (`mqtt`, `aws_iot_core`, ...).
    pub kind: String,
    /// Not down (an instance without a receive connection is never down).
    pub healthy: bool,
    /// How long it has been down.
    #[serde(default)]
    pub down_for_secs: Option<u64>,
    /// Down longer than `health.failover_after_secs`.
    #[serde(default)]
    pub failed_over: bool,
    /// Whether readiness waits for it (not in `health.optional`).
    #[serde(default = "yes")]
    pub required: bool,
    /// Devices it hosts (every registration status but Unregistered).
    #[serde(default)]
    pub devices: u64,
    /// The provider's own health report.
    #[serde(default)]
    pub health: InstanceHealth,
    /// Its connected devices, counted by paging `GET /api/v1/devices`; `None` when that
    /// failed.
    #[serde(skip)]
    pub connected: Option<u64>,
}

fn yes() -> bool {
    true
}

/// The part of a provider's health report the overview shows.
#[derive(Debug, Clone, Deserialize)]
pub struct InstanceHealth {
    /// The last error, if any.
    #[serde(default)]
    pub last_error: Option<String>,
    /// False for an instance without a receive connection (control plane only).
    #[serde(default = "yes")]
    pub receiving: bool,
}

impl Default for InstanceHealth {
    fn default() -> Self {
        Self {
            last_error: None,
            receiving: true,
        }
    }
}

/// Events one provider instance handed to the pipeline since the gateway started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Events {
    /// `iotgw_events_received_total`.
    pub received: u64,
    /// `iotgw_events_acked_total`.
    pub acked: u64,
    /// `iotgw_events_nacked_total`, every reason.
    pub nacked: u64,
}

/// What the overview takes from `GET /metrics`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MetricsView {
    /// `iotgw_outbox_depth` per sink.
    pub outbox: BTreeMap<String, u64>,
    /// Events per provider instance.
    pub events: BTreeMap<String, Events>,
}

/// One sample of the Prometheus / OpenMetrics text format.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Metric name, with its suffix (`iotgw_events_received_total`).
    pub name: String,
    /// Label names and (unescaped) values.
    pub labels: BTreeMap<String, String>,
    /// The value.
    pub value: f64,
}

/// The first page of `GET /api/v1/dead-letters`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DeadLetters {
    /// Dead letters on the page.
    pub count: usize,
    /// The API has more pages.
    pub more: bool,
    /// The page's dead letters by reason, most frequent first.
    pub by_reason: Vec<(String, usize)>,
}

/// Everything `iotgw status` prints; a part that could not be read holds why.
#[derive(Debug, Clone)]
pub struct Overview {
    /// API base URL.
    pub url: String,
    /// `GET /ready`.
    pub ready: Ready,
    /// `GET /api/v1/providers` (+ connected counts).
    pub instances: Result<Vec<Instance>, String>,
    /// `GET /metrics`.
    pub metrics: Result<MetricsView, String>,
    /// `GET /api/v1/dead-letters`.
    pub dead_letters: Result<DeadLetters, String>,
}

impl Overview {
    /// Every part was read (connected counts included).
    pub fn complete(&self) -> bool {
        self.instances
            .as_ref()
            .is_ok_and(|l| l.iter().all(|i| i.connected.is_some()))
            && self.metrics.is_ok()
            && self.dead_letters.is_ok()
    }

    /// 0 when the gateway is ready and every part was read, 1 otherwise.
    pub fn exit_code(&self) -> u8 {
        u8::from(!(self.ready.ready && self.complete()))
    }

    /// The overview as printed on stdout.
    pub fn render(&self) -> String {
        let mut out = render_ready(&self.url, &self.ready);
        out.push('\n');
        let empty = MetricsView::default();
        let metrics = self.metrics.as_ref().unwrap_or(&empty);
        out.push_str("Provider instances\n");
        match &self.instances {
            Ok(list) => out.push_str(&render_instances(
                list,
                self.metrics.as_ref().ok().map(|m| &m.events),
            )),
            Err(why) => {
                let _ = writeln!(out, "  unavailable: {why}");
            }
        }
        out.push('\n');
        out.push_str("Outbox (items waiting per sink)\n");
        match &self.metrics {
            Ok(_) => out.push_str(&render_outbox(&metrics.outbox)),
            Err(why) => {
                let _ = writeln!(out, "  unavailable: {why}");
            }
        }
        out.push('\n');
        out.push_str(&render_dead_letters(&self.dead_letters));
        let refused = |r: Result<(), &String>| r.is_err_and(|e| e.contains(TOKEN_REFUSED));
        if refused(self.instances.as_ref().map(|_| ()))
            || refused(self.metrics.as_ref().map(|_| ()))
            || refused(self.dead_letters.as_ref().map(|_| ()))
        {
            out.push_str(
                "\nThe token was missing or wrong: pass the gateway's api.token with --token or \
                 IOTGW_API_TOKEN,\nor the config it runs with via --config.\n",
            );
        }
        out
    }
}

/// Parses the Prometheus text format (and OpenMetrics): one [`Sample`] per sample line;
/// comments, `# EOF` and lines that are not a sample are skipped.
pub fn parse_metrics(text: &str) -> Vec<Sample> {
    text.lines().filter_map(parse_sample).collect()
}

fn parse_sample(line: &str) -> Option<Sample> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let name_end = line
        .find(|c: char| c == '{' || c.is_whitespace())
        .unwrap_or(line.len());
    let name = &line[..name_end];
    if name.is_empty() {
        return None;
    }
    let mut rest = &line[name_end..];
    let mut labels = BTreeMap::new();
    if let Some(inner) = rest.strip_prefix('{') {
        let (parsed, after) = parse_labels(inner)?;
        labels = parsed;
        rest = after;
    }
    // The value, then an optional timestamp (and, in OpenMetrics, an exemplar after `#`).
    let value = rest.split_whitespace().next()?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    Some(Sample {
        name: name.to_owned(),
        labels,
        value,
    })
}

/// `name="value",...}` -> the labels and the text after the closing brace.
fn parse_labels(mut s: &str) -> Option<(BTreeMap<String, String>, &str)> {
    let mut labels = BTreeMap::new();
    loop {
        s = s.trim_start_matches([' ', ',']);
        if let Some(after) = s.strip_prefix('}') {
            return Some((labels, after));
        }
        let eq = s.find('=')?;
        let key = s[..eq].trim().to_owned();
        s = s[eq + 1..].trim_start().strip_prefix('"')?;
        let mut value = String::new();
        let mut chars = s.char_indices();
        let end = loop {
            match chars.next()? {
                (i, '"') => break i,
                (_, '\\') => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    c => value.push(c),
                },
                (_, c) => value.push(c),
            }
        };
        labels.insert(key, value);
        s = &s[end + 1..];
    }
}

/// The outbox depths and the event counters among `samples`.
pub fn summarize_metrics(samples: &[Sample]) -> MetricsView {
    let mut view = MetricsView::default();
    // Counters are whole numbers; a sample that is not one (NaN, negative) counts as 0.
    let whole = |v: f64| {
        if v.is_finite() && v > 0.0 {
            v.round() as u64
        } else {
            0
        }
    };
    for s in samples {
        let label = |k: &str| s.labels.get(k).cloned().unwrap_or_default();
        match s.name.as_str() {
            "iotgw_outbox_depth" => {
                *view.outbox.entry(label("sink")).or_default() += whole(s.value);
            }
            "iotgw_events_received_total" => {
                view.events.entry(label("provider")).or_default().received += whole(s.value);
            }
            "iotgw_events_acked_total" => {
                view.events.entry(label("provider")).or_default().acked += whole(s.value);
            }
            "iotgw_events_nacked_total" => {
                view.events.entry(label("provider")).or_default().nacked += whole(s.value);
            }
            _ => {}
        }
    }
    view
}

/// A duration in the two largest units: `45s`, `3m 20s`, `2h 05m`, `3d 4h`.
pub fn human_duration(secs: u64) -> String {
    match secs {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m {:02}s", s / 60, s % 60),
        s if s < 86_400 => format!("{}h {:02}m", s / 3600, s % 3600 / 60),
        s => format!("{}d {}h", s / 86_400, s % 86_400 / 3600),
    }
}

/// The HEALTH cell of an instance: `connected`, `DOWN 3m 20s, failed over`, `control plane
/// only`, with ` (optional)` for an instance readiness does not wait for.
pub fn health_text(i: &Instance) -> String {
    let mut s = if !i.health.receiving {
        "control plane only".to_owned()
    } else if i.healthy {
        "connected".to_owned()
    } else {
        match i.down_for_secs {
            Some(secs) => format!("DOWN {}", human_duration(secs)),
            None => "DOWN".to_owned(),
        }
    };
    if i.failed_over {
        s.push_str(", failed over");
    }
    if !i.required {
        s.push_str(" (optional)");
    }
    s
}

/// Columns padded to their widest cell, two spaces apart, each line indented by two;
/// the columns flagged in `right` (numbers) aligned to the right.
pub fn table(header: &[&str], rows: &[Vec<String>], right: &[bool]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut out = String::from(" ");
        for (n, cell) in cells.iter().enumerate() {
            let w = widths.get(n).copied().unwrap_or(0);
            if right.get(n).copied().unwrap_or(false) {
                let _ = write!(out, " {cell:>w$}");
            } else {
                let _ = write!(out, " {cell:<w$}");
            }
            out.push(' ');
        }
        format!("{}\n", out.trim_end())
    };
    let mut out = line(header.to_vec());
    for row in rows {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    out
}

/// The first lines: the URL, ready or NOT READY, the reasons, the degraded instances.
pub fn render_ready(url: &str, r: &Ready) -> String {
    let mut out = format!(
        "Gateway {url}: {}\n",
        if r.ready { "ready" } else { "NOT READY" }
    );
    for reason in &r.reasons {
        let _ = writeln!(out, "  - {reason}");
    }
    if !r.degraded.is_empty() {
        out.push_str("  degraded (optional instances down; they do not make it unready):\n");
        for d in &r.degraded {
            let _ = writeln!(out, "  - {d}");
        }
    }
    if !r.ready && r.reasons.is_empty() && r.details.is_some() {
        out.push_str(
            "  (the gateway tells why only with its token: pass --token or set IOTGW_API_TOKEN)\n",
        );
    }
    out
}

/// The provider instance table with a total row, then the last error of each instance
/// that is down. `events` is `None` when `/metrics` could not be read.
pub fn render_instances(list: &[Instance], events: Option<&BTreeMap<String, Events>>) -> String {
    if list.is_empty() && events.is_none_or(BTreeMap::is_empty) {
        return "  none configured\n".to_owned();
    }
    let count = |n: Option<u64>| n.map_or_else(|| "?".to_owned(), |n| n.to_string());
    let mut rows = Vec::new();
    let mut total_devices = 0;
    let mut total_connected = Some(0u64);
    let mut total_events = Events::default();
    let mut event_cells = |name: &str| -> [String; 3] {
        match events {
            None => ["?".into(), "?".into(), "?".into()],
            Some(map) => {
                let e = map.get(name).copied().unwrap_or_default();
                total_events.received += e.received;
                total_events.acked += e.acked;
                total_events.nacked += e.nacked;
                [
                    e.received.to_string(),
                    e.acked.to_string(),
                    e.nacked.to_string(),
                ]
            }
        }
    };
    for i in list {
        total_devices += i.devices;
        total_connected = total_connected.zip(i.connected).map(|(a, b)| a + b);
        let [received, acked, nacked] = event_cells(&i.name);
        rows.push(vec![
            i.name.clone(),
            i.kind.clone(),
            health_text(i),
            i.devices.to_string(),
            count(i.connected),
            received,
            acked,
            nacked,
        ]);
    }
    // Instances the counters still name but the gateway no longer runs (removed by a
    // reload): their events belong in the total.
    if let Some(map) = events {
        for name in map.keys().filter(|n| list.iter().all(|i| &i.name != *n)) {
            let [received, acked, nacked] = event_cells(name);
            rows.push(vec![
                name.clone(),
                "-".into(),
                "not running".into(),
                "-".into(),
                "-".into(),
                received,
                acked,
                nacked,
            ]);
        }
    }
    let events_known = events.is_some();
    let total = |n: u64| {
        if events_known {
            n.to_string()
        } else {
            "?".to_owned()
        }
    };
    rows.push(vec![
        "total".into(),
        String::new(),
        String::new(),
        total_devices.to_string(),
        count(total_connected),
        total(total_events.received),
        total(total_events.acked),
        total(total_events.nacked),
    ]);
    let mut out = table(
        &[
            "INSTANCE",
            "KIND",
            "HEALTH",
            "DEVICES",
            "CONNECTED",
            "RECEIVED",
            "ACKED",
            "NACKED",
        ],
        &rows,
        &[false, false, false, true, true, true, true, true],
    );
    for i in list {
        if let (false, Some(e)) = (i.healthy, &i.health.last_error) {
            let _ = writeln!(out, "  {}: {e}", i.name);
        }
    }
    out
}

/// The outbox table: one row per sink.
pub fn render_outbox(outbox: &BTreeMap<String, u64>) -> String {
    if outbox.is_empty() {
        return "  no sinks configured\n".to_owned();
    }
    let rows: Vec<Vec<String>> = outbox
        .iter()
        .map(|(sink, depth)| vec![sink.clone(), depth.to_string()])
        .collect();
    table(&["SINK", "DEPTH"], &rows, &[false, true])
}

/// `Dead letters: N`, then the page's count per reason.
pub fn render_dead_letters(d: &Result<DeadLetters, String>) -> String {
    let d = match d {
        Ok(d) => d,
        Err(why) => return format!("Dead letters: unavailable: {why}\n"),
    };
    let mut out = if d.more {
        format!(
            "Dead letters: {} or more (GET /api/v1/dead-letters pages through them)\n",
            d.count
        )
    } else {
        format!("Dead letters: {}\n", d.count)
    };
    const SHOWN: usize = 5;
    for (reason, n) in d.by_reason.iter().take(SHOWN) {
        let reason: String = if reason.chars().count() > 100 {
            format!("{}…", reason.chars().take(99).collect::<String>())
        } else {
            reason.clone()
        };
        let _ = writeln!(out, "  {n:>5}  {reason}");
    }
    if d.by_reason.len() > SHOWN {
        let _ = writeln!(
            out,
            "  ... and {} other reason(s)",
            d.by_reason.len() - SHOWN
        );
    }
    out
}

/// Groups a page of dead letters' reasons, most frequent first (then by reason).
pub fn dead_letters_from_page(reasons: &[String], more: bool) -> DeadLetters {
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for r in reasons {
        *counts.entry(r.as_str()).or_default() += 1;
    }
    let mut by_reason: Vec<(String, usize)> =
        counts.into_iter().map(|(r, n)| (r.to_owned(), n)).collect();
    by_reason.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    DeadLetters {
        count: reasons.len(),
        more,
        by_reason,
    }
}

/// What to print when the gateway does not answer at `url`.
pub fn unreachable_message(url: &str, cause: &str) -> String {
    format!(
        "iotgw status: cannot reach the gateway at {url} ({cause}).\n\
         Check that `iotgw run` is running there and that its API listens on that address:\n\
         pass the address with --url (e.g. --url http://127.0.0.1:8080), or the config the\n\
         gateway runs with via --config / IOTGW_CONFIG (its api.listen is used)."
    )
}

/// The innermost error of `e`'s source chain.
fn root_cause(e: &dyn std::error::Error) -> String {
    let mut last = e;
    while let Some(s) = last.source() {
        last = s;
    }
    last.to_string()
}

#[derive(Deserialize)]
struct ProvidersAnswer {
    items: Vec<Instance>,
}

#[derive(Deserialize)]
struct ListedDevice {
    msdyn_registrationstatus: i64,
}

#[derive(Deserialize)]
struct DevicePage {
    items: Vec<ListedDevice>,
    next: Option<String>,
}

#[derive(Deserialize)]
struct ListedDeadLetter {
    reason: String,
}

#[derive(Deserialize)]
struct DeadLetterPage {
    items: Vec<ListedDeadLetter>,
    next: Option<String>,
}

#[derive(Deserialize)]
struct ErrorAnswer {
    error: ErrorBody,
}

#[derive(Deserialize)]
struct ErrorBody {
    message: String,
}

struct Api {
    client: reqwest::Client,
    base: String,
    token: Option<String>,
    timeout: Duration,
}

impl Api {
    /// GET `path` with `query`: the body of a 2xx answer, else why not (in words).
    async fn text(&self, path: &str, query: &[(&str, &str)]) -> Result<String, String> {
        let mut req = self.client.get(format!("{}{path}", self.base)).query(query);
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        let answer = req.send().await.map_err(|e| {
            if e.is_timeout() {
                format!(
                    "GET {path}: no answer within {} s",
                    self.timeout.as_secs_f32()
                )
            } else {
                format!("GET {path}: {}", error_chain(&e))
            }
        })?;
        let status = answer.status();
        let body = answer
            .text()
            .await
            .map_err(|e| format!("GET {path}: {}", error_chain(&e)))?;
        if status == reqwest::StatusCode::UNAUTHORIZED {
            return Err(format!("GET {path}: {TOKEN_REFUSED}"));
        }
        if !status.is_success() {
            let message = serde_json::from_str::<ErrorAnswer>(&body)
                .map(|e| e.error.message)
                .unwrap_or_else(|_| body.chars().take(200).collect());
            return Err(format!("GET {path}: HTTP {}: {message}", status.as_u16()));
        }
        Ok(body)
    }

    async fn json<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        query: &[(&str, &str)],
    ) -> Result<T, String> {
        let body = self.text(path, query).await?;
        serde_json::from_str(&body)
            .map_err(|e| format!("GET {path}: the answer is not what iotgw sends ({e})"))
    }

    /// The instance's connected devices (Unregistered ones left out), every page.
    async fn connected(&self, instance: &str) -> Result<u64, String> {
        let mut count = 0;
        let mut after: Option<String> = None;
        loop {
            let mut query = vec![
                ("provider_instance", instance),
                ("connected", "true"),
                ("limit", PAGE_LIMIT),
            ];
            if let Some(a) = &after {
                query.push(("after", a.as_str()));
            }
            let page: DevicePage = self.json("/api/v1/devices", &query).await?;
            count += page
                .items
                .iter()
                .filter(|d| d.msdyn_registrationstatus != UNREGISTERED)
                .count() as u64;
            match page.next {
                Some(n) if after.as_deref() != Some(n.as_str()) => after = Some(n),
                _ => return Ok(count),
            }
        }
    }
}

/// Reads the overview from the gateway at `opts.url`. `Err` (the message to print) when
/// the gateway cannot be reached or what answers is not an iotgw API.
pub async fn fetch(opts: &Options) -> Result<Overview, String> {
    let client = reqwest::Client::builder()
        .timeout(opts.timeout)
        .no_proxy()
        .build()
        .map_err(|e| format!("iotgw status: cannot build an HTTP client: {e}"))?;
    let api = Api {
        client,
        base: opts.url.trim_end_matches('/').to_owned(),
        token: opts.token.clone(),
        timeout: opts.timeout,
    };
    let url = api.base.clone();

    // `/ready` answers 200 or 503 with its verdict, token or not: whether the gateway is
    // there at all.
    let mut req = api.client.get(format!("{url}/ready"));
    if let Some(t) = &api.token {
        req = req.bearer_auth(t);
    }
    let answer = match req.send().await {
        Ok(a) => a,
        Err(e) if e.is_timeout() => {
            let cause = format!("no answer within {} s", opts.timeout.as_secs_f32());
            return Err(unreachable_message(&url, &cause));
        }
        // A refused or failed connection: its innermost cause says it best ("Connection
        // refused (os error 111)"); reqwest's outer layers only repeat the URL.
        Err(e) if e.is_connect() => return Err(unreachable_message(&url, &root_cause(&e))),
        Err(e) => return Err(unreachable_message(&url, &error_chain(&e))),
    };
    let status = answer.status();
    let body = answer
        .text()
        .await
        .map_err(|e| unreachable_message(&url, &error_chain(&e)))?;
    let ready: Ready = match serde_json::from_str(&body) {
        Ok(r) if status.as_u16() == 200 || status.as_u16() == 503 => r,
        _ => {
            let cause = format!(
                "GET /ready answered HTTP {} with something that is not iotgw's readiness",
                status.as_u16()
            );
            return Err(unreachable_message(&url, &cause));
        }
    };

    let instances = match api.json::<ProvidersAnswer>("/api/v1/providers", &[]).await {
        Ok(answer) => {
            let mut list = answer.items;
            let mut first_error = None;
            for i in &mut list {
                match api.connected(&i.name).await {
                    Ok(n) => i.connected = Some(n),
                    Err(e) => {
                        first_error.get_or_insert(e);
                    }
                }
            }
            match first_error {
                // The counts that could be read, the rest shown as `?`; the reason is the
                // listing's, the same for every instance.
                Some(e) if list.iter().all(|i| i.connected.is_none()) => Err(e),
                _ => Ok(list),
            }
        }
        Err(e) => Err(e),
    };
    let metrics = api
        .text("/metrics", &[])
        .await
        .map(|t| summarize_metrics(&parse_metrics(&t)));
    let dead_letters = api
        .json::<DeadLetterPage>("/api/v1/dead-letters", &[("limit", DEAD_LETTER_LIMIT)])
        .await
        .map(|page| {
            let reasons: Vec<String> = page.items.into_iter().map(|d| d.reason).collect();
            dead_letters_from_page(&reasons, page.next.is_some())
        });
    Ok(Overview {
        url,
        ready,
        instances,
        metrics,
        dead_letters,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn instance(name: &str, devices: u64, connected: Option<u64>) -> Instance {
        Instance {
            name: name.into(),
            kind: "mqtt".into(),
            healthy: true,
            down_for_secs: None,
            failed_over: false,
            required: true,
            devices,
            health: InstanceHealth::default(),
            connected,
        }
    }

    const METRICS: &str = "\
# HELP iotgw_events_received Provider events received.
# TYPE iotgw_events_received counter
iotgw_events_received_total{provider=\"local\"} 12
iotgw_events_received_total{provider=\"aws-eu\"} 3
iotgw_events_acked_total{provider=\"local\"} 11
iotgw_events_nacked_total{provider=\"local\",reason=\"store\"} 1
iotgw_events_nacked_total{provider=\"local\",reason=\"shutdown\"} 2
iotgw_outbox_depth{sink=\"stdout\"} 0
iotgw_outbox_depth{sink=\"hook\"} 7
iotgw_in_flight 0
iotgw_deliveries_total{sink=\"hook\",outcome=\"delivered\"} 5 1700000000
# EOF
";

    #[test]
    fn metrics_parse_into_names_labels_and_values() {
        let samples = parse_metrics(METRICS);
        assert_eq!(samples.len(), 9, "{samples:?}");
        let nacked = &samples[4];
        assert_eq!(nacked.name, "iotgw_events_nacked_total");
        assert_eq!(nacked.labels["provider"], "local");
        assert_eq!(nacked.labels["reason"], "shutdown");
        assert_eq!(nacked.value, 2.0);
        assert_eq!(samples[7].name, "iotgw_in_flight");
        assert!(samples[7].labels.is_empty());
        assert_eq!(samples[8].value, 5.0, "a timestamp is not the value");
    }

    #[test]
    fn label_values_are_unescaped_and_may_hold_braces_commas_and_quotes() {
        let samples = parse_metrics(
            "iotgw_outbox_depth{sink=\"a,b}\\\"c\\\\d\\n\"} 4\nnot a sample line\n{x=\"y\"} 1\n",
        );
        assert_eq!(samples.len(), 1, "{samples:?}");
        assert_eq!(samples[0].labels["sink"], "a,b}\"c\\d\n");
        assert_eq!(samples[0].value, 4.0);
    }

    #[test]
    fn the_metrics_summary_sums_nacks_over_reasons_and_keeps_depth_per_sink() {
        let view = summarize_metrics(&parse_metrics(METRICS));
        assert_eq!(
            view.events["local"],
            Events {
                received: 12,
                acked: 11,
                nacked: 3
            }
        );
        assert_eq!(view.events["aws-eu"].received, 3);
        assert_eq!(
            view.outbox,
            BTreeMap::from([("hook".to_owned(), 7), ("stdout".to_owned(), 0)])
        );
    }

    #[test]
    fn durations_read_in_their_two_largest_units() {
        assert_eq!(human_duration(0), "0s");
        assert_eq!(human_duration(59), "59s");
        assert_eq!(human_duration(200), "3m 20s");
        assert_eq!(human_duration(7500), "2h 05m");
        assert_eq!(human_duration(3 * 86_400 + 4 * 3600 + 5), "3d 4h");
    }

    #[test]
    fn the_health_cell_says_connected_down_for_how_long_failed_over_and_optional() {
        let mut i = instance("aws-eu", 0, Some(0));
        assert_eq!(health_text(&i), "connected");
        i.healthy = false;
        i.down_for_secs = Some(200);
        i.failed_over = true;
        i.required = false;
        assert_eq!(health_text(&i), "DOWN 3m 20s, failed over (optional)");
        i.health.receiving = false;
        i.healthy = true;
        i.failed_over = false;
        i.required = true;
        assert_eq!(health_text(&i), "control plane only");
    }

    #[test]
    fn a_table_pads_text_left_and_numbers_right() {
        let t = table(
            &["NAME", "N"],
            &[
                vec!["local".into(), "5".into()],
                vec!["a".into(), "1234".into()],
            ],
            &[false, true],
        );
        assert_eq!(t, "  NAME      N\n  local     5\n  a      1234\n");
    }

    #[test]
    fn the_instance_table_counts_devices_connections_and_events_with_a_total_row() {
        let mut down = instance("aws-eu", 2, Some(0));
        down.kind = "aws_iot_core".into();
        down.healthy = false;
        down.down_for_secs = Some(45);
        down.health.last_error = Some("connection refused".into());
        let list = vec![instance("local", 5, Some(3)), down];
        let view = summarize_metrics(&parse_metrics(METRICS));
        let text = render_instances(&list, Some(&view.events));
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            "  INSTANCE  KIND          HEALTH     DEVICES  CONNECTED  RECEIVED  ACKED  NACKED",
            "{text}"
        );
        assert_eq!(
            lines[1],
            "  local     mqtt          connected        5          3        12     11       3",
            "{text}"
        );
        assert_eq!(
            lines[2],
            "  aws-eu    aws_iot_core  DOWN 45s         2          0         3      0       0",
            "{text}"
        );
        assert_eq!(
            lines[3],
            "  total                                    7          3        15     11       3",
            "{text}"
        );
        assert_eq!(lines[4], "  aws-eu: connection refused", "{text}");
    }

    #[test]
    fn unknown_counts_show_as_question_marks_and_removed_instances_keep_their_events() {
        let list = vec![instance("local", 5, None)];
        let text = render_instances(&list, None);
        assert!(
            text.contains("connected        5          ?         ?      ?       ?"),
            "{text}"
        );
        let events = BTreeMap::from([(
            "old".to_owned(),
            Events {
                received: 4,
                acked: 4,
                nacked: 0,
            },
        )]);
        let text = render_instances(&[instance("local", 1, Some(1))], Some(&events));
        assert!(text.contains("  old       -     not running"), "{text}");
        assert!(text.contains("  total"), "{text}");
        assert!(
            text.lines()
                .last()
                .is_some_and(|l| l.ends_with("4      4       0")),
            "{text}"
        );
    }

    #[test]
    fn not_ready_lists_the_reasons_or_says_the_token_would_show_them() {
        let r = Ready {
            ready: false,
            reasons: vec!["provider aws-eu: not connected".into()],
            degraded: vec!["gcp".into()],
            details: None,
        };
        assert_eq!(
            render_ready("http://gw:8080", &r),
            "Gateway http://gw:8080: NOT READY\n  - provider aws-eu: not connected\n  \
             degraded (optional instances down; they do not make it unready):\n  - gcp\n"
        );
        let withheld = Ready {
            ready: false,
            details: Some("send the API token".into()),
            ..Ready::default()
        };
        assert!(render_ready("http://gw:8080", &withheld).contains("pass --token"));
        let ready = Ready {
            ready: true,
            ..Ready::default()
        };
        assert_eq!(
            render_ready("http://gw:8080", &ready),
            "Gateway http://gw:8080: ready\n"
        );
    }

    #[test]
    fn dead_letters_are_counted_by_reason_most_frequent_first() {
        let reasons: Vec<String> = ["unknown device", "wrong_instance", "unknown device"]
            .iter()
            .map(|s| (*s).to_owned())
            .collect();
        let d = dead_letters_from_page(&reasons, false);
        assert_eq!(
            render_dead_letters(&Ok(d)),
            "Dead letters: 3\n      2  unknown device\n      1  wrong_instance\n"
        );
        let full = dead_letters_from_page(&vec!["x".to_owned(); 100], true);
        assert!(render_dead_letters(&Ok(full)).starts_with("Dead letters: 100 or more"));
        assert_eq!(
            render_dead_letters(&Err("GET /api/v1/dead-letters: HTTP 500: boom".into())),
            "Dead letters: unavailable: GET /api/v1/dead-letters: HTTP 500: boom\n"
        );
    }

    #[test]
    fn the_exit_code_is_0_only_when_ready_and_every_part_was_read() {
        let mut o = Overview {
            url: "http://gw".into(),
            ready: Ready {
                ready: true,
                ..Ready::default()
            },
            instances: Ok(vec![instance("local", 1, Some(1))]),
            metrics: Ok(MetricsView::default()),
            dead_letters: Ok(DeadLetters::default()),
        };
        assert_eq!(o.exit_code(), 0);
        o.dead_letters = Err("HTTP 401".into());
        assert_eq!(o.exit_code(), 1, "a part that could not be read");
        o.dead_letters = Ok(DeadLetters::default());
        o.ready.ready = false;
        assert_eq!(o.exit_code(), 1, "not ready");
    }

    #[test]
    fn the_whole_overview_has_a_section_per_part_and_says_which_could_not_be_read() {
        let o = Overview {
            url: "http://gw:8080".into(),
            ready: Ready {
                ready: true,
                ..Ready::default()
            },
            instances: Ok(vec![instance("local", 2, Some(1))]),
            metrics: Err("GET /metrics: HTTP 401".into()),
            dead_letters: Ok(DeadLetters::default()),
        };
        let text = o.render();
        for needle in [
            "Gateway http://gw:8080: ready\n\nProvider instances\n",
            "  local     mqtt  connected        2          1         ?      ?       ?\n",
            "Outbox (items waiting per sink)\n  unavailable: GET /metrics: HTTP 401\n",
            "\nDead letters: 0\n",
        ] {
            assert!(text.contains(needle), "lacks {needle:?}:\n{text}");
        }
    }

    #[test]
    fn a_refused_token_is_explained_once_after_the_parts_it_hid() {
        fn refused<T>() -> Result<T, String> {
            Err(format!("GET /x: {TOKEN_REFUSED}"))
        }
        let o = Overview {
            url: "http://gw:8080".into(),
            ready: Ready {
                ready: true,
                details: Some("send the API token".into()),
                ..Ready::default()
            },
            instances: refused(),
            metrics: refused(),
            dead_letters: refused(),
        };
        let text = o.render();
        assert_eq!(text.matches("--token").count(), 1, "{text}");
        assert!(
            text.ends_with("or the config it runs with via --config.\n"),
            "{text}"
        );
        assert_eq!(o.exit_code(), 1);
    }

    #[test]
    fn the_unreachable_message_names_the_url_and_what_to_check() {
        let m = unreachable_message("http://127.0.0.1:9", "connection refused");
        assert!(m.contains("http://127.0.0.1:9") && m.contains("connection refused"));
        assert!(m.contains("--url") && m.contains("iotgw run"), "{m}");
    }
}
