//! Keeping Field Service in sync (issue 18's acceptance), through the whole gateway on its
//! embedded default: a device's life reaches a Dataverse stand-in that keeps the records it
//! is sent (and refuses a lookup to a record it does not hold) and a webhook; the outbox
//! replayed after a restart changes nothing; a 429 storm loses nothing and keeps each
//! record's order; a flapping device reaches the sinks as a handful of states.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use serde_json::{json, Map, Value};

use crate::support::*;

/// Every change-feed entity.
fn all_entities() -> Vec<String> {
    iotgw_config::CHANGE_FEED_ENTITIES
        .iter()
        .map(|e| (*e).to_owned())
        .collect()
}

/// A gateway on `dir` with a webhook and a dataverse sink taking every entity.
fn options(dir: &Path, hook: &Webhook, dv: &FakeDataverse) -> GatewayOptions {
    GatewayOptions {
        webhook: Some(hook.url()),
        webhook_entities: Some(all_entities()),
        dataverse: Some(dv.url()),
        dataverse_entities: Some(all_entities()),
        data_dir: Some(dir.to_owned()),
        ..Default::default()
    }
}

/// Waits until every sink's outbox is empty and returns the dead letters (there should be
/// none).
async fn drained(api: &Api) -> Vec<Value> {
    wait_for("the outbox to drain", || async {
        let m = api.metrics().await;
        (metric(&m, "iotgw_outbox_depth", &[]) == 0.0).then_some(())
    })
    .await;
    let (_, letters) = api.get("/api/v1/dead-letters?limit=100").await;
    letters["items"].as_array().cloned().unwrap_or_default()
}

/// Copies the SQLite store (with its WAL files) from `from` to `to`.
fn copy_store(from: &Path, to: &Path) {
    for name in ["iotgw.db", "iotgw.db-wal", "iotgw.db-shm"] {
        let src = from.join(name);
        let dst = to.join(name);
        if src.exists() {
            std::fs::copy(&src, &dst).expect("copy the store");
        } else if dst.exists() {
            std::fs::remove_file(&dst).expect("remove a stale WAL file");
        }
    }
}

/// `status` published on the device's status topic, as a device announces itself.
async fn announce(dev: &mut Device, id: &str, connected: bool, at: &str) {
    dev.publish_raw(
        &format!("devices/{id}/status"),
        json!({"connected": connected, "at": at})
            .to_string()
            .into_bytes(),
    )
    .await;
}

fn str_of<'a>(v: &'a Value, field: &str) -> &'a str {
    v[field]
        .as_str()
        .unwrap_or_else(|| panic!("{field} in {v}"))
}

/// The webhook's change events by record (`entity:key`), in arrival order.
fn events_by_record(hook: &Webhook) -> BTreeMap<String, Vec<Value>> {
    let mut out: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for p in hook.accepted() {
        let body = p.body;
        let record = if body.get("entity").is_some() {
            format!("{}:{}", str_of(&body, "entity"), str_of(&body, "key"))
        } else {
            // A new alert, in its envelope.
            format!(
                "msdyn_iotalert:{}",
                str_of(&body["data"], "msdyn_iotalertid")
            )
        };
        out.entry(record).or_default().push(body);
    }
    out
}

fn record<'a>(
    tables: &'a BTreeMap<String, BTreeMap<String, Map<String, Value>>>,
    set: &str,
    key: &str,
) -> &'a Map<String, Value> {
    tables
        .get(set)
        .and_then(|t| t.get(key))
        .unwrap_or_else(|| panic!("{set}({key}) in Dataverse: {tables:#?}"))
}

