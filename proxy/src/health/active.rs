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

/// What a worker says about its load (`X-Usher-Load`, or `/healthz`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Load {
    pub threads: u32,
    /// `busy + queued`, when the report says how busy it is: the threads
    /// taken at the moment of the report (on a response: not counting the
    /// request answered).
    pub taken: Option<usize>,
}

/// What the checker needs of a backend.
pub trait Target: Send + Sync + 'static {
    fn addr(&self) -> SocketAddr;
    /// The backend's name in logs and metrics.
    fn key(&self) -> &str;
    fn health(&self) -> &Health;
    /// The worker reported its load (thread count, and how busy it is);
    /// true if capacity grew.
    fn report_load(&self, load: Load) -> bool;
    /// The active check brought it back up (slow start begins).
    fn came_up(&self);
    /// Every thread this replica may use on it holds a request: a check
    /// that needs a thread of its own (a WSGI app answering `/healthz`)
    /// waits behind them.
    fn is_full(&self) -> bool;
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
#[derive(Debug, Clone)]
pub struct ProbeResult {
    pub ok: bool,
    /// The worker's load, from a `usher-worker`-style `/healthz`
    /// (`{"threads": 4, "busy": 1, "queued": 0, …}`).
    pub load: Option<Load>,
    /// Why it failed.
    pub failure: Option<Failure>,
}

/// Why a probe failed: what an operator needs to fix it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// Answered with a code `expect` does not list.
    Status { code: u16, expected: String },
    /// No answer within the check's `timeout`.
    Timeout,
    /// Nothing listens at the address.
    Refused,
    /// Another connection or protocol error.
    Error(String),
    /// The answer's body could not be read.
    Body(String),
}

impl Failure {
    /// The `reason` label of `usher_health_check_failures_total`.
    pub fn label(&self) -> &'static str {
        match self {
            Failure::Status { .. } => "status",
            Failure::Timeout => "timeout",
            Failure::Refused => "refused",
            Failure::Error(_) => "error",
            Failure::Body(_) => "body",
        }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Status { code, expected } => {
                write!(f, "answered {code}, expected {expected}")?;
                if *code == 400 {
                    // Django's ALLOWED_HOSTS (and others) answer 400 to a Host
                    // they do not know.
                    write!(f, " (an app that checks Host wants `health_check.host`)")?;
                }
                Ok(())
            }
            Failure::Timeout => write!(f, "no answer within the check's timeout"),
            Failure::Refused => write!(f, "connection refused"),
            Failure::Error(e) => write!(f, "{e}"),
            Failure::Body(e) => write!(f, "reading the body: {e}"),
        }
    }
}

/// How to probe: the check's path, Host, headers and accepted codes (the
/// headers parsed once).
#[derive(Debug, Clone)]
pub struct ProbeSpec {
    pub headers: Vec<(http::HeaderName, http::HeaderValue)>,
    pub cfg: HealthCheckConfig,
}

impl ProbeSpec {
    pub fn new(cfg: &HealthCheckConfig) -> Self {
        ProbeSpec {
            headers: cfg
                .headers
                .iter()
                .filter_map(|(k, v)| Some((k.parse().ok()?, v.parse().ok()?)))
                .collect(),
            cfg: cfg.clone(),
        }
    }

    /// The startup capacity probe: `path`, default Host, any 2xx/3xx.
    pub fn plain(path: &str) -> Self {
        ProbeSpec::new(&HealthCheckConfig {
            path: path.to_string(),
            ..HealthCheckConfig::default()
        })
    }
}

/// One health check: GET the path, healthy on a code `expect` accepts
/// within `timeout`.
pub async fn probe(
    client: &HttpClient,
    addr: SocketAddr,
    spec: &ProbeSpec,
    timeout: Duration,
) -> ProbeResult {
    let fail = |f: Failure| ProbeResult {
        ok: false,
        load: None,
        failure: Some(f),
    };
    let uri = format!("http://{addr}{}", spec.cfg.path);
    let mut req = Request::get(uri).header(
        http::header::USER_AGENT,
        concat!("usher-health/", env!("CARGO_PKG_VERSION")),
    );
    if let Some(host) = &spec.cfg.host {
        req = req.header(http::header::HOST, host.as_str());
    }
    for (k, v) in &spec.headers {
        req = req.header(k, v);
    }
    let req = match req.body(Full::new(Bytes::new())) {
        Ok(r) => r,
        Err(e) => return fail(Failure::Error(e.to_string())),
    };
    let fut = async {
        let resp = client.request(req).await.map_err(|e| {
            let text = crate::error::error_chain(&e);
            if e.is_connect() && text.contains("refused") {
                Failure::Refused
            } else {
                Failure::Error(text)
            }
        })?;
        let status = resp.status();
        let body = http_body_util::Limited::new(resp.into_body(), 64 * 1024)
            .collect()
            .await
            .map_err(|e| Failure::Body(e.to_string()))?
            .to_bytes();
        Ok::<_, Failure>((status, body))
    };
    match tokio::time::timeout(timeout, fut).await {
        Err(_) => fail(Failure::Timeout),
        Ok(Err(f)) => fail(f),
        Ok(Ok((status, body))) => {
            if !spec.cfg.accepts(status.as_u16()) {
                return fail(Failure::Status {
                    code: status.as_u16(),
                    expected: spec.cfg.expect_text(),
                });
            }
            let load = (status == StatusCode::OK)
                .then(|| serde_json::from_slice::<serde_json::Value>(&body).ok())
                .flatten()
                .and_then(|v| healthz_load(&v));
            ProbeResult {
                ok: true,
                load,
                failure: None,
            }
        }
    }
}

