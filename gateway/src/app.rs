//! Composition: store, embedded broker, providers, pipeline, outbox workers, API and the
//! simulated fleet, started in that order and stopped in reverse with a drain.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use iotgw_config::{Config, PostgresStoreConfig, PostgresTlsMode, ProviderConfig, StoreKind};
use iotgw_providers::{Provider, ProviderEvent};
use iotgw_registry::{PostgresOptions, PostgresStore, SqliteStore, Store, StoreError};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch, Notify};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::api::starting::{StartingReason, StartingServer};
use crate::api::{self, ApiState};
use crate::core::{Core, RegisterRequest};
use crate::health::Readiness;
use crate::live::Live;
use crate::metrics::Metrics;
use crate::pipeline;
use crate::sinks;

/// Provider kinds compiled into this binary.
pub fn built_kinds() -> Vec<&'static str> {
    let mut k = Vec::new();
    if cfg!(feature = "mqtt") {
        k.push("mqtt");
    }
    if cfg!(feature = "aws_iot_core") {
        k.push("aws_iot_core");
    }
    if cfg!(feature = "gcp_pubsub") {
        k.push("gcp_pubsub");
    }
    if cfg!(feature = "azure_iot_hub") {
        k.push("azure_iot_hub");
    }
    k
}

/// Builds the provider for one configured instance.
pub async fn build_provider(name: &str, cfg: &ProviderConfig) -> anyhow::Result<Arc<dyn Provider>> {
    #[allow(unused_variables)]
    let instance = iotgw_providers::InstanceName::new(name);
    match cfg {
        #[cfg(feature = "mqtt")]
        ProviderConfig::Mqtt(m) => Ok(iotgw_providers::mqtt::build(&instance, m).await?),
        #[cfg(feature = "aws_iot_core")]
        ProviderConfig::AwsIotCore(c) => {
            Ok(iotgw_providers::aws_iot_core::build(&instance, c).await?)
        }
        #[cfg(feature = "gcp_pubsub")]
        ProviderConfig::GcpPubsub(c) => Ok(iotgw_providers::gcp_pubsub::build(&instance, c).await?),
        #[cfg(feature = "azure_iot_hub")]
        ProviderConfig::AzureIotHub(c) => {
            Ok(iotgw_providers::azure_iot_hub::build(&instance, c).await?)
        }
        #[allow(unreachable_patterns)]
        other => anyhow::bail!(
            "provider `{name}`: kind `{}` is not built in this binary",
            other.kind()
        ),
    }
}

/// Options that are not part of the config file.
#[derive(Debug, Default)]
pub struct StartOptions {
    /// A listener for the API (tests pass one bound to port 0); None binds `api.listen`.
    pub api_listener: Option<TcpListener>,
    /// The config file the configuration came from: reloaded on SIGHUP and when it
    /// changes. None (the embedded default, or a config built in code): no reloads.
    pub config_file: Option<std::path::PathBuf>,
}

/// A running gateway.
#[derive(Debug)]
pub struct RunningGateway {
    /// Where the API listens.
    pub api_addr: SocketAddr,
    /// The shared state.
    pub core: Arc<Core>,
    outbox_stop: CancellationToken,
    api_stop: CancellationToken,
    drain_until: watch::Sender<Option<tokio::time::Instant>>,
    instances: Arc<crate::instances::Instances>,
    pipeline: pipeline::Pipeline,
    outbox: Arc<tokio::sync::Mutex<sinks::OutboxWorkers>>,
    /// Config hot reload (SIGHUP, file changes).
    pub reloader: Arc<crate::reload::Reloader>,
    reload_task: (CancellationToken, JoinHandle<()>),
    api_task: JoinHandle<()>,
    fleet: Option<(CancellationToken, JoinHandle<()>)>,
    /// The command sweeper (resends and expires waiting commands).
    commands: (CancellationToken, JoinHandle<()>),
    /// Retention (deletes what `[retention]` no longer keeps).
    retention: (CancellationToken, JoinHandle<()>),
    /// The embedded broker and the provider instances on it (the ones to drain).
    broker: Option<(crate::broker::EmbeddedBroker, Vec<String>)>,
}

