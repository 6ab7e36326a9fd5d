//! Process-level faults through the real binary: `iotgw` processes on Mosquitto (Docker),
//! real MQTT 3.1.1 devices publishing, a webhook receiver.
//!
//! - Scale-out: `kill -9` of one of three replicas on PostgreSQL mid-stream loses nothing
//!   and doubles nothing: every alerting reading becomes exactly one alert, debounce still
//!   makes one primary per device, the webhook receives every alert, and the surviving
//!   replicas deliver the outbox items the dead one had leased once its lease runs out,
//!   while it is still dead.
//! - PostgreSQL restarting mid-stream loses nothing: commits fail, the readings stay
//!   unacknowledged at the broker, and are committed once the database is back.
//! - Chaos: one gateway on SQLite, 100,000 readings from 1,000 devices, `kill -9`ed three
//!   times at random points and the webhook receiver down for 60 s: nothing lost, nothing
//!   doubled, every alert delivered, the time to recover after each kill printed.
//! - A full disk: the store's volume fills up, telemetry stays unacknowledged, `/ready`
//!   names the cause, and once space is freed everything is committed.
#![allow(
    clippy::disallowed_methods,
    reason = "test code: plain-HTTP clients against local processes and containers"
)]

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use iotgw_testkit::mosquitto::{Mosquitto, MosquittoSpec};
use iotgw_testkit::postgres::Postgres;
use iotgw_testkit::wait_for;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use sqlx::postgres::PgPoolOptions;
use sqlx::{PgPool, Row};

/// The outbox lease of the replicas under test: short, so the takeover is quick to see.
const LEASE_SECS: u64 = 4;

/// Where configs and logs go: a temp dir, removed at the end unless
/// `REPLICAS_TEST_KEEP=1` (its path is printed), to read the replicas' whole logs.
struct TestDir {
    path: PathBuf,
    _removed_on_drop: Option<tempfile::TempDir>,
}

impl TestDir {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        if std::env::var("REPLICAS_TEST_KEEP").is_ok_and(|v| v == "1") {
            let path = dir.keep();
            eprintln!("keeping {}", path.display());
            return Self {
                path,
                _removed_on_drop: None,
            };
        }
        Self {
            path: dir.path().to_owned(),
            _removed_on_drop: Some(dir),
        }
    }

    fn path(&self) -> &Path {
        &self.path
    }
}

/// The `[store]` section of replicas on PostgreSQL at `db_url`.
fn postgres_store(db_url: &str) -> String {
    format!(
        r#"
[store]
kind = "postgres"
[store.postgres]
url = "{db_url}"
pool_size = 6
"#
    )
}

/// The `[store]` section of the embedded default: SQLite at `path`.
fn sqlite_store(path: &Path) -> String {
    format!("\n[store]\npath = \"{}\"\n", path.display())
}

/// The one config every gateway of a test runs (each replica gets its own id and API port
/// from the environment, as a StatefulSet's pods do), on `store`, with a webhook sink at
/// `hook_port` if given.
fn write_config(dir: &Path, store: &str, mqtt_port: u16, hook_port: Option<u16>) -> PathBuf {
    let path = dir.join("gateway.toml");
    let sink = hook_port.map_or_else(String::new, |hook_port| {
        format!(
            r#"
[sinks.hook]
kind = "webhook"
url = "http://127.0.0.1:{hook_port}/alerts"
timeout_ms = 5000
backoff_min_ms = 100
backoff_max_ms = 1000
"#
        )
    });
    std::fs::write(
        &path,
        format!(
            r#"{store}
[pipeline]
unknown_devices = "auto_register"
debounce_window_secs = 3600
[providers.plant]
kind = "mqtt"
host = "127.0.0.1"
port = {mqtt_port}
client_id = "iotgw"
shared_group = "iotgw"
[routing]
default = "plant"
[rules.hot]
pointer = "/temperature"
op = "gt"
value = 75
description = "hot on {{device_id}}"
[rules.hot.command]
name = "cool_down"
parameters = {{ target_celsius = 60 }}
{sink}
[readings]
enabled = true
[replica]
outbox_lease_secs = {LEASE_SECS}
[shutdown]
grace_secs = 10
"#
        ),
    )
    .expect("config written");
    path
}

/// One gateway process.
struct Replica {
    id: String,
    child: Option<Child>,
    api: String,
    log: PathBuf,
}

impl Replica {
    async fn start(id: &str, config: &Path, dir: &Path) -> Self {
        Self::start_in(id, config, dir, Command::new(env!("CARGO_BIN_EXE_iotgw"))).await
    }

