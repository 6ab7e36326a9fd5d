//! A stand-in for a Dataverse environment and its token endpoint, on loopback: it keeps the
//! records it is sent, so a test can ask what Field Service would end up holding.
//!
//! - `POST <tenant>/oauth2/v2.0/token` issues `token-N`.
//! - `PATCH /api/data/v9.2/<entity set>(<key>)` upserts the record (the body's columns
//!   merged into what is kept): `If-None-Match: *` refuses an existing record (412) and
//!   `If-Match: *` a missing one (404), as Dataverse's "prevent update / create in upsert"
//!   do. With [`FakeDataverse::check_binds`] an `@odata.bind` naming a record it does not
//!   hold is refused with Dataverse's 0x80040217 "Does Not Exist".
//! - `POST /api/data/v9.2/$batch` runs the change set's requests in order, all or none: a
//!   failing one rolls the others back and the answer is that request's error with its
//!   `Content-ID` (the OData 4.0 batch format Dataverse documents).
//! - Modes: answer every Web API request with a fixed refusal ([`FakeDataverse::refuse_with`]),
//!   429 with `Retry-After` for a while ([`FakeDataverse::throttle_for`]), or apply writes
//!   and then answer 503 as if the answer were lost ([`FakeDataverse::lose_answers`]).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{json, Map, Value};

/// The token path of the fake Dataverse's identity platform.
pub const DATAVERSE_TOKEN_PATH: &str = "/contoso.onmicrosoft.com/oauth2/v2.0/token";
/// Where the Web API lives.
const API: &str = "/api/data/v9.2/";

/// One request the fake Dataverse received.
#[derive(Debug, Clone)]
pub struct DataverseRequest {
    /// `POST` or `PATCH`.
    pub method: String,
    /// Path and query.
    pub uri: String,
    /// The Authorization header.
    pub authorization: String,
    /// The body (a form for the token, JSON for the Web API, multipart for `$batch`).
    pub body: String,
}

/// One write the fake applied (kept), in the order applied.
#[derive(Debug, Clone, PartialEq)]
pub struct Applied {
    /// The entity set (`msdyn_iotdevices`, ...).
    pub set: String,
    /// The key as written in the URL (`<guid>` or `msdyn_deviceid='x'`).
    pub key: String,
    /// The JSON body.
    pub body: Value,
}

