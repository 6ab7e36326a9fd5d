//! The scenarios, written once for every provider. Each registers its own devices (ids
//! from [`Names`]), drives them through the fixture, checks what must hold on any cloud,
//! and returns the normalised records the API then holds, for the golden comparison.
//!
//! Every command a rule or the API sends is answered by the device before the next
//! telemetry is published: a provider with synchronous commands (Azure direct methods)
//! holds the device's pipeline until the answer, and the records must not depend on that.

use std::time::Duration;

use anyhow::Context;
use chrono::Utc;
use serde_json::{json, Value};

use super::gateway::Gateway;
use super::normalize::Normalizer;
use super::{DeviceContext, FixtureEnv, Names, ProviderFixture, Reply, SimDevice};
use crate::api::{metric, Api};
use crate::wait::until;

/// How long one wait on the gateway's records may take.
const WAIT: Duration = Duration::from_secs(30);

/// Field Service option values the scenarios check.
mod cfs {
    pub const REGISTERED: i64 = 192_350_003;
    pub const UNREGISTERED: i64 = 192_350_001;
    pub const REGISTER: i64 = 192_350_000;
    pub const UNREGISTER: i64 = 192_350_001;
    pub const COMMAND_SENT: i64 = 192_350_001;
    pub const COMMAND_ERROR: i64 = 192_350_002;
    pub const ANOMALY: i64 = 192_350_000;
}

/// The scenarios, in matrix order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scenario {
    /// Register, telemetry, alert, debounced child, command, command status, device state,
    /// unregister.
    Lifecycle,
    /// The same message delivered twice gives one alert.
    Duplicate,
    /// A poison message is dead-lettered with a reason, and good data still flows.
    Poison,
    /// The emulator restarts mid-stream; messages published after it is back all arrive.
    Restart,
    /// Readings and Field Service's pull device data come out the same.
    Readings,
}

impl Scenario {
    /// Every scenario.
    pub const ALL: [Scenario; 5] = [
        Scenario::Lifecycle,
        Scenario::Duplicate,
        Scenario::Poison,
        Scenario::Restart,
        Scenario::Readings,
    ];

    /// The scenario's name (a sentence), also its golden file's name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Lifecycle => "register_telemetry_alert_child_command_status_state_unregister",
            Self::Duplicate => "same_message_twice_gives_one_alert",
            Self::Poison => "poison_message_is_dead_lettered_with_a_reason",
            Self::Restart => {
                "provider_recovers_after_the_emulator_restarts_without_losing_later_messages"
            }
            Self::Readings => "readings_and_pull_device_data_are_identical_on_every_provider",
        }
    }

    /// Whether the scenario restarts the emulator (so it needs one of its own).
    pub fn restarts_emulator(self) -> bool {
        self == Self::Restart
    }

    /// Runs the scenario against `fixture`: the normalised records, or why it failed.
    pub async fn run(self, fixture: &dyn ProviderFixture, names: &Names) -> anyhow::Result<Value> {
        let env = fixture
            .environment(names, self.restarts_emulator())
            .await
            .context("preparing the fixture's environment")?;
        let result = match Gateway::start(env.as_ref(), names).await {
            Ok(gw) => {
                let r = match self {
                    Self::Lifecycle => lifecycle(env.as_ref(), &gw, names).await,
                    Self::Duplicate => duplicate(env.as_ref(), &gw, names).await,
                    Self::Poison => poison(env.as_ref(), &gw, names).await,
                    Self::Restart => restart(env.as_ref(), &gw, names).await,
                    Self::Readings => readings(env.as_ref(), &gw, names).await,
                };
                gw.stop().await;
                r
            }
            Err(e) => Err(e),
        };
        let result = match result {
            Err(e) => {
                let d = env.diagnostics().await;
                Err(if d.is_empty() { e } else { e.context(d) })
            }
            ok => ok,
        };
        env.teardown().await;
        let records = result?;
        Ok(Normalizer::new(&names.nonce, names.instance()).normalize(&records))
    }
}

