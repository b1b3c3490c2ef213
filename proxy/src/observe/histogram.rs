//! Histograms observed on the request path without a locked instruction.
//!
//! `prometheus::Histogram::observe` costs five atomic read-modify-writes
//! (its hot/cold shard flip, count, bucket, sum), ~5.5 ns each on a VM, and
//! Usher observes three per request. Here each worker thread claims a shard
//! of its own ([`claim_shard`]) and is its only writer: an observation is a
//! plain load and store of two counters. Threads without a shard (tokio's
//! multi-thread scheduler, blocking threads, tests) share shard 0 with atomic
//! adds. A scrape sums the shards.
//!
//! The text output is prometheus' own (`_bucket`, `_sum`, `_count`), built
//! by its encoder from the same protobuf a `HistogramVec` would give. `_count`
//! is the sum of the bucket counts, so it always equals the `+Inf` bucket; a
//! scrape racing an observation may see its count without its sum, as with
//! any lock-free histogram.

use std::cell::Cell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use prometheus::core::{Collector, Desc};
use prometheus::proto;

thread_local! {
    /// This thread's shard: 0 (shared) until it claims one.
    static SHARD: Cell<usize> = const { Cell::new(0) };
}

/// The next shard to hand out; shard 0 is the shared one.
static NEXT: AtomicUsize = AtomicUsize::new(1);

/// Shards per histogram: the shared one and one per core (at most 64), so a
/// worker per core has its own.
fn shards() -> usize {
    static N: OnceLock<usize> = OnceLock::new();
    *N.get_or_init(|| 1 + std::thread::available_parallelism().map_or(1, |n| n.get().min(64)))
}

/// Gives the calling thread a shard of its own in every histogram, if one is
/// left: from then on it observes with plain stores. Call it once on a
/// thread that lives as long as the process observes (a worker thread);
/// a shard is never handed out twice.
pub fn claim_shard() {
    if SHARD.with(Cell::get) != 0 {
        return;
    }
    let i = NEXT.fetch_add(1, Ordering::Relaxed);
    if i < shards() {
        SHARD.with(|s| s.set(i));
    }
}

/// 64 bytes, so that two threads' shards never share a cache line.
#[repr(align(64))]
struct Line([AtomicU64; 8]);

/// One series: per shard, a count per bucket (the last one above every
/// bound) and the sum's bits, padded to whole cache lines.
struct Core {
    bounds: Arc<[f64]>,
    /// Words per shard: `bounds.len() + 2`, rounded up to a whole line.
    stride: usize,
    lines: Box<[Line]>,
    labels: Vec<proto::LabelPair>,
}

impl Core {
    fn new(bounds: Arc<[f64]>, labels: Vec<proto::LabelPair>) -> Core {
        let stride = (bounds.len() + 2).div_ceil(8) * 8;
        let lines = (0..shards() * stride / 8)
            .map(|_| Line(Default::default()))
            .collect();
        Core {
            bounds,
            stride,
            lines,
            labels,
        }
    }

    fn word(&self, shard: usize, i: usize) -> &AtomicU64 {
        let w = shard * self.stride + i;
        &self.lines[w / 8].0[w % 8]
    }

    /// The bucket counts (not cumulative, the last above every bound) and
    /// the sum, over all shards.
    fn snapshot(&self) -> (Vec<u64>, f64) {
        let n = self.bounds.len() + 1;
        let mut counts = vec![0; n];
        let mut sum = 0.0;
        for s in 0..shards() {
            for (i, c) in counts.iter_mut().enumerate() {
                *c += self.word(s, i).load(Ordering::Relaxed);
            }
            sum += f64::from_bits(self.word(s, n).load(Ordering::Relaxed));
        }
        (counts, sum)
    }

    fn metric(&self) -> proto::Metric {
        let (counts, sum) = self.snapshot();
        let mut h = proto::Histogram::default();
        let mut cumulative = 0;
        let buckets = self
            .bounds
            .iter()
            .zip(&counts)
            .map(|(bound, c)| {
                cumulative += c;
                let mut b = proto::Bucket::default();
                b.set_cumulative_count(cumulative);
                b.set_upper_bound(*bound);
                b
            })
            .collect();
        h.set_bucket(buckets);
        h.set_sample_count(counts.iter().sum());
        h.set_sample_sum(sum);
        let mut m = proto::Metric::from_label(self.labels.clone());
        m.set_histogram(h);
        m
    }
}

