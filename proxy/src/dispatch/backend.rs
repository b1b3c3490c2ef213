//! One backend process: its address, its capacity and its health.
//!
//! A backend's *capacity* is how many requests it may hold at once from this
//! Usher: one per worker thread. It comes from `max_in_flight: N`, or from the
//! worker's own `X-Usher-Load: threads=N` report, or from the upstream's
//! `default_capacity`. The in-flight count itself is only changed by the
//! dispatcher, under its lock (see `dispatch.rs`); here it is just stored.
//!
//! With `proxy_replicas > 1` this replica takes only its part of those
//! threads: what the worker's last load report leaves free, or a static
//! split (see `share.rs`).
//!
//! With `auto` capacity, `learn.rs` may find that fewer requests at once
//! serve as many per second (CPU-bound views under a GIL), and caps the
//! threads there; `max_in_flight: N` is never second-guessed. To learn, a
//! backend keeps the integral over time of its requests that can be running
//! (in flight, at most the threads: a prefetched extra waits), so a
//! response's *level* is their average count over its time on a thread
//! ([`Backend::load_mark`]).
//!
//! Its health (active verdict, ejection, draining) is [`Health`], owned by
//! the `health` module; a backend takes new requests only when that says it
//! is available.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use usher_worker::LoadReport;

use crate::health::Health;
pub use crate::health::Load;

/// A worker's `X-Usher-Load` report. The format is the worker's,
/// [`LoadReport`]; this narrows it to a capacity and, when the report names
/// `busy`, what is taken.
pub fn parse_load(v: &[u8]) -> Option<Load> {
    worker_format(v).or_else(|| any_format(v))
}

/// Any report [`LoadReport`] reads.
fn any_format(v: &[u8]) -> Option<Load> {
    let (report, says_busy) = LoadReport::parse_noting_busy(v).ok()?;
    Some(Load {
        threads: u32::try_from(report.threads).ok()?,
        taken: says_busy.then(|| report.busy.saturating_add(report.queued)),
    })
}

/// The report as `usher-worker` writes it, `threads=T, busy=B, queued=Q`,
/// read straight through: a fifth of the general parser's instructions,
/// once per response. Anything else is the general parser's.
fn worker_format(v: &[u8]) -> Option<Load> {
    let (threads, v) = leading_number(v.strip_prefix(b"threads=")?)?;
    let (busy, v) = leading_number(v.strip_prefix(b", busy=")?)?;
    let (queued, v) = leading_number(v.strip_prefix(b", queued=")?)?;
    if !v.is_empty() {
        return None;
    }
    Some(Load {
        threads: u32::try_from(threads).ok()?,
        taken: Some(busy.saturating_add(queued)),
    })
}

/// At least one and at most 18 ASCII digits (no overflow: longer numbers
/// are the general parser's), and what follows them.
fn leading_number(v: &[u8]) -> Option<(usize, &[u8])> {
    let n = v.iter().take(18).take_while(|b| b.is_ascii_digit()).count();
    if n == 0 {
        return None;
    }
    let value = v[..n]
        .iter()
        .fold(0u64, |acc, b| acc * 10 + u64::from(b - b'0'));
    Some((usize::try_from(value).ok()?, &v[n..]))
}

/// How this replica's part of a shared backend is decided now (`/status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct ShareView {
    pub replicas: u32,
    /// `report` while a fresh load report decides it, else `static`.
    pub by: &'static str,
    /// Threads the other replicas held at the last report.
    pub others: Option<u32>,
    pub report_age_ms: Option<u64>,
}

/// A point of a backend's in-flight integral ([`Backend::load_mark`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadMark {
    area: u64,
    at_us: u64,
}

impl LoadMark {
    /// Taken while nothing learned: the integral was not kept, and a
    /// response that started at it teaches nothing.
    const NONE: LoadMark = LoadMark { area: 0, at_us: 0 };

    /// The later of two marks of one backend; none if either is none.
    pub fn later(self, other: LoadMark) -> LoadMark {
        if self == LoadMark::NONE || other == LoadMark::NONE {
            return LoadMark::NONE;
        }
        if other.at_us > self.at_us {
            other
        } else {
            self
        }
    }

    #[cfg(test)]
    pub fn at_us(&self) -> u64 {
        self.at_us
    }
}

