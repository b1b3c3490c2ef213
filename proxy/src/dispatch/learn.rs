//! Learning a backend's real concurrency: how many of its threads help.
//!
//! A worker's threads are not always its parallelism. Under CPython's GIL, 4
//! threads serving CPU-bound views share one CPU: a request that runs beside 3
//! others takes 4 times as long and the process answers no more per second
//! than with 1 in flight (waitress, 4 threads, 5 ms CPU views, 150 req/s: p99
//! 15.8 ms at 4 in flight, 6.9 ms at 1). Requests that wait in Usher's queue,
//! where a process with a free GIL may take them, do better than requests
//! time-slicing inside one. So for `max_in_flight: auto` this learns, per
//! backend, the in-flight level past which throughput stops rising, and caps
//! there (never above the threads).
//!
//! **What it measures.** For each response: its *level*, the average number of
//! this Usher's requests running on the backend (in flight, at most its
//! threads) over its time on a thread (its own included, see
//! `Backend::load_mark`; a prefetched extra counts from when a thread freed
//! for it), and its *slowdown*, its time over the
//! uncontended time of its class (`queue.classify`, path by default). The
//! uncontended time of a class is a moving average of the times of that class's
//! requests that ran alone (level ≤ [`ALONE`]), so a mix of 10 ms and 200 ms
//! views does not look like contention. Per level `k` it keeps a moving average
//! of the log slowdown `s(k)`, so throughput is `X(k) ∝ k / s(k)`, with
//! `X(1) = 1`: I/O-bound, `s ≈ 1` and `X(k) = k`; CPU-bound under a GIL,
//! `s(k) ≈ k` and `X` is flat.
//!
//! **What it decides** ([`Learner::target`]): from the levels with at least
//! [`MIN_SAMPLES`] samples in the last [`FRESH_MS`]. If throughput still grows
//! linearly (within [`TOLERANCE`]) at the highest of them, nothing is learned
//! against the threads. Otherwise the cap is the smallest level whose
//! throughput is within [`TOLERANCE`] of the best seen; a level never measured
//! counts as `min(k, best)`, the knee a GIL or a CPU count makes.
//!
//! **How it moves.** Down at once on that evidence; but only with class
//! baselines measured in the last [`BASELINE_GAP_MS`]: otherwise it first
//! *measures* (a window at capacity 1, like Envoy's adaptive-concurrency
//! filter's min-RTT window, until [`BASELINE_SAMPLES`] requests ran alone), so
//! a view that became slower on its own is not taken for contention. The same
//! window runs when requests of classes with no baseline pile up while the
//! backend is busy: after [`BASELINE_GAP_MS`], or after [`BLIND_GAP_MS`]
//! (doubling while it does not help) when they are most of the traffic. Up only by *probes*: every [`PROBE_EVERY_MS`] below the
//! threads, a window at `cap + 1` until [`MIN_SAMPLES`] requests ran at that
//! level (at most [`WINDOW_MS`]); a probe that gained climbs again at once. So
//! a backend that turns I/O-bound again is found within seconds.
//!
//! Envoy's filter and Netflix's Gradient2 tune one limit of 20–200 per cluster
//! from a latency gradient; here caps are 1–16 per backend and a level is a
//! handful of requests, so the learner compares levels directly instead.
//!
//! The learner is plain data with no clock of its own (time is passed in, in
//! ms), so the tests below feed it samples. `Backend` wraps it in a small lock
//! per backend; the dispatcher reads only the resulting cap, from an atomic.

