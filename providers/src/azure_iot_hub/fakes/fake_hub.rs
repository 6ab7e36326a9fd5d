//! A recording fake of IoT Hub's service HTTPS endpoint (hyper on tokio-rustls).
//!
//! It records every request (method, raw path, raw query, headers, body), checks the SAS
//! token's signature and expiry against the policy key like the hub does (401 otherwise),
//! and answers with the response shapes of the REST reference (api-version 2021-04-12):
//! device identities, twins with `$metadata`/`$version`, direct method results, bulk
//! results, and the hub's error bodies (`{"Message":"ErrorCode:...;...","ExceptionMessage":...}`,
//! `{"errorCode":404103,...}` for an offline device). Faults (429/503 with `Retry-After`)
//! can be queued to test retries.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use base64::Engine as _;
use bytes::Bytes;
use hmac::{Hmac, Mac};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{json, Map, Value};
use sha2::Sha256;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::pki::pki;
use super::{POLICY, POLICY_KEY};

/// One request as the fake saw it.
#[derive(Clone, Debug, PartialEq)]
pub struct Recorded {
    /// HTTP method.
    pub method: String,
    /// The raw (percent-encoded) path.
    pub path: String,
    /// The raw query string.
    pub query: String,
    /// Headers, names in lower case.
    pub headers: BTreeMap<String, String>,
    /// The body.
    pub body: Bytes,
    /// Whether the SAS token verified.
    pub authorized: bool,
}

impl Recorded {
    /// The body as JSON (`Null` when empty).
    pub fn json(&self) -> Value {
        if self.body.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&self.body).expect("a JSON body")
        }
    }
}

/// A fault answered instead of the next request.
#[derive(Clone, Debug)]
pub struct Fault {
    /// Status (429, 503, ...).
    pub status: u16,
    /// `Retry-After` value, if any.
    pub retry_after: Option<String>,
}

/// A twin's tags and desired properties.
/// A direct method call as a connected device receives it.
#[derive(Debug)]
pub struct MethodCall {
    /// `methodName`.
    pub method_name: String,
    /// `payload`.
    pub payload: Value,
    /// The device's answer: its status and payload.
    pub respond: oneshot::Sender<(i64, Value)>,
}

type TwinDocs = (Map<String, Value>, Map<String, Value>);

#[derive(Default)]
struct State {
    records: Vec<Recorded>,
    devices: BTreeMap<String, Value>,
    /// Tags and desired properties per device.
    twins: HashMap<String, TwinDocs>,
    online: HashSet<String>,
    /// Device -> method calls answered 404103 before it comes online.
    online_after: HashMap<String, u32>,
    /// Devices whose direct methods go to a simulated device ([`FakeHub::route_methods`]).
    routes: HashMap<String, mpsc::Sender<MethodCall>>,
    /// Device -> the (status, payload) its direct methods answer with.
    method_answers: HashMap<String, (i64, Value)>,
    reported: HashMap<String, Value>,
    faults: VecDeque<Fault>,
    generation: u64,
}

/// A running fake hub.
pub struct FakeHub {
    /// Where it listens.
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
    stop: CancellationToken,
}

