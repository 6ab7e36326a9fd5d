//! The telemetry pipeline: provider events in, committed effects out, then the acks.
//!
//! # Layout
//! - [`prepare`]: the pure half. Each event is validated (device id, size, JSON) and run
//!   through the rules into the store write it asks for, or a dead letter naming why not.
//! - `batch`: the committing half. One store transaction commits a whole batch (group
//!   commit): last activity, alerts, debounce links, commands, outbox items, dead letters,
//!   connection states. Only then is every event of the batch acknowledged; if the commit
//!   fails, none is, and the providers redeliver.
//!
//! # Shape
//! ```text
//! events --> collector: prepares each event (pure) into the next batch; hands it over
//!            when the writer asks and it is full (pipeline.batch_max_events), or its
//!            oldest event waited pipeline.batch_max_wait_ms, or the input closed
//!        --> writer: commit_batch (one transaction) --> ack every event --> commands
//!        --> dispatcher: sends the rules' commands, at most commands.max_in_flight per
//!            provider instance; the writer never waits for it (what does not fit is
//!            left in the store for the command sweeper)
//! ```
//! One collector and one writer keep arrival order, so one device's events keep their
//! order, and a second alert of a device in the same batch becomes the child of the first
//! exactly as it would one commit at a time. The collector prepares the next batch while
//! the writer commits the current one, and the writer pulls: a batch is sealed only when
//! the writer is free, so the batch size follows the load (what arrived during the last
//! commit) and no event waits behind a sealed batch. SQLite has one writer anyway: one
//! transaction of 512 events costs about what one of a single event does.
//!
//! Bad input becomes a dead letter with the reason (then acked, so it is not redelivered
//! forever) inside the same transaction as the good events around it; a poison event never
//! fails its batch. A command is sent only after its telemetry is acked (a direct method
//! may wait for its device far longer than a cloud waits for an ack).

pub(crate) mod batch;
mod measures;
pub mod prepare;

use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use iotgw_providers::ProviderEvent;
use iotgw_registry::Command;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;
use tokio::time::Instant;

pub use prepare::{prepare, Reject};

use crate::core::Core;

/// Commands handed from the writer to the dispatcher and not taken yet. The writer never
/// waits for room: a command that does not fit stays in the store, In Progress and
/// unclaimed, and the command sweeper sends it (within `commands.retry_secs`).
const DISPATCH_QUEUE: usize = 1024;
/// Commands the dispatcher holds at once: being sent, or waiting for a slot of their
/// instance (`commands.max_in_flight` each). Beyond it, the sweeper sends them.
const DISPATCH_HELD: usize = 4096;

/// The running pipeline.
#[derive(Debug)]
pub struct Pipeline {
    tasks: JoinSet<Result<(), tokio::task::JoinError>>,
}

impl Pipeline {
    /// Waits until every batch is committed and every command dispatched (after the
    /// providers stopped and the event channel closed).
    pub async fn join(mut self) {
        while self.tasks.join_next().await.is_some() {}
    }
}

/// Group-commit limits, from `[pipeline]`.
#[derive(Debug, Clone, Copy)]
pub struct Batching {
    /// At most this many events per transaction.
    pub max_events: usize,
    /// How long a batch that is not full waits for more.
    pub max_wait: Duration,
}

impl Batching {
    /// From the configuration.
    pub fn from_config(c: &iotgw_config::PipelineConfig) -> Self {
        Self {
            max_events: c.batch_max_events.max(1),
            max_wait: Duration::from_millis(c.batch_max_wait_ms),
        }
    }
}

/// Starts the collector, the writer and the command dispatcher, fed from `events`.
pub fn spawn(
    core: Arc<Core>,
    events: mpsc::Receiver<ProviderEvent>,
    batching: Batching,
) -> Pipeline {
    let mut tasks = JoinSet::new();
    let (ready_tx, ready_rx) = mpsc::channel::<oneshot::Sender<batch::Batch>>(1);
    let (commands_tx, commands_rx) = mpsc::channel::<Command>(DISPATCH_QUEUE);
    let vitals = core.vitals.clone();
    tasks.spawn(vitals.spawn(
        "pipeline collector",
        None,
        collect(core.clone(), events, ready_rx, batching),
    ));
    tasks.spawn(vitals.spawn(
        "pipeline writer",
        None,
        write(core.clone(), ready_tx, commands_tx),
    ));
    tasks.spawn(vitals.spawn(
        "pipeline command dispatcher",
        None,
        dispatch(core, commands_rx),
    ));
    Pipeline { tasks }
}

