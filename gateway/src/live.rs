//! The part of the gateway a configuration reload replaces: the configuration itself,
//! the routing table, the compiled rules, the sink names and the provider instances. One
//! [`Live`] is swapped in whole (`Core::swap`), so every operation reads one consistent
//! version: the pipeline takes the live version per batch, an API call per request.
//!
//! What a reload cannot change without a restart (the API address, the store, the replica
//! identity, the embedded broker, the pipeline's queue and batch sizes, a running provider
//! instance's settings) is listed by [`needs_restart`]; a reload that changes any of it is
//! refused whole. Instances may be added and removed.

use std::collections::BTreeMap;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use iotgw_config::Config;
use iotgw_providers::Provider;

use crate::core::GatewayError;
use crate::router::Router;
use crate::rules::RuleSet;

/// One version of the reloadable state.
pub struct Live {
    /// 1 at start-up, one more per applied reload.
    pub version: u64,
    /// When it was loaded.
    pub loaded_at: DateTime<Utc>,
    /// The effective configuration.
    pub config: Arc<Config>,
    /// Routing of new devices.
    pub router: Router,
    /// Compiled alert rules.
    pub rules: RuleSet,
    /// Sink names (one outbox item per sink per alert).
    pub sinks: Vec<String>,
    /// Provider instances by name.
    pub providers: BTreeMap<String, Arc<dyn Provider>>,
}

impl std::fmt::Debug for Live {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Live")
            .field("version", &self.version)
            .field("providers", &self.providers.keys().collect::<Vec<_>>())
            .field("sinks", &self.sinks)
            .finish()
    }
}

impl Live {
    /// The provider instance `name`, or a refusal naming the request's `field` and the
    /// instances that are configured.
    pub fn provider(&self, field: &str, name: &str) -> Result<Arc<dyn Provider>, GatewayError> {
        self.providers
            .get(name)
            .cloned()
            .ok_or_else(|| GatewayError::Invalid {
                field: field.into(),
                message: format!(
                    "provider instance `{name}` is not configured; configured: {}",
                    self.providers
                        .keys()
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            })
    }

    /// The state `config` describes, with these provider instances.
    pub fn new(
        version: u64,
        config: Arc<Config>,
        providers: BTreeMap<String, Arc<dyn Provider>>,
    ) -> Self {
        Self {
            version,
            loaded_at: Utc::now(),
            router: Router::new(&config.routing),
            rules: RuleSet::new(&config),
            sinks: config.sinks.keys().cloned().collect(),
            providers,
            config,
        }
    }
}

/// The keys whose change a reload cannot apply, each with why: `(key path, reason)`.
pub fn needs_restart(old: &Config, new: &Config) -> Vec<(String, &'static str)> {
    let mut out = Vec::new();
    let mut check = |changed: bool, key: &str, why: &'static str| {
        if changed {
            out.push((key.to_owned(), why));
        }
    };
    check(
        old.api != new.api,
        "api",
        "the API's address and token are bound at start-up",
    );
    check(
        old.store != new.store,
        "store",
        "the store is opened at start-up",
    );
    check(
        old.replica != new.replica,
        "replica",
        "a replica's identity names its claims and broker sessions",
    );
    check(
        old.embedded_broker != new.embedded_broker,
        "embedded_broker",
        "the in-process broker listens from start-up",
    );
    check(
        old.simulate != new.simulate,
        "simulate",
        "simulated devices start with the gateway",
    );
    check(
        old.shutdown != new.shutdown,
        "shutdown",
        "read when the gateway stops (it is kept as started)",
    );
    check(
        old.pipeline.queue_capacity != new.pipeline.queue_capacity,
        "pipeline.queue_capacity",
        "the event queue is allocated at start-up",
    );
    check(
        old.pipeline.batch_max_events != new.pipeline.batch_max_events
            || old.pipeline.batch_max_wait_ms != new.pipeline.batch_max_wait_ms,
        "pipeline.batch_max_events / batch_max_wait_ms",
        "group commit's limits are set when the pipeline starts",
    );
    check(
        old.health.provider_grace_secs != new.health.provider_grace_secs,
        "health.provider_grace_secs",
        "the readiness grace is set at start-up",
    );
    for (name, cfg) in &new.providers {
        if let Some(before) = old.providers.get(name) {
            check(
                before != cfg,
                &format!("providers.{name}"),
                "a running instance keeps its settings; remove it in one reload and add it back in the next, or restart",
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_routing_sinks_and_timings_reload_and_bound_settings_need_a_restart() {
        let old = Config::embedded_default();
        let mut new = old.clone();
        new.rules.clear();
        new.sinks.clear();
        new.routing.default = None;
        new.commands.ttl_secs = 60;
        new.health.failover_after_secs = 5;
        new.pipeline.debounce_window_secs = 120;
        assert!(needs_restart(&old, &new).is_empty());
        new.api.listen = "127.0.0.1:9999".into();
        new.pipeline.batch_max_events = 9;
        if let Some(iotgw_config::ProviderConfig::Mqtt(m)) = new.providers.get_mut("local") {
            m.port = 1;
        }
        let keys: Vec<String> = needs_restart(&old, &new)
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(
            keys,
            vec![
                "api",
                "pipeline.batch_max_events / batch_max_wait_ms",
                "providers.local"
            ]
        );
    }
}
