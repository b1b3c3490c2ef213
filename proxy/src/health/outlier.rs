//! Passive outlier ejection as a pure policy: after a run of consecutive
//! gateway failures a backend is ejected for `base × times_ejected`
//! (capped at `max`), unless that would eject more than
//! `max_ejected_percent` of its upstream. A backend that behaved for `max`
//! since its last ejection starts over: the multiplier punishes flapping, not
//! one bad day. An ejection for *refused connections* ends early when an
//! active check passes (the process is back).
//!
//! Plain data and `Instant`s in, verdicts out: [`super::Health`] wraps it
//! with the atomics the request path reads.

use std::time::{Duration, Instant};

use crate::config::OutlierConfig;

/// The thresholds, from `outlier:`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// Failures in a row that eject (a refused connection ejects at once).
    pub consecutive_failures: u32,
    pub base: Duration,
    pub max: Duration,
    pub max_ejected_percent: u32,
}

impl From<&OutlierConfig> for Policy {
    fn from(o: &OutlierConfig) -> Self {
        Policy {
            consecutive_failures: o.consecutive_failures,
            base: o.base_ejection.0,
            max: o.max_ejection.0,
            max_ejected_percent: o.max_ejected_percent,
        }
    }
}

/// What passive health decided about one outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Fine,
    Ejected(Duration),
}

/// Whether one more of `total` backends may be ejected while `ejected` are.
pub fn may_eject(ejected: usize, total: usize, max_percent: u32) -> bool {
    (ejected + 1) * 100 <= max_percent as usize * total
}

/// One backend's ejection history.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Outlier {
    times_ejected: u32,
    until: Option<Instant>,
    /// The ejection was for refused connections.
    unreachable: bool,
}

impl Outlier {
    /// The end of the current (or last) ejection.
    pub fn until(&self) -> Option<Instant> {
        self.until
    }

    pub fn is_ejected(&self, now: Instant) -> bool {
        self.until.is_some_and(|t| now < t)
    }

    /// A gateway failure, the `run`-th in a row (`unreachable`: a refused
    /// connection, decisive on its own). `may_eject` is the percent cap's
    /// answer. On [`Verdict::Ejected`] the caller starts a new run.
    pub fn on_failure(
        &mut self,
        run: u32,
        unreachable: bool,
        policy: &Policy,
        may_eject: bool,
        now: Instant,
    ) -> Verdict {
        if self.is_ejected(now) {
            return Verdict::Fine;
        }
        if self
            .until
            .is_some_and(|t| now.duration_since(t) > policy.max)
        {
            self.times_ejected = 0;
        }
        let threshold = if unreachable {
            1
        } else {
            policy.consecutive_failures.max(1)
        };
        if run < threshold || !may_eject {
            return Verdict::Fine;
        }
        self.times_ejected += 1;
        self.unreachable = unreachable;
        let d = policy
            .base
            .saturating_mul(self.times_ejected)
            .min(policy.max);
        self.until = Some(now + d);
        Verdict::Ejected(d)
    }

    /// An active check passed: an ejection for refused connections ends now;
    /// one for bad answers runs its course. True if it ended one.
    pub fn on_check_passed(&mut self, now: Instant) -> bool {
        if self.unreachable && self.is_ejected(now) {
            self.until = Some(now);
            self.unreachable = false;
            return true;
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(n: u32, base: u64, max: u64) -> Policy {
        Policy {
            consecutive_failures: n,
            base: Duration::from_secs(base),
            max: Duration::from_secs(max),
            max_ejected_percent: 50,
        }
    }

    #[test]
    fn ejection_grows_with_each_ejection_and_is_capped() {
        let p = policy(3, 5, 12);
        let mut o = Outlier::default();
        let now = Instant::now();
        assert_eq!(o.on_failure(2, false, &p, true, now), Verdict::Fine);
        assert_eq!(
            o.on_failure(3, false, &p, true, now),
            Verdict::Ejected(p.base)
        );
        assert!(o.is_ejected(now));
        let later = now + Duration::from_secs(6);
        assert!(!o.is_ejected(later));
        assert_eq!(
            o.on_failure(3, false, &p, true, later),
            Verdict::Ejected(Duration::from_secs(10))
        );
        let later = later + Duration::from_secs(11);
        assert_eq!(
            o.on_failure(3, false, &p, true, later),
            Verdict::Ejected(p.max)
        );
    }

    #[test]
    fn good_behaviour_for_max_resets_the_multiplier() {
        let p = policy(1, 5, 12);
        let mut o = Outlier::default();
        let now = Instant::now();
        o.on_failure(1, false, &p, true, now);
        let later = now + Duration::from_secs(5 + 13);
        assert_eq!(
            o.on_failure(1, false, &p, true, later),
            Verdict::Ejected(p.base)
        );
    }

    #[test]
    fn the_percent_cap_and_an_ongoing_ejection_block() {
        let p = policy(1, 5, 12);
        let mut o = Outlier::default();
        let now = Instant::now();
        assert_eq!(o.on_failure(1, false, &p, false, now), Verdict::Fine);
        assert_eq!(
            o.on_failure(1, false, &p, true, now),
            Verdict::Ejected(p.base)
        );
        assert_eq!(o.on_failure(9, false, &p, true, now), Verdict::Fine);
        assert!(may_eject(0, 2, 50));
        assert!(!may_eject(1, 2, 50));
        assert!(!may_eject(0, 1, 50));
        assert!(may_eject(0, 1, 100));
    }

    #[test]
    fn a_passing_check_ends_only_an_unreachable_ejection() {
        let p = policy(5, 5, 12);
        let now = Instant::now();
        let mut refused = Outlier::default();
        assert_eq!(
            refused.on_failure(1, true, &p, true, now),
            Verdict::Ejected(p.base)
        );
        assert!(refused.on_check_passed(now));
        assert!(!refused.is_ejected(now));
        let mut bad = Outlier::default();
        bad.on_failure(5, false, &p, true, now);
        assert!(!bad.on_check_passed(now));
        assert!(bad.is_ejected(now));
    }
}