/// The highest level learned; a backend with more threads is not learned.
pub const MAX_LEVEL: u32 = 32;
/// Weight of a new sample in a level's average log slowdown.
const ALPHA: f64 = 0.1;
/// Weight of a new alone-sample in a class's uncontended time.
const BASE_ALPHA: f64 = 0.2;
/// Samples a level needs before it counts.
pub const MIN_SAMPLES: u32 = 16;
/// How far below the best (or below linear) throughput still counts as as good.
pub const TOLERANCE: f64 = 0.15;
/// A level's average counts this long after its last sample.
pub const FRESH_MS: u64 = 10_000;
/// Between probes upward that did not gain.
pub const PROBE_EVERY_MS: u64 = 3_000;
/// The longest probe or measuring window.
pub const WINDOW_MS: u64 = 1_000;
/// Requests run alone that end a measuring window.
pub const BASELINE_SAMPLES: u32 = 8;
/// Class baselines this old are measured again before the cap moves down.
pub const BASELINE_GAP_MS: u64 = 10_000;
/// While most requests are of classes with no baseline, measuring windows
/// follow each other this far apart, doubling (up to 16×) while they do not
/// help (classes that never repeat, like paths full of ids).
pub const BLIND_GAP_MS: u64 = 1_000;
/// A request ran alone when its level was at most this.
pub const ALONE: f64 = 1.1;
/// Class baselines kept per backend (a hashed table: no allocation; classes
/// that collide replace each other).
const BASELINES: usize = 256;

/// Why the learned capacity is what it is (`/status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Why {
    /// Not learned: `max_in_flight: N`, `learn_concurrency: false`,
    /// `proxy_replicas > 1`, or more than [`MAX_LEVEL`] threads.
    Off,
    /// No evidence yet: capacity is the threads.
    Learning,
    /// Throughput rises with every thread: capacity is the threads.
    Scales,
    /// A window above the cap, to see if one more helps.
    Probing,
    /// A window at 1, to measure requests run alone.
    Measuring,
    /// More than one in flight gains nothing (a GIL with CPU-bound views).
    CpuBound,
    /// Throughput stops rising below the threads.
    Contended,
}

impl Why {
    pub fn as_str(self) -> &'static str {
        match self {
            Why::Off => "off",
            Why::Learning => "learning",
            Why::Scales => "scales",
            Why::Probing => "probing",
            Why::Measuring => "measuring",
            Why::CpuBound => "cpu-bound",
            Why::Contended => "contended",
        }
    }
}

/// One response, as the learner sees it.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    /// A hash of its class.
    pub class: u64,
    /// Its time at the backend, in seconds.
    pub secs: f64,
    /// This Usher's average count of requests running on the backend (in
    /// flight, at most the threads) over this one's time on a thread.
    pub level: f64,
}

#[derive(Debug, Clone, Copy, Default)]
struct Level {
    /// Moving average of ln(slowdown).
    ln_slow: f64,
    n: u32,
    at_ms: u64,
    /// When it last started over: requests older than that ran before the
    /// cap that is being measured.
    since_ms: u64,
}

