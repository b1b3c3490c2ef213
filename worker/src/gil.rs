//! A model of CPython's global interpreter lock, so that a benchmark can show what the
//! GIL does to a threaded worker without running Python.
//!
//! # Why not a mutex
//!
//! Under a plain mutex, CPU-bound requests queue: four requests of 20 ms finish at 20,
//! 40, 60 and 80 ms. CPython (the "new GIL" of 3.2 and later, `Python/ceval_gil.h`)
//! *time-slices* them instead: a thread that wants the GIL waits one switch interval
//! (5 ms by default, `sys.setswitchinterval`), then asks the holder to drop it; the
//! holder notices between two bytecodes and hands it over. The four requests run
//! interleaved and all finish near 80 ms. And every return from blocking I/O must
//! take the GIL back, so an I/O-bound request waits up to a switch interval behind a
//! CPU-bound one each time (the convoy effect). Both shapes matter for latency, and
//! neither is what a mutex does.
//!
//! # The model
//!
//! The same moving parts as CPython, under the same names where it has them:
//!
//! - [`Gil::acquire`] is `take_gil`: if the GIL is held, wait on a condition variable
//!   for at most the switch interval; if that timed out and the GIL has not changed
//!   hands in the meantime, set the drop request (`gil_drop_request`). Repeat.
//! - The holder polls the drop request between steps of its work ([`GilGuard::run`],
//!   the eval loop's `eval_breaker` check) and, when it is set, drops the GIL and
//!   queues for it again ([`GilGuard::tick`]).
//! - Dropping with a pending request (`drop_gil` with `FORCE_SWITCHING`) waits until
//!   some other thread has actually taken the GIL. Without that, on a multi-core
//!   machine the dropping thread often just takes the GIL straight back.
//! - [`GilGuard::allow_threads`] is `Py_BEGIN_ALLOW_THREADS` ... `Py_END_ALLOW_THREADS`
//!   around blocking I/O: the GIL is free during it and taken back after it.
//! - [`Gil::switches`] counts hand-offs from one thread to another (`switch_number`).
//!
//! What it leaves out: the GIL's per-interpreter and free-threading variants, pending
//! calls and signals (other reasons to set the eval breaker), and finalisation. A
//! thread's identity is its [`ThreadId`], where CPython uses its thread state. Work
//! time is held wall time: a holder the OS has descheduled still counts as working,
//! as a descheduled Python thread still holds the GIL.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::{self, ThreadId};
use std::time::{Duration, Instant};

/// CPython's default switch interval (`sys.getswitchinterval()` is 0.005).
pub const DEFAULT_SWITCH_INTERVAL: Duration = Duration::from_millis(5);

/// One interpreter's GIL. Share it between threads by reference or in an `Arc`.
#[derive(Debug)]
pub struct Gil {
    switch_interval: Duration,
    state: Mutex<State>,
    /// Signalled when the GIL is dropped (CPython's `cond`).
    released: Condvar,
    /// Signalled when the GIL changes hands (CPython's `switch_cond`).
    switched: Condvar,
    /// Set by a waiter, polled by the holder without taking `state`.
    drop_request: AtomicBool,
}

/// Guarded by `Gil::state`, which is only ever held for a few instructions (or while
/// waiting on one of the condition variables), never across work.
#[derive(Debug, Default)]
struct State {
    locked: bool,
    last_holder: Option<ThreadId>,
    switches: u64,
    /// Threads inside `take`'s wait loop: a forced drop waits for a switch only if
    /// someone can make it.
    waiting: usize,
}

impl Gil {
    /// A free GIL. A zero interval is taken as 1 µs, as CPython does.
    pub fn new(switch_interval: Duration) -> Self {
        Self {
            switch_interval: switch_interval.max(Duration::from_micros(1)),
            state: Mutex::default(),
            released: Condvar::new(),
            switched: Condvar::new(),
            drop_request: AtomicBool::new(false),
        }
    }

    /// How long a waiting thread lets the holder run before asking for the GIL.
    pub fn switch_interval(&self) -> Duration {
        self.switch_interval
    }

    /// How many times the GIL has passed from one thread to another (a thread taking
    /// it back after nobody else had it does not count). The first take counts.
    pub fn switches(&self) -> u64 {
        self.lock().switches
    }

