//! Where a request waits: the per-upstream dispatcher.
//!
//! Each upstream has one dispatcher holding its backends and one central
//! queue. A request *acquires a slot*: if some backend has `in_flight <
//! capacity`, it gets a slot on it at once; otherwise it waits in the queue,
//! which is bounded in depth (`full`) and in time (`timeout`). A [`Slot`] is an
//! RAII guard: dropping it is what releases the backend's thread, and the
//! release hands the slot straight to the head of the queue. Nobody can forget
//! to decrement, and a freed slot never sits idle while requests wait.
//!
//! While requests wait, a backend whose next thread is expected to free soon
//! may hold one more than its capacity, waiting in the worker's own queue so
//! that the thread finds it at once (`prefetch.rs` decides; the dispatcher
//! keeps what it needs: each in-flight request's start and expected time).
//!
//! Past capacity, `overload.rs` decides when the queue is a standing one;
//! then the newest waiter is served first and stale ones are shed (503), so
//! admitted requests wait about `overload_target` rather than `timeout`.
//!
//! One `std::sync::Mutex` guards the queue and every in-flight count of the
//! upstream, so "is there a free slot?" and "take it" are one step. The lock
//! is never held across an `.await`.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus::{IntCounter, IntGauge};
use tokio::sync::oneshot;

use crate::observe::histogram::Histogram;

pub mod backend;
pub mod balance;
pub mod estimate;
pub mod learn;
pub mod overload;
pub mod prefetch;
pub mod share;

pub use backend::Backend;
use backend::LoadMark;
use balance::Balancer;
pub use estimate::Class;
use estimate::Estimates;
use overload::Codel;

use crate::config::{Balance, Discipline};

/// Why a request was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejected {
    /// The queue already holds `max_depth` requests.
    QueueFull,
    /// The request waited `timeout` without getting a slot.
    QueueTimeout,
    /// Shed while the queue was overloaded: it had waited longer than
    /// `overload_target` (see `overload.rs`).
    Overloaded,
    /// No backend is up: answered at once rather than after the queue timeout.
    NoBackend,
    /// Every available backend has `upgrades.max_upgraded` tunnels open.
    UpgradeLimit,
}

impl Rejected {
    /// The error a client is answered with.
    pub fn into_error(self, upstream: &str) -> crate::error::Error {
        use crate::error::Error;
        let upstream = upstream.to_string();
        match self {
            Rejected::QueueFull => Error::QueueFull { upstream },
            Rejected::QueueTimeout => Error::QueueTimeout { upstream },
            Rejected::Overloaded => Error::QueueOverloaded { upstream },
            Rejected::NoBackend => Error::NoBackend { upstream },
            Rejected::UpgradeLimit => Error::UpgradeLimit { upstream },
        }
    }
}

/// Queue metrics of one upstream.
#[derive(Clone)]
pub struct QueueMetrics {
    pub depth: IntGauge,
    pub wait: Histogram,
    pub rejected_full: IntCounter,
    pub rejected_timeout: IntCounter,
    /// `reason="overload"`: shed by overload control.
    pub rejected_overload: IntCounter,
}

pub struct Dispatcher {
    inner: Mutex<Inner>,
    metrics: QueueMetrics,
    /// A moving average of recent queue waits in µs (for `/status`), each
    /// admitted request weighing 1/16.
    recent_wait_us: std::sync::atomic::AtomicU64,
    /// Wakes the upstream's waker task (see [`Dispatcher::run_waker`]) when
    /// a capacity deadline may have moved.
    changed: tokio::sync::Notify,
}

struct Inner {
    backends: Vec<Arc<Backend>>,
    balancer: Balancer,
    queue: VecDeque<Waiter>,
    next_id: u64,
    max_depth: usize,
    timeout: Duration,
    discipline: Discipline,
    estimates: Estimates,
    /// Ranks are seconds since this (tokio's clock, so paused-time tests see it).
    epoch: tokio::time::Instant,
    overload: Codel,
    /// Extras a backend may hold while requests wait (`queue.prefetch`).
    prefetch: prefetch::Policy,
    /// Per backend, in the order of `backends`: its requests in flight.
    tracks: Vec<Track>,
}

/// What the dispatcher knows of one backend's requests in flight, for
/// prefetch: when each went out and how long its class is expected to take.
struct Track {
    backend: Arc<Backend>,
    running: Vec<InFlight>,
    /// A prefetched request came back before any thread had freed: the
    /// worker refuses what it cannot run at once (usher-worker `--queue 0`).
    /// No extras to it until then.
    no_extras_until: Option<tokio::time::Instant>,
}

impl Track {
    fn new(backend: Arc<Backend>) -> Self {
        Track {
            backend,
            running: Vec::new(),
            no_extras_until: None,
        }
    }
}

struct InFlight {
    id: u64,
    /// When it went out, or (an extra) when a thread freed for it.
    since: tokio::time::Instant,
    expected: f64,
    on_thread: bool,
    /// For an extra: the backend's in-flight integral when a thread freed
    /// for it (as far as Usher can tell); its time before is a wait in the
    /// worker's queue, not work.
    promoted: Option<LoadMark>,
}

/// How a released request ran (see [`Slot::finish`]).
enum Ran {
    /// On a thread from when it went out.
    OnThread,
    /// A prefetched extra that a thread freed for at this mark.
    Promoted(LoadMark),
    /// A prefetched extra that came back before any thread freed for it.
    Extra,
}

/// How long a backend that refused an extra gets none: one refused request
/// (requeued at the head, not failed) per this is what probing costs.
const NO_EXTRAS_HOLD: Duration = Duration::from_secs(10);

/// The queue holds retries at the front, then the rest in arrival order
/// (whatever the discipline: it picks by scanning). `overload.rs` relies on it.
struct Waiter {
    id: u64,
    /// Smaller goes first (seconds since the dispatcher's epoch).
    rank: f64,
    since: tokio::time::Instant,
    retry: bool,
    /// Its class's expected service time, in seconds (0: unknown).
    expected: f64,
    avoid: Vec<SocketAddr>,
    tx: oneshot::Sender<Result<Slot, Rejected>>,
}

impl overload::Queued for Waiter {
    fn since(&self) -> tokio::time::Instant {
        self.since
    }
    fn retry(&self) -> bool {
        self.retry
    }
}

/// One counted upgraded connection on a backend (`upgraded`, for `/status`
/// and the gauge); dropping it releases the count.
pub struct Tunnel(Arc<Backend>);

impl Tunnel {
    /// Counts one more on `backend`. Under `upgrades.hold_slot` the request
    /// slot held beside it is what bounds them.
    pub fn open(backend: Arc<Backend>) -> Self {
        backend.inc_upgraded();
        Tunnel(backend)
    }

    pub fn backend(&self) -> &Arc<Backend> {
        &self.0
    }
}

impl Drop for Tunnel {
    fn drop(&mut self) {
        self.0.dec_upgraded();
    }
}

