//! The Dataverse sink against a recording fake of Dataverse and of the token endpoint
//! (axum, in-process, real HTTP), and its token request against Microsoft's own `msal`.
//!
//! No Dataverse emulator exists: each assertion on a request quotes the example of
//! Microsoft's Dataverse Web API documentation it follows.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use chrono::{TimeZone, Utc};
use iotgw_config::{DataverseDeviceBinding, DataverseSinkConfig, Secret};
use iotgw_registry::{Alert, AlertType, DeviceId, OutboxItem};
use serde_json::{json, Value};
use uuid::Uuid;

use super::*;

// ---------------------------------------------------------------------------------------
// Pure parts
// ---------------------------------------------------------------------------------------

#[test]
fn string_keys_double_single_quotes_and_percent_encode_what_would_end_the_path() {
    // Docs (Use an alternate key to reference a record): "With single alternate key:
    // /accounts(accountnumber='ABC123')". OData string literals escape ' as ''.
    assert_eq!(
        string_key("msdyn_deviceid", "pump-1"),
        "msdyn_deviceid='pump-1'"
    );
    assert_eq!(
        string_key("msdyn_deviceid", "O'Brien's pump"),
        "msdyn_deviceid='O''Brien''s%20pump'"
    );
    assert_eq!(
        string_key("msdyn_deviceid", "a/b?c#d%e&f"),
        "msdyn_deviceid='a%2Fb%3Fc%23d%25e%26f'"
    );
    assert_eq!(
        string_key("msdyn_deviceid", "plant:pump_1-a"),
        "msdyn_deviceid='plant:pump_1-a'"
    );
}

#[test]
fn tokens_are_replaced_five_minutes_or_a_tenth_of_their_lifetime_before_expiry() {
    assert_eq!(
        refresh_margin(Duration::from_secs(3599)),
        Duration::from_secs(300)
    );
    assert_eq!(
        refresh_margin(Duration::from_secs(60)),
        Duration::from_secs(6)
    );
    assert_eq!(refresh_margin(Duration::ZERO), Duration::ZERO);
}

#[test]
fn dataverse_errors_name_their_code_and_message() {
    assert_eq!(
        dataverse_error(
            r#"{"error":{"code":"0x80040217","message":"msdyn_iotdevice With Id = 1 Does Not Exist"}}"#
        ),
        "Dataverse error 0x80040217: msdyn_iotdevice With Id = 1 Does Not Exist"
    );
    // Docs (Prevent update in upsert) show an empty code: {"error":{"code":"","message":...}}
    assert_eq!(
        dataverse_error(
            r#"{"error":{"code":"","message":"A record with matching key values already exists."}}"#
        ),
        "Dataverse error (no code): A record with matching key values already exists."
    );
    assert_eq!(dataverse_error(""), "(empty body)");
    assert_eq!(dataverse_error("<html>bad gateway"), "<html>bad gateway");
}

fn alert(parent: Option<Uuid>) -> Alert {
    let t = Utc
        .with_ymd_and_hms(2024, 5, 1, 12, 0, 0)
        .single()
        .expect("a time");
    Alert {
        id: Uuid::parse_str("0190a6f2-0000-7000-8000-000000000001").expect("uuid"),
        description: "Temperature 97 on pump-1".into(),
        alert_data: r#"{"temperature":97}"#.into(),
        alert_time: t,
        alert_token: "plant/pump-1/evt-1".into(),
        alert_type: AlertType::PreventiveMaintenance,
        priority_score: Some(80),
        device: Uuid::parse_str("0190a6f2-0000-7000-8000-0000000000d1").expect("uuid"),
        device_id: DeviceId::parse("pump-1").expect("device id"),
        parent_alert: parent,
        parent_alert_token: parent.map(|_| "plant/pump-1/evt-0".into()),
        last_command_sent: None,
        last_command_sent_time: None,
        case: None,
        work_order: None,
        statecode: 0,
        statuscode: 1,
        rule: "high_temperature".into(),
        provider_instance: "plant".into(),
        created_at: t,
    }
}

fn item(a: &Alert) -> OutboxItem {
    OutboxItem {
        id: 1,
        sink: "d365".into(),
        payload: serde_json::to_value(a).expect("alert JSON"),
        idempotency_key: a.id.to_string(),
        attempts: 0,
        last_error: None,
        created_at: a.created_at,
        lease_token: 1,
        change_of: Some(format!("msdyn_iotalert:{}", a.id)),
    }
}

#[test]
fn the_record_has_field_service_logical_names_option_values_and_bound_lookups() {
    let parent = Uuid::parse_str("0190a6f2-0000-7000-8000-0000000000aa").expect("uuid");
    let body = record(&alert(Some(parent)), DataverseDeviceBinding::Id);
    // Docs (Associate table rows on create): "primarycontactid@odata.bind":
    // "/contacts(00000000-0000-0000-0000-000000000001)" -- a single-valued navigation
    // property (here msdyn_Device, msdyn_ParentAlert: the msdyn_iotalert entity reference)
    // bound to an entity-set path with the key in parentheses.
    assert_eq!(
        body,
        json!({
            "msdyn_description": "Temperature 97 on pump-1",
            "msdyn_alertdata": "{\"temperature\":97}",
            "msdyn_alerttime": "2024-05-01T12:00:00Z",
            "msdyn_alerttoken": "plant/pump-1/evt-1",
            "msdyn_alerttype": 192_350_002,
            "msdyn_alertpriorityscore": 80,
            "msdyn_deviceid": "pump-1",
            "msdyn_Device@odata.bind": "/msdyn_iotdevices(0190a6f2-0000-7000-8000-0000000000d1)",
            "msdyn_ParentAlert@odata.bind": "/msdyn_iotalerts(0190a6f2-0000-7000-8000-0000000000aa)",
            "msdyn_parentalerttoken": "plant/pump-1/evt-0",
        })
    );
    let none = record(&alert(None), DataverseDeviceBinding::None);
    assert!(none.get("msdyn_Device@odata.bind").is_none(), "{none}");
    assert!(none.get("msdyn_ParentAlert@odata.bind").is_none(), "{none}");
    let mut closed = alert(None);
    closed.statecode = 2;
    closed.statuscode = 5;
    let body = record(&closed, DataverseDeviceBinding::Id);
    assert_eq!(
        (&body["statecode"], &body["statuscode"]),
        (&json!(2), &json!(5))
    );
}

// ---------------------------------------------------------------------------------------
// The recording fake: a token endpoint and Dataverse's Web API on one listener
// ---------------------------------------------------------------------------------------

/// One request the fake received.
#[derive(Clone, Debug)]
struct Seen {
    method: String,
    uri: String,
    headers: BTreeMap<String, String>,
    body: String,
}

impl Seen {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }

    fn form(&self) -> BTreeMap<String, String> {
        reqwest::Url::parse(&format!("http://x/?{}", self.body))
            .expect("a form body")
            .query_pairs()
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect()
    }
}

/// A scripted answer of the Web API.
struct Reply {
    status: u16,
    headers: Vec<(&'static str, &'static str)>,
    body: String,
}

#[derive(Default)]
struct FakeState {
    base: String,
    seen: Vec<Seen>,
    replies: VecDeque<Reply>,
    issued: u32,
    valid: HashSet<String>,
    expires_in: u64,
    token_refusal: Option<(u16, &'static str)>,
    /// The next `$batch` fails on this (Content-ID, status, error body).
    batch_failure: Option<(u32, u16, String)>,
}

struct Fake {
    base: String,
    state: Arc<Mutex<FakeState>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Fake {
    fn drop(&mut self) {
        self.task.abort();
    }
}

const TENANT: &str = "72f988bf-0000-4000-8000-000000000000";
const TOKEN_PATH: &str = "/72f988bf-0000-4000-8000-000000000000/oauth2/v2.0/token";

async fn record_and_answer(State(state): State<Arc<Mutex<FakeState>>>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let bytes = axum::body::to_bytes(body, 1 << 20)
        .await
        .unwrap_or_default();
    let seen = Seen {
        method: parts.method.to_string(),
        uri: parts.uri.to_string(),
        headers: parts
            .headers
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().to_owned(),
                    v.to_str().unwrap_or_default().to_owned(),
                )
            })
            .collect(),
        body: String::from_utf8_lossy(&bytes).into_owned(),
    };
    let mut s = state.lock().expect("fake state");
    s.seen.push(seen.clone());
    let path = parts.uri.path();
    if path == format!("/{TENANT}/v2.0/.well-known/openid-configuration") {
        // What msal fetches for an authority when instance discovery is off.
        let base = s.base.clone();
        return axum::Json(json!({
            "token_endpoint": format!("{base}{TOKEN_PATH}"),
            "authorization_endpoint": format!("{base}/{TENANT}/oauth2/v2.0/authorize"),
            "device_authorization_endpoint": format!("{base}/{TENANT}/oauth2/v2.0/devicecode"),
            "issuer": format!("{base}/{TENANT}/v2.0"),
        }))
        .into_response();
    }
    if path == TOKEN_PATH {
        if let Some((status, body)) = s.token_refusal {
            return (
                axum::http::StatusCode::from_u16(status).expect("status"),
                [("content-type", "application/json")],
                body,
            )
                .into_response();
        }
        s.issued += 1;
        let token = format!("token-{}", s.issued);
        s.valid.insert(token.clone());
        return axum::Json(json!({
            "token_type": "Bearer",
            "expires_in": s.expires_in,
            "ext_expires_in": s.expires_in,
            "access_token": token,
        }))
        .into_response();
    }
    if path.starts_with("/api/data/v9.2/") {
        let bearer = seen
            .header("authorization")
            .and_then(|a| a.strip_prefix("Bearer "))
            .unwrap_or_default();
        if !s.valid.contains(bearer) {
            // What Dataverse answers for an expired token: 401 and a WWW-Authenticate
            // challenge, no body.
            return (
                axum::http::StatusCode::UNAUTHORIZED,
                [(
                    "www-authenticate",
                    "Bearer error=invalid_token, error_description=\"Error during token validation!\"",
                )],
            )
                .into_response();
        }
        let reply = s.replies.pop_front();
        if parts.method == axum::http::Method::POST && path.ends_with("/$batch") && reply.is_none()
        {
            let failure = s.batch_failure.take();
            return batch_answer(&seen.body, failure);
        }
        let reply = reply.unwrap_or(Reply {
            status: 204,
            headers: vec![
                ("odata-version", "4.0"),
                (BURST_REMAINING_HEADER, "5999"),
                (TIME_REMAINING_HEADER, "1199000"),
            ],
            body: String::new(),
        });
        let mut resp = (
            axum::http::StatusCode::from_u16(reply.status).expect("status"),
            reply.body,
        )
            .into_response();
        for (k, v) in reply.headers {
            resp.headers_mut().insert(
                axum::http::HeaderName::from_static(k),
                axum::http::HeaderValue::from_static(v),
            );
        }
        return resp;
    }
    axum::http::StatusCode::NOT_FOUND.into_response()
}

