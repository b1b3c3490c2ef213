//! Prefetch: whether a queued request may go to a backend that is already
//! at capacity, to wait in the worker's own queue for the next free thread.
//!
//! Why: under a strict cap a thread that finishes idles while Usher reads
//! the answer, picks the next request and writes it, and while the worker
//! parses it: on waitress with 8 ms views that is ~0.65 ms per request, ~7%
//! of the thread. One request waiting inside the worker covers that gap
//! (RabbitMQ's `prefetch_count`). Sent blindly (`max_in_flight: threads + 1`)
//! it is nginx: a short request parked behind long ones inside a worker,
//! where Usher can no longer move it.
//!
//! So an extra request goes out only while requests are queued (the
//! dispatcher asks only for a request that would otherwise wait), and only
//! to a backend one of whose threads is expected to free *soon*: within the
//! request's own expected service time (the horizon). That bounds the wait
//! an extra request can add inside a worker by what the request itself
//! costs, the same tolerance `shortest_first` grants through its ageing
//! term, and it is never behind threads that all run long requests: a long
//! request that just started is not expected to end within a short one's
//! horizon. A request already past its expected time by more than the
//! horizon says nothing about when it ends, so it does not count as soon.
//! With no estimates yet (expected 0), nothing is prefetched. `auto` sends
//! extras only where they pay and are known to wait rather than run (see
//! [`Policy::sends`]).
//!
//! This module is pure: the dispatcher keeps each in-flight request's start
//! and expected service time (under its lock) and asks [`fit`].

use crate::config::Prefetch;

/// `queue.prefetch` resolved for an upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Policy {
    /// Extras a backend may hold while requests are queued (capped at its
    /// capacity by [`fit`]).
    pub limit: u32,
    /// `auto`: only where it is known to pay and to be safe (see [`Policy::sends`]).
    pub auto: bool,
}

/// Under `auto`, the longest expected service time of a request sent as an
/// extra. The gap an extra covers is one proxy round trip plus the worker's
/// parse, ~0.65 ms on waitress: 7% of an 8 ms view, 1.3% at 50 ms, and under
/// 0.5% past 150 ms, where keeping the request movable (a thread elsewhere
/// may free first) is worth more.
pub const AUTO_MAX_EXPECTED: f64 = 0.050;

impl Policy {
    /// `auto` is 1, but 0 when other Usher replicas share the workers: their
    /// threads are counted by shares, and an extra would over-fill a worker
    /// another replica is also filling. An explicit number is honoured.
    pub fn new(setting: Prefetch, proxy_replicas: u32) -> Policy {
        match setting {
            Prefetch::Auto if proxy_replicas > 1 => Policy::default(),
            Prefetch::Auto => Policy {
                limit: 1,
                auto: true,
            },
            Prefetch::Fixed(limit) => Policy { limit, auto: false },
        }
    }

    /// Whether a request expected to take `expected` seconds may go as an
    /// extra to a backend whose capacity the worker reported itself
    /// (`thread_count_known`). `auto` needs that: only then is capacity the
    /// thread count, so that an extra waits in the worker rather than runs
    /// beside the others (`max_in_flight: N` may be below the threads on
    /// purpose; `default_capacity` is a guess). An explicit number is the
    /// operator saying the capacity is the thread count.
    pub fn sends(self, expected: f64, thread_count_known: bool) -> bool {
        self.limit > 0 && (!self.auto || (thread_count_known && expected <= AUTO_MAX_EXPECTED))
    }
}

/// How far ahead a backend's next free thread counts as "soon" for a request
/// expected to take `expected` seconds: that same time.
pub fn horizon(expected: f64) -> f64 {
    expected
}

/// One request in flight on a backend, as the policy sees it.
#[derive(Debug, Clone, Copy)]
pub struct Running {
    /// Seconds since it went out (or, for one that waited in the worker's
    /// queue, since a thread freed for it).
    pub elapsed: f64,
    /// Its class's expected service time, in seconds.
    pub expected: f64,
    /// False while it is an extra waiting in the worker's queue.
    pub on_thread: bool,
}

