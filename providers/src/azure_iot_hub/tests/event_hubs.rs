//! The provider with NO injected event source, so the official client
//! (`azure_messaging_eventhubs`, through `AmqpEventSource`) reads the fake of the hub's
//! Event Hubs-compatible endpoint ([`FakeEventHubs`]) over plain AMQP: CBS put-token,
//! `$management` partition ids, one filtered receiver per partition, checkpoints,
//! redelivery after a nack, reconnection, a refused key. Plus a live test against a real
//! endpoint when a connection string is given.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use iotgw_config::azure_iot_hub::{EventHubsConfig, EventHubsStart};
use iotgw_config::Secret;
use serde_json::json;
use tokio::sync::mpsc;

use super::fake_hub::FakeHub;
use super::registry::config;
use super::{eventually, Run, DEADLINE};
use crate::azure_iot_hub::event_hubs::{EventSource, Position};
use crate::azure_iot_hub::event_hubs_client::AmqpEventSource;
use crate::azure_iot_hub::fakes::fake_event_hubs::{
    FakeEvent, FakeEventHubs, NAMESPACE, SAS_TOKEN_TYPE,
};
use crate::azure_iot_hub::AzureIotHubProvider;
use crate::{
    Checkpoints, EventKind, MemoryCheckpoints, MemoryOwnership, PartitionOwnership, Provider,
    ProviderError, Shutdown,
};

const ENTITY: &str = "iotgw-fake-hub";
const GROUP: &str = "iotgw";

fn event_hubs(fake: &FakeEventHubs, connection_string: String) -> EventHubsConfig {
    EventHubsConfig {
        connection_string: Secret::new(connection_string),
        consumer_group: GROUP.into(),
        start: EventHubsStart::Earliest,
        custom_endpoint: Some(fake.endpoint()),
        load_balancing_interval_ms: iotgw_config::azure_iot_hub::default_load_balancing_interval(),
        ownership_expiry_ms: iotgw_config::azure_iot_hub::default_ownership_expiry(),
    }
}

fn provider(
    hub: &FakeHub,
    eh: EventHubsConfig,
    checkpoints: Arc<dyn Checkpoints>,
) -> Arc<AzureIotHubProvider> {
    let mut cfg = config(hub);
    cfg.event_hubs = Some(eh);
    let p = AzureIotHubProvider::new(&crate::InstanceName::from("hub"), &cfg).expect("provider");
    p.set_checkpoints(checkpoints);
    Arc::new(p)
}

/// The checkpoint key of `partition` for provider "hub" in [`GROUP`].
fn key(partition: &str) -> String {
    format!("hub/{GROUP}/{partition}")
}

/// The provider of `hub` reading `eh` with the official client, running.
fn start(hub: &FakeHub, eh: &FakeEventHubs, checkpoints: Arc<dyn Checkpoints>) -> Run {
    start_with(hub, event_hubs(eh, eh.connection_string()), checkpoints)
}

fn start_with(hub: &FakeHub, config: EventHubsConfig, checkpoints: Arc<dyn Checkpoints>) -> Run {
    Run::spawn(provider(hub, config, checkpoints))
}

async fn checkpoint_is(checkpoints: &Arc<dyn Checkpoints>, partition: &str, offset: &str) {
    eventually(
        &format!("checkpoint of {partition} at {offset}"),
        || async {
            checkpoints
                .load(&key(partition))
                .await
                .ok()
                .flatten()
                .as_deref()
                == Some(offset)
        },
    )
    .await;
}

fn telemetry_id(kind: &EventKind) -> String {
    match kind {
        EventKind::Telemetry(t) => t.message_id.clone(),
        other => panic!("expected telemetry, got {other:?}"),
    }
}