impl Level {
    fn reset(&mut self, now: u64) {
        self.n = 0;
        self.since_ms = now;
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct Baseline {
    class: u64,
    /// Uncontended seconds; 0 for an empty entry.
    secs: f64,
    /// The measuring window it was last set in: a new window measures anew
    /// rather than averaging with what may be stale.
    generation: u32,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Window {
    None,
    Probe { level: u32, until_ms: u64 },
    Measure { alone: u32, until_ms: u64 },
}

/// What the evidence says (see [`Learner::target`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    /// Throughput still rises linearly up to this level.
    Linear(u32),
    /// Throughput is as good as it gets from this level on.
    Saturated(u32),
}

#[derive(Debug, Clone)]
pub struct Learner {
    /// The learned cap; 0 is none (the threads).
    cap: u32,
    levels: [Level; MAX_LEVEL as usize + 1],
    baselines: [Baseline; BASELINES],
    window: Window,
    next_probe_ms: u64,
    /// When the last measuring window ended.
    measured_ms: Option<u64>,
    /// Samples of classes with no baseline, run with company, and samples
    /// scored, since then (halved as they grow, so recent ones weigh).
    unscored: u32,
    scored: u32,
    /// Measuring windows in a row that were called for by unscored samples.
    blind: u32,
    /// Measuring windows so far.
    generation: u32,
}

impl Default for Learner {
    fn default() -> Self {
        Learner {
            cap: 0,
            levels: [Level::default(); MAX_LEVEL as usize + 1],
            baselines: [Baseline::default(); BASELINES],
            window: Window::None,
            next_probe_ms: 0,
            measured_ms: None,
            unscored: 0,
            scored: 0,
            blind: 0,
            generation: 0,
        }
    }
}

/// Whether a backend with `threads` threads can be learned at all.
pub fn learnable(threads: u32) -> bool {
    (2..=MAX_LEVEL).contains(&threads)
}

impl Learner {
    /// The capacity to apply now, out of `threads`.
    pub fn limit(&self, threads: u32) -> u32 {
        let threads = threads.max(1);
        if !learnable(threads) {
            return threads;
        }
        let l = match self.window {
            Window::Probe { level, .. } => level,
            Window::Measure { .. } => 1,
            Window::None if self.cap == 0 => threads,
            Window::None => self.cap,
        };
        l.clamp(1, threads)
    }

    /// The learned cap outside probing and measuring windows.
    pub fn verdict(&self, threads: u32) -> u32 {
        match self.cap {
            0 => threads,
            c => c.min(threads),
        }
    }

    pub fn why(&self, threads: u32, now_ms: u64) -> Why {
        if !learnable(threads) {
            return Why::Off;
        }
        match self.window {
            Window::Probe { .. } => return Why::Probing,
            Window::Measure { .. } => return Why::Measuring,
            Window::None => {}
        }
        match self.limit(threads) {
            1 => Why::CpuBound,
            l if l < threads => Why::Contended,
            _ if (2..=threads).any(|k| self.fresh(k, now_ms)) => Why::Scales,
            _ => Why::Learning,
        }
    }

    /// Takes in one response at `now_ms`.
    pub fn sample(&mut self, s: Sample, threads: u32, now_ms: u64) {
        if !learnable(threads) {
            *self = Learner::default();
            return;
        }
        if !(s.secs.is_finite() && s.secs > 0.0 && s.level.is_finite()) {
            return;
        }
        let level = s.level.max(1.0);
        let started_ms = now_ms.saturating_sub((s.secs * 1000.0).ceil() as u64);
        let slot = &mut self.baselines[(s.class % BASELINES as u64) as usize];
        let known = slot.secs > 0.0 && slot.class == s.class;
        let k = (level.round() as u32).clamp(1, MAX_LEVEL);
        if known && started_ms >= self.levels[k as usize].since_ms {
            let lv = &mut self.levels[k as usize];
            let x = (s.secs / slot.secs).ln();
            lv.ln_slow = if lv.n == 0 {
                x
            } else {
                lv.ln_slow + ALPHA * (x - lv.ln_slow)
            };
            lv.n = lv.n.saturating_add(1);
            lv.at_ms = now_ms;
            self.scored = self.scored.saturating_add(1);
        }
        if level <= ALONE {
            if known && slot.generation == self.generation {
                slot.secs += BASE_ALPHA * (s.secs - slot.secs);
            } else {
                *slot = Baseline {
                    class: s.class,
                    secs: s.secs,
                    generation: self.generation,
                };
            }
            if let Window::Measure { alone, .. } = &mut self.window {
                *alone += 1;
            }
        } else if !known {
            self.unscored = self.unscored.saturating_add(1);
        }
        // Both count the recent past only.
        if self.scored + self.unscored > 4 * MIN_SAMPLES {
            self.scored /= 2;
            self.unscored /= 2;
        }
        self.step(threads, now_ms);
    }

    fn step(&mut self, threads: u32, now: u64) {
        match self.window {
            Window::Measure { alone, until_ms } => {
                if alone >= BASELINE_SAMPLES || now >= until_ms {
                    self.window = Window::None;
                    self.measured_ms = Some(now);
                    self.unscored = 0;
                    self.scored = 0;
                }
                return;
            }
            Window::Probe { level, until_ms } => {
                if self.levels[level as usize].n < MIN_SAMPLES && now < until_ms {
                    return;
                }
                self.window = Window::None;
                let before = self.limit(threads);
                let up = match self.target(level, now) {
                    Some(Verdict::Linear(k) | Verdict::Saturated(k)) => k.max(before),
                    None => before,
                };
                self.set_cap(up, threads);
                self.next_probe_ms = if up > before {
                    now
                } else {
                    now + PROBE_EVERY_MS
                };
                return;
            }
            Window::None => {}
        }
        let since = self
            .measured_ms
            .map_or(u64::MAX, |at| now.saturating_sub(at));
        let measured_lately = since <= BASELINE_GAP_MS;
        // Learning is blind while most requests cannot be scored (a class
        // never seen alone, because the backend is busy): measure soon.
        let blind = self.unscored >= MIN_SAMPLES && self.unscored > self.scored;
        if self.scored >= MIN_SAMPLES && self.scored >= self.unscored {
            self.blind = 0;
        }
        if blind && since >= BLIND_GAP_MS << self.blind.min(4) {
            self.blind += 1;
            return self.measure(now);
        }
        if self.unscored >= MIN_SAMPLES && !measured_lately {
            return self.measure(now);
        }
        let limit = self.limit(threads);
        if let Some(Verdict::Saturated(k)) = self.target(limit, now) {
            if k < limit {
                if !measured_lately {
                    return self.measure(now);
                }
                self.set_cap(k, threads);
                self.next_probe_ms = now + PROBE_EVERY_MS;
                return;
            }
        }
        if limit < threads && now >= self.next_probe_ms {
            let level = limit + 1;
            self.levels[level as usize].reset(now);
            self.window = Window::Probe {
                level,
                until_ms: now + WINDOW_MS,
            };
        }
    }

    /// Starts a window at capacity 1. The level averages were scored against
    /// the old baselines: they start over.
    fn measure(&mut self, now: u64) {
        for lv in &mut self.levels {
            lv.reset(now);
        }
        self.generation = self.generation.wrapping_add(1);
        self.window = Window::Measure {
            alone: 0,
            until_ms: now + WINDOW_MS,
        };
    }

    fn set_cap(&mut self, k: u32, threads: u32) {
        self.cap = if k >= threads { 0 } else { k.max(1) };
    }

    fn fresh(&self, k: u32, now: u64) -> bool {
        let lv = &self.levels[k as usize];
        lv.n >= MIN_SAMPLES && now.saturating_sub(lv.at_ms) <= FRESH_MS
    }

    /// Throughput at level `k`, in requests run alone.
    fn throughput(&self, k: u32) -> f64 {
        f64::from(k) / self.levels[k as usize].ln_slow.exp()
    }

    /// The cap the fresh evidence up to level `top` (the one allowed now)
    /// asks for, if there is any. Levels above it are not being measured:
    /// what they said before the cap came down is no evidence of now.
    fn target(&self, top: u32, now: u64) -> Option<Verdict> {
        let top = top.min(MAX_LEVEL);
        let kmax = (1..=top).rev().find(|&k| self.fresh(k, now))?;
        if self.throughput(kmax) >= (1.0 - TOLERANCE) * f64::from(kmax) {
            return Some(Verdict::Linear(kmax));
        }
        let best = (1..=top)
            .filter(|&k| self.fresh(k, now))
            .map(|k| self.throughput(k))
            .fold(1.0, f64::max);
        let good = (1..=kmax)
            .find(|&k| {
                let x = if self.fresh(k, now) {
                    self.throughput(k)
                } else {
                    f64::from(k).min(best)
                };
                x >= (1.0 - TOLERANCE) * best
            })
            .unwrap_or(kmax);
        Some(Verdict::Saturated(good))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const THREADS: u32 = 4;

    /// A closed-loop backend in simulated time: `clients` keep one request
    /// each in flight, or wait in Usher's queue while the learner's cap is
    /// reached. `cost(class, level)` is how long a request of a class takes
    /// when `level` run at once. Runs for `ms` and returns the limits seen
    /// (one per completion).
    struct Sim {
        learner: Learner,
        now_ms: f64,
    }

    impl Sim {
        fn new() -> Self {
            Sim {
                learner: Learner::default(),
                now_ms: 0.0,
            }
        }

        /// Runs in rounds: each round the backend takes `min(clients, cap)`
        /// requests together and they finish together (processor sharing of
        /// equal requests), alternating classes by `classes`.
        fn run(
            &mut self,
            ms: f64,
            clients: u32,
            classes: &[(u64, f64)],
            cost: impl Fn(f64, u32) -> f64,
        ) -> Vec<u32> {
            let end = self.now_ms + ms;
            let mut seen = Vec::new();
            let mut i = 0usize;
            while self.now_ms < end {
                let k = self.learner.limit(THREADS).min(clients).max(1);
                // The longest of the batch decides when the round ends.
                let batch: Vec<(u64, f64)> = (0..k)
                    .map(|j| classes[(i + j as usize) % classes.len()])
                    .collect();
                i += k as usize;
                let round = batch
                    .iter()
                    .map(|&(_, base)| cost(base, k))
                    .fold(0.0, f64::max);
                self.now_ms += round;
                for (class, base) in batch {
                    let s = Sample {
                        class,
                        secs: cost(base, k) / 1000.0,
                        level: f64::from(k),
                    };
                    self.learner.sample(s, THREADS, self.now_ms as u64);
                    seen.push(self.learner.limit(THREADS));
                }
            }
            seen
        }
    }

    /// Under a GIL, k CPU-bound requests time-slice one CPU.
    fn gil(base: f64, k: u32) -> f64 {
        base * f64::from(k)
    }

    fn io(base: f64, _k: u32) -> f64 {
        base
    }

    #[test]
    fn cpu_bound_under_a_gil_goes_to_one() {
        let mut sim = Sim::new();
        let seen = sim.run(2_000.0, 8, &[(1, 5.0)], gil);
        assert_eq!(sim.learner.limit(THREADS), 1, "{seen:?}");
        assert_eq!(sim.learner.why(THREADS, 2_000), Why::CpuBound);
        // It measured first (a window at 1), then went down and stayed,
        // probing 2 now and then without moving.
        let downs = seen.windows(2).filter(|w| w[1] < w[0]).count();
        assert!(downs <= 4, "{seen:?}");
        let seen = sim.run(10_000.0, 8, &[(1, 5.0)], gil);
        let at_one = seen.iter().filter(|&&l| l == 1).count();
        assert!(at_one * 10 >= seen.len() * 9, "mostly at 1: {seen:?}");
        assert!(seen.iter().all(|&l| l <= 2), "probes go one above only");
    }

    #[test]
    fn io_bound_stays_at_the_threads() {
        let mut sim = Sim::new();
        let seen = sim.run(10_000.0, 8, &[(1, 20.0)], io);
        // It may measure once (requests of a class never seen alone), and
        // never caps.
        assert_eq!(sim.learner.limit(THREADS), THREADS);
        assert_eq!(sim.learner.why(THREADS, 10_000), Why::Scales);
        let below = seen.iter().filter(|&&l| l < THREADS).count();
        assert!(below <= BASELINE_SAMPLES as usize + 4, "{below} below");
    }

    #[test]
    fn from_cpu_to_io_bound_probes_bring_it_back() {
        let mut sim = Sim::new();
        sim.run(3_000.0, 8, &[(1, 5.0)], gil);
        assert_eq!(sim.learner.limit(THREADS), 1);
        // Now the views wait on I/O (another class): each probe gains, so it
        // climbs to the threads within a probe interval and a few windows.
        sim.run(PROBE_EVERY_MS as f64 + 2_000.0, 8, &[(2, 20.0)], io);
        assert_eq!(sim.learner.limit(THREADS), THREADS);
        // And back down when the views turn CPU-bound again.
        sim.run(3_000.0, 8, &[(1, 5.0)], gil);
        assert_eq!(sim.learner.limit(THREADS), 1);
    }

    #[test]
    fn a_short_long_mix_without_contention_stays_at_the_threads() {
        let mut sim = Sim::new();
        // Light load first (the classes' baselines), then full.
        sim.run(2_000.0, 1, &[(10, 10.0), (200, 200.0)], io);
        let seen = sim.run(10_000.0, 8, &[(10, 10.0), (200, 200.0), (10, 10.0)], io);
        assert!(seen.iter().all(|&l| l == THREADS), "{seen:?}");
        assert_eq!(sim.learner.why(THREADS, 12_000), Why::Scales);
    }

    #[test]
    fn half_cpu_bound_caps_at_the_knee() {
        // Two CPUs' worth of parallelism: k requests take max(1, k/2) each.
        let mut sim = Sim::new();
        sim.run(5_000.0, 8, &[(1, 10.0)], |b, k| {
            b * (f64::from(k) / 2.0).max(1.0)
        });
        assert_eq!(sim.learner.limit(THREADS), 2);
        assert_eq!(sim.learner.why(THREADS, 5_000), Why::Contended);
    }

    #[test]
    fn light_load_moves_nothing() {
        let mut sim = Sim::new();
        let seen = sim.run(5_000.0, 1, &[(1, 5.0)], gil);
        assert!(seen.iter().all(|&l| l == THREADS));
        assert_eq!(sim.learner.why(THREADS, 5_000), Why::Learning);
        // Nor a view that gets slower on its own, once measured again.
        let seen = sim.run(5_000.0, 2, &[(1, 5.0)], io);
        assert!(seen.iter().all(|&l| l == THREADS));
    }

    #[test]
    fn a_view_that_slows_down_on_its_own_is_measured_not_capped() {
        let mut sim = Sim::new();
        sim.run(2_000.0, 8, &[(1, 20.0)], io);
        assert_eq!(sim.learner.limit(THREADS), THREADS);
        // The database gets 3x slower, long after the last measurement.
        sim.run(BASELINE_GAP_MS as f64, 8, &[(1, 20.0)], io);
        let seen = sim.run(3_000.0, 8, &[(1, 60.0)], io);
        assert_eq!(sim.learner.limit(THREADS), THREADS, "{seen:?}");
        // It cost one measuring window, no lasting cap.
        let min = *seen.iter().min().unwrap();
        assert_eq!(min, 1);
    }

    #[test]
    fn a_new_class_that_never_runs_alone_is_measured_soon() {
        let mut sim = Sim::new();
        sim.run(5_000.0, 8, &[(1, 10.0)], |b, k| {
            b * (f64::from(k) / 2.0).max(1.0)
        });
        assert_eq!(sim.learner.limit(THREADS), 2);
        // I/O-bound views of a new class: at 2 in flight none runs alone.
        sim.run(
            BLIND_GAP_MS as f64 + PROBE_EVERY_MS as f64 + 1_000.0,
            8,
            &[(2, 20.0)],
            io,
        );
        assert_eq!(sim.learner.limit(THREADS), THREADS);
    }

    #[test]
    fn classes_that_never_repeat_are_measured_ever_more_rarely() {
        let mut sim = Sim::new();
        let classes: Vec<(u64, f64)> = (0..100_000).map(|c| (c, 10.0)).collect();
        let seen = sim.run(60_000.0, 8, &classes, io);
        let windows = seen.windows(2).filter(|w| w[0] > 1 && w[1] == 1).count();
        // 1, 2, 4, 8 s apart, then every 10 s (the baseline gap).
        assert!((4..=8).contains(&windows), "{windows} windows in 60 s");
        assert_eq!(sim.learner.limit(THREADS), THREADS);
    }

    #[test]
    fn unlearnable_backends_keep_their_threads() {
        let mut l = Learner::default();
        for t in 0..100 {
            l.sample(
                Sample {
                    class: 1,
                    secs: 0.1,
                    level: 1.0,
                },
                1,
                t,
            );
        }
        assert_eq!(l.limit(1), 1);
        assert_eq!(l.limit(64), 64);
        assert_eq!(l.why(64, 0), Why::Off);
    }
}