/// Opens the configured store (`store.kind`); `reason` tells `/ready` what it waits for.
pub async fn open_store(cfg: &Config, reason: &StartingReason) -> anyhow::Result<Arc<dyn Store>> {
    match (cfg.store.kind, &cfg.store.postgres) {
        (StoreKind::Postgres, Some(pg)) => open_postgres(pg, reason).await,
        (StoreKind::Postgres, None) => anyhow::bail!(
            "store.kind is `postgres` but [store.postgres] is missing: set store.postgres.url \
             (or IOTGW_STORE__POSTGRES__URL)"
        ),
        (StoreKind::Sqlite, _) => {
            let path = Path::new(&cfg.store.path);
            let durability = match cfg.store.sqlite_synchronous {
                iotgw_config::SqliteSynchronous::Full => iotgw_registry::SqliteDurability::Full,
                iotgw_config::SqliteSynchronous::Normal => iotgw_registry::SqliteDurability::Normal,
            };
            let store = SqliteStore::open_with(path, durability)
                .await
                .with_context(|| {
                    format!(
                        "opening the SQLite store at {} (store.path)",
                        path.display()
                    )
                })?;
            tracing::info!(path = %path.display(), "store open (SQLite, WAL)");
            Ok(Arc::new(store))
        }
    }
}

/// What the store needs from `[store.postgres]`.
pub fn postgres_options(pg: &PostgresStoreConfig) -> PostgresOptions {
    use iotgw_registry::postgres::PgSslMode;
    let mut o = PostgresOptions::new(pg.url.expose());
    o.password = pg.password.as_ref().map(|p| p.expose().to_owned());
    o.pool_size = pg.pool_size;
    o.statement_timeout = Duration::from_millis(pg.statement_timeout_ms);
    o.connect_timeout = Duration::from_secs(pg.connect_timeout_secs);
    o.tls = Some(match pg.tls_mode {
        PostgresTlsMode::Disable => PgSslMode::Disable,
        PostgresTlsMode::Prefer => PgSslMode::Prefer,
        PostgresTlsMode::Require => PgSslMode::Require,
        PostgresTlsMode::VerifyCa => PgSslMode::VerifyCa,
        PostgresTlsMode::VerifyFull => PgSslMode::VerifyFull,
    });
    o
}

/// Longest pause between two attempts to reach PostgreSQL at start.
const POSTGRES_RETRY_MAX: Duration = Duration::from_secs(30);

/// Connects to PostgreSQL (and migrates), retrying with backoff while it does not answer:
/// the gateway is not ready meanwhile (`/ready` answers 503 with the reason, `/live` 200),
/// and each attempt logs the URL without its password. A refusal that waiting cannot fix
/// (a wrong password, a URL that does not parse) ends the start at once with the reason.
async fn open_postgres(
    pg: &PostgresStoreConfig,
    reason: &StartingReason,
) -> anyhow::Result<Arc<dyn Store>> {
    let options = postgres_options(pg);
    let url = options.display_url();
    reason.set(format!("store: connecting to PostgreSQL at {url}"));
    let mut pause = Duration::from_millis(500);
    let mut attempt = 1_u32;
    loop {
        match PostgresStore::connect(&options).await {
            Ok(store) => {
                tracing::info!(url = %url, pool_size = options.pool_size, attempt, "store open (PostgreSQL)");
                return Ok(Arc::new(store));
            }
            Err(e @ StoreError::Invalid { .. }) => {
                return Err(anyhow::Error::new(e)).with_context(|| {
                    format!("opening the PostgreSQL store at {url} (store.postgres)")
                });
            }
            Err(e) => {
                tracing::warn!(
                    url = %url,
                    attempt,
                    retry_in_ms = pause.as_millis() as u64,
                    error = %e,
                    "the PostgreSQL store does not answer; not ready, trying again (check store.postgres.url and that the database runs)"
                );
                reason.set(format!(
                    "store: PostgreSQL at {url} does not answer (attempt {attempt}, next in {} ms): {e}",
                    pause.as_millis()
                ));
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(POSTGRES_RETRY_MAX);
                attempt += 1;
            }
        }
    }
}

