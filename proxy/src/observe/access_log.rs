//! The access log: one line per request, JSON or combined format, on stdout
//! or appended to `access_log.path`.
//!
//! Lines are handed to a dedicated writer thread over a bounded channel, so a
//! slow disk never blocks the request path; if the channel is full, the line
//! is dropped and counted (`usher_access_log_dropped_total`) rather than
//! stalling traffic. SIGUSR1 reopens the file, logrotate's convention (as
//! nginx does): rotate by renaming, then signal.

use std::fs::OpenOptions;
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::Version;

use crate::config::LogFormat;

pub struct Entry {
    pub time: SystemTime,
    pub peer: SocketAddr,
    pub method: String,
    pub path: String,
    pub version: Version,
    pub status: u16,
    pub bytes: Option<u64>,
    pub route: String,
    pub upstream: String,
    pub backend: Option<String>,
    pub duration: Duration,
    pub queue_wait: Duration,
    pub request_id: String,
    pub user_agent: Option<String>,
    pub error: Option<String>,
}

/// Cheap to clone: every clone is the same log.
///
/// The writer thread starts with the first format that writes lines (at
/// start, or on the reload that turns the log on), not before: with
/// `format: off` Usher starts no thread for it, so a one-worker Usher is a
/// single-threaded process, and glibc skips the cancellation bookkeeping it
/// otherwise does around every socket call (two locked instructions each).
#[derive(Clone)]
pub struct AccessLog {
    inner: Arc<Inner>,
}

struct Inner {
    format: AtomicU8,
    dropped: prometheus::IntCounter,
    /// Where lines go: `None` is stdout. Read by the writer when it starts
    /// and on reopen.
    path: Mutex<Option<PathBuf>>,
    /// The writer's channel, once it has been started.
    tx: OnceLock<SyncSender<Msg>>,
}

enum Msg {
    Line(String),
    /// Reopen the file (SIGUSR1, or a new path on reload).
    Reopen,
}

fn format_code(f: LogFormat) -> u8 {
    match f {
        LogFormat::Off => 0,
        LogFormat::Json => 1,
        LogFormat::Combined => 2,
    }
}

fn open(path: &Option<PathBuf>) -> std::io::Result<Box<dyn Write + Send>> {
    Ok(match path {
        None => Box::new(std::io::stdout()),
        Some(p) => Box::new(OpenOptions::new().create(true).append(true).open(p)?),
    })
}

fn cannot_open(path: &Option<PathBuf>, e: std::io::Error) -> String {
    format!(
        "access_log.path {}: cannot open for appending: {e}",
        path.as_ref()
            .map_or("-".into(), |p| p.display().to_string())
    )
}

impl AccessLog {
    /// Fails when `path` cannot be opened for appending (checked even with
    /// `format: off`, so a later reload that turns the log on finds it), or
    /// when the writer cannot be started.
    pub fn new(
        format: LogFormat,
        path: Option<PathBuf>,
        dropped: prometheus::IntCounter,
    ) -> Result<Self, String> {
        let log = AccessLog {
            inner: Arc::new(Inner {
                format: AtomicU8::new(0),
                dropped,
                path: Mutex::new(path),
                tx: OnceLock::new(),
            }),
        };
        if format == LogFormat::Off {
            // Checked all the same, so a reload that turns it on finds it.
            let path = log.inner.path.lock().unwrap();
            open(&path).map_err(|e| cannot_open(&path, e))?;
        } else {
            log.start()?;
            log.inner
                .format
                .store(format_code(format), Ordering::Relaxed);
        }
        Ok(log)
    }

    /// Starts the writer thread on the current path, unless it runs already.
    fn start(&self) -> Result<(), String> {
        if self.inner.tx.get().is_some() {
            return Ok(());
        }
        let path = self.inner.path.lock().unwrap().clone();
        let first = open(&path).map_err(|e| cannot_open(&path, e))?;
        let (tx, rx) = sync_channel::<Msg>(16 * 1024);
        let inner = Arc::downgrade(&self.inner);
        std::thread::Builder::new()
            .name("usher-access-log".into())
            .spawn(move || write_lines(first, rx, inner))
            .map_err(|e| format!("cannot start the access log writer: {e}"))?;
        // Only the reloader and `new` start the writer, one at a time.
        let _ = self.inner.tx.set(tx);
        Ok(())
    }

    fn send(&self, msg: Msg) {
        if let Some(tx) = self.inner.tx.get() {
            let _ = tx.send(msg);
        }
    }

    /// Reopens the file (SIGUSR1). On stdout, there is nothing to reopen.
    pub fn reopen(&self) -> bool {
        if self.inner.path.lock().unwrap().is_none() {
            return false;
        }
        self.send(Msg::Reopen);
        true
    }

