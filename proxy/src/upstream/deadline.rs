//! An attempt's response deadline, on a timer that is reused.
//!
//! A new `Sleep` per attempt is put into tokio's timer wheel when it is
//! first polled and taken out when it is dropped: two locked wheel updates
//! per request (about 500 instructions of the request path's 24 000, more
//! than any other single step). Most attempts end long before their
//! deadline, so [`Deadline`] takes a timer that is still in the wheel from
//! this thread's cache and gives it back when the attempt ends. Such a timer
//! is set for an earlier deadline than the new one (an earlier attempt's);
//! when it fires before this one's, it is set again, once, for the rest.
//! So a cached timer goes through the wheel once per timeout period, not once
//! per request, and a deadline is never seen early. The price: a cached
//! timer that fires wakes the task that last polled it, for nothing, once.
//!
//! A timer belongs to the runtime it was made on: the cache is this
//! thread's, tagged with its runtime, and emptied when a thread runs another
//! one (a test's runtime after another's).

use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::runtime::{self, Handle};
use tokio::time::{Instant, Sleep};

/// Timers kept per thread: beyond this many attempts at once on one thread,
/// the rest are dropped when they end.
const CACHED: usize = 256;

/// A thread's idle timers, and the runtime they are on.
type Cache = Option<(runtime::Id, Vec<Pin<Box<Sleep>>>)>;

thread_local! {
    static CACHE: RefCell<Cache> = const { RefCell::new(None) };
}

/// Fires at its deadline, not before, however it was set.
pub struct Deadline {
    at: Instant,
    /// `None` only once dropped.
    sleep: Option<Pin<Box<Sleep>>>,
    /// The runtime the timer is on (`None`: none was current, and it is
    /// never cached).
    runtime: Option<runtime::Id>,
}

impl Deadline {
    /// A deadline at `at`. It must be polled within a tokio runtime with
    /// timers, as a `Sleep` must.
    pub fn new(at: Instant) -> Self {
        let runtime = Handle::try_current().ok().map(|h| h.id());
        let cached = runtime.and_then(|id| {
            CACHE
                .try_with(|c| {
                    let mut c = c.borrow_mut();
                    match &mut *c {
                        Some((of, timers)) if *of == id => timers.pop(),
                        // Another runtime's, or none yet.
                        _ => {
                            *c = Some((id, Vec::new()));
                            None
                        }
                    }
                })
                .ok()
                .flatten()
        });
        let sleep = match cached {
            // Still in the wheel for an earlier instant: kept as it is, and
            // set again if it fires first (`poll`).
            Some(s) if !s.is_elapsed() && s.deadline() <= at => s,
            Some(mut s) => {
                s.as_mut().reset(at);
                s
            }
            None => Box::pin(tokio::time::sleep_until(at)),
        };
        Deadline {
            at,
            sleep: Some(sleep),
            runtime,
        }
    }

    /// `Ready` once the deadline has passed. As `tokio::time::Timeout`
    /// does, the deadline is seen even when the task has used up its budget.
    pub fn poll(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let Some(sleep) = &mut self.sleep else {
            return Poll::Ready(());
        };
        loop {
            let fired = std::pin::pin!(tokio::task::unconstrained(sleep.as_mut()));
            std::task::ready!(fired.poll(cx));
            if sleep.deadline() >= self.at {
                return Poll::Ready(());
            }
            // An earlier attempt's deadline: the rest of this one's.
            sleep.as_mut().reset(self.at);
        }
    }
}

impl Drop for Deadline {
    fn drop(&mut self) {
        let (Some(id), Some(sleep)) = (self.runtime, self.sleep.take()) else {
            return;
        };
        let _ = CACHE.try_with(|c| {
            if let Some((of, timers)) = &mut *c.borrow_mut() {
                if *of == id && timers.len() < CACHED {
                    timers.push(sleep);
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    async fn wait(d: &mut Deadline) {
        std::future::poll_fn(|cx| d.poll(cx)).await;
    }

    fn cached() -> usize {
        CACHE.with_borrow(|c| c.as_ref().map_or(0, |(_, t)| t.len()))
    }

    #[tokio::test(start_paused = true)]
    async fn a_reused_timer_set_for_earlier_never_fires_early() {
        let start = Instant::now();
        drop(Deadline::new(start + Duration::from_millis(50)));
        assert_eq!(cached(), 1);
        let at = start + Duration::from_secs(2);
        let mut d = Deadline::new(at);
        assert_eq!(cached(), 0, "the cached timer is taken");
        wait(&mut d).await;
        assert!(
            Instant::now() >= at,
            "fired {:?} early",
            at - Instant::now()
        );
        drop(d);
        assert_eq!(cached(), 1, "and given back");
    }

    #[tokio::test(start_paused = true)]
    async fn a_reused_timer_set_for_later_fires_on_time() {
        let start = Instant::now();
        drop(Deadline::new(start + Duration::from_secs(60)));
        let at = start + Duration::from_secs(1);
        let mut d = Deadline::new(at);
        wait(&mut d).await;
        let late = Instant::now() - at;
        assert!(late < Duration::from_millis(10), "fired {late:?} late");
    }

    #[test]
    fn a_timer_is_not_reused_on_another_runtime() {
        let rt = || {
            tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .build()
                .unwrap()
        };
        rt().block_on(async {
            drop(Deadline::new(Instant::now() + Duration::from_secs(60)));
        });
        // The first runtime is gone: its timer must not be polled here.
        rt().block_on(async {
            let mut d = Deadline::new(Instant::now() + Duration::from_millis(5));
            assert_eq!(cached(), 0);
            wait(&mut d).await;
        });
    }
}