/// A reserved place on one backend. Dropping it releases the place.
pub struct Slot {
    backend: Arc<Backend>,
    dispatcher: Arc<Dispatcher>,
    /// Its entry in the backend's [`Track`].
    id: u64,
    armed: bool,
}

impl Slot {
    pub fn backend(&self) -> &Arc<Backend> {
        &self.backend
    }

    /// Releases the slot of a request of `class` that took `secs` at the
    /// backend since `sent` (its mark when it went out), recording that (see
    /// `estimate.rs`) under the same lock. Returns the mark to learn its time
    /// on a thread from ([`Backend::learn`]): `sent`, or for a prefetched
    /// extra when a thread freed for it; none for an extra that came back
    /// before any did. `at` is the clock's reading at the end, which the
    /// caller has made already to measure `secs`.
    pub fn finish(
        mut self,
        class: impl Into<Class>,
        secs: f64,
        sent: LoadMark,
        at: tokio::time::Instant,
    ) -> Option<LoadMark> {
        self.armed = false;
        match self
            .dispatcher
            .release_as(&self.backend, self.id, Some((class.into(), secs)), at)
        {
            Ran::OnThread => Some(sent),
            Ran::Promoted(at) => Some(at.later(sent)),
            Ran::Extra => None,
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if self.armed {
            self.dispatcher.release(&self.backend, self.id);
        }
    }
}

impl std::fmt::Debug for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Slot")
            .field("backend", &self.backend.key)
            .finish()
    }
}

/// A granted slot and how long the request queued for it.
#[derive(Debug)]
pub struct Admitted {
    pub slot: Slot,
    pub waited: Duration,
    /// When the wait began (tokio's clock).
    pub since: tokio::time::Instant,
}

/// Removes a waiter from the queue if its request goes away (client
/// disconnect, timeout) before it was served.
struct Enqueued<'a> {
    dispatcher: &'a Dispatcher,
    id: u64,
}

impl Drop for Enqueued<'_> {
    fn drop(&mut self) {
        let mut inner = self.dispatcher.inner.lock().unwrap();
        if let Some(pos) = inner.queue.iter().position(|w| w.id == self.id) {
            inner.queue.remove(pos);
            self.dispatcher.metrics.depth.set(inner.queue.len() as i64);
            if inner.queue.is_empty() {
                inner.overload.drained(tokio::time::Instant::now());
            }
        }
    }
}

impl Dispatcher {
    pub fn new(
        backends: Vec<Arc<Backend>>,
        balance: Balance,
        max_depth: usize,
        timeout: Duration,
        metrics: QueueMetrics,
    ) -> Arc<Self> {
        let tracks = backends.iter().cloned().map(Track::new).collect();
        Arc::new(Dispatcher {
            inner: Mutex::new(Inner {
                backends,
                balancer: Balancer::new(balance),
                queue: VecDeque::new(),
                next_id: 0,
                max_depth,
                timeout,
                discipline: Discipline::default(),
                estimates: Estimates::default(),
                epoch: tokio::time::Instant::now(),
                overload: Codel::new(None, tokio::time::Instant::now()),
                prefetch: prefetch::Policy::default(),
                tracks,
            }),
            metrics,
            recent_wait_us: Default::default(),
            changed: tokio::sync::Notify::new(),
        })
    }

    /// Waits for a slot. `avoid` lists backends this request already failed
    /// on; a retry (`retry = true`) goes to the head of the queue, since it
    /// has already waited once.
    pub async fn acquire(
        self: &Arc<Self>,
        avoid: &[SocketAddr],
        retry: bool,
    ) -> Result<Admitted, Rejected> {
        self.acquire_as(avoid, retry, "").await
    }

