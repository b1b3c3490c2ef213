//! Choosing a backend among those that have a free slot.
//!
//! This is pure policy: the dispatcher decides *whether* a request may go out
//! (some backend has `in_flight < capacity`); this module decides *where*.
//! `least_outstanding` is the default because with threaded workers the number
//! of outstanding requests, relative to weight, is the load that matters;
//! `round_robin` and `random` exist to compare against.

use std::net::SocketAddr;
use std::time::Instant;

use crate::config::Balance;
use crate::dispatch::backend::Backend;
use std::sync::Arc;

/// What a backend's load is counted in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Load {
    /// Requests in flight, against its capacity (threads).
    Requests,
    /// Open upgraded connections, against `upgrades.max_upgraded`.
    Upgraded { max: u32 },
}

impl Load {
    fn of(self, b: &Backend) -> u32 {
        match self {
            Load::Requests => b.in_flight(),
            Load::Upgraded { .. } => b.upgraded(),
        }
    }

    fn has_room(self, b: &Backend) -> bool {
        match self {
            Load::Requests => b.in_flight() < b.capacity(),
            Load::Upgraded { max } => b.upgraded() < max,
        }
    }
}

/// Per-upstream balancer state (the round-robin cursor).
#[derive(Debug)]
pub struct Balancer {
    policy: Balance,
    cursor: usize,
}

impl Balancer {
    pub fn new(policy: Balance) -> Self {
        Balancer { policy, cursor: 0 }
    }

    /// Picks a backend that is available and has a free slot. Backends in
    /// `avoid` (already tried by this request) are used only when no other
    /// backend is up at all: while another one is up but busy, the request
    /// waits for it rather than going back where it just failed. Returns the
    /// index into `backends`.
    pub fn pick(
        &mut self,
        backends: &[Arc<Backend>],
        avoid: &[SocketAddr],
        now: Instant,
    ) -> Option<usize> {
        self.pick_for(Load::Requests, backends, avoid, now)
    }

    /// [`Balancer::pick`], with load counted as `load` says.
    pub fn pick_for(
        &mut self,
        load: Load,
        backends: &[Arc<Backend>],
        avoid: &[SocketAddr],
        now: Instant,
    ) -> Option<usize> {
        let free = |i: usize| {
            let b = &backends[i];
            b.health.is_available(now) && load.has_room(b)
        };
        if let Some(i) = self.pick_where(load, backends, |i| {
            free(i) && !avoid.contains(&backends[i].addr)
        }) {
            return Some(i);
        }
        let others_up = backends
            .iter()
            .any(|b| b.health.is_available(now) && !avoid.contains(&b.addr));
        if others_up {
            return None;
        }
        self.pick_where(load, backends, free)
    }