/// Starts every part. Returns once the API listens.
pub async fn start(config: Config, opts: StartOptions) -> anyhow::Result<RunningGateway> {
    let config = Arc::new(config);
    let metrics = Arc::new(Metrics::new());
    metrics.spawn_rate_sampler();
    // The API's port answers from the start: /live 200, /ready 503 with what the gateway
    // waits for (a database that is not up yet), until the real API takes the socket over.
    let listener = match opts.api_listener {
        Some(l) => l,
        None => TcpListener::bind(&config.api.listen)
            .await
            .with_context(|| {
                format!(
                    "the API cannot listen on {} (api.listen): is the port in use?",
                    config.api.listen
                )
            })?,
    };
    let starting_reason = StartingReason::default();
    starting_reason.set("store: opening");
    let starting = StartingServer::start(
        &listener,
        starting_reason.clone(),
        config.api.token.as_ref().map(|t| t.expose().to_owned()),
    )
    .context("serving /live and /ready while starting")?;
    let store = open_store(&config, &starting_reason).await?;
    starting_reason.set("starting the providers, the pipeline and the sinks");

    let mut broker = None;
    if config.embedded_broker.enabled {
        let addr: SocketAddr = format!(
            "{}:{}",
            config.embedded_broker.host, config.embedded_broker.port
        )
        .parse()
        .context("embedded_broker.host/port do not form an address")?;
        let max_packet = config.embedded_max_packet();
        let v311 = match config.embedded_broker.v311_port {
            0 => None,
            port => Some(SocketAddr::new(addr.ip(), port)),
        };
        broker = Some(
            crate::broker::EmbeddedBroker::start(addr, v311, max_packet, metrics.clone()).await?,
        );
    }

    let replica = config.replica.resolved_id();
    tracing::info!(replica = %replica, "replica identity");
    // Providers -> pipeline: the instances hold the channel's sending half.
    let (tx, rx) = mpsc::channel::<ProviderEvent>(config.pipeline.queue_capacity);
    let instances = Arc::new(crate::instances::Instances::new(
        tx,
        store.clone(),
        replica.clone(),
        metrics.clone(),
    ));
    let mut providers: BTreeMap<String, Arc<dyn Provider>> = BTreeMap::new();
    let mut on_embedded = Vec::new();
    for (name, pc) in &config.providers {
        let pc = match on_embedded_broker(pc, &config, broker.as_ref(), name) {
            Some(internal) => {
                on_embedded.push(name.clone());
                internal
            }
            None => pc.for_replica(&replica),
        };
        let provider = build_provider(name, &pc)
            .await
            .with_context(|| format!("starting provider `{name}`"))?;
        instances.attach(name, &provider);
        providers.insert(name.clone(), provider);
    }
    let mut sink_list = Vec::new();
    for (name, sc) in &config.sinks {
        sink_list.push(sinks::build(name, sc).with_context(|| format!("building sink `{name}`"))?);
    }
    let core = Arc::new(Core::new(
        store.clone(),
        metrics.clone(),
        Arc::new(Notify::new()),
        replica.clone(),
        Live::new(1, config.clone(), providers.clone()),
    ));

    for (name, p) in &providers {
        instances.start(name, p.clone(), &core.vitals).await;
    }
    let pipeline = pipeline::spawn(
        core.clone(),
        rx,
        pipeline::Batching::from_config(&config.pipeline),
    );

    // Outbox -> sinks.
    let commands_stop = CancellationToken::new();
    let commands = (
        commands_stop.clone(),
        crate::commands::spawn_sweeper(core.clone(), commands_stop),
    );

    let retention_stop = CancellationToken::new();
    let retention = (
        retention_stop.clone(),
        crate::retention::spawn(core.clone(), retention_stop),
    );

    let outbox_stop = CancellationToken::new();
    let (drain_until, drain_rx) = watch::channel(None);
    let outbox = sinks::spawn_workers(
        store.clone(),
        sink_list,
        core.outbox_wake.clone(),
        metrics.clone(),
        outbox_stop.clone(),
        drain_rx,
        sinks::Leasing {
            holder: replica.clone(),
            lease: Duration::from_secs(config.replica.outbox_lease_secs),
        },
    );

    // API.
    let outbox = Arc::new(tokio::sync::Mutex::new(outbox));
    let reloader = Arc::new(crate::reload::Reloader::new(
        core.clone(),
        opts.config_file.clone(),
        outbox.clone(),
        instances.clone(),
    ));
    let reload_stop = CancellationToken::new();
    let reload_task = (reload_stop.clone(), reloader.clone().spawn(reload_stop));

    starting.stop().await;
    let api_addr = listener.local_addr()?;
    let readiness = Arc::new(Readiness::new(Duration::from_secs(
        config.health.provider_grace_secs,
    )));
    let app = api::router(ApiState {
        core: core.clone(),
        readiness,
        reloader: reloader.clone(),
    });
    let api_stop = CancellationToken::new();
    let stop = api_stop.clone();
    let api_task = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(async move { stop.cancelled().await })
            .await
        {
            tracing::error!(error = %e, "API server failed");
        }
    });
    tracing::info!(addr = %api_addr, auth = config.api.token.is_some(), "HTTP API listening");

    let fleet = start_fleet(&core, &config).await;
    Ok(RunningGateway {
        api_addr,
        core,
        outbox_stop,
        api_stop,
        drain_until,
        instances: instances.clone(),
        pipeline,
        outbox,
        reloader,
        reload_task,
        api_task,
        fleet,
        commands,
        retention,
        broker: broker.map(|b| (b, on_embedded)),
    })
}