/// register -> telemetry -> alert + child -> command Sent -> disconnect -> unregister, with
/// both receivers down so every change waits in the outbox; then they come up and the
/// Dataverse stand-in ends holding exactly the records Field Service would (option values,
/// lookups that resolve), the webhook the same records' events in version order; then the
/// whole outbox, restored from before delivery, is delivered again after a restart and
/// changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn field_service_ends_holding_a_device_lifecycle_and_a_replayed_outbox_changes_nothing() {
    let dv = FakeDataverse::start().await;
    dv.check_binds(true);
    let hook = Webhook::start().await;
    let dir = tempfile::tempdir().expect("dir");
    let backup = tempfile::tempdir().expect("backup dir");
    dv.refuse_with(Some((
        axum::http::StatusCode::SERVICE_UNAVAILABLE,
        r#"{"error":{"code":"0x80040216","message":"Service unavailable."}}"#,
    )));
    hook.set_down(true);

    let gw = Gateway::start(options(dir.path(), &hook, &dv)).await;
    let api = gw.api();
    let (status, reg) = api
        .post(
            "/api/v1/devices",
            json!({"msdyn_deviceid": "sync-1", "msdyn_category": "chiller"}),
        )
        .await;
    assert_eq!(status, 201, "{reg}");
    let mut dev = Device::connect(gw.broker_port, "sync-1").await;
    announce(&mut dev, "sync-1", true, "2026-01-01T10:00:00Z").await;
    dev.publish_telemetry(json!({"message_id": "s-1", "temperature": 90}))
        .await;
    dev.publish_telemetry(json!({"message_id": "s-2", "temperature": 91}))
        .await;
    let cmd = dev.next_command().await;
    dev.reply(&cmd, true).await;
    wait_for("the rule's command to be Sent", || async {
        let (_, body) = api.get("/api/v1/commands?device_id=sync-1").await;
        body["items"].as_array().and_then(|i| {
            i.iter()
                .find(|c| c["msdyn_commandstatus"] == 192_350_001)
                .cloned()
        })
    })
    .await;
    announce(&mut dev, "sync-1", false, "2026-01-01T10:05:00Z").await;
    wait_for("the device to be disconnected", || async {
        let (_, d) = api.get("/api/v1/devices/sync-1").await;
        (d["msdyn_connectionstate"] == false).then_some(())
    })
    .await;
    let (status, d) = api.delete("/api/v1/devices/sync-1").await;
    assert_eq!(status, 200, "{d}");

    // What Field Service should end up holding: the gateway's own records.
    let (_, device) = api.get("/api/v1/devices/sync-1").await;
    let (_, history) = api.get("/api/v1/devices/sync-1/history").await;
    let history = history["items"].as_array().cloned().expect("history");
    let (_, alerts) = api.get("/api/v1/alerts?device_id=sync-1").await;
    let alerts = alerts["items"].as_array().cloned().expect("alerts");
    let (_, commands) = api.get("/api/v1/commands?device_id=sync-1").await;
    let commands = commands["items"].as_array().cloned().expect("commands");
    let (_, categories) = api.get("/api/v1/categories").await;
    let category = categories["items"]
        .as_array()
        .or_else(|| categories.as_array())
        .and_then(|c| c.iter().find(|c| c["msdyn_name"] == "chiller").cloned())
        .expect("the chiller category");
    assert_eq!(alerts.len(), 2, "{alerts:?}");
    assert_eq!(commands.len(), 1, "{commands:?}");
    assert!(dv.applied().is_empty(), "nothing reached Dataverse yet");
    drop(dev);
    gw.stop().await;
    copy_store(dir.path(), backup.path());

    // Both receivers up: the outbox drains, each record's changes in order.
    dv.refuse_with(None);
    hook.set_down(false);
    let gw = Gateway::start(options(dir.path(), &hook, &dv)).await;
    let api = gw.api();
    assert_eq!(drained(&api).await, Vec::<Value>::new(), "no dead letters");
    let tables = dv.tables();

    let device_id = str_of(&device, "msdyn_iotdeviceid");
    let d = record(&tables, "msdyn_iotdevices", device_id);
    assert_eq!(d["msdyn_deviceid"], "sync-1");
    assert_eq!(d["msdyn_registrationstatus"], 192_350_001, "Unregistered");
    assert_eq!(d["msdyn_connectionstate"], false);
    assert_eq!(
        d["msdyn_Category@odata.bind"],
        format!(
            "/msdyn_iotdevicecategories({})",
            str_of(&category, "msdyn_iotdevicecategoryid")
        )
    );
    let c = record(
        &tables,
        "msdyn_iotdevicecategories",
        str_of(&category, "msdyn_iotdevicecategoryid"),
    );
    assert_eq!(c["msdyn_name"], "chiller");

    let held_history = &tables["msdyn_iotdeviceregistrationhistories"];
    assert_eq!(held_history.len(), history.len(), "{held_history:#?}");
    for h in &history {
        let r = record(
            &tables,
            "msdyn_iotdeviceregistrationhistories",
            str_of(h, "msdyn_iotdeviceregistrationhistoryid"),
        );
        assert_eq!(r["msdyn_action"], h["msdyn_action"]);
        assert_eq!(
            r["msdyn_Device@odata.bind"],
            format!("/msdyn_iotdevices({device_id})")
        );
    }
    assert!(
        history.iter().any(|h| h["msdyn_action"] == 192_350_001),
        "an Unregister row: {history:?}"
    );

    assert_eq!(tables["msdyn_iotalerts"].len(), 2);
    let primary = alerts
        .iter()
        .find(|a| a["msdyn_parentalert"].is_null())
        .expect("a primary alert");
    let child = alerts
        .iter()
        .find(|a| !a["msdyn_parentalert"].is_null())
        .expect("a child alert");
    let command = &commands[0];
    let p = record(
        &tables,
        "msdyn_iotalerts",
        str_of(primary, "msdyn_iotalertid"),
    );
    assert_eq!(
        (p["statecode"].clone(), p["statuscode"].clone()),
        (json!(2), json!(5)),
        "In Progress - Command Sent: {p:?}"
    );
    assert_eq!(
        p["msdyn_LastCommandSent@odata.bind"],
        format!(
            "/msdyn_iotdevicecommands({})",
            str_of(command, "msdyn_iotdevicecommandid")
        )
    );
    assert_eq!(
        p["msdyn_Device@odata.bind"],
        format!("/msdyn_iotdevices({device_id})")
    );
    let ch = record(
        &tables,
        "msdyn_iotalerts",
        str_of(child, "msdyn_iotalertid"),
    );
    assert_eq!(
        ch["msdyn_ParentAlert@odata.bind"],
        format!("/msdyn_iotalerts({})", str_of(primary, "msdyn_iotalertid"))
    );
    assert_eq!(tables["msdyn_iotdevicecommands"].len(), 1);
    let cm = record(
        &tables,
        "msdyn_iotdevicecommands",
        str_of(command, "msdyn_iotdevicecommandid"),
    );
    assert_eq!(cm["msdyn_commandstatus"], 192_350_001, "Sent");
    assert_eq!(cm["msdyn_name"], command["msdyn_name"]);
    assert_eq!(
        cm["msdyn_ParentAlert@odata.bind"],
        format!("/msdyn_iotalerts({})", str_of(primary, "msdyn_iotalertid"))
    );
    assert_eq!(tables.len(), 5, "no other tables: {:?}", tables.keys());

    // The webhook: the same records, each one's events in version order ending in the
    // state the gateway holds, each Idempotency-Key once.
    let by_record = events_by_record(&hook);
    let mut expected_records = vec![
        format!("msdyn_iotdevice:sync-1"),
        format!(
            "msdyn_iotdevicecategory:{}",
            str_of(&category, "msdyn_iotdevicecategoryid")
        ),
        format!(
            "msdyn_iotdevicecommand:{}",
            str_of(command, "msdyn_iotdevicecommandid")
        ),
        format!("msdyn_iotalert:{}", str_of(primary, "msdyn_iotalertid")),
        format!("msdyn_iotalert:{}", str_of(child, "msdyn_iotalertid")),
    ];
    for h in &history {
        expected_records.push(format!(
            "msdyn_iotdeviceregistrationhistory:{}",
            str_of(h, "msdyn_iotdeviceregistrationhistoryid")
        ));
    }
    expected_records.sort();
    assert_eq!(
        by_record.keys().cloned().collect::<Vec<_>>(),
        expected_records
    );
    for (record, events) in &by_record {
        let versions: Vec<i64> = events
            .iter()
            .map(|e| e["version"].as_i64().unwrap_or(1))
            .collect();
        assert!(
            versions.windows(2).all(|w| w[0] < w[1]),
            "{record}: versions in order, each once: {versions:?}"
        );
    }
    let last = |r: &str| by_record[r].last().expect("an event")["state"].clone();
    assert_eq!(
        last("msdyn_iotdevice:sync-1")["msdyn_registrationstatus"],
        192_350_001
    );
    assert_eq!(
        last("msdyn_iotdevice:sync-1")["msdyn_connectionstate"],
        false
    );
    assert_eq!(
        last(&format!(
            "msdyn_iotdevicecommand:{}",
            str_of(command, "msdyn_iotdevicecommandid")
        ))["msdyn_commandstatus"],
        192_350_001
    );
    assert_eq!(
        last(&format!(
            "msdyn_iotalert:{}",
            str_of(primary, "msdyn_iotalertid")
        ))["statuscode"],
        5
    );
    let keys: Vec<String> = hook
        .accepted()
        .into_iter()
        .map(|p| p.idempotency_key)
        .collect();
    let mut distinct = keys.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), keys.len(), "each key once: {keys:?}");
    gw.stop().await;

    // The outbox as it was before delivery, replayed after a restart: every item is sent
    // again and nothing changes.
    copy_store(backup.path(), dir.path());
    let writes_before = dv.applied().len();
    let gw = Gateway::start(options(dir.path(), &hook, &dv)).await;
    let api = gw.api();
    assert_eq!(drained(&api).await, Vec::<Value>::new(), "no dead letters");
    assert!(
        dv.requests().len() > writes_before,
        "the outbox was delivered again"
    );
    assert_eq!(dv.tables(), tables, "the replay changed no record");
    let mut replayed: Vec<String> = hook
        .accepted()
        .into_iter()
        .map(|p| p.idempotency_key)
        .collect();
    assert!(
        replayed.len() > keys.len(),
        "the webhook got the outbox again"
    );
    replayed.sort();
    replayed.dedup();
    assert_eq!(
        replayed, distinct,
        "the same keys: a receiver dropping repeats is unchanged"
    );
    gw.stop().await;
}