#[derive(Default)]
struct DataverseState {
    requests: Vec<DataverseRequest>,
    refuse_with: Option<(StatusCode, &'static str)>,
    throttled_until: Option<Instant>,
    retry_after_secs: u64,
    throttled: usize,
    lose_answers: bool,
    check_binds: bool,
    tables: BTreeMap<String, BTreeMap<String, Map<String, Value>>>,
    applied: Vec<Applied>,
}

/// A write inside a request or a change set.
struct Write {
    method: String,
    url: String,
    if_none_match: bool,
    if_match: bool,
    body: String,
}

/// An error answer: status and Dataverse's error body.
type Refusal = (StatusCode, Value);

fn dataverse_error(code: &str, message: &str) -> Value {
    json!({"error": {"code": code, "message": message}})
}

impl DataverseState {
    /// Runs one write against `tables` (a working copy for a change set).
    fn run(
        &self,
        tables: &mut BTreeMap<String, BTreeMap<String, Map<String, Value>>>,
        w: &Write,
    ) -> Result<Applied, Refusal> {
        let bad = |m: &str| (StatusCode::BAD_REQUEST, dataverse_error("0x80060888", m));
        if w.method != "PATCH" {
            return Err(bad(&format!("the fake takes PATCH only, not {}", w.method)));
        }
        let path = w
            .url
            .split_once(API)
            .map(|(_, p)| p)
            .ok_or_else(|| bad(&format!("not a Web API v9.2 URL: {}", w.url)))?;
        let (set, rest) = path
            .split_once('(')
            .ok_or_else(|| bad(&format!("no key in {path}")))?;
        let key = rest
            .strip_suffix(')')
            .ok_or_else(|| bad(&format!("key not closed in {path}")))?;
        let body: Map<String, Value> = serde_json::from_str(&w.body)
            .map_err(|e| bad(&format!("the body is not a JSON object: {e}")))?;
        let exists = tables.get(set).is_some_and(|t| t.contains_key(key));
        if w.if_none_match && exists {
            return Err((
                StatusCode::PRECONDITION_FAILED,
                dataverse_error(
                    "0x80040237",
                    "A record with matching key values already exists.",
                ),
            ));
        }
        if w.if_match && !exists {
            return Err((
                StatusCode::NOT_FOUND,
                dataverse_error(
                    "0x80040217",
                    &format!("{set} With Ids = {key} Does Not Exist"),
                ),
            ));
        }
        if self.check_binds {
            for (column, target) in &body {
                if !column.ends_with("@odata.bind") {
                    continue;
                }
                let target = target.as_str().unwrap_or_default().trim_start_matches('/');
                let found = target.split_once('(').is_some_and(|(s, k)| {
                    tables
                        .get(s)
                        .is_some_and(|t| t.contains_key(k.trim_end_matches(')')))
                });
                if !found {
                    return Err((
                        StatusCode::BAD_REQUEST,
                        dataverse_error(
                            "0x80040217",
                            &format!("{target} Does Not Exist ({column})"),
                        ),
                    ));
                }
            }
        }
        let record = tables
            .entry(set.to_owned())
            .or_default()
            .entry(key.to_owned())
            .or_default();
        for (k, v) in &body {
            record.insert(k.clone(), v.clone());
        }
        Ok(Applied {
            set: set.to_owned(),
            key: key.to_owned(),
            body: Value::Object(body),
        })
    }
}

/// Splits a multipart body at `--boundary` lines; the parts without their leading newline.
fn multipart_parts<'a>(body: &'a str, boundary: &str) -> Vec<&'a str> {
    let delimiter = format!("--{boundary}");
    body.split(delimiter.as_str())
        .skip(1)
        .take_while(|p| !p.starts_with("--"))
        .map(|p| p.trim_start_matches(['\r', '\n']))
        .collect()
}

/// Headers (lower-cased names) and the rest, split at the first blank line.
fn head_and_rest(text: &str) -> (BTreeMap<String, String>, &str) {
    let (head, rest) = text
        .split_once("\r\n\r\n")
        .or_else(|| text.split_once("\n\n"))
        .unwrap_or((text, ""));
    let headers = head
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    (headers, rest)
}

fn boundary_of(content_type: &str) -> Option<String> {
    content_type
        .split(';')
        .find_map(|p| p.trim().strip_prefix("boundary="))
        .map(|b| b.trim_matches('"').to_owned())
}

/// The writes of a `$batch` body's change set, each with its Content-ID.
fn batch_writes(content_type: &str, body: &str) -> Result<Vec<(String, Write)>, String> {
    let boundary = boundary_of(content_type).ok_or("no batch boundary")?;
    let mut writes = Vec::new();
    for part in multipart_parts(body, &boundary) {
        let (headers, rest) = head_and_rest(part);
        let ct = headers.get("content-type").cloned().unwrap_or_default();
        let Some(changeset) = boundary_of(&ct) else {
            return Err(format!("a batch part outside a change set: {ct}"));
        };
        for request in multipart_parts(rest, &changeset) {
            let (part_headers, http) = head_and_rest(request);
            let id = part_headers
                .get("content-id")
                .cloned()
                .ok_or("a change set request without Content-ID")?;
            let (line_and_headers, body) = head_and_rest_http(http);
            let mut lines = line_and_headers.lines();
            let line = lines.next().unwrap_or_default();
            let mut words = line.split(' ');
            let method = words.next().unwrap_or_default().to_owned();
            let url = words.next().unwrap_or_default().to_owned();
            let headers: BTreeMap<String, String> = lines
                .filter_map(|l| l.split_once(':'))
                .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
                .collect();
            writes.push((
                id,
                Write {
                    method,
                    url,
                    if_none_match: headers.get("if-none-match").is_some_and(|v| v == "*"),
                    if_match: headers.get("if-match").is_some_and(|v| v == "*"),
                    body: body.trim_end_matches(['\r', '\n']).to_owned(),
                },
            ));
        }
    }
    Ok(writes)
}

