//! The in-process gateway of one scenario: SQLite in a temp dir, the API on port 0, one
//! provider instance (the fixture's) that every device is routed to, and the rule every
//! scenario relies on.

use std::time::Duration;

use anyhow::Context;
use iotgw::app::{self, RunningGateway, StartOptions};
use iotgw_config::{CompareOp, Config, RuleCommandConfig, RuleConfig};
use serde_json::json;

use super::{FixtureEnv, Names};
use crate::api::Api;
use crate::wait::until;

/// Temperature above which the rule raises an alert (with a `cool_down` command).
pub const ALERT_ABOVE: f64 = 75.0;

/// A running gateway.
pub struct Gateway {
    running: Option<RunningGateway>,
    api: Api,
    _dir: tempfile::TempDir,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway")
            .field("api", &self.api.base())
            .finish()
    }
}

/// The scenario config: the fixture's instance as the routing default, the
/// `high_temperature` rule (above [`ALERT_ABOVE`], priority 70, `cool_down` command), the
/// default 60 s debounce on the rule, no sinks.
pub fn config(env: &dyn FixtureEnv, names: &Names, dir: &std::path::Path) -> Config {
    let mut c = Config::default();
    c.store.path = dir.join("iotgw.db").display().to_string();
    c.providers
        .insert(names.instance().into(), env.provider_config());
    c.routing.default = Some(names.instance().into());
    c.rules.insert(
        "high_temperature".into(),
        RuleConfig {
            pointer: "/temperature".into(),
            op: CompareOp::Gt,
            value: Some(json!(ALERT_ABOVE)),
            alert_type: "Anomaly".into(),
            description: "Temperature {value} on {device_id}".into(),
            priority: Some(70),
            command: Some(RuleCommandConfig {
                name: "cool_down".into(),
                parameters: json!({"target_celsius": 60}),
            }),
        },
    );
    env.adjust_gateway(&mut c);
    c
}

impl Gateway {
    /// Starts the gateway for `env` and waits (30 s) until `/ready` answers 200, i.e. the
    /// store is open and the provider connected.
    pub async fn start(env: &dyn FixtureEnv, names: &Names) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir().context("a temp dir for the store")?;
        let config = config(env, names, dir.path());
        let problems = iotgw_config::validate::validate(&config, &app::built_kinds());
        anyhow::ensure!(
            problems.is_empty(),
            "the fixture's config is invalid: {problems:?}"
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .context("binding the API on loopback")?;
        let running = app::start(
            config,
            StartOptions {
                api_listener: Some(listener),
                ..StartOptions::default()
            },
        )
        .await
        .context("starting the gateway")?;
        let api = Api::new(format!("http://{}", running.api_addr), None);
        let gw = Self {
            running: Some(running),
            api,
            _dir: dir,
        };
        let api = gw.api.clone();
        let ready = until("the gateway to be ready", Duration::from_secs(30), || {
            let api = api.clone();
            async move { (api.get("/ready").await.0 == 200).then_some(()) }
        })
        .await;
        if let Err(e) = ready {
            let (_, report) = gw.api.get("/ready").await;
            anyhow::bail!("{e}: /ready says {report}");
        }
        Ok(gw)
    }

    /// The API client.
    pub fn api(&self) -> &Api {
        &self.api
    }

    /// Stops the gateway (2 s grace).
    pub async fn stop(mut self) {
        if let Some(r) = self.running.take() {
            r.stop(Duration::from_secs(2)).await;
        }
    }
}
