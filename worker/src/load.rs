//! Live load of one worker, shared by the async front and the thread pool.
//!
//! The front reads it to answer `/healthz`, `/metrics` and the `X-Usher-Load` header;
//! the pool threads write it. Busy accounting is an RAII guard ([`BusyGuard`]), so a
//! thread cannot forget to release its slot, not even when its handler panics.
//!
//! The header's format is defined here, once, by [`LoadReport`]: the worker writes
//! it with `Display` and Usher reads it back with `FromStr`.

use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use http::HeaderName;
use serde::{Deserialize, Serialize};

/// The worker's load report on every response: [`LoadReport`], e.g.
/// `threads=4, busy=1, queued=0`.
pub const X_USHER_LOAD: HeaderName = HeaderName::from_static("x-usher-load");

/// Marks a `503` that refused a request *before any of it ran* because every
/// thread was busy and no queue place was left (`--queue 0` makes that exact:
/// "only when a thread is free"). Its value is [`REFUSED_BUSY`]. A proxy may
/// send the same request elsewhere, or again later, as if it had never been
/// sent: nothing of it ran.
pub const X_USHER_REFUSED: HeaderName = HeaderName::from_static("x-usher-refused");

/// The value of [`X_USHER_REFUSED`] on a refusal for lack of a thread.
pub const REFUSED_BUSY: &str = "busy";

/// Counters written by the pool threads. The queue depth lives in the queue itself.
#[derive(Debug)]
pub(crate) struct Load {
    threads: usize,
    busy: AtomicUsize,
    peak_busy: AtomicUsize,
    served: AtomicU64,
    refused: AtomicU64,
}

impl Load {
    pub(crate) fn new(threads: usize) -> Self {
        Self {
            threads,
            busy: AtomicUsize::new(0),
            peak_busy: AtomicUsize::new(0),
            served: AtomicU64::new(0),
            refused: AtomicU64::new(0),
        }
    }

    pub(crate) fn threads(&self) -> usize {
        self.threads
    }

    /// Marks one thread busy until the guard is dropped.
    pub(crate) fn start_busy(&self) -> BusyGuard<'_> {
        let now = self.busy.fetch_add(1, Ordering::SeqCst) + 1;
        self.peak_busy.fetch_max(now, Ordering::SeqCst);
        BusyGuard { load: self }
    }

    /// Counts a request refused for lack of a thread.
    pub(crate) fn refused(&self) {
        self.refused.fetch_add(1, Ordering::SeqCst);
    }

    pub(crate) fn snapshot(&self, queued: usize) -> LoadSnapshot {
        LoadSnapshot {
            threads: self.threads,
            busy: self.busy.load(Ordering::SeqCst),
            queued,
            served: self.served.load(Ordering::SeqCst),
            peak_busy: self.peak_busy.load(Ordering::SeqCst),
            refused: self.refused.load(Ordering::SeqCst),
        }
    }
}

/// One thread's claim on the busy count; dropping it releases the claim.
pub(crate) struct BusyGuard<'a> {
    load: &'a Load,
}

impl BusyGuard<'_> {
    /// Counts the request as served. Called before the guard drops, so that an
    /// observer who sees the response also sees it counted.
    pub(crate) fn served(&self) {
        self.load.served.fetch_add(1, Ordering::SeqCst);
    }
}

impl Drop for BusyGuard<'_> {
    fn drop(&mut self) {
        self.load.busy.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A point-in-time view of a worker's load.
///
/// Serialises to the `/healthz` JSON, and [`Display`](fmt::Display)s as its
/// [`LoadReport`], the `X-Usher-Load` header value `threads=4, busy=1, queued=0`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoadSnapshot {
    /// Size of the thread pool.
    pub threads: usize,
    /// Threads running a handler right now.
    pub busy: usize,
    /// Requests waiting for a thread.
    pub queued: usize,
    /// Requests whose handler has finished (including ones that panicked).
    pub served: u64,
    /// The highest `busy` seen since the server started.
    pub peak_busy: usize,
    /// Requests refused for lack of a thread (503, `X-Usher-Refused: busy`)
    /// since the server started.
    #[serde(default)]
    pub refused: u64,
}