    /// [`Dispatcher::acquire`] for a request of `class` (see `estimate.rs`),
    /// which orders it under `shortest_first`.
    pub async fn acquire_as(
        self: &Arc<Self>,
        avoid: &[SocketAddr],
        retry: bool,
        class: impl Into<Class>,
    ) -> Result<Admitted, Rejected> {
        let class = class.into();
        let (rx, id, timeout, start) = {
            let mut inner = self.inner.lock().unwrap();
            // The wait is counted from here: one clock reading for the step,
            // tokio's (which is std's outside paused tests).
            let tnow = tokio::time::Instant::now();
            let now = tnow.into_std();
            if !inner.backends.iter().any(|b| b.health.is_available(now)) {
                return Err(Rejected::NoBackend);
            }
            if !retry {
                inner.overload.arrived(tnow);
            }
            let expected = if inner.learns() {
                inner.estimates.get(class)
            } else {
                0.0
            };
            // Waiters already queued go first: a newcomer only takes a slot
            // directly when nobody is waiting.
            if inner.queue.is_empty() || retry {
                if let Some(slot) = self.take(&mut inner, avoid, expected, now, tnow) {
                    if !retry {
                        inner.overload.admitted(Duration::ZERO, tnow);
                    }
                    self.metrics.wait.observe(0.0);
                    self.note_wait(Duration::ZERO);
                    return Ok(Admitted {
                        slot,
                        waited: Duration::ZERO,
                        since: tnow,
                    });
                }
            }
            if inner.queue.len() >= inner.max_depth && !retry {
                self.metrics.rejected_full.inc();
                return Err(Rejected::QueueFull);
            }
            let (tx, rx) = oneshot::channel();
            let id = inner.next_id;
            inner.next_id += 1;
            let waited = inner.epoch.elapsed().as_secs_f64();
            let rank = match (retry, inner.discipline) {
                (true, _) => f64::NEG_INFINITY,
                (false, Discipline::Fifo) => waited,
                (false, Discipline::ShortestFirst) => waited + expected,
            };
            let waiter = Waiter {
                id,
                rank,
                since: tnow,
                retry,
                expected,
                avoid: avoid.to_vec(),
                tx,
            };
            if retry {
                inner.queue.push_front(waiter);
            } else {
                inner.queue.push_back(waiter);
            }
            if inner.overload.overloaded(tnow) {
                // This arrival may push an old waiter out of the reserve:
                // shed it now, and let the waker recompute the next shed.
                self.shed(&mut inner, now, tnow);
                self.changed.notify_one();
            }
            if inner.prefetch.limit > 0 {
                // Time alone brings threads near their end: the head (maybe
                // this one) may go as an extra now.
                self.serve_queue_at(&mut inner, now, tnow);
            }
            self.metrics.depth.set(inner.queue.len() as i64);
            (rx, id, inner.timeout, tnow)
        };
        let guard = Enqueued {
            dispatcher: self,
            id,
        };
        let result = match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(r)) => r,
            // The sender is only dropped with the dispatcher (upstream removed).
            Ok(Err(_)) => Err(Rejected::NoBackend),
            Err(_) => {
                self.metrics.rejected_timeout.inc();
                Err(Rejected::QueueTimeout)
            }
        };
        drop(guard);
        let waited = start.elapsed();
        if result.is_ok() {
            self.metrics.wait.observe(waited.as_secs_f64());
            self.note_wait(waited);
        }
        result.map(|slot| Admitted {
            slot,
            waited,
            since: start,
        })
    }

    fn note_wait(&self, waited: Duration) {
        use std::sync::atomic::Ordering;
        let w = u64::try_from(waited.as_micros()).unwrap_or(u64::MAX);
        let _ = self
            .recent_wait_us
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |avg| {
                Some(avg - avg / 16 + w / 16)
            });
    }

    /// Recent queue wait (a moving average over the last ~16 admissions).
    pub fn recent_wait(&self) -> Duration {
        Duration::from_micros(
            self.recent_wait_us
                .load(std::sync::atomic::Ordering::Relaxed),
        )
    }

    /// Admits an upgraded connection (a tunnel) without waiting: picked by
    /// the same balancer as requests, with load counted in open tunnels
    /// (at most `max` per backend) instead of requests in flight.
    pub fn admit_upgrade(&self, avoid: &[SocketAddr], max: u32) -> Result<Tunnel, Rejected> {
        let mut inner = self.inner.lock().unwrap();
        let now = Instant::now();
        if !inner.backends.iter().any(|b| b.health.is_available(now)) {
            return Err(Rejected::NoBackend);
        }
        let inner = &mut *inner;
        let load = balance::Load::Upgraded { max };
        let i = inner
            .balancer
            .pick_for(load, &inner.backends, avoid, now)
            .ok_or(Rejected::UpgradeLimit)?;
        Ok(Tunnel::open(inner.backends[i].clone()))
    }

    /// Reserves a slot under the lock for a request that would otherwise
    /// wait: a free one, else (prefetch) an extra where a thread frees soon.
    fn take(
        self: &Arc<Self>,
        inner: &mut Inner,
        avoid: &[SocketAddr],
        expected: f64,
        now: Instant,
        tnow: tokio::time::Instant,
    ) -> Option<Slot> {
        let (i, on_thread) = match inner.balancer.pick(&inner.backends, avoid, now) {
            Some(i) => (i, true),
            None => (Self::pick_extra(inner, avoid, expected, now, tnow)?, false),
        };
        let backend = inner.backends[i].clone();
        backend.inc_at(now);
        let id = inner.next_id;
        inner.next_id += 1;
        inner.tracks[i].running.push(InFlight {
            id,
            since: tnow,
            expected,
            on_thread,
            promoted: None,
        });
        Some(Slot {
            backend,
            dispatcher: self.clone(),
            id,
            armed: true,
        })
    }

    /// The backend (index) an extra request goes to, if any: among those
    /// `prefetch::fit` accepts, the one whose thread is expected to free first.
    fn pick_extra(
        inner: &Inner,
        avoid: &[SocketAddr],
        expected: f64,
        now: Instant,
        tnow: tokio::time::Instant,
    ) -> Option<usize> {
        if !inner.prefetch.sends(expected, true) {
            return None;
        }
        let mut best: Option<(usize, f64)> = None;
        for (i, t) in inner.tracks.iter().enumerate() {
            let b = &t.backend;
            if !b.health.is_available(now)
                || avoid.contains(&b.addr)
                || t.no_extras_until.is_some_and(|u| tnow < u)
            {
                continue;
            }
            // No extras to a backend whose capacity is held down for now
            // (slow start, a refusal's backoff), nor to one whose learned cap
            // keeps threads idle, whatever the setting: the extra would run on
            // one at once. `auto` sends them only where capacity is the
            // worker's own reported thread count.
            let capacity = b.capacity();
            let reported = b.capacity_source() == backend::CapacitySource::Reported;
            if capacity < b.full_capacity()
                || b.learned_below_threads()
                || !inner.prefetch.sends(expected, reported)
            {
                continue;
            }
            let running = t.running.iter().map(|r| prefetch::Running {
                elapsed: tnow.saturating_duration_since(r.since).as_secs_f64(),
                expected: r.expected,
                on_thread: r.on_thread,
            });
            let limit = inner.prefetch.limit;
            let fit = prefetch::fit(capacity, b.in_flight(), limit, running, expected);
            match (fit, best) {
                (Some(soon), Some((_, s))) if soon >= s => {}
                (Some(soon), _) => best = Some((i, soon)),
                (None, _) => {}
            }
        }
        best.map(|(i, _)| i)
    }

    fn release(self: &Arc<Self>, backend: &Arc<Backend>, id: u64) {
        self.release_as(backend, id, None, tokio::time::Instant::now());
    }

    /// Releases a slot on `backend`, learning the service time of the
    /// request's class if it is given: one lock per release. `tnow` is the
    /// clock's reading at the release.
    fn release_as(
        self: &Arc<Self>,
        backend: &Arc<Backend>,
        id: u64,
        took: Option<(Class, f64)>,
        tnow: tokio::time::Instant,
    ) -> Ran {
        let mut inner = self.inner.lock().unwrap();
        if let Some((class, secs)) = took {
            if inner.learns() {
                inner.estimates.observe(class, secs);
            }
        }
        let now = tnow.into_std();
        backend.dec_at(now);
        let ran = Self::finished(&mut inner, backend, id, tnow);
        self.serve_queue_at(&mut inner, now, tnow);
        ran
    }

    /// Drops slot `id` from its backend's track. The thread it held takes
    /// the oldest extra waiting in the worker. An extra that comes back
    /// before any thread freed, in less than half its expected time, was
    /// refused (or failed at once): the worker takes no extras, so it gets
    /// none for [`NO_EXTRAS_HOLD`].
    fn finished(
        inner: &mut Inner,
        backend: &Arc<Backend>,
        id: u64,
        tnow: tokio::time::Instant,
    ) -> Ran {
        let Some(t) = inner
            .tracks
            .iter_mut()
            .find(|t| Arc::ptr_eq(&t.backend, backend))
        else {
            return Ran::OnThread;
        };
        let Some(pos) = t.running.iter().position(|r| r.id == id) else {
            return Ran::OnThread;
        };
        let done = t.running.swap_remove(pos);
        if !done.on_thread {
            // Usher's view lags the worker's (a stalled task may read an
            // answer late), so only an extra back well before it could
            // have run counts as refused.
            let back_after = tnow.saturating_duration_since(done.since).as_secs_f64();
            if back_after < done.expected / 2.0 {
                t.no_extras_until = Some(tnow + NO_EXTRAS_HOLD);
            }
            return Ran::Extra;
        }
        let next = t
            .running
            .iter_mut()
            .filter(|r| !r.on_thread)
            .min_by_key(|r| r.since);
        if let Some(r) = next {
            r.on_thread = true;
            r.since = tnow;
            r.promoted = Some(backend.load_mark());
        }
        match done.promoted {
            Some(at) => Ran::Promoted(at),
            None => Ran::OnThread,
        }
    }

    /// Hands free slots to the head of the queue, in order; then, if the
    /// queue is overloaded, sheds the waiters that are too old.
    fn serve_queue(self: &Arc<Self>, inner: &mut Inner) {
        self.serve_queue_at(inner, Instant::now(), tokio::time::Instant::now());
    }

    /// [`Dispatcher::serve_queue`] at clock readings the caller has.
    fn serve_queue_at(
        self: &Arc<Self>,
        inner: &mut Inner,
        now: Instant,
        tnow: tokio::time::Instant,
    ) {
        if !inner.queue.is_empty() && !inner.backends.iter().any(|b| b.health.is_available(now)) {
            // Nothing can serve them: tell them now instead of at the timeout.
            for w in inner.queue.drain(..) {
                let _ = w.tx.send(Err(Rejected::NoBackend));
            }
        }
        while let Some(next) = Self::next_waiter(inner, tnow) {
            let avoid = inner.queue[next].avoid.clone();
            let expected = inner.queue[next].expected;
            let Some(slot) = self.take(inner, &avoid, expected, now, tnow) else {
                break;
            };
            let waiter = inner.queue.remove(next).expect("waiter exists");
            if !waiter.retry {
                let waited = tnow.saturating_duration_since(waiter.since);
                inner.overload.admitted(waited, tnow);
            }
            if let Err(Ok(mut slot)) = waiter.tx.send(Ok(slot)) {
                // The request went away between its timeout and now; undo
                // without re-entering the lock we hold.
                slot.armed = false;
                slot.backend.dec_at(now);
                if let Some(t) = inner
                    .tracks
                    .iter_mut()
                    .find(|t| Arc::ptr_eq(&t.backend, &slot.backend))
                {
                    t.running.retain(|r| r.id != slot.id);
                }
            }
        }
        self.shed(inner, now, tnow);
        if inner.queue.is_empty() {
            inner.overload.drained(tnow);
        }
        self.metrics.depth.set(inner.queue.len() as i64);
    }

    /// Sheds what `overload.rs` says is excess: waiters older than the
    /// target, never the newest one per slot, never while a slot is free.
    fn shed(&self, inner: &mut Inner, now: Instant, tnow: tokio::time::Instant) {
        // Nothing to shed (the common case): the backends' sums are not
        // needed. (`overloaded` rolls the window, as arrivals and
        // admissions do anyway.)
        if !inner.overload.overloaded(tnow) || inner.queue.is_empty() {
            return;
        }
        let reserve = Self::slots(inner, now);
        let slot_free = Self::slot_free(inner, now);
        let range = inner.overload.shed(&inner.queue, reserve, slot_free, tnow);
        for w in inner.queue.drain(range) {
            if w.tx.send(Err(Rejected::Overloaded)).is_ok() {
                self.metrics.rejected_overload.inc();
            }
        }
    }

    /// Whether an available backend has room for one more request.
    fn slot_free(inner: &Inner, now: Instant) -> bool {
        inner
            .backends
            .iter()
            .any(|b| b.health.is_available(now) && b.in_flight() < b.capacity())
    }

    /// How many requests the available backends take at once.
    fn slots(inner: &Inner, now: Instant) -> usize {
        inner
            .backends
            .iter()
            .filter(|b| b.health.is_available(now))
            .map(|b| b.capacity() as usize)
            .sum()
    }

    /// The waiter to serve next: while overloaded a retry at the head, else
    /// the newest; otherwise the front under FIFO (ranks are in arrival
    /// order there), the lowest rank under shortest-first.
    fn next_waiter(inner: &mut Inner, now: tokio::time::Instant) -> Option<usize> {
        if inner.queue.is_empty() {
            return None;
        }
        if let Some(i) = inner.overload.pick(&inner.queue, now) {
            return Some(i);
        }
        if inner.discipline == Discipline::Fifo {
            return Some(0);
        }
        let mut best = 0;
        for (i, w) in inner.queue.iter().enumerate().skip(1) {
            if w.rank < inner.queue[best].rank {
                best = i;
            }
        }
        Some(best)
    }

    /// Records how long a request of `class` took at the backend (the
    /// request path does it as it releases, see [`Slot::finish`]).
    #[cfg(test)]
    pub fn observe(&self, class: &str, secs: f64) {
        let mut inner = self.inner.lock().unwrap();
        if inner.learns() {
            inner.estimates.observe(class, secs);
        }
    }

    /// `queue.prefetch`, resolved (see `prefetch::Policy`).
    pub fn set_prefetch(self: &Arc<Self>, policy: prefetch::Policy) {
        let mut inner = self.inner.lock().unwrap();
        inner.prefetch = policy;
        if !inner.queue.is_empty() {
            self.serve_queue(&mut inner);
        }
    }

    pub fn set_discipline(&self, d: Discipline) {
        self.inner.lock().unwrap().discipline = d;
    }

    /// Overload control (`queue.overload`); `None` is `off`. Unchanged
    /// settings keep the current state.
    pub fn set_overload(&self, settings: Option<overload::Settings>) {
        let mut inner = self.inner.lock().unwrap();
        inner.overload.set(settings, tokio::time::Instant::now());
        drop(inner);
        self.changed.notify_one();
    }

    /// Re-examines the queue after capacity or health changed.
    pub fn kick(self: &Arc<Self>) {
        let mut inner = self.inner.lock().unwrap();
        if !inner.queue.is_empty() {
            self.serve_queue(&mut inner);
        }
        drop(inner);
        self.changed.notify_one();
    }

    /// Something that moves a capacity deadline happened (an ejection):
    /// the waker recomputes when it next has to look.
    pub fn wake(&self) {
        self.changed.notify_one();
    }

    /// When the queue next needs a look on its own: capacity changes (an
    /// ejection ends, a slow start takes its next step), or an overloaded
    /// queue has a waiter to shed.
    fn next_wake(&self, now: Instant) -> Option<tokio::time::Instant> {
        let mut inner = self.inner.lock().unwrap();
        let capacity = inner
            .backends
            .iter()
            .filter_map(|b| {
                let ejected = b.health.ejected_until(now);
                let ramp = b.next_capacity_step(now);
                ejected.into_iter().chain(ramp).min()
            })
            .min()
            .map(tokio::time::Instant::from_std);
        let (reserve, slot_free) = (Self::slots(&inner, now), Self::slot_free(&inner, now));
        let inner = &mut *inner;
        let tnow = tokio::time::Instant::now();
        let shed = inner
            .overload
            .next_shed(&inner.queue, reserve, slot_free, tnow);
        capacity.into_iter().chain(shed).min()
    }

    /// Re-examines the queue exactly when capacity changes with time (an
    /// ejection ends, a slow start steps up), instead of polling; returns
    /// when `cancel` fires.
    pub async fn run_waker(self: Arc<Self>, cancel: tokio_util::sync::CancellationToken) {
        loop {
            let next = self.next_wake(Instant::now());
            let sleep = async {
                match next {
                    Some(t) => tokio::time::sleep_until(t).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = self.changed.notified() => {}
                _ = sleep => {
                    let mut inner = self.inner.lock().unwrap();
                    if !inner.queue.is_empty() {
                        self.serve_queue(&mut inner);
                    }
                }
            }
        }
    }

    /// Replaces the backend set (reload, discovery). Backends that are gone
    /// keep their in-flight requests until those finish: their slots hold
    /// their own `Arc<Backend>`.
    pub fn set_backends(self: &Arc<Self>, backends: Vec<Arc<Backend>>) {
        let mut inner = self.inner.lock().unwrap();
        let mut old = std::mem::take(&mut inner.tracks);
        inner.tracks = backends
            .iter()
            .map(
                |b| match old.iter().position(|t| Arc::ptr_eq(&t.backend, b)) {
                    Some(i) => old.swap_remove(i),
                    None => Track::new(b.clone()),
                },
            )
            .collect();
        inner.backends = backends;
        self.serve_queue(&mut inner);
        drop(inner);
        self.changed.notify_one();
    }

    pub fn set_limits(&self, balance: Balance, max_depth: usize, timeout: Duration) {
        let mut inner = self.inner.lock().unwrap();
        inner.balancer = Balancer::new(balance);
        inner.max_depth = max_depth;
        inner.timeout = timeout;
    }

    pub fn backends(&self) -> Vec<Arc<Backend>> {
        self.inner.lock().unwrap().backends.clone()
    }

    pub fn queue_len(&self) -> usize {
        self.inner.lock().unwrap().queue.len()
    }
}