/// What the fake answers to a `$batch` of one change set: every part `204 No Content`, shaped
/// like the documented answer (Docs, "Change sets", **Response**: `HTTP/1.1 200 OK`, a
/// `--batchresponse_<id>` part holding `Content-Type: multipart/mixed;
/// boundary=changesetresponse_<id>`, one `Content-ID` part each); or, with `failure` =
/// (Content-ID, status, body), the failing request's answer alone, shaped like the
/// documented error (Docs, "Handling errors", **Response**: the batch's status is the
/// failing request's, one `--batchresponse_<id>` part with its `HTTP/1.1 400 Bad Request`
/// and JSON error), carrying the failing request's `Content-ID`. The multipart answer's
/// `Content-Type: multipart/mixed; boundary=batchresponse_<id>` names its boundary (the
/// documentation's examples leave that header out).
fn batch_answer(request: &str, failure: Option<(u32, u16, String)>) -> Response {
    let ids: Vec<&str> = request
        .lines()
        .filter_map(|l| l.strip_prefix("Content-ID: "))
        .map(str::trim)
        .collect();
    let batch = format!("batchresponse_{}", Uuid::new_v4());
    let (status, body) = match failure {
        None => {
            let cs = format!("changesetresponse_{}", Uuid::new_v4());
            let mut body =
                format!("--{batch}\r\nContent-Type: multipart/mixed; boundary={cs}\r\n\r\n");
            for id in ids {
                body.push_str(&format!(
                    "--{cs}\r\nContent-Type: application/http\r\nContent-Transfer-Encoding: binary\r\nContent-ID: {id}\r\n\r\nHTTP/1.1 204 No Content\r\nOData-Version: 4.0\r\n\r\n\r\n"
                ));
            }
            body.push_str(&format!("--{cs}--\r\n--{batch}--\r\n"));
            (200, body)
        }
        Some((id, code, error)) => {
            let reason = axum::http::StatusCode::from_u16(code)
                .ok()
                .and_then(|s| s.canonical_reason())
                .unwrap_or("Error");
            (
                code,
                format!(
                    "--{batch}\r\nContent-Type: application/http\r\nContent-Transfer-Encoding: binary\r\nContent-ID: {id}\r\n\r\nHTTP/1.1 {code} {reason}\r\nREQ_ID: 5ecd1cb3-1730-4ffc-909c-d44c22270026\r\nContent-Type: application/json; odata.metadata=minimal\r\nOData-Version: 4.0\r\n\r\n{error}\r\n--{batch}--\r\n"
                ),
            )
        }
    };
    let mut resp = (
        axum::http::StatusCode::from_u16(status).expect("status"),
        body,
    )
        .into_response();
    resp.headers_mut().insert(
        axum::http::header::CONTENT_TYPE,
        axum::http::HeaderValue::from_str(&format!("multipart/mixed; boundary={batch}"))
            .expect("header"),
    );
    resp.headers_mut().insert(
        axum::http::HeaderName::from_static("odata-version"),
        axum::http::HeaderValue::from_static("4.0"),
    );
    resp
}

/// A TLS listener for axum (the fake token endpoint msal must reach over HTTPS).
struct TlsListener {
    tcp: tokio::net::TcpListener,
    tls: tokio_rustls::TlsAcceptor,
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let Ok((tcp, addr)) = self.tcp.accept().await else {
                continue;
            };
            if let Ok(stream) = self.tls.accept(tcp).await {
                return (stream, addr);
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.tcp.local_addr()
    }
}

impl Fake {
    /// The fake on loopback: plain HTTP, or HTTPS with a certificate of `pki`.
    async fn start(pki: Option<&iotgw_testkit::pki::Pki>) -> Self {
        let state = Arc::new(Mutex::new(FakeState {
            expires_in: 3599,
            ..FakeState::default()
        }));
        let app = axum::Router::new()
            .fallback(record_and_answer)
            .with_state(state.clone());
        let tcp = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the fake");
        let port = tcp.local_addr().expect("addr").port();
        let (base, task) = match pki {
            None => (
                format!("http://127.0.0.1:{port}"),
                tokio::spawn(async move {
                    let _ = axum::serve(tcp, app).await;
                }),
            ),
            Some(pki) => {
                use tokio_rustls::rustls;
                use tokio_rustls::rustls::pki_types::pem::PemObject;
                let (cert, key) = pki
                    .issue("fake-login", &["127.0.0.1", "localhost"])
                    .expect("a server certificate");
                let certs = rustls::pki_types::CertificateDer::pem_slice_iter(cert.as_bytes())
                    .collect::<Result<Vec<_>, _>>()
                    .expect("certificate PEM");
                let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(key.as_bytes())
                    .expect("key PEM");
                let config = rustls::ServerConfig::builder_with_provider(Arc::new(
                    rustls::crypto::ring::default_provider(),
                ))
                .with_safe_default_protocol_versions()
                .expect("TLS versions")
                .with_no_client_auth()
                .with_single_cert(certs, key)
                .expect("server TLS");
                let listener = TlsListener {
                    tcp,
                    tls: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
                };
                (
                    format!("https://127.0.0.1:{port}"),
                    tokio::spawn(async move {
                        let _ = axum::serve(listener, app).await;
                    }),
                )
            }
        };
        state.lock().expect("fake state").base = base.clone();
        Self { base, state, task }
    }

    fn config(&self, binding: DataverseDeviceBinding) -> DataverseSinkConfig {
        DataverseSinkConfig {
            url: self.base.clone(),
            tenant_id: TENANT.into(),
            client_id: "11111111-2222-3333-4444-555555555555".into(),
            client_secret: Some(Secret::new("s3cr3t~value+with/odd=chars")),
            client_certificate: None,
            client_certificate_key: None,
            token_url: Some(format!("{}{TOKEN_PATH}", self.base)),
            scope: Some("https://contoso.crm.dynamics.com/.default".into()),
            device_binding: binding,
            timeout_ms: 5_000,
            backoff_min_ms: 200,
            backoff_max_ms: 30_000,
            entities: None,
            coalesce_connection_ms: iotgw_config::default_coalesce_connection(),
            batch_size: iotgw_config::default_dataverse_batch_size(),
            provider_instances: BTreeMap::new(),
        }
    }

    /// The sink of `config(binding)` changed by `change`.
    fn sink_with(
        &self,
        binding: DataverseDeviceBinding,
        change: impl FnOnce(&mut DataverseSinkConfig),
    ) -> DataverseSink {
        let mut cfg = self.config(binding);
        change(&mut cfg);
        DataverseSink::new("d365", &cfg).expect("sink")
    }

    /// The next `$batch` is answered with a failure of the part with Content-ID `id`.
    fn fail_batch_part(&self, id: u32, status: u16, body: &str) {
        self.state.lock().expect("fake state").batch_failure = Some((id, status, body.into()));
    }

    /// The `$batch` requests received.
    fn batches(&self) -> Vec<Seen> {
        self.seen()
            .into_iter()
            .filter(|s| s.method == "POST" && s.uri.ends_with("/$batch"))
            .collect()
    }

    fn sink(&self, binding: DataverseDeviceBinding) -> DataverseSink {
        DataverseSink::new("d365", &self.config(binding)).expect("sink")
    }

    fn reply(
        &self,
        status: u16,
        headers: Vec<(&'static str, &'static str)>,
        body: impl Into<String>,
    ) {
        self.state
            .lock()
            .expect("fake state")
            .replies
            .push_back(Reply {
                status,
                headers,
                body: body.into(),
            });
    }

    fn seen(&self) -> Vec<Seen> {
        self.state.lock().expect("fake state").seen.clone()
    }

    fn patches(&self) -> Vec<Seen> {
        self.seen()
            .into_iter()
            .filter(|s| s.method == "PATCH")
            .collect()
    }

    fn token_requests(&self) -> Vec<Seen> {
        self.seen()
            .into_iter()
            .filter(|s| s.method == "POST" && s.uri == TOKEN_PATH)
            .collect()
    }

    /// Every token issued so far expires (Dataverse answers 401 to it).
    fn expire_tokens(&self) {
        self.state.lock().expect("fake state").valid.clear();
    }
}

