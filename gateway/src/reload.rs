//! Configuration hot reload: on SIGHUP and when the config file changes, the file is read
//! again (with the same `IOTGW_*` layering as at start-up), checked whole, and applied
//! without a restart and without dropping an event in flight.
//!
//! - Rules, routing (rules, fallbacks, default), sinks (added, changed, removed), the
//!   pipeline's unknown-device policy and debounce settings, `[commands]` and the health
//!   policy's failover settings are applied: a new [`Live`] is swapped in whole. The
//!   pipeline takes the live version per batch, so events already prepared commit with the
//!   rules they were evaluated with and every later one with the new rules; nothing is
//!   stopped or re-read, so nothing in flight is lost.
//! - A new sink's worker starts before the swap (its first alerts find it running); a
//!   removed sink's worker stops after its current round, its undelivered items staying
//!   in the outbox.
//! - An added provider instance is built before the swap (a failure refuses the reload)
//!   and started after it; a removed one leaves the live state first (nothing new is
//!   routed or sent through it), then drains and stops ([`crate::instances`]).
//! - A file that does not load or validate, or that changes what only a restart can
//!   ([`crate::live::needs_restart`]), is refused whole: the old configuration keeps
//!   running, every problem is logged with its key path and fix, and
//!   `iotgw_config_reloads_total{outcome="refused"}` counts it.
//! - `GET /api/v1/config/version` shows the live version, when it was loaded, and the last
//!   reload's outcome and problems.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use iotgw_config::{Config, LoadOptions};
use serde::Serialize;
use tokio::sync::{mpsc, Mutex};
use tokio_util::sync::CancellationToken;

use crate::core::Core;
use crate::instances::Instances;
use crate::live::{needs_restart, Live};
use crate::sinks::{self, OutboxWorkers};

/// How long the watcher waits for a burst of file events (an editor's write, rename and
/// chmod) to settle before reloading once.
const SETTLE: Duration = Duration::from_millis(200);

/// The last reload, as `GET /api/v1/config/version` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct LastReload {
    /// When it ran.
    pub at: DateTime<Utc>,
    /// What started it: `SIGHUP` or `file changed`.
    pub trigger: String,
    /// `applied`, `unchanged` or `refused`.
    pub outcome: &'static str,
    /// Why it was refused: key path, problem and fix per line.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub problems: Vec<String>,
}

/// Reloads the configuration from its file.
pub struct Reloader {
    core: Arc<Core>,
    file: Option<PathBuf>,
    outbox: Arc<Mutex<OutboxWorkers>>,
    instances: Arc<Instances>,
    last: std::sync::Mutex<Option<LastReload>>,
    /// One reload at a time.
    running: Mutex<()>,
}

impl std::fmt::Debug for Reloader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reloader")
            .field("file", &self.file)
            .finish()
    }
}

impl Reloader {
    /// A reloader of `file` (None: the embedded default, nothing to reload).
    pub fn new(
        core: Arc<Core>,
        file: Option<PathBuf>,
        outbox: Arc<Mutex<OutboxWorkers>>,
        instances: Arc<Instances>,
    ) -> Self {
        Self {
            core,
            file,
            outbox,
            instances,
            last: std::sync::Mutex::new(None),
            running: Mutex::new(()),
        }
    }

    /// What `GET /api/v1/config/version` answers.
    pub fn version(&self) -> serde_json::Value {
        let live = self.core.live();
        let last = self
            .last
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        serde_json::json!({
            "version": live.version,
            "loaded_at": live.loaded_at,
            "file": self.file,
            "reloads": if self.file.is_some() { "on SIGHUP and when the file changes" } else { "off: no config file (embedded default)" },
            "last_reload": last,
        })
    }

    /// Reads the file again and applies it, or refuses it whole; returns the outcome.
    pub async fn reload(&self, trigger: &str) -> LastReload {
        let _one = self.running.lock().await;
        let (outcome, problems) = match &self.file {
            None => ("refused", vec!["no config file: the embedded default has nothing to reload (run with --config FILE)".to_owned()]),
            Some(file) => match self.apply(file).await {
                Ok(true) => ("applied", Vec::new()),
                Ok(false) => ("unchanged", Vec::new()),
                Err(problems) => ("refused", problems),
            },
        };
        self.core.metrics.config_reload(outcome);
        let record = LastReload {
            at: Utc::now(),
            trigger: trigger.to_owned(),
            outcome,
            problems,
        };
        match outcome {
            "refused" => {
                tracing::error!(
                    trigger,
                    problems = record.problems.len(),
                    "configuration reload refused; the running configuration stays"
                );
                for p in &record.problems {
                    tracing::error!("  {p}");
                }
            }
            "unchanged" => tracing::debug!(trigger, "configuration reload: nothing changed"),
            _ => {}
        }
        *self
            .last
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(record.clone());
        record
    }

