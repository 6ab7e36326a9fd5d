//! Which of the gateway's long-running tasks are still alive, for `/live`.
//!
//! Every task that must run as long as the gateway (the pipeline's collector, writer and
//! dispatcher, each provider's supervisor, the command sweeper) is spawned through
//! [`Vitals::spawn`]. One that ends while the gateway is not stopping and nobody asked it
//! to (it returned, or panicked past every catch inside it) is recorded with the reason;
//! `/live` then answers 503 naming it, so the orchestrator restarts a gateway that can no
//! longer do its work instead of leaving it half alive behind a 200.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use futures::FutureExt;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// The registry of tasks that ended before their time.
#[derive(Debug, Default)]
pub struct Vitals {
    stopping: AtomicBool,
    ended: Mutex<BTreeMap<String, String>>,
}

impl Vitals {
    /// Spawns `task` under `name`. Its end is expected once the gateway is stopping or
    /// `stop` (if any) is cancelled; any other end is recorded, with the panic's message
    /// if it panicked.
    pub fn spawn<F>(
        self: &std::sync::Arc<Self>,
        name: impl Into<String>,
        stop: Option<CancellationToken>,
        task: F,
    ) -> JoinHandle<()>
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let (vitals, name) = (self.clone(), name.into());
        tokio::spawn(async move {
            let outcome = std::panic::AssertUnwindSafe(task).catch_unwind().await;
            let asked = vitals.stopping.load(Ordering::Acquire)
                || stop.as_ref().is_some_and(CancellationToken::is_cancelled);
            if asked && outcome.is_ok() {
                return;
            }
            let reason = match outcome {
                Ok(()) => "ended on its own".to_owned(),
                Err(panic) => format!("panicked: {}", panic_message(panic.as_ref())),
            };
            tracing::error!(task = %name, %reason, "a gateway task is gone; /live fails until the process is restarted");
            vitals
                .ended
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .insert(name, reason);
        })
    }

    /// The gateway is stopping: tasks may end from now on.
    pub fn stopping(&self) {
        self.stopping.store(true, Ordering::Release);
    }

    /// The tasks that ended before their time, with why.
    pub fn ended(&self) -> BTreeMap<String, String> {
        self.ended
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

/// The text a panic carried (`panic!("...")` gives a `&str` or a `String`).
pub fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".to_owned())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[tokio::test]
    async fn a_task_that_panics_or_ends_unasked_is_recorded_and_one_that_was_stopped_is_not() {
        let vitals = Arc::new(Vitals::default());
        vitals
            .spawn("collector", None, async { panic!("a bug in the loop") })
            .await
            .expect("the wrapper itself does not panic");
        vitals
            .spawn("sweeper", None, async {})
            .await
            .expect("joined");
        let stop = CancellationToken::new();
        stop.cancel();
        vitals
            .spawn("provider edge", Some(stop), async {})
            .await
            .expect("joined");
        let ended = vitals.ended();
        assert_eq!(
            ended.keys().map(String::as_str).collect::<Vec<_>>(),
            ["collector", "sweeper"]
        );
        assert_eq!(ended["collector"], "panicked: a bug in the loop");
        assert_eq!(ended["sweeper"], "ended on its own");

        vitals.stopping();
        vitals
            .spawn("writer", None, async {})
            .await
            .expect("joined");
        assert_eq!(
            vitals.ended().len(),
            2,
            "tasks may end once the gateway stops"
        );
    }
}