// ---------------------------------------------------------------------------------------
// The sink against the fake
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn a_new_alert_is_one_create_only_patch_by_its_id_with_the_documented_headers_and_binds() {
    let fake = Fake::start(None).await;
    let sink = fake.sink(DataverseDeviceBinding::Id);
    let parent = Uuid::parse_str("0190a6f2-0000-7000-8000-0000000000aa").expect("uuid");
    let a = alert(Some(parent));
    sink.deliver(&item(&a)).await.expect("delivered on 204");

    let tokens = fake.token_requests();
    assert_eq!(tokens.len(), 1, "{tokens:?}");
    // Microsoft identity platform, client credentials with a shared secret:
    //   POST /{tenant}/oauth2/v2.0/token
    //   Content-Type: application/x-www-form-urlencoded
    //   client_id=...&scope=https%3A%2F%2Fgraph.microsoft.com%2F.default
    //   &client_secret=...&grant_type=client_credentials
    // (the same request msal sends: the_token_request_matches_what_msal_sends below).
    assert_eq!(
        tokens[0].header("content-type"),
        Some("application/x-www-form-urlencoded")
    );
    assert_eq!(
        tokens[0].form(),
        BTreeMap::from([
            ("grant_type".into(), "client_credentials".into()),
            (
                "client_id".into(),
                "11111111-2222-3333-4444-555555555555".into()
            ),
            ("client_secret".into(), "s3cr3t~value+with/odd=chars".into()),
            (
                "scope".into(),
                "https://contoso.crm.dynamics.com/.default".into()
            ),
        ])
    );

    let patches = fake.patches();
    assert_eq!(patches.len(), 1, "{patches:?}");
    let p = &patches[0];
    // Docs (Update and delete table rows, "Upsert a table row"): "An upsert operation is
    // exactly like an update. It uses a PATCH request and uses a URI to reference a
    // specific entity ... if you need to create a record with a specific id value, an
    // upsert operation provides a way to do this." The msdyn_iotalert reference lists
    // "Upsert: PATCH /msdyn_iotalerts(msdyn_iotalertid)".
    assert_eq!(
        p.uri,
        "/api/data/v9.2/msdyn_iotalerts(0190a6f2-0000-7000-8000-000000000001)"
    );
    // Docs (Perform conditional operations, "Prevent update in upsert"):
    //   PATCH [Organization URI]/api/data/v9.0/accounts(00000000-0000-0000-0000-000000000001)
    //   Content-Type: application/json
    //   OData-MaxVersion: 4.0
    //   OData-Version: 4.0
    //   If-None-Match: *
    // and (Update with data returned): "Accept: application/json",
    // "Content-Type: application/json; charset=utf-8".
    assert_eq!(p.header("authorization"), Some("Bearer token-1"));
    assert_eq!(p.header("odata-maxversion"), Some("4.0"));
    assert_eq!(p.header("odata-version"), Some("4.0"));
    assert_eq!(p.header("accept"), Some("application/json"));
    assert_eq!(
        p.header("content-type"),
        Some("application/json; charset=utf-8")
    );
    assert_eq!(p.header("if-none-match"), Some("*"));
    assert_eq!(p.header("if-match"), None);
    // Docs (Associate table rows on create):
    //   "primarycontactid@odata.bind": "/contacts(00000000-0000-0000-0000-000000000001)"
    let body: Value = serde_json::from_str(&p.body).expect("a JSON body");
    assert_eq!(body, record(&a, DataverseDeviceBinding::Id));
    assert_eq!(
        body["msdyn_Device@odata.bind"],
        "/msdyn_iotdevices(0190a6f2-0000-7000-8000-0000000000d1)"
    );
    assert_eq!(
        body["msdyn_ParentAlert@odata.bind"],
        "/msdyn_iotalerts(0190a6f2-0000-7000-8000-0000000000aa)"
    );

    // The token is cached: a second alert costs no token request.
    sink.deliver(&item(&alert(None)))
        .await
        .expect("second delivered");
    assert_eq!(fake.token_requests().len(), 1);
    assert_eq!(fake.patches().len(), 2);
}

#[tokio::test]
async fn the_device_id_binding_uses_the_alternate_key_syntax_with_quotes_doubled() {
    let fake = Fake::start(None).await;
    let sink = fake.sink(DataverseDeviceBinding::DeviceId);
    let mut a = alert(None);
    a.device_id = DeviceId::parse("plant:pump_1").expect("device id");
    sink.deliver(&item(&a)).await.expect("delivered");
    let body: Value = serde_json::from_str(&fake.patches()[0].body).expect("JSON");
    // Docs (Use an alternate key to reference a record): "With single alternate key:
    // /accounts(accountnumber='ABC123')". (Quotes doubled, and what would end the path
    // percent-encoded: string_keys_double_single_quotes_and_percent_encode_... above;
    // canonical device ids hold neither.)
    assert_eq!(
        body["msdyn_Device@odata.bind"],
        "/msdyn_iotdevices(msdyn_deviceid='plant:pump_1')"
    );
    assert_eq!(body["msdyn_deviceid"], "plant:pump_1");
}

#[tokio::test]
async fn a_redelivered_alert_answered_412_counts_as_delivered() {
    let fake = Fake::start(None).await;
    let sink = fake.sink(DataverseDeviceBinding::Id);
    // Docs (Prevent update in upsert): "When the entity is found, you'll get the
    // following response with status 412 Precondition Failed ... {"error":{"code":"",
    // "message":"A record with matching key values already exists."}}"
    fake.reply(
        412,
        vec![("content-type", "application/json; odata.metadata=minimal")],
        r#"{"error":{"code":"","message":"A record with matching key values already exists."}}"#,
    );
    sink.deliver(&item(&alert(None)))
        .await
        .expect("412 on If-None-Match: * is an earlier attempt's record");
    assert_eq!(fake.patches().len(), 1);
}

#[tokio::test]
async fn a_429_waits_its_retry_after_and_holds_back_every_item_until_then() {
    let fake = Fake::start(None).await;
    let sink = fake.sink(DataverseDeviceBinding::Id);
    // Docs (Service protection API limits): "With the Web API, Dataverse returns a 429 Too
    // Many Requests error" ... "Try to use the Retry-After header value if it is returned";
    // x-ms-ratelimit-burst-remaining-xrm-requests / -time-remaining-: "intended for
    // debugging purposes".
    fake.reply(
        429,
        vec![
            ("retry-after", "1"),
            (BURST_REMAINING_HEADER, "0"),
            (TIME_REMAINING_HEADER, "1199000"),
        ],
        r#"{"error":{"code":"0x80072322","message":"Number of requests exceeded the limit of 6000 over time window of 300 seconds."}}"#,
    );
    let err = sink
        .deliver(&item(&alert(None)))
        .await
        .expect_err("throttled");
    let DeliveryError::Retry { message, after } = err else {
        panic!("{err:?}")
    };
    assert!(
        after.is_some_and(|a| a > Duration::from_millis(900) && a <= Duration::from_secs(1)),
        "due again when the Retry-After ends: {after:?}"
    );
    assert!(
        message.contains("0x80072322") && message.contains("burst remaining 0"),
        "{message}"
    );

    // Until Retry-After has passed nothing is sent, whatever the item.
    let err = sink
        .deliver(&item(&alert(None)))
        .await
        .expect_err("held back");
    assert!(
        matches!(&err, DeliveryError::Retry { after: Some(a), .. } if *a <= Duration::from_secs(1)),
        "{err:?}"
    );
    assert_eq!(fake.patches().len(), 1, "no request while throttled");

    tokio::time::sleep(Duration::from_secs(1)).await;
    sink.deliver(&item(&alert(None)))
        .await
        .expect("sent once Retry-After passed");
    assert_eq!(fake.patches().len(), 2);
}

#[tokio::test]
async fn an_expired_token_is_replaced_once_and_the_write_goes_through() {
    let fake = Fake::start(None).await;
    let sink = fake.sink(DataverseDeviceBinding::Id);
    sink.deliver(&item(&alert(None))).await.expect("first");
    fake.expire_tokens();
    sink.deliver(&item(&alert(None)))
        .await
        .expect("delivered with a fresh token after the 401");
    let patches = fake.patches();
    let auth: Vec<_> = patches
        .iter()
        .map(|p| p.header("authorization").unwrap_or_default())
        .collect();
    assert_eq!(
        auth,
        ["Bearer token-1", "Bearer token-1", "Bearer token-2"],
        "401 drops the cached token and the PATCH is sent once more"
    );
    assert_eq!(patches[1].body, patches[2].body);
    assert_eq!(fake.token_requests().len(), 2);

    // A 401 to a fresh token too (no application user): retried, not dead-lettered, and
    // not a loop of token requests.
    fake.reply(401, vec![], "");
    fake.expire_tokens();
    let err = sink
        .deliver(&item(&alert(None)))
        .await
        .expect_err("refused twice");
    assert!(
        matches!(&err, DeliveryError::Retry { message, .. } if message.contains("application user")),
        "{err:?}"
    );
    assert_eq!(fake.token_requests().len(), 3);
}

#[tokio::test]
async fn a_token_that_nears_its_expiry_is_fetched_anew_before_use() {
    let fake = Fake::start(None).await;
    fake.state.lock().expect("fake state").expires_in = 1;
    let sink = fake.sink(DataverseDeviceBinding::Id);
    sink.deliver(&item(&alert(None))).await.expect("first");
    // A 1 s token is replaced after 0.9 s (a tenth of its lifetime before expiry).
    tokio::time::sleep(Duration::from_millis(950)).await;
    sink.deliver(&item(&alert(None))).await.expect("second");
    assert_eq!(fake.token_requests().len(), 2);
    let auth: Vec<_> = fake
        .patches()
        .iter()
        .map(|p| p.header("authorization").unwrap_or_default().to_owned())
        .collect();
    assert_eq!(auth, ["Bearer token-1", "Bearer token-2"]);
}

#[tokio::test]
async fn a_400_dead_letters_with_dataverse_error_code_and_message() {
    let fake = Fake::start(None).await;
    let sink = fake.sink(DataverseDeviceBinding::Id);
    fake.reply(
        400,
        vec![("content-type", "application/json; odata.metadata=minimal")],
        r#"{"error":{"code":"0x80040217","message":"msdyn_iotdevice With Id = 0190a6f2-0000-7000-8000-0000000000d1 Does Not Exist"}}"#,
    );
    let err = sink
        .deliver(&item(&alert(None)))
        .await
        .expect_err("refused");
    let DeliveryError::Permanent(reason) = err else {
        panic!("{err:?}")
    };
    assert!(
        reason.contains("answered 400 Bad Request: Dataverse error 0x80040217: msdyn_iotdevice With Id = 0190a6f2-0000-7000-8000-0000000000d1 Does Not Exist"),
        "{reason}"
    );
    assert!(reason.contains("/msdyn_iotalerts(0190a6f2-0000-7000-8000-000000000001)"));
}

