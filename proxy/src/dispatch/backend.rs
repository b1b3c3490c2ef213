//! One backend process: its address, its capacity and its health.
//!
//! A backend's *capacity* is how many requests it may hold at once from this
//! Usher: one per worker thread. It comes from `max_in_flight: N`, or from the
//! worker's own `X-Usher-Load: threads=N` report, or from the upstream's
//! `default_capacity`. The in-flight count itself is only changed by the
//! dispatcher, under its lock (see `dispatch.rs`); here it is just stored.
//!
//! Health has two inputs that are kept apart: the active check's verdict
//! (`up`), and passive ejection after consecutive gateway failures. A backend
//! takes new requests only when it is up, not ejected and not draining.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Parses `X-Usher-Load: threads=4, busy=3, queued=0` and returns `threads`.
pub fn parse_load_threads(v: &str) -> Option<u32> {
    v.split(',').find_map(|kv| {
        let (k, v) = kv.trim().split_once('=')?;
        (k.trim() == "threads")
            .then(|| v.trim().parse().ok())
            .flatten()
    })
}

#[derive(Debug)]
pub struct Backend {
    pub addr: SocketAddr,
    /// `ip:port`, the label in metrics and the key that carries state across reloads.
    pub key: String,
    /// `key` as a URI authority, for requests to this backend (parsed once).
    pub authority: http::uri::Authority,
    weight: AtomicU32,
    /// `max_in_flight: N`; 0 means `auto`.
    fixed_capacity: AtomicU32,
    default_capacity: AtomicU32,
    /// Usher replicas sharing this backend; this one takes `ceil(cap / share)`.
    share: AtomicU32,
    /// Capacity from the worker's load report; 0 while it reported nothing.
    reported_capacity: AtomicU32,
    in_flight: AtomicU32,
    /// Open upgraded (WebSocket) connections; see `upgrade.rs`.
    upgraded: AtomicU32,
    up: AtomicBool,
    draining: AtomicBool,
    ejection: Mutex<Ejection>,
    /// End of the current ejection in µs since `epoch` (0: never ejected),
    /// mirrored from `ejection` so the per-request "may it take requests?"
    /// check takes no lock.
    ejected_until_us: AtomicU64,
    /// Consecutive gateway failures; a success resets it without a lock.
    failure_run: AtomicU32,
    /// Slow start: capacity ramps from 1 to full between these instants (ms since `epoch`).
    slow_start_until_ms: AtomicU64,
    slow_start_ms: AtomicU64,
    epoch: Instant,
    /// Its per-request metric handles (set once by `state.rs`).
    metrics: std::sync::OnceLock<crate::observe::metrics::BackendMetrics>,
}

#[derive(Debug, Default)]
struct Ejection {
    times_ejected: u32,
    until: Option<Instant>,
    /// The ejection was for refused connections: a passing active health
    /// check (the backend answers again) ends it early.
    unreachable: bool,
}

/// What passive health decided about one outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Fine,
    Ejected(Duration),
}

impl Backend {
    pub fn new(
        addr: SocketAddr,
        weight: u32,
        fixed_capacity: Option<u32>,
        default_capacity: u32,
    ) -> Self {
        Backend {
            addr,
            key: addr.to_string(),
            authority: addr
                .to_string()
                .parse()
                .expect("a socket address is a valid URI authority"),
            weight: AtomicU32::new(weight.max(1)),
            fixed_capacity: AtomicU32::new(fixed_capacity.unwrap_or(0)),
            default_capacity: AtomicU32::new(default_capacity.max(1)),
            share: AtomicU32::new(1),
            reported_capacity: AtomicU32::new(0),
            in_flight: AtomicU32::new(0),
            upgraded: AtomicU32::new(0),
            up: AtomicBool::new(true),
            draining: AtomicBool::new(false),
            ejection: Mutex::new(Ejection::default()),
            ejected_until_us: AtomicU64::new(0),
            failure_run: AtomicU32::new(0),
            slow_start_until_ms: AtomicU64::new(0),
            slow_start_ms: AtomicU64::new(0),
            epoch: Instant::now(),
            metrics: std::sync::OnceLock::new(),
        }
    }

    /// Open upgraded connections.
    pub fn upgraded(&self) -> u32 {
        self.upgraded.load(Ordering::Relaxed)
    }

