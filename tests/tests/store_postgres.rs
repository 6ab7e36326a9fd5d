//! The registry's store on PostgreSQL 15 (`postgres:15` in testcontainers): every scenario
//! of the registry conformance suite (`registry/src/conformance.rs`, the same scenarios
//! SQLite runs in `cargo test -p iotgw-registry`), each on a database of its own in one
//! shared server, then the races that only a shared database has (two replicas at once).
//!
//! harness = false, like `emulators`: one runtime and one container for the binary. Prints
//! one line per case and ends with `N passed, N failed`. Without Docker: `SKIPPED:`, or a
//! failure under `CI=true`.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use chrono::{TimeZone, Utc};
use iotgw_registry::{
    AlertFilter, AlertType, Arrival, BatchWrite, DeviceId, IfUnknown, NewAlert, NewDeadLetter,
    PageRequest, PostgresOptions, PostgresStore, Store, TelemetryCommit,
};
use iotgw_testkit::postgres::{Postgres, PASSWORD};
use iotgw_testkit::DockerStatus;
use iotgw_tests::runner::{run_case, runtime, summary_line};
use tokio::sync::Semaphore;

const LIMIT: Duration = Duration::from_secs(180);
/// Cases running at once (the machine may have 2 cores; the server allows 200 connections).
const PARALLEL: usize = 4;

type CaseFuture = std::pin::Pin<Box<dyn std::future::Future<Output = anyhow::Result<()>> + Send>>;

/// A case that is not a conformance scenario.
type Race = fn() -> CaseFuture;

enum Case {
    Scenario(iotgw_registry::conformance::Scenario),
    Race(Race),
}

fn races() -> Vec<(&'static str, Race)> {
    vec![
        (
            "two_replicas_committing_alerts_of_one_device_at_once_make_one_primary",
            || Box::pin(two_replicas_committing_alerts_of_one_device_at_once_make_one_primary()),
        ),
        ("three_replicas_starting_together_migrate_once", || {
            Box::pin(three_replicas_starting_together_migrate_once())
        }),
        ("two_replicas_never_claim_the_same_outbox_item", || {
            Box::pin(two_replicas_never_claim_the_same_outbox_item())
        }),
        (
            "a_wrong_password_is_a_clear_error_that_never_shows_the_secret",
            || Box::pin(a_wrong_password_is_a_clear_error_that_never_shows_the_secret()),
        ),
        (
            "a_gateway_waits_for_postgres_and_becomes_ready_when_it_answers",
            || Box::pin(a_gateway_waits_for_postgres_and_becomes_ready_when_it_answers()),
        ),
    ]
}