#[tokio::test]
async fn a_503_and_a_refusing_token_endpoint_are_retried_never_dead_lettered() {
    let fake = Fake::start(None).await;
    let sink = fake.sink(DataverseDeviceBinding::Id);
    fake.reply(503, vec![("retry-after", "7")], "");
    let err = sink.deliver(&item(&alert(None))).await.expect_err("503");
    assert!(
        matches!(&err, DeliveryError::Retry { after: Some(a), .. } if *a > Duration::from_millis(6900) && *a <= Duration::from_secs(7)),
        "{err:?}"
    );
    // A round that failed as a whole pauses the sink until its Retry-After ends: every
    // item waits, due again at that moment, so they go out again in outbox order.
    let requests = fake.patches().len();
    let held = sink.deliver(&item(&alert(None))).await.expect_err("held");
    assert!(
        matches!(&held, DeliveryError::Retry { after: Some(a), message } if *a <= Duration::from_secs(7) && message.contains("paused")),
        "{held:?}"
    );
    assert_eq!(fake.patches().len(), requests, "nothing sent while paused");

    let fake = Fake::start(None).await;
    fake.state.lock().expect("fake state").token_refusal = Some((
        401,
        r#"{"error":"invalid_client","error_description":"AADSTS7000215: Invalid client secret provided.\r\nTrace ID: 1"}"#,
    ));
    let sink = fake.sink(DataverseDeviceBinding::Id);
    let err = sink
        .deliver(&item(&alert(None)))
        .await
        .expect_err("no token");
    let DeliveryError::Retry { message, .. } = &err else {
        panic!("{err:?}")
    };
    assert!(
        message.contains("invalid_client: AADSTS7000215: Invalid client secret provided.")
            && !message.contains("Trace ID")
            && !message.contains("s3cr3t"),
        "{message}"
    );
    assert!(fake.patches().is_empty());
}

#[tokio::test]
async fn a_payload_that_is_not_an_alert_dead_letters_without_a_request() {
    let fake = Fake::start(None).await;
    let sink = fake.sink(DataverseDeviceBinding::Id);
    let mut bad = item(&alert(None));
    bad.payload = json!({"msdyn_deviceid": "pump-1"});
    let err = sink.deliver(&bad).await.expect_err("not an alert");
    assert!(matches!(err, DeliveryError::Permanent(_)), "{err:?}");
    assert!(fake.seen().is_empty());
}

// ---------------------------------------------------------------------------------------
// The change feed: one write per entity
// ---------------------------------------------------------------------------------------

fn t0() -> chrono::DateTime<Utc> {
    Utc.with_ymd_and_hms(2024, 5, 1, 12, 0, 0)
        .single()
        .expect("a time")
}

fn uuid(s: &str) -> Uuid {
    Uuid::parse_str(s).expect("uuid")
}

const DEVICE_RECORD: &str = "0190a6f2-0000-7000-8000-0000000000d1";
const CATEGORY_RECORD: &str = "0190a6f2-0000-7000-8000-0000000000ca";
const COMMAND_RECORD: &str = "0190a6f2-0000-7000-8000-0000000000c1";
const PARENT_ALERT: &str = "0190a6f2-0000-7000-8000-0000000000aa";
const PROVIDER_INSTANCE_RECORD: &str = "22222222-2222-2222-2222-222222222222";

fn device() -> iotgw_registry::Device {
    iotgw_registry::Device {
        id: uuid(DEVICE_RECORD),
        name: "Pump 1".into(),
        device_id: DeviceId::parse("pump-1").expect("device id"),
        provider_instance: "plant".into(),
        category: Some("pumps".into()),
        account: None,
        connection_state: true,
        connection_state_updated_at: Some(t0()),
        last_activity_time: Some(t0()),
        reported_properties: Some(json!({"fw": "1.2"})),
        settings: Some(json!({"interval": 30})),
        tags: BTreeMap::from([("site".to_owned(), "north".to_owned())]),
        registration_status: iotgw_registry::RegistrationStatus::Registered,
        registration_message: None,
        is_simulated: iotgw_registry::IsSimulated::No,
        created_at: t0(),
        updated_at: t0(),
    }
}

fn command(parent: Option<Uuid>) -> iotgw_registry::Command {
    iotgw_registry::Command {
        id: uuid(COMMAND_RECORD),
        name: "reboot".into(),
        message: r#"{"CommandName":"reboot","Parameters":{}}"#.into(),
        status: iotgw_registry::CommandStatus::Sent,
        status_reason: Some("acknowledged".into()),
        device: uuid(DEVICE_RECORD),
        device_id: DeviceId::parse("pump-1").expect("device id"),
        parent_alert: parent,
        request_id: None,
        correlation_id: "corr-1".into(),
        provider_instance: "plant".into(),
        created_at: t0(),
        updated_at: t0(),
        published_at: Some(t0()),
    }
}

/// A change event `{"entity", "key", "version", "state", "refs"?}` as the outbox holds it.
fn change(entity: &str, key: &str, version: i64, state: Value, refs: Option<Value>) -> OutboxItem {
    let mut payload = json!({"entity": entity, "key": key, "version": version, "state": state});
    if let Some(refs) = refs {
        payload["refs"] = refs;
    }
    OutboxItem {
        id: version,
        sink: "d365".into(),
        payload,
        idempotency_key: format!("{entity}:{key}:{version}"),
        attempts: 0,
        last_error: None,
        created_at: t0(),
        lease_token: 1,
        change_of: Some(format!("{entity}:{key}")),
    }
}

fn device_change(d: &iotgw_registry::Device, refs: Option<Value>) -> OutboxItem {
    change(
        "msdyn_iotdevice",
        d.device_id.as_str(),
        3,
        serde_json::to_value(d).expect("device JSON"),
        refs,
    )
}

fn category_change() -> OutboxItem {
    let c = iotgw_registry::Category {
        id: uuid(CATEGORY_RECORD),
        name: "pumps".into(),
        description: Some("every pump".into()),
        created_at: t0(),
    };
    change(
        "msdyn_iotdevicecategory",
        CATEGORY_RECORD,
        1,
        serde_json::to_value(&c).expect("category JSON"),
        None,
    )
}

fn body_of(seen: &Seen) -> Value {
    serde_json::from_str(&seen.body).expect("a JSON body")
}

#[tokio::test]
async fn a_device_is_one_plain_upsert_by_its_record_id_with_every_column_iotgw_owns() {
    let fake = Fake::start(None).await;
    let sink = fake.sink(DataverseDeviceBinding::Id);
    sink.deliver(&device_change(&device(), None))
        .await
        .expect("delivered on 204");
    let p = &fake.patches()[0];
    // Docs (Update and delete table rows, "Upsert a table row"): "An upsert operation is
    // exactly like an update. It uses a PATCH request and uses a URI to reference a
    // specific entity"; the msdyn_iotdevice reference: "`PATCH`
    // /msdyn_iotdevices(*msdyn_iotdeviceid*) ... Upsert a table row".
    assert_eq!(
        p.uri,
        "/api/data/v9.2/msdyn_iotdevices(0190a6f2-0000-7000-8000-0000000000d1)"
    );
    // A plain upsert: neither "Prevent update in upsert" (If-None-Match: *) nor "Prevent
    // create in upsert" (If-Match: *).
    assert_eq!(p.header("if-none-match"), None);
    assert_eq!(p.header("if-match"), None);
    assert_eq!(p.header("odata-version"), Some("4.0"));
    // Docs (msdyn_iotdevice reference): msdyn_ConnectionState Boolean, msdyn_LastActivityTime
    // DateTime, msdyn_DeviceReportedProperties / msdyn_DeviceSettings / msdyn_Tags Memo
    // (MaxLength 8000), msdyn_RegistrationStatus Picklist (192350003 Registered),
    // msdyn_IsSimulated Picklist (192350001 No).
    assert_eq!(
        body_of(p),
        json!({
            "msdyn_name": "Pump 1",
            "msdyn_deviceid": "pump-1",
            "msdyn_connectionstate": true,
            "msdyn_lastactivitytime": "2024-05-01T12:00:00Z",
            "msdyn_devicereportedproperties": "{\"fw\":\"1.2\"}",
            "msdyn_devicesettings": "{\"interval\":30}",
            "msdyn_tags": "{\"site\":\"north\"}",
            "msdyn_registrationstatus": 192_350_003,
            "msdyn_registrationmessage": null,
            "msdyn_issimulated": 192_350_001,
        })
    );
}

#[tokio::test]
async fn a_device_is_addressed_by_the_msdyn_deviceid_alternate_key_with_the_device_id_binding() {
    let fake = Fake::start(None).await;
    let sink = fake.sink(DataverseDeviceBinding::DeviceId);
    let mut d = device();
    d.device_id = DeviceId::parse("plant:pump_1").expect("device id");
    sink.deliver(&device_change(&d, None))
        .await
        .expect("delivered");
    // Docs (Use an alternate key to reference a record): "With single alternate key:
    // /accounts(accountnumber='ABC123')"; an upsert may address the record so ("Upsert a
    // table row": "using an alternate key").
    assert_eq!(
        fake.patches()[0].uri,
        "/api/data/v9.2/msdyn_iotdevices(msdyn_deviceid='plant:pump_1')"
    );
    assert_eq!(
        body_of(&fake.patches()[0])["msdyn_deviceid"],
        "plant:pump_1"
    );
}