impl LoadSnapshot {
    /// The part of the snapshot that goes in the `X-Usher-Load` header.
    pub fn report(&self) -> LoadReport {
        LoadReport {
            threads: self.threads,
            busy: self.busy,
            queued: self.queued,
            refused: self.refused,
        }
    }
}

impl fmt::Display for LoadSnapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.report().fmt(f)
    }
}

/// The `X-Usher-Load` header value: `threads=4, busy=1, queued=0`.
///
/// Parsing is tolerant, for workers of other versions or other makers:
/// `key=value` pairs in any order, space around either, unknown keys and
/// items that are no `key=value` pair ignored. `threads` is required;
/// `busy` and `queued` are 0 when missing. A known key with a value that is
/// not a number is an error, and a key given twice takes its last value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadReport {
    /// Size of the thread pool: how many requests the worker runs at once.
    pub threads: usize,
    /// Threads running a handler right now.
    pub busy: usize,
    /// Requests waiting for a thread.
    pub queued: usize,
    /// Requests refused for lack of a thread since the worker started: when
    /// it grows, some proxy sharing this worker wanted a thread and found
    /// none (0 when missing). Written only when not 0.
    pub refused: u64,
}

impl fmt::Display for LoadReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "threads={}, busy={}, queued={}",
            self.threads, self.busy, self.queued
        )?;
        if self.refused != 0 {
            write!(f, ", refused={}", self.refused)?;
        }
        Ok(())
    }
}

/// Why an `X-Usher-Load` value could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LoadReportError {
    /// The report has no `threads=N`.
    #[error("no `threads` in the load report")]
    NoThreads,
    /// A known key's value is not a whole number.
    #[error("`{key}` in the load report is not a number: `{value}`")]
    NotANumber {
        /// `threads`, `busy` or `queued`.
        key: &'static str,
        /// The value as sent.
        value: String,
    },
}

impl FromStr for LoadReport {
    type Err = LoadReportError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse_noting_busy(s).map(|(report, _)| report)
    }
}

impl LoadReport {
    /// Reads a report as [`FromStr`] does, in one pass, and says whether it
    /// names `busy` at all (a proxy counts a worker's taken threads only
    /// from reports that say them).
    pub fn parse_noting_busy(s: impl AsRef<[u8]>) -> Result<(Self, bool), LoadReportError> {
        let (mut threads, mut busy, mut queued, mut refused) = (None, 0, 0, 0);
        let mut says_busy = false;
        // Over bytes: the proxy reads one report per response, and `str`'s
        // char searches and Unicode trims cost ~2000 instructions for a
        // 27-byte report. Splitting at ASCII bytes keeps every piece UTF-8.
        for item in s.as_ref().split(|&b| b == b',') {
            let (key, value) = match item.iter().position(|&b| b == b'=') {
                Some(at) => (item[..at].trim_ascii(), Some(item[at + 1..].trim_ascii())),
                None => (item.trim_ascii(), None),
            };
            says_busy |= key == b"busy";
            let Some(value) = value else {
                continue;
            };
            let not_a_number = |key| LoadReportError::NotANumber {
                key,
                value: String::from_utf8_lossy(value).into_owned(),
            };
            match key {
                b"threads" => threads = Some(whole(value).ok_or_else(|| not_a_number("threads"))?),
                b"busy" => busy = whole(value).ok_or_else(|| not_a_number("busy"))?,
                b"queued" => queued = whole(value).ok_or_else(|| not_a_number("queued"))?,
                b"refused" => refused = whole(value).ok_or_else(|| not_a_number("refused"))?,
                _ => {}
            }
        }
        let report = LoadReport {
            threads: threads.ok_or(LoadReportError::NoThreads)?,
            busy,
            queued,
            refused,
        };
        Ok((report, says_busy))
    }
}