/// An embedded HTTP request: its request line with headers, and its body.
fn head_and_rest_http(text: &str) -> (&str, &str) {
    text.split_once("\r\n\r\n")
        .or_else(|| text.split_once("\n\n"))
        .unwrap_or((text, ""))
}

fn status_line(status: StatusCode) -> String {
    format!(
        "HTTP/1.1 {} {}",
        status.as_u16(),
        status.canonical_reason().unwrap_or("")
    )
}

/// The `$batch` answer: every write's 204 in a change set response, or the failing write's
/// error alone.
fn batch_answer(outcome: Result<Vec<String>, (String, Refusal)>) -> Response {
    let batch = format!("batchresponse_{}", uuid::Uuid::new_v4());
    let mut out = String::new();
    match outcome {
        Ok(ids) => {
            let changeset = format!("changesetresponse_{}", uuid::Uuid::new_v4());
            out.push_str(&format!(
                "--{batch}\r\nContent-Type: multipart/mixed; boundary={changeset}\r\n\r\n"
            ));
            for id in ids {
                out.push_str(&format!(
                    "--{changeset}\r\nContent-Type: application/http\r\nContent-Transfer-Encoding: binary\r\nContent-ID: {id}\r\n\r\n{}\r\nOData-Version: 4.0\r\n\r\n\r\n",
                    status_line(StatusCode::NO_CONTENT)
                ));
            }
            out.push_str(&format!("--{changeset}--\r\n"));
        }
        Err((id, (status, error))) => {
            out.push_str(&format!(
                "--{batch}\r\nContent-Type: application/http\r\nContent-Transfer-Encoding: binary\r\nContent-ID: {id}\r\n\r\n{}\r\nContent-Type: application/json; odata.metadata=minimal\r\nOData-Version: 4.0\r\n\r\n{error}\r\n",
                status_line(status)
            ));
        }
    }
    out.push_str(&format!("--{batch}--\r\n"));
    (
        StatusCode::OK,
        [
            (
                axum::http::header::CONTENT_TYPE,
                format!("multipart/mixed; boundary={batch}"),
            ),
            (
                axum::http::HeaderName::from_static("odata-version"),
                "4.0".to_owned(),
            ),
        ],
        out,
    )
        .into_response()
}