#[tokio::test]
async fn a_device_binds_its_category_and_provider_instance_only_when_the_sink_knows_them() {
    let fake = Fake::start(None).await;
    let refs = Some(json!({"msdyn_category": CATEGORY_RECORD}));
    // Default entities (alerts only), no provider_instances: neither lookup.
    fake.sink(DataverseDeviceBinding::Id)
        .deliver(&device_change(&device(), refs.clone()))
        .await
        .expect("delivered");
    let body = body_of(&fake.patches()[0]);
    assert!(body.get("msdyn_Category@odata.bind").is_none(), "{body}");
    assert!(
        body.get("msdyn_IoTProviderInstance@odata.bind").is_none(),
        "{body}"
    );

    let sink = fake.sink_with(DataverseDeviceBinding::Id, |c| {
        c.entities = Some(vec![
            "msdyn_iotdevice".into(),
            "msdyn_iotdevicecategory".into(),
        ]);
        c.provider_instances = BTreeMap::from([("plant".into(), PROVIDER_INSTANCE_RECORD.into())]);
    });
    sink.deliver(&device_change(&device(), refs.clone()))
        .await
        .expect("delivered");
    let body = body_of(&fake.patches()[1]);
    // Docs (msdyn_iotdevice reference, many-to-one relationships):
    // msdyn_msdyn_iotdevicecategory_msdyn_iotdevice_Category "ReferencingEntityNavigationPropertyName
    // `msdyn_Category`", msdyn_msdyn_iotproviderinstance_msdyn_iotdevice_IoTProviderInstance
    // "`msdyn_IoTProviderInstance`"; EntitySetName `msdyn_iotdevicecategories`,
    // `msdyn_iotproviderinstances`. (Associate table rows on create):
    // "primarycontactid@odata.bind": "/contacts(00000000-0000-0000-0000-000000000001)".
    assert_eq!(
        body["msdyn_Category@odata.bind"],
        "/msdyn_iotdevicecategories(0190a6f2-0000-7000-8000-0000000000ca)"
    );
    assert_eq!(
        body["msdyn_IoTProviderInstance@odata.bind"],
        "/msdyn_iotproviderinstances(22222222-2222-2222-2222-222222222222)"
    );

    // A device of an instance the map does not name, and one without a category.
    let mut lab = device();
    lab.provider_instance = "lab".into();
    sink.deliver(&device_change(&lab, None))
        .await
        .expect("delivered");
    let body = body_of(&fake.patches()[2]);
    assert!(body.get("msdyn_Category@odata.bind").is_none(), "{body}");
    assert!(
        body.get("msdyn_IoTProviderInstance@odata.bind").is_none(),
        "{body}"
    );
}

#[tokio::test]
async fn reported_properties_longer_than_their_8000_character_column_are_left_out_not_failed() {
    let fake = Fake::start(None).await;
    let sink = fake.sink(DataverseDeviceBinding::Id);
    let mut d = device();
    d.reported_properties = Some(json!({ "blob": "x".repeat(8_000) }));
    sink.deliver(&device_change(&d, None))
        .await
        .expect("delivered without the column");
    // Docs (msdyn_iotdevice reference): msdyn_DeviceReportedProperties "Type Memo ...
    // MaxLength 8000": a longer value would fail the whole write.
    let body = body_of(&fake.patches()[0]);
    assert!(
        body.get("msdyn_devicereportedproperties").is_none(),
        "{body}"
    );
    assert_eq!(body["msdyn_devicesettings"], "{\"interval\":30}");
}

#[tokio::test]
async fn a_registration_history_row_is_created_once_with_its_device_bound() {
    let fake = Fake::start(None).await;
    let row = iotgw_registry::RegistrationHistory {
        id: uuid("0190a6f2-0000-7000-8000-0000000000e1"),
        device: uuid(DEVICE_RECORD),
        device_id: DeviceId::parse("pump-1").expect("device id"),
        name: "Register pump-1".into(),
        action: iotgw_registry::RegistrationAction::Register,
        provider_instance: "plant".into(),
        created_at: t0(),
    };
    let item = change(
        "msdyn_iotdeviceregistrationhistory",
        "0190a6f2-0000-7000-8000-0000000000e1",
        1,
        serde_json::to_value(&row).expect("row JSON"),
        None,
    );
    fake.sink(DataverseDeviceBinding::Id)
        .deliver(&item)
        .await
        .expect("delivered");
    let p = &fake.patches()[0];
    // Docs (msdyn_iotdeviceregistrationhistory reference): EntitySetName
    // `msdyn_iotdeviceregistrationhistories`; msdyn_Action 192350000 Register;
    // msdyn_msdyn_iotdevice_msdyn_iotdeviceregistrationhistory_Device
    // "ReferencingEntityNavigationPropertyName `msdyn_Device`". (Prevent update in upsert):
    // "If-None-Match: *".
    assert_eq!(
        p.uri,
        "/api/data/v9.2/msdyn_iotdeviceregistrationhistories(0190a6f2-0000-7000-8000-0000000000e1)"
    );
    assert_eq!(p.header("if-none-match"), Some("*"));
    assert_eq!(
        body_of(p),
        json!({
            "msdyn_name": "Register pump-1",
            "msdyn_action": 192_350_000,
            "msdyn_Device@odata.bind": "/msdyn_iotdevices(0190a6f2-0000-7000-8000-0000000000d1)",
        })
    );
    // Docs (Prevent update in upsert): "When the entity is found, you'll get the following
    // response with status 412 Precondition Failed": an earlier attempt's row.
    fake.reply(
        412,
        vec![("content-type", "application/json; odata.metadata=minimal")],
        r#"{"error":{"code":"","message":"A record with matching key values already exists."}}"#,
    );
    fake.sink(DataverseDeviceBinding::None)
        .deliver(&item)
        .await
        .expect("412 on a create-only row is delivered");
    assert!(
        body_of(&fake.patches()[1])
            .get("msdyn_Device@odata.bind")
            .is_none(),
        "no device bind with device_binding = none"
    );
}

#[tokio::test]
async fn a_category_is_upserted_by_its_id_with_its_name_only() {
    let fake = Fake::start(None).await;
    fake.sink(DataverseDeviceBinding::Id)
        .deliver(&category_change())
        .await
        .expect("delivered");
    let p = &fake.patches()[0];
    // Docs (msdyn_iotdevicecategory reference): EntitySetName `msdyn_iotdevicecategories`;
    // its writable columns are msdyn_name and system ones (no description column).
    assert_eq!(
        p.uri,
        "/api/data/v9.2/msdyn_iotdevicecategories(0190a6f2-0000-7000-8000-0000000000ca)"
    );
    assert_eq!(
        (p.header("if-match"), p.header("if-none-match")),
        (None, None)
    );
    assert_eq!(body_of(p), json!({"msdyn_name": "pumps"}));
}

#[tokio::test]
async fn a_command_is_upserted_with_its_device_and_its_parent_alert_only_when_the_sink_writes_alerts(
) {
    let fake = Fake::start(None).await;
    let item = change(
        "msdyn_iotdevicecommand",
        COMMAND_RECORD,
        2,
        serde_json::to_value(command(Some(uuid(PARENT_ALERT)))).expect("command JSON"),
        None,
    );
    // Default entities: msdyn_iotalert.
    fake.sink(DataverseDeviceBinding::Id)
        .deliver(&item)
        .await
        .expect("delivered");
    let p = &fake.patches()[0];
    // Docs (msdyn_iotdevicecommand reference): "`PATCH`
    // /msdyn_iotdevicecommands(*msdyn_iotdevicecommandid*)"; msdyn_CommandStatus
    // 192350001 Sent; navigation properties `msdyn_Device`
    // (msdyn_msdyn_iotdevice_msdyn_iotdevicecommand_Device) and `msdyn_ParentAlert`
    // (msdyn_msdyn_iotalert_msdyn_iotdevicecommand_ParentAlert).
    assert_eq!(
        p.uri,
        "/api/data/v9.2/msdyn_iotdevicecommands(0190a6f2-0000-7000-8000-0000000000c1)"
    );
    assert_eq!(
        (p.header("if-match"), p.header("if-none-match")),
        (None, None)
    );
    assert_eq!(
        body_of(p),
        json!({
            "msdyn_name": "reboot",
            "msdyn_message": "{\"CommandName\":\"reboot\",\"Parameters\":{}}",
            "msdyn_commandstatus": 192_350_001,
            "msdyn_commandstatusreason": "acknowledged",
            "msdyn_deviceid": "pump-1",
            "msdyn_Device@odata.bind": "/msdyn_iotdevices(0190a6f2-0000-7000-8000-0000000000d1)",
            "msdyn_ParentAlert@odata.bind": "/msdyn_iotalerts(0190a6f2-0000-7000-8000-0000000000aa)",
        })
    );
    fake.sink_with(DataverseDeviceBinding::Id, |c| {
        c.entities = Some(vec!["msdyn_iotdevicecommand".into()]);
    })
    .deliver(&item)
    .await
    .expect("delivered");
    let body = body_of(&fake.patches()[1]);
    assert!(body.get("msdyn_ParentAlert@odata.bind").is_none(), "{body}");
}

fn alert_change(entities: &[&str]) -> (OutboxItem, Vec<String>) {
    let mut a = alert(Some(uuid(PARENT_ALERT)));
    a.statecode = 2;
    a.statuscode = 5;
    a.last_command_sent = Some(uuid(COMMAND_RECORD));
    a.last_command_sent_time = Some(t0());
    a.case = Some(uuid("0190a6f2-0000-7000-8000-00000000ca5e"));
    let item = change(
        "msdyn_iotalert",
        &a.id.to_string(),
        2,
        serde_json::to_value(&a).expect("alert JSON"),
        None,
    );
    (item, entities.iter().map(|e| (*e).to_owned()).collect())
}

#[tokio::test]
async fn an_alert_change_updates_only_what_iotgw_owns_and_never_creates_the_record() {
    let fake = Fake::start(None).await;
    let (item, entities) = alert_change(&["msdyn_iotalert", "msdyn_iotdevicecommand"]);
    fake.sink_with(DataverseDeviceBinding::Id, |c| c.entities = Some(entities))
        .deliver(&item)
        .await
        .expect("delivered");
    let p = &fake.patches()[0];
    assert_eq!(
        p.uri,
        "/api/data/v9.2/msdyn_iotalerts(0190a6f2-0000-7000-8000-000000000001)"
    );
    // Docs (Perform conditional operations, "Prevent create in upsert"): "add an If-Match
    // header to the request with a value of \"*\"".
    assert_eq!(p.header("if-match"), Some("*"));
    assert_eq!(p.header("if-none-match"), None);
    // Docs (msdyn_iotalert reference): msdyn_LastCommandSent
    // (msdyn_msdyn_iotdevicecommand_msdyn_iotalert_LastCommandSent) -> msdyn_iotdevicecommand;
    // statuscode 5 "In Progress - Command Sent" with statecode 2. No msdyn_case: Field
    // Service sets it.
    assert_eq!(
        body_of(p),
        json!({
            "statecode": 2,
            "statuscode": 5,
            "msdyn_ParentAlert@odata.bind": "/msdyn_iotalerts(0190a6f2-0000-7000-8000-0000000000aa)",
            "msdyn_parentalerttoken": "plant/pump-1/evt-0",
            "msdyn_LastCommandSent@odata.bind": "/msdyn_iotdevicecommands(0190a6f2-0000-7000-8000-0000000000c1)",
            "msdyn_lastcommandsenttime": "2024-05-01T12:00:00Z",
        })
    );
    // Without msdyn_iotdevicecommand among the entities the command is not in Dataverse:
    // no bind to it.
    let (item, entities) = alert_change(&["msdyn_iotalert"]);
    fake.sink_with(DataverseDeviceBinding::Id, |c| c.entities = Some(entities))
        .deliver(&item)
        .await
        .expect("delivered");
    let body = body_of(&fake.patches()[1]);
    assert!(
        body.get("msdyn_LastCommandSent@odata.bind").is_none(),
        "{body}"
    );
    assert_eq!(body["msdyn_lastcommandsenttime"], "2024-05-01T12:00:00Z");
}