/// A whole number as `str::parse` reads one (ASCII digits after an optional
/// `+`, and no overflow), over bytes: no UTF-8 check of the report.
fn whole<T: TryFrom<u64>>(v: &[u8]) -> Option<T> {
    let digits = v.strip_prefix(b"+").unwrap_or(v);
    if digits.is_empty() {
        return None;
    }
    let n = digits.iter().try_fold(0u64, |n, &c| {
        let d = c.wrapping_sub(b'0');
        (d < 10).then_some(())?;
        n.checked_mul(10)?.checked_add(u64::from(d))
    })?;
    T::try_from(n).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_says_whether_it_names_busy() {
        let (r, says) = LoadReport::parse_noting_busy("threads=4, busy=2, queued=1").unwrap();
        assert_eq!((r.threads, r.busy, r.queued, says), (4, 2, 1, true));
        let (r, says) = LoadReport::parse_noting_busy("threads=4").unwrap();
        assert_eq!((r.busy, says), (0, false));
        let (_, says) = LoadReport::parse_noting_busy("threads=4, busy").unwrap();
        assert!(says);
        assert_eq!(
            LoadReport::parse_noting_busy("threads=4, busy=x").map(|(r, _)| r),
            "threads=4, busy=x".parse::<LoadReport>()
        );
        assert!(LoadReport::parse_noting_busy("busy=1").is_err());
    }

    #[test]
    fn numbers_are_read_as_str_parse_reads_them() {
        for v in [
            "0",
            "7",
            "+7",
            "",
            "+",
            "-1",
            "1 2",
            "07",
            "18446744073709551615",
            "18446744073709551616",
            "1e3",
            "١",
            "4\u{a0}",
        ] {
            assert_eq!(
                whole::<usize>(v.as_bytes()),
                v.parse::<usize>().ok(),
                "{v:?}"
            );
            assert_eq!(whole::<u64>(v.as_bytes()), v.parse::<u64>().ok(), "{v:?}");
        }
        assert_eq!(
            "threads=4, busy=\u{e9}".parse::<LoadReport>(),
            Err(LoadReportError::NotANumber {
                key: "busy",
                value: "\u{e9}".into()
            })
        );
    }

    #[test]
    fn guard_tracks_busy_and_peak() {
        let load = Load::new(4);
        {
            let a = load.start_busy();
            let _b = load.start_busy();
            assert_eq!(load.snapshot(0).busy, 2);
            a.served();
        }
        load.refused();
        let s = load.snapshot(3);
        assert_eq!((s.busy, s.peak_busy, s.served, s.queued), (0, 2, 1, 3));
        assert_eq!(s.refused, 1);
    }

    #[test]
    fn header_format() {
        let s = Load::new(4).snapshot(2);
        assert_eq!(s.to_string(), "threads=4, busy=0, queued=2");
    }

    fn report(s: &str) -> Result<LoadReport, LoadReportError> {
        s.parse()
    }

    #[test]
    fn the_header_reads_back() {
        let mut r = LoadReport {
            threads: 4,
            busy: 3,
            queued: 7,
            refused: 0,
        };
        assert_eq!(report(&r.to_string()), Ok(r));
        assert_eq!(report("threads=4, busy=3, queued=7"), Ok(r));
        r.refused = 12;
        assert_eq!(r.to_string(), "threads=4, busy=3, queued=7, refused=12");
        assert_eq!(report(&r.to_string()), Ok(r));
    }

    #[test]
    fn reading_is_tolerant_of_order_space_and_unknown_keys() {
        let r = |threads, busy, queued| {
            Ok(LoadReport {
                threads,
                busy,
                queued,
                refused: 0,
            })
        };
        assert_eq!(report("busy=3,threads=16"), r(16, 3, 0));
        assert_eq!(report("  queued = 2 ,threads= 8 , busy =1 "), r(8, 1, 2));
        assert_eq!(report("threads=4, cores=2, junk, busy=1,"), r(4, 1, 0));
        assert_eq!(report("threads=1, threads=2"), r(2, 0, 0));
    }

    #[test]
    fn threads_is_required_and_values_are_numbers() {
        assert_eq!(report("busy=3"), Err(LoadReportError::NoThreads));
        assert_eq!(report(""), Err(LoadReportError::NoThreads));
        assert_eq!(report("thread=4"), Err(LoadReportError::NoThreads));
        for bad in [
            "threads=x",
            "threads=",
            "threads=-1",
            "threads=4, busy=lots",
        ] {
            assert!(
                matches!(report(bad), Err(LoadReportError::NotANumber { .. })),
                "{bad}"
            );
        }
    }

    #[test]
    fn healthz_json_shape() {
        let s = Load::new(4).snapshot(0);
        assert_eq!(
            serde_json::to_string(&s).unwrap(),
            r#"{"threads":4,"busy":0,"queued":0,"served":0,"peak_busy":0,"refused":0}"#
        );
    }
}