#[tokio::test]
async fn telemetry_twin_changes_and_connection_states_published_in_the_fake_come_out_of_the_official_client(
) {
    let hub = FakeHub::start().await;
    let eh = FakeEventHubs::start(ENTITY, 2).await;
    let at: DateTime<Utc> = "2026-05-01T12:00:00.123456Z".parse().expect("time");
    eh.publish(FakeEvent::telemetry(
        "pump-1",
        "m-1",
        br#"{"temperature": 21.5}"#,
    ));
    eh.publish(FakeEvent::twin_change(
        "pump-2",
        &json!({"firmware": "1.2.3", "valve": {"open": true}}),
        7,
    ));
    eh.publish(FakeEvent::connection(
        "pump-3",
        true,
        "000000000000000001D4A1B2C3D4E5F60000000000000000000000000000000A",
        at,
    ));
    let mut run = start(&hub, &eh, Arc::new(MemoryCheckpoints::default()));
    let mut got = Vec::new();
    for _ in 0..3 {
        let ev = run.next("three events").await;
        got.push(ev.kind.clone());
        ev.ack.ack();
    }
    run.stop().await;

    // Partitions are read in parallel: find each event.
    let telemetry = got
        .iter()
        .find_map(|k| match k {
            EventKind::Telemetry(t) => Some(t.clone()),
            _ => None,
        })
        .expect("the telemetry");
    assert_eq!(
        (telemetry.device_id.as_str(), telemetry.message_id.as_str()),
        ("pump-1", "m-1")
    );
    assert_eq!(&telemetry.payload[..], br#"{"temperature": 21.5}"#);
    assert!(
        got.contains(&EventKind::Connection {
            device_id: "pump-3".into(),
            connected: true,
            at
        }),
        "{got:?}"
    );
    let reported = got
        .iter()
        .find_map(|k| match k {
            EventKind::ReportedProperties {
                device_id,
                properties,
                ..
            } => Some((device_id.clone(), properties.clone())),
            _ => None,
        })
        .expect("the reported properties");
    assert_eq!(
        reported,
        (
            "pump-2".into(),
            json!({"firmware": "1.2.3", "valve": {"open": true}})
        ),
        "without $metadata and $version"
    );

    let log = eh.log();
    assert!(
        log.sasl_mechanisms.iter().all(|m| m == "ANONYMOUS"),
        "{:?}",
        log.sasl_mechanisms
    );
    assert!(!log.put_tokens.is_empty());
    for t in &log.put_tokens {
        assert!(t.valid, "a put-token did not verify: {t:?}");
        assert_eq!(
            t.properties.get("type").map(String::as_str),
            Some(SAS_TOKEN_TYPE)
        );
        assert_eq!(
            t.properties.get("operation").map(String::as_str),
            Some("put-token")
        );
        assert!(
            t.token.starts_with(&format!(
                "SharedAccessSignature sr=amqps%3a%2f%2f{NAMESPACE}%2f{ENTITY}&sig="
            )),
            "the token is for the entity: {}",
            t.token
        );
    }
    let names: Vec<&str> = log
        .put_tokens
        .iter()
        .filter_map(|t| t.properties.get("name").map(String::as_str))
        .collect();
    let base = format!("amqps://{NAMESPACE}/{ENTITY}/ConsumerGroups/{GROUP}");
    assert!(
        names.contains(&format!("{base}/$management").as_str()),
        "{names:?}"
    );
    let read = log
        .management
        .iter()
        .find(|m| m.properties.get("type").map(String::as_str) == Some("com.microsoft:eventhub"))
        .expect("the partition ids were asked for");
    assert_eq!(read.status, 200);
    assert_eq!(
        read.properties.get("operation").map(String::as_str),
        Some("READ")
    );
    assert_eq!(
        read.properties.get("name").map(String::as_str),
        Some(ENTITY)
    );
    for p in ["0", "1"] {
        let source = format!("{base}/Partitions/{p}");
        assert!(names.contains(&source.as_str()), "a token for {source}");
        let r = log
            .receivers
            .iter()
            .find(|r| r.source == source)
            .unwrap_or_else(|| panic!("a receiver on {source}: {:?}", log.receivers));
        assert_eq!(
            r.filter.as_deref(),
            Some("amqp.annotation.x-opt-offset > '-1'"),
            "start earliest"
        );
        assert_eq!(r.refused, None);
    }
    assert!(log.errors.is_empty(), "{:?}", log.errors);
}

#[tokio::test]
async fn a_second_run_resumes_after_the_acked_events_and_a_nacked_event_is_delivered_again() {
    let hub = FakeHub::start().await;
    let eh = FakeEventHubs::start(ENTITY, 2).await;
    let checkpoints: Arc<dyn Checkpoints> = Arc::new(MemoryCheckpoints::default());
    let (p, _) = eh.publish(FakeEvent::telemetry("pump-1", "m-1", b"1"));
    let (_, second) = eh.publish(FakeEvent::telemetry("pump-1", "m-2", b"2"));
    let acked = eh.offset(&p, second).expect("offset of m-2");

    let mut run = start(&hub, &eh, checkpoints.clone());
    for want in ["m-1", "m-2"] {
        let ev = run.next(want).await;
        assert_eq!(telemetry_id(&ev.kind), want);
        ev.ack.ack();
    }
    checkpoint_is(&checkpoints, &p, &acked).await;
    run.stop().await;

    let (_, third) = eh.publish(FakeEvent::telemetry("pump-1", "m-3", b"3"));
    let mut run = start(&hub, &eh, checkpoints.clone());
    // Events come in order: m-1 or m-2 would come before m-3.
    let ev = run.next("m-3 after the restart").await;
    assert_eq!(telemetry_id(&ev.kind), "m-3", "the acked events stay acked");
    ev.ack.nack("not committed");
    let ev = run.next("m-3 again after the nack").await;
    assert_eq!(telemetry_id(&ev.kind), "m-3");
    ev.ack.ack();
    checkpoint_is(&checkpoints, &p, &eh.offset(&p, third).expect("offset")).await;
    run.stop().await;

    let resumed = format!("amqp.annotation.x-opt-offset >'{acked}'");
    let on_p: Vec<_> = eh
        .log()
        .receivers
        .into_iter()
        .filter(|r| r.source.ends_with(&format!("/Partitions/{p}")))
        .collect();
    assert!(
        on_p.iter()
            .filter(|r| r.filter.as_deref() == Some(resumed.as_str()))
            .count()
            >= 2,
        "the second run and the reopening after the nack start after the checkpoint: {on_p:?}"
    );
}

#[tokio::test]
async fn a_receiver_that_stalls_without_an_error_is_reopened_after_its_last_checkpoint() {
    let hub = FakeHub::start().await;
    let eh = FakeEventHubs::start(ENTITY, 2).await;
    let checkpoints: Arc<dyn Checkpoints> = Arc::new(MemoryCheckpoints::default());
    let (p, first) = eh.publish(FakeEvent::telemetry("pump-1", "s-1", b"1"));
    let mut run = start(&hub, &eh, checkpoints.clone());
    let ev = run.next("s-1").await;
    assert_eq!(telemetry_id(&ev.kind), "s-1");
    ev.ack.ack();
    checkpoint_is(&checkpoints, &p, &eh.offset(&p, first).expect("offset")).await;

    // The link stays attached and says nothing: the receiver sees neither an event nor an
    // error. The partition holds s-2, so the watchdog reopens the receiver.
    eh.freeze_open_links();
    let started = std::time::Instant::now();
    eh.publish(FakeEvent::telemetry("pump-1", "s-2", b"2"));
    let ev = run.next("s-2 through the reopened receiver").await;
    assert_eq!(
        telemetry_id(&ev.kind),
        "s-2",
        "s-1 was acked before and is not delivered again"
    );
    ev.ack.ack();
    assert!(
        started.elapsed() >= std::time::Duration::from_secs(5),
        "it took the stall checks, not a regular delivery: {:?}",
        started.elapsed()
    );
    run.stop().await;
}

#[tokio::test]
#[ignore = "times the official AMQP client's reconnect after a dropped connection (it stalled now and then: 1 of 7 runs on 2026-12-07, now recovered by the receiver watchdog, see a_receiver_that_stalls_...); scripts/test.sh runs it alone after the parallel run (QUIET_TESTS)"]
async fn events_published_after_the_connections_drop_still_arrive() {
    let hub = FakeHub::start().await;
    let eh = FakeEventHubs::start(ENTITY, 2).await;
    let checkpoints: Arc<dyn Checkpoints> = Arc::new(MemoryCheckpoints::default());
    let (p, first) = eh.publish(FakeEvent::telemetry("pump-1", "m-1", b"1"));
    let mut run = start(&hub, &eh, checkpoints.clone());
    let ev = run.next("m-1").await;
    assert_eq!(telemetry_id(&ev.kind), "m-1");
    ev.ack.ack();
    checkpoint_is(&checkpoints, &p, &eh.offset(&p, first).expect("offset")).await;

    let before = eh.log();
    eh.drop_connections();
    eh.publish(FakeEvent::telemetry("pump-1", "m-2", b"2"));
    let ev = run.next("m-2 after the drop").await;
    assert_eq!(
        telemetry_id(&ev.kind),
        "m-2",
        "m-1 was acked before the drop and is not delivered again"
    );
    ev.ack.ack();
    // The drop takes effect asynchronously in the fake: under load m-2 may still go out on
    // the old link before its connection task sees the cancellation. Either way the client
    // must reconnect and re-attach by itself, with the filter it was opened with (m-1 then
    // comes again on the link and AmqpEventSource skips it by its sequence number).
    let on_p = format!("/Partitions/{p}");
    eventually(
        "the client reconnected and re-attached the partition",
        || async {
            let after = eh.log();
            after.connections > before.connections
                && after.receivers[before.receivers.len()..].iter().any(|r| {
                    r.source.ends_with(&on_p)
                        && r.filter.as_deref() == Some("amqp.annotation.x-opt-offset > '-1'")
                })
        },
    )
    .await;
    assert!(
        run.next_within(Duration::from_secs(1)).await.is_none(),
        "m-1 was acked before the drop and is not delivered again"
    );
    run.stop().await;
}

#[tokio::test]
#[ignore = "times the official AMQP client's reconnect, which missed the 60 s deadline twice under the parallel load of a 2-core clean-clone CI run (2026-12-03, 2026-12-07) and takes ~7 s alone; scripts/test.sh runs it alone after the parallel run (QUIET_TESTS)"]
async fn starting_at_latest_loses_nothing_published_while_the_connection_is_down() {
    let hub = FakeHub::start().await;
    let eh = FakeEventHubs::start(ENTITY, 2).await;
    let checkpoints: Arc<dyn Checkpoints> = Arc::new(MemoryCheckpoints::default());
    let (p, _) = eh.publish(FakeEvent::telemetry("pump-1", "before", b"0"));
    let mut config = event_hubs(&eh, eh.connection_string());
    config.start = EventHubsStart::Latest;
    let mut run = start_with(&hub, config, checkpoints.clone());
    let on_p = format!("/Partitions/{p}");
    eventually("the receiver on the partition attached", || async {
        eh.log()
            .receivers
            .iter()
            .any(|r| r.source.ends_with(&on_p) && r.refused.is_none())
    })
    .await;
    let (_, first) = eh.publish(FakeEvent::telemetry("pump-1", "m-1", b"1"));
    let ev = run.next("m-1").await;
    assert_eq!(
        telemetry_id(&ev.kind),
        "m-1",
        "not what came before the start"
    );
    ev.ack.ack();
    checkpoint_is(&checkpoints, &p, &eh.offset(&p, first).expect("offset")).await;

    eh.drop_connections();
    // Published before the client is back.
    eh.publish(FakeEvent::telemetry("pump-1", "m-2", b"2"));
    let ev = run
        .next("m-2, published while the connection was down")
        .await;
    assert_eq!(telemetry_id(&ev.kind), "m-2");
    ev.ack.ack();
    run.stop().await;
}

#[tokio::test]
async fn a_wrong_key_in_the_event_hubs_connection_string_fails_run_as_unauthorized() {
    let hub = FakeHub::start().await;
    let eh = FakeEventHubs::start(ENTITY, 2).await;
    let wrong = eh.connection_string_with_key("d3Jvbmcta2V5LXdyb25nLWtleS13cm9uZy1rZXktIQ==");
    let p = provider(
        &hub,
        event_hubs(&eh, wrong),
        Arc::new(MemoryCheckpoints::default()),
    );
    let (tx, _rx) = mpsc::channel(4);
    let r = tokio::time::timeout(DEADLINE, p.run(tx, Shutdown::new()))
        .await
        .expect("run returns in time");
    match r {
        Err(ProviderError::Unauthorized { message, .. }) => {
            println!("{message}");
            assert!(
                message.contains("401") && message.contains("event_hubs.connection_string"),
                "{message}"
            )
        }
        other => panic!("expected Unauthorized, got {other:?}"),
    }
    let log = eh.log();
    assert!(
        !log.put_tokens.is_empty() && log.put_tokens.iter().all(|t| !t.valid),
        "{:?}",
        log.put_tokens
    );
    assert!(
        log.receivers.is_empty(),
        "nothing attached: {:?}",
        log.receivers
    );
}

/// Reads the partition ids through [`AmqpEventSource`] and opens a receiver on the first
/// one at `Latest`; the receiver attaches when first read.
async fn partitions_and_a_receiver_at_latest(
    config: &EventHubsConfig,
) -> (
    Vec<String>,
    Box<dyn crate::azure_iot_hub::event_hubs::PartitionReceiver>,
) {
    let source = AmqpEventSource::new("live", config);
    let partitions = tokio::time::timeout(DEADLINE, source.partitions())
        .await
        .expect("partition ids in time")
        .expect("partition ids");
    assert!(!partitions.is_empty());
    let rx = source
        .open(&partitions[0], Position::Latest)
        .await
        .expect("a receiver");
    (partitions, rx)
}

#[tokio::test]
async fn partition_ids_are_read_and_a_receiver_opens_after_the_last_event_on_the_fake() {
    let eh = FakeEventHubs::start(ENTITY, 3).await;
    let device = (0..)
        .map(|i| format!("pump-{i}"))
        .find(|d| eh.partition_of(d) == "0")
        .expect("a device on partition 0");
    eh.publish(FakeEvent::telemetry(&device, "old", b"0"));
    let (partitions, mut rx) =
        partitions_and_a_receiver_at_latest(&event_hubs(&eh, eh.connection_string())).await;
    assert_eq!(partitions, ["0", "1", "2"]);
    tokio::select! {
        r = rx.next() => panic!("nothing new was published, got {r:?}"),
        () = eventually("the receiver attached after the last event", || async {
            eh.log().receivers.iter().any(|r| {
                r.source.ends_with("/Partitions/0")
                    && r.filter.as_deref() == Some("amqp.annotation.x-opt-sequence-number >'0'")
                    && r.refused.is_none()
            })
        }) => {}
    }
    let read = eh
        .log()
        .management
        .into_iter()
        .find(|m| m.properties.get("type").map(String::as_str) == Some("com.microsoft:partition"))
        .expect("the partition's last event was asked for");
    assert_eq!(
        (
            read.status,
            read.properties.get("partition").map(String::as_str)
        ),
        (200, Some("0"))
    );
}

#[tokio::test]
async fn a_real_event_hubs_endpoint_is_read_when_a_connection_string_is_given() {
    let Ok(connection_string) = std::env::var("IOTGW_AZURE_EVENT_HUBS_CONNECTION_STRING") else {
        println!(
            "SKIPPED: a live Event Hubs-compatible endpoint is needed. Set \
             IOTGW_AZURE_EVENT_HUBS_CONNECTION_STRING to the hub's Event Hubs-compatible \
             connection string (Azure portal, IoT Hub, Built-in endpoints: \
             Endpoint=sb://...;SharedAccessKeyName=...;SharedAccessKey=...;EntityPath=...) and \
             optionally IOTGW_AZURE_EVENT_HUBS_CONSUMER_GROUP (default $Default), then run \
             `cargo test -p iotgw-providers --features azure_event_hubs --lib \
             a_real_event_hubs_endpoint_is_read_when_a_connection_string_is_given -- --nocapture`. \
             Nothing is published to the hub."
        );
        return;
    };
    let config = EventHubsConfig {
        connection_string: Secret::new(connection_string),
        consumer_group: std::env::var("IOTGW_AZURE_EVENT_HUBS_CONSUMER_GROUP")
            .unwrap_or_else(|_| "$Default".into()),
        start: EventHubsStart::Latest,
        custom_endpoint: None,
        load_balancing_interval_ms: iotgw_config::azure_iot_hub::default_load_balancing_interval(),
        ownership_expiry_ms: iotgw_config::azure_iot_hub::default_ownership_expiry(),
    };
    let (partitions, mut rx) = partitions_and_a_receiver_at_latest(&config).await;
    println!("partitions: {partitions:?}");
    // A receiver that fails to attach reports it on the first read; a quiet hub keeps it
    // waiting, which is what an open receiver does.
    match tokio::time::timeout(Duration::from_secs(10), rx.next()).await {
        Err(_) => println!("partition {} open, no new event in 10 s", partitions[0]),
        Ok(Ok(Some(e))) => println!(
            "partition {} open, event {} of {:?}",
            partitions[0],
            e.sequence_number,
            e.system.get("iothub-connection-device-id")
        ),
        Ok(Ok(None)) => panic!("the receiver closed"),
        Ok(Err(e)) => panic!("the receiver failed: {e}"),
    }
}

#[tokio::test]
async fn an_amqps_endpoint_is_opened_with_tls_checked_against_the_public_web_roots() {
    // The real endpoint is amqps:// on 5671. No fake speaks Event Hubs over TLS, but the C2D
    // fake serves TLS with a throwaway CA: the client must try TLS there (not plain AMQP,
    // not "TLS not compiled in") and refuse the certificate, which no public root signed.
    let tls = super::fake_amqp::FakeAmqp::start().await;
    let config = EventHubsConfig {
        connection_string: Secret::new(format!(
            "Endpoint=sb://{NAMESPACE}/;SharedAccessKeyName=iothubowner;SharedAccessKey=a2V5;EntityPath={ENTITY}"
        )),
        consumer_group: GROUP.into(),
        start: EventHubsStart::Earliest,
        custom_endpoint: Some(format!("amqps://127.0.0.1:{}", tls.port)),
        load_balancing_interval_ms: iotgw_config::azure_iot_hub::default_load_balancing_interval(),
        ownership_expiry_ms: iotgw_config::azure_iot_hub::default_ownership_expiry(),
    };
    let source = AmqpEventSource::new("tls", &config);
    let err = tokio::time::timeout(DEADLINE, source.partitions())
        .await
        .expect("an answer in time")
        .expect_err("a certificate from an unknown CA is refused");
    let text = err.to_string();
    println!("{text}");
    assert!(
        matches!(err, ProviderError::Transient { .. })
            && (text.contains("UnknownIssuer")
                || text.to_ascii_lowercase().contains("certificate")),
        "{text}"
    );
    assert!(
        tls.peek().sasl_mechanisms.is_empty(),
        "nothing reached AMQP over the refused TLS: {:?}",
        tls.peek()
    );
}

/// How many of the four partitions each replica holds an unexpired claim on.
async fn held(ownership: &MemoryOwnership) -> BTreeMap<String, usize> {
    let now = Utc::now();
    let mut by_owner = BTreeMap::new();
    for c in ownership.list().await.expect("list") {
        if !c.expired(now) {
            *by_owner.entry(c.owner).or_default() += 1;
        }
    }
    by_owner
}

/// Telemetry from devices spread so that every partition of `eh` gets `per_partition`
/// events; returns each event's message id by partition, in publishing order.
fn publish_round(
    eh: &FakeEventHubs,
    round: &str,
    per_partition: usize,
) -> BTreeMap<String, Vec<String>> {
    let mut by_partition: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for d in 0.. {
        let device = format!("pump-{d}");
        let partition = eh.partition_of(&device);
        let ids = by_partition.entry(partition).or_default();
        if ids.len() < per_partition {
            let message = format!("{round}-{d}");
            eh.publish(FakeEvent::telemetry(&device, &message, b"{}"));
            ids.push(message);
        }
        if by_partition.len() == PARTITIONS
            && by_partition.values().all(|v| v.len() == per_partition)
        {
            break;
        }
        assert!(d < 10_000, "devices spread over every partition");
    }
    by_partition
}

const PARTITIONS: usize = 4;

/// Reads the replicas' events in turn until `done` holds for what was seen (message id ->
/// the replicas that delivered it): a replica's events are acked when its flag says so,
/// else kept unacked in `unacked` (a gateway that has not committed them yet).
async fn read_until(
    replicas: &mut [(&'static str, &mut Run, bool)],
    unacked: &mut Vec<crate::ProviderEvent>,
    seen: &mut BTreeMap<String, Vec<&'static str>>,
    done: impl Fn(&BTreeMap<String, Vec<&'static str>>) -> bool,
) {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while !done(seen) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "events within {DEADLINE:?}: {seen:?}"
        );
        for (name, run, ack) in replicas.iter_mut() {
            if let Some(ev) = run.next_within(Duration::from_millis(20)).await {
                seen.entry(telemetry_id(&ev.kind)).or_default().push(*name);
                if *ack {
                    ev.ack.ack();
                } else {
                    unacked.push(ev);
                }
            }
        }
    }
}

#[tokio::test]
async fn two_replicas_split_the_partitions_and_the_survivor_of_a_kill_takes_over_within_the_expiry_losing_nothing(
) {
    let hub = FakeHub::start().await;
    let eh = FakeEventHubs::start(ENTITY, PARTITIONS).await;
    let ownership = Arc::new(MemoryOwnership::default());
    let checkpoints: Arc<dyn Checkpoints> = Arc::new(MemoryCheckpoints::default());
    let expiry = Duration::from_millis(1_000);
    let config = EventHubsConfig {
        load_balancing_interval_ms: 100,
        ownership_expiry_ms: expiry.as_millis() as u64,
        ..event_hubs(&eh, eh.connection_string())
    };
    let replica = |name: &str| {
        let p = provider(&hub, config.clone(), checkpoints.clone());
        p.set_ownership(ownership.clone(), name);
        Run::spawn(p)
    };
    let mut a = replica("replica-a");
    let mut b = replica("replica-b");
    eventually(
        "the replicas split the four partitions two and two",
        || async {
            held(&ownership).await
                == BTreeMap::from([("replica-a".to_owned(), 2), ("replica-b".to_owned(), 2)])
        },
    )
    .await;
    let a_partitions: Vec<String> = ownership
        .list()
        .await
        .expect("list")
        .into_iter()
        .filter(|c| c.owner == "replica-a")
        .map(|c| c.partition.rsplit('/').next().expect("id").to_owned())
        .collect();

    // Round 1: both read and ack their partitions' events; a's are checkpointed.
    let round1 = publish_round(&eh, "r1", 2);
    let mut seen = BTreeMap::new();
    let mut unacked = Vec::new();
    let all1: Vec<String> = round1.values().flatten().cloned().collect();
    read_until(
        &mut [("a", &mut a, true), ("b", &mut b, true)],
        &mut unacked,
        &mut seen,
        |s| all1.iter().all(|id| s.contains_key(id)),
    )
    .await;
    for p in &a_partitions {
        let last = i64::try_from(round1[p].len()).expect("fits") - 1;
        checkpoint_is(&checkpoints, p, &eh.offset(p, last).expect("offset")).await;
    }
    for (p, ids) in &round1 {
        let reader = if a_partitions.contains(p) { "a" } else { "b" };
        for id in ids {
            assert!(
                seen[id].contains(&reader),
                "{id} of partition {p} read by its owner: {:?}",
                seen[id]
            );
        }
    }

    // Round 2: a receives its events but dies before acking them.
    let round2 = publish_round(&eh, "r2", 2);
    let on_a: Vec<String> = a_partitions
        .iter()
        .flat_map(|p| round2[p].clone())
        .collect();
    read_until(
        &mut [("a", &mut a, false), ("b", &mut b, true)],
        &mut unacked,
        &mut seen,
        |s| on_a.iter().all(|id| s.contains_key(id)),
    )
    .await;
    a.kill().await;
    unacked.clear();
    let killed = tokio::time::Instant::now();

    eventually("replica-b holds all four partitions", || async {
        held(&ownership).await == BTreeMap::from([("replica-b".to_owned(), PARTITIONS)])
    })
    .await;
    let took = killed.elapsed();
    assert!(
        took < expiry * 3,
        "the dead replica's partitions were taken over {took:?} after the kill (claims expire after {expiry:?})"
    );

    // Every event of round 2 was committed (acked) by b: a's unacked ones came again, from
    // a's last checkpoint (round 1 is not read again).
    let all2: Vec<String> = round2.values().flatten().cloned().collect();
    let mut after = BTreeMap::new();
    let acked_by_b = |id: &String, after: &BTreeMap<String, Vec<&str>>| {
        after.contains_key(id) || seen.get(id).is_some_and(|r| r.contains(&"b"))
    };
    read_until(&mut [("b", &mut b, true)], &mut unacked, &mut after, |s| {
        on_a.iter().all(|id| s.contains_key(id)) && all2.iter().all(|id| acked_by_b(id, s))
    })
    .await;
    for id in &on_a {
        assert!(after.contains_key(id), "{id} redelivered to the survivor");
    }
    for id in round1.values().flatten() {
        assert!(
            !after.contains_key(id),
            "{id} was checkpointed by the dead replica and not read again"
        );
    }
    b.stop().await;
}