impl Drop for FakeHub {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl FakeHub {
    /// Starts a fake on a free loopback port.
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        let state = Arc::new(Mutex::new(State::default()));
        let stop = CancellationToken::new();
        let acceptor = tokio_rustls::TlsAcceptor::from(pki().server.clone());
        let (st, halt) = (state.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                let tcp = tokio::select! {
                    () = halt.cancelled() => return,
                    r = listener.accept() => match r { Ok((t, _)) => t, Err(_) => continue },
                };
                let (acceptor, st) = (acceptor.clone(), st.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let svc = hyper::service::service_fn(move |req| handle(st.clone(), req));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), svc)
                        .await;
                });
            }
        });
        Self { addr, state, stop }
    }

    /// `127.0.0.1:<port>`, the `HostName` of this fake.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.addr.port())
    }

    /// The service connection string of this fake.
    pub fn connection_string(&self) -> String {
        super::connection_string(&self.host())
    }

    /// Every request so far, then forgets them.
    pub fn take(&self) -> Vec<Recorded> {
        std::mem::take(&mut self.state.lock().expect("lock").records)
    }

    /// Answers the next request with `status` (and `Retry-After`).
    pub fn fail_next(&self, status: u16, retry_after: Option<&str>) {
        self.state.lock().expect("lock").faults.push_back(Fault {
            status,
            retry_after: retry_after.map(str::to_owned),
        });
    }

    /// Marks a device connected (direct methods succeed).
    /// Hands `device`'s direct methods to the returned receiver, as the hub hands them to
    /// a connected device; the call is answered with what the receiver sends back on
    /// [`MethodCall::respond`] (or 504 / 404103 when it does not answer within the call's
    /// `responseTimeoutInSeconds`). Marks the device online.
    pub fn route_methods(&self, device: &str) -> mpsc::Receiver<MethodCall> {
        let (tx, rx) = mpsc::channel(8);
        let mut s = self.state.lock().expect("lock");
        s.online.insert(device.to_owned());
        s.routes.insert(device.to_owned(), tx);
        rx
    }

    /// Marks `device` offline (its direct methods then fail with 404103) and stops routing
    /// its methods.
    pub fn set_offline(&self, device: &str) {
        let mut s = self.state.lock().expect("lock");
        s.online.remove(device);
        s.routes.remove(device);
    }

    pub fn set_online(&self, device: &str) {
        self.state
            .lock()
            .expect("lock")
            .online
            .insert(device.to_owned());
    }

    /// The (online) device answers its direct methods with `status` and `payload`, as a
    /// device SDK's method handler returning that status does.
    pub fn answer_methods(&self, device: &str, status: i64, payload: Value) {
        let mut s = self.state.lock().expect("lock");
        s.online.insert(device.to_owned());
        s.method_answers
            .insert(device.to_owned(), (status, payload));
    }

    /// The device answers `n` method calls with 404103, then comes online.
    pub fn online_after(&self, device: &str, n: u32) {
        self.state
            .lock()
            .expect("lock")
            .online_after
            .insert(device.to_owned(), n);
    }

    /// Sets the device's reported properties.
    pub fn set_reported(&self, device: &str, reported: Value) {
        self.state
            .lock()
            .expect("lock")
            .reported
            .insert(device.to_owned(), reported);
    }

    /// Whether the fake holds the device.
    pub fn has_device(&self, device: &str) -> bool {
        self.state
            .lock()
            .expect("lock")
            .devices
            .contains_key(device)
    }

    /// Forgets every device (between the SDK's and iotgw's runs).
    pub fn reset(&self) {
        let mut s = self.state.lock().expect("lock");
        s.devices.clear();
        s.twins.clear();
        s.records.clear();
    }
}

/// Decodes `%XX` escapes (what is not a valid escape stays as it is).
pub fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 3 <= b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses `SharedAccessSignature sr=..&sig=..&se=..&skn=..` into its fields (raw).
pub fn sas_fields(header: &str) -> Option<BTreeMap<String, String>> {
    let rest = header.strip_prefix("SharedAccessSignature ")?;
    Some(
        rest.split('&')
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect(),
    )
}

/// The resource (`sr` as sent) of a SAS token signed with `key` for the test policy: the
/// signature is the base64 HMAC-SHA256 of `"{sr}\n{se}"`, `skn` names [`POLICY`] and `se`
/// lies in the future. IoT Hub signs with the base64-decoded policy key, Event Hubs with
/// the key's text.
pub fn signed_resource(token: &str, key: &[u8]) -> Option<String> {
    let f = sas_fields(token)?;
    let (sr, sig, se, skn) = (f.get("sr")?, f.get("sig")?, f.get("se")?, f.get("skn")?);
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("hmac key");
    mac.update(format!("{sr}\n{se}").as_bytes());
    let want = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
    let future = se
        .parse::<i64>()
        .is_ok_and(|se| se > chrono::Utc::now().timestamp());
    (skn == POLICY && percent_decode(sig) == want && future).then(|| sr.clone())
}

/// Whether a SAS token verifies with the test policy key the way IoT Hub signs (the
/// base64-decoded key; `sr` URL-encoded as sent).
pub fn sas_valid(header: &str) -> bool {
    let key = base64::engine::general_purpose::STANDARD
        .decode(POLICY_KEY)
        .expect("test key");
    signed_resource(header, &key).is_some()
}

fn reply(status: u16, body: Option<Value>) -> Response<Full<Bytes>> {
    let mut r = Response::builder().status(StatusCode::from_u16(status).expect("status"));
    if body.is_some() {
        r = r.header("content-type", "application/json; charset=utf-8");
    }
    r.body(Full::new(
        body.map(|b| Bytes::from(b.to_string())).unwrap_or_default(),
    ))
    .expect("response")
}