#[tokio::test]
async fn an_alert_change_for_a_record_deleted_in_dataverse_is_dead_lettered_saying_so() {
    let fake = Fake::start(None).await;
    // Docs (Prevent create in upsert): "When the entity is not found, you'll get the
    // following response with status 404 Not Found ... "account With Id =
    // 00000000-0000-0000-0000-000000000001 Does Not Exist""
    fake.reply(
        404,
        vec![("content-type", "application/json; odata.metadata=minimal")],
        r#"{"error":{"code":"","message":"msdyn_iotalert With Id = 0190a6f2-0000-7000-8000-000000000001 Does Not Exist"}}"#,
    );
    let (item, _) = alert_change(&["msdyn_iotalert"]);
    let err = fake
        .sink(DataverseDeviceBinding::Id)
        .deliver(&item)
        .await
        .expect_err("gone");
    let DeliveryError::Permanent(reason) = err else {
        panic!("{err:?}")
    };
    assert!(
        reason.contains("404 Not Found")
            && reason.contains("Does Not Exist")
            && reason.contains("never re-creates"),
        "{reason}"
    );
}

// ---------------------------------------------------------------------------------------
// $batch
// ---------------------------------------------------------------------------------------

#[test]
fn the_batch_answer_parser_reads_microsofts_documented_change_set_and_error_responses() {
    // Docs (Execute batch operations using the Web API, "Change sets", **Response**),
    // verbatim (bare line breaks, as the documentation shows them):
    let documented = "--batchresponse_f27ef42d-51b0-4685-bac9-f468f844de2f
Content-Type: multipart/mixed; boundary=changesetresponse_64cc3fff-023a-45b0-b29d-df21583ffa15

--changesetresponse_64cc3fff-023a-45b0-b29d-df21583ffa15
Content-Type: application/http
Content-Transfer-Encoding: binary
Content-ID: 1

HTTP/1.1 204 No Content
OData-Version: 4.0
Location: [Organization Uri]/api/data/v9.2/tasks(e73ffc82-e292-ed11-aad1-000d3a9933c9)
OData-EntityId: [Organization Uri]/api/data/v9.2/tasks(e73ffc82-e292-ed11-aad1-000d3a9933c9)


--changesetresponse_64cc3fff-023a-45b0-b29d-df21583ffa15
Content-Type: application/http
Content-Transfer-Encoding: binary
Content-ID: 2

HTTP/1.1 204 No Content
OData-Version: 4.0
Location: [Organization Uri]/api/data/v9.2/tasks(e83ffc82-e292-ed11-aad1-000d3a9933c9)
OData-EntityId: [Organization Uri]/api/data/v9.2/tasks(e83ffc82-e292-ed11-aad1-000d3a9933c9)


--changesetresponse_64cc3fff-023a-45b0-b29d-df21583ffa15--
--batchresponse_f27ef42d-51b0-4685-bac9-f468f844de2f
Content-Type: application/http
Content-Transfer-Encoding: binary

HTTP/1.1 200 OK
Content-Type: application/json; odata.metadata=minimal; odata.streaming=true
OData-Version: 4.0

{
  \"value\": []
}
--batchresponse_f27ef42d-51b0-4685-bac9-f468f844de2f--
";
    let parts = batch::parse_response(
        "multipart/mixed; boundary=batchresponse_f27ef42d-51b0-4685-bac9-f468f844de2f",
        documented,
    )
    .expect("a multipart answer");
    let summary: Vec<_> = parts
        .iter()
        .map(|p| (p.content_id.as_deref(), p.status))
        .collect();
    assert_eq!(summary, [(Some("1"), 204), (Some("2"), 204), (None, 200)]);
    assert_eq!(parts[0].header("odata-version"), Some("4.0"));
    assert_eq!(parts[2].body, "{\n  \"value\": []\n}");

    // Docs ("Handling errors", **Response**): the batch fails on its first failing request
    // and "the batch error represents the error of the first failing request".
    let documented = "--batchresponse_156da4b8-cd2c-4862-a911-4aaab97c001a
Content-Type: application/http
Content-Transfer-Encoding: binary

HTTP/1.1 400 Bad Request
REQ_ID: 5ecd1cb3-1730-4ffc-909c-d44c22270026
Content-Type: application/json; odata.metadata=minimal
OData-Version: 4.0

{\"error\":{\"code\":\"0x80044331\",\"message\":\"A validation error occurred.  The length of the 'subject' attribute of the 'task' entity exceeded the maximum allowed length of '200'.\"}}
--batchresponse_156da4b8-cd2c-4862-a911-4aaab97c001a--
";
    let parts = batch::parse_response(
        "multipart/mixed; boundary=\"batchresponse_156da4b8-cd2c-4862-a911-4aaab97c001a\"",
        documented,
    )
    .expect("a multipart answer");
    assert_eq!(parts.len(), 1);
    assert_eq!(
        (parts[0].content_id.as_deref(), parts[0].status),
        (None, 400)
    );
    assert!(dataverse_error(&parts[0].body)
        .starts_with("Dataverse error 0x80044331: A validation error"));
    assert!(batch::parse_response("application/json", "{}").is_none());
}

#[tokio::test]
async fn batch_size_is_the_configured_one_and_a_single_item_goes_alone() {
    let fake = Fake::start(None).await;
    assert_eq!(fake.sink(DataverseDeviceBinding::Id).batch_size(), 50);
    let sink = fake.sink_with(DataverseDeviceBinding::Id, |c| c.batch_size = 7);
    assert_eq!(sink.batch_size(), 7);
    let results = sink.deliver_batch(&[category_change()]).await;
    assert_eq!(results, [Ok(())]);
    assert_eq!(fake.patches().len(), 1, "one item: a PATCH, no $batch");
    assert!(fake.batches().is_empty());
}

#[tokio::test]
async fn two_items_go_as_one_batch_change_set_with_the_documented_byte_structure() {
    let fake = Fake::start(None).await;
    let sink = fake.sink(DataverseDeviceBinding::Id);
    let a = alert(None);
    let results = sink.deliver_batch(&[item(&a), category_change()]).await;
    assert_eq!(results, [Ok(()), Ok(())]);
    assert!(fake.patches().is_empty());
    let batches = fake.batches();
    assert_eq!(batches.len(), 1);
    let b = &batches[0];
    // Docs (Execute batch operations using the Web API, "Change sets", **Request**):
    //   POST [Organization Uri]/api/data/v9.2/$batch HTTP/1.1
    //   OData-MaxVersion: 4.0
    //   OData-Version: 4.0
    //   Accept: application/json
    //   Content-Type: multipart/mixed; boundary="batch_22975cad-7f57-410d-be15-6363209367ea"
    //
    //   --batch_22975cad-7f57-410d-be15-6363209367ea
    //   Content-Type: multipart/mixed; boundary="changeset_246e6bfe-89a4-4c77-b293-7a433f082e8a"
    //
    //   --changeset_246e6bfe-89a4-4c77-b293-7a433f082e8a
    //   Content-Type: application/http
    //   Content-Transfer-Encoding: binary
    //   Content-ID: 1
    //
    //   POST /api/data/v9.2/tasks HTTP/1.1
    //   Content-Type: application/json; type=entry
    //
    //   {
    //     "subject": "Task 1 in batch", ...
    //   }
    //   --changeset_246e6bfe-89a4-4c77-b293-7a433f082e8a
    //   ...
    //   --changeset_246e6bfe-89a4-4c77-b293-7a433f082e8a--
    //
    //   --batch_22975cad-7f57-410d-be15-6363209367ea
    // ("Reference URIs in request body" shows absolute request lines:
    //   POST [Organization URI]/api/data/v9.2/leads HTTP/1.1)
    assert_eq!(b.uri, "/api/data/v9.2/$batch");
    assert_eq!(b.header("odata-maxversion"), Some("4.0"));
    assert_eq!(b.header("odata-version"), Some("4.0"));
    assert_eq!(b.header("accept"), Some("application/json"));
    assert_eq!(b.header("authorization"), Some("Bearer token-1"));
    let content_type = b.header("content-type").expect("a content type");
    let batch_boundary = content_type
        .strip_prefix("multipart/mixed; boundary=batch_")
        .expect("multipart/mixed; boundary=batch_<uuid>");
    Uuid::parse_str(batch_boundary).expect("a uuid in the batch boundary");
    let changeset = b
        .body
        .lines()
        .nth(1)
        .and_then(|l| l.strip_prefix("Content-Type: multipart/mixed; boundary=changeset_"))
        .expect("a change set first");
    Uuid::parse_str(changeset).expect("a uuid in the change set boundary");
    let base = &fake.base;
    let expected = format!(
        "--batch_{batch_boundary}\r\n\
         Content-Type: multipart/mixed; boundary=changeset_{changeset}\r\n\
         \r\n\
         --changeset_{changeset}\r\n\
         Content-Type: application/http\r\n\
         Content-Transfer-Encoding: binary\r\n\
         Content-ID: 1\r\n\
         \r\n\
         PATCH {base}/api/data/v9.2/msdyn_iotalerts(0190a6f2-0000-7000-8000-000000000001) HTTP/1.1\r\n\
         Content-Type: application/json; type=entry\r\n\
         If-None-Match: *\r\n\
         \r\n\
         {alert}\r\n\
         --changeset_{changeset}\r\n\
         Content-Type: application/http\r\n\
         Content-Transfer-Encoding: binary\r\n\
         Content-ID: 2\r\n\
         \r\n\
         PATCH {base}/api/data/v9.2/msdyn_iotdevicecategories(0190a6f2-0000-7000-8000-0000000000ca) HTTP/1.1\r\n\
         Content-Type: application/json; type=entry\r\n\
         \r\n\
         {{\"msdyn_name\":\"pumps\"}}\r\n\
         --changeset_{changeset}--\r\n\
         --batch_{batch_boundary}--\r\n",
        alert = record(&a, DataverseDeviceBinding::Id),
    );
    assert_eq!(b.body, expected);
}

#[tokio::test]
async fn a_412_on_a_create_only_part_delivers_that_item_and_retries_the_rolled_back_others() {
    let fake = Fake::start(None).await;
    let sink = fake.sink(DataverseDeviceBinding::Id);
    // The alert (Content-ID 1) was created by an earlier attempt.
    fake.fail_batch_part(
        1,
        412,
        r#"{"error":{"code":"","message":"A record with matching key values already exists."}}"#,
    );
    let results = sink
        .deliver_batch(&[item(&alert(None)), category_change()])
        .await;
    assert_eq!(results[0], Ok(()));
    let Err(DeliveryError::Retry { message, .. }) = &results[1] else {
        panic!("{results:?}")
    };
    // Docs ("Change sets"): "if any one of the operations fails, any completed operations
    // will be rolled back".
    assert!(
        message.contains("rolled back") && message.contains("already in Dataverse"),
        "{message}"
    );
}

#[tokio::test]
async fn a_400_part_dead_letters_its_item_with_dataverse_error_and_retries_the_others() {
    let fake = Fake::start(None).await;
    let sink = fake.sink(DataverseDeviceBinding::Id);
    fake.fail_batch_part(
        2,
        400,
        r#"{"error":{"code":"0x80040217","message":"msdyn_iotdevicecategory With Id = 0190a6f2-0000-7000-8000-0000000000ca Does Not Exist"}}"#,
    );
    let results = sink
        .deliver_batch(&[item(&alert(None)), category_change()])
        .await;
    let Err(DeliveryError::Retry { message, .. }) = &results[0] else {
        panic!("{results:?}")
    };
    assert!(message.contains("rolled back"), "{message}");
    let Err(DeliveryError::Permanent(reason)) = &results[1] else {
        panic!("{results:?}")
    };
    assert!(
        reason.contains("Content-ID 2")
            && reason.contains("/msdyn_iotdevicecategories(0190a6f2-0000-7000-8000-0000000000ca)")
            && reason.contains("400 Bad Request: Dataverse error 0x80040217"),
        "{reason}"
    );
}

#[tokio::test]
async fn a_503_part_retries_every_item_and_an_error_without_a_usable_content_id_too() {
    let fake = Fake::start(None).await;
    let sink = fake.sink(DataverseDeviceBinding::Id);
    let items = [item(&alert(None)), category_change()];
    fake.fail_batch_part(2, 503, "");
    let results = sink.deliver_batch(&items).await;
    assert!(
        results
            .iter()
            .all(|r| matches!(r, Err(DeliveryError::Retry { .. }))),
        "{results:?}"
    );
    // The sink paused after a round that failed as a whole: wait it out.
    if let Some(pause) = sink.throttled_for() {
        tokio::time::sleep(pause).await;
    }

    // Content-ID 9 names no item of two.
    fake.fail_batch_part(
        9,
        400,
        r#"{"error":{"code":"0x80040217","message":"Does Not Exist"}}"#,
    );
    let results = sink.deliver_batch(&items).await;
    for r in &results {
        let Err(DeliveryError::Retry { message, .. }) = r else {
            panic!("{results:?}")
        };
        assert!(message.contains("Content-ID 9"), "{message}");
    }
    if let Some(pause) = sink.throttled_for() {
        tokio::time::sleep(pause).await;
    }

    // A 400 that is not multipart (Docs, "Reference URIs in an operation": "HTTP 400 Bad
    // Request / Content-ID Reference: '$1' does not exist in the batch context.").
    fake.reply(
        400,
        vec![],
        "Content-ID Reference: '$1' does not exist in the batch context.",
    );
    let results = sink.deliver_batch(&items).await;
    for r in &results {
        let Err(DeliveryError::Retry { message, .. }) = r else {
            panic!("{results:?}")
        };
        assert!(message.contains("names no item"), "{message}");
    }
}

#[tokio::test]
async fn a_429_batch_answer_retries_every_item_after_retry_after_and_holds_back_the_next() {
    let fake = Fake::start(None).await;
    let sink = fake.sink(DataverseDeviceBinding::Id);
    // Docs (Service protection API limits): "With the Web API, Dataverse returns a 429 Too
    // Many Requests error" ... "Try to use the Retry-After header value if it is returned".
    fake.reply(
        429,
        vec![("retry-after", "1"), (BURST_REMAINING_HEADER, "0")],
        r#"{"error":{"code":"0x80072322","message":"Number of requests exceeded the limit of 6000 over time window of 300 seconds."}}"#,
    );
    let items = [item(&alert(None)), category_change()];
    let results = sink.deliver_batch(&items).await;
    for r in &results {
        assert!(
            matches!(r, Err(DeliveryError::Retry { after: Some(a), message }) if *a > Duration::from_millis(900) && *a <= Duration::from_secs(1) && message.contains("0x80072322")),
            "{results:?}"
        );
    }
    let held = sink.deliver_batch(&items).await;
    assert!(
        held.iter()
            .all(|r| matches!(r, Err(DeliveryError::Retry { after: Some(_), .. }))),
        "{held:?}"
    );
    assert_eq!(fake.batches().len(), 1, "no request while throttled");
}

#[tokio::test]
async fn an_expired_token_on_a_batch_is_replaced_once_and_the_batch_sent_again() {
    let fake = Fake::start(None).await;
    let sink = fake.sink(DataverseDeviceBinding::Id);
    let items = [item(&alert(None)), category_change()];
    assert_eq!(sink.deliver_batch(&items).await, [Ok(()), Ok(())]);
    fake.expire_tokens();
    assert_eq!(sink.deliver_batch(&items).await, [Ok(()), Ok(())]);
    let batches = fake.batches();
    let auth: Vec<_> = batches
        .iter()
        .map(|b| b.header("authorization").unwrap_or_default())
        .collect();
    assert_eq!(auth, ["Bearer token-1", "Bearer token-1", "Bearer token-2"]);
    assert_eq!(batches[1].body, batches[2].body, "the same batch again");
}

#[tokio::test]
async fn an_item_that_can_never_be_written_is_dead_lettered_and_the_others_still_go() {
    let fake = Fake::start(None).await;
    let sink = fake.sink(DataverseDeviceBinding::Id);
    let bad = change("msdyn_iotdevicecommand", "x", 1, json!({"nope": 1}), None);
    let results = sink
        .deliver_batch(&[category_change(), bad, item(&alert(None))])
        .await;
    assert_eq!(results[0], Ok(()));
    assert!(
        matches!(&results[1], Err(DeliveryError::Permanent(m)) if m.contains("msdyn_iotdevicecommand")),
        "{results:?}"
    );
    assert_eq!(results[2], Ok(()));
    assert_eq!(fake.batches().len(), 1);
    assert!(fake.batches()[0].body.contains("Content-ID: 2"));
    assert!(!fake.batches()[0].body.contains("Content-ID: 3"));
}

// ---------------------------------------------------------------------------------------
// The token request against Microsoft's own library
// ---------------------------------------------------------------------------------------

/// The Python of the venv `scripts/install-azure-test-deps.sh` makes, if it has msal;
/// `None` after a `SKIPPED:` line (a failure under `CI=true`).
fn msal_python(test: &str) -> Option<std::path::PathBuf> {
    let venv = std::env::var_os("IOTGW_AZURE_VENV")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            std::path::PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../target/azure-venv"))
        });
    let python = venv.join("bin/python");
    let ok = std::process::Command::new(&python)
        .args(["-c", "import msal"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if ok {
        return Some(python);
    }
    let why = format!(
        "{test}: Microsoft's msal is not installed in {}; run scripts/install-azure-test-deps.sh (or set IOTGW_AZURE_VENV)",
        venv.display()
    );
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("CI=true and {why}");
    }
    println!("SKIPPED: {why}");
    None
}

