//! Health: **where a backend is marked unhealthy**, and whether it may take
//! requests now.
//!
//! Two inputs, kept apart: the active check's rise/fall verdict
//! ([`active`], with its pure [`Threshold`]), and passive outlier ejection
//! after consecutive gateway failures ([`outlier`], pure). [`Health`] is one
//! backend's state: the request path asks it "available?" without a lock;
//! failures take a short lock for the ejection bookkeeping.
//!
//! A backend that is a process Usher runs (a fleet process) also follows a
//! [`Gate`], which its supervisor opens once the process accepts connections
//! and closes when it exits. The gate and the active check are ANDed: a
//! passing check cannot bring up a process that is not running, and an open
//! gate does not overrule a failing check.

pub mod active;
pub mod outlier;
pub mod threshold;

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

pub use active::{probe, Load, ProbeSpec, Target};
pub use outlier::{Policy, Verdict};
pub use threshold::Threshold;

use outlier::Outlier;

/// Whether the process behind a backend accepts connections, as the one
/// who runs it sees it. Closed until it is opened. It also carries the
/// process's vital signs for `/status`: pid, restarts, when it started.
#[derive(Debug, Default)]
pub struct Gate(AtomicBool, Mutex<ProcessInfo>);

/// A fleet process as `/status` shows it.
#[derive(Debug, Default, Clone, Copy)]
pub struct ProcessInfo {
    pub pid: Option<u32>,
    pub restarts: u32,
    pub started: Option<std::time::SystemTime>,
}

impl Gate {
    /// A new process `pid` runs behind the gate.
    pub fn started(&self, pid: Option<u32>) {
        let mut i = self.1.lock().unwrap();
        i.pid = pid;
        i.started = Some(std::time::SystemTime::now());
    }

    /// The process exited and will be restarted.
    pub fn restarted(&self) {
        let mut i = self.1.lock().unwrap();
        i.restarts += 1;
        i.pid = None;
    }

    pub fn process(&self) -> ProcessInfo {
        *self.1.lock().unwrap()
    }

    /// The process accepts connections; true if the gate was closed.
    pub fn open(&self) -> bool {
        !self.0.swap(true, Ordering::Release)
    }

    /// The process is gone (or not started yet); true if the gate was open.
    pub fn close(&self) -> bool {
        self.0.swap(false, Ordering::Release)
    }

