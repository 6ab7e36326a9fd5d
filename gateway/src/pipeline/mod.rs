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
//! events --> collector: up to pipeline.batch_max_events, waiting at most
//!            pipeline.batch_max_wait_ms for more; prepares each event (pure)
//!        --> writer: commit_batch (one transaction) --> ack every event --> commands
//!        --> dispatcher: sends the rules' commands (bounded queue, bounded concurrency)
//! ```
//! One collector and one writer keep arrival order, so one device's events keep their
//! order, and a second alert of a device in the same batch becomes the child of the first
//! exactly as it would one commit at a time. The collector prepares the next batch while
//! the writer commits the current one. SQLite has one writer anyway: one transaction of
//! 512 events costs about what one of a single event does.
//!
//! Bad input becomes a dead letter with the reason (then acked, so it is not redelivered
//! forever) inside the same transaction as the good events around it; a poison event never
//! fails its batch. A command is sent only after its telemetry is acked (a direct method
//! may wait for its device far longer than a cloud waits for an ack).

mod batch;
pub mod prepare;

use std::sync::Arc;
use std::time::Duration;

use iotgw_providers::ProviderEvent;
use iotgw_registry::Command;
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinSet;

pub use prepare::{prepare, Reject};

use crate::core::Core;

/// Commands waiting for the dispatcher; beyond it the writer waits (back-pressure).
const DISPATCH_QUEUE: usize = 1024;
/// Commands being sent at once (a direct method may wait for its device).
const DISPATCH_CONCURRENCY: usize = 64;

/// The running pipeline.
#[derive(Debug)]
pub struct Pipeline {
    tasks: JoinSet<()>,
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
    let (batches_tx, batches_rx) = mpsc::channel::<batch::Batch>(1);
    let (commands_tx, commands_rx) = mpsc::channel::<Command>(DISPATCH_QUEUE);
    tasks.spawn(collect(core.clone(), events, batches_tx, batching));
    tasks.spawn(write(core.clone(), batches_rx, commands_tx));
    tasks.spawn(dispatch(core, commands_rx));
    Pipeline { tasks }
}

/// Gathers events into batches and prepares them.
async fn collect(
    core: Arc<Core>,
    mut events: mpsc::Receiver<ProviderEvent>,
    batches: mpsc::Sender<batch::Batch>,
    batching: Batching,
) {
    let preparer = prepare::Preparer::new(&core);
    let max = batching.max_events;
    let mut buf = Vec::with_capacity(max);
    loop {
        if events.recv_many(&mut buf, max).await == 0 {
            break;
        }
        if buf.len() < max && !batching.max_wait.is_zero() {
            let deadline = tokio::time::Instant::now() + batching.max_wait;
            while buf.len() < max {
                let room = max - buf.len();
                match tokio::time::timeout_at(deadline, events.recv_many(&mut buf, room)).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        }
        let mut batch = batch::Batch::default();
        for ev in buf.drain(..) {
            preparer.add(&core.rules, &core.metrics, &mut batch, ev);
        }
        if batches.send(batch).await.is_err() {
            break;
        }
    }
}

/// Commits batches in order and hands their commands to the dispatcher.
async fn write(
    core: Arc<Core>,
    mut batches: mpsc::Receiver<batch::Batch>,
    commands: mpsc::Sender<Command>,
) {
    while let Some(batch) = batches.recv().await {
        let size = batch.len();
        let started = std::time::Instant::now();
        let sent = batch::commit(&core, batch).await;
        core.metrics.batch(size, started.elapsed());
        for cmd in sent {
            if commands.send(cmd).await.is_err() {
                tracing::error!(
                    "the command dispatcher stopped; a committed command stays In Progress"
                );
            }
        }
    }
}

/// Sends the rules' commands, a bounded number at a time.
async fn dispatch(core: Arc<Core>, mut commands: mpsc::Receiver<Command>) {
    let slots = Arc::new(Semaphore::new(DISPATCH_CONCURRENCY));
    let mut running = JoinSet::new();
    while let Some(cmd) = commands.recv().await {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            break;
        };
        let core = core.clone();
        running.spawn(async move {
            core.dispatch(cmd).await;
            drop(slot);
        });
        while running.try_join_next().is_some() {}
    }
    while running.join_next().await.is_some() {}
}
#[cfg(test)]
mod tests;