/// Registers `id` (with a category, tags and settings) and connects its simulated device.
async fn register_and_connect(
    env: &dyn FixtureEnv,
    gw: &Gateway,
    names: &Names,
    id: &str,
) -> anyhow::Result<(Value, Box<dyn SimDevice>)> {
    let api = gw.api();
    let (status, reg) = api
        .post(
            "/api/v1/devices",
            json!({
                "msdyn_deviceid": id,
                "msdyn_name": "Chiller pump",
                "msdyn_category": "chiller",
                "msdyn_tags": {"site": "north"},
                "msdyn_devicesettings": {"report_interval_s": 30},
            }),
        )
        .await;
    anyhow::ensure!(status == 201, "registering {id}: {status} {reg}");
    anyhow::ensure!(
        reg["device"]["msdyn_registrationstatus"] == cfs::REGISTERED,
        "{id} is not Registered after registration: {reg}"
    );
    let device = env
        .connect_device(DeviceContext {
            device_id: id,
            registration: &reg,
            instance: names.instance(),
            gateway: api.base(),
        })
        .await
        .with_context(|| format!("connecting the simulated device {id}"))?;
    Ok((reg, device))
}

/// Everything the API holds about one device. Alerts are sorted by their data and
/// commands by name (readings published back to back may be received in either order on
/// a cloud without ordering, and their order is not what the suite compares); the
/// history keeps the API's order, which is the order of the actions.
async fn device_records(api: &Api, id: &str) -> Value {
    let sorted = |mut items: Vec<Value>, key: &str| {
        items.sort_by_key(|v| v[key].to_string());
        Value::Array(items)
    };
    json!({
        "device": api.get(&format!("/api/v1/devices/{id}")).await.1,
        "history": api.items(&format!("/api/v1/devices/{id}/history")).await,
        "alerts": sorted(api.items(&format!("/api/v1/alerts?device_id={id}")).await, "msdyn_alertdata"),
        "commands": sorted(api.items(&format!("/api/v1/commands?device_id={id}")).await, "msdyn_name"),
    })
}

/// Waits until `check` holds on the device's records; the error shows the records.
async fn wait_records<F>(api: &Api, id: &str, what: &str, check: F) -> anyhow::Result<Value>
where
    F: Fn(&Value) -> bool,
{
    let check = &check;
    let got = until(what, WAIT, || async move {
        let r = device_records(api, id).await;
        check(&r).then_some(r)
    })
    .await;
    match got {
        Ok(r) => Ok(r),
        Err(e) => {
            let now = device_records(api, id).await;
            Err(e.context(format!(
                "the records of {id} are now: {}",
                serde_json::to_string_pretty(&now).unwrap_or_default()
            )))
        }
    }
}

fn list(r: &Value, key: &str) -> Vec<Value> {
    r[key].as_array().cloned().unwrap_or_default()
}

/// Receives the rule's `cool_down` command, answers it, and waits until it is Sent.
async fn answer_rule_command(
    api: &Api,
    dev: &mut Box<dyn SimDevice>,
    id: &str,
) -> anyhow::Result<()> {
    let cmd = dev
        .next_command(WAIT)
        .await
        .context("the rule's cool_down command reaching the device")?;
    anyhow::ensure!(
        cmd.body == json!({"CommandName": "cool_down", "Parameters": {"target_celsius": 60}}),
        "the device received {} instead of the rule's cool_down command",
        cmd.body
    );
    dev.reply(&cmd, Reply::Ok).await?;
    wait_records(api, id, "the cool_down command to be Sent", |r| {
        list(r, "commands").iter().any(|c| {
            c["msdyn_name"] == "cool_down" && c["msdyn_commandstatus"] == cfs::COMMAND_SENT
        })
    })
    .await?;
    Ok(())
}