const MSAL_CLIENT_CREDENTIALS: &str = r#"
import json, os, msal
app = msal.ConfidentialClientApplication(
    os.environ["DV_CLIENT_ID"],
    client_credential=os.environ["DV_CLIENT_SECRET"],
    authority=os.environ["DV_AUTHORITY"],
    validate_authority=False,
    instance_discovery=False,
)
r = app.acquire_token_for_client(scopes=[os.environ["DV_SCOPE"]])
print(json.dumps({"version": msal.__version__, "access_token": r.get("access_token"),
                  "error": r.get("error"), "error_description": r.get("error_description")}))
"#;

#[tokio::test]
async fn the_token_request_matches_what_msal_sends_for_client_credentials() {
    let Some(python) =
        msal_python("the_token_request_matches_what_msal_sends_for_client_credentials")
    else {
        return;
    };
    let pki = iotgw_testkit::pki::Pki::new("dataverse-test-ca").expect("a CA");
    let fake = Fake::start(Some(&pki)).await;
    let cfg = fake.config(DataverseDeviceBinding::Id);

    let secret = cfg
        .client_secret
        .as_ref()
        .expect("a secret")
        .expose()
        .to_owned();
    let (result, msal_request, ours) = msal_then_ours(
        &python,
        MSAL_CLIENT_CREDENTIALS,
        &[("DV_CLIENT_SECRET", secret)],
        &pki,
        &fake,
        &cfg,
    )
    .await;

    println!(
        "msal {} sent form {:?}, headers {:?}",
        result["version"],
        msal_request.form().keys().collect::<Vec<_>>(),
        msal_request.headers.keys().collect::<Vec<_>>()
    );
    assert_eq!(ours.method, msal_request.method);
    assert_eq!(ours.uri, msal_request.uri, "the same token endpoint");
    assert_eq!(
        ours.header("content-type"),
        msal_request.header("content-type")
    );
    // Every field msal sends for the flow, with msal's value. msal adds only its
    // client_info=1 (ask Entra for a client_info claim in the answer, for its account
    // cache; a client-credentials answer has no account to describe).
    let mut msal_form = msal_request.form();
    let extra: Vec<_> = msal_form
        .keys()
        .filter(|k| !ours.form().contains_key(*k))
        .cloned()
        .collect();
    for k in &extra {
        msal_form.remove(k);
    }
    assert_eq!(ours.form(), msal_form);
    assert!(
        extra.iter().all(|k| k == "client_info"),
        "msal sends fields we do not: {extra:?}"
    );
}