    fn pick_where(
        &mut self,
        load: Load,
        backends: &[Arc<Backend>],
        ok: impl Fn(usize) -> bool,
    ) -> Option<usize> {
        let n = backends.len();
        if n == 0 {
            return None;
        }
        match self.policy {
            Balance::RoundRobin => {
                for k in 0..n {
                    let i = (self.cursor + k) % n;
                    if ok(i) {
                        self.cursor = i + 1;
                        return Some(i);
                    }
                }
                None
            }
            Balance::Random => {
                let candidates: Vec<usize> = (0..n).filter(|&i| ok(i)).collect();
                (!candidates.is_empty()).then(|| candidates[fastrand::usize(..candidates.len())])
            }
            Balance::LeastOutstanding => {
                // Lowest in_flight/weight; ties broken uniformly at random
                // (reservoir sampling) so equal backends share load evenly.
                let mut best: Option<usize> = None;
                let mut ties = 0u32;
                for i in (0..n).filter(|&i| ok(i)) {
                    let Some(b) = best else {
                        best = Some(i);
                        ties = 1;
                        continue;
                    };
                    let (x, y) = (&backends[i], &backends[b]);
                    let lhs = u64::from(load.of(x)) * u64::from(y.weight());
                    let rhs = u64::from(load.of(y)) * u64::from(x.weight());
                    if lhs < rhs {
                        best = Some(i);
                        ties = 1;
                    } else if lhs == rhs {
                        ties += 1;
                        if fastrand::u32(..ties) == 0 {
                            best = Some(i);
                        }
                    }
                }
                best
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backends(caps: &[(u32, u32)]) -> Vec<Arc<Backend>> {
        caps.iter()
            .enumerate()
            .map(|(i, &(cap, w))| {
                Arc::new(Backend::new(
                    format!("127.0.0.1:{}", 1000 + i).parse().unwrap(),
                    w,
                    Some(cap),
                    4,
                ))
            })
            .collect()
    }

    #[test]
    fn least_outstanding_picks_the_least_loaded_and_skips_full_ones() {
        let bs = backends(&[(2, 1), (2, 1), (2, 1)]);
        let mut bal = Balancer::new(Balance::LeastOutstanding);
        let now = Instant::now();
        bs[0].inc();
        bs[0].inc();
        bs[1].inc();
        assert_eq!(bal.pick(&bs, &[], now), Some(2));
        bs[2].inc();
        bs[2].inc();
        assert_eq!(bal.pick(&bs, &[], now), Some(1));
        bs[1].inc();
        assert_eq!(bal.pick(&bs, &[], now), None);
    }

    #[test]
    fn weight_scales_outstanding() {
        let bs = backends(&[(8, 1), (8, 3)]);
        let mut bal = Balancer::new(Balance::LeastOutstanding);
        let now = Instant::now();
        bs[0].inc();
        bs[1].inc();
        bs[1].inc();
        // 1/1 vs 2/3: the heavier backend is less loaded.
        assert_eq!(bal.pick(&bs, &[], now), Some(1));
    }

    #[test]
    fn ties_are_broken_randomly_and_avoid_is_a_preference() {
        let bs = backends(&[(4, 1), (4, 1), (4, 1)]);
        let mut bal = Balancer::new(Balance::LeastOutstanding);
        let now = Instant::now();
        let mut seen = [0; 3];
        for _ in 0..300 {
            seen[bal.pick(&bs, &[], now).unwrap()] += 1;
        }
        assert!(seen.iter().all(|&c| c > 50), "{seen:?}");
        let avoid = [bs[0].addr, bs[1].addr];
        assert_eq!(bal.pick(&bs, &avoid, now), Some(2));
        // The only other backend is busy: wait for it, don't go back.
        for _ in 0..4 {
            bs[2].inc();
        }
        assert_eq!(bal.pick(&bs, &avoid, now), None);
        // It is down: going back is all that is left.
        bs[2].health.set_up(false);
        assert!(bal.pick(&bs, &avoid, now).is_some());
        let one = backends(&[(4, 1)]);
        assert_eq!(bal.pick(&one, &[one[0].addr], now), Some(0));
    }

    #[test]
    fn unavailable_backends_are_skipped() {
        let bs = backends(&[(4, 1), (4, 1)]);
        let mut bal = Balancer::new(Balance::RoundRobin);
        let now = Instant::now();
        bs[0].health.set_up(false);
        for _ in 0..4 {
            assert_eq!(bal.pick(&bs, &[], now), Some(1));
        }
        bs[1].health.set_draining(true);
        assert_eq!(bal.pick(&bs, &[], now), None);
    }

    #[test]
    fn round_robin_rotates() {
        let bs = backends(&[(4, 1), (4, 1), (4, 1)]);
        let mut bal = Balancer::new(Balance::RoundRobin);
        let now = Instant::now();
        let picks: Vec<_> = (0..6).map(|_| bal.pick(&bs, &[], now).unwrap()).collect();
        assert_eq!(picks, vec![0, 1, 2, 0, 1, 2]);
    }
}