/// One series of a [`HistogramVec`] (or a lone one, [`Histogram::new`]).
/// Cheap to clone: clones observe into the same series.
#[derive(Clone)]
pub struct Histogram {
    core: Arc<Core>,
}

impl Histogram {
    /// A histogram registered nowhere (for tests of what observes it).
    #[cfg(test)]
    pub fn new(bounds: &[f64]) -> Histogram {
        Histogram {
            core: Arc::new(Core::new(bounds.into(), Vec::new())),
        }
    }

    /// Records `v`, in the first bucket whose bound is at least `v` (as
    /// prometheus does; NaN in none but `+Inf`).
    pub fn observe(&self, v: f64) {
        let core = &*self.core;
        // A scan, as prometheus does: most observations are in the first
        // buckets, and NaN compares false, so it lands above them all.
        let i = core
            .bounds
            .iter()
            .position(|b| v <= *b)
            .unwrap_or(core.bounds.len());
        let sum = core.bounds.len() + 1;
        match SHARD.with(Cell::get) {
            0 => {
                core.word(0, i).fetch_add(1, Ordering::Relaxed);
                let _ =
                    core.word(0, sum)
                        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| {
                            Some((f64::from_bits(bits) + v).to_bits())
                        });
            }
            // This thread is the shard's only writer.
            s => {
                let c = core.word(s, i);
                c.store(c.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
                let t = core.word(s, sum);
                t.store(
                    (f64::from_bits(t.load(Ordering::Relaxed)) + v).to_bits(),
                    Ordering::Relaxed,
                );
            }
        }
    }

    /// Observations so far.
    #[cfg(test)]
    pub fn count(&self) -> u64 {
        self.core.snapshot().0.iter().sum()
    }

    /// The sum of the observations so far.
    #[cfg(test)]
    pub fn sum(&self) -> f64 {
        self.core.snapshot().1
    }
}

/// A histogram family with labels, registered like prometheus'
/// `HistogramVec`, and printing the same. Cheap to clone.
#[derive(Clone)]
pub struct HistogramVec {
    family: Arc<Family>,
}

struct Family {
    desc: Desc,
    bounds: Arc<[f64]>,
    series: Mutex<HashMap<Vec<String>, Histogram>>,
}

impl HistogramVec {
    /// Fails as prometheus does on a bad name or label.
    pub fn new(
        name: &str,
        help: &str,
        labels: &[&str],
        bounds: &[f64],
    ) -> prometheus::Result<HistogramVec> {
        let desc = Desc::new(
            name.to_string(),
            help.to_string(),
            labels.iter().map(|l| l.to_string()).collect(),
            HashMap::new(),
        )?;
        Ok(HistogramVec {
            family: Arc::new(Family {
                desc,
                bounds: bounds.into(),
                series: Mutex::new(HashMap::new()),
            }),
        })
    }

    /// The series with these label values, made on first use. Panics, as
    /// prometheus' does, when their number is not the family's.
    pub fn with_label_values(&self, values: &[&str]) -> Histogram {
        let names = &self.family.desc.variable_labels;
        assert_eq!(
            names.len(),
            values.len(),
            "{}: label values {values:?} for labels {names:?}",
            self.family.desc.fq_name
        );
        let mut series = self.family.series.lock().unwrap_or_else(|p| p.into_inner());
        let key: Vec<String> = values.iter().map(|v| v.to_string()).collect();
        series
            .entry(key)
            .or_insert_with(|| {
                let mut labels: Vec<proto::LabelPair> = names
                    .iter()
                    .zip(values)
                    .map(|(n, v)| {
                        let mut p = proto::LabelPair::default();
                        p.set_name(n.clone());
                        p.set_value(v.to_string());
                        p
                    })
                    .collect();
                labels.sort_by(|a, b| a.name().cmp(b.name()));
                Histogram {
                    core: Arc::new(Core::new(self.family.bounds.clone(), labels)),
                }
            })
            .clone()
    }
}