async fn lifecycle(env: &dyn FixtureEnv, gw: &Gateway, names: &Names) -> anyhow::Result<Value> {
    let api = gw.api();
    let id = names.device("pump");
    let (_, mut dev) = register_and_connect(env, gw, names, &id).await?;

    // Device state: connection and reported properties reach the record.
    let properties = json!({"firmware": "1.4.2", "valve": "open"});
    dev.report_connection(true, Utc::now()).await?;
    dev.report_properties(&properties).await?;
    wait_records(
        api,
        &id,
        "the connection state and reported properties",
        |r| {
            r["device"]["msdyn_connectionstate"] == true
                && r["device"]["msdyn_devicereportedproperties"] == properties
        },
    )
    .await?;

    // Telemetry above the rule makes a primary alert and the rule's command.
    dev.publish_telemetry("m-1", br#"{"temperature": 80.5}"#)
        .await?;
    let r = wait_records(api, &id, "the primary alert", |r| {
        list(r, "alerts").len() == 1
    })
    .await?;
    let primary = list(&r, "alerts").remove(0);
    anyhow::ensure!(
        primary["msdyn_parentalert"].is_null() && primary["msdyn_alerttype"] == cfs::ANOMALY,
        "the first alert is not a primary Anomaly: {primary}"
    );
    answer_rule_command(api, &mut dev, &id).await?;
    let r = wait_records(api, &id, "the alert to be Command Sent", |r| {
        list(r, "alerts")
            .first()
            .is_some_and(|a| a["statecode"] == 2 && a["statuscode"] == 5)
    })
    .await?;
    let sent = list(&r, "commands")
        .into_iter()
        .find(|c| c["msdyn_name"] == "cool_down")
        .context("the cool_down command record")?;
    anyhow::ensure!(
        sent["msdyn_parentalert"] == primary["msdyn_iotalertid"]
            && list(&r, "alerts")[0]["msdyn_lastcommandsent"] == sent["msdyn_iotdevicecommandid"],
        "the command and its alert do not point at each other: {r}"
    );

    // A second reading inside the debounce window becomes a child of the first.
    dev.publish_telemetry("m-2", br#"{"temperature": 82.0}"#)
        .await?;
    let r = wait_records(api, &id, "the debounced child alert", |r| {
        list(r, "alerts").len() == 2
    })
    .await?;
    let child = list(&r, "alerts")
        .into_iter()
        .find(|a| !a["msdyn_parentalert"].is_null())
        .context("a child alert")?;
    anyhow::ensure!(
        child["msdyn_parentalert"] == primary["msdyn_iotalertid"]
            && child["msdyn_parentalerttoken"] == primary["msdyn_alerttoken"],
        "the child does not point at the primary: {child} / {primary}"
    );

    // A command through the API that the device refuses ends in Error with its reason.
    let (status, manual) = api
        .post(
            "/api/v1/commands",
            json!({"msdyn_deviceid": id, "msdyn_name": "reboot", "parameters": {"delay_s": 5}}),
        )
        .await;
    anyhow::ensure!(status == 202, "sending reboot: {status} {manual}");
    let cmd = dev
        .next_command(WAIT)
        .await
        .context("the reboot command reaching the device")?;
    anyhow::ensure!(
        cmd.body == json!({"CommandName": "reboot", "Parameters": {"delay_s": 5}}),
        "the device received {} instead of reboot",
        cmd.body
    );
    dev.reply(&cmd, Reply::Error("refused by test device".into()))
        .await?;
    wait_records(
        api,
        &id,
        "the reboot command to be Error with the device's reason",
        |r| {
            list(r, "commands").iter().any(|c| {
                c["msdyn_name"] == "reboot"
                    && c["msdyn_commandstatus"] == cfs::COMMAND_ERROR
                    && c["msdyn_commandstatusreason"] == "refused by test device"
            })
        },
    )
    .await?;

    // What the provider reports of the device now.
    let (status, state) = api.get(&format!("/api/v1/devices/{id}/state")).await;
    anyhow::ensure!(status == 200, "device state: {status} {state}");

    // Unregister: the record says so and the history has both actions.
    let (status, d) = api.delete(&format!("/api/v1/devices/{id}")).await;
    anyhow::ensure!(status == 200, "unregistering: {status} {d}");
    anyhow::ensure!(
        d["msdyn_registrationstatus"] == cfs::UNREGISTERED,
        "not Unregistered: {d}"
    );
    let mut records = device_records(api, &id).await;
    let actions: Vec<Value> = list(&records, "history")
        .iter()
        .map(|h| h["msdyn_action"].clone())
        .collect();
    anyhow::ensure!(
        actions == vec![json!(cfs::REGISTER), json!(cfs::UNREGISTER)],
        "history actions are {actions:?}"
    );
    dev.disconnect().await;
    records["state"] = state;
    Ok(records)
}

async fn duplicate(env: &dyn FixtureEnv, gw: &Gateway, names: &Names) -> anyhow::Result<Value> {
    let api = gw.api();
    let id = names.device("meter");
    let (_, mut dev) = register_and_connect(env, gw, names, &id).await?;

    let reading: &[u8] = br#"{"temperature": 90}"#;
    dev.publish_telemetry("m-1", reading).await?;
    wait_records(api, &id, "the alert of m-1", |r| {
        list(r, "alerts").len() == 1
    })
    .await?;
    answer_rule_command(api, &mut dev, &id).await?;
    // The very same message again: a redelivery, not a second reading.
    dev.publish_telemetry("m-1", reading).await?;
    // Then a new reading, which must still make its (child) alert.
    dev.publish_telemetry("m-2", br#"{"temperature": 95}"#)
        .await?;
    let api_ref = &api;
    until("the gateway to see the duplicate", WAIT, || async move {
        let m = api_ref.metrics().await;
        (metric(&m, "iotgw_alerts_total", &["kind=\"duplicate\""]) >= 1.0).then_some(())
    })
    .await?;
    let r = wait_records(api, &id, "the alert of m-2", |r| {
        list(r, "alerts").len() >= 2
    })
    .await?;
    let alerts = list(&r, "alerts");
    anyhow::ensure!(
        alerts.len() == 2,
        "expected one alert for m-1 and one for m-2, got {}: {alerts:?}",
        alerts.len()
    );
    let mut tokens: Vec<&Value> = alerts.iter().map(|a| &a["msdyn_alerttoken"]).collect();
    tokens.dedup();
    anyhow::ensure!(tokens.len() == 2, "two alerts share a token: {alerts:?}");
    let records = device_records(api, &id).await;
    dev.disconnect().await;
    Ok(records)
}

async fn poison(env: &dyn FixtureEnv, gw: &Gateway, names: &Names) -> anyhow::Result<Value> {
    let api = gw.api();
    let id = names.device("valve");
    let (_, mut dev) = register_and_connect(env, gw, names, &id).await?;

    dev.publish_poison("m-1").await?;
    dev.publish_telemetry("m-2", br#"{"temperature": 99}"#)
        .await?;
    let api_ref = &api;
    let id_ref = id.as_str();
    let letters = until("the poison message's dead letter", WAIT, || async move {
        let items: Vec<Value> = api_ref
            .items("/api/v1/dead-letters")
            .await
            .into_iter()
            .filter(|l| l["device_id"] == id_ref)
            .collect();
        (!items.is_empty()).then_some(items)
    })
    .await?;
    anyhow::ensure!(letters.len() == 1, "one dead letter expected: {letters:?}");
    let reason = letters[0]["reason"].as_str().unwrap_or_default();
    anyhow::ensure!(
        reason.contains("not JSON"),
        "the dead letter's reason does not say what is wrong: {reason:?}"
    );
    anyhow::ensure!(
        letters[0]["source"] == format!("telemetry:{}", names.instance()),
        "the dead letter does not name its source: {}",
        letters[0]
    );
    // The good message after the poison one still makes its alert (and command).
    wait_records(api, &id, "the good message's alert", |r| {
        list(r, "alerts").len() == 1
    })
    .await?;
    answer_rule_command(api, &mut dev, &id).await?;
    let m = api.metrics().await;
    anyhow::ensure!(
        metric(
            &m,
            "iotgw_events_rejected_total",
            &["reason=\"malformed_json\""]
        ) >= 1.0,
        "the rejection is not counted as malformed_json"
    );
    let mut records = device_records(api, &id).await;
    records["dead_letters"] = Value::Array(letters);
    dev.disconnect().await;
    Ok(records)
}

async fn restart(env: &dyn FixtureEnv, gw: &Gateway, names: &Names) -> anyhow::Result<Value> {
    let api = gw.api();
    let id = names.device("fan");
    let (_, mut dev) = register_and_connect(env, gw, names, &id).await?;

    dev.publish_telemetry("m-1", br#"{"temperature": 90}"#)
        .await?;
    wait_records(api, &id, "the alert of m-1", |r| {
        list(r, "alerts").len() == 1
    })
    .await?;
    answer_rule_command(api, &mut dev, &id).await?;

    env.restart_emulator()
        .await
        .context("restarting the emulator")?;

    // Published as soon as the emulator is back, before the provider need have noticed:
    // none may be lost.
    dev.publish_telemetry("m-2", br#"{"temperature": 91}"#)
        .await
        .context("publishing m-2 after the restart")?;
    dev.publish_telemetry("m-3", br#"{"temperature": 92}"#)
        .await
        .context("publishing m-3 after the restart")?;
    wait_records(api, &id, "the alerts of m-2 and m-3", |r| {
        list(r, "alerts").len() >= 3
    })
    .await?;
    let api_ref = &api;
    until(
        "the provider to report itself connected again",
        WAIT,
        || async move {
            let providers = api_ref.items("/api/v1/providers").await;
            providers
                .iter()
                .all(|p| p["health"]["connected"] == true)
                .then_some(())
        },
    )
    .await?;
    let records = device_records(api, &id).await;
    let alerts = list(&records, "alerts");
    anyhow::ensure!(alerts.len() == 3, "expected 3 alerts: {alerts:?}");
    dev.disconnect().await;
    Ok(records)
}

/// Six readings with the device's own timestamps, 20 s apart from the start of an hour two
/// hours ago, each with a top-level and a nested measure; the buckets Field Service's
/// "query device readings" answers at PT1M (keyed by their offset from that hour, so the
/// golden file holds no date) and its "pull device data".
async fn readings(env: &dyn FixtureEnv, gw: &Gateway, names: &Names) -> anyhow::Result<Value> {
    use chrono::DurationRound;
    let api = gw.api();
    let id = names.device("gauge");
    let (_, mut dev) = register_and_connect(env, gw, names, &id).await?;
    let properties = json!({"firmware": "3.0.1", "mode": "eco"});
    dev.report_connection(true, Utc::now()).await?;
    dev.report_properties(&properties).await?;
    let start = (Utc::now() - chrono::Duration::hours(2))
        .duration_trunc(chrono::Duration::hours(1))
        .context("an hour's start")?;
    for i in 0..6i64 {
        let at = start + chrono::Duration::seconds(20 * i);
        let body = json!({
            "timestamp": at.to_rfc3339(),
            "temperature": 20 + i,
            "engine": {"rpm": 900 + 10 * i, "on": i % 2 == 0},
        });
        dev.publish_telemetry(&format!("r-{i}"), body.to_string().as_bytes())
            .await?;
    }
    let query = json!({
        "From": start.to_rfc3339(),
        "To": (start + chrono::Duration::minutes(5)).to_rfc3339(),
        "IoTDeviceId": id,
        "Interval": "PT1M",
    });
    let (api_ref, query_ref, id_ref) = (&api, &query, id.as_str());
    let answered = until("six readings of each measure", WAIT, || async move {
        let (status, body) = api_ref
            .post("/api/cfs/v1/query-device-readings", query_ref.clone())
            .await;
        let series = body["AggregatedDeviceReadings"][id_ref].as_object()?;
        let count = |m: &str| -> Option<i64> {
            Some(
                series
                    .get(m)?
                    .as_object()?
                    .values()
                    .filter_map(|b| b["count"].as_i64())
                    .sum(),
            )
        };
        (status == 200
            && ["temperature", "engine/rpm", "engine/on"]
                .iter()
                .all(|m| count(m) == Some(6)))
        .then_some(body)
    })
    .await?;
    // Bucket starts as offsets from the hour, in seconds.
    let mut by_offset = serde_json::Map::new();
    for (measure, buckets) in answered["AggregatedDeviceReadings"][id.as_str()]
        .as_object()
        .context("the device's series")?
    {
        let mut out = serde_json::Map::new();
        for (at, stats) in buckets.as_object().context("buckets")? {
            let at = chrono::DateTime::parse_from_rfc3339(at).context("a bucket time")?;
            let offset = (at.with_timezone(&Utc) - start).num_seconds();
            out.insert(format!("+{offset}s"), stats.clone());
        }
        by_offset.insert(measure.clone(), Value::Object(out));
    }
    wait_records(
        api,
        &id,
        "the connection state and reported properties",
        |r| {
            r["device"]["msdyn_connectionstate"] == true
                && r["device"]["msdyn_devicereportedproperties"] == properties
        },
    )
    .await?;
    let (status, pulled) = api
        .post(
            "/api/cfs/v1/pull-device-data",
            json!({"EntityCollection": [{
                "msdyn_iotdeviceid": "0f8fad5b-d9cb-469f-a165-70867728950e",
                "msdyn_deviceid": id,
            }]}),
        )
        .await;
    anyhow::ensure!(status == 200, "pull device data: {status} {pulled}");
    dev.disconnect().await;
    Ok(json!({"readings": by_offset, "pulled": pulled}))
}
