//! Service-time estimates per request class, for the shortest-expected-first
//! queue discipline.
//!
//! Why: with one FIFO queue in front of threaded workers, a 10 ms request that
//! arrives behind a burst of 200 ms requests waits for all of them. Serving the
//! queue by *expected* service time lets short requests pass long ones; ageing
//! (see `dispatch.rs`) makes sure long ones still go out. The estimate of a
//! class (by default the request path) is an exponentially weighted moving
//! average of how long the backend took; an unknown class gets the upstream's
//! overall average.

use std::hash::{BuildHasher, RandomState};
use std::sync::OnceLock;

use rustc_hash::FxHashMap;

/// Weight of a new observation in the moving averages.
const ALPHA: f64 = 0.2;
/// Classes remembered; past this, the table starts over (bounded memory
/// against clients that invent paths).
const MAX_CLASSES: usize = 4096;

/// A request class (its path, say), hashed once per request: the queue's
/// lookup and the release's update both use it.
///
/// The hash is std's SipHash with keys drawn once per process, so a client
/// cannot make paths that collide (in the table, or into one estimate: two
/// classes share one only if their 64-bit keyed hashes are equal).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Class(u64);

impl Class {
    pub fn of(name: &str) -> Self {
        static KEYS: OnceLock<RandomState> = OnceLock::new();
        Class(KEYS.get_or_init(RandomState::new).hash_one(name))
    }
}

impl From<&str> for Class {
    fn from(name: &str) -> Self {
        Class::of(name)
    }
}

#[derive(Debug, Default)]
pub struct Estimates {
    /// Keyed by a keyed hash already: Fx only spreads it.
    by_class: FxHashMap<Class, f64>,
    overall: Option<f64>,
}

impl Estimates {
    /// Records that a request of `class` took `secs` at the backend.
    pub fn observe(&mut self, class: impl Into<Class>, secs: f64) {
        if !secs.is_finite() || secs < 0.0 {
            return;
        }
        self.overall = Some(match self.overall {
            None => secs,
            Some(o) => o + ALPHA * (secs - o),
        });
        let class = class.into();
        if let Some(e) = self.by_class.get_mut(&class) {
            *e += ALPHA * (secs - *e);
            return;
        }
        if self.by_class.len() >= MAX_CLASSES {
            self.by_class.clear();
        }
        self.by_class.insert(class, secs);
    }

    /// Expected service time of `class`, in seconds.
    pub fn get(&self, class: impl Into<Class>) -> f64 {
        self.by_class
            .get(&class.into())
            .copied()
            .or(self.overall)
            .unwrap_or(0.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn learns_per_class_and_falls_back_to_the_overall_average() {
        let mut e = Estimates::default();
        assert_eq!(e.get("/x"), 0.0);
        for _ in 0..50 {
            e.observe("/short", 0.010);
            e.observe("/long", 0.200);
        }
        assert!((e.get("/short") - 0.010).abs() < 1e-6);
        assert!((e.get("/long") - 0.200).abs() < 1e-6);
        let unknown = e.get("/new");
        assert!(unknown > 0.010 && unknown < 0.200, "{unknown}");
        e.observe("/short", f64::NAN);
        assert!((e.get("/short") - 0.010).abs() < 1e-6);
    }
}
