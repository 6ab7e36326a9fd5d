//! Each emulator of `iotgw-testkit` starts from its public image name and answers
//! (harness = false: one runtime and one set of shared containers for the binary).
//! Prints one line per test and ends with `N passed, N failed`.
#![allow(
    clippy::disallowed_methods,
    reason = "test code: plain-HTTP clients against in-process servers and local emulators, no TLS roots or timeouts to configure"
)]

use std::process::ExitCode;
use std::time::Duration;

use iotgw_testkit::mosquitto::{Mosquitto, MosquittoSpec, ADMIN_PASSWORD, ADMIN_USER};
use iotgw_testkit::moto::Moto;
use iotgw_testkit::postgres::Postgres;
use iotgw_testkit::pubsub::{PubSub, PROJECT};
use iotgw_testkit::DockerStatus;
use iotgw_tests::runner::{run_case, runtime, summary_line};
use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::{AsyncClient, ConnectionError, Event, MqttOptions};

const LIMIT: Duration = Duration::from_secs(120);

type Case = fn() -> std::pin::Pin<Box<dyn std::future::Future<Output = anyhow::Result<()>> + Send>>;

fn cases() -> Vec<(&'static str, Case)> {
    vec![
        (
            "mosquitto_accepts_the_dynsec_admin_and_refuses_a_wrong_password",
            || Box::pin(mosquitto_accepts_the_dynsec_admin_and_refuses_a_wrong_password()),
        ),
        (
            "a_dedicated_mosquitto_keeps_its_port_and_its_dynsec_clients_across_a_restart",
            || {
                Box::pin(
                    a_dedicated_mosquitto_keeps_its_port_and_its_dynsec_clients_across_a_restart(),
                )
            },
        ),
        ("moto_answers_the_iot_api", || {
            Box::pin(moto_answers_the_iot_api())
        }),
        (
            "a_dedicated_moto_answers_on_the_same_port_after_a_restart_with_its_state_gone",
            || Box::pin(a_dedicated_moto_answers_on_the_same_port_after_a_restart_with_its_state_gone()),
        ),
        (
            "a_dedicated_pubsub_emulator_answers_on_the_same_port_after_a_restart_with_its_topics_gone",
            || Box::pin(a_dedicated_pubsub_emulator_answers_on_the_same_port_after_a_restart_with_its_topics_gone()),
        ),
        ("the_pubsub_emulator_creates_a_topic", || {
            Box::pin(the_pubsub_emulator_creates_a_topic())
        }),
        ("postgres_gives_each_test_a_database_of_its_own", || {
            Box::pin(postgres_gives_each_test_a_database_of_its_own())
        }),
    ]
}