    /// Starts `iotgw run` as `command` (the binary itself, or a wrapper that execs it).
    async fn start_in(id: &str, config: &Path, dir: &Path, mut command: Command) -> Self {
        let port = iotgw_testkit::free_port();
        let log = dir.join(format!("{id}-{port}.log"));
        let child = command
            .args(["run", "--config"])
            .arg(config)
            .env("IOTGW_REPLICA__ID", id)
            .env("IOTGW_API__LISTEN", format!("127.0.0.1:{port}"))
            .env(
                "IOTGW_LOG",
                std::env::var("REPLICAS_TEST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("iotgw starts");
        let mut r = Self {
            id: id.to_owned(),
            child: Some(child),
            api: format!("http://127.0.0.1:{port}"),
            log,
        };
        let http = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            if let Ok(resp) = http.get(format!("{}/ready", r.api)).send().await {
                if resp.status() == 200 {
                    return r;
                }
            }
            if let Some(status) = r.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!("{id} exited ({status}) before it was ready\n{}", r.logs());
            }
            assert!(
                Instant::now() < deadline,
                "{id} not ready in 90 s\n{}",
                r.logs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn logs(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        // The last lines, one per kind of message (a failing store repeats itself).
        let mut seen = BTreeSet::new();
        let tail: Vec<&str> = text
            .lines()
            .rev()
            .filter(|l| !l.contains("internal_events: alert "))
            .filter(|l| seen.insert(l.split_once(' ').map_or(*l, |(_, rest)| rest)))
            .take(30)
            .collect();
        format!(
            "--- {} log (last lines) ---\n{}",
            self.id,
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        )
    }

    fn pid(&self) -> u32 {
        self.child
            .as_ref()
            .map(Child::id)
            .expect("a running gateway")
    }

    /// The sum of a counter's series on this gateway's `/metrics` (0 when it has none yet).
    async fn counter(&self, name: &str) -> f64 {
        let Ok(r) = reqwest::get(format!("{}/metrics", self.api)).await else {
            return 0.0;
        };
        r.text()
            .await
            .unwrap_or_default()
            .lines()
            .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
            .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
            .sum()
    }

    /// The tokens of every alert, through the API (duplicates would fail the count).
    async fn alert_tokens(&self) -> BTreeSet<String> {
        let (mut tokens, mut count, mut after) = (BTreeSet::new(), 0, None::<String>);
        loop {
            let url = match &after {
                Some(a) => format!("{}/api/v1/alerts?limit=1000&after={a}", self.api),
                None => format!("{}/api/v1/alerts?limit=1000", self.api),
            };
            let page: serde_json::Value = reqwest::get(url)
                .await
                .expect("alerts")
                .json()
                .await
                .expect("alerts json");
            for a in page["items"].as_array().expect("items") {
                tokens.insert(
                    a["msdyn_alerttoken"]
                        .as_str()
                        .unwrap_or_default()
                        .to_owned(),
                );
                count += 1;
            }
            match page["next"].as_str() {
                Some(n) => after = Some(n.to_owned()),
                None => break,
            }
        }
        assert_eq!(count, tokens.len(), "two alerts with one token");
        tokens
    }

    /// SIGKILL: no drain, no goodbye, leases and the broker session left behind.
    fn kill_9(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().expect("SIGKILL");
            child.wait().expect("reaped");
        }
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.kill_9();
    }
}

/// A webhook receiver that counts each idempotency key (the alert id) it is sent, taking
/// `delay` per request so an outbox backlog builds up (and replicas hold leases). It can be
/// taken down (its port refuses connections) and brought back on the same port.
struct Hook {
    port: u16,
    delay: Duration,
    received: Arc<Mutex<HashMap<String, u32>>>,
    /// Set while down: a request on a connection opened before answers 503 and counts not.
    down: Arc<std::sync::atomic::AtomicBool>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Hook {
    async fn start(delay: Duration) -> Self {
        let mut hook = Self {
            port: 0,
            delay,
            received: Arc::default(),
            down: Arc::default(),
            stop: None,
        };
        hook.serve().await;
        hook
    }

    /// Listens on `self.port` (any free port the first time).
    async fn serve(&mut self) {
        let (seen, delay, down) = (self.received.clone(), self.delay, self.down.clone());
        let app = axum::Router::new().route(
            "/alerts",
            axum::routing::post(move |headers: axum::http::HeaderMap| {
                let (seen, down) = (seen.clone(), down.clone());
                async move {
                    tokio::time::sleep(delay).await;
                    if down.load(std::sync::atomic::Ordering::SeqCst) {
                        return axum::http::StatusCode::SERVICE_UNAVAILABLE;
                    }
                    let Some(key) = headers
                        .get(iotgw::sinks::IDEMPOTENCY_HEADER)
                        .and_then(|v| v.to_str().ok())
                    else {
                        return axum::http::StatusCode::BAD_REQUEST;
                    };
                    *seen
                        .lock()
                        .expect("hook lock")
                        .entry(key.to_owned())
                        .or_default() += 1;
                    axum::http::StatusCode::OK
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", self.port))
            .await
            .expect("hook listens");
        self.port = listener.local_addr().expect("addr").port();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        self.stop = Some(stop);
        self.down.store(false, std::sync::atomic::Ordering::SeqCst);
        tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = stopped.await;
                })
                .await
        });
    }

    /// Down: the port refuses new connections (open ones get 503 until they close).
    fn take_down(&mut self) {
        self.down.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }

    /// Back on the same port.
    async fn bring_back(&mut self) {
        self.serve().await;
    }

    fn distinct(&self) -> usize {
        self.received.lock().expect("hook lock").len()
    }

    fn keys(&self) -> BTreeSet<String> {
        self.received
            .lock()
            .expect("hook lock")
            .keys()
            .cloned()
            .collect()
    }
}

/// Whether reading `round` of device `d` is hot (alerts): one in ten, spread over the
/// devices so every stretch of the stream holds some.
fn hot(d: usize, round: usize) -> bool {
    (d + round).is_multiple_of(10)
}

/// Publishes readings `rounds` of each of `devices` devices (`dev-0000`...) over
/// `connections` MQTT 3.1.1 connections, QoS 1, at most `per_sec` readings a second in all
/// (0: as fast as the broker takes them); one in ten is hot ([`hot`]). Counts the broker's
/// PUBACKs in `acked` as they come, and returns their number.
async fn publish_paced(
    port: u16,
    devices: usize,
    rounds: std::ops::Range<usize>,
    connections: usize,
    per_sec: u64,
    progress: Arc<std::sync::atomic::AtomicUsize>,
) -> usize {
    let mut tasks = Vec::new();
    for c in 0..connections {
        let mine: Vec<usize> = (0..devices).filter(|d| d % connections == c).collect();
        let total = mine.len() * rounds.len();
        let rounds = rounds.clone();
        let mut opts = MqttOptions::new(format!("fleet-{c}"), "127.0.0.1", port);
        opts.set_keep_alive(Duration::from_secs(30))
            .set_inflight(200);
        let (client, mut events) = AsyncClient::new(opts, 256);
        let progress = progress.clone();
        let mine_per_sec = per_sec / connections as u64;
        tasks.push(tokio::spawn(async move {
            let sender = tokio::spawn(async move {
                let started = tokio::time::Instant::now();
                let mut sent = 0u64;
                for round in rounds {
                    for d in &mine {
                        if let Some(us) = (sent * 1_000_000).checked_div(mine_per_sec) {
                            tokio::time::sleep_until(started + Duration::from_micros(us)).await;
                        }
                        sent += 1;
                        let temperature = if hot(*d, round) { 90 } else { 20 };
                        // The device's own time: a redelivery after a kill keeps its
                        // reading's key (device, measure, time, message).
                        let now = chrono::Utc::now()
                            .to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
                        let body = format!(
                            r#"{{"message_id":"m-{round}","timestamp":"{now}","temperature":{temperature}}}"#
                        );
                        if client
                            .publish(
                                format!("devices/dev-{d:04}/telemetry"),
                                QoS::AtLeastOnce,
                                false,
                                body,
                            )
                            .await
                            .is_err()
                        {
                            return;
                        }
                    }
                }
            });
            let mut acked = 0;
            while acked < total {
                match tokio::time::timeout(Duration::from_secs(60), events.poll()).await {
                    Ok(Ok(Event::Incoming(Packet::PubAck(_)))) => {
                        acked += 1;
                        progress.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => panic!("publisher fleet-{c}: {e}"),
                    Err(_) => panic!("publisher fleet-{c}: no progress in 60 s ({acked} acked)"),
                }
            }
            sender.abort();
            acked
        }));
    }
    let mut acked = 0;
    for t in tasks {
        acked += t.await.expect("publisher");
    }
    acked
}

/// [`publish_paced`] as fast as the broker takes the readings.
async fn publish(port: u16, devices: usize, rounds: usize, connections: usize) -> usize {
    publish_paced(port, devices, 0..rounds, connections, 0, Arc::default()).await
}

/// A test's own connection to the store the gateways write: PostgreSQL, or the SQLite
/// file (read beside the running gateway, as WAL allows).
#[derive(Clone)]
enum Db {
    Pg(PgPool),
    Lite(sqlx::SqlitePool),
}

impl Db {
    async fn sqlite(path: &Path) -> Self {
        let options = sqlx::sqlite::SqliteConnectOptions::new()
            .filename(path)
            .busy_timeout(Duration::from_secs(10));
        Self::Lite(
            sqlx::sqlite::SqlitePoolOptions::new()
                .max_connections(1)
                .connect_with(options)
                .await
                .unwrap_or_else(|e| panic!("test connection to {}: {e}", path.display())),
        )
    }

    /// One number (SQL both databases speak).
    async fn scalar(&self, sql: &str) -> i64 {
        match self {
            Self::Pg(pool) => scalar(pool, sql).await,
            Self::Lite(pool) => sqlx::query(sql)
                .fetch_one(pool)
                .await
                .unwrap_or_else(|e| panic!("{sql}: {e}"))
                .try_get::<i64, _>(0)
                .expect("a count"),
        }
    }

    /// How many readings of `measure` are stored: SQLite keys them by an integer series
    /// (migration 0012), PostgreSQL by device and measure.
    async fn readings_of(&self, measure: &str) -> i64 {
        match self {
            Self::Pg(_) => {
                self.scalar(&format!(
                    "SELECT count(*) FROM readings WHERE measure = '{measure}'"
                ))
                .await
            }
            Self::Lite(_) => {
                self.scalar(&format!(
                    "SELECT count(*) FROM readings JOIN reading_series AS s \
                     ON s.id = readings.series WHERE s.measure = '{measure}'"
                ))
                .await
            }
        }
    }

    /// The alerts' ids.
    async fn alert_ids(&self) -> BTreeSet<String> {
        const SQL: &str = "SELECT CAST(id AS TEXT) FROM alerts";
        match self {
            Self::Pg(pool) => sqlx::query(SQL)
                .fetch_all(pool)
                .await
                .expect("alert ids")
                .iter()
                .map(|r| r.get::<String, _>(0))
                .collect(),
            Self::Lite(pool) => sqlx::query(SQL)
                .fetch_all(pool)
                .await
                .expect("alert ids")
                .iter()
                .map(|r| r.get::<String, _>(0))
                .collect(),
        }
    }
}

async fn scalar(pool: &PgPool, sql: &str) -> i64 {
    sqlx::query(sql)
        .fetch_one(pool)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .try_get::<i64, _>(0)
        .expect("a count")
}

/// Waits until the store holds `alerts` alerts, the outbox is empty and the hook has
/// seen `alerts` distinct ids.
async fn wait_settled(
    db: &Db,
    hook: &Hook,
    alerts: i64,
    apis: &[String],
    deadline: Duration,
    ctx: impl Fn() -> String,
) {
    let last = Arc::new(Mutex::new((0, 0, String::new())));
    let http = reqwest::Client::new();
    wait_for(
        "every alert committed and delivered",
        deadline,
        || async {
            let stored = db.scalar("SELECT count(*) FROM alerts").await;
            let queued = db.scalar("SELECT count(*) FROM outbox").await;
            let mut metrics = String::new();
            for api in apis {
                if let Ok(r) = http.get(format!("{api}/metrics")).send().await {
                    let text = r.text().await.unwrap_or_default();
                    metrics.extend(
                        text.lines()
                            .filter(|l| l.starts_with("iotgw_events") || l.starts_with("iotgw_in_flight"))
                            .map(|l| format!("{api} {l}\n")),
                    );
                }
            }
            *last.lock().expect("last") = (stored, queued, metrics);
            (stored == alerts && queued == 0 && hook.distinct() as i64 == alerts).then_some(())
        },
        || {
            let (stored, queued, metrics) = last.lock().expect("last").clone();
            format!(
                "{stored} alerts stored of {alerts}, {queued} in the outbox, the hook saw {} distinct\n{metrics}{}",
                hook.distinct(),
                ctx()
            )
        },
    )
    .await;
}

/// What every test here checks at the end: every reading committed once (its reading
/// kept), one alert per hot reading (tokens distinct), one primary per device (debounce
/// across replicas), each alert delivered, nothing dead-lettered.
async fn assert_nothing_lost_or_doubled(db: &Db, hook: &Hook, devices: i64, rounds: i64) {
    // Every reading committed once: each message keeps its /temperature reading, keyed by
    // its message id, so a lost one is missing here and a doubled one is not counted twice.
    assert_eq!(
        db.readings_of("/temperature").await,
        devices * rounds,
        "readings committed"
    );
    let hot = rounds / 10;
    let alerts = db.scalar("SELECT count(*) FROM alerts").await;
    let tokens = db
        .scalar("SELECT count(DISTINCT alert_token) FROM alerts")
        .await;
    assert_eq!(
        (alerts, tokens),
        (devices * hot, devices * hot),
        "alerts, tokens"
    );
    let doubled_primaries = db
        .scalar(
            "SELECT count(*) FROM (SELECT device_id FROM alerts WHERE parent_alert IS NULL \
             GROUP BY device_id HAVING count(*) > 1) d",
        )
        .await;
    assert_eq!(doubled_primaries, 0, "devices with two primary alerts");
    assert_eq!(
        db.scalar("SELECT count(DISTINCT device_id) FROM alerts WHERE parent_alert IS NULL")
            .await,
        devices,
        "one primary per device"
    );
    assert_eq!(
        hook.keys(),
        db.alert_ids().await,
        "the webhook received exactly the stored alerts' ids"
    );
    assert_eq!(db.scalar("SELECT count(*) FROM outbox").await, 0);
    assert_eq!(
        db.scalar("SELECT count(*) FROM dead_letters").await,
        0,
        "dead letters"
    );
}

async fn pool(url: &str) -> PgPool {
    PgPoolOptions::new()
        .max_connections(2)
        .connect(url)
        .await
        .expect("test connection to PostgreSQL")
}

/// Three replicas, 100,000 readings from 1,000 devices (10 % hot), `kill -9` of one of
/// them in the middle while it holds outbox leases. The others deliver its leased items
/// once the lease has run out, with it still dead; restarted under the same id (as a
/// StatefulSet pod is), it takes back the readings the broker queued for its session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "times the outbox takeover to within 5 s of the lease: in the cold clean-clone CI run of 2026-12-07 (parallel load) it took 7.9 s; scripts/test.sh runs it alone after the parallel run (QUIET_INTEGRATION)"]
async fn three_replicas_lose_nothing_when_one_is_killed_mid_stream() {
    if iotgw_testkit::require_docker("the replica kill test").is_err() {
        return;
    }
    const DEVICES: usize = 1000;
    const ROUNDS: usize = 100;
    let dir = TestDir::new();
    let pg = Postgres::dedicated().await.expect("PostgreSQL");
    let url = pg.create_database("replicas_kill").await.expect("database");
    let broker = Mosquitto::dedicated(MosquittoSpec::anonymous())
        .await
        .expect("Mosquitto");
    let hook = Hook::start(Duration::from_millis(5)).await;
    let config = write_config(
        dir.path(),
        &postgres_store(&url),
        broker.port(),
        Some(hook.port),
    );
    let db = pool(&url).await;

    let mut replicas = Vec::new();
    for n in 1..=3 {
        replicas.push(Replica::start(&format!("replica-{n}"), &config, dir.path()).await);
    }
    let logs = |rs: &[Replica]| rs.iter().map(Replica::logs).collect::<Vec<_>>().join("\n");

    let port = broker.port();
    let publisher = tokio::spawn(publish(port, DEVICES, ROUNDS, 4));

    // Mid-stream, at a moment replica-2 holds live outbox leases: kill it.
    let held: BTreeMap<i64, String> = wait_for(
        "replica-2 holding outbox leases after 2,000 alerts",
        Duration::from_secs(240),
        || async {
            if scalar(&db, "SELECT count(*) FROM alerts").await < 2000 {
                return None;
            }
            let rows = sqlx::query(
                "SELECT id, idempotency_key FROM outbox \
                 WHERE lease_holder = 'replica-2' AND leased_until > now()",
            )
            .fetch_all(&db)
            .await
            .ok()?;
            (!rows.is_empty()).then(|| {
                rows.iter()
                    .map(|r| (r.get::<i64, _>(0), r.get::<String, _>(1)))
                    .collect()
            })
        },
        || logs(&replicas),
    )
    .await;
    replicas[1].kill_9();
    let killed_at = Instant::now();
    let ids: Vec<i64> = held.keys().copied().collect();
    // When the last of its leases runs out (it may have finished a few items just before
    // it died; those are gone, and the hook has them).
    let expires_in: f64 = sqlx::query(
        "SELECT coalesce(extract(epoch FROM max(leased_until) - now()), 0)::float8 FROM outbox \
         WHERE id = ANY($1) AND lease_holder = 'replica-2'",
    )
    .bind(&ids)
    .fetch_one(&db)
    .await
    .expect("lease expiry")
    .get(0);

    // The survivors deliver what it held once the lease runs out, while it is still dead.
    wait_for(
        "the dead replica's leased items delivered by the others",
        Duration::from_secs(LEASE_SECS + 30),
        || async {
            let left = sqlx::query("SELECT count(*) FROM outbox WHERE id = ANY($1)")
                .bind(&ids)
                .fetch_one(&db)
                .await
                .ok()?
                .get::<i64, _>(0);
            let hook_keys = hook.keys();
            (left == 0 && held.values().all(|k| hook_keys.contains(k))).then_some(())
        },
        || logs(&replicas),
    )
    .await;
    let took_over = killed_at.elapsed().as_secs_f64();
    eprintln!(
        "{} items leased by the killed replica (leases running out {expires_in:.2} s after the kill) \
         delivered by the others {took_over:.2} s after the kill (lease {LEASE_SECS} s)",
        held.len()
    );
    assert!(
        took_over >= expires_in - 0.2,
        "taken over {took_over:.2} s after the kill, before the lease ran out ({expires_in:.2} s)"
    );
    assert!(
        took_over <= expires_in.max(0.0) + 5.0,
        "taken over {took_over:.2} s after the kill: more than 5 s after the lease ran out ({expires_in:.2} s)"
    );

    // Back under the same id: its broker session (and what was queued for it) is its own.
    replicas[1] = Replica::start("replica-2", &config, dir.path()).await;
    let acked = publisher.await.expect("publisher");
    assert_eq!(acked, DEVICES * ROUNDS, "the broker PUBACKed every reading");
    let db = Db::Pg(db);
    wait_settled(
        &db,
        &hook,
        (DEVICES * ROUNDS / 10) as i64,
        &replicas.iter().map(|r| r.api.clone()).collect::<Vec<_>>(),
        Duration::from_secs(300),
        || logs(&replicas),
    )
    .await;
    assert_nothing_lost_or_doubled(&db, &hook, DEVICES as i64, ROUNDS as i64).await;
    drop(replicas);
    pg.remove().await;
    broker.remove().await;
}

/// One replica, PostgreSQL stopped and started again mid-stream: the readings that could
/// not be committed stay unacknowledged, are redelivered by the broker, and every hot one
/// becomes exactly one alert.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restarting_mid_stream_loses_nothing() {
    if iotgw_testkit::require_docker("the PostgreSQL restart test").is_err() {
        return;
    }
    const DEVICES: usize = 100;
    const ROUNDS: usize = 100;
    let dir = TestDir::new();
    let pg = Postgres::dedicated().await.expect("PostgreSQL");
    let url = pg
        .create_database("replicas_pg_restart")
        .await
        .expect("database");
    let broker = Mosquitto::dedicated(MosquittoSpec::anonymous())
        .await
        .expect("Mosquitto");
    let hook = Hook::start(Duration::ZERO).await;
    let config = write_config(
        dir.path(),
        &postgres_store(&url),
        broker.port(),
        Some(hook.port),
    );
    let replica = Replica::start("replica-1", &config, dir.path()).await;
    let port = broker.port();
    let publisher = tokio::spawn(publish(port, DEVICES, ROUNDS, 2));
    {
        let db = pool(&url).await;
        wait_for(
            "some alerts committed before the restart",
            Duration::from_secs(120),
            || async { (scalar(&db, "SELECT count(*) FROM alerts").await >= 200).then_some(()) },
            || replica.logs(),
        )
        .await;
        db.close().await;
    }
    pg.container().stop(0).await.expect("PostgreSQL stops");
    tokio::time::sleep(Duration::from_secs(3)).await; // the outage itself, not a wait for a condition
    pg.container()
        .start_again()
        .await
        .expect("PostgreSQL starts again");
    pg.wait_ready().await.expect("PostgreSQL ready again");

    let acked = publisher.await.expect("publisher");
    assert_eq!(acked, DEVICES * ROUNDS);
    let db = pool(&url).await;
    let db = Db::Pg(db);
    wait_settled(
        &db,
        &hook,
        (DEVICES * ROUNDS / 10) as i64,
        std::slice::from_ref(&replica.api),
        Duration::from_secs(180),
        || replica.logs(),
    )
    .await;
    assert_nothing_lost_or_doubled(&db, &hook, DEVICES as i64, ROUNDS as i64).await;
    drop(replica);
    pg.remove().await;
    broker.remove().await;
}

/// The chaos run. One gateway on the embedded default's store (SQLite) reads 100,000
/// readings of 1,000 MQTT 3.1.1 devices from Mosquitto (one in ten hot) and sends its
/// alerts to a webhook. The devices publish 1,000 readings a second, so the faults land
/// mid-stream: the gateway is `kill -9`ed three times, at a random point in each third of
/// the stream, and started again at once; the webhook receiver is down for 60 s from the
/// stream's 30,000th reading, across the second kill. At the end every hot reading is
/// exactly one alert, every alert reached the webhook under its own idempotency key (at
/// least once), every one of the 100,000 readings is committed once (its kept reading),
/// nothing is dead-lettered, and the outbox is empty. Each restart's time to
/// be ready and to commit again is printed (BENCHMARKS.md records a run).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_kill_9s_and_a_60_s_webhook_outage_lose_no_reading_and_no_alert() {
    use std::sync::atomic::{AtomicUsize, Ordering};

    if iotgw_testkit::require_docker("the chaos test").is_err() {
        return;
    }
    const DEVICES: usize = 1000;
    const ROUNDS: usize = 100;
    const PER_SEC: u64 = 1000;
    const OUTAGE: Duration = Duration::from_secs(60);
    const OUTAGE_FROM: usize = 30_000;
    let dir = TestDir::new();
    let broker = Mosquitto::dedicated(MosquittoSpec::anonymous())
        .await
        .expect("Mosquitto");
    let mut hook = Hook::start(Duration::ZERO).await;
    let db_path = dir.path().join("iotgw.db");
    let config = write_config(
        dir.path(),
        &sqlite_store(&db_path),
        broker.port(),
        Some(hook.port),
    );
    let mut gateway = Replica::start("gateway", &config, dir.path()).await;
    let db = Db::sqlite(&db_path).await;

    let progress = Arc::new(AtomicUsize::new(0));
    let publisher = tokio::spawn(publish_paced(
        broker.port(),
        DEVICES,
        0..ROUNDS,
        4,
        PER_SEC,
        progress.clone(),
    ));
    let third = DEVICES * ROUNDS / 3;
    let kills: Vec<usize> = (0..3)
        .map(|k| k * third + third / 5 + rand::random::<usize>() % (third * 3 / 5))
        .collect();
    eprintln!("chaos: kill -9 after {kills:?} readings PUBACKed by the broker; webhook down for {OUTAGE:?} from reading {OUTAGE_FROM}");

    let mut outage: Option<Instant> = None;
    let mut outage_over = false;
    let mut recoveries = Vec::new();
    let mut next_kill = 0;
    let deadline = Instant::now() + Duration::from_secs(600);
    while next_kill < kills.len() || !outage_over {
        let published = progress.load(Ordering::Relaxed);
        if outage.is_none() && published >= OUTAGE_FROM {
            hook.take_down();
            outage = Some(Instant::now());
            eprintln!("chaos: webhook down at reading {published}");
        }
        if let Some(since) = outage.filter(|_| !outage_over) {
            if since.elapsed() >= OUTAGE {
                hook.bring_back().await;
                outage_over = true;
                eprintln!(
                    "chaos: webhook back after {:.1} s, at reading {}",
                    since.elapsed().as_secs_f64(),
                    progress.load(Ordering::Relaxed)
                );
            }
        }
        if kills.get(next_kill).is_some_and(|&at| published >= at) {
            let committed = db.scalar("SELECT count(*) FROM alerts").await;
            gateway.kill_9();
            let killed = Instant::now();
            gateway = Replica::start("gateway", &config, dir.path()).await;
            let ready = killed.elapsed();
            wait_for(
                "the restarted gateway committing again",
                Duration::from_secs(120),
                || async {
                    (gateway.counter("iotgw_events_acked_total").await > 0.0).then_some(())
                },
                || gateway.logs(),
            )
            .await;
            let committing = killed.elapsed();
            eprintln!(
                "chaos: kill {} at reading {published} ({committed} alerts committed): ready again {:.2} s after the kill, committing again after {:.2} s",
                next_kill + 1,
                ready.as_secs_f64(),
                committing.as_secs_f64()
            );
            recoveries.push((published, ready, committing));
            next_kill += 1;
        }
        assert!(
            Instant::now() < deadline,
            "the chaos run took more than 600 s: {} readings published, {next_kill} kills\n{}",
            progress.load(Ordering::Relaxed),
            gateway.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await; // the polling period of the fault schedule above
    }

    let acked = publisher.await.expect("publisher");
    assert_eq!(acked, DEVICES * ROUNDS, "the broker PUBACKed every reading");
    let settle = Instant::now();
    wait_settled(
        &db,
        &hook,
        (DEVICES * ROUNDS / 10) as i64,
        std::slice::from_ref(&gateway.api),
        Duration::from_secs(300),
        || gateway.logs(),
    )
    .await;
    eprintln!(
        "chaos: settled {:.1} s after the last reading was published; recoveries (reading, ready, committing): {:?}",
        settle.elapsed().as_secs_f64(),
        recoveries
            .iter()
            .map(|(at, r, c)| format!("{at}: {:.2} s / {:.2} s", r.as_secs_f64(), c.as_secs_f64()))
            .collect::<Vec<_>>()
    );
    assert_nothing_lost_or_doubled(&db, &hook, DEVICES as i64, ROUNDS as i64).await;
    let redelivered = hook
        .received
        .lock()
        .expect("hook lock")
        .values()
        .filter(|&&n| n > 1)
        .count();
    eprintln!(
        "chaos: {redelivered} alerts reached the webhook more than once (same idempotency key)"
    );
    drop(gateway);
    broker.remove().await;
}

/// A full disk. The gateway's store is on a 4 MiB tmpfs of its own (a mount namespace made
/// by `unshare`, so the test needs no privilege and leaves no mount behind), which the test
/// fills up with a file right after the gateway is ready. Readings of 10 devices then arrive,
/// 1,000 at a time (a tenth hot), until the commits fail (the first may still fit in the room
/// SQLite's WAL file kept): the readings stay unacknowledged at the broker, and `/ready`
/// answers 503 naming the full disk. Once the file is removed, every hot reading
/// is committed as exactly one alert, and the gateway is ready again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_leaves_telemetry_unacknowledged_names_the_cause_and_loses_nothing_once_freed()
{
    if iotgw_testkit::require_docker("the disk-full test").is_err() {
        return;
    }
    const DEVICES: usize = 10;
    const ROUNDS: usize = 100;
    const MAX_ROUNDS: usize = 2_000;
    let dir = TestDir::new();
    let store_dir = dir.path().join("store");
    std::fs::create_dir(&store_dir).expect("store dir");
    let broker = Mosquitto::dedicated(MosquittoSpec::anonymous())
        .await
        .expect("Mosquitto");
    let config = write_config(
        dir.path(),
        &sqlite_store(&store_dir.join("iotgw.db")),
        broker.port(),
        None,
    );
    let mut command = Command::new("unshare");
    command
        .args(["--user", "--map-root-user", "--mount", "--", "sh", "-c"])
        .arg(r#"mount -t tmpfs -o size=4m iotgw-store "$0" && exec "$@""#)
        .arg(&store_dir)
        .arg(env!("CARGO_BIN_EXE_iotgw"));
    let gateway = Replica::start_in("gateway", &config, dir.path(), command).await;
    // The gateway's view of the store's directory: its own tmpfs.
    let seen = PathBuf::from(format!("/proc/{}/root", gateway.pid()))
        .join(store_dir.strip_prefix("/").expect("an absolute temp dir"));
    let filler = seen.join("filler");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&filler).expect("filler file on the store's tmpfs");
        let chunk = vec![0u8; 64 * 1024];
        let full = loop {
            if let Err(e) = f.write_all(&chunk).and_then(|()| f.flush()) {
                break e;
            }
        };
        assert_eq!(full.kind(), std::io::ErrorKind::StorageFull, "{full}");
    }
    // Readings arrive 1,000 at a time until the store's commits fail: how many fit before
    // depends on the room left in SQLite's WAL file (it keeps its size after a checkpoint,
    // and a commit that fits in it needs no new disk space), so the test does not guess.
    let http = reqwest::Client::new();
    let full_ready = || async {
        let r = http
            .get(format!("{}/ready", gateway.api))
            .send()
            .await
            .ok()?;
        let status = r.status();
        let body = r.text().await.ok()?;
        (status == 503 && body.contains("disk is full")).then_some(body)
    };
    let mut rounds = 0;
    let why = loop {
        let sent = publish_paced(
            broker.port(),
            DEVICES,
            rounds..rounds + ROUNDS,
            1,
            0,
            Arc::default(),
        )
        .await;
        assert_eq!(sent, DEVICES * ROUNDS, "readings published");
        rounds += ROUNDS;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        let mut why = None;
        while why.is_none() && tokio::time::Instant::now() < deadline {
            why = full_ready().await;
            if why.is_none() {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        if let Some(why) = why {
            break why;
        }
        assert!(
            rounds < MAX_ROUNDS,
            "/ready never answered 503 naming the full disk after {} readings; gateway log:\n{}",
            rounds * DEVICES,
            gateway.logs()
        );
    };
    eprintln!("while full, /ready said: {why}");
    assert!(why.contains("free space"), "what to do: {why}");
    assert_eq!(
        gateway.counter("iotgw_ready").await,
        0.0,
        "a scrape says not ready"
    );
    assert!(
        gateway.counter("iotgw_events_nacked_total").await > 0.0,
        "the readings were left unacknowledged"
    );
    // SQLite resolves /proc/<pid>/root to this namespace's path: read through the API.
    let before = gateway.alert_tokens().await.len();
    assert!(
        before < DEVICES * rounds / 10,
        "{before} alerts committed on a full disk"
    );

    std::fs::remove_file(&filler).expect("space freed");
    let tokens = wait_for(
        "every hot reading committed once space is freed",
        Duration::from_secs(120),
        || async {
            let tokens = gateway.alert_tokens().await;
            (tokens.len() >= DEVICES * rounds / 10).then_some(tokens)
        },
        || gateway.logs(),
    )
    .await;
    let expected: Vec<String> = (0..DEVICES)
        .flat_map(|d| {
            (0..rounds)
                .filter(move |&r| hot(d, r))
                .map(move |r| format!("plant/dev-{d:04}/m-{r}"))
        })
        .collect();
    assert_eq!(
        tokens,
        expected.into_iter().collect::<BTreeSet<_>>(),
        "one alert per hot reading"
    );
    let dead: serde_json::Value = reqwest::get(format!("{}/api/v1/dead-letters", gateway.api))
        .await
        .expect("dead letters")
        .json()
        .await
        .expect("json");
    assert_eq!(dead["items"], serde_json::json!([]), "dead letters");
    wait_for(
        "ready again",
        Duration::from_secs(30),
        || async {
            let r = http
                .get(format!("{}/ready", gateway.api))
                .send()
                .await
                .ok()?;
            (r.status() == 200).then_some(())
        },
        || gateway.logs(),
    )
    .await;
    assert_eq!(
        gateway.counter("iotgw_ready").await,
        1.0,
        "a scrape says ready again"
    );
    drop(gateway);
    broker.remove().await;
}