/// Whether a request expected to take `expected` seconds may go to a backend
/// with `in_flight` of `capacity` taken, as one of at most `limit` extras
/// (never more than one per thread). If so, how soon its thread is expected
/// to free, in seconds: the dispatcher picks the backend where that is least.
///
/// `None` when the backend still has room (that is a plain grant, not an
/// extra), when it holds its extras already, or when fewer of its threads
/// than extras waiting plus one are expected to free within the horizon.
pub fn fit(
    capacity: u32,
    in_flight: u32,
    limit: u32,
    running: impl IntoIterator<Item = Running>,
    expected: f64,
) -> Option<f64> {
    let limit = limit.min(capacity);
    if in_flight < capacity || in_flight - capacity >= limit {
        return None;
    }
    let waiting = in_flight - capacity;
    let h = horizon(expected);
    if !(h > 0.0 && h.is_finite()) {
        return None;
    }
    let (mut soon, mut first) = (0u32, f64::INFINITY);
    for r in running.into_iter().filter(|r| r.on_thread) {
        let left = r.expected - r.elapsed;
        if (-h..=h).contains(&left) {
            soon += 1;
            first = first.min(left.max(0.0));
        }
    }
    (soon > waiting).then_some(first)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn on(elapsed_ms: f64, expected_ms: f64) -> Running {
        Running {
            elapsed: elapsed_ms / 1000.0,
            expected: expected_ms / 1000.0,
            on_thread: true,
        }
    }

    #[test]
    fn a_short_request_may_wait_for_a_nearly_done_short_one() {
        // 2 threads: a 10 ms request 8 ms in, and a long one just started.
        let running = [on(8.0, 10.0), on(5.0, 1500.0)];
        let soon = fit(2, 2, 1, running, 0.010).unwrap();
        assert!((soon - 0.002).abs() < 1e-9, "{soon}");
    }

    #[test]
    fn never_behind_threads_that_all_run_long_requests() {
        let running = [on(100.0, 1500.0), on(300.0, 1500.0)];
        assert_eq!(fit(2, 2, 1, running, 0.010), None);
        // A long request may wait for them once one is within its horizon.
        assert!(fit(2, 2, 1, [on(1000.0, 1500.0), on(5.0, 1500.0)], 1.5).is_some());
        // A request far past its estimate tells nothing of when it ends.
        assert_eq!(
            fit(2, 2, 1, [on(900.0, 10.0), on(5.0, 1500.0)], 0.010),
            None
        );
    }

    #[test]
    fn no_room_beyond_the_limit_and_none_while_there_is_capacity() {
        let running = [on(9.0, 10.0), on(9.0, 10.0)];
        // Room below capacity is a plain grant, not prefetch.
        assert_eq!(fit(2, 1, 1, running, 0.010), None);
        // One extra waits already.
        let with_extra = [
            on(9.0, 10.0),
            on(9.0, 10.0),
            Running {
                on_thread: false,
                ..on(0.0, 10.0)
            },
        ];
        assert_eq!(fit(2, 3, 1, with_extra, 0.010), None);
        // With two allowed, a second needs a second thread freeing soon.
        assert!(fit(2, 3, 2, with_extra, 0.010).is_some());
        assert_eq!(fit(2, 3, 2, [on(9.0, 10.0), on(0.0, 1500.0)], 0.010), None);
        // Never more than one per thread, whatever the limit.
        assert_eq!(fit(1, 2, 5, [on(9.0, 10.0)], 0.010), None);
        // Strict cap.
        assert_eq!(fit(2, 2, 0, running, 0.010), None);
        assert_eq!(fit(0, 0, 1, [], 0.010), None);
    }

    #[test]
    fn without_estimates_nothing_is_prefetched() {
        assert_eq!(fit(2, 2, 1, [on(1.0, 0.0), on(1.0, 0.0)], 0.0), None);
    }

    #[test]
    fn auto_is_one_alone_and_zero_when_replicas_share_the_workers() {
        let auto = Policy::new(Prefetch::Auto, 1);
        assert_eq!(auto.limit, 1);
        assert_eq!(Policy::new(Prefetch::Auto, 3).limit, 0);
        assert!(!Policy::new(Prefetch::Auto, 3).sends(0.010, true));
        assert_eq!(Policy::new(Prefetch::Fixed(0), 1).limit, 0);
        assert_eq!(Policy::new(Prefetch::Fixed(2), 3).limit, 2);
    }

    #[test]
    fn auto_sends_short_requests_to_workers_that_report_their_threads() {
        let auto = Policy::new(Prefetch::Auto, 1);
        assert!(auto.sends(0.010, true));
        assert!(auto.sends(AUTO_MAX_EXPECTED, true));
        // A long view gains too little; a capacity not known to be the
        // thread count might let the extra run rather than wait.
        assert!(!auto.sends(0.200, true));
        assert!(!auto.sends(0.010, false));
        // An explicit number is honoured wherever.
        let one = Policy::new(Prefetch::Fixed(1), 1);
        assert!(one.sends(0.200, false));
        assert!(!Policy::new(Prefetch::Fixed(0), 1).sends(0.010, true));
    }
}