/// An mqtt instance that names the embedded broker's MQTT 5 address connects to rumqttd's
/// internal port directly, not through the front door that a graceful stop closes first:
/// the gateway must keep receiving while it drains. `Some` with the rewritten config for
/// such an instance.
fn on_embedded_broker(
    pc: &ProviderConfig,
    config: &Config,
    broker: Option<&crate::broker::EmbeddedBroker>,
    name: &str,
) -> Option<ProviderConfig> {
    match (pc, broker) {
        (ProviderConfig::Mqtt(m), Some(b))
            if m.port == config.embedded_broker.port
                && (m.host == config.embedded_broker.host || m.host == "localhost") =>
        {
            tracing::info!(provider = %name, internal = %b.internal_v5, "mqtt provider on the embedded broker: connecting to its internal port");
            Some(ProviderConfig::Mqtt(iotgw_config::MqttConfig {
                host: b.internal_v5.ip().to_string(),
                port: b.internal_v5.port(),
                ..m.clone()
            }))
        }
        _ => None,
    }
}

async fn start_fleet(
    core: &Arc<Core>,
    config: &Config,
) -> Option<(CancellationToken, JoinHandle<()>)> {
    if config.simulate.devices == 0 {
        return None;
    }
    let instance = config.routing.default.clone()?;
    let Some(ProviderConfig::Mqtt(m)) = config.providers.get(&instance) else {
        tracing::warn!(provider = %instance, "simulated devices need an mqtt default provider; none started");
        return None;
    };
    let ids = crate::simulate::device_ids("sim", config.simulate.devices);
    let reqs = ids
        .iter()
        .map(|id| RegisterRequest {
            msdyn_deviceid: id.clone(),
            msdyn_category: Some("simulated-chiller".into()),
            msdyn_issimulated: true,
            ..Default::default()
        })
        .collect();
    for (id, answer) in ids.iter().zip(core.register_many(reqs).await) {
        match answer {
            Ok(_) => {
                tracing::info!(device = %id, provider = %instance, "simulated device registered")
            }
            Err(crate::core::GatewayError::AlreadyRegistered(_)) => {
                tracing::info!(device = %id, "simulated device already registered")
            }
            Err(e) => tracing::warn!(device = %id, error = %e, "simulated device not registered"),
        }
    }
    let fleet = crate::simulate::FleetConfig {
        host: m.host.clone(),
        port: m.port,
        topics: m.clone(),
        device_ids: ids,
        interval: Duration::from_millis(config.simulate.interval_ms),
        credentials: None,
    };
    let stop = CancellationToken::new();
    let s = stop.clone();
    Some((stop, tokio::spawn(crate::simulate::run_fleet(fleet, s))))
}