    pub fn is_open(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

/// One backend's health.
#[derive(Debug)]
pub struct Health {
    /// The active check's verdict (up until a check says otherwise).
    up: AtomicBool,
    /// Taken out of rotation by the operator or a rolling restart.
    draining: AtomicBool,
    outlier: Mutex<Outlier>,
    /// End of the current ejection in µs since `epoch` (0: never ejected),
    /// mirrored from `outlier` for the lock-free check.
    ejected_until_us: AtomicU64,
    /// Consecutive gateway failures; a success resets it without a lock.
    failure_run: AtomicU32,
    epoch: Instant,
    /// Times this backend was ejected (for `/status`).
    ejections: AtomicU32,
    /// The last active check: when, and why it failed (`None`: it passed).
    last_check: Mutex<Option<(std::time::SystemTime, Option<String>)>>,
    /// The process's gate, for a backend that is a process Usher runs.
    gate: OnceLock<Arc<Gate>>,
}

impl Default for Health {
    fn default() -> Self {
        Health {
            up: AtomicBool::new(true),
            draining: AtomicBool::new(false),
            outlier: Mutex::new(Outlier::default()),
            ejected_until_us: AtomicU64::new(0),
            failure_run: AtomicU32::new(0),
            epoch: Instant::now(),
            last_check: Mutex::new(None),
            ejections: AtomicU32::new(0),
            gate: OnceLock::new(),
        }
    }
}

impl Health {
    /// The active check's verdict (see [`Health::is_accepting`] for the
    /// process's own state).
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    /// Makes this backend follow `gate`: down while it is closed. Set once,
    /// when the backend is created; a later call keeps the first gate.
    pub fn follow(&self, gate: Arc<Gate>) {
        let _ = self.gate.set(gate);
    }

    /// False while the backend's process does not accept connections yet
    /// (or has exited); always true for a backend Usher does not run.
    pub fn is_accepting(&self) -> bool {
        self.gate.get().is_none_or(|g| g.is_open())
    }

    /// Sets the active verdict; true if it changed.
    pub fn set_up(&self, up: bool) -> bool {
        self.up.swap(up, Ordering::Relaxed) != up
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

    pub fn is_ejected(&self, now: Instant) -> bool {
        let until = self.ejected_until_us.load(Ordering::Relaxed);
        until != 0 && self.micros(now) < until
    }

    /// When the current ejection ends, if one is on.
    pub fn ejected_until(&self, now: Instant) -> Option<Instant> {
        let until = self.ejected_until_us.load(Ordering::Relaxed);
        (until != 0 && self.micros(now) < until)
            .then(|| self.epoch + std::time::Duration::from_micros(until))
    }

    /// May the backend take new requests?
    pub fn is_available(&self, now: Instant) -> bool {
        self.is_up() && self.is_accepting() && !self.is_draining() && !self.is_ejected(now)
    }

    /// The state as `/status` spells it.
    pub fn state(&self, now: Instant) -> &'static str {
        if self.is_draining() {
            "draining"
        } else if !self.is_up() || !self.is_accepting() {
            "down"
        } else if self.is_ejected(now) {
            "ejected"
        } else {
            "up"
        }
    }

    /// Times this backend was ejected.
    pub fn ejections(&self) -> u32 {
        self.ejections.load(Ordering::Relaxed)
    }

    /// Records an active check's outcome (`failure`: why it failed).
    pub fn record_check(&self, failure: Option<String>) {
        *self.last_check.lock().unwrap() = Some((std::time::SystemTime::now(), failure));
    }

    /// The last active check, if any: when, and why it failed.
    pub fn last_check(&self) -> Option<(std::time::SystemTime, Option<String>)> {
        self.last_check.lock().unwrap().clone()
    }

    pub fn record_success(&self) {
        if self.failure_run.load(Ordering::Relaxed) != 0 {
            self.failure_run.store(0, Ordering::Relaxed);
        }
    }

    /// A gateway failure (`unreachable`: a refused connection).
    pub fn record_failure(
        &self,
        unreachable: bool,
        policy: &Policy,
        may_eject: bool,
        now: Instant,
    ) -> Verdict {
        let mut o = self.outlier.lock().unwrap();
        if o.is_ejected(now) {
            return Verdict::Fine;
        }
        let run = self.failure_run.fetch_add(1, Ordering::Relaxed) + 1;
        let verdict = o.on_failure(run, unreachable, policy, may_eject, now);
        if let Verdict::Ejected(_) = verdict {
            self.failure_run.store(0, Ordering::Relaxed);
            self.ejections.fetch_add(1, Ordering::Relaxed);
            self.mirror(&o);
        }
        verdict
    }

    /// An active check passed; true if that ended an ejection.
    pub fn check_passed(&self, now: Instant) -> bool {
        let mut o = self.outlier.lock().unwrap();
        let ended = o.on_check_passed(now);
        if ended {
            self.mirror(&o);
        }
        ended
    }

    fn mirror(&self, o: &Outlier) {
        if let Some(t) = o.until() {
            self.ejected_until_us
                .store(self.micros(t).max(1), Ordering::Relaxed);
        }
    }
}

/// Passive health for one failure of `target`, one of `all` (which includes
/// it): applies the percent cap across the upstream, then the policy.
pub fn note_failure<'a>(
    all: impl Iterator<Item = &'a Health>,
    target: &Health,
    unreachable: bool,
    policy: &Policy,
    now: Instant,
) -> Verdict {
    let (mut total, mut ejected) = (0, 0);
    for h in all {
        total += 1;
        ejected += usize::from(h.is_ejected(now));
    }
    let may = outlier::may_eject(ejected, total, policy.max_ejected_percent);
    target.record_failure(unreachable, policy, may, now)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_backend_behind_a_closed_gate_is_down_whatever_the_check_says() {
        let now = Instant::now();
        let h = Health::default();
        let gate = Arc::new(Gate::default());
        h.follow(gate.clone());
        assert!(h.is_up(), "the active verdict starts up");
        assert!(!h.is_available(now));
        assert_eq!(h.state(now), "down");

        assert!(gate.open());
        assert!(!gate.open(), "opening an open gate changes nothing");
        assert!(h.is_available(now));
        assert_eq!(h.state(now), "up");

        // A failing check still takes it down with the gate open.
        h.set_up(false);
        assert!(!h.is_available(now));
        h.set_up(true);

        assert!(gate.close());
        assert!(!h.is_available(now));
        assert_eq!(h.state(now), "down");
    }

    #[test]
    fn a_backend_without_a_gate_is_accepting() {
        let h = Health::default();
        assert!(h.is_accepting());
        assert!(h.is_available(Instant::now()));
    }
}
