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
    body: &'static str,
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
        let reply = s.replies.pop_front().unwrap_or(Reply {
            status: 204,
            headers: vec![
                ("odata-version", "4.0"),
                (BURST_REMAINING_HEADER, "5999"),
                (TIME_REMAINING_HEADER, "1199000"),
            ],
            body: "",
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
            client_secret: Secret::new("s3cr3t~value+with/odd=chars"),
            token_url: Some(format!("{}{TOKEN_PATH}", self.base)),
            scope: Some("https://contoso.crm.dynamics.com/.default".into()),
            device_binding: binding,
            timeout_ms: 5_000,
            backoff_min_ms: 200,
            backoff_max_ms: 30_000,
            entities: iotgw_config::default_entities(),
            coalesce_connection_ms: iotgw_config::default_coalesce_connection(),
        }
    }

    fn sink(&self, binding: DataverseDeviceBinding) -> DataverseSink {
        DataverseSink::new("d365", &self.config(binding)).expect("sink")
    }

    fn reply(&self, status: u16, headers: Vec<(&'static str, &'static str)>, body: &'static str) {
        self.state
            .lock()
            .expect("fake state")
            .replies
            .push_back(Reply {
                status,
                headers,
                body,
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
    assert_eq!(after, Some(Duration::from_secs(1)));
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
        matches!(&err, DeliveryError::Retry { after: Some(a), .. } if *a == Duration::from_secs(7)),
        "{err:?}"
    );
    // 503 holds back nothing else (only 429 is a service protection limit).
    sink.deliver(&item(&alert(None))).await.expect("next one");

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

    let out = tokio::process::Command::new(&python)
        .args(["-c", MSAL_CLIENT_CREDENTIALS])
        .env("REQUESTS_CA_BUNDLE", pki.ca_path())
        .env("DV_CLIENT_ID", &cfg.client_id)
        .env("DV_CLIENT_SECRET", cfg.client_secret.expose())
        .env("DV_AUTHORITY", format!("{}/{TENANT}", fake.base))
        .env("DV_SCOPE", cfg.oauth_scope())
        .kill_on_drop(true)
        .output();
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

    // Our sink, trusting the same CA, against the same fake.
    let client = reqwest::Client::builder()
        .add_root_certificate(
            reqwest::Certificate::from_pem(pki.ca_pem.as_bytes()).expect("CA PEM"),
        )
        .timeout(Duration::from_secs(5))
        .build()
        .expect("client");
    let sink = DataverseSink::with_client("d365", &cfg, client);
    assert_eq!(
        sink.access_token().await.expect("a token from the fake"),
        "token-2"
    );
    let ours = fake.token_requests().pop().expect("our token request");

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
