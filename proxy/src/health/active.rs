//! Active health checks.
//!
//! Split as rust-rpxy does it: [`super::Threshold`] is the pure rise/fall
//! counter, [`probe`] is one HTTP GET, and [`run`] is the scheduler loop,
//! which stops when its upstream is replaced (reload) or the process shuts
//! down. The loop sees backends only as [`Target`]s, so health sits below
//! dispatch.
//! A `usher-worker` answers `/healthz` with its thread count, which refreshes
//! an `auto` capacity.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use tokio_util::sync::CancellationToken;

use std::net::SocketAddr;

use crate::config::HealthCheckConfig;
use crate::health::{Health, Threshold};
use crate::observe::metrics::Metrics;
use crate::tls::connector::HttpClient;

/// What the checker needs of a backend.
pub trait Target: Send + Sync + 'static {
    fn addr(&self) -> SocketAddr;
    /// The backend's name in logs and metrics.
    fn key(&self) -> &str;
    fn health(&self) -> &Health;
    /// The worker reported its thread count; true if capacity grew.
    fn report_threads(&self, threads: u32) -> bool;
    /// The active check brought it back up (slow start begins).
    fn came_up(&self);
}

/// One upstream's checker.
pub struct Checker<T> {
    pub upstream: String,
    pub cfg: HealthCheckConfig,
    pub client: HttpClient,
    pub metrics: Arc<Metrics>,
    /// The upstream's backends now (they change with discovery).
    pub targets: Box<dyn Fn() -> Vec<Arc<T>> + Send + Sync>,
    /// Called when a result may let queued requests through.
    pub on_change: Box<dyn Fn() + Send + Sync>,
}

/// What one probe found.
#[derive(Debug)]
pub struct ProbeResult {
    pub ok: bool,
    pub threads: Option<u32>,
}

/// One health check: GET `path`, healthy on 2xx/3xx within `timeout`.
pub async fn probe(
    client: &HttpClient,
    addr: SocketAddr,
    path: &str,
    timeout: Duration,
) -> ProbeResult {
    let uri = format!("http://{addr}{path}");
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
        let resp = client.request(req).await.ok()?;
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

/// Checks every target each `interval` (jittered by ±10%) until `cancel`
/// fires.
pub async fn run<T: Target>(c: Checker<T>, cancel: CancellationToken) {
    let hc = &c.cfg;
    let mut thresholds: std::collections::HashMap<String, Threshold> = Default::default();
    loop {
        let targets = (c.targets)();
        let mut set = tokio::task::JoinSet::new();
        for t in &targets {
            let (client, t, path, timeout) =
                (c.client.clone(), t.clone(), hc.path.clone(), hc.timeout.0);
            set.spawn(async move {
                let r = probe(&client, t.addr(), &path, timeout).await;
                (t, r)
            });
        }
        let results: Vec<_> = set.join_all().await;
        let mut changed = false;
        for (b, r) in results {
            let health = b.health();
            let t = thresholds
                .entry(b.key().to_string())
                .or_insert_with(|| Threshold::new(hc.rise, hc.fall, health.is_up()));
            let label = if r.ok { "success" } else { "failure" };
            c.metrics
                .health_checks
                .with_label_values(&[&c.upstream, b.key(), label])
                .inc();
            if let Some(threads) = r.threads {
                changed |= b.report_threads(threads);
            }
            if r.ok && health.check_passed(std::time::Instant::now()) {
                tracing::info!(upstream = %c.upstream, backend = %b.key(), "health check passed: readmitting a backend ejected for refused connections");
                changed = true;
            }
            if let Some(now_up) = t.record(r.ok) {
                tracing::warn!(upstream = %c.upstream, backend = %b.key(), up = now_up, "health check changed backend state");
                if health.set_up(now_up) {
                    changed = true;
                    if now_up {
                        b.came_up();
                    }
                }
            }
        }
        thresholds.retain(|k, _| targets.iter().any(|b| b.key() == k));
        if changed {
            (c.on_change)();
        }
        let jitter = 0.9 + fastrand::f64() * 0.2;
        let wait = hc.interval.0.mul_f64(jitter);
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}
