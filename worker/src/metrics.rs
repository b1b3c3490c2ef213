//! The worker's Prometheus metrics, in an owned [`Registry`].
//!
//! The names are the contract in `DESIGN.md` ("Metrics contract"); dashboards depend
//! on them. An owned registry (not the global one) lets several servers run in one
//! process, as they do in tests.

use http::StatusCode;
use prometheus::{Encoder, IntCounterVec, IntGauge, Opts, Registry, TextEncoder};

use crate::LoadSnapshot;

/// Gauge: size of the thread pool.
pub const THREADS: &str = "usher_worker_threads";
/// Gauge: threads running a handler.
pub const BUSY_THREADS: &str = "usher_worker_busy_threads";
/// Gauge: requests waiting for a thread.
pub const QUEUE_DEPTH: &str = "usher_worker_queue_depth";
/// Counter with label `code`: responses sent, by status code.
pub const REQUESTS_TOTAL: &str = "usher_worker_requests_total";

#[derive(Debug, Clone)]
pub(crate) struct Metrics {
    registry: Registry,
    threads: IntGauge,
    busy: IntGauge,
    queue_depth: IntGauge,
    requests: IntCounterVec,
}

impl Metrics {
    pub(crate) fn new() -> Self {
        let registry = Registry::new();
        let gauge = |name: &str, help: &str| {
            let g = IntGauge::with_opts(Opts::new(name, help)).expect("valid metric name");
            registry
                .register(Box::new(g.clone()))
                .expect("metric registered once");
            g
        };
        let threads = gauge(THREADS, "Number of handler threads in the pool.");
        let busy = gauge(BUSY_THREADS, "Handler threads currently running a request.");
        let queue_depth = gauge(QUEUE_DEPTH, "Requests waiting for a free thread.");
        let requests = IntCounterVec::new(
            Opts::new(REQUESTS_TOTAL, "Responses sent, by HTTP status code."),
            &["code"],
        )
        .expect("valid metric name");
        registry
            .register(Box::new(requests.clone()))
            .expect("metric registered once");
        #[cfg(target_os = "linux")]
        registry
            .register(Box::new(
                prometheus::process_collector::ProcessCollector::for_self(),
            ))
            .expect("process collector registered once");
        Self {
            registry,
            threads,
            busy,
            queue_depth,
            requests,
        }
    }

    pub(crate) fn count_response(&self, code: StatusCode) {
        self.requests.with_label_values(&[code.as_str()]).inc();
    }

    /// Renders the text exposition format, with the gauges set from `load`.
    pub(crate) fn render(&self, load: &LoadSnapshot) -> Vec<u8> {
        self.threads.set(load.threads as i64);
        self.busy.set(load.busy as i64);
        self.queue_depth.set(load.queued as i64);
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding into a Vec cannot fail");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_contract_names() {
        let m = Metrics::new();
        m.count_response(StatusCode::OK);
        let load = LoadSnapshot {
            threads: 4,
            busy: 1,
            queued: 2,
            served: 0,
            peak_busy: 1,
            refused: 0,
        };
        let text = String::from_utf8(m.render(&load)).unwrap();
        assert!(text.contains("usher_worker_threads 4"), "{text}");
        assert!(text.contains("usher_worker_busy_threads 1"), "{text}");
        assert!(text.contains("usher_worker_queue_depth 2"), "{text}");
        assert!(
            text.contains(r#"usher_worker_requests_total{code="200"} 1"#),
            "{text}"
        );
    }
}
