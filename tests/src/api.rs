//! A small client of the gateway's HTTP API.

use serde_json::Value;

/// The API of one gateway.
#[derive(Clone, Debug)]
pub struct Api {
    base: String,
    token: Option<String>,
    client: reqwest::Client,
}

impl Api {
    /// A client of the API at `base` (`http://127.0.0.1:port`), with an optional bearer token.
    pub fn new(base: impl Into<String>, token: Option<String>) -> Self {
        Self {
            base: base.into(),
            token,
            client: reqwest::Client::new(),
        }
    }

    /// Its base URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    async fn send(&self, req: reqwest::RequestBuilder) -> (u16, Value) {
        let req = match &self.token {
            Some(t) => req.bearer_auth(t),
            None => req,
        };
        let resp = req.send().await.expect("API reachable");
        let status = resp.status().as_u16();
        let text = resp.text().await.expect("body");
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    /// GET.
    pub async fn get(&self, path: &str) -> (u16, Value) {
        self.send(self.client.get(format!("{}{path}", self.base)))
            .await
    }

    /// POST JSON.
    pub async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        self.send(self.client.post(format!("{}{path}", self.base)).json(&body))
            .await
    }

    /// DELETE.
    pub async fn delete(&self, path: &str) -> (u16, Value) {
        self.send(self.client.delete(format!("{}{path}", self.base)))
            .await
    }

    /// Registers a device, asserting success.
    pub async fn register(&self, id: &str) -> Value {
        let (s, b) = self
            .post("/api/v1/devices", serde_json::json!({"msdyn_deviceid": id}))
            .await;
        assert_eq!(s, 201, "registering {id}: {b}");
        b
    }

    /// The items of a list endpoint (`{"items": [...]}`), empty on any other answer.
    pub async fn items(&self, path: &str) -> Vec<Value> {
        self.get(path).await.1["items"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// The metrics text.
    pub async fn metrics(&self) -> String {
        match self.get("/metrics").await.1 {
            Value::String(s) => s,
            other => panic!("metrics: {other}"),
        }
    }
}

/// Sum of the samples of `name` whose label set contains every filter.
pub fn metric(text: &str, name: &str, filters: &[&str]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.split(['{', ' ']).next() == Some(name))
        .filter(|l| filters.iter().all(|f| l.contains(f)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