/// Dataverse answers every request 429 with `Retry-After: 2` for 10 s while three devices
/// register, connect and raise alerts with commands: once it lets up, everything is
/// there, nothing dead-lettered, and each record's writes arrived in the order of its
/// changes (a command In Progress before Sent, never after).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_storm_loses_nothing_and_keeps_each_records_order() {
    let dv = FakeDataverse::start().await;
    dv.check_binds(true);
    let hook = Webhook::start().await;
    let dir = tempfile::tempdir().expect("dir");
    let gw = Gateway::start(options(dir.path(), &hook, &dv)).await;
    let api = gw.api();
    dv.throttle_for(Duration::from_secs(10), 2);
    let storm = std::time::Instant::now();
    let ids = ["storm-1", "storm-2", "storm-3"];
    let mut devices = Vec::new();
    for id in ids {
        api.register(id).await;
        let mut dev = Device::connect(gw.broker_port, id).await;
        announce(&mut dev, id, true, "2026-01-01T10:00:00Z").await;
        dev.publish_telemetry(json!({"message_id": format!("{id}-1"), "temperature": 95}))
            .await;
        let cmd = dev.next_command().await;
        dev.reply(&cmd, true).await;
        devices.push(dev);
    }
    wait_for("the three commands to be Sent", || async {
        let (_, body) = api.get("/api/v1/commands?limit=100").await;
        let items = body["items"].as_array().cloned().unwrap_or_default();
        (items
            .iter()
            .filter(|c| c["msdyn_commandstatus"] == 192_350_001)
            .count()
            == 3)
            .then_some(())
    })
    .await;
    assert!(dv.throttled() > 0, "the storm was met");
    if storm.elapsed() < Duration::from_secs(9) {
        assert!(dv.applied().is_empty(), "nothing got through the storm");
    }
    assert_eq!(drained(&api).await, Vec::<Value>::new(), "no dead letters");

    let tables = dv.tables();
    assert_eq!(tables["msdyn_iotdevices"].len(), 3);
    assert_eq!(tables["msdyn_iotdevicecommands"].len(), 3);
    assert_eq!(tables["msdyn_iotalerts"].len(), 3);
    for c in tables["msdyn_iotdevicecommands"].values() {
        assert_eq!(c["msdyn_commandstatus"], 192_350_001, "{c:?}");
    }
    for d in tables["msdyn_iotdevices"].values() {
        assert_eq!(d["msdyn_registrationstatus"], 192_350_003, "{d:?}");
        assert_eq!(d["msdyn_connectionstate"], true, "{d:?}");
    }
    // Per record, the writes in the order applied follow the order of its changes.
    let mut statuses: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    for a in dv.applied() {
        if a.set == "msdyn_iotdevicecommands" {
            statuses
                .entry(a.key)
                .or_default()
                .push(a.body["msdyn_commandstatus"].as_i64().expect("status"));
        }
    }
    for (key, s) in &statuses {
        assert!(
            s.windows(2).all(|w| w[0] <= w[1]),
            "command {key}: In Progress never after Sent: {s:?}"
        );
        assert_eq!(s.last(), Some(&192_350_001));
    }
    drop(devices);
    gw.stop().await;
}

