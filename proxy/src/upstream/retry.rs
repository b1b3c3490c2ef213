//! When a failed attempt may be tried again, and how much retrying an
//! upstream may do.

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
    ratio: f64,
    floor_per_sec: f64,
}

impl RetryBudget {
    pub fn new(ratio: f64, floor_per_sec: f64) -> Self {
        RetryBudget {
            state: std::sync::Mutex::new((floor_per_sec, Instant::now())),
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
        let mut s = self.state.lock().unwrap();
        s.0 = (s.0 + self.ratio).min(self.cap() + self.ratio);
    }

    pub fn withdraw(&self) -> bool {
        let mut s = self.state.lock().unwrap();
        self.refill(&mut s);
        if s.0 >= 1.0 {
            s.0 -= 1.0;
            true
        } else {
            false
        }
    }
}