fn hub_error(status: u16, code: &str, message: &str) -> Response<Full<Bytes>> {
    let mut r = reply(
        status,
        Some(json!({
            "Message": format!("ErrorCode:{code};{message}"),
            "ExceptionMessage": "Tracking ID:0000000000000000-G:0-TimeStamp:01/01/2024 00:00:00"
        })),
    );
    r.headers_mut()
        .insert("iothub-errorcode", code.parse().expect("header value"));
    r
}

/// The hub's answer about a device it does not know.
fn not_registered(id: &str) -> Response<Full<Bytes>> {
    hub_error(
        404,
        "DeviceNotFound",
        &format!("Device {id} not registered"),
    )
}

const NEVER: &str = "0001-01-01T00:00:00Z";

fn device_json(s: &mut State, id: &str, body: &Value, etag_seed: u64) -> Value {
    let mut auth = body
        .get("authentication")
        .cloned()
        .unwrap_or(json!({"type": "sas"}));
    if auth.get("type").and_then(Value::as_str) == Some("sas")
        && auth.pointer("/symmetricKey/primaryKey").is_none()
    {
        // The hub generates keys the request left out.
        auth["symmetricKey"] = json!({"primaryKey": base64::engine::general_purpose::STANDARD.encode([7u8; 32]),
                                      "secondaryKey": base64::engine::general_purpose::STANDARD.encode([8u8; 32])});
    }
    auth["x509Thumbprint"] = json!({"primaryThumbprint": null, "secondaryThumbprint": null});
    s.generation += 1;
    json!({
        "deviceId": id,
        "generationId": format!("6380000000000{:05}", s.generation),
        "etag": base64::engine::general_purpose::STANDARD.encode(format!("etag-{etag_seed}")),
        "connectionState": if s.online.contains(id) { "Connected" } else { "Disconnected" },
        "status": body.get("status").cloned().unwrap_or(json!("enabled")),
        "statusReason": body.get("statusReason").cloned().unwrap_or(Value::Null),
        "connectionStateUpdatedTime": NEVER,
        "statusUpdatedTime": NEVER,
        "lastActivityTime": NEVER,
        "cloudToDeviceMessageCount": 0,
        "authentication": auth,
        "capabilities": body.get("capabilities").cloned().unwrap_or(json!({"iotEdge": false})),
    })
}

fn twin_json(s: &State, id: &str) -> Value {
    let device = s.devices.get(id).cloned().unwrap_or(Value::Null);
    let (tags, desired) = s.twins.get(id).cloned().unwrap_or_default();
    let meta = json!({"$lastUpdated": "2024-05-01T12:00:00.0000000Z"});
    let mut desired_v = Value::Object(desired);
    desired_v["$metadata"] = meta.clone();
    desired_v["$version"] = json!(1);
    let mut reported = s.reported.get(id).cloned().unwrap_or(json!({}));
    reported["$metadata"] = meta;
    reported["$version"] = json!(1);
    let connected = s.online.contains(id);
    let mut t = json!({
        "deviceId": id,
        "etag": "AAAAAAAAAAE=",
        "deviceEtag": device.get("etag").cloned().unwrap_or(Value::Null),
        "status": device.get("status").cloned().unwrap_or(json!("enabled")),
        "statusUpdateTime": NEVER,
        "connectionState": if connected { "Connected" } else { "Disconnected" },
        "lastActivityTime": if connected { "2024-05-01T12:00:00.1234567Z" } else { NEVER },
        "cloudToDeviceMessageCount": 0,
        "authenticationType": "sas",
        "x509Thumbprint": {"primaryThumbprint": null, "secondaryThumbprint": null},
        "modelId": "",
        "version": 2,
        "properties": {"desired": desired_v, "reported": reported},
        "capabilities": {"iotEdge": false}
    });
    if !tags.is_empty() {
        t["tags"] = Value::Object(tags);
    }
    t
}

fn merge(into: &mut Map<String, Value>, patch: &Map<String, Value>) {
    for (k, v) in patch {
        if v.is_null() {
            into.remove(k);
        } else {
            into.insert(k.clone(), v.clone());
        }
    }
}