    /// Takes the GIL for the current thread, waiting as CPython's `take_gil` does.
    /// Dropping the guard releases it. Not reentrant: a thread that already holds the
    /// GIL and calls this again waits forever, as it would in CPython.
    pub fn acquire(&self) -> GilGuard<'_> {
        let waited = self.take(self.lock());
        GilGuard {
            gil: self,
            held: true,
            waited,
            takes: 1,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Nothing panics while `state` is locked; a poisoned lock is still consistent.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// `take_gil`, entered with `state` locked. Returns how long it waited.
    fn take(&self, mut state: MutexGuard<'_, State>) -> Duration {
        let mut waited = Duration::ZERO;
        if state.locked {
            let since = Instant::now();
            state.waiting += 1;
            while state.locked {
                let seen = state.switches;
                let (s, wait) = self
                    .released
                    .wait_timeout(state, self.switch_interval)
                    .unwrap_or_else(PoisonError::into_inner);
                state = s;
                if wait.timed_out() && state.locked && state.switches == seen {
                    self.drop_request.store(true, Ordering::Release);
                }
            }
            state.waiting -= 1;
            waited = since.elapsed();
        }
        state.locked = true;
        let me = thread::current().id();
        if state.last_holder != Some(me) {
            state.last_holder = Some(me);
            state.switches += 1;
            self.switched.notify_all();
        }
        // A request aimed at the previous holder is answered.
        self.drop_request.store(false, Ordering::Release);
        waited
    }

    /// `drop_gil`. With a drop request pending it waits until another thread has
    /// taken the GIL (`FORCE_SWITCHING`). Returns `state` still locked, so that a
    /// caller can queue for the GIL again without a gap.
    fn release(&self) -> MutexGuard<'_, State> {
        let mut state = self.lock();
        state.locked = false;
        self.released.notify_one();
        if self.drop_request.swap(false, Ordering::AcqRel) {
            let me = thread::current().id();
            while state.last_holder == Some(me) && state.waiting > 0 {
                state = self
                    .switched
                    .wait(state)
                    .unwrap_or_else(PoisonError::into_inner);
            }
        }
        state
    }
}

impl Default for Gil {
    /// A GIL with [`DEFAULT_SWITCH_INTERVAL`].
    fn default() -> Self {
        Self::new(DEFAULT_SWITCH_INTERVAL)
    }
}

/// The current thread holds the GIL while this lives (except inside
/// [`allow_threads`](Self::allow_threads)). Dropping it releases the GIL.
#[derive(Debug)]
pub struct GilGuard<'a> {
    gil: &'a Gil,
    /// False only while `allow_threads` runs, so that a panic in there does not
    /// release a GIL this thread no longer holds.
    held: bool,
    waited: Duration,
    takes: u32,
}

impl GilGuard<'_> {
    /// The eval loop's check between two bytecodes: if another thread has asked for
    /// the GIL, hand it over and queue for it again. Returns whether it did.
    pub fn tick(&mut self) -> bool {
        if !self.gil.drop_request.load(Ordering::Acquire) {
            return false;
        }
        let state = self.gil.release();
        self.waited += self.gil.take(state);
        self.takes += 1;
        true
    }

    /// CPU work: calls `step` until this thread has held the GIL for `work` in all,
    /// handing it over between steps when asked. Time spent waiting to get it back
    /// does not count. Keep a step short (microseconds): it cannot be interrupted.
    pub fn run(&mut self, work: Duration, mut step: impl FnMut()) {
        let mut done = Duration::ZERO;
        let mut since = Instant::now();
        while done + since.elapsed() < work {
            step();
            if self.gil.drop_request.load(Ordering::Acquire) {
                done += since.elapsed();
                self.tick();
                since = Instant::now();
            }
        }
    }

    /// Blocking I/O: runs `io` with the GIL released and takes it back afterwards,
    /// which can mean waiting behind a CPU-bound holder.
    pub fn allow_threads<R>(&mut self, io: impl FnOnce() -> R) -> R {
        drop(self.gil.release());
        self.held = false;
        let out = io();
        self.waited += self.gil.take(self.gil.lock());
        self.takes += 1;
        self.held = true;
        out
    }

    /// Time this guard has spent waiting to take the GIL: at [`Gil::acquire`], after
    /// each hand-over and after each [`allow_threads`](Self::allow_threads).
    pub fn waited(&self) -> Duration {
        self.waited
    }

    /// How many times this guard has taken the GIL: once at [`Gil::acquire`], then
    /// once after each hand-over and each [`allow_threads`](Self::allow_threads).
    pub fn takes(&self) -> u32 {
        self.takes
    }
}