    /// Writes to `path` from now on (reload). Set it before the format, so
    /// that a reload turning the log on starts it on the new path.
    pub fn set_path(&self, path: Option<PathBuf>) {
        let mut p = self.inner.path.lock().unwrap();
        if *p != path {
            *p = path;
            drop(p);
            self.send(Msg::Reopen);
        }
    }

    /// Changes the format (reload). The first format that writes lines
    /// starts the writer; if it cannot start, the log stays off and says why.
    pub fn set_format(&self, f: LogFormat) {
        if f != LogFormat::Off {
            if let Err(e) = self.start() {
                tracing::error!(error = %e, "the access log stays off");
                return;
            }
        }
        self.inner.format.store(format_code(f), Ordering::Relaxed);
    }

    /// Whether lines are written at all (`format: off` skips building them).
    pub fn enabled(&self) -> bool {
        self.inner.format.load(Ordering::Relaxed) != 0
    }

    pub fn log(&self, e: Entry) {
        let line = match self.inner.format.load(Ordering::Relaxed) {
            1 => json_line(&e),
            2 => combined_line(&e),
            _ => return,
        };
        let Some(tx) = self.inner.tx.get() else {
            return;
        };
        if let Err(TrySendError::Full(_)) = tx.try_send(Msg::Line(line)) {
            self.inner.dropped.inc();
        }
    }
}

/// The writer thread: writes lines until every clone of the log is gone.
fn write_lines(first: Box<dyn Write + Send>, rx: Receiver<Msg>, log: Weak<Inner>) {
    let mut out = std::io::BufWriter::new(first);
    let handle = |msg: Msg, out: &mut std::io::BufWriter<Box<dyn Write + Send>>| match msg {
        Msg::Line(line) => {
            let _ = out.write_all(line.as_bytes());
        }
        Msg::Reopen => {
            let _ = out.flush();
            let Some(log) = log.upgrade() else { return };
            let p = log.path.lock().unwrap().clone();
            match open(&p) {
                Ok(w) => {
                    *out = std::io::BufWriter::new(w);
                    tracing::info!(path = ?p, "access log reopened");
                }
                Err(e) => {
                    tracing::error!(path = ?p, error = %e, "cannot reopen the access log; still writing to the old file")
                }
            }
        }
    };
    while let Ok(msg) = rx.recv() {
        handle(msg, &mut out);
        // Flush whenever the channel is drained, so lines appear promptly
        // at low rates and in batches at high rates.
        while let Ok(msg) = rx.try_recv() {
            handle(msg, &mut out);
        }
        let _ = out.flush();
    }
}

fn json_line(e: &Entry) -> String {
    let ts = e.time.duration_since(UNIX_EPOCH).unwrap_or_default();
    let v = serde_json::json!({
        "ts": ts.as_secs_f64(),
        "client": e.peer.ip().to_string(),
        "method": e.method,
        "path": e.path,
        "proto": format!("{:?}", e.version),
        "status": e.status,
        "bytes": e.bytes,
        "route": e.route,
        "upstream": e.upstream,
        "backend": e.backend,
        "duration_ms": (e.duration.as_secs_f64() * 1000.0 * 1000.0).round() / 1000.0,
        "queue_ms": (e.queue_wait.as_secs_f64() * 1000.0 * 1000.0).round() / 1000.0,
        "request_id": e.request_id,
        "user_agent": e.user_agent,
        "error": e.error,
    });
    let mut s = v.to_string();
    s.push('\n');
    s
}

/// Apache/nginx "combined" plus Usher's fields at the end.
fn combined_line(e: &Entry) -> String {
    let secs = e
        .time
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    format!(
        "{} - - [{}] \"{} {} {:?}\" {} {} \"-\" \"{}\" upstream={} backend={} rt={:.3} qt={:.3} rid={}\n",
        e.peer.ip(),
        clf_time(secs),
        e.method,
        e.path,
        e.version,
        e.status,
        e.bytes.map_or("-".to_string(), |b| b.to_string()),
        e.user_agent.as_deref().unwrap_or("-").replace('"', "'"),
        e.upstream,
        e.backend.as_deref().unwrap_or("-"),
        e.duration.as_secs_f64(),
        e.queue_wait.as_secs_f64(),
        e.request_id,
    )
}

/// `25/Nov/2026:17:33:09 +0000` from UNIX seconds (UTC).
fn clf_time(secs: u64) -> String {
    let days = secs / 86400;
    let rem = secs % 86400;
    let (y, m, d) = civil_from_days(days as i64);
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    format!(
        "{:02}/{}/{}:{:02}:{:02}:{:02} +0000",
        d,
        MONTHS[(m - 1) as usize],
        y,
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

/// Howard Hinnant's days-to-civil algorithm.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clf_time_formats_utc() {
        // 2026-11-25T17:33:09Z
        assert_eq!(clf_time(1_795_628_789), "25/Nov/2026:17:46:29 +0000");
        assert_eq!(clf_time(0), "01/Jan/1970:00:00:00 +0000");
    }
}
