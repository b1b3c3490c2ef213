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
//! With no estimates yet (expected 0), nothing is prefetched.
//!
//! This module is pure: the dispatcher keeps each in-flight request's start
//! and expected service time (under its lock) and asks [`fit`].

use crate::config::Prefetch;

/// `queue.prefetch` resolved for an upstream: how many requests beyond its
/// capacity a backend may hold while requests are queued. `auto` is 1, but
/// 0 when other Usher replicas share the workers: their threads are counted
/// by shares, and an extra request would over-fill a worker another replica
/// is also filling. An explicit number is honoured (and capped at each
/// backend's capacity by [`fit`]).
pub fn limit(setting: Prefetch, proxy_replicas: u32) -> u32 {
    match setting {
        Prefetch::Auto if proxy_replicas > 1 => 0,
        Prefetch::Auto => 1,
        Prefetch::Fixed(n) => n,
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
        assert_eq!(limit(Prefetch::Auto, 1), 1);
        assert_eq!(limit(Prefetch::Auto, 3), 0);
        assert_eq!(limit(Prefetch::Fixed(0), 1), 0);
        assert_eq!(limit(Prefetch::Fixed(2), 3), 2);
    }
}