impl RunningGateway {
    /// Stops gracefully: simulated devices first; then the embedded broker's front door
    /// closes (no device can have a reading confirmed any more) and every provider drains
    /// what its source already confirmed; then the providers stop, the pipeline commits
    /// what it received, the outbox gets until `grace` to deliver, then the API stops.
    pub async fn stop(mut self, grace: Duration) {
        let deadline = tokio::time::Instant::now() + grace;
        self.core.vitals.stopping();
        if let Some((stop, task)) = self.fleet {
            stop.cancel();
            let _ = task.await;
        }
        let (stop, reloads) = self.reload_task;
        stop.cancel();
        let _ = reloads.await;
        let (stop, retention) = self.retention;
        stop.cancel();
        let _ = tokio::time::timeout_at(deadline, retention).await;
        // Waiting commands stay in the store; the next start sends them.
        let (stop, sweeper) = self.commands;
        stop.cancel();
        let _ = tokio::time::timeout_at(deadline, sweeper).await;
        // Nothing new may be confirmed to a device from here on; then every provider on the
        // embedded broker hands the pipeline what the broker already confirmed. (An external
        // broker or a cloud keeps what was not acked: nothing to drain there.)
        let mut on_embedded = Vec::new();
        if let Some((broker, instances)) = self.broker.as_mut() {
            broker.close_doors().await;
            on_embedded = std::mem::take(instances);
        }
        let live = self.core.live();
        let providers = &live.providers;
        let drains = on_embedded
            .iter()
            .filter_map(|name| providers.get(name).map(|p| (name, p)));
        let drains = drains.map(|(name, p)| async move {
            match tokio::time::timeout_at(deadline, p.drain()).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!(provider = %name, error = %e, "draining failed; what it had not handed over stays with its source"),
                Err(_) => tracing::warn!(provider = %name, "draining did not finish within the shutdown grace"),
            }
        });
        futures::future::join_all(drains).await;
        self.instances.stop_all(deadline).await;
        let _ = tokio::time::timeout_at(deadline, self.pipeline.join()).await;
        let _ = self.drain_until.send(Some(deadline));
        self.outbox_stop.cancel();
        let outbox = {
            let mut workers = self.outbox.lock().await;
            let empty = sinks::OutboxWorkers::empty_like(&workers);
            std::mem::replace(&mut *workers, empty)
        };
        let _ = tokio::time::timeout_at(deadline + Duration::from_millis(100), outbox.join()).await;
        self.api_stop.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(2), self.api_task).await;
        let depth: u64 = self
            .core
            .store
            .outbox_depth()
            .await
            .map(|d| d.iter().map(|(_, n)| n).sum())
            .unwrap_or(0);
        if depth > 0 {
            tracing::warn!(waiting = depth, "stopped with undelivered outbox items; they are kept and delivered on the next start");
        } else {
            tracing::info!("stopped; outbox drained");
        }
    }
}