const MSAL_CERTIFICATE_CREDENTIALS: &str = r#"
import json, os, msal
app = msal.ConfidentialClientApplication(
    os.environ["DV_CLIENT_ID"],
    client_credential={
        "private_key": open(os.environ["DV_KEY"]).read(),
        "public_certificate": open(os.environ["DV_CERT"]).read(),
    },
    authority=os.environ["DV_AUTHORITY"],
    validate_authority=False,
    instance_discovery=False,
)
r = app.acquire_token_for_client(scopes=[os.environ["DV_SCOPE"]])
print(json.dumps({"version": msal.__version__, "access_token": r.get("access_token"),
                  "error": r.get("error"), "error_description": r.get("error_description")}))
"#;

/// base64 or base64url, padded or not, with line breaks or not (msal pads its thumbprints
/// and keeps the PEM line breaks in `x5c`).
fn lenient_base64(s: &str) -> Vec<u8> {
    use base64::Engine;
    let cleaned: String = s
        .chars()
        .filter(|c| !c.is_whitespace() && *c != '=')
        .map(|c| match c {
            '+' => '-',
            '/' => '_',
            c => c,
        })
        .collect();
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(cleaned)
        .expect("base64")
}

#[tokio::test]
async fn the_certificate_token_request_matches_what_msal_sends() {
    let Some(python) = msal_python("the_certificate_token_request_matches_what_msal_sends") else {
        return;
    };
    let (cert_pem, key_pem) = assertion::tests::throwaway_certificate(false);
    let dir = tempfile::tempdir().expect("tmp");
    let (cert_path, key_path) = (dir.path().join("app.crt"), dir.path().join("app.key"));
    std::fs::write(&cert_path, &cert_pem).expect("write");
    std::fs::write(&key_path, &key_pem).expect("write");
    let pki = iotgw_testkit::pki::Pki::new("dataverse-test-ca").expect("a CA");
    let fake = Fake::start(Some(&pki)).await;
    let mut cfg = fake.config(DataverseDeviceBinding::Id);
    cfg.client_secret = None;
    cfg.client_certificate = Some(cert_path.display().to_string());
    cfg.client_certificate_key = Some(key_path.display().to_string());

    let (result, msal_request, ours) = msal_then_ours(
        &python,
        MSAL_CERTIFICATE_CREDENTIALS,
        &[
            ("DV_KEY", key_path.display().to_string()),
            ("DV_CERT", cert_path.display().to_string()),
        ],
        &pki,
        &fake,
        &cfg,
    )
    .await;

    // The request: method, endpoint, content type.
    assert_eq!(ours.method, msal_request.method);
    assert_eq!(ours.uri, msal_request.uri, "the same token endpoint");
    assert_eq!(
        ours.header("content-type"),
        msal_request.header("content-type")
    );
    // The form: the same fields (msal adds its client_info=1 only, as for a secret), the
    // same fixed values, no client_secret.
    let (our_form, msal_form) = (ours.form(), msal_request.form());
    println!(
        "msal {} sent form {:?}",
        result["version"],
        msal_form.keys().collect::<Vec<_>>()
    );
    let names = |f: &BTreeMap<String, String>| {
        f.keys()
            .filter(|k| *k != "client_info")
            .cloned()
            .collect::<Vec<_>>()
    };
    assert_eq!(names(&our_form), names(&msal_form));
    assert!(!our_form.contains_key("client_secret"));
    for field in ["grant_type", "client_id", "scope", "client_assertion_type"] {
        assert_eq!(our_form.get(field), msal_form.get(field), "{field}");
    }
    assert_eq!(
        our_form["client_assertion_type"],
        "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
    );

    // The assertions: the same header fields and values (thumbprint and certificate
    // compared decoded: msal pads its base64url and keeps the PEM line breaks), the same
    // claims but `nbf` (msal leaves it out; Microsoft's certificate-credentials page lists
    // it), equal aud, iss and sub, a fresh jti each, both signed by the certificate's key.
    let (our_header, our_claims, our_input, our_sig) =
        assertion::tests::decode(&our_form["client_assertion"]);
    let msal_jwt = &msal_form["client_assertion"];
    let msal_parts: Vec<&str> = msal_jwt.split('.').collect();
    assert_eq!(msal_parts.len(), 3, "{msal_jwt}");
    let msal_header: Value =
        serde_json::from_slice(&lenient_base64(msal_parts[0])).expect("msal's header");
    let msal_claims: Value =
        serde_json::from_slice(&lenient_base64(msal_parts[1])).expect("msal's claims");
    println!("msal's assertion: {msal_header} . {msal_claims}");
    let keys = |v: &Value| {
        let mut k: Vec<String> = v.as_object().expect("an object").keys().cloned().collect();
        k.sort();
        k
    };
    assert_eq!(keys(&our_header), keys(&msal_header));
    assert_eq!(our_header["alg"], msal_header["alg"]);
    assert_eq!(our_header["alg"], "PS256");
    assert_eq!(our_header["typ"], msal_header["typ"]);
    use rustls_pki_types::pem::PemObject;
    let cert_der = rustls_pki_types::CertificateDer::from_pem_slice(cert_pem.as_bytes())
        .expect("cert PEM")
        .to_vec();
    let thumbprint = ring::digest::digest(&ring::digest::SHA256, &cert_der);
    for h in [&our_header, &msal_header] {
        assert_eq!(
            lenient_base64(h["x5t#S256"].as_str().expect("x5t#S256")),
            thumbprint.as_ref()
        );
        let x5c = h["x5c"].as_array().expect("x5c");
        assert_eq!(x5c.len(), 1, "{h}");
        assert_eq!(lenient_base64(x5c[0].as_str().expect("x5c[0]")), cert_der);
    }
    let mut msal_claim_names = keys(&msal_claims);
    msal_claim_names.push("nbf".into());
    msal_claim_names.sort();
    assert_eq!(keys(&our_claims), msal_claim_names);
    for claim in ["aud", "iss", "sub"] {
        assert_eq!(our_claims[claim], msal_claims[claim], "{claim}");
    }
    assert_eq!(our_claims["aud"], cfg.token_endpoint());
    assert_eq!(our_claims["iss"], cfg.client_id);
    for c in [&our_claims, &msal_claims] {
        let jti = c["jti"].as_str().expect("jti");
        assert!(Uuid::parse_str(jti).is_ok(), "{c}");
        let lifetime = c["exp"].as_f64().expect("exp") - c["iat"].as_f64().expect("iat");
        assert!((599.0..=601.0).contains(&lifetime), "{c}");
    }
    assert_ne!(our_claims["jti"], msal_claims["jti"]);
    assert!(assertion::tests::verifies(
        &cert_pem,
        our_input.as_bytes(),
        &our_sig
    ));
    assert!(
        assertion::tests::verifies(
            &cert_pem,
            format!("{}.{}", msal_parts[0], msal_parts[1]).as_bytes(),
            &lenient_base64(msal_parts[2])
        ),
        "msal's signature verifies with the certificate too"
    );
}

#[tokio::test]
async fn a_certificate_that_cannot_be_used_fails_the_sink_build_naming_the_key() {
    let fake = Fake::start(None).await;
    let mut cfg = fake.config(DataverseDeviceBinding::Id);
    cfg.client_secret = None;
    cfg.client_certificate = Some("/nonexistent/iotgw-app.pem".into());
    let Err(err) = DataverseSink::new("d365", &cfg) else {
        panic!("a sink built without its certificate")
    };
    assert!(
        err.to_string()
            .contains("sinks.d365: client_certificate `/nonexistent/iotgw-app.pem` cannot be read"),
        "{err}"
    );
}

/// Runs msal's `script` (with `env` besides the client id, authority, scope and the CA)
/// and then our sink against `fake`, each fetching one token: msal's result and the two
/// token requests, msal's first.
async fn msal_then_ours(
    python: &std::path::Path,
    script: &str,
    env: &[(&str, String)],
    pki: &iotgw_testkit::pki::Pki,
    fake: &Fake,
    cfg: &DataverseSinkConfig,
) -> (Value, Seen, Seen) {
    let mut command = tokio::process::Command::new(python);
    command
        .args(["-c", script])
        .env("REQUESTS_CA_BUNDLE", pki.ca_path())
        .env("DV_CLIENT_ID", &cfg.client_id)
        .env("DV_AUTHORITY", format!("{}/{TENANT}", fake.base))
        .env("DV_SCOPE", cfg.oauth_scope())
        .kill_on_drop(true);
    for (k, v) in env {
        command.env(k, v);
    }
    let out = command.output();
    let out = tokio::time::timeout(Duration::from_secs(60), out)
        .await
        .expect("msal finishes within 60 s")
        .expect("msal ran");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let result: Value = stdout
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str(l).ok())
        .unwrap_or_else(|| {
            panic!(
                "no result from msal; stdout:\n{stdout}\nstderr:\n{}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    assert_eq!(result["access_token"], "token-1", "{result}");
    let msal_request = fake.token_requests().pop().expect("msal's token request");

    let client = reqwest::Client::builder()
        .add_root_certificate(
            reqwest::Certificate::from_pem(pki.ca_pem.as_bytes()).expect("CA PEM"),
        )
        .timeout(Duration::from_secs(5))
        .build()
        .expect("client");
    let sink = DataverseSink::with_client("d365", cfg, client).expect("sink");
    assert_eq!(
        sink.access_token().await.expect("a token from the fake"),
        "token-2"
    );
    let ours = fake.token_requests().pop().expect("our token request");
    (result, msal_request, ours)
}
