//! Prometheus metrics: the names of the contract in `DESIGN.md`.
//!
//! Dashboards and alerts in `deploy/` depend on these names; change them only
//! together. The registry is owned (not prometheus' global one) so tests that
//! build several proxies in one process don't collide. Per-backend gauges are
//! refreshed from live state at scrape time rather than on every change.

use std::sync::OnceLock;

use prometheus::{
    Encoder, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

use super::histogram::{Histogram, HistogramVec};

pub const REQUESTS_TOTAL: &str = "usher_requests_total";
pub const REQUEST_DURATION: &str = "usher_request_duration_seconds";
pub const QUEUE_DEPTH: &str = "usher_queue_depth";
pub const QUEUE_WAIT: &str = "usher_queue_wait_seconds";
pub const QUEUE_REJECTIONS: &str = "usher_queue_rejections_total";
pub const BACKEND_IN_FLIGHT: &str = "usher_backend_in_flight";
pub const BACKEND_CAPACITY: &str = "usher_backend_capacity";
/// The learned concurrency cap per backend (the threads while none).
pub const BACKEND_LEARNED_CAPACITY: &str = "usher_backend_learned_capacity";
pub const BACKEND_UP: &str = "usher_backend_up";
pub const BACKEND_REQUESTS: &str = "usher_backend_requests_total";
pub const BACKEND_RESPONSE: &str = "usher_backend_response_seconds";
pub const BACKEND_EJECTIONS: &str = "usher_backend_ejections_total";
pub const HEALTH_CHECKS: &str = "usher_health_checks_total";
/// Failed active checks, by reason (status, timeout, refused, error, body).
pub const HEALTH_CHECK_FAILURES: &str = "usher_health_check_failures_total";
pub const RETRIES: &str = "usher_retries_total";
pub const CLIENT_CONNECTIONS: &str = "usher_client_connections";
pub const CONFIG_RELOADS: &str = "usher_config_reloads_total";
pub const BUILD_INFO: &str = "usher_build_info";
pub const FLEET_RESTARTS: &str = "usher_fleet_restarts_total";
pub const DNS_RESOLUTIONS: &str = "usher_dns_resolutions_total";
/// Access-log lines dropped because the writer fell behind.
pub const ACCESS_LOG_DROPPED: &str = "usher_access_log_dropped_total";
/// Open upgraded (WebSocket) connections per backend.
pub const UPGRADED_CONNECTIONS: &str = "usher_upgraded_connections";

/// Latency buckets from 1 ms to 60 s.
const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];
/// Queue waits are usually short; finer at the low end.
const WAIT_BUCKETS: &[f64] = &[
    0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    30.0,
];

pub struct Metrics {
    pub registry: Registry,
    pub requests: IntCounterVec,
    pub request_duration: HistogramVec,
    pub queue_depth: IntGaugeVec,
    pub queue_wait: HistogramVec,
    pub queue_rejections: IntCounterVec,
    pub backend_in_flight: IntGaugeVec,
    pub backend_capacity: IntGaugeVec,
    pub backend_learned_capacity: IntGaugeVec,
    pub backend_up: IntGaugeVec,
    pub backend_requests: IntCounterVec,
    pub backend_response: HistogramVec,
    pub backend_ejections: IntCounterVec,
    pub health_checks: IntCounterVec,
    pub health_check_failures: IntCounterVec,
    pub retries: IntCounterVec,
    pub client_connections: IntGaugeVec,
    pub config_reloads: IntCounterVec,
    pub fleet_restarts: IntCounterVec,
    pub dns_resolutions: IntCounterVec,
    pub access_log_dropped: IntCounter,
    pub upgraded_connections: IntGaugeVec,
    pub build_info: IntGauge,
}

fn counter(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let m = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
    r.register(Box::new(m.clone())).expect("unique metric");
    m
}

fn gauge(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let m = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
    r.register(Box::new(m.clone())).expect("unique metric");
    m
}

fn histogram(
    r: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
    buckets: &[f64],
) -> HistogramVec {
    let m = HistogramVec::new(name, help, labels, buckets).expect("valid metric");
    r.register(Box::new(m.clone())).expect("unique metric");
    m
}