impl Inner {
    /// Whether service times are learned: for the order under
    /// `shortest_first`, and for prefetch's horizon under any discipline.
    fn learns(&self) -> bool {
        self.discipline == Discipline::ShortestFirst || self.prefetch.limit > 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metrics() -> QueueMetrics {
        QueueMetrics {
            depth: IntGauge::new("d", "d").unwrap(),
            wait: Histogram::new(&[0.001, 1.0]),
            rejected_full: IntCounter::new("f", "f").unwrap(),
            rejected_timeout: IntCounter::new("t", "t").unwrap(),
            rejected_overload: IntCounter::new("o", "o").unwrap(),
        }
    }

    fn dispatcher(caps: &[u32], depth: usize, timeout_ms: u64) -> Arc<Dispatcher> {
        let backends = caps
            .iter()
            .enumerate()
            .map(|(i, &c)| {
                Arc::new(Backend::new(
                    format!("127.0.0.1:{}", 2000 + i).parse().unwrap(),
                    1,
                    Some(c),
                    4,
                ))
            })
            .collect();
        dispatcher_of(backends, depth, timeout_ms)
    }

    fn dispatcher_of(
        backends: Vec<Arc<Backend>>,
        depth: usize,
        timeout_ms: u64,
    ) -> Arc<Dispatcher> {
        Dispatcher::new(
            backends,
            Balance::LeastOutstanding,
            depth,
            Duration::from_millis(timeout_ms),
            metrics(),
        )
    }

    #[tokio::test(start_paused = true)]
    async fn never_exceeds_capacity_and_serves_the_queue_in_order() {
        let d = dispatcher(&[1, 1], 10, 60_000);
        let a = d.acquire(&[], false).await.unwrap();
        let b = d.acquire(&[], false).await.unwrap();
        assert_ne!(a.slot.backend().addr, b.slot.backend().addr);

        let d1 = d.clone();
        let first = tokio::spawn(async move { d1.acquire(&[], false).await });
        tokio::task::yield_now().await;
        let d2 = d.clone();
        let second = tokio::spawn(async move { d2.acquire(&[], false).await });
        tokio::task::yield_now().await;
        assert_eq!(d.queue_len(), 2);
        assert!(d.backends().iter().all(|b| b.in_flight() == 1));

        let freed = a.slot.backend().addr;
        drop(a);
        let got = first.await.unwrap().unwrap();
        assert_eq!(got.slot.backend().addr, freed);
        assert_eq!(d.queue_len(), 1);
        assert!(!second.is_finished());
        drop(b);
        second.await.unwrap().unwrap();
        assert_eq!(d.metrics.depth.get(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn full_queue_rejects_at_once_and_timeout_rejects_after_the_wait() {
        let d = dispatcher(&[1], 1, 500);
        let _held = d.acquire(&[], false).await.unwrap();
        let d1 = d.clone();
        let waiting = tokio::spawn(async move { d1.acquire(&[], false).await });
        tokio::task::yield_now().await;
        assert_eq!(
            d.acquire(&[], false).await.unwrap_err(),
            Rejected::QueueFull
        );
        let start = tokio::time::Instant::now();
        assert_eq!(waiting.await.unwrap().unwrap_err(), Rejected::QueueTimeout);
        assert!(start.elapsed() >= Duration::from_millis(500));
        assert_eq!(d.queue_len(), 0);
        assert_eq!(d.metrics.rejected_full.get(), 1);
        assert_eq!(d.metrics.rejected_timeout.get(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_cancelled_waiter_leaves_the_queue_and_leaks_no_slot() {
        let d = dispatcher(&[1], 4, 60_000);
        let held = d.acquire(&[], false).await.unwrap();
        let d1 = d.clone();
        let waiting = tokio::spawn(async move { d1.acquire(&[], false).await });
        tokio::task::yield_now().await;
        assert_eq!(d.queue_len(), 1);
        waiting.abort();
        let _ = waiting.await;
        assert_eq!(d.queue_len(), 0);
        drop(held);
        assert_eq!(d.backends()[0].in_flight(), 0);
        let again = d.acquire(&[], false).await.unwrap();
        assert_eq!(again.slot.backend().in_flight(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn all_backends_down_answers_at_once_and_flushes_waiters() {
        let d = dispatcher(&[1], 4, 60_000);
        let held = d.acquire(&[], false).await.unwrap();
        let d1 = d.clone();
        let waiting = tokio::spawn(async move { d1.acquire(&[], false).await });
        tokio::task::yield_now().await;
        d.backends()[0].health.set_up(false);
        d.kick();
        assert_eq!(waiting.await.unwrap().unwrap_err(), Rejected::NoBackend);
        assert_eq!(
            d.acquire(&[], false).await.unwrap_err(),
            Rejected::NoBackend
        );
        drop(held);
    }

    #[tokio::test(start_paused = true)]
    async fn capacity_growth_is_picked_up_by_kick() {
        let d = dispatcher(&[1], 4, 60_000);
        let _held = d.acquire(&[], false).await.unwrap();
        let d1 = d.clone();
        let waiting = tokio::spawn(async move { d1.acquire(&[], false).await });
        tokio::task::yield_now().await;
        // Reload: the same backend object, now with two threads.
        let same = d.backends()[0].clone();
        same.reconfigure(1, Some(2), 4);
        d.set_backends(vec![same]);
        let got = waiting.await.unwrap().unwrap();
        assert_eq!(got.slot.backend().in_flight(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn shortest_first_lets_short_requests_pass_long_ones_but_ages() {
        let d = dispatcher(&[1], 100, 60_000);
        d.set_discipline(Discipline::ShortestFirst);
        for _ in 0..20 {
            d.observe("/long", 0.200);
            d.observe("/short", 0.010);
        }
        let held = d.acquire(&[], false).await.unwrap();
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        // A long request that has waited a while, then long and short ones
        // arriving together.
        for (class, after_ms) in [
            ("/long", 0u64),
            ("/long", 1000),
            ("/short", 10),
            ("/long", 10),
            ("/short", 10),
        ] {
            tokio::time::advance(Duration::from_millis(after_ms)).await;
            let (d, order) = (d.clone(), order.clone());
            tasks.push(tokio::spawn(async move {
                let a = d.acquire_as(&[], false, class).await.unwrap();
                order.lock().unwrap().push(class);
                // Hold the slot briefly so the next grant is a separate decision.
                tokio::time::sleep(Duration::from_millis(1)).await;
                drop(a);
            }));
            tokio::task::yield_now().await;
        }
        drop(held);
        for t in tasks {
            t.await.unwrap();
        }
        // The first long one waited 1 s: 0 + 0.2 beats the newcomers' ~1.0 + 0.01.
        // Then both short ones pass the two later long ones.
        assert_eq!(
            *order.lock().unwrap(),
            vec!["/long", "/short", "/short", "/long", "/long"]
        );
    }

    /// What one open-loop run saw: per request, when it arrived (ms) and
    /// what it got (its wait, or the rejection).
    struct Run {
        outcomes: Vec<(u64, Result<Duration, Rejected>)>,
        /// When each slot was granted (ms since the start).
        grants: Vec<u64>,
    }

    /// Offers one request every `every_ms` for `secs` to a dispatcher with
    /// `slots` slots whose requests each hold their slot `service_ms`, with
    /// the waker running, on paused time.
    async fn open_loop(
        overload: Option<overload::Settings>,
        slots: u32,
        service_ms: u64,
        every_ms: u64,
        secs: u64,
    ) -> Run {
        let d = dispatcher(&[slots], 100_000, 5_000);
        d.set_discipline(Discipline::Fifo);
        d.set_overload(overload);
        let cancel = tokio_util::sync::CancellationToken::new();
        let waker = tokio::spawn(d.clone().run_waker(cancel.clone()));
        let start = tokio::time::Instant::now();
        let grants = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for i in 0..secs * 1000 / every_ms {
            tokio::time::sleep_until(start + Duration::from_millis(i * every_ms)).await;
            let (d, grants) = (d.clone(), grants.clone());
            tasks.push(tokio::spawn(async move {
                let t0 = tokio::time::Instant::now();
                let at = (t0 - start).as_millis() as u64;
                match d.acquire(&[], false).await {
                    Ok(a) => {
                        let now = tokio::time::Instant::now();
                        grants
                            .lock()
                            .unwrap()
                            .push((now - start).as_millis() as u64);
                        tokio::time::sleep(Duration::from_millis(service_ms)).await;
                        drop(a);
                        (at, Ok(now - t0))
                    }
                    Err(r) => (at, Err(r)),
                }
            }));
        }
        let mut outcomes = Vec::new();
        for t in tasks {
            outcomes.push(t.await.unwrap());
        }
        cancel.cancel();
        waker.await.unwrap();
        assert_eq!(d.queue_len(), 0);
        let grants = grants.lock().unwrap().clone();
        Run { outcomes, grants }
    }

    fn codel() -> Option<overload::Settings> {
        Some(overload::Settings {
            target: Duration::from_millis(50),
            interval: Duration::from_millis(100),
        })
    }

    #[tokio::test(start_paused = true)]
    async fn under_sustained_overload_goodput_is_capacity_and_waits_stay_near_the_target() {
        // 2 slots of 20 ms: capacity 100/s, offered 200/s for 3 s.
        let run = open_loop(codel(), 2, 20, 5, 3).await;
        // Goodput: after the first second, a grant every 10 ms, as without
        // shedding: no slot idled while someone waited.
        let steady = run
            .grants
            .iter()
            .filter(|&&t| (1000..3000).contains(&t))
            .count();
        assert!(
            (198..=201).contains(&steady),
            "{steady} grants in 2 s on a capacity of 100/s"
        );
        // Admitted requests waited about the target at most, not the 5 s
        // timeout; the excess was shed with the overload rejection.
        let late: Vec<_> = run.outcomes.iter().filter(|(at, _)| *at >= 1000).collect();
        let waits: Vec<Duration> = late.iter().filter_map(|(_, r)| r.ok()).collect();
        let max = waits.iter().max().unwrap();
        assert!(
            *max <= Duration::from_millis(60),
            "longest admitted wait {max:?}"
        );
        let shed = late
            .iter()
            .filter(|(_, r)| *r == Err(Rejected::Overloaded))
            .count();
        assert_eq!(shed + waits.len(), late.len(), "only sheds and grants");
        assert!(
            (190..=210).contains(&shed),
            "about half of 400 offered are excess: {shed} shed"
        );
        let d_shed = run
            .outcomes
            .iter()
            .filter(|(_, r)| *r == Err(Rejected::Overloaded))
            .count();
        assert!(d_shed > 0);
    }

    #[tokio::test(start_paused = true)]
    async fn without_overload_control_the_same_load_waits_toward_the_timeout() {
        let run = open_loop(None, 2, 20, 5, 3).await;
        let steady = run
            .grants
            .iter()
            .filter(|&&t| (1000..3000).contains(&t))
            .count();
        assert!((198..=201).contains(&steady), "{steady}");
        let longest = run
            .outcomes
            .iter()
            .filter_map(|(_, r)| r.ok())
            .max()
            .unwrap();
        assert!(longest > Duration::from_secs(1), "{longest:?}");
        assert!(run
            .outcomes
            .iter()
            .all(|(_, r)| *r != Err(Rejected::Overloaded)));
    }

    #[tokio::test(start_paused = true)]
    async fn below_capacity_nothing_is_shed() {
        // 80/s offered to 100/s of capacity, in a regular rhythm.
        let run = open_loop(codel(), 2, 20, 12, 3).await;
        assert!(run.outcomes.iter().all(|(_, r)| r.is_ok()));
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_that_drains_is_not_shed() {
        // 40 at once on 8 slots of 200 ms: the queue stands for 800 ms, but
        // nothing new arrives, so it is draining, not overloaded.
        let d = dispatcher(&[8], 100, 5_000);
        d.set_overload(codel());
        let cancel = tokio_util::sync::CancellationToken::new();
        tokio::spawn(d.clone().run_waker(cancel.clone()));
        let tasks: Vec<_> = (0..40)
            .map(|_| {
                let d = d.clone();
                tokio::spawn(async move {
                    let a = d.acquire(&[], false).await?;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    drop(a);
                    Ok::<_, Rejected>(())
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        assert_eq!(d.metrics.rejected_overload.get(), 0);
        cancel.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn a_shed_request_gets_a_503_that_says_the_queue_is_overloaded() {
        // One slot held by a long request while new ones keep arriving.
        let d = dispatcher(&[1], 100, 5_000);
        d.set_overload(codel());
        let cancel = tokio_util::sync::CancellationToken::new();
        tokio::spawn(d.clone().run_waker(cancel.clone()));
        let mut tasks = Vec::new();
        for i in 0..120 {
            let d = d.clone();
            tasks.push(tokio::spawn(async move {
                let t0 = tokio::time::Instant::now();
                match d.acquire(&[], false).await {
                    Ok(a) => {
                        tokio::time::sleep(Duration::from_millis(30)).await;
                        drop(a);
                        (i, Ok(()), t0.elapsed())
                    }
                    Err(e) => (i, Err(e), t0.elapsed()),
                }
            }));
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let mut shed = 0;
        for t in tasks {
            let (i, r, took) = t.await.unwrap();
            if let Err(e) = r {
                assert_eq!(e, Rejected::Overloaded);
                // Once overload is established (the queue stands within 2
                // intervals, then for STANDING_WINDOWS of 100 ms: by 700 ms,
                // request 70), a stale waiter goes at the target; those
                // queued before it was detected go at once then.
                let detected = 10 * (2 + overload::STANDING_WINDOWS as usize);
                let bound = if i >= detected { 60 } else { 800 };
                assert!(
                    took <= Duration::from_millis(bound),
                    "request {i} shed after {took:?}"
                );
                let err = e.into_error("app");
                assert_eq!(err.status(), http::StatusCode::SERVICE_UNAVAILABLE);
                assert_eq!(err.retry_after(), Some(1));
                assert_eq!(err.client_text(), "queue overloaded for upstream `app`");
                shed += 1;
            }
        }
        assert!(shed > 0);
        assert_eq!(d.metrics.rejected_overload.get(), shed);
        assert_eq!(d.metrics.rejected_timeout.get(), 0);
        cancel.cancel();
    }

    /// One backend of 2 threads, prefetch 1, with learned times: /short
    /// 10 ms, /long 1500 ms.
    fn prefetching(discipline: Discipline) -> Arc<Dispatcher> {
        prefetching_on(dispatcher(&[2], 100, 60_000), discipline)
    }

    fn prefetching_on(d: Arc<Dispatcher>, discipline: Discipline) -> Arc<Dispatcher> {
        d.set_discipline(discipline);
        d.set_prefetch(prefetch::Policy::new(crate::config::Prefetch::Fixed(1), 1));
        for _ in 0..20 {
            d.observe("/long", 1.5);
            d.observe("/short", 0.010);
        }
        d
    }

    fn queue_for(d: &Arc<Dispatcher>, class: &'static str) -> tokio::task::JoinHandle<Admitted> {
        let d = d.clone();
        tokio::spawn(async move { d.acquire_as(&[], false, class).await.unwrap() })
    }

    #[tokio::test(start_paused = true)]
    async fn a_short_request_goes_as_an_extra_where_a_short_one_is_nearly_done() {
        // Under fifo too: prefetch learns the service times it needs.
        let d = prefetching(Discipline::Fifo);
        let a = d.acquire_as(&[], false, "/short").await.unwrap();
        let b = d.acquire_as(&[], false, "/long").await.unwrap();
        tokio::time::advance(Duration::from_millis(8)).await;
        // Both threads busy, one 2 ms from done: the next waits in the worker.
        let extra = d.acquire_as(&[], false, "/short").await.unwrap();
        assert_eq!(extra.waited, Duration::ZERO);
        assert_eq!(d.backends()[0].in_flight(), 3);
        // One extra at most: the next waits in Usher.
        let waiting = queue_for(&d, "/short");
        tokio::task::yield_now().await;
        assert_eq!(d.queue_len(), 1);
        assert_eq!(d.backends()[0].in_flight(), 3);
        // The short one ends: its thread takes the extra, which is now the
        // request nearly done... in 10 ms; the waiter goes as the new extra.
        drop(a);
        let second = waiting.await.unwrap();
        assert_eq!(d.backends()[0].in_flight(), 3);
        drop((b, extra, second));
        assert_eq!(d.backends()[0].in_flight(), 0);
        assert!(d.inner.lock().unwrap().tracks[0].running.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn an_extra_is_learned_from_only_once_it_has_a_thread() {
        // The learner must see a prefetched request's time on a thread, not
        // its wait in the worker's queue (else under steady prefetch it sees
        // nothing it can use: every new request is an extra). Marks are
        // kept where capacity is learned: `auto`, two threads by default.
        let auto = Backend::new("127.0.0.1:2000".parse().unwrap(), 1, None, 2);
        let d = prefetching_on(
            dispatcher_of(vec![Arc::new(auto)], 100, 60_000),
            Discipline::Fifo,
        );
        let a = d.acquire_as(&[], false, "/short").await.unwrap();
        let _b = d.acquire_as(&[], false, "/short").await.unwrap();
        let backend = d.backends()[0].clone();
        let sent_a = backend.load_mark();
        let extra = d.acquire_as(&[], false, "/short").await.unwrap();
        let sent_extra = backend.load_mark();
        assert_eq!(backend.in_flight(), 3);
        // A thread frees: the extra has it from now on, and is learned from then.
        let freed = loop {
            // The marks' clock is the backend's (µs), not tokio's paused one.
            let m = backend.load_mark();
            if m.at_us() > sent_extra.at_us() {
                break m;
            }
            std::hint::spin_loop();
        };
        assert_eq!(
            a.slot
                .finish("/short", 0.008, sent_a, tokio::time::Instant::now())
                .unwrap(),
            sent_a
        );
        let from = extra
            .slot
            .finish("/short", 0.012, sent_extra, tokio::time::Instant::now())
            .unwrap();
        assert!(from.at_us() >= freed.at_us(), "{from:?} before {freed:?}");
        // Back before any thread freed (refused): nothing to learn from.
        let _c = d.acquire_as(&[], false, "/short").await.unwrap();
        let refused = d.acquire_as(&[], false, "/short").await.unwrap();
        assert_eq!(backend.in_flight(), 3);
        let sent = backend.load_mark();
        assert!(refused
            .slot
            .finish("/short", 0.001, sent, tokio::time::Instant::now())
            .is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn a_short_request_never_waits_behind_threads_that_all_run_long_ones() {
        let d = prefetching(Discipline::ShortestFirst);
        let a = d.acquire_as(&[], false, "/long").await.unwrap();
        let b = d.acquire_as(&[], false, "/long").await.unwrap();
        tokio::time::advance(Duration::from_millis(100)).await;
        let short = queue_for(&d, "/short");
        tokio::task::yield_now().await;
        // Arrivals and time do not change it while both run long.
        for _ in 0..5 {
            tokio::time::advance(Duration::from_millis(100)).await;
            d.kick();
            tokio::task::yield_now().await;
        }
        assert_eq!(d.queue_len(), 1);
        assert_eq!(d.backends()[0].in_flight(), 2);
        // It goes to the first thread that frees.
        drop(a);
        let got = short.await.unwrap();
        assert_eq!(d.backends()[0].in_flight(), 2);
        drop((b, got));
    }

    #[tokio::test(start_paused = true)]
    async fn only_the_head_of_the_queue_goes_as_an_extra() {
        // The short head may not go behind two long ones; the long request
        // queued after it could, but would then take the next thread before it.
        let d = prefetching(Discipline::ShortestFirst);
        let a = d.acquire_as(&[], false, "/long").await.unwrap();
        let b = d.acquire_as(&[], false, "/long").await.unwrap();
        tokio::time::advance(Duration::from_millis(1400)).await;
        let short = queue_for(&d, "/short");
        tokio::task::yield_now().await;
        let long = queue_for(&d, "/long");
        tokio::task::yield_now().await;
        assert_eq!(d.queue_len(), 2);
        assert_eq!(d.backends()[0].in_flight(), 2);
        drop(a);
        let s = short.await.unwrap();
        // Now the long one heads the queue, and a thread (the other long)
        // is due within its horizon.
        let l = long.await.unwrap();
        assert_eq!(d.backends()[0].in_flight(), 3);
        drop((b, s, l));
    }

    #[tokio::test(start_paused = true)]
    async fn without_a_queue_or_without_prefetch_the_cap_is_strict() {
        let d = prefetching(Discipline::ShortestFirst);
        let a = d.acquire_as(&[], false, "/short").await.unwrap();
        let b = d.acquire_as(&[], false, "/short").await.unwrap();
        tokio::time::advance(Duration::from_millis(9)).await;
        // Nobody waits: nothing beyond capacity.
        assert_eq!(d.backends()[0].in_flight(), 2);
        d.set_prefetch(prefetch::Policy::new(crate::config::Prefetch::Fixed(0), 1));
        let waiting = queue_for(&d, "/short");
        tokio::task::yield_now().await;
        assert_eq!(d.queue_len(), 1);
        assert_eq!(d.backends()[0].in_flight(), 2);
        drop(a);
        let c = waiting.await.unwrap();
        drop((b, c));
    }

    #[tokio::test(start_paused = true)]
    async fn auto_sends_short_extras_only_where_the_worker_reported_its_threads() {
        let reported = Arc::new(Backend::new("127.0.0.1:2100".parse().unwrap(), 1, None, 4));
        reported.report_threads(1);
        let fixed = Arc::new(Backend::new(
            "127.0.0.1:2101".parse().unwrap(),
            1,
            Some(1),
            4,
        ));
        let d = Dispatcher::new(
            vec![reported.clone(), fixed.clone()],
            Balance::LeastOutstanding,
            100,
            Duration::from_secs(60),
            metrics(),
        );
        d.set_discipline(Discipline::ShortestFirst);
        d.set_prefetch(prefetch::Policy::new(crate::config::Prefetch::Auto, 1));
        for _ in 0..20 {
            d.observe("/short", 0.010);
            d.observe("/slow", 0.100);
        }
        let a = d.acquire_as(&[], false, "/short").await.unwrap();
        let b = d.acquire_as(&[], false, "/short").await.unwrap();
        tokio::time::advance(Duration::from_millis(8)).await;
        // Both are 2 ms from done; only the reporting worker takes an extra
        // (`max_in_flight: 1` may be below its threads on purpose).
        let extra = d.acquire_as(&[], false, "/short").await.unwrap();
        assert!(Arc::ptr_eq(extra.slot.backend(), &reported));
        assert_eq!((reported.in_flight(), fixed.in_flight()), (2, 1));
        // A 100 ms view gains too little from an extra under `auto`.
        drop(extra);
        tokio::time::advance(NO_EXTRAS_HOLD).await;
        drop((a, b));
        let c = d.acquire_as(&[], false, "/slow").await.unwrap();
        let e = d.acquire_as(&[], false, "/slow").await.unwrap();
        tokio::time::advance(Duration::from_millis(95)).await;
        let waiting = queue_for(&d, "/slow");
        tokio::task::yield_now().await;
        assert_eq!(d.queue_len(), 1);
        assert_eq!((reported.in_flight(), fixed.in_flight()), (1, 1));
        drop(c);
        let f = waiting.await.unwrap();
        drop((e, f));
    }

    #[tokio::test(start_paused = true)]
    async fn a_worker_that_refuses_an_extra_gets_no_more_for_a_while() {
        let d = prefetching(Discipline::ShortestFirst);
        let a = d.acquire_as(&[], false, "/short").await.unwrap();
        let b = d.acquire_as(&[], false, "/short").await.unwrap();
        tokio::time::advance(Duration::from_millis(8)).await;
        let extra = d.acquire_as(&[], false, "/short").await.unwrap();
        // It comes back before either thread freed: refused (`--queue 0`).
        drop(extra);
        let waiting = queue_for(&d, "/short");
        tokio::task::yield_now().await;
        assert_eq!(d.queue_len(), 1);
        assert_eq!(d.backends()[0].in_flight(), 2);
        drop(a);
        let c = waiting.await.unwrap();
        // An extra answered after its time, before Usher saw a thread free
        // (a late read), is no refusal.
        tokio::time::advance(NO_EXTRAS_HOLD).await;
        drop(c);
        let c = d.acquire_as(&[], false, "/short").await.unwrap();
        tokio::time::advance(Duration::from_millis(8)).await;
        let late = d.acquire_as(&[], false, "/short").await.unwrap();
        assert_eq!(d.backends()[0].in_flight(), 3);
        tokio::time::advance(Duration::from_millis(12)).await;
        drop(late);
        assert!(
            d.inner.lock().unwrap().tracks[0].no_extras_until.unwrap()
                < tokio::time::Instant::now()
        );
        // After the hold, extras again.
        tokio::time::advance(NO_EXTRAS_HOLD).await;
        drop((b, c));
        let e = d.acquire_as(&[], false, "/short").await.unwrap();
        let f = d.acquire_as(&[], false, "/short").await.unwrap();
        assert_eq!(d.backends()[0].in_flight(), 2);
        tokio::time::advance(Duration::from_millis(9)).await;
        let g = d.acquire_as(&[], false, "/short").await.unwrap();
        assert_eq!(d.backends()[0].in_flight(), 3);
        drop((e, f, g));
    }

    #[test]
    fn upgrades_go_to_the_least_upgraded_backend_under_the_limit() {
        let d = dispatcher(&[4, 4], 8, 100);
        let t1 = d.admit_upgrade(&[], 1).unwrap();
        let t2 = d.admit_upgrade(&[], 1).unwrap();
        assert!(!Arc::ptr_eq(t1.backend(), t2.backend()));
        assert_eq!(d.admit_upgrade(&[], 1).err(), Some(Rejected::UpgradeLimit));
        drop(t1);
        let t3 = d.admit_upgrade(&[], 1).unwrap();
        assert_eq!(t3.backend().upgraded(), 1);
        // Tunnels take no request slot.
        assert!(d.backends().iter().all(|b| b.in_flight() == 0));
        drop((t2, t3));
        assert!(d.backends().iter().all(|b| b.upgraded() == 0));
        for b in d.backends() {
            b.health.set_up(false);
        }
        assert_eq!(d.admit_upgrade(&[], 5).err(), Some(Rejected::NoBackend));
    }
}
