//! Timers kept in tokio's wheel across waits, for the request path.
//!
//! A `Sleep` goes into tokio's timer wheel when it is first polled and out
//! of it when it is reset to an earlier instant, fires, or is dropped: a
//! locked wheel update each, the costliest single steps of the request
//! path's own work. Most waits end long before their deadline, so a timer
//! is kept across waits: one set for an earlier instant than a new wait's
//! and still in the wheel is kept as it is ([`set_by`]), and set again only
//! if it fires first ([`fired_by`]). So it usually goes through the wheel
//! once per timeout period, not once per wait, and a deadline is never seen
//! early. (tokio's own `reset` to a later instant also leaves the wheel
//! alone, but turning the instant into a wheel tick costs about 115
//! instructions per request; the comparison here, about 10.)
//!
//! Two users: the edge's idle wait keeps one timer per connection
//! (`edge::h1::serve`), and each upstream attempt's response deadline
//! ([`Deadline`]) takes one from this thread's cache and gives it back when
//! the attempt ends.
//!
//! The cache's price, bounded by [`CACHED`] timers per thread:
//! - A cached timer that fires wakes the task that last polled it, for
//!   nothing, once.
//! - Until then it holds that task's waker, so a finished task's allocation
//!   (a few KiB) stays until the timer fires or is polled by its next user.
//!
//! A timer belongs to the runtime it was made on, and polling it on another
//! one panics. The cache is this thread's, tagged with its runtime's id, and
//! emptied when the thread runs another runtime (a test's after another's).
//! This relies on tokio not reusing a runtime id, which tokio 1.x does not
//! (ids come from a process-wide counter); re-check on a tokio upgrade.

use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::runtime::{self, Handle};
use tokio::time::{Instant, Sleep};

/// Sets `sleep` to fire by `at`: one still in the wheel for an earlier
/// instant is kept as it is, waker and all ([`fired_by`] sets it again if it
/// fires first). True when it was set now: it keeps no waker until polled.
pub fn set_by(sleep: Pin<&mut Sleep>, at: Instant) -> bool {
    if !sleep.is_elapsed() && sleep.deadline() <= at {
        return false;
    }
    sleep.reset(at);
    true
}

/// After `sleep` fired: true if `at` has come; false if it was set for an
/// earlier instant, and it is now set for `at` (to be polled again).
pub fn fired_by(sleep: Pin<&mut Sleep>, at: Instant) -> bool {
    if sleep.deadline() >= at {
        return true;
    }
    sleep.reset(at);
    false
}

/// Timers kept per thread: beyond this many attempts at once on one thread,
/// the rest are dropped when they end, as a plain `Sleep` would be.
const CACHED: usize = 64;

/// A thread's idle timers, and the runtime they are on.
type Cache = Option<(runtime::Id, Vec<Pin<Box<Sleep>>>)>;

thread_local! {
    static CACHE: RefCell<Cache> = const { RefCell::new(None) };
}

/// Fires at its deadline, not before, however its timer was set before.
pub struct Deadline {
    at: Instant,
    /// `None` only once dropped.
    sleep: Option<Pin<Box<Sleep>>>,
    /// The runtime the timer is on.
    runtime: runtime::Id,
}

impl Deadline {
    /// A deadline at `at`. Like `tokio::time::sleep_until`, it must be made
    /// within a tokio runtime with timers, and it panics otherwise.
    pub fn new(at: Instant) -> Self {
        let runtime = Handle::current().id();
        let cached = CACHE
            .try_with(|c| {
                let mut c = c.borrow_mut();
                match &mut *c {
                    Some((of, timers)) if *of == runtime => (timers.pop(), None),
                    // Another runtime's, or none yet: its timers are dropped
                    // once the cache is no longer borrowed.
                    _ => (None, c.replace((runtime, Vec::new()))),
                }
            })
            .ok()
            .and_then(|(cached, stale)| {
                drop(stale);
                cached
            });
        let sleep = match cached {
            Some(mut s) => {
                set_by(s.as_mut(), at);
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
            if fired_by(sleep.as_mut(), self.at) {
                return Poll::Ready(());
            }
        }
    }
}

impl Drop for Deadline {
    fn drop(&mut self) {
        let Some(sleep) = self.sleep.take() else {
            return;
        };
        // Not cached (another runtime's cache, or a full one): dropped
        // after the borrow ends, with the closure.
        let _ = CACHE.try_with(|c| {
            if let Some((of, timers)) = &mut *c.borrow_mut() {
                if *of == self.runtime && timers.len() < CACHED {
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

    /// As an attempt leaves it: polled once by a task of its own (so in the
    /// wheel, with that task's waker), then given back when the task ends.
    async fn leave_one_at(at: Instant) {
        let polled = tokio::spawn(async move {
            let mut d = Deadline::new(at);
            std::future::poll_fn(|cx| Poll::Ready(d.poll(cx))).await
        })
        .await
        .unwrap();
        assert!(polled.is_pending(), "{at:?} is still ahead");
    }

    #[tokio::test(start_paused = true)]
    async fn a_reused_timer_set_for_earlier_never_fires_early() {
        let start = Instant::now();
        leave_one_at(start + Duration::from_millis(50)).await;
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
        leave_one_at(start + Duration::from_secs(60)).await;
        assert_eq!(cached(), 1);
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
                .start_paused(true)
                .build()
                .unwrap()
        };
        rt().block_on(leave_one_at(Instant::now() + Duration::from_secs(60)));
        assert_eq!(cached(), 1);
        // The first runtime is gone: its timer must not be polled here (it
        // would panic), and it is dropped, not kept beside this one's.
        rt().block_on(async {
            let mut d = Deadline::new(Instant::now() + Duration::from_millis(5));
            wait(&mut d).await;
        });
        assert_eq!(cached(), 1, "only the second runtime's timer is kept");
    }
}