async fn handle(
    state: Arc<Mutex<State>>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let method = req.method().as_str().to_owned();
    let path = req.uri().path().to_owned();
    let query = req.uri().query().unwrap_or_default().to_owned();
    let headers: BTreeMap<String, String> = req
        .headers()
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_ascii_lowercase(),
                v.to_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    match respond(&state, method, path, query, headers, body) {
        Ok(r) => Ok(r),
        // A routed direct method: answered once the simulated device answers.
        Err(later) => Ok(later.await),
    }
}

/// A response still to come (a direct method waiting for the simulated device).
type Later = std::pin::Pin<Box<dyn std::future::Future<Output = Response<Full<Bytes>>> + Send>>;

/// Records the request and answers it, or hands back what will answer it.
fn respond(
    state: &Mutex<State>,
    method: String,
    path: String,
    query: String,
    headers: BTreeMap<String, String>,
    body: Bytes,
) -> Result<Response<Full<Bytes>>, Later> {
    let authorized = headers.get("authorization").is_some_and(|a| sas_valid(a));
    let mut s = state.lock().expect("lock");
    s.records.push(Recorded {
        method: method.clone(),
        path: path.clone(),
        query: query.clone(),
        headers: headers.clone(),
        body: body.clone(),
        authorized,
    });
    if let Some(f) = s.faults.pop_front() {
        let mut r = reply(
            f.status,
            Some(
                json!({"Message": format!("ErrorCode:ThrottlingException;injected {}", f.status), "ExceptionMessage": ""}),
            ),
        );
        if let Some(ra) = f.retry_after {
            r.headers_mut()
                .insert("retry-after", ra.parse().expect("header value"));
        }
        return Ok(r);
    }
    if !authorized {
        return Ok(hub_error(401, "IotHubUnauthorizedAccess", "Unauthorized"));
    }
    if query != "api-version=2021-04-12" {
        return Ok(hub_error(
            400,
            "InvalidProtocolVersion",
            "api-version 2021-04-12 expected",
        ));
    }
    let json_body: Value = if body.is_empty() {
        Value::Null
    } else {
        match serde_json::from_slice(&body) {
            Ok(v) => v,
            Err(_) => return Ok(hub_error(400, "ArgumentInvalid", "the body is not JSON")),
        }
    };
    if let Some(later) = routed_method(&s, &method, &path, &json_body) {
        return Err(later);
    }
    let parts: Vec<String> = path
        .trim_start_matches('/')
        .split('/')
        .map(percent_decode)
        .collect();
    let parts: Vec<&str> = parts.iter().map(String::as_str).collect();
    let if_match = headers.get("if-match").cloned();
    let resp = match (method.as_str(), parts.as_slice()) {
        ("GET", ["statistics", "service"]) => {
            reply(200, Some(json!({"connectedDeviceCount": s.online.len()})))
        }
        ("PUT", ["devices", id]) => {
            let exists = s.devices.contains_key(*id);
            match (&if_match, exists) {
                (None, true) => hub_error(
                    409,
                    "DeviceAlreadyExists",
                    &format!("A device with ID '{id}' is already registered."),
                ),
                (Some(_), false) => not_registered(id),
                (Some(tag), true)
                    if tag != "\"*\""
                        && tag.trim_matches('"')
                            != s.devices[*id]["etag"].as_str().unwrap_or_default() =>
                {
                    hub_error(412, "PreconditionFailed", "etag mismatch")
                }
                _ => {
                    let seed = s.generation + 1;
                    let d = device_json(&mut s, id, &json_body, seed);
                    s.devices.insert((*id).to_owned(), d.clone());
                    reply(200, Some(d))
                }
            }
        }
        ("GET", ["devices", id]) => match s.devices.get(*id) {
            Some(d) => reply(200, Some(d.clone())),
            None => not_registered(id),
        },
        ("DELETE", ["devices", id]) => {
            if s.devices.remove(*id).is_some() {
                s.twins.remove(*id);
                reply(204, None)
            } else {
                not_registered(id)
            }
        }
        ("POST", ["devices"]) => {
            let ops = json_body.as_array().cloned().unwrap_or_default();
            if ops.len() > 100 {
                return Ok(hub_error(
                    400,
                    "TooManyDevices",
                    "at most 100 devices per bulk call",
                ));
            }
            let mut errors = Vec::new();
            for op in ops {
                let id = op["id"].as_str().unwrap_or_default().to_owned();
                if op["importMode"] == "create" && s.devices.contains_key(&id) {
                    errors.push(json!({"deviceId": id, "errorCode": "DeviceAlreadyExists", "errorStatus": format!("A device with ID '{id}' is already registered.")}));
                    continue;
                }
                let seed = s.generation + 1;
                let d = device_json(&mut s, &id, &op, seed);
                s.devices.insert(id, d);
            }
            let ok = errors.is_empty();
            reply(
                if ok { 200 } else { 400 },
                Some(json!({"isSuccessful": ok, "errors": errors, "warnings": []})),
            )
        }
        ("GET", ["twins", id]) => {
            if s.devices.contains_key(*id) {
                reply(200, Some(twin_json(&s, id)))
            } else {
                not_registered(id)
            }
        }
        ("PATCH", ["twins", id]) => {
            if !s.devices.contains_key(*id) {
                not_registered(id)
            } else {
                let entry = s.twins.entry((*id).to_owned()).or_default();
                if let Some(t) = json_body.get("tags").and_then(Value::as_object) {
                    merge(&mut entry.0, t);
                }
                if let Some(d) = json_body
                    .pointer("/properties/desired")
                    .and_then(Value::as_object)
                {
                    merge(&mut entry.1, d);
                }
                reply(200, Some(twin_json(&s, id)))
            }
        }
        ("POST", ["twins", id, "methods"]) => {
            if !s.devices.contains_key(*id) {
                not_registered(id)
            } else {
                if let Some(n) = s.online_after.get_mut(*id) {
                    if *n == 0 {
                        s.online.insert((*id).to_owned());
                    } else {
                        *n -= 1;
                    }
                }
                if let Some((status, payload)) =
                    s.method_answers.get(*id).filter(|_| s.online.contains(*id))
                {
                    reply(200, Some(json!({"status": status, "payload": payload})))
                } else if s.online.contains(*id) {
                    reply(
                        200,
                        Some(
                            json!({"status": 200, "payload": {"received": json_body.get("payload").cloned().unwrap_or(Value::Null), "method": json_body.get("methodName").cloned().unwrap_or(Value::Null)}}),
                        ),
                    )
                } else {
                    let mut r = reply(
                        404,
                        Some(
                            json!({"errorCode": 404103, "trackingId": "t-0", "message": "Timed out waiting for device to connect.", "info": {"timeout": "00:00:00"}, "timestampUtc": "2024-05-01T12:00:00.0000000Z"}),
                        ),
                    );
                    r.headers_mut().insert(
                        "iothub-errorcode",
                        "DeviceNotOnline".parse().expect("header"),
                    );
                    r
                }
            }
        }
        _ => hub_error(404, "NotFound", &format!("no route {method} {path}")),
    };
    Ok(resp)
}