    /// Counts one more upgraded connection if fewer than `max` are open.
    pub fn try_inc_upgraded(&self, max: u32) -> bool {
        self.upgraded
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| {
                (n < max).then_some(n + 1)
            })
            .is_ok()
    }

    pub fn dec_upgraded(&self) {
        self.upgraded.fetch_sub(1, Ordering::AcqRel);
    }

    pub fn with_slow_start(self, d: Duration) -> Self {
        self.set_slow_start(d);
        self
    }

    pub fn set_slow_start(&self, d: Duration) {
        self.slow_start_ms
            .store(d.as_millis() as u64, Ordering::Relaxed);
    }

    /// This Usher's share of the backend's threads when `replicas` Ushers
    /// send to it.
    pub fn set_share(&self, replicas: u32) {
        self.share.store(replicas.max(1), Ordering::Relaxed);
    }

    /// Full capacity (this replica's share), before slow start.
    pub fn full_capacity(&self) -> u32 {
        let share = self.share.load(Ordering::Relaxed).max(1);
        self.threads().div_ceil(share).max(1)
    }

    /// The backend's own capacity: configured, reported or default.
    fn threads(&self) -> u32 {
        match self.fixed_capacity.load(Ordering::Relaxed) {
            0 => {}
            n => return n,
        }
        match self.reported_capacity.load(Ordering::Relaxed) {
            0 => self.default_capacity.load(Ordering::Relaxed),
            n => n,
        }
    }

    /// Capacity now, with slow start applied.
    pub fn capacity(&self) -> u32 {
        let full = self.full_capacity();
        let until = self.slow_start_until_ms.load(Ordering::Relaxed);
        let span = self.slow_start_ms.load(Ordering::Relaxed);
        if until == 0 || span == 0 {
            return full;
        }
        let now = self.epoch.elapsed().as_millis() as u64;
        if now >= until {
            return full;
        }
        let elapsed = span - (until - now).min(span);
        let ramp = 1 + (u64::from(full - 1) * elapsed / span) as u32;
        ramp.clamp(1, full)
    }

    /// Records the worker's own thread count. Returns true if capacity grew.
    pub fn report_threads(&self, threads: u32) -> bool {
        if threads == 0 || threads > 100_000 {
            return false;
        }
        let before = self.full_capacity();
        self.reported_capacity.store(threads, Ordering::Relaxed);
        self.full_capacity() > before
    }

    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Only the dispatcher calls these, under its lock.
    pub(crate) fn inc(&self) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn dec(&self) {
        let prev = self.in_flight.fetch_sub(1, Ordering::Relaxed);
        debug_assert!(prev > 0, "in-flight underflow on {}", self.key);
    }

    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    /// Sets the active health verdict; returns true if it changed. A backend
    /// that comes back up starts slow.
    pub fn set_up(&self, up: bool) -> bool {
        let changed = self.up.swap(up, Ordering::Relaxed) != up;
        if changed && up {
            self.start_slow();
        }
        changed
    }

    pub fn start_slow(&self) {
        let span = self.slow_start_ms.load(Ordering::Relaxed);
        if span > 0 {
            let now = self.epoch.elapsed().as_millis() as u64;
            self.slow_start_until_ms
                .store(now + span, Ordering::Relaxed);
        }
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    pub fn set_draining(&self, d: bool) {
        self.draining.store(d, Ordering::Relaxed);
    }

    fn micros(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.epoch).as_micros() as u64
    }

    fn set_ejected_until(&self, e: &mut Ejection, until: Instant) {
        e.until = Some(until);
        self.ejected_until_us
            .store(self.micros(until).max(1), Ordering::Relaxed);
    }

    pub fn is_ejected(&self, now: Instant) -> bool {
        let until = self.ejected_until_us.load(Ordering::Relaxed);
        until != 0 && self.micros(now) < until
    }

    /// May this backend take new requests?
    pub fn is_available(&self, now: Instant) -> bool {
        self.is_up() && !self.is_draining() && !self.is_ejected(now)
    }

    /// `up`, as exported in `usher_backend_up`: takes traffic now.
    pub fn state(&self, now: Instant) -> &'static str {
        if self.is_draining() {
            "draining"
        } else if !self.is_up() {
            "down"
        } else if self.is_ejected(now) {
            "ejected"
        } else {
            "up"
        }
    }

    pub fn record_success(&self) {
        if self.failure_run.load(Ordering::Relaxed) != 0 {
            self.failure_run.store(0, Ordering::Relaxed);
        }
    }

    /// An active health check passed: an ejection for refused connections
    /// ends now (the process is back); one for bad answers runs its course.
    /// Returns true if the backend was readmitted.
    pub fn health_check_passed(&self, now: Instant) -> bool {
        let mut e = self.ejection.lock().unwrap();
        if e.unreachable && e.until.is_some_and(|t| now < t) {
            self.set_ejected_until(&mut e, now);
            e.unreachable = false;
            return true;
        }
        false
    }

    /// Counts a gateway failure. After `threshold` in a row the backend is
    /// ejected for `base × times_ejected` (capped), if `may_eject` allows it.
    pub fn record_failure(
        &self,
        threshold: u32,
        base: Duration,
        max: Duration,
        may_eject: bool,
        now: Instant,
    ) -> Verdict {
        self.record_failure_kind(threshold, base, max, may_eject, now, false)
    }

    /// [`Backend::record_failure`] for a refused connection: such an
    /// ejection ends early when an active health check passes.
    pub fn record_unreachable(
        &self,
        base: Duration,
        max: Duration,
        may_eject: bool,
        now: Instant,
    ) -> Verdict {
        self.record_failure_kind(1, base, max, may_eject, now, true)
    }

    fn record_failure_kind(
        &self,
        threshold: u32,
        base: Duration,
        max: Duration,
        may_eject: bool,
        now: Instant,
        unreachable: bool,
    ) -> Verdict {
        let mut e = self.ejection.lock().unwrap();
        if e.until.is_some_and(|t| now < t) {
            return Verdict::Fine;
        }
        // A backend that behaved for `max` since its last ejection starts
        // over: the multiplier punishes flapping, not one bad day.
        if e.until.is_some_and(|t| now.duration_since(t) > max) {
            e.times_ejected = 0;
        }
        let run = self.failure_run.fetch_add(1, Ordering::Relaxed) + 1;
        if run < threshold.max(1) || !may_eject {
            return Verdict::Fine;
        }
        e.times_ejected += 1;
        self.failure_run.store(0, Ordering::Relaxed);
        e.unreachable = unreachable;
        let d = base.saturating_mul(e.times_ejected).min(max);
        self.set_ejected_until(&mut e, now + d);
        drop(e);
        self.start_slow_after(d);
        Verdict::Ejected(d)
    }

    fn start_slow_after(&self, d: Duration) {
        let span = self.slow_start_ms.load(Ordering::Relaxed);
        if span > 0 {
            let at = (self.epoch.elapsed() + d).as_millis() as u64;
            self.slow_start_until_ms.store(at + span, Ordering::Relaxed);
        }
    }

    /// Attaches the metric handles; the first call wins (a backend keeps its
    /// labels for life).
    pub fn attach_metrics(&self, m: impl FnOnce() -> crate::observe::metrics::BackendMetrics) {
        self.metrics.get_or_init(m);
    }

    pub fn metrics(&self) -> Option<&crate::observe::metrics::BackendMetrics> {
        self.metrics.get()
    }

    pub fn weight(&self) -> u32 {
        self.weight.load(Ordering::Relaxed)
    }

    /// Applies a new configuration to the same backend (reload): the object,
    /// and with it the in-flight count and health, stays.
    pub fn reconfigure(&self, weight: u32, fixed_capacity: Option<u32>, default_capacity: u32) {
        self.weight.store(weight.max(1), Ordering::Relaxed);
        self.fixed_capacity
            .store(fixed_capacity.unwrap_or(0), Ordering::Relaxed);
        self.default_capacity
            .store(default_capacity.max(1), Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b() -> Backend {
        Backend::new("127.0.0.1:1".parse().unwrap(), 1, None, 4)
    }

    #[test]
    fn parses_the_load_header() {
        assert_eq!(parse_load_threads("threads=4, busy=3, queued=0"), Some(4));
        assert_eq!(parse_load_threads("busy=3,threads=16"), Some(16));
        assert_eq!(parse_load_threads("busy=3"), None);
        assert_eq!(parse_load_threads("threads=x"), None);
    }

    #[test]
    fn capacity_prefers_fixed_then_report_then_default() {
        let a = b();
        assert_eq!(a.capacity(), 4);
        assert!(a.report_threads(8));
        assert_eq!(a.capacity(), 8);
        let f = Backend::new("127.0.0.1:1".parse().unwrap(), 1, Some(2), 4);
        assert!(!f.report_threads(8));
        assert_eq!(f.capacity(), 2);
    }

    #[test]
    fn ejection_grows_with_each_ejection_and_is_capped() {
        let a = b();
        let now = Instant::now();
        let base = Duration::from_secs(5);
        let max = Duration::from_secs(12);
        for _ in 0..2 {
            assert_eq!(a.record_failure(3, base, max, true, now), Verdict::Fine);
        }
        assert_eq!(
            a.record_failure(3, base, max, true, now),
            Verdict::Ejected(base)
        );
        assert!(a.is_ejected(now));
        assert!(!a.is_available(now));
        let later = now + Duration::from_secs(6);
        assert!(!a.is_ejected(later));
        for _ in 0..2 {
            a.record_failure(3, base, max, true, later);
        }
        assert_eq!(
            a.record_failure(3, base, max, true, later),
            Verdict::Ejected(Duration::from_secs(10))
        );
        let later = later + Duration::from_secs(11);
        for _ in 0..2 {
            a.record_failure(3, base, max, true, later);
        }
        assert_eq!(
            a.record_failure(3, base, max, true, later),
            Verdict::Ejected(max)
        );
    }

    #[test]
    fn success_resets_the_failure_run_and_percent_cap_blocks_ejection() {
        let a = b();
        let now = Instant::now();
        let d = Duration::from_secs(1);
        a.record_failure(2, d, d, true, now);
        a.record_success();
        assert_eq!(a.record_failure(2, d, d, true, now), Verdict::Fine);
        assert_eq!(a.record_failure(2, d, d, false, now), Verdict::Fine);
        assert!(!a.is_ejected(now));
    }

    #[test]
    fn replicas_share_the_threads() {
        let a = b();
        a.report_threads(8);
        a.set_share(2);
        assert_eq!(a.capacity(), 4);
        a.set_share(3);
        assert_eq!(a.capacity(), 3);
        a.set_share(16);
        assert_eq!(a.capacity(), 1);
    }

    #[test]
    fn slow_start_ramps_from_one() {
        let a = b().with_slow_start(Duration::from_secs(60));
        a.set_up(false);
        a.set_up(true);
        assert_eq!(a.capacity(), 1);
    }
}