fn main() -> ExitCode {
    // First, while the process has one thread (it may set DOCKER_HOST).
    iotgw_testkit::init();
    let mut cases: Vec<(String, Case)> = iotgw_registry::conformance::scenarios()
        .into_iter()
        .map(|s| (format!("conformance::{}", s.name), Case::Scenario(s)))
        .collect();
    cases.extend(
        races()
            .into_iter()
            .map(|(name, f)| (format!("race::{name}"), Case::Race(f))),
    );
    if std::env::args().any(|a| a == "--list") {
        for (name, _) in &cases {
            println!("{name}: test");
        }
        return ExitCode::SUCCESS;
    }
    if let DockerStatus::Unavailable(why) = iotgw_testkit::status() {
        let msg = format!(
            "the PostgreSQL store tests need Docker, which is unreachable: {why}. \
             Start Docker (or set DOCKER_HOST) and run scripts/test.sh"
        );
        if iotgw_testkit::ci() {
            println!("FAIL (CI=true): {msg}\n{}", summary_line(0, 1));
            return ExitCode::FAILURE;
        }
        println!("SKIPPED: {msg}\n{}", summary_line(0, 0));
        return ExitCode::SUCCESS;
    }
    let results = runtime().block_on(async {
        let gate = Arc::new(Semaphore::new(PARALLEL));
        let tasks: Vec<_> = cases
            .into_iter()
            .map(|(name, case)| {
                let gate = gate.clone();
                tokio::spawn(async move {
                    let _turn = gate.acquire_owned().await.expect("the gate stays open");
                    let fut: CaseFuture = match case {
                        Case::Scenario(s) => Box::pin(scenario(s)),
                        Case::Race(f) => f(),
                    };
                    let r = run_case(&name, LIMIT, fut).await;
                    (name, r)
                })
            })
            .collect();
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.expect("the case task is not cancelled"));
        }
        out
    });
    iotgw_testkit::cleanup();
    let mut failed = 0;
    let mut scenarios_passed = 0;
    for (name, (r, took)) in &results {
        match r {
            Ok(()) => {
                if name.starts_with("conformance::") {
                    scenarios_passed += 1;
                }
                println!("test {name} ... ok ({:.1}s)", took.as_secs_f64());
            }
            Err(why) => {
                failed += 1;
                println!("test {name} ... FAILED ({:.1}s)\n{why}", took.as_secs_f64());
            }
        }
    }
    println!(
        "PostgreSQL 15: {scenarios_passed} of {} conformance scenarios passed",
        iotgw_registry::conformance::scenarios().len()
    );
    println!("{}", summary_line(results.len() - failed, failed));
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// A database of its own in the shared server, named after `what`.
async fn database(what: &str) -> anyhow::Result<String> {
    let pg = Postgres::shared().await?;
    let short: String = what
        .chars()
        .filter(|c| c.is_ascii_lowercase() || *c == '_')
        .take(40)
        .collect();
    let name = format!(
        "{short}_{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    pg.create_database(&name).await
}

async fn connect(url: &str) -> anyhow::Result<PostgresStore> {
    let mut options = PostgresOptions::new(url);
    options.pool_size = 4;
    Ok(PostgresStore::connect(&options).await?)
}

async fn scenario(s: iotgw_registry::conformance::Scenario) -> anyhow::Result<()> {
    let url = database(s.name).await?;
    let store = connect(&url).await?;
    (s.run)(&store).await;
    store.close().await;
    Ok(())
}

fn alert(token: &str, key: &str, secs: i64) -> NewAlert {
    NewAlert {
        description: "overheat".into(),
        alert_data: "{}".into(),
        alert_time: Utc
            .with_ymd_and_hms(2024, 5, 1, 12, 0, 0)
            .single()
            .expect("a fixed time")
            + chrono::Duration::seconds(secs),
        alert_token: token.into(),
        alert_type: AlertType::Anomaly,
        priority_score: None,
        rule: "overheat".into(),
        debounce_key: key.into(),
        command: None,
    }
}

fn commit(device: &DeviceId, token: &str, key: &str) -> TelemetryCommit {
    TelemetryCommit {
        device_id: device.clone(),
        received_at: Utc::now(),
        alerts: vec![alert(token, key, 0)],
        debounce_window: chrono::Duration::seconds(60),
        sinks: vec!["hook".into()],
        readings: Default::default(),
    }
}

/// Two replicas (two pools on one database) commit the first alert of a debounce key at
/// the same instant, round after round, one with single commits and one with group
/// commits: each key ends with one primary and one child, never two primaries.
async fn two_replicas_committing_alerts_of_one_device_at_once_make_one_primary(
) -> anyhow::Result<()> {
    let url = database("race_alerts").await?;
    let a = Arc::new(connect(&url).await?);
    let b = Arc::new(connect(&url).await?);
    let device = DeviceId::parse("pump-race")?;
    a.ensure_unknown_device(&device, "mqtt").await?;
    const ROUNDS: usize = 40;
    for round in 0..ROUNDS {
        let key = format!("pump-race|overheat|{round}");
        let start = Arc::new(tokio::sync::Barrier::new(2));
        let single = {
            let (a, start, c) = (
                a.clone(),
                start.clone(),
                commit(&device, &format!("a-{round}"), &key),
            );
            tokio::spawn(async move {
                start.wait().await;
                a.commit_telemetry(&c).await
            })
        };
        let batched = {
            let (b, start) = (b.clone(), start.clone());
            let write = BatchWrite::Telemetry {
                commit: commit(&device, &format!("b-{round}"), &key),
                from: Arrival {
                    instance: "mqtt".into(),
                    message: NewDeadLetter {
                        source: "telemetry:mqtt".into(),
                        reason: String::new(),
                        device_id: Some(device.to_string()),
                        message_id: None,
                        payload: String::new(),
                    },
                },
                if_unknown: IfUnknown::Register,
            };
            tokio::spawn(async move {
                start.wait().await;
                b.commit_batch(&[write]).await
            })
        };
        single.await??;
        batched.await??;
    }
    let alerts = a
        .list_alerts(
            &AlertFilter::default(),
            &PageRequest {
                after: None,
                limit: 1000,
            },
        )
        .await?
        .items;
    anyhow::ensure!(alerts.len() == 2 * ROUNDS, "{} alerts", alerts.len());
    let primaries = alerts.iter().filter(|a| a.parent_alert.is_none()).count();
    anyhow::ensure!(
        primaries == ROUNDS,
        "{primaries} primaries for {ROUNDS} debounce keys: two replicas both made a primary"
    );
    Ok(())
}

/// Three replicas connect to a fresh database at once: each one ends up on the migrated
/// schema, and every migration ran once.
async fn three_replicas_starting_together_migrate_once() -> anyhow::Result<()> {
    let url = database("race_migrate").await?;
    let (x, y, z) = tokio::join!(connect(&url), connect(&url), connect(&url));
    let (x, _y, _z) = (x?, y?, z?);
    let versions: Vec<i64> =
        sqlx::query_scalar("SELECT version FROM _sqlx_migrations ORDER BY version")
            .fetch_all(x.pool())
            .await?;
    let files = std::fs::read_dir(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../registry/migrations/postgres"),
    )?
    .filter(|e| {
        e.as_ref()
            .is_ok_and(|e| e.path().extension().is_some_and(|x| x == "sql"))
    })
    .count();
    let expected: Vec<i64> = (1..=i64::try_from(files)?).collect();
    anyhow::ensure!(
        versions == expected,
        "applied migrations: {versions:?}, files: {files}"
    );
    x.ping().await?;
    Ok(())
}

/// Two replicas claim one sink's outbox at once: every item is leased by exactly one.
async fn two_replicas_never_claim_the_same_outbox_item() -> anyhow::Result<()> {
    let url = database("race_outbox").await?;
    let a = Arc::new(connect(&url).await?);
    let b = Arc::new(connect(&url).await?);
    let device = DeviceId::parse("pump-outbox")?;
    a.ensure_unknown_device(&device, "mqtt").await?;
    const ITEMS: usize = 120;
    for n in 0..ITEMS {
        a.commit_telemetry(&commit(&device, &format!("t-{n}"), &format!("k-{n}")))
            .await?;
    }
    let claim_all = |s: Arc<PostgresStore>, holder: &'static str| async move {
        let mut ids = Vec::new();
        loop {
            let now = Utc::now();
            let got = s
                .claim_outbox("hook", holder, now, now + chrono::Duration::seconds(60), 7)
                .await?;
            if got.is_empty() {
                return anyhow::Ok(ids);
            }
            ids.extend(got.into_iter().map(|i| i.id));
        }
    };
    let (x, y) = tokio::join!(
        tokio::spawn(claim_all(a.clone(), "replica-a")),
        tokio::spawn(claim_all(b.clone(), "replica-b"))
    );
    let (x, y) = (x??, y??);
    let mut all: Vec<i64> = x.iter().chain(&y).copied().collect();
    all.sort_unstable();
    let claimed = all.len();
    all.dedup();
    anyhow::ensure!(
        claimed == ITEMS && all.len() == ITEMS,
        "{claimed} claims of {} distinct items ({ITEMS} queued; replica a {}, b {})",
        all.len(),
        x.len(),
        y.len()
    );
    Ok(())
}

