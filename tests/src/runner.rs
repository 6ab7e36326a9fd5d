//! The tiny runner of the `harness = false` test binaries (`conformance`, `emulators`).
//!
//! They have their own `main` so that every test of the binary shares one async runtime
//! and one set of emulator containers, and so that they can print what libtest cannot (the
//! conformance matrix). Each case runs as its own task with a time limit; a panic or an
//! error is that case's failure, never the binary's.

use std::future::Future;
use std::time::{Duration, Instant};

/// How one case ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// It passed.
    Pass,
    /// It failed: why.
    Fail(String),
    /// It could not run here (Docker unreachable outside CI): why.
    Skip(String),
}

impl Outcome {
    /// Whether this is a failure.
    pub fn failed(&self) -> bool {
        matches!(self, Self::Fail(_))
    }
}

/// Runs `case` as a task with a time limit: its value, or why it failed (an error, a
/// panic, the limit), and how long it took.
pub async fn run_case<F, T>(name: &str, limit: Duration, case: F) -> (Result<T, String>, Duration)
where
    F: Future<Output = anyhow::Result<T>> + Send + 'static,
    T: Send + 'static,
{
    let started = Instant::now();
    let mut task = tokio::spawn(case);
    let result = match tokio::time::timeout(limit, &mut task).await {
        Ok(Ok(Ok(v))) => Ok(v),
        Ok(Ok(Err(e))) => Err(format!("{e:#}")),
        Ok(Err(join)) if join.is_panic() => Err(panic_message(join.into_panic())),
        Ok(Err(join)) => Err(format!("task ended abnormally: {join}")),
        Err(_) => {
            task.abort();
            Err(format!("{name} did not finish within {limit:?}"))
        }
    };
    (result, started.elapsed())
}

/// The text of a panic payload.
pub fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    match payload.downcast::<String>() {
        Ok(s) => format!("panicked: {s}"),
        Err(p) => match p.downcast::<&'static str>() {
            Ok(s) => format!("panicked: {s}"),
            Err(_) => "panicked".into(),
        },
    }
}

/// The last line CI reads: `N passed, N failed`.
pub fn summary_line(passed: usize, failed: usize) -> String {
    format!("{passed} passed, {failed} failed")
}

/// A multi-thread runtime for a test binary's `main`.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime for the test binary")
}