impl Collector for HistogramVec {
    fn desc(&self) -> Vec<&Desc> {
        vec![&self.family.desc]
    }

    fn collect(&self) -> Vec<proto::MetricFamily> {
        let desc = &self.family.desc;
        let mut mf = proto::MetricFamily::default();
        mf.set_name(desc.fq_name.clone());
        mf.set_help(desc.help.clone());
        mf.set_field_type(proto::MetricType::HISTOGRAM);
        let series = self.family.series.lock().unwrap_or_else(|p| p.into_inner());
        mf.set_metric(series.values().map(|h| h.core.metric()).collect());
        vec![mf]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus::{Encoder, Registry, TextEncoder};

    /// Powers of two, so that sums of them added in any order are equal.
    const BOUNDS: &[f64] = &[0.0009765625, 0.0078125, 0.125, 1.0];

    fn text(r: &Registry) -> String {
        let mut out = Vec::new();
        TextEncoder::new().encode(&r.gather(), &mut out).unwrap();
        String::from_utf8(out).unwrap()
    }

    /// The same observations, from several threads with and without shards
    /// of their own, print exactly what prometheus' `HistogramVec` prints.
    #[test]
    fn prints_what_prometheus_prints() {
        let ours = Registry::new();
        let h = HistogramVec::new("t_seconds", "Help.", &["route", "code"], BOUNDS).unwrap();
        ours.register(Box::new(h.clone())).unwrap();
        let theirs = Registry::new();
        let p = prometheus::HistogramVec::new(
            prometheus::HistogramOpts::new("t_seconds", "Help.").buckets(BOUNDS.to_vec()),
            &["route", "code"],
        )
        .unwrap();
        theirs.register(Box::new(p.clone())).unwrap();

        // Exact in binary; each bound is observed too (its own bucket).
        let values = [
            0.0,
            0.00048828125,
            0.0009765625,
            0.00390625,
            0.0078125,
            0.125,
            0.5,
            1.0,
            7.25,
        ];
        std::thread::scope(|s| {
            for (t, claim) in [(0, true), (1, false), (2, true)] {
                let (h, p) = (&h, &p);
                s.spawn(move || {
                    if claim {
                        claim_shard();
                    }
                    for (k, v) in values.iter().enumerate() {
                        let labels = ["b", ["200", "503"][(k + t) % 2]];
                        for _ in 0..100 {
                            h.with_label_values(&labels).observe(*v);
                            p.with_label_values(&labels).observe(*v);
                        }
                    }
                });
            }
        });
        h.with_label_values(&["a", "200"]);
        p.with_label_values(&["a", "200"]);

        let (ours, theirs) = (text(&ours), text(&theirs));
        assert!(ours.contains(r#"t_seconds_bucket{code="503",route="b",le="+Inf"}"#));
        assert_eq!(ours, theirs);
    }

    #[test]
    fn nan_counts_only_above_every_bound() {
        let r = Registry::new();
        let h = HistogramVec::new("n", "N.", &[], BOUNDS).unwrap();
        r.register(Box::new(h.clone())).unwrap();
        h.with_label_values(&[]).observe(f64::NAN);
        let t = text(&r);
        assert!(t.contains("n_bucket{le=\"1\"} 0\n"), "{t}");
        assert!(
            t.contains("n_bucket{le=\"+Inf\"} 1\nn_sum NaN\nn_count 1\n"),
            "{t}"
        );
    }

    #[test]
    fn a_claimed_shard_counts_alone_and_the_sum_adds_up() {
        let h = Histogram::new(BOUNDS);
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    claim_shard();
                    for _ in 0..10_000 {
                        h.observe(0.25);
                    }
                });
            }
            for _ in 0..10_000 {
                h.observe(0.25);
            }
        });
        assert_eq!(h.count(), 50_000);
        assert_eq!(h.sum(), 12_500.0);
    }
}