/// A wrong password: the error says that authentication failed and where, and never
/// shows the password given.
async fn a_wrong_password_is_a_clear_error_that_never_shows_the_secret() -> anyhow::Result<()> {
    let url = database("wrong_password").await?;
    let secret = "not-the-password-7f3a";
    let wrong = url.replace(PASSWORD, secret);
    anyhow::ensure!(wrong != url, "the harness URL carries its password: {url}");
    let mut options = PostgresOptions::new(&wrong);
    options.connect_timeout = Duration::from_secs(5);
    let err = match PostgresStore::connect(&options).await {
        Ok(_) => anyhow::bail!("a wrong password connected"),
        Err(e) => e.to_string(),
    };
    anyhow::ensure!(!err.contains(secret), "the error shows the secret: {err}");
    anyhow::ensure!(
        err.contains("password authentication failed")
            && err.contains("postgres://iotgw@127.0.0.1:"),
        "not a clear error: {err}"
    );
    // The same with the password given apart from the URL.
    let mut options = PostgresOptions::new(url.replace(&format!(":{PASSWORD}@"), "@"));
    options.password = Some(secret.into());
    let err = match PostgresStore::connect(&options).await {
        Ok(_) => anyhow::bail!("a wrong password connected"),
        Err(e) => e.to_string(),
    };
    anyhow::ensure!(!err.contains(secret), "the error shows the secret: {err}");
    Ok(())
}