impl Drop for GilGuard<'_> {
    fn drop(&mut self) {
        if self.held {
            drop(self.gil.release());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    const INTERVAL: Duration = DEFAULT_SWITCH_INTERVAL;

    fn spin() {
        std::hint::spin_loop();
    }

    #[test]
    fn uncontended_acquire_does_not_wait() {
        let gil = Gil::default();
        for _ in 0..3 {
            let mut g = gil.acquire();
            assert_eq!(g.waited(), Duration::ZERO);
            assert!(!g.tick(), "nobody asked for the GIL");
        }
        // Taking it back after nobody else had it is not a switch.
        assert_eq!(gil.switches(), 1);
    }

    /// Time-slicing, not queuing: under a mutex the first would be done at 30 ms.
    #[test]
    fn cpu_bound_threads_share_the_gil_in_slices() {
        const WORK: Duration = Duration::from_millis(30);
        let gil = Gil::new(INTERVAL);
        let start = Instant::now();
        let finished: Vec<Duration> = thread::scope(|s| {
            let threads: Vec<_> = (0..2)
                .map(|_| {
                    s.spawn(|| {
                        gil.acquire().run(WORK, spin);
                        start.elapsed()
                    })
                })
                .collect();
            threads.into_iter().map(|t| t.join().unwrap()).collect()
        });
        let (first, last) = (finished[0].min(finished[1]), finished[0].max(finished[1]));
        let switches = gil.switches();
        eprintln!("finished at {first:?} and {last:?}, {switches} switches");
        assert!(
            first > Duration::from_millis(45),
            "the first finished at {first:?}: it ran alone, not time-sliced"
        );
        assert!(last >= 2 * WORK, "{last:?}: both ran at once");
        // About 60 ms / 5 ms = 12 on an idle machine. On a loaded one the OS wakes a
        // timed-out waiter late, which stretches the slices: 4 was seen on 2 busy cores.
        // Three is the least that shows turns: one, the other, the first again.
        assert!(switches >= 3, "only {switches} switches");
    }

    /// The convoy effect: back from I/O, a thread waits for a CPU-bound holder to be
    /// asked for the GIL, about one switch interval, but not much longer.
    #[test]
    fn returning_from_io_waits_about_one_switch_interval() {
        let gil = Gil::new(INTERVAL);
        let (holding, held) = mpsc::channel();
        let after_io = thread::scope(|s| {
            s.spawn(|| {
                let mut g = gil.acquire();
                holding.send(()).unwrap();
                g.run(Duration::from_millis(200), spin);
            });
            held.recv().unwrap();
            let mut g = gil.acquire();
            let before = g.waited();
            g.allow_threads(|| thread::sleep(Duration::from_millis(10)));
            g.waited() - before
        });
        eprintln!("waited {after_io:?} for the GIL after the I/O");
        assert!(
            after_io >= INTERVAL * 3 / 4,
            "{after_io:?}: took the GIL from a CPU-bound holder without waiting"
        );
        // Up to 14 ms was seen on 2 busy cores; a mutex would wait out the 200 ms.
        assert!(
            after_io < INTERVAL * 10,
            "{after_io:?}: far beyond a switch"
        );
    }

    #[test]
    fn forced_switch_hands_over_instead_of_retaking() {
        let gil = Gil::new(INTERVAL);
        let (holding, held) = mpsc::channel();
        thread::scope(|s| {
            s.spawn(|| {
                let mut g = gil.acquire();
                holding.send(()).unwrap();
                // Only a hand-over gets it out of here.
                while !g.tick() {
                    spin();
                }
            });
            held.recv().unwrap();
            let g = gil.acquire();
            assert!(g.waited() >= INTERVAL * 3 / 4, "{:?}", g.waited());
        });
        assert_eq!(gil.switches(), 3, "holder, waiter, holder again");
    }

    #[test]
    fn a_panic_during_io_leaves_the_gil_free() {
        let gil = Gil::default();
        let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            gil.acquire().allow_threads(|| panic!("I/O failed"));
        }));
        assert!(caught.is_err());
        assert_eq!(gil.acquire().waited(), Duration::ZERO);
    }
}