    /// Ok(true): a new version is live; Ok(false): the file means what is live already.
    async fn apply(&self, file: &Path) -> Result<bool, Vec<String>> {
        let new = iotgw_config::load(&LoadOptions {
            file: Some(file.to_owned()),
            env: true,
            built_kinds: crate::app::built_kinds(),
        })
        .map_err(|e| {
            e.problems
                .iter()
                .map(|p| format!("{}: {} (fix: {})", p.path, p.message, p.fix))
                .collect::<Vec<_>>()
        })?;
        let live = self.core.live();
        let old = &live.config;
        if **old == new {
            return Ok(false);
        }
        let mut refused: Vec<String> = needs_restart(old, &new)
            .into_iter()
            .map(|(key, why)| format!("{key}: changed, but {why} (fix: restart the gateway to apply it, or change it back)"))
            .collect();
        let removed: Vec<String> = old
            .providers
            .keys()
            .filter(|k| !new.providers.contains_key(*k))
            .cloned()
            .collect();
        let mut providers = live.providers.clone();
        let mut added = Vec::new();
        if refused.is_empty() {
            for (name, cfg) in &new.providers {
                if old.providers.contains_key(name) {
                    continue;
                }
                match self
                    .instances
                    .build(name, &cfg.for_replica(&self.core.replica))
                    .await
                {
                    Ok(p) => {
                        providers.insert(name.clone(), p.clone());
                        added.push((name.clone(), p));
                    }
                    Err(e) => refused.push(format!(
                        "providers.{name}: the new instance cannot be built: {e:#} (fix: correct its settings)"
                    )),
                }
            }
        }
        // Build every changed sink before touching anything, so a sink that cannot be built
        // refuses the reload instead of half-applying it.
        let mut started = Vec::new();
        for (name, cfg) in &new.sinks {
            if old.sinks.get(name) == Some(cfg) {
                continue;
            }
            match sinks::build(name, cfg) {
                Ok(s) => started.push(s),
                Err(e) => refused.push(format!(
                    "sinks.{name}: {e:#} (fix: correct the sink's settings)"
                )),
            }
        }
        if !refused.is_empty() {
            return Err(refused);
        }
        let stopped: Vec<&String> = old
            .sinks
            .keys()
            .filter(|k| !new.sinks.contains_key(*k))
            .collect();
        let changed = changed_sections(old, &new);
        let version = live.version + 1;
        let gone: Vec<(String, Arc<dyn iotgw_providers::Provider>)> = removed
            .iter()
            .filter_map(|name| providers.remove(name).map(|p| (name.clone(), p)))
            .collect();
        let grace = Duration::from_secs(old.shutdown.grace_secs);
        {
            let mut outbox = self.outbox.lock().await;
            for sink in started {
                outbox.start(sink);
            }
            self.core.swap(Live::new(version, Arc::new(new), providers));
            for name in &stopped {
                outbox.stop(name);
            }
        }
        // Items the new sinks must deliver may already be waiting.
        self.core.outbox_wake.notify_waiters();
        for (name, p) in added {
            tracing::info!(provider = %name, "provider instance added");
            self.instances.start(&name, p, &self.core.vitals).await;
        }
        tracing::info!(version, changed = %changed.join(", "), "configuration reloaded");
        for (name, p) in gone {
            self.instances.remove(&name, &p, grace).await;
        }
        Ok(true)
    }

    /// Reloads on SIGHUP and when the file changes, until `stop`.
    pub fn spawn(self: Arc<Self>, stop: CancellationToken) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let (tx, mut changes) = mpsc::unbounded_channel::<()>();
            let _watcher = self.file.as_deref().and_then(|f| watch(f, tx));
            #[cfg(unix)]
            let mut hangup =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
            loop {
                #[cfg(unix)]
                let hup = async {
                    match hangup.as_mut() {
                        Some(h) => {
                            h.recv().await;
                        }
                        None => std::future::pending::<()>().await,
                    }
                };
                #[cfg(not(unix))]
                let hup = std::future::pending::<()>();
                let trigger = tokio::select! {
                    () = stop.cancelled() => return,
                    () = hup => "SIGHUP",
                    Some(()) = changes.recv() => {
                        // Let the burst of events of one save settle.
                        tokio::time::sleep(SETTLE).await;
                        while changes.try_recv().is_ok() {}
                        "file changed"
                    }
                };
                self.reload(trigger).await;
            }
        })
    }
}

/// Watches the directory holding `file` (editors replace a file by renaming a new one over
/// it, which a watch on the file itself would not survive) and signals each event that
/// names the file. None (logged) when the platform refuses the watch: SIGHUP still works.
fn watch(file: &Path, tx: mpsc::UnboundedSender<()>) -> Option<notify::RecommendedWatcher> {
    use notify::Watcher;
    let dir = file
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = file.file_name()?.to_owned();
    let mut watcher =
        match notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            if let Ok(ev) = event {
                if ev
                    .paths
                    .iter()
                    .any(|p| p.file_name() == Some(name.as_os_str()))
                {
                    let _ = tx.send(());
                }
            }
        }) {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch the config file; reload with SIGHUP");
                return None;
            }
        };
    if let Err(e) = watcher.watch(dir, notify::RecursiveMode::NonRecursive) {
        tracing::warn!(dir = %dir.display(), error = %e, "cannot watch the config file's directory; reload with SIGHUP");
        return None;
    }
    tracing::info!(file = %file.display(), "watching the config file: changes are applied without a restart (or send SIGHUP)");
    Some(watcher)
}

/// The top-level sections that differ, for the log line.
fn changed_sections(old: &Config, new: &Config) -> Vec<&'static str> {
    let mut out = Vec::new();
    let mut note = |differs: bool, name: &'static str| {
        if differs {
            out.push(name);
        }
    };
    note(old.rules != new.rules, "rules");
    note(old.routing != new.routing, "routing");
    note(old.sinks != new.sinks, "sinks");
    note(old.pipeline != new.pipeline, "pipeline");
    note(old.commands != new.commands, "commands");
    note(old.health != new.health, "health");
    note(old.providers != new.providers, "providers");
    out
}
