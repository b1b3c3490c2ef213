//! One backend process: its address, its capacity and its health.
//!
//! A backend's *capacity* is how many requests it may hold at once from this
//! Usher: one per worker thread. It comes from `max_in_flight: N`, or from the
//! worker's own `X-Usher-Load: threads=N` report, or from the upstream's
//! `default_capacity`. The in-flight count itself is only changed by the
//! dispatcher, under its lock (see `dispatch.rs`); here it is just stored.
//!
//! Its health (active verdict, ejection, draining) is [`Health`], owned by
//! the `health` module; a backend takes new requests only when that says it
//! is available.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use usher_worker::LoadReport;

use crate::health::Health;

/// The `threads` of a worker's `X-Usher-Load` report. The format is the
/// worker's, [`LoadReport`]; this only narrows it to a capacity.
pub fn parse_load_threads(v: &str) -> Option<u32> {
    let report: LoadReport = v.parse().ok()?;
    u32::try_from(report.threads).ok()
}

/// Where a backend's capacity comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CapacitySource {
    /// `max_in_flight: N`.
    MaxInFlight,
    /// The worker's own report (`X-Usher-Load` or `/healthz` `threads`).
    Reported,
    /// `auto` with no report: the upstream's `default_capacity`.
    Default,
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
    /// Whether it may take requests (active checks, ejection, draining).
    pub health: Health,
    /// The default-capacity fallback has been logged.
    warned_default: std::sync::atomic::AtomicBool,
    /// Slow start: capacity ramps from 1 to full between these instants (ms since `epoch`).
    slow_start_until_ms: AtomicU64,
    slow_start_ms: AtomicU64,
    epoch: Instant,
    /// Its per-request metric handles (set once by `state.rs`).
    metrics: std::sync::OnceLock<crate::observe::metrics::BackendMetrics>,
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
            health: Health::default(),
            warned_default: Default::default(),
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

    /// Counts one more upgraded connection (see `dispatch::Tunnel`).
    pub(crate) fn inc_upgraded(&self) {
        self.upgraded.fetch_add(1, Ordering::AcqRel);
    }

    pub(crate) fn dec_upgraded(&self) {
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

    /// True the first time it is called for a backend whose `auto` capacity
    /// fell back to `default_capacity`: that is said once per backend.
    pub fn first_default_fallback(&self) -> bool {
        // Read first: this runs on every response without a load report,
        // and a write each time would bounce the cache line between cores.
        !self.warned_default.load(Ordering::Relaxed)
            && self.capacity_source() == CapacitySource::Default
            && !self.warned_default.swap(true, Ordering::Relaxed)
    }

    /// Where the capacity comes from, as the startup summary says it.
    pub fn capacity_source(&self) -> CapacitySource {
        if self.fixed_capacity.load(Ordering::Relaxed) != 0 {
            CapacitySource::MaxInFlight
        } else if self.reported_capacity.load(Ordering::Relaxed) != 0 {
            CapacitySource::Reported
        } else {
            CapacitySource::Default
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

    /// While a slow start ramps: when capacity takes its next step.
    pub fn next_capacity_step(&self, now: Instant) -> Option<Instant> {
        let until = self.slow_start_until_ms.load(Ordering::Relaxed);
        let span = self.slow_start_ms.load(Ordering::Relaxed);
        let at = now.saturating_duration_since(self.epoch).as_millis() as u64;
        if until == 0 || span == 0 || at >= until {
            return None;
        }
        let steps = u64::from(self.full_capacity().max(2) - 1);
        let step = (span / steps).max(10);
        Some(now + Duration::from_millis(step.min(until - at)))
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

    pub fn start_slow(&self) {
        let span = self.slow_start_ms.load(Ordering::Relaxed);
        if span > 0 {
            let now = self.epoch.elapsed().as_millis() as u64;
            self.slow_start_until_ms
                .store(now + span, Ordering::Relaxed);
        }
    }

    /// Slow start once an ejection of `d` is over.
    pub fn start_slow_after(&self, d: Duration) {
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

impl crate::health::Target for Backend {
    fn addr(&self) -> SocketAddr {
        self.addr
    }
    fn key(&self) -> &str {
        &self.key
    }
    fn health(&self) -> &Health {
        &self.health
    }
    fn report_threads(&self, threads: u32) -> bool {
        Backend::report_threads(self, threads)
    }
    fn came_up(&self) {
        self.start_slow();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b() -> Backend {
        Backend::new("127.0.0.1:1".parse().unwrap(), 1, None, 4)
    }

    /// The format's own cases are tested in `worker/src/load.rs`.
    #[test]
    fn the_load_header_gives_a_capacity() {
        assert_eq!(parse_load_threads("threads=4, busy=3, queued=0"), Some(4));
        assert_eq!(parse_load_threads("busy=3"), None);
        assert_eq!(parse_load_threads("threads=4294967296"), None);
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
        assert_eq!(a.capacity(), 4);
        a.start_slow();
        assert_eq!(a.capacity(), 1);
    }
}