impl Metrics {
    pub fn new() -> Self {
        let r = Registry::new();
        let ub = &["upstream", "backend"];
        let m = Metrics {
            requests: counter(
                &r,
                REQUESTS_TOTAL,
                "Client requests answered, by status code.",
                &["route", "upstream", "code"],
            ),
            request_duration: histogram(
                &r,
                REQUEST_DURATION,
                "Time from request head to response head written, including queueing.",
                &["route", "upstream"],
                LATENCY_BUCKETS,
            ),
            queue_depth: gauge(
                &r,
                QUEUE_DEPTH,
                "Requests waiting in the upstream's central queue.",
                &["upstream"],
            ),
            queue_wait: histogram(
                &r,
                QUEUE_WAIT,
                "Time a request waited for a free backend slot.",
                &["upstream"],
                WAIT_BUCKETS,
            ),
            queue_rejections: counter(
                &r,
                QUEUE_REJECTIONS,
                "Requests refused with 503 by the queue, by reason (full, timeout, overload).",
                &["upstream", "reason"],
            ),
            backend_in_flight: gauge(
                &r,
                BACKEND_IN_FLIGHT,
                "Requests this Usher has outstanding on the backend.",
                ub,
            ),
            backend_capacity: gauge(
                &r,
                BACKEND_CAPACITY,
                "Requests the backend may hold at once (its threads).",
                ub,
            ),
            backend_learned_capacity: gauge(
                &r,
                BACKEND_LEARNED_CAPACITY,
                "Requests at once past which the backend's throughput stops rising, as learned (its threads while nothing says fewer).",
                ub,
            ),
            backend_up: gauge(
                &r,
                BACKEND_UP,
                "1 if the backend takes new requests (healthy, not ejected, not draining).",
                ub,
            ),
            backend_requests: counter(
                &r,
                BACKEND_REQUESTS,
                "Requests sent to the backend, by status code (or error).",
                &["upstream", "backend", "code"],
            ),
            backend_response: histogram(
                &r,
                BACKEND_RESPONSE,
                "Time from request sent to response fully read from the backend.",
                ub,
                LATENCY_BUCKETS,
            ),
            backend_ejections: counter(
                &r,
                BACKEND_EJECTIONS,
                "Passive ejections of the backend after consecutive failures.",
                ub,
            ),
            health_checks: counter(
                &r,
                HEALTH_CHECKS,
                "Active health checks, by result (success, failure).",
                &["upstream", "backend", "result"],
            ),
            health_check_failures: counter(
                &r,
                HEALTH_CHECK_FAILURES,
                "Failed active health checks, by reason: status (an unexpected code), timeout, refused, error, body.",
                &["upstream", "backend", "reason"],
            ),
            retries: counter(
                &r,
                RETRIES,
                "Retries of requests on another attempt, by reason.",
                &["upstream", "reason"],
            ),
            client_connections: gauge(
                &r,
                CLIENT_CONNECTIONS,
                "Open client connections.",
                &["listener"],
            ),
            config_reloads: counter(
                &r,
                CONFIG_RELOADS,
                "Configuration reloads, by result (success, failure).",
                &["result"],
            ),
            fleet_restarts: counter(
                &r,
                FLEET_RESTARTS,
                "Fleet processes restarted after they exited.",
                &["upstream"],
            ),
            dns_resolutions: counter(
                &r,
                DNS_RESOLUTIONS,
                "DNS discovery resolutions, by result (success, failure).",
                &["upstream", "result"],
            ),
            access_log_dropped: {
                let c = IntCounter::new(
                    ACCESS_LOG_DROPPED,
                    "Access-log lines dropped because the writer fell behind.",
                )
                .expect("valid metric");
                r.register(Box::new(c.clone())).expect("unique metric");
                c
            },
            upgraded_connections: gauge(
                &r,
                UPGRADED_CONNECTIONS,
                "Upgraded (WebSocket) connections open to the backend, or being opened.",
                ub,
            ),
            build_info: IntGauge::with_opts(
                Opts::new(BUILD_INFO, "Always 1; the version is a label.")
                    .const_label("version", env!("CARGO_PKG_VERSION")),
            )
            .expect("valid metric"),
            registry: r,
        };
        m.registry
            .register(Box::new(m.build_info.clone()))
            .expect("unique metric");
        m.build_info.set(1);
        for result in ["success", "failure"] {
            m.config_reloads.with_label_values(&[result]);
        }
        #[cfg(target_os = "linux")]
        m.registry
            .register(Box::new(
                prometheus::process_collector::ProcessCollector::for_self(),
            ))
            .expect("unique metric");
        m
    }

    /// Makes an upstream's series exist before its first event, so dashboards
    /// and `rate()` see zeros rather than nothing.
    pub fn init_upstream(&self, upstream: &str) {
        self.queue_depth.with_label_values(&[upstream]);
        for reason in ["full", "timeout", "overload"] {
            self.queue_rejections.with_label_values(&[upstream, reason]);
        }
        for reason in ["connect", "error"] {
            self.retries.with_label_values(&[upstream, reason]);
        }
    }

