//! Waiting on conditions with deadlines.

use std::future::Future;
use std::time::Duration;

/// How long any wait of the behaviour tests may take before the test fails.
pub const DEADLINE: Duration = Duration::from_secs(20);

/// Polls `f` every 50 ms until it returns `Some`, panicking after [`DEADLINE`] with `what`.
pub async fn wait_for<T, F, Fut>(what: &str, f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    match poll_until(DEADLINE, f).await {
        Some(v) => v,
        None => panic!("timed out after {DEADLINE:?} waiting for {what}"),
    }
}

/// Polls `f` every 50 ms until it returns `Some` or `limit` passes (then `None`).
pub async fn poll_until<T, F, Fut>(limit: Duration, mut f: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(v) = f().await {
            return Some(v);
        }
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Like [`poll_until`], but an error naming `what` (and the last value seen, via
/// `last`) instead of `None`: for code that reports failures instead of panicking.
pub async fn until<T, F, Fut>(what: &str, limit: Duration, f: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    poll_until(limit, f)
        .await
        .ok_or_else(|| anyhow::anyhow!("timed out after {limit:?} waiting for {what}"))
}

/// A free loopback port.
pub fn free_port() -> u16 {
    iotgw_testkit::free_port()
}
