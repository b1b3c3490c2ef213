//! An exchange that outlives its client.
//!
//! Once a request has a slot, it must run to its end on the backend and keep
//! the slot until the backend's thread is free, even if the client goes away
//! (hyper then drops the request's future). Spawning every exchange on its
//! own task would guarantee that, at the price of a task and a wake-up per
//! request. [`Detached`] runs the exchange inline instead, in the client's
//! task, and only when it is dropped before the end does it hand what is
//! left to a task of its own.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

type Boxed<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// A future that, dropped unfinished, is finished on a task of its own.
pub struct Detached<T: Send + 'static> {
    fut: Option<Boxed<T>>,
}

impl<T: Send + 'static> Detached<T> {
    /// Runs the future `make` returns; it is built in its box
    /// (`boxed::pin_with`).
    pub fn new<F: Future<Output = T> + Send + 'static>(make: impl FnOnce() -> F) -> Self {
        Detached {
            fut: Some(crate::boxed::pin_with(make)),
        }
    }
}

impl<T: Send + 'static> Future for Detached<T> {
    type Output = T;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T> {
        let fut = self.fut.as_mut().expect("polled after completion");
        let out = std::task::ready!(fut.as_mut().poll(cx));
        self.fut = None;
        Poll::Ready(out)
    }
}

impl<T: Send + 'static> Drop for Detached<T> {
    fn drop(&mut self) {
        if let Some(rest) = self.fut.take() {
            // Outside a runtime (its shutdown) there is nothing left to run on.
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(async move {
                    drop(rest.await);
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn finishes_inline_without_a_task() {
        let d = Detached::new(|| async { 7 });
        assert_eq!(d.await, 7);
    }

    #[tokio::test(start_paused = true)]
    async fn dropped_unfinished_it_still_runs_to_the_end() {
        let done = Arc::new(AtomicBool::new(false));
        let flag = done.clone();
        let d = Detached::new(move || async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            flag.store(true, Ordering::SeqCst);
        });
        // Polled once, then abandoned, as when a client hangs up.
        let abandoned = tokio::time::timeout(Duration::from_millis(10), d).await;
        assert!(abandoned.is_err());
        assert!(!done.load(Ordering::SeqCst));
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(done.load(Ordering::SeqCst), "the rest ran on its own task");
    }
}