    pub fn init_backend(&self, upstream: &str, backend: &str) {
        self.backend_ejections
            .with_label_values(&[upstream, backend]);
        for result in ["success", "failure"] {
            self.health_checks
                .with_label_values(&[upstream, backend, result]);
        }
        for reason in ["status", "timeout", "refused", "error", "body"] {
            self.health_check_failures
                .with_label_values(&[upstream, backend, reason]);
        }
    }

    pub fn forget_backend(&self, upstream: &str, backend: &str) {
        let l = &[upstream, backend];
        let _ = self.backend_in_flight.remove_label_values(l);
        let _ = self.backend_capacity.remove_label_values(l);
        let _ = self.backend_learned_capacity.remove_label_values(l);
        let _ = self.backend_up.remove_label_values(l);
        let _ = self.upgraded_connections.remove_label_values(l);
    }

    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding cannot fail");
        out
    }
}

/// Counters of one `*_total{..., code}` family for fixed other labels, one
/// per status code, created on first use and then reached without hashing
/// label strings or taking the family's lock. `with_label_values` on every
/// request cost ~8% of the proxy's CPU in `bench/overhead.sh`.
pub struct CodeCounters {
    family: IntCounterVec,
    labels: Vec<String>,
    by_code: Box<[OnceLock<IntCounter>]>,
}

impl CodeCounters {
    /// `labels` are the family's labels before `code`, in order.
    pub fn new(family: &IntCounterVec, labels: &[&str]) -> Self {
        CodeCounters {
            family: family.clone(),
            labels: labels.iter().map(|l| l.to_string()).collect(),
            by_code: (100..600).map(|_| OnceLock::new()).collect(),
        }
    }

    /// Counts one answer with `code`: a status (`"200"`) or a word (`"timeout"`).
    pub fn inc(&self, code: &str) {
        // A status is three digits, 100 to 599: indexed without a parse.
        let slot = match *code.as_bytes() {
            [a @ b'1'..=b'5', b @ b'0'..=b'9', c @ b'0'..=b'9'] => self.by_code.get(
                usize::from(a - b'1') * 100 + usize::from(b - b'0') * 10 + usize::from(c - b'0'),
            ),
            _ => None,
        };
        match slot {
            Some(cell) => cell.get_or_init(|| self.counter(code)).inc(),
            None => self.counter(code).inc(),
        }
    }

    fn counter(&self, code: &str) -> IntCounter {
        let mut values: Vec<&str> = self.labels.iter().map(String::as_str).collect();
        values.push(code);
        self.family.with_label_values(&values)
    }
}

/// The per-request metrics of one backend, resolved once.
pub struct BackendMetrics {
    pub requests: CodeCounters,
    pub response: Histogram,
    /// Set by the backend when it learns (see `dispatch/learn.rs`).
    pub learned_capacity: IntGauge,
}

impl std::fmt::Debug for BackendMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BackendMetrics")
    }
}

impl BackendMetrics {
    pub fn new(m: &Metrics, upstream: &str, backend: &str) -> Self {
        BackendMetrics {
            requests: CodeCounters::new(&m.backend_requests, &[upstream, backend]),
            response: m.backend_response.with_label_values(&[upstream, backend]),
            learned_capacity: m
                .backend_learned_capacity
                .with_label_values(&[upstream, backend]),
        }
    }
}

/// The per-request metrics of one route, resolved once.
pub struct RouteMetrics {
    pub requests: CodeCounters,
    pub duration: Histogram,
}

impl RouteMetrics {
    pub fn new(m: &Metrics, route: &str, upstream: &str) -> Self {
        RouteMetrics {
            requests: CodeCounters::new(&m.requests, &[route, upstream]),
            duration: m.request_duration.with_label_values(&[route, upstream]),
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_counters_count_into_the_family() {
        let m = Metrics::new();
        let c = CodeCounters::new(&m.backend_requests, &["app", "127.0.0.1:1"]);
        c.inc("200");
        c.inc("200");
        c.inc("503");
        c.inc("timeout");
        c.inc("99");
        for edge in ["100", "599", "600", "0200"] {
            c.inc(edge);
        }
        let get = |code: &str| {
            m.backend_requests
                .with_label_values(&["app", "127.0.0.1:1", code])
                .get()
        };
        assert_eq!(
            (get("200"), get("503"), get("timeout"), get("99")),
            (2, 1, 1, 1)
        );
        assert_eq!(
            (get("100"), get("599"), get("600"), get("0200")),
            (1, 1, 1, 1)
        );
    }
}
