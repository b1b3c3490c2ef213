//! When a failed attempt may be tried again, and how much retrying an
//! upstream may do.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use http::Method;

/// Methods that may be re-sent after the request may have reached a backend.
pub fn is_idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// Retry budget: retries may add at most `ratio` on top of first attempts,
/// plus a small floor, so a failing fleet is not hammered by retries.
#[derive(Debug)]
pub struct RetryBudget {
    state: std::sync::Mutex<(f64, Instant)>,
    /// Deposits not yet added to `state`: a request's share is one counter
    /// increment, where a lock is two atomics (`withdraw` adds them).
    deposits: AtomicU64,
    ratio: f64,
    floor_per_sec: f64,
}

impl RetryBudget {
    pub fn new(ratio: f64, floor_per_sec: f64) -> Self {
        RetryBudget {
            state: std::sync::Mutex::new((floor_per_sec, Instant::now())),
            deposits: AtomicU64::new(0),
            ratio,
            floor_per_sec,
        }
    }

    fn cap(&self) -> f64 {
        (self.floor_per_sec * 10.0).max(10.0) + 100.0 * self.ratio
    }

    fn refill(&self, s: &mut (f64, Instant)) {
        let now = Instant::now();
        let dt = now.duration_since(s.1).as_secs_f64();
        s.1 = now;
        s.0 = (s.0 + dt * self.floor_per_sec).min(self.cap());
    }

    /// One request's share. No clock read (one per request would be): the
    /// floor's credit for the time since the last refill is added when a
    /// retry asks (`withdraw`), under the same cap.
    pub fn deposit(&self) {
        self.deposits.fetch_add(1, Ordering::Relaxed);
    }

    pub fn withdraw(&self) -> bool {
        let mut s = self.state.lock().unwrap();
        // Each deposit adds `ratio` under the cap plus one share; all
        // positive, so adding them together clamps the same.
        let n = self.deposits.swap(0, Ordering::Relaxed);
        s.0 = (s.0 + n as f64 * self.ratio).min(self.cap() + self.ratio);
        self.refill(&mut s);
        if s.0 >= 1.0 {
            s.0 -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_are_a_share_of_the_requests_deposited() {
        let b = RetryBudget::new(0.2, 0.0);
        for _ in 0..10 {
            b.deposit();
        }
        // 10 requests at 0.2 each: 2 retries, not a third.
        assert!(b.withdraw());
        assert!(b.withdraw());
        assert!(!b.withdraw());
        for _ in 0..5 {
            b.deposit();
        }
        assert!(b.withdraw(), "5 more requests earn one more");
        assert!(!b.withdraw());
    }

    #[test]
    fn deposits_are_capped() {
        let b = RetryBudget::new(0.5, 0.0);
        for _ in 0..10_000 {
            b.deposit();
        }
        // The cap: max(0 * 10, 10) + 100 * 0.5 = 60, plus one share.
        let granted = (0..1000).take_while(|_| b.withdraw()).count();
        assert_eq!(granted, 60);
    }
}
