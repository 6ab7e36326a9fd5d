//! Replicas (issue 14, point 2): several gateways built from the same config share one
//! telemetry subscription, one streaming pull each; Pub/Sub spreads the messages over
//! them, and what a replica leaves unacked comes back to the others once its lease lapses.

use std::collections::HashSet;

use super::*;

/// Telemetry published while both replicas run.
const SHARED: usize = 400;
/// Published (once or more) while the second replica holds, never acks, what it receives.
const HELD_ROUND: usize = 50;
/// Published after the second replica stopped.
const AFTER_STOP: usize = 50;

/// Publishes telemetry number `from..from + n` (eight devices in turn) at once; their
/// Pub/Sub message ids, in order.
async fn publish_telemetry(
    publisher: &Publisher,
    config: &GcpPubSubConfig,
    from: usize,
    n: usize,
) -> Vec<String> {
    let pending: Vec<_> = (from..from + n)
        .map(|i| {
            publisher.publish(
                Message::new()
                    .set_data(format!(r#"{{"n":{i}}}"#))
                    .set_attributes([(
                        config.device_id_attribute.clone(),
                        format!("pump-{}", i % 8),
                    )]),
            )
        })
        .collect();
    let mut ids = Vec::with_capacity(n);
    for p in pending {
        ids.push(p.await.expect("published to the emulator"));
    }
    ids
}

/// The Pub/Sub message id and lease of a telemetry event from replica `who`.
fn telemetry_of(who: &str, ev: Option<ProviderEvent>) -> (String, AckHandle) {
    let ev = ev.unwrap_or_else(|| panic!("the event channel of replica {who} closed"));
    match ev.kind {
        EventKind::Telemetry(t) => {
            assert!(t.device_id.starts_with("pump-"), "{t:?}");
            (pubsub_id(&t.message_id).to_owned(), ev.ack)
        }
        other => panic!("replica {who}: unexpected event {other:?}"),
    }
}

/// Whether every id of `wanted` is in one of `seen`.
fn all_seen(wanted: &[String], seen: &[&HashSet<String>]) -> bool {
    wanted.iter().all(|id| seen.iter().any(|s| s.contains(id)))
}

#[tokio::test]
#[ignore = "flaky under parallel load, like receive.rs's crash test: in the clean-clone CI run of 2026-12-03 the emulator redelivered none of the stopped replica's messages within 55 s (alone: 0.02-20 s in six runs); run it with `cargo test -p iotgw-providers --features gcp_pubsub -- --ignored two_gateways`"]
async fn two_gateways_on_one_subscription_split_the_telemetry_and_the_survivor_gets_what_the_other_left_unacked(
) {
    let Some(emu) = emulator().await else {
        return;
    };
    // The emulator's minimum ack deadline: a lapsed lease is noticed soonest.
    let config = config(&emu, "replicas");
    assert_eq!(config.ack_deadline_secs, 10);
    let bridge = Bridge::new(&emu, &config);

    // Two replicas: the same config, each its own provider and event channel, started at
    // once (so both check and create the topics and subscriptions at the same time).
    let mut a = Running::start(provider(&config).await);
    let mut b = Running::start(provider(&config).await);
    let (pa, pb) = (a.provider.clone(), b.provider.clone());
    wait_until("both replicas connected", || {
        let (pa, pb) = (pa.clone(), pb.clone());
        async move { pa.health().connected && pb.health().connected }
    })
    .await;
    let publisher = bridge.publisher(&config.telemetry_topic).await;

    // 1. Both running: every message arrives, each at one replica or the other, and each
    // replica gets a share. Each is acked once received.
    let shared = publish_telemetry(&publisher, &config, 0, SHARED).await;
    assert_eq!(
        shared.iter().collect::<HashSet<_>>().len(),
        SHARED,
        "distinct ids"
    );
    let (mut got_a, mut got_b) = (HashSet::new(), HashSet::new());
    let mut duplicates = 0;
    let started = Instant::now();
    let deadline = started + 2 * WAIT;
    while !all_seen(&shared, &[&got_a, &got_b]) {
        tokio::select! {
            ev = a.events.recv() => {
                let (id, ack) = telemetry_of("a", ev);
                ack.ack();
                duplicates += usize::from(got_b.contains(&id) || !got_a.insert(id));
            }
            ev = b.events.recv() => {
                let (id, ack) = telemetry_of("b", ev);
                ack.ack();
                duplicates += usize::from(got_a.contains(&id) || !got_b.insert(id));
            }
            () = tokio::time::sleep_until(deadline) => panic!(
                "not every message within {:?}: a {}, b {} of {SHARED}",
                2 * WAIT, got_a.len(), got_b.len()
            ),
        }
    }
    println!(
        "shared phase: {SHARED} messages in {:?}: replica a {}, replica b {}, {duplicates} delivered twice",
        started.elapsed(),
        got_a.len(),
        got_b.len()
    );
    assert!(
        !got_a.is_empty() && !got_b.is_empty(),
        "both replicas get a share: a {}, b {}",
        got_a.len(),
        got_b.len()
    );

    // 2. Replica b holds what it receives from now on (its pipeline never commits it);
    // replica a still acks. Once every new message is at a or held by b (and b holds
    // some), b stops and goes away, its messages unacked.
    // The emulator hands each pull response to one stream in turn: a round may land at a
    // alone, then another is published.
    let mut round: Vec<String> = Vec::new();
    let mut held: Vec<AckHandle> = Vec::new();
    let mut held_ids = HashSet::new();
    while held.is_empty() {
        assert!(
            round.len() < 4 * HELD_ROUND,
            "replica b received nothing of {} messages",
            round.len()
        );
        round
            .extend(publish_telemetry(&publisher, &config, SHARED + round.len(), HELD_ROUND).await);
        let deadline = Instant::now() + 2 * WAIT;
        while !all_seen(&round, &[&got_a, &held_ids]) {
            tokio::select! {
                ev = a.events.recv() => {
                    let (id, ack) = telemetry_of("a", ev);
                    ack.ack();
                    got_a.insert(id);
                }
                ev = b.events.recv() => {
                    let (id, ack) = telemetry_of("b", ev);
                    held.push(ack);
                    held_ids.insert(id);
                }
                () = tokio::time::sleep_until(deadline) => panic!(
                    "the held round did not spread within {:?}: a {}, b holds {} of {}",
                    2 * WAIT,
                    round.iter().filter(|id| got_a.contains(*id)).count(),
                    held_ids.len(),
                    round.len()
                ),
            }
        }
    }
    let held_count = held_ids.len();
    let a_round = round.iter().filter(|id| got_a.contains(*id)).count();
    let stopping = Instant::now();
    b.stop().await.expect("replica b stops cleanly");
    let stop_took = stopping.elapsed();
    // Gone without a verdict: the handles go with the replica (dropping one nacks it, as
    // a stopping gateway's pipeline drops what it did not commit). Whether Pub/Sub acts on
    // those nacks or waits for b's leases to lapse, the messages must reach a.
    drop(held);
    drop(pb);
    let stopped = Instant::now();

    // 3. More telemetry; replica a receives it and what b left unacked. In the end a (plus
    // what b acked) has every message. Seen on emulator 0.8.20 (six runs): b's held
    // messages reach a at once (its nacks honoured) or one or two ack deadlines after b's
    // stop (nacks sent after its stream closed ignored, the lease lapses); the later ones
    // at once, or as late, when the emulator handed them to b's closed stream.
    let after = publish_telemetry(&publisher, &config, SHARED + round.len(), AFTER_STOP).await;
    let all: Vec<String> = shared.iter().chain(&round).chain(&after).cloned().collect();
    // One ack deadline after b's last lease extension in principle; the emulator may notice
    // a closed stream late (see the crash test in receive.rs), so allow four deadlines.
    let limit = Duration::from_secs(4 * u64::from(config.ack_deadline_secs)) + WAIT;
    let deadline = stopped + limit;
    let mut took_over = None;
    let mut after_at = None;
    while !all_seen(&all, &[&got_a, &got_b]) {
        let ev = tokio::time::timeout_at(deadline, a.events.recv())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "replica a lacks {} of b's {held_count} unacked and {} of the {AFTER_STOP} later messages {limit:?} after b stopped",
                    held_ids.iter().filter(|id| !got_a.contains(*id)).count(),
                    after.iter().filter(|id| !got_a.contains(*id)).count(),
                )
            });
        let (id, ack) = telemetry_of("a", ev);
        ack.ack();
        got_a.insert(id);
        if after_at.is_none() && after.iter().all(|id| got_a.contains(id)) {
            after_at = Some(stopped.elapsed());
        }
        if took_over.is_none() && held_ids.iter().all(|id| got_a.contains(id)) {
            took_over = Some(stopped.elapsed());
        }
    }
    println!(
        "held round of {}: replica a acked {a_round}, replica b held {held_count} (its stop took {stop_took:?}); \
         after b stopped, a had the {AFTER_STOP} later messages after {after_at:?} and b's unacked ones after {took_over:?}",
        round.len()
    );
    assert!(
        held_ids.iter().all(|id| got_a.contains(id)),
        "everything b left unacked reached a"
    );
    a.stop().await.expect("replica a stops cleanly");
}

#[tokio::test]
async fn replicas_starting_at_once_all_find_or_create_the_same_topics_and_subscriptions() {
    let Some(emu) = emulator().await else {
        return;
    };
    // Every replica sees the resources missing and creates them; all but one get
    // AlreadyExists, which counts as in place.
    let config = config(&emu, "race");
    let replicas = [
        provider(&config).await,
        provider(&config).await,
        provider(&config).await,
        provider(&config).await,
    ];
    let mut checks = tokio::task::JoinSet::new();
    for p in &replicas {
        let p = p.clone();
        checks.spawn(async move { p.ensure_resources().await });
    }
    while let Some(done) = checks.join_next().await {
        done.expect("no panic")
            .expect("every replica finds the resources in place");
    }
}
