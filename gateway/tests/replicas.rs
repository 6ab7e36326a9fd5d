//! Scale-out through the real binary: several `iotgw` replicas on one PostgreSQL and one
//! Mosquitto (both in Docker), real MQTT 3.1.1 devices publishing, a webhook receiver.
//!
//! - `kill -9` of one replica mid-stream loses nothing and doubles nothing: every alerting
//!   reading becomes exactly one alert, debounce still makes one primary per device, the
//!   webhook receives every alert, and the surviving replicas deliver the outbox items the
//!   dead one had leased once its lease runs out, while it is still dead.
//! - PostgreSQL restarting mid-stream loses nothing: commits fail, the readings stay
//!   unacknowledged at the broker, and are committed once the database is back.
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

/// The one config every replica runs (each gets its own id and API port from the
/// environment, as a StatefulSet's pods do).
fn write_config(dir: &Path, db_url: &str, mqtt_port: u16, hook_port: u16) -> PathBuf {
    let path = dir.join("gateway.toml");
    std::fs::write(
        &path,
        format!(
            r#"
[store]
kind = "postgres"
[store.postgres]
url = "{db_url}"
pool_size = 6
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
[sinks.hook]
kind = "webhook"
url = "http://127.0.0.1:{hook_port}/alerts"
timeout_ms = 5000
backoff_min_ms = 100
backoff_max_ms = 1000
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
        let port = iotgw_testkit::free_port();
        let log = dir.join(format!("{id}-{port}.log"));
        let child = Command::new(env!("CARGO_BIN_EXE_iotgw"))
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
/// `delay` per request so an outbox backlog builds up (and replicas hold leases).
struct Hook {
    port: u16,
    received: Arc<Mutex<HashMap<String, u32>>>,
}

impl Hook {
    async fn start(delay: Duration) -> Self {
        let received: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
        let seen = received.clone();
        let app = axum::Router::new().route(
            "/alerts",
            axum::routing::post(move |headers: axum::http::HeaderMap| {
                let seen = seen.clone();
                async move {
                    tokio::time::sleep(delay).await;
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
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("hook listens");
        let port = listener.local_addr().expect("addr").port();
        tokio::spawn(async move { axum::serve(listener, app).await });
        Self { port, received }
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

/// Publishes `rounds` readings from each of `devices` devices (`dev-0000`...) over
/// `connections` MQTT 3.1.1 connections, QoS 1; every tenth round is hot (an alert).
/// Returns how many the broker PUBACKed.
async fn publish(port: u16, devices: usize, rounds: usize, connections: usize) -> usize {
    let mut tasks = Vec::new();
    for c in 0..connections {
        let mine: Vec<usize> = (0..devices).filter(|d| d % connections == c).collect();
        let total = mine.len() * rounds;
        let mut opts = MqttOptions::new(format!("fleet-{c}"), "127.0.0.1", port);
        opts.set_keep_alive(Duration::from_secs(30))
            .set_inflight(200);
        let (client, mut events) = AsyncClient::new(opts, 256);
        tasks.push(tokio::spawn(async move {
            let sender = tokio::spawn(async move {
                for round in 0..rounds {
                    for d in &mine {
                        let temperature = if round % 10 == 0 { 90 } else { 20 };
                        let body =
                            format!(r#"{{"message_id":"m-{round}","temperature":{temperature}}}"#);
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
                    Ok(Ok(Event::Incoming(Packet::PubAck(_)))) => acked += 1,
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
    pool: &PgPool,
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
            let stored = scalar(pool, "SELECT count(*) FROM alerts").await;
            let queued = scalar(pool, "SELECT count(*) FROM outbox").await;
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

/// What every replica test checks at the end: one alert per hot reading (tokens
/// distinct), one primary per device (debounce across replicas), each alert delivered,
/// one command per primary.
async fn assert_nothing_lost_or_doubled(pool: &PgPool, hook: &Hook, devices: i64, hot: i64) {
    let alerts = scalar(pool, "SELECT count(*) FROM alerts").await;
    let tokens = scalar(pool, "SELECT count(DISTINCT alert_token) FROM alerts").await;
    assert_eq!(
        (alerts, tokens),
        (devices * hot, devices * hot),
        "alerts, tokens"
    );
    let doubled_primaries = scalar(
        pool,
        "SELECT count(*) FROM (SELECT device_id FROM alerts WHERE parent_alert IS NULL \
         GROUP BY device_id HAVING count(*) > 1) d",
    )
    .await;
    assert_eq!(doubled_primaries, 0, "devices with two primary alerts");
    assert_eq!(
        scalar(
            pool,
            "SELECT count(DISTINCT device_id) FROM alerts WHERE parent_alert IS NULL"
        )
        .await,
        devices,
        "one primary per device"
    );
    let ids: BTreeSet<String> = sqlx::query("SELECT id::text FROM alerts")
        .fetch_all(pool)
        .await
        .expect("alert ids")
        .iter()
        .map(|r| r.get::<String, _>(0))
        .collect();
    assert_eq!(
        hook.keys(),
        ids,
        "the webhook received exactly the stored alerts' ids"
    );
    assert_eq!(scalar(pool, "SELECT count(*) FROM outbox").await, 0);
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
    let config = write_config(dir.path(), &url, broker.port(), hook.port);
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
    wait_settled(
        &db,
        &hook,
        (DEVICES * ROUNDS / 10) as i64,
        &replicas.iter().map(|r| r.api.clone()).collect::<Vec<_>>(),
        Duration::from_secs(300),
        || logs(&replicas),
    )
    .await;
    assert_nothing_lost_or_doubled(&db, &hook, DEVICES as i64, (ROUNDS / 10) as i64).await;
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
    let config = write_config(dir.path(), &url, broker.port(), hook.port);
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
    wait_settled(
        &db,
        &hook,
        (DEVICES * ROUNDS / 10) as i64,
        std::slice::from_ref(&replica.api),
        Duration::from_secs(180),
        || replica.logs(),
    )
    .await;
    assert_nothing_lost_or_doubled(&db, &hook, DEVICES as i64, (ROUNDS / 10) as i64).await;
    drop(replica);
    pg.remove().await;
    broker.remove().await;
}