fn main() -> ExitCode {
    // First, while the process has one thread (it may set DOCKER_HOST).
    iotgw_testkit::init();
    let cases = cases();
    if std::env::args().any(|a| a == "--list") {
        for (name, _) in &cases {
            println!("{name}: test");
        }
        return ExitCode::SUCCESS;
    }
    if let DockerStatus::Unavailable(why) = iotgw_testkit::status() {
        let msg = format!(
            "the emulator tests need Docker, which is unreachable: {why}. \
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
        let tasks: Vec<_> = cases
            .into_iter()
            .map(|(name, case)| {
                tokio::spawn(async move { (name, run_case(name, LIMIT, case()).await) })
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
    for (name, (r, took)) in &results {
        match r {
            Ok(()) => println!("test {name} ... ok ({:.1}s)", took.as_secs_f64()),
            Err(why) => {
                failed += 1;
                println!("test {name} ... FAILED ({:.1}s)\n{why}", took.as_secs_f64());
            }
        }
    }
    println!("{}", summary_line(results.len() - failed, failed));
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Connects with these credentials: Ok on CONNACK, the refusal otherwise.
async fn connect(
    port: u16,
    client_id: &str,
    user: &str,
    password: &str,
) -> Result<(), ConnectionError> {
    let mut o = MqttOptions::new(client_id, "127.0.0.1", port);
    o.set_credentials(user, password);
    let (client, mut events) = AsyncClient::new(o, 4);
    let r = loop {
        match events.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(_))) => break Ok(()),
            Ok(_) => {}
            Err(e) => break Err(e),
        }
    };
    let _ = client.try_disconnect();
    r
}

async fn mosquitto_accepts_the_dynsec_admin_and_refuses_a_wrong_password() -> anyhow::Result<()> {
    let m = Mosquitto::shared().await?;
    connect(m.port(), "emu-admin", ADMIN_USER, ADMIN_PASSWORD).await?;
    let refused = connect(m.port(), "emu-wrong", ADMIN_USER, "wrong").await;
    anyhow::ensure!(
        matches!(refused, Err(ConnectionError::ConnectionRefused(_))),
        "a wrong password was not refused: {refused:?}"
    );
    Ok(())
}

async fn a_dedicated_mosquitto_keeps_its_port_and_its_dynsec_clients_across_a_restart(
) -> anyhow::Result<()> {
    let m = Mosquitto::dedicated(MosquittoSpec::default()).await?;
    let port = m.port();
    let (code, out) = m
        .container()
        .exec(
            [
                "mosquitto_ctrl",
                "-h",
                "127.0.0.1",
                "-u",
                ADMIN_USER,
                "-P",
                ADMIN_PASSWORD,
                "dynsec",
                "createClient",
                "emu-device",
                "-p",
                "device-pw",
            ]
            .map(String::from)
            .to_vec(),
        )
        .await?;
    anyhow::ensure!(code == 0, "mosquitto_ctrl createClient: {out}");
    connect(port, "emu-device", "emu-device", "device-pw").await?;
    m.restart().await?;
    anyhow::ensure!(m.port() == port, "the port changed across the restart");
    connect(port, "emu-device", "emu-device", "device-pw")
        .await
        .map_err(|e| anyhow::anyhow!("the client created before the restart is gone: {e}"))?;
    m.remove().await;
    Ok(())
}

/// An IoT request as moto reads it: the service comes from the SigV4 credential scope,
/// signatures are not checked.
fn iot(req: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
    req.header(
        "Authorization",
        "AWS4-HMAC-SHA256 Credential=testing/20250101/us-east-1/iot/aws4_request, SignedHeaders=host, Signature=00",
    )
}

/// The thing names moto lists.
async fn thing_names(moto: &Moto) -> anyhow::Result<Vec<String>> {
    let r = iot(reqwest::Client::new().get(format!("{}/things", moto.endpoint())))
        .send()
        .await?;
    anyhow::ensure!(
        r.status().is_success(),
        "ListThings answered {}",
        r.status()
    );
    let body: serde_json::Value = r.json().await?;
    let things = body["things"]
        .as_array()
        .ok_or_else(|| anyhow::anyhow!("ListThings answered {body}"))?;
    Ok(things
        .iter()
        .filter_map(|t| t["thingName"].as_str().map(str::to_owned))
        .collect())
}

async fn moto_answers_the_iot_api() -> anyhow::Result<()> {
    let moto = Moto::shared().await?;
    thing_names(moto).await?;
    Ok(())
}

async fn a_dedicated_moto_answers_on_the_same_port_after_a_restart_with_its_state_gone(
) -> anyhow::Result<()> {
    let moto = Moto::dedicated().await?;
    let endpoint = moto.endpoint();
    let r = iot(reqwest::Client::new().post(format!("{endpoint}/things/emu-thing")))
        .json(&serde_json::json!({}))
        .send()
        .await?;
    anyhow::ensure!(
        r.status().is_success(),
        "CreateThing answered {}",
        r.status()
    );
    anyhow::ensure!(thing_names(&moto).await? == ["emu-thing"]);
    moto.restart().await?;
    anyhow::ensure!(
        moto.endpoint() == endpoint,
        "the endpoint changed across the restart"
    );
    let after = thing_names(&moto).await?;
    anyhow::ensure!(after.is_empty(), "moto kept {after:?} across a restart");
    moto.remove().await;
    Ok(())
}

async fn the_pubsub_emulator_creates_a_topic() -> anyhow::Result<()> {
    let p = PubSub::shared().await?;
    let topic = format!("emu-{}", uuid::Uuid::new_v4().simple());
    let url = format!("{}/v1/projects/{PROJECT}/topics/{topic}", p.endpoint());
    let r = reqwest::Client::new().put(&url).send().await?;
    anyhow::ensure!(r.status().is_success(), "creating {url}: {}", r.status());
    let body: serde_json::Value = r.json().await?;
    anyhow::ensure!(
        body["name"] == format!("projects/{PROJECT}/topics/{topic}"),
        "created {body}"
    );
    Ok(())
}

async fn a_dedicated_pubsub_emulator_answers_on_the_same_port_after_a_restart_with_its_topics_gone(
) -> anyhow::Result<()> {
    let p = PubSub::dedicated().await?;
    let url = format!("{}/v1/projects/{PROJECT}/topics/emu-restart", p.endpoint());
    let client = reqwest::Client::new();
    let r = client.put(&url).send().await?;
    anyhow::ensure!(r.status().is_success(), "creating {url}: {}", r.status());
    p.restart().await?;
    let r = client.get(&url).send().await?;
    anyhow::ensure!(
        r.status() == reqwest::StatusCode::NOT_FOUND,
        "the topic outlived the restart: GET {url} answered {}",
        r.status()
    );
    p.remove().await;
    Ok(())
}

async fn postgres_gives_each_test_a_database_of_its_own() -> anyhow::Result<()> {
    let pg = Postgres::shared().await?;
    let name = format!("emu_{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let url = pg.create_database(&name).await?;
    anyhow::ensure!(url.ends_with(&format!("/{name}")), "{url}");
    let (code, out) = pg
        .container()
        .exec(
            [
                "psql",
                "-U",
                "iotgw",
                "-d",
                &name,
                "-tAc",
                "select current_database()",
            ]
            .map(String::from)
            .to_vec(),
        )
        .await?;
    anyhow::ensure!(
        code == 0 && out.trim() == name,
        "psql in {name}: {code} {out}"
    );
    Ok(())
}