/// 100 connect/disconnect pairs within a second reach each sink as at most a handful of
/// connection-state changes, the last one disconnected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flapping_device_reaches_the_sinks_as_a_handful_of_states_ending_in_the_last() {
    let dv = FakeDataverse::start().await;
    let hook = Webhook::start().await;
    let dir = tempfile::tempdir().expect("dir");
    let gw = Gateway::start(options(dir.path(), &hook, &dv)).await;
    let api = gw.api();
    api.register("flap-1").await;
    drained(&api).await;
    let before_hook = hook.accepted().len();
    let before_dv = dv.applied().len();
    let mut dev = Device::connect(gw.broker_port, "flap-1").await;
    // Millisecond times: the store keeps microseconds.
    let t0 = chrono::DurationRound::duration_trunc(
        chrono::Utc::now() - chrono::Duration::seconds(10),
        chrono::Duration::milliseconds(1),
    )
    .expect("a time");
    for i in 0..200 {
        let at = (t0 + chrono::Duration::milliseconds(5 * i)).to_rfc3339();
        announce(&mut dev, "flap-1", i % 2 == 0, &at).await;
    }
    wait_for("the last state to be applied", || async {
        let (_, d) = api.get("/api/v1/devices/flap-1").await;
        let updated = d["msdyn_connectionstateupdatedtime"]
            .as_str()
            .map(str::to_owned);
        let last = (t0 + chrono::Duration::milliseconds(5 * 199)).to_rfc3339();
        (d["msdyn_connectionstate"] == false
            && updated.is_some_and(|u| {
                chrono::DateTime::parse_from_rfc3339(&u).ok()
                    == chrono::DateTime::parse_from_rfc3339(&last).ok()
            }))
        .then_some(())
    })
    .await;
    assert_eq!(drained(&api).await, Vec::<Value>::new());
    let hook_events: Vec<Value> = hook.accepted()[before_hook..]
        .iter()
        .map(|p| p.body.clone())
        .collect();
    assert!(
        !hook_events.is_empty() && hook_events.len() <= 5,
        "a handful at most: {} events",
        hook_events.len()
    );
    assert_eq!(
        hook_events.last().expect("an event")["state"]["msdyn_connectionstate"],
        false
    );
    let dv_writes = dv.applied()[before_dv..].to_vec();
    assert!(
        !dv_writes.is_empty() && dv_writes.len() <= 5,
        "a handful at most: {dv_writes:?}"
    );
    assert_eq!(
        dv_writes.last().expect("a write").body["msdyn_connectionstate"],
        false
    );
    drop(dev);
    gw.stop().await;
}
