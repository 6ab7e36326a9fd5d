//! Work that must happen however a scope ends: returned, panicked, or its future dropped.

/// Calls its closure once, when dropped. A receive loop holds one that marks the instance
/// stopped, so a loop that panics or is cancelled can be started again.
pub(crate) struct OnDrop<F: FnOnce()>(Option<F>);

impl<F: FnOnce()> OnDrop<F> {
    pub(crate) fn new(f: F) -> Self {
        Self(Some(f))
    }
}

impl<F: FnOnce()> Drop for OnDrop<F> {
    fn drop(&mut self) {
        if let Some(f) = self.0.take() {
            f();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::OnDrop;

    #[test]
    fn the_closure_runs_once_on_return_and_on_panic() {
        let calls = AtomicUsize::new(0);
        {
            let _g = OnDrop::new(|| {
                calls.fetch_add(1, Ordering::SeqCst);
            });
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _g = OnDrop::new(|| {
                calls.fetch_add(1, Ordering::SeqCst);
            });
            panic!("a receive loop's bug");
        }));
        assert!(caught.is_err());
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }
}