/// A direct method to a device whose methods are routed to a simulated device: the future
/// hands the call over and answers with the device's status and payload (the lock is not
/// held while it waits).
fn routed_method(s: &State, method: &str, path: &str, body: &Value) -> Option<Later> {
    let parts: Vec<String> = path
        .trim_start_matches('/')
        .split('/')
        .map(percent_decode)
        .collect();
    let [twins, id, methods] = parts.as_slice() else {
        return None;
    };
    if method != "POST"
        || twins != "twins"
        || methods != "methods"
        || !s.online.contains(id)
        || !s.devices.contains_key(id)
    {
        return None;
    }
    let route = s.routes.get(id)?.clone();
    let timeout = body
        .get("responseTimeoutInSeconds")
        .and_then(Value::as_u64)
        .unwrap_or(30);
    let call = body.clone();
    Some(Box::pin(async move {
        let (respond, answer) = oneshot::channel();
        let sent = route
            .send(MethodCall {
                method_name: call["methodName"].as_str().unwrap_or_default().to_owned(),
                payload: call.get("payload").cloned().unwrap_or(Value::Null),
                respond,
            })
            .await;
        let answer = match sent {
            Ok(()) => tokio::time::timeout(std::time::Duration::from_secs(timeout), answer)
                .await
                .ok()
                .and_then(Result::ok),
            Err(_) => None,
        };
        match answer {
            Some((status, payload)) => {
                reply(200, Some(json!({"status": status, "payload": payload})))
            }
            None => reply(
                504,
                Some(
                    json!({"errorCode": 504101, "trackingId": "t-0", "message": "Timed out waiting for the response from device.", "info": {}, "timestampUtc": "2024-05-01T12:00:00.0000000Z"}),
                ),
            ),
        }
    }))
}
