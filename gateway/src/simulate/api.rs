//! What the simulator asks the gateway's HTTP API: registering its devices (and keeping
//! the credentials the provider hands out once) and counting their alerts.

use std::time::Duration;

use serde_json::{json, Value};

/// The gateway's API.
#[derive(Clone, Debug)]
pub struct Api {
    /// Base URL, e.g. `http://127.0.0.1:8080`.
    pub url: String,
    /// Bearer token.
    pub token: Option<String>,
}

/// An HTTP client for the API.
pub fn client() -> Result<reqwest::Client, String> {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .no_proxy()
        .build()
        .map_err(|e| format!("cannot build an HTTP client: {e}"))
}

impl Api {
    fn auth(&self, r: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.token {
            Some(t) => r.bearer_auth(t),
            None => r,
        }
    }

    fn route(&self, path: &str) -> String {
        format!("{}{path}", self.url.trim_end_matches('/'))
    }
}

/// What registering one device gave.
#[derive(Debug)]
pub enum Registered {
    /// Registered now, with the credentials the provider handed out (if any).
    New(Option<Value>),
    /// Registered before (409): its credentials are not shown again.
    Already,
}

/// Why a registration failed.
#[derive(Debug)]
pub enum RegisterError {
    /// The gateway did not answer.
    Unreachable(String),
    /// It answered with an error.
    Refused(String),
}

/// Registers `id` (simulated, category `simulated-chiller`) on `instance` (or where the
/// gateway's routing puts it).
pub async fn register(
    http: &reqwest::Client,
    api: &Api,
    instance: Option<&str>,
    id: &str,
) -> Result<Registered, RegisterError> {
    let mut body = json!({
        "msdyn_deviceid": id,
        "msdyn_name": format!("Simulated chiller {id}"),
        "msdyn_issimulated": true,
        "msdyn_category": "simulated-chiller",
    });
    if let Some(i) = instance {
        body["msdyn_iotproviderinstance"] = json!(i);
    }
    let r = api
        .auth(http.post(api.route("/api/v1/devices")).json(&body))
        .send()
        .await
        .map_err(|e| {
            RegisterError::Unreachable(format!(
                "cannot reach {} ({}); is the gateway running?",
                api.url,
                crate::errors::error_chain(&e)
            ))
        })?;
    let status = r.status();
    let answer: Value = r.json().await.unwrap_or(Value::Null);
    match status.as_u16() {
        200 | 201 => Ok(Registered::New(
            answer.get("credentials").filter(|c| !c.is_null()).cloned(),
        )),
        409 => Ok(Registered::Already),
        401 => Err(RegisterError::Refused(format!(
            "{} refused the token (401): give --token or set api.token in the config",
            api.url
        ))),
        _ => Err(RegisterError::Refused(format!(
            "registering {id}: {status} {}",
            answer["error"]["message"]
                .as_str()
                .unwrap_or(&answer.to_string())
        ))),
    }
}

/// Alerts of the devices `ids`: `(all, children)`; `None` when the API cannot be read.
/// One request per device, 16 at a time.
pub async fn alerts(http: &reqwest::Client, api: &Api, ids: &[String]) -> Option<(u64, u64)> {
    use futures::StreamExt as _;
    let per_device: Vec<Option<(u64, u64)>> = futures::stream::iter(ids)
        .map(|id| device_alerts(http, api, id))
        .buffer_unordered(16)
        .collect()
        .await;
    per_device
        .into_iter()
        .try_fold((0, 0), |(a, c), d| d.map(|(da, dc)| (a + da, c + dc)))
}

async fn device_alerts(http: &reqwest::Client, api: &Api, id: &str) -> Option<(u64, u64)> {
    let r = api
        .auth(
            http.get(api.route("/api/v1/alerts"))
                .query(&[("device_id", id), ("limit", "1000")]),
        )
        .send()
        .await
        .ok()?;
    if !r.status().is_success() {
        return None;
    }
    let body: Value = r.json().await.ok()?;
    let items = body["items"].as_array()?;
    let children = items
        .iter()
        .filter(|a| !a["msdyn_parentalert"].is_null())
        .count();
    Some((items.len() as u64, children as u64))
}