/// The load in a `/healthz` JSON body: `threads`, and `busy` (+ `queued`)
/// when it says them.
fn healthz_load(v: &serde_json::Value) -> Option<Load> {
    let count = |k: &str| v.get(k)?.as_u64().and_then(|n| usize::try_from(n).ok());
    let threads = u32::try_from(v.get("threads")?.as_u64()?).ok()?;
    let queued = count("queued").unwrap_or(0);
    Some(Load {
        threads,
        taken: count("busy").map(|busy| busy.saturating_add(queued)),
    })
}

/// Checks every target each `interval` (jittered by ±10%) until `cancel`
/// fires.
pub async fn run<T: Target>(c: Checker<T>, cancel: CancellationToken) {
    let hc = &c.cfg;
    let spec = Arc::new(ProbeSpec::new(hc));
    let mut thresholds: std::collections::HashMap<String, Threshold> = Default::default();
    let mut reasons: std::collections::HashMap<String, Option<String>> = Default::default();
    loop {
        // A fleet process that does not accept connections yet is the
        // fleet's to watch: probing it would only log refusals at each start.
        let targets: Vec<_> = (c.targets)()
            .into_iter()
            .filter(|t| t.health().is_accepting())
            .collect();
        let mut set = tokio::task::JoinSet::new();
        for t in &targets {
            let (client, t, spec, timeout) =
                (c.client.clone(), t.clone(), spec.clone(), hc.timeout.0);
            set.spawn(async move {
                let r = probe(&client, t.addr(), &spec, timeout).await;
                (t, r)
            });
        }
        let results: Vec<_> = set.join_all().await;
        let mut changed = false;
        for (b, r) in results {
            let health = b.health();
            // A check that timed out while every thread held this
            // replica's requests saw a busy backend, not a dead one: a
            // threaded server answers a check only from a free thread. It
            // counts neither way (`result="busy"`). A backend that is hung
            // rather than busy shows when those requests time out
            // (`timeouts.response`): then it is no longer full.
            if matches!(r.failure, Some(Failure::Timeout)) && b.is_full() {
                c.metrics
                    .health_checks
                    .with_label_values(&[&c.upstream, b.key(), "busy"])
                    .inc();
                continue;
            }
            let t = thresholds
                .entry(b.key().to_string())
                .or_insert_with(|| Threshold::new(hc.rise, hc.fall, health.is_up()));
            let label = if r.ok { "success" } else { "failure" };
            c.metrics
                .health_checks
                .with_label_values(&[&c.upstream, b.key(), label])
                .inc();
            if let Some(f) = &r.failure {
                c.metrics
                    .health_check_failures
                    .with_label_values(&[&c.upstream, b.key(), f.label()])
                    .inc();
            }
            health.record_check(r.failure.as_ref().map(ToString::to_string));
            if let Some(load) = r.load {
                changed |= b.report_load(load);
            }
            if r.ok && health.check_passed(std::time::Instant::now()) {
                tracing::info!(upstream = %c.upstream, backend = %b.key(), "health check passed: readmitting a backend ejected for refused connections");
                changed = true;
            }
            // A backend that stays down for a new reason says so: the
            // first reason (refused, while the app started) is rarely the
            // one that keeps it down (a 400 for the probe's Host).
            let reason = r.failure.as_ref().map(ToString::to_string);
            let previous = reasons
                .insert(b.key().to_string(), reason.clone())
                .flatten();
            if !health.is_up() && reason.is_some() && previous.is_some() && reason != previous {
                tracing::warn!(upstream = %c.upstream, backend = %b.key(), reason = %reason.as_deref().unwrap_or(""), path = %hc.path, "health check still failing, for another reason");
            }
            if let Some(now_up) = t.record(r.ok) {
                match &r.failure {
                    None => {
                        tracing::info!(upstream = %c.upstream, backend = %b.key(), "health check passed: backend is up")
                    }
                    Some(f) => {
                        tracing::warn!(upstream = %c.upstream, backend = %b.key(), reason = %f, path = %hc.path, "health check failed: backend is down")
                    }
                }
                if health.set_up(now_up) {
                    changed = true;
                    if now_up {
                        b.came_up();
                    }
                }
            }
        }
        thresholds.retain(|k, _| targets.iter().any(|b| b.key() == k));
        reasons.retain(|k, _| targets.iter().any(|b| b.key() == k));
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
