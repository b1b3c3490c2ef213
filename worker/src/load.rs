//! Live load of one worker, shared by the async front and the thread pool.
//!
//! The front reads it to answer `/healthz`, `/metrics` and the `X-Usher-Load` header;
//! the pool threads write it. Busy accounting is an RAII guard ([`BusyGuard`]), so a
//! thread cannot forget to release its slot, not even when its handler panics.

use std::fmt;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use serde::{Deserialize, Serialize};

/// Counters written by the pool threads. The queue depth lives in the queue itself.
#[derive(Debug)]
pub(crate) struct Load {
    threads: usize,
    busy: AtomicUsize,
    peak_busy: AtomicUsize,
    served: AtomicU64,
}

impl Load {
    pub(crate) fn new(threads: usize) -> Self {
        Self {
            threads,
            busy: AtomicUsize::new(0),
            peak_busy: AtomicUsize::new(0),
            served: AtomicU64::new(0),
        }
    }

    pub(crate) fn threads(&self) -> usize {
        self.threads
    }

    /// Marks one thread busy until the guard is dropped.
    pub(crate) fn start_busy(&self) -> BusyGuard<'_> {
        let now = self.busy.fetch_add(1, Ordering::SeqCst) + 1;
        self.peak_busy.fetch_max(now, Ordering::SeqCst);
        BusyGuard { load: self }
    }

    pub(crate) fn snapshot(&self, queued: usize) -> LoadSnapshot {
        LoadSnapshot {
            threads: self.threads,
            busy: self.busy.load(Ordering::SeqCst),
            queued,
            served: self.served.load(Ordering::SeqCst),
            peak_busy: self.peak_busy.load(Ordering::SeqCst),
        }
    }
}

/// One thread's claim on the busy count; dropping it releases the claim.
pub(crate) struct BusyGuard<'a> {
    load: &'a Load,
}

impl BusyGuard<'_> {
    /// Counts the request as served. Called before the guard drops, so that an
    /// observer who sees the response also sees it counted.
    pub(crate) fn served(&self) {
        self.load.served.fetch_add(1, Ordering::SeqCst);
    }
}

impl Drop for BusyGuard<'_> {
    fn drop(&mut self) {
        self.load.busy.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A point-in-time view of a worker's load.
///
/// Serialises to the `/healthz` JSON, and [`Display`](fmt::Display)s as the
/// `X-Usher-Load` header value `threads=4, busy=1, queued=0`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoadSnapshot {
    /// Size of the thread pool.
    pub threads: usize,
    /// Threads running a handler right now.
    pub busy: usize,
    /// Requests waiting for a thread.
    pub queued: usize,
    /// Requests whose handler has finished (including ones that panicked).
    pub served: u64,
    /// The highest `busy` seen since the server started.
    pub peak_busy: usize,
}

impl fmt::Display for LoadSnapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "threads={}, busy={}, queued={}",
            self.threads, self.busy, self.queued
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guard_tracks_busy_and_peak() {
        let load = Load::new(4);
        {
            let a = load.start_busy();
            let _b = load.start_busy();
            assert_eq!(load.snapshot(0).busy, 2);
            a.served();
        }
        let s = load.snapshot(3);
        assert_eq!((s.busy, s.peak_busy, s.served, s.queued), (0, 2, 1, 3));
    }

    #[test]
    fn header_format() {
        let s = Load::new(4).snapshot(2);
        assert_eq!(s.to_string(), "threads=4, busy=0, queued=2");
    }

    #[test]
    fn healthz_json_shape() {
        let s = Load::new(4).snapshot(0);
        assert_eq!(
            serde_json::to_string(&s).unwrap(),
            r#"{"threads":4,"busy":0,"queued":0,"served":0,"peak_busy":0}"#
        );
    }
}