/// Gathers events into a batch, preparing each as it arrives, and hands the batch over
/// when the writer asks for one and the batch is full, or as old as `max_wait`, or the
/// last one. While the writer commits, arriving events join the next batch, so a busy
/// store gets big batches and an idle one small, early ones: no event waits behind a
/// batch queued for a writer that is still busy.
async fn collect(
    core: Arc<Core>,
    mut events: mpsc::Receiver<ProviderEvent>,
    mut ready: mpsc::Receiver<oneshot::Sender<batch::Batch>>,
    batching: Batching,
) {
    let mut preparer = prepare::Preparer::new(core.live());
    let max = batching.max_events;
    let mut buf = Vec::with_capacity(max);
    let mut batch = batch::Batch::default();
    // When the oldest event of `batch` arrived.
    let mut oldest: Option<Instant> = None;
    // The writer, once it is free and asks for the next batch.
    let mut writer: Option<oneshot::Sender<batch::Batch>> = None;
    let mut open = true;
    loop {
        let full = batch.len() >= max;
        let deadline = oldest.map(|t| t + batching.max_wait);
        let aged = deadline.is_some_and(|d| Instant::now() >= d);
        if !batch.is_empty() && (full || aged || !open) {
            if let Some(w) = writer.take() {
                oldest = None;
                if w.send(std::mem::take(&mut batch)).is_err() {
                    return; // the writer is gone
                }
                continue;
            }
        }
        if !open && batch.is_empty() {
            return; // dropping `writer` tells the writer there is nothing more
        }
        tokio::select! {
            w = ready.recv(), if writer.is_none() => match w {
                Some(w) => writer = Some(w),
                None => return,
            },
            n = events.recv_many(&mut buf, max - batch.len()), if open && !full => {
                if n == 0 {
                    open = false;
                } else {
                    oldest.get_or_insert_with(Instant::now);
                }
                let live = core.live();
                if live.version != preparer.version() {
                    preparer = prepare::Preparer::new(live);
                }
                for ev in buf.drain(..) {
                    injected_collector_panic(&ev);
                    // A bug in preparing one event must not take the others down: the
                    // event's ack handle, dropped while unwinding, leaves it for
                    // redelivery, and the collector goes on.
                    let added = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        preparer.add(&core.metrics, &mut batch, ev);
                    }));
                    if let Err(panic) = added {
                        core.metrics.panic("prepare");
                        tracing::error!(panic = %crate::vitals::panic_message(panic.as_ref()), "preparing an event panicked; it is left for redelivery");
                    }
                }
            }
            () = tokio::time::sleep_until(deadline.unwrap_or_else(Instant::now)),
                if writer.is_some() && deadline.is_some() && !aged => {}
        }
    }
}

/// Asks the collector for batches, commits them in order, and hands their commands to
/// the dispatcher.
async fn write(
    core: Arc<Core>,
    ready: mpsc::Sender<oneshot::Sender<batch::Batch>>,
    commands: mpsc::Sender<Command>,
) {
    loop {
        let (tx, rx) = oneshot::channel();
        if ready.send(tx).await.is_err() {
            break;
        }
        let Ok(batch) = rx.await else {
            break; // the collector finished: every event is committed
        };
        let size = batch.len();
        let started = std::time::Instant::now();
        // A bug in one commit must not stop the writer: the batch's ack handles, dropped
        // while unwinding, leave its events for redelivery.
        let sent = match std::panic::AssertUnwindSafe(batch::commit(&core, batch))
            .catch_unwind()
            .await
        {
            Ok(sent) => sent,
            Err(panic) => {
                core.metrics.panic("commit");
                tracing::error!(events = size, panic = %crate::vitals::panic_message(panic.as_ref()), "committing a batch panicked; its events are left for redelivery");
                continue;
            }
        };
        core.metrics.batch(size, started.elapsed());
        for cmd in sent {
            match commands.try_send(cmd) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(cmd)) => {
                    core.metrics
                        .command(&cmd.provider_instance, "left_to_sweeper");
                    tracing::debug!(command = %cmd.id, "the command dispatcher is full; the sweeper sends this command");
                }
                Err(mpsc::error::TrySendError::Closed(cmd)) => {
                    tracing::error!(command = %cmd.id, "the command dispatcher stopped; the sweeper sends this command");
                }
            }
        }
    }
}

/// Sends the rules' commands: each waits for a slot of its own instance, so a slow
/// instance holds only its own slots and never delays the others' commands; at most
/// [`DISPATCH_HELD`] are held, the rest is left to the sweeper.
async fn dispatch(core: Arc<Core>, mut commands: mpsc::Receiver<Command>) {
    let mut running = JoinSet::new();
    while let Some(cmd) = commands.recv().await {
        while let Some(done) = running.try_join_next() {
            count_panic(&core, done);
        }
        if running.len() >= DISPATCH_HELD {
            core.metrics
                .command(&cmd.provider_instance, "left_to_sweeper");
            tracing::debug!(command = %cmd.id, "the command dispatcher holds {DISPATCH_HELD} commands; the sweeper sends this one");
            continue;
        }
        let sender = core.clone();
        running.spawn(async move {
            crate::commands::claim_and_deliver(&sender, &cmd).await;
        });
    }
    while let Some(done) = running.join_next().await {
        count_panic(&core, done);
    }
}

/// A command's delivery that panicked stays In Progress and claimed; the sweeper sends it
/// again once its claim ran out.
fn count_panic(core: &Core, done: Result<(), tokio::task::JoinError>) {
    if let Err(e) = done {
        if e.is_panic() {
            core.metrics.panic("command");
            tracing::error!(error = %e, "delivering a command panicked; the sweeper tries it again");
        }
    }
}

/// Fault injection for tests: configured `return(<instance>)`, the collector itself
/// panics on an event of that instance (outside the per-event catch), as a bug in its
/// loop would. Compiled out unless the `fail/failpoints` feature is on (tests only).
fn injected_collector_panic(ev: &ProviderEvent) {
    let _ = ev; // unused when the points are compiled out
    fail::fail_point!("pipeline-collector", |instance: Option<String>| {
        if instance.as_deref() == Some(ev.instance.as_str()) {
            panic!(
                "injected panic in the collector on an event of {}",
                ev.instance
            );
        }
    });
}
#[cfg(test)]
mod tests;