/// The gateway starts while its database is down: it keeps trying (live, not ready, and
/// `/ready` says why without the password) and becomes ready once PostgreSQL answers.
async fn a_gateway_waits_for_postgres_and_becomes_ready_when_it_answers() -> anyhow::Result<()> {
    use iotgw::app::{self, StartOptions};
    use iotgw_config::{Config, DatabaseUrl, PostgresStoreConfig, PostgresTlsMode, StoreKind};

    let pg = Postgres::dedicated().await?;
    pg.wait_ready().await?;
    let url = pg.create_database("gateway_waits").await?;
    pg.container().stop(0).await?;

    let mut config = Config::default();
    config.store.kind = StoreKind::Postgres;
    config.store.postgres = Some(PostgresStoreConfig {
        url: DatabaseUrl::new(url),
        password: None,
        pool_size: 4,
        statement_timeout_ms: 30_000,
        connect_timeout_secs: 2,
        tls_mode: PostgresTlsMode::Disable,
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let mut start = tokio::spawn(app::start(
        config,
        StartOptions {
            api_listener: Some(listener),
            ..StartOptions::default()
        },
    ));
    anyhow::ensure!(
        tokio::time::timeout(Duration::from_secs(3), &mut start)
            .await
            .is_err(),
        "the gateway started (or gave up) while its database was down"
    );
    // Meanwhile the port answers: live, not ready, and why (the URL without its password).
    let live = reqwest::get(format!("http://{addr}/live")).await?;
    anyhow::ensure!(
        live.status() == 200,
        "/live while waiting: {}",
        live.status()
    );
    let waiting = reqwest::get(format!("http://{addr}/ready")).await?;
    anyhow::ensure!(
        waiting.status() == 503,
        "/ready while waiting: {}",
        waiting.status()
    );
    let why = waiting.text().await?;
    anyhow::ensure!(
        why.contains("PostgreSQL at postgres://") && why.contains("does not answer"),
        "/ready says why: {why}"
    );
    anyhow::ensure!(!why.contains(PASSWORD), "/ready shows the password: {why}");
    pg.container().start_again().await?;
    pg.wait_ready().await?;
    let running = tokio::time::timeout(Duration::from_secs(90), start)
        .await
        .map_err(|_| {
            anyhow::anyhow!("the gateway was not up 90 s after PostgreSQL returned")
        })???;
    let ready = reqwest::get(format!("http://{addr}/ready")).await?;
    anyhow::ensure!(ready.status() == 200, "/ready: {}", ready.status());
    running.stop(Duration::from_secs(2)).await;
    pg.remove().await;
    Ok(())
}
