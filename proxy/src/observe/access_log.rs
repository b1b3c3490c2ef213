//! The access log: one line per request on stdout, JSON or combined format.
//!
//! Lines are handed to a dedicated writer thread over a bounded channel, so a
//! slow stdout never blocks the request path; if the channel is full, the line
//! is dropped and counted rather than stalling traffic.

use std::io::Write;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::Arc;
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

#[derive(Clone)]
pub struct AccessLog {
    tx: SyncSender<String>,
    format: Arc<AtomicU8>,
    pub dropped: Arc<AtomicU64>,
}

fn format_code(f: LogFormat) -> u8 {
    match f {
        LogFormat::Off => 0,
        LogFormat::Json => 1,
        LogFormat::Combined => 2,
    }
}

impl AccessLog {
    pub fn new(format: LogFormat) -> Self {
        let (tx, rx) = sync_channel::<String>(16 * 1024);
        std::thread::Builder::new()
            .name("usher-access-log".into())
            .spawn(move || {
                let stdout = std::io::stdout();
                let mut out = std::io::BufWriter::new(stdout.lock());
                while let Ok(line) = rx.recv() {
                    let _ = out.write_all(line.as_bytes());
                    // Flush whenever the channel is drained, so lines appear
                    // promptly at low rates and in batches at high rates.
                    while let Ok(line) = rx.try_recv() {
                        let _ = out.write_all(line.as_bytes());
                    }
                    let _ = out.flush();
                }
            })
            .expect("spawn access log thread");
        AccessLog {
            tx,
            format: Arc::new(AtomicU8::new(format_code(format))),
            dropped: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Changes the format (reload).
    pub fn set_format(&self, f: LogFormat) {
        self.format.store(format_code(f), Ordering::Relaxed);
    }

    /// Whether lines are written at all (`format: off` skips building them).
    pub fn enabled(&self) -> bool {
        self.format.load(Ordering::Relaxed) != 0
    }

    pub fn log(&self, e: Entry) {
        let line = match self.format.load(Ordering::Relaxed) {
            1 => json_line(&e),
            2 => combined_line(&e),
            _ => return,
        };
        if let Err(TrySendError::Full(_)) = self.tx.try_send(line) {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
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