/// The learned capacity (`/status`): at most the threads, and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct LearnedView {
    pub capacity: u32,
    pub why: &'static str,
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
    /// Usher replicas sharing this backend (`proxy_replicas`).
    replicas: AtomicU32,
    /// `share::stable_hash` of `key`: where the static split's remainder starts.
    key_hash: u64,
    /// Under sharing: the threads the other replicas held at the last load
    /// report, and when it came (ms since `epoch`, plus one; 0: none yet).
    others: AtomicU32,
    report_at_ms: AtomicU64,
    /// How long that record stands: [`share::REPORT_TTL`] for a report,
    /// [`share::REFUSAL_BACKOFF`] after a refusal.
    record_ttl_ms: AtomicU64,
    /// The last of those came from a refusal (which counts even when this
    /// Usher thinks it is alone: something else holds the threads).
    refused: std::sync::atomic::AtomicBool,
    /// Capacity from the worker's load report; 0 while it reported nothing.
    reported_capacity: AtomicU32,
    in_flight: AtomicU32,
    /// ∫ min(in_flight, threads) dt in request·µs up to `.1` (µs since `epoch`); changed
    /// with `in_flight`, under the dispatcher's lock.
    load_area: Mutex<(u64, u64)>,
    /// The learned cap (see `learn.rs`); 0 while none (the threads).
    learned: AtomicU32,
    learner: Mutex<super::learn::Learner>,
    /// The upstream's `learn_concurrency`, as of the last response.
    learn_enabled: AtomicBool,
    /// The last learned cap logged (outside windows); 0 before any.
    learned_verdict: AtomicU32,
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
            replicas: AtomicU32::new(1),
            key_hash: super::share::stable_hash(addr.to_string().as_bytes()),
            others: AtomicU32::new(0),
            report_at_ms: AtomicU64::new(0),
            record_ttl_ms: AtomicU64::new(0),
            refused: Default::default(),
            reported_capacity: AtomicU32::new(0),
            in_flight: AtomicU32::new(0),
            load_area: Mutex::new((0, 0)),
            learned: AtomicU32::new(0),
            learner: Mutex::default(),
            learn_enabled: AtomicBool::new(true),
            learned_verdict: AtomicU32::new(0),
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

    /// `replicas` Ushers (this one included) send to this backend.
    pub fn set_share(&self, replicas: u32) {
        self.replicas.store(replicas.max(1), Ordering::Relaxed);
    }

    fn replicas(&self) -> u32 {
        self.replicas.load(Ordering::Relaxed).max(1)
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// The other replicas' threads at the last report, while it is fresh.
    fn fresh_others(&self) -> Option<(u32, u64)> {
        let at = self.report_at_ms.load(Ordering::Acquire);
        if at == 0 {
            return None;
        }
        let age = self.now_ms().saturating_sub(at - 1);
        (age <= self.record_ttl_ms.load(Ordering::Acquire))
            .then(|| (self.others.load(Ordering::Acquire), age))
    }

    /// Report TTL and refusal backoff, in ms (see `share.rs`); unit tests
    /// stretch them so a slow test machine cannot outlast them between two
    /// lines.
    fn timing(&self) -> (u64, u64) {
        use super::share::{REFUSAL_BACKOFF, REPORT_TTL};
        let ms = |d: Duration| d.as_millis() as u64;
        let base = (ms(REPORT_TTL), ms(REFUSAL_BACKOFF));
        #[cfg(test)]
        let base = (base.0 * 1000, base.1 * 1000);
        base
    }

    /// Full capacity (this replica's part), before slow start: all the
    /// threads when it is alone; under sharing, what the others left free at
    /// the last fresh report, else the static split (which may be 0 when
    /// there are fewer threads than replicas).
    pub fn full_capacity(&self) -> u32 {
        let threads = self.usable_threads();
        let alone = self.replicas() == 1;
        if alone && !self.refused.load(Ordering::Relaxed) {
            return threads;
        }
        if let Some((others, _)) = self.fresh_others() {
            return threads.saturating_sub(others);
        }
        if alone {
            return threads;
        }
        self.static_share()
    }

    /// This replica's static split of the threads.
    pub fn static_share(&self) -> u32 {
        let replicas = self.replicas();
        let index = super::share::ReplicaId::get().index(replicas);
        super::share::static_share(self.usable_threads(), replicas, index, self.key_hash)
    }

    /// Under sharing, how this replica's part is decided now.
    pub fn share_view(&self) -> Option<ShareView> {
        let replicas = self.replicas();
        (replicas > 1).then(|| {
            let fresh = self.fresh_others();
            ShareView {
                replicas,
                by: if fresh.is_some() { "report" } else { "static" },
                others: fresh.map(|(o, _)| o),
                report_age_ms: fresh.map(|(_, age)| age),
            }
        })
    }

    /// Takes in a worker's load report. `own` is this replica's requests
    /// holding one of its threads when the report was made (on a response,
    /// the answered request no longer does). Returns true if this replica's
    /// capacity grew, so that queued requests may go.
    pub fn note_load(&self, load: Load, own: u32) -> bool {
        let before = self.full_capacity();
        self.report_threads_quietly(load.threads);
        if let Some(taken) = load.taken {
            let others = super::share::others_from_report(taken, own);
            self.others.store(others, Ordering::Release);
            self.refused.store(false, Ordering::Relaxed);
            self.record_ttl_ms.store(self.timing().0, Ordering::Release);
            self.report_at_ms
                .store(self.now_ms() + 1, Ordering::Release);
        }
        self.full_capacity() > before
    }

    /// The worker refused a request for lack of a free thread: every thread
    /// not this replica's is taken, whatever the last report said.
    pub fn note_refused(&self, own: u32) {
        let threads = self.threads();
        self.others
            .store(threads.saturating_sub(own), Ordering::Release);
        self.refused.store(true, Ordering::Relaxed);
        self.record_ttl_ms.store(self.timing().1, Ordering::Release);
        self.report_at_ms
            .store(self.now_ms() + 1, Ordering::Release);
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

    /// The threads that help: with `auto` capacity, at most the learned cap.
    /// Whether learned concurrency holds it below its threads (then an
    /// extra request would run on a thread the learner keeps idle, not wait).
    pub fn learned_below_threads(&self) -> bool {
        self.usable_threads() < self.threads()
    }

    fn usable_threads(&self) -> u32 {
        let threads = self.threads();
        match self.learned.load(Ordering::Relaxed) {
            0 => threads,
            _ if self.fixed_capacity.load(Ordering::Relaxed) != 0 => threads,
            n => n.min(threads),
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
        if until == 0 || span == 0 || full == 0 {
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

    /// When capacity next changes on its own: a slow start's next step, or
    /// (under sharing) the moment the last load report goes stale.
    pub fn next_capacity_step(&self, now: Instant) -> Option<Instant> {
        let stale = self
            .fresh_others()
            .filter(|_| self.replicas() > 1 || self.refused.load(Ordering::Relaxed))
            .map(|(_, age)| {
                let ttl = self.record_ttl_ms.load(Ordering::Relaxed);
                now + Duration::from_millis(ttl.saturating_sub(age) + 1)
            });
        let until = self.slow_start_until_ms.load(Ordering::Relaxed);
        let span = self.slow_start_ms.load(Ordering::Relaxed);
        let at = now.saturating_duration_since(self.epoch).as_millis() as u64;
        if until == 0 || span == 0 || at >= until {
            return stale;
        }
        let steps = u64::from(self.full_capacity().max(2) - 1);
        let step = (span / steps).max(10);
        let ramp = now + Duration::from_millis(step.min(until - at));
        Some(stale.map_or(ramp, |s| s.min(ramp)))
    }

    /// Records the worker's own thread count. Returns true if capacity grew.
    pub fn report_threads(&self, threads: u32) -> bool {
        let before = self.full_capacity();
        self.report_threads_quietly(threads);
        self.full_capacity() > before
    }

    fn report_threads_quietly(&self, threads: u32) {
        if threads == 0 || threads > 100_000 {
            return;
        }
        self.reported_capacity.store(threads, Ordering::Relaxed);
    }

    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Only the dispatcher calls these, under its lock. `now`: the caller's
    /// clock reading (one per dispatch step, not one per count).
    #[cfg(test)]
    pub(crate) fn inc(&self) {
        self.inc_at(Instant::now());
    }
    pub(crate) fn inc_at(&self, now: Instant) {
        let _area = self.learning().then(|| self.advance_area(now));
        self.in_flight.fetch_add(1, Ordering::Relaxed);
    }
    #[cfg(test)]
    pub(crate) fn dec(&self) {
        self.dec_at(Instant::now());
    }
    pub(crate) fn dec_at(&self, now: Instant) {
        let _area = self.learning().then(|| self.advance_area(now));
        let prev = self.in_flight.fetch_sub(1, Ordering::Relaxed);
        debug_assert!(prev > 0, "in-flight underflow on {}", self.key);
    }

    /// At least 1: a real mark is never [`LoadMark::NONE`].
    fn micros(&self, now: Instant) -> u64 {
        u64::try_from(now.saturating_duration_since(self.epoch).as_micros())
            .unwrap_or(u64::MAX)
            .max(1)
    }

    /// Brings the in-flight integral up to `now`; the count may change while
    /// the returned guard is held.
    fn advance_area(&self, now: Instant) -> std::sync::MutexGuard<'_, (u64, u64)> {
        let now = self.micros(now);
        let mut a = self.load_area.lock().unwrap_or_else(|e| e.into_inner());
        // Readings taken before the lock may arrive out of order (several
        // worker threads): the integral never goes back in time.
        let now = now.max(a.1);
        // Requests that can be running: past the threads (a prefetched
        // extra) one waits in the worker's queue and contends with nobody.
        let running = self
            .in_flight
            .load(Ordering::Relaxed)
            .min(self.threads().max(1));
        a.0 =
            a.0.saturating_add(u64::from(running) * now.saturating_sub(a.1));
        a.1 = now;
        a
    }

    /// Where the in-flight integral stands now: two marks give the average
    /// count of requests running (in flight, at most the threads) between
    /// them (see [`Backend::learn`]).
    pub fn load_mark(&self) -> LoadMark {
        self.load_mark_at(Instant::now())
    }

    /// [`Backend::load_mark`] at a clock reading the caller already has.
    pub fn load_mark_at(&self, now: Instant) -> LoadMark {
        if !self.learning() {
            return LoadMark::NONE;
        }
        let a = self.advance_area(now);
        LoadMark {
            area: a.0,
            at_us: a.1,
        }
    }

    /// Takes in a response that started at `mark` (`class` as in
    /// `estimate.rs`), for learning the backend's concurrency; `enabled` is
    /// the upstream's `learn_concurrency`. Returns true if capacity grew, so
    /// that queued requests may go.
    pub fn learn(&self, class: &str, mark: LoadMark, enabled: bool) -> bool {
        let threads = self.threads();
        self.learn_enabled.store(enabled, Ordering::Relaxed);
        let on = self.learning();
        if on && mark == LoadMark::NONE {
            // Started while learning was off: the next one will teach.
            return false;
        }
        let before = self.learned.load(Ordering::Relaxed);
        let (limit, verdict) = if on {
            let end = self.load_mark();
            let span = end.at_us.saturating_sub(mark.at_us);
            let level = if span == 0 {
                f64::from(self.in_flight().min(threads.max(1)))
            } else {
                end.area.saturating_sub(mark.area) as f64 / span as f64
            };
            let sample = super::learn::Sample {
                class: super::share::stable_hash(class.as_bytes()),
                secs: span as f64 / 1e6,
                level,
            };
            let mut l = self.learner.lock().unwrap_or_else(|e| e.into_inner());
            l.sample(sample, threads, end.at_us / 1000);
            (l.limit(threads), l.verdict(threads))
        } else {
            // Not learned (any more): what was learned goes.
            if before != 0 {
                *self.learner.lock().unwrap_or_else(|e| e.into_inner()) =
                    super::learn::Learner::default();
            }
            (threads, threads)
        };
        let learned = if on && limit < threads { limit } else { 0 };
        self.learned.store(learned, Ordering::Relaxed);
        // Said when the verdict changes, not at each probing or measuring window.
        let verdict = if on { verdict } else { threads };
        let said = self.learned_verdict.swap(verdict, Ordering::Relaxed);
        // 0: nothing said yet, and the threads go without saying.
        if said != verdict && !(said == 0 && verdict == threads) {
            tracing::info!(
                backend = %self.key,
                capacity = verdict,
                threads,
                why = self.learned_view().why,
                "learned capacity changed"
            );
        }
        if let Some(m) = self.metrics() {
            m.learned_capacity.set(i64::from(self.usable_threads()));
        }
        match (before, learned) {
            (0, _) => false,
            (_, 0) => true,
            (b, l) => l > b,
        }
    }

    /// Whether learning applies: `auto` capacity and this Usher alone.
    fn learns(&self) -> bool {
        self.fixed_capacity.load(Ordering::Relaxed) == 0 && self.replicas() == 1
    }

    /// Whether it learns now: learning applies and the upstream's
    /// `learn_concurrency` (as the last response said) is on. Only then is
    /// the in-flight integral kept: without a reader the request path
    /// converts no clock reading and takes no lock for it. Taken up again,
    /// it counts from its last point at the level it resumes with; marks
    /// taken while it was off teach nothing.
    fn learning(&self) -> bool {
        self.learn_enabled.load(Ordering::Relaxed) && self.learns()
    }

    /// The learned capacity and why it is that (`/status`).
    pub fn learned_view(&self) -> LearnedView {
        let threads = self.threads();
        let why = if self.learning() {
            let now_ms = self.now_ms();
            let l = self.learner.lock().unwrap_or_else(|e| e.into_inner());
            l.why(threads, now_ms)
        } else {
            super::learn::Why::Off
        };
        LearnedView {
            capacity: self.usable_threads(),
            why: why.as_str(),
        }
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
        let m = self.metrics.get_or_init(m);
        m.learned_capacity.set(i64::from(self.usable_threads()));
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
    fn report_load(&self, load: Load) -> bool {
        // A check is no request of this replica's: all its in-flight
        // requests hold threads.
        self.note_load(load, self.in_flight())
    }
    fn is_full(&self) -> bool {
        self.in_flight() >= self.capacity()
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

    /// The worker's own format is read straight through; whatever it reads
    /// reads the same through the general parser, and whatever it leaves
    /// is the general parser's.
    #[test]
    fn the_worker_format_reads_as_the_general_parser_does() {
        for v in [
            &b"threads=4, busy=3, queued=1"[..],
            b"threads=0, busy=0, queued=0",
            b"threads=64, busy=12, queued=300",
            b"threads=4294967296, busy=0, queued=0",
            b"threads=4, busy=999999999999999999, queued=999999999999999999",
            b"threads=4, busy=9999999999999999999, queued=0",
            b"threads=4, busy=3, queued=1, refused=2",
            b"threads=4,busy=3,queued=1",
            b"threads=4, busy=3, queued=",
            b"threads=4, busy=+3, queued=1",
            b"threads=4, busy=3",
            b"threads=, busy=3, queued=1",
        ] {
            assert_eq!(
                parse_load(v),
                any_format(v),
                "{}",
                String::from_utf8_lossy(v)
            );
        }
        assert!(worker_format(b"threads=4, busy=3, queued=1").is_some());
        assert!(worker_format(b"threads=4, busy=3, queued=1, refused=2").is_none());
    }

    /// The format's own cases are tested in `worker/src/load.rs`.
    #[test]
    fn the_load_header_gives_a_capacity() {
        let load = parse_load(b"threads=4, busy=3, queued=1").unwrap();
        assert_eq!((load.threads, load.taken), (4, Some(4)));
        assert_eq!(parse_load(b"busy=3"), None);
        assert_eq!(parse_load(b"threads=4294967296"), None);
        // Read over bytes: a byte that is not ASCII spoils only its own item.
        assert_eq!(
            parse_load(b"threads=4, app=caf\xc3\xa9").unwrap().threads,
            4
        );
        assert_eq!(parse_load(b"threads=\xff"), None);
        assert_eq!(parse_load(b"threads=2, queued=1").unwrap().taken, None);
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
    fn replicas_split_the_threads_statically_without_reports() {
        let a = b();
        a.report_threads(8);
        a.set_share(2);
        assert_eq!(a.capacity(), 4);
        // 8 threads for 3: 2 or 3 each, never ceil(8/3) = 3 for everyone.
        a.set_share(3);
        assert!((2..=3).contains(&a.capacity()));
        assert_eq!(a.capacity(), a.static_share());
        a.set_share(16);
        assert!(a.capacity() <= 1);
    }

    #[test]
    fn a_fresh_report_gives_what_the_others_leave() {
        let a = b();
        a.set_share(3);
        // 4 threads: 3 busy, none of them ours (a health check).
        let load = parse_load(b"threads=4, busy=3, queued=0").unwrap();
        a.note_load(load, 0);
        assert_eq!(a.capacity(), 1);
        assert_eq!(a.share_view().unwrap().by, "report");
        // On a response: busy=1 and we held 2 besides the answered one.
        assert!(a.note_load(parse_load(b"threads=4, busy=1, queued=0").unwrap(), 1));
        assert_eq!(a.capacity(), 4);
        // Queued requests count as taken: someone over-filled it.
        a.note_load(parse_load(b"threads=4, busy=4, queued=2").unwrap(), 0);
        assert_eq!(a.capacity(), 0);
        // A refusal says every thread not ours is taken.
        a.note_refused(1);
        assert_eq!(a.capacity(), 1);
        assert!(a.next_capacity_step(Instant::now()).is_some());
    }

    #[test]
    fn alone_only_a_refusal_lowers_capacity() {
        let a = b();
        a.note_load(parse_load(b"threads=4, busy=3, queued=0").unwrap(), 0);
        assert_eq!(a.capacity(), 4);
        assert!(a.share_view().is_none());
        a.note_refused(2);
        assert_eq!(a.capacity(), 2);
        a.note_load(parse_load(b"threads=4, busy=3, queued=0").unwrap(), 0);
        assert_eq!(a.capacity(), 4);
    }

    #[test]
    fn a_report_without_busy_decides_no_share() {
        let a = b();
        a.set_share(3);
        let load = parse_load(b"threads=6").unwrap();
        assert_eq!(load.taken, None);
        a.note_load(load, 0);
        assert_eq!(a.capacity(), 2);
        assert_eq!(a.share_view().unwrap().by, "static");
    }

    #[test]
    fn a_request_alone_runs_at_level_one_and_learning_needs_auto() {
        let a = b();
        a.inc();
        let mark = a.load_mark();
        std::thread::sleep(Duration::from_millis(5));
        assert!(!a.learn("/x", mark, true));
        a.dec();
        assert_eq!(a.capacity(), 4);
        assert_eq!(a.learned_view().why, "learning");
        // With company for half its life: level 1.5.
        a.inc();
        let mark = a.load_mark();
        std::thread::sleep(Duration::from_millis(20));
        a.inc();
        std::thread::sleep(Duration::from_millis(20));
        let end = a.load_mark();
        let level = (end.area - mark.area) as f64 / (end.at_us - mark.at_us) as f64;
        assert!((1.3..1.7).contains(&level), "{level}");
        a.dec();
        a.dec();
        // max_in_flight: N is never learned; nor with learn_concurrency off.
        let f = Backend::new("127.0.0.1:1".parse().unwrap(), 1, Some(4), 4);
        f.learn("/x", f.load_mark(), true);
        assert_eq!(
            f.learned_view(),
            LearnedView {
                capacity: 4,
                why: "off"
            }
        );
        a.learn("/x", a.load_mark(), false);
        assert_eq!(a.learned_view().why, "off");
    }

    #[test]
    fn a_prefetched_extra_past_the_threads_does_not_raise_the_level() {
        // 4 threads, 5 in flight (one prefetched, waiting in the worker's
        // queue): the level is 4, one the learner can compare with its cap,
        // not 5, which it never allows.
        let a = b();
        for _ in 0..5 {
            a.inc();
        }
        let mark = a.load_mark();
        let end = loop {
            let end = a.load_mark();
            if end.at_us > mark.at_us {
                break end;
            }
            std::hint::spin_loop();
        };
        let level = (end.area - mark.area) as f64 / (end.at_us - mark.at_us) as f64;
        assert_eq!(level, 4.0);
        for _ in 0..5 {
            a.dec();
        }
    }

    #[test]
    fn slow_start_ramps_from_one() {
        let a = b().with_slow_start(Duration::from_secs(60));
        assert_eq!(a.capacity(), 4);
        a.start_slow();
        assert_eq!(a.capacity(), 1);
    }
}