async fn dataverse_receive(
    State(state): State<Arc<Mutex<DataverseState>>>,
    req: axum::extract::Request,
) -> Response {
    let (parts, body) = req.into_parts();
    let body = axum::body::to_bytes(body, 8 << 20)
        .await
        .unwrap_or_default();
    let body = String::from_utf8_lossy(&body).into_owned();
    let header = |n: &str| {
        parts
            .headers
            .get(n)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    let mut s = state.lock().expect("lock");
    s.requests.push(DataverseRequest {
        method: parts.method.to_string(),
        uri: parts.uri.to_string(),
        authorization: header("authorization"),
        body: body.clone(),
    });
    if parts.uri.path() == DATAVERSE_TOKEN_PATH {
        let n = s
            .requests
            .iter()
            .filter(|r| r.uri == DATAVERSE_TOKEN_PATH)
            .count();
        return axum::Json(json!({
            "token_type": "Bearer", "expires_in": 3599, "access_token": format!("token-{n}"),
        }))
        .into_response();
    }
    if let Some((status, body)) = s.refuse_with {
        return (status, body).into_response();
    }
    if s.throttled_until.is_some_and(|t| Instant::now() < t) {
        s.throttled += 1;
        let body = dataverse_error(
            "0x80072322",
            "Number of requests exceeded the limit of 6000 over time window of 300 seconds.",
        );
        return (
            StatusCode::TOO_MANY_REQUESTS,
            [(
                axum::http::header::RETRY_AFTER,
                s.retry_after_secs.to_string(),
            )],
            body.to_string(),
        )
            .into_response();
    }
    let lose = s.lose_answers;
    if parts.uri.path().ends_with("/$batch") {
        let writes = match batch_writes(&header("content-type"), &body) {
            Ok(w) => w,
            Err(e) => {
                return (
                    StatusCode::BAD_REQUEST,
                    dataverse_error("0x80060888", &e).to_string(),
                )
                    .into_response()
            }
        };
        let mut tables = s.tables.clone();
        let mut applied = Vec::new();
        let mut outcome = Ok(Vec::new());
        for (id, w) in &writes {
            match s.run(&mut tables, w) {
                Ok(a) => {
                    applied.push(a);
                    if let Ok(ids) = &mut outcome {
                        ids.push(id.clone());
                    }
                }
                Err(refusal) => {
                    outcome = Err((id.clone(), refusal));
                    break;
                }
            }
        }
        if outcome.is_ok() {
            s.tables = tables;
            s.applied.extend(applied);
            if lose {
                return StatusCode::SERVICE_UNAVAILABLE.into_response();
            }
        }
        return batch_answer(outcome);
    }
    let write = Write {
        method: parts.method.to_string(),
        url: parts.uri.to_string(),
        if_none_match: header("if-none-match") == "*",
        if_match: header("if-match") == "*",
        body,
    };
    let mut tables = std::mem::take(&mut s.tables);
    let result = s.run(&mut tables, &write);
    s.tables = tables;
    match result {
        Ok(a) => {
            s.applied.push(a);
            if lose {
                return StatusCode::SERVICE_UNAVAILABLE.into_response();
            }
            StatusCode::NO_CONTENT.into_response()
        }
        Err((status, error)) => (status, error.to_string()).into_response(),
    }
}

/// A stand-in for a Dataverse environment that keeps what it is sent (see the module doc).
pub struct FakeDataverse {
    addr: SocketAddr,
    state: Arc<Mutex<DataverseState>>,
}

impl FakeDataverse {
    /// Starts it.
    pub async fn start() -> Self {
        let state = Arc::new(Mutex::new(DataverseState::default()));
        let app = axum::Router::new()
            .fallback(dataverse_receive)
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move { axum::serve(listener, app).await.expect("fake dataverse") });
        Self { addr, state }
    }

    /// Its base URL (the environment's `url`).
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Answers every Web API request with `status` and `body` (`None`: normal again).
    pub fn refuse_with(&self, refusal: Option<(StatusCode, &'static str)>) {
        self.state.lock().expect("lock").refuse_with = refusal;
    }

    /// Answers every Web API request 429 with `Retry-After: retry_after_secs` for `span`.
    pub fn throttle_for(&self, span: Duration, retry_after_secs: u64) {
        let mut s = self.state.lock().expect("lock");
        s.throttled_until = Some(Instant::now() + span);
        s.retry_after_secs = retry_after_secs;
    }

    /// How many requests were answered 429.
    pub fn throttled(&self) -> usize {
        self.state.lock().expect("lock").throttled
    }

    /// Applies writes and then answers 503, as if each answer were lost on the way.
    pub fn lose_answers(&self, lose: bool) {
        self.state.lock().expect("lock").lose_answers = lose;
    }

    /// Refuses a write whose `@odata.bind` names a record it does not hold.
    pub fn check_binds(&self, check: bool) {
        self.state.lock().expect("lock").check_binds = check;
    }

    /// Every request so far.
    pub fn requests(&self) -> Vec<DataverseRequest> {
        self.state.lock().expect("lock").requests.clone()
    }

    /// The Web API single writes so far (not `$batch`).
    pub fn patches(&self) -> Vec<DataverseRequest> {
        self.requests()
            .into_iter()
            .filter(|r| r.method == "PATCH")
            .collect()
    }

    /// Every write applied, in order.
    pub fn applied(&self) -> Vec<Applied> {
        self.state.lock().expect("lock").applied.clone()
    }

    /// The records held: entity set -> key -> columns.
    pub fn tables(&self) -> BTreeMap<String, BTreeMap<String, Map<String, Value>>> {
        self.state.lock().expect("lock").tables.clone()
    }
}
