//! Active health checks.
//!
//! Split as rust-rpxy does it: [`Threshold`] is the pure rise/fall counter,
//! [`probe`] is one HTTP GET, and [`run`] is the scheduler loop, which stops
//! when its upstream is replaced (reload) or the process shuts down.
//! A `usher-worker` answers `/healthz` with its thread count, which refreshes
//! an `auto` capacity.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use tokio_util::sync::CancellationToken;

use crate::dispatch::backend::Backend;
use crate::upstream::Upstream;

/// Consecutive-result thresholds: `rise` successes bring a backend up, `fall`
/// failures take it down. Results that agree with the current state reset the
/// opposite run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Threshold {
    rise: u32,
    fall: u32,
    run: u32,
    up: bool,
}

impl Threshold {
    pub fn new(rise: u32, fall: u32, up: bool) -> Self {
        Threshold {
            rise: rise.max(1),
            fall: fall.max(1),
            run: 0,
            up,
        }
    }

    pub fn is_up(&self) -> bool {
        self.up
    }

    /// Records one result; returns the new state if it changed.
    pub fn record(&mut self, ok: bool) -> Option<bool> {
        if ok == self.up {
            self.run = 0;
            return None;
        }
        self.run += 1;
        let needed = if ok { self.rise } else { self.fall };
        if self.run >= needed {
            self.up = ok;
            self.run = 0;
            Some(ok)
        } else {
            None
        }
    }
}

/// What one probe found.
#[derive(Debug)]
pub struct ProbeResult {
    pub ok: bool,
    pub threads: Option<u32>,
}

/// One health check: GET `path`, healthy on 2xx/3xx within `timeout`.
pub async fn probe(up: &Upstream, backend: &Backend, path: &str, timeout: Duration) -> ProbeResult {
    let uri = format!("http://{}{}", backend.addr, path);
    let req = Request::get(uri)
        .header(
            http::header::USER_AGENT,
            concat!("usher-health/", env!("CARGO_PKG_VERSION")),
        )
        .body(Full::new(Bytes::new()));
    let Ok(req) = req else {
        return ProbeResult {
            ok: false,
            threads: None,
        };
    };
    let fut = async {
        let resp = up.client.request(req).await.ok()?;
        let status = resp.status();
        let body = http_body_util::Limited::new(resp.into_body(), 64 * 1024)
            .collect()
            .await
            .ok()?
            .to_bytes();
        Some((status, body))
    };
    match tokio::time::timeout(timeout, fut).await {
        Ok(Some((status, body))) => {
            let ok = status.is_success() || status.is_redirection();
            let threads = (ok && status == StatusCode::OK)
                .then(|| serde_json::from_slice::<serde_json::Value>(&body).ok())
                .flatten()
                .and_then(|v| v.get("threads")?.as_u64())
                .and_then(|t| u32::try_from(t).ok());
            ProbeResult { ok, threads }
        }
        _ => ProbeResult {
            ok: false,
            threads: None,
        },
    }
}

/// Checks every backend of `up` each `interval` (jittered by ±10%) until
/// `cancel` fires.
pub async fn run(up: Arc<Upstream>, cancel: CancellationToken) {
    let Some(hc) = up.cfg.health_check.clone() else {
        return;
    };
    let mut thresholds: std::collections::HashMap<String, Threshold> = Default::default();
    loop {
        let backends = up.dispatcher.backends();
        let mut set = tokio::task::JoinSet::new();
        for b in &backends {
            let (up, b, path, timeout) = (up.clone(), b.clone(), hc.path.clone(), hc.timeout.0);
            set.spawn(async move {
                let r = probe(&up, &b, &path, timeout).await;
                (b, r)
            });
        }
        let results: Vec<_> = set.join_all().await;
        let mut changed = false;
        for (b, r) in results {
            let t = thresholds
                .entry(b.key.clone())
                .or_insert_with(|| Threshold::new(hc.rise, hc.fall, b.is_up()));
            let label = if r.ok { "success" } else { "failure" };
            up.metrics
                .health_checks
                .with_label_values(&[&up.name, &b.key, label])
                .inc();
            if let Some(threads) = r.threads {
                changed |= b.report_threads(threads);
            }
            if r.ok && b.health_check_passed(std::time::Instant::now()) {
                tracing::info!(upstream = %up.name, backend = %b.key, "health check passed: readmitting a backend ejected for refused connections");
                changed = true;
            }
            if let Some(now_up) = t.record(r.ok) {
                tracing::warn!(upstream = %up.name, backend = %b.key, up = now_up, "health check changed backend state");
                changed |= b.set_up(now_up);
            }
        }
        thresholds.retain(|k, _| backends.iter().any(|b| &b.key == k));
        if changed {
            up.dispatcher.kick();
        }
        let jitter = 0.9 + fastrand::f64() * 0.2;
        let wait = hc.interval.0.mul_f64(jitter);
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rise_and_fall_need_consecutive_results() {
        let mut t = Threshold::new(2, 3, true);
        assert_eq!(t.record(false), None);
        assert_eq!(t.record(false), None);
        assert_eq!(t.record(true), None); // resets the failure run
        assert_eq!(t.record(false), None);
        assert_eq!(t.record(false), None);
        assert_eq!(t.record(false), Some(false));
        assert!(!t.is_up());
        assert_eq!(t.record(true), None);
        assert_eq!(t.record(false), None);
        assert_eq!(t.record(true), None);
        assert_eq!(t.record(true), Some(true));
        assert!(t.is_up());
    }
}
