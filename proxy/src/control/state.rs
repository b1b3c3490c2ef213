//! The hot state: routes and upstreams built from one configuration.
//!
//! A `State` is built off the request path and swapped in whole through
//! `ArcSwap`; each request loads it once. When a new state is built from a
//! previous one, an upstream with the same name keeps its dispatcher (so its
//! queue carries over), and a backend with the same address keeps its object
//! (so its in-flight count, health and ejection carry over). A backend that is
//! gone from the config gets no new requests; the slots of its in-flight ones
//! hold it until they finish.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::config::{resolve_addr, Config};
use crate::dispatch::backend::Backend;
use crate::dispatch::{Dispatcher, QueueMetrics};
use crate::observe::metrics::{BackendMetrics, Metrics, RouteMetrics};
use crate::upstream::{build_client, RetryBudget, Upstream};

pub struct Route {
    pub name: String,
    pub metrics: RouteMetrics,
    host: HostMatch,
    prefix: String,
    pub upstream: Arc<Upstream>,
}

enum HostMatch {
    Any,
    Exact(String),
    /// `*.example.com` → `.example.com`
    Suffix(String),
}

impl HostMatch {
    fn parse(h: &str) -> Self {
        let h = h.to_ascii_lowercase();
        if h == "*" || h.is_empty() {
            HostMatch::Any
        } else if let Some(s) = h.strip_prefix('*') {
            HostMatch::Suffix(s.to_string())
        } else {
            HostMatch::Exact(h)
        }
    }

    /// `host` in any case; the patterns are stored lowercase.
    fn matches(&self, host: &str) -> bool {
        let host = host.as_bytes();
        match self {
            HostMatch::Any => true,
            HostMatch::Exact(h) => h.as_bytes().eq_ignore_ascii_case(host),
            HostMatch::Suffix(s) => {
                host.len() > s.len()
                    && host[host.len() - s.len()..].eq_ignore_ascii_case(s.as_bytes())
            }
        }
    }
}

/// Backend addresses an upstream's fleet runs on (filled in by the fleet).
pub type FleetAddrs = crate::discovery::Addresses;

pub struct State {
    pub config: Config,
    /// DNS discovery results, shared with the discovery tasks and carried
    /// across reloads.
    pub discovered: crate::discovery::SharedAddresses,
    pub routes: Vec<Route>,
    pub upstreams: HashMap<String, Arc<Upstream>>,
    /// Cancels this state's background tasks (health checks) when replaced.
    pub tasks: CancellationToken,
}

impl State {
    /// Builds a state, carrying over from `prev` by upstream name and backend
    /// address. Spawns nothing; call [`State::start`] once it is swapped in.
    pub fn build(
        config: Config,
        prev: Option<&State>,
        fleet: &FleetAddrs,
        metrics: &Arc<Metrics>,
    ) -> Result<State, String> {
        let mut upstreams = HashMap::new();
        for (name, ucfg) in &config.upstreams {
            metrics.init_upstream(name);
            let old = prev.and_then(|p| p.upstreams.get(name));
            let old_backends: HashMap<SocketAddr, Arc<Backend>> = old
                .map(|u| {
                    u.dispatcher
                        .backends()
                        .into_iter()
                        .map(|b| (b.addr, b))
                        .collect()
                })
                .unwrap_or_default();

            let mut wanted: Vec<(SocketAddr, u32, Option<u32>)> = Vec::new();
            for b in &ucfg.backends {
                let addr =
                    resolve_addr(&b.address).map_err(|e| format!("upstreams.{name}: {e}"))?;
                let fixed = b.max_in_flight.fixed();
                wanted.push((addr, b.weight, fixed));
            }
            let discovered = prev
                .and_then(|p| p.discovered.lock().unwrap().get(name).cloned())
                .unwrap_or_default();
            if let Some(d) = &ucfg.dns {
                let fixed = d.max_in_flight.fixed();
                for a in &discovered {
                    if !wanted.iter().any(|w| w.0 == *a) {
                        wanted.push((*a, 1, fixed));
                    }
                }
            }
            if let (Some(f), Some(addrs)) = (&ucfg.fleet, fleet.get(name)) {
                let fixed = f.max_in_flight.fixed();
                for a in addrs {
                    if !wanted.iter().any(|w| w.0 == *a) {
                        wanted.push((*a, 1, fixed));
                    }
                }
            }

            let backends: Vec<Arc<Backend>> = wanted
                .iter()
                .map(|&(addr, weight, fixed)| match old_backends.get(&addr) {
                    Some(b) => {
                        b.reconfigure(weight, fixed, ucfg.default_capacity);
                        b.set_slow_start(ucfg.slow_start.0);
                        b.clone()
                    }
                    None => {
                        let b = Backend::new(addr, weight, fixed, ucfg.default_capacity)
                            .with_slow_start(ucfg.slow_start.0);
                        if prev.is_some() {
                            // Added while serving: ramp up gently.
                            b.start_slow();
                        }
                        metrics.init_backend(name, &b.key);
                        Arc::new(b)
                    }
                })
                .collect();
            for b in &backends {
                b.set_share(ucfg.proxy_replicas);
                b.attach_metrics(|| BackendMetrics::new(metrics, name, &b.key));
            }
            for (addr, b) in &old_backends {
                if !wanted.iter().any(|w| w.0 == *addr) {
                    metrics.forget_backend(name, &b.key);
                }
            }

            let dispatcher = match old {
                Some(u) => {
                    u.dispatcher.set_limits(
                        ucfg.balance,
                        ucfg.queue.max_depth,
                        ucfg.queue.timeout.0,
                    );
                    u.dispatcher.set_backends(backends);
                    u.dispatcher.clone()
                }
                None => Dispatcher::new(
                    backends,
                    ucfg.balance,
                    ucfg.queue.max_depth,
                    ucfg.queue.timeout.0,
                    QueueMetrics {
                        depth: metrics.queue_depth.with_label_values(&[name]),
                        wait: metrics.queue_wait.with_label_values(&[name]),
                        rejected_full: metrics.queue_rejections.with_label_values(&[name, "full"]),
                        rejected_timeout: metrics
                            .queue_rejections
                            .with_label_values(&[name, "timeout"]),
                    },
                ),
            };
            dispatcher.set_discipline(ucfg.queue.discipline);
            let retry_budget = old
                .map(|u| u.retry_budget.clone())
                .unwrap_or_else(|| Arc::new(RetryBudget::new(0.2, 10.0)));
            upstreams.insert(
                name.clone(),
                Arc::new(Upstream {
                    name: name.clone(),
                    cfg: ucfg.clone(),
                    dispatcher,
                    client: build_client(ucfg),
                    connector: crate::tls::connector::UpstreamConnector::new(ucfg),
                    metrics: metrics.clone(),
                    max_response_buffer: config.limits.max_response_buffer.0,
                    retry_budget,
                }),
            );
        }
        let routes = config
            .routes
            .iter()
            .map(|r| {
                let name = r.name.clone().unwrap_or_else(|| {
                    let host = if r.host == "*" { "" } else { r.host.as_str() };
                    format!("{host}{}", r.path_prefix)
                });
                Route {
                    metrics: RouteMetrics::new(metrics, &name, &r.upstream),
                    name,
                    host: HostMatch::parse(&r.host),
                    prefix: r.path_prefix.clone(),
                    upstream: upstreams[&r.upstream].clone(),
                }
            })
            .collect();
        Ok(State {
            config,
            discovered: prev.map(|p| p.discovered.clone()).unwrap_or_default(),
            routes,
            upstreams,
            tasks: CancellationToken::new(),
        })
    }

    /// Starts this state's background tasks: discovery, health checks, and
    /// each dispatcher's waker (queues re-examined when an ejection expires
    /// or a slow start steps up).
    pub fn start(&self, handle: &Arc<arc_swap::ArcSwap<State>>, metrics: &Arc<Metrics>) {
        for up in self.upstreams.values() {
            if let Some(d) = &up.cfg.dns {
                tokio::spawn(crate::discovery::dns::run(
                    up.name.clone(),
                    d.clone(),
                    handle.clone(),
                    self.discovered.clone(),
                    metrics.clone(),
                    self.tasks.clone(),
                ));
            }
            if let Some(hc) = &up.cfg.health_check {
                let (targets, kicked) = (up.clone(), up.clone());
                let checker = crate::health::active::Checker {
                    upstream: up.name.clone(),
                    cfg: hc.clone(),
                    client: up.client.clone(),
                    metrics: up.metrics.clone(),
                    targets: Box::new(move || targets.dispatcher.backends()),
                    on_change: Box::new(move || kicked.dispatcher.kick()),
                };
                tokio::spawn(crate::health::active::run(checker, self.tasks.clone()));
            }
            tokio::spawn(up.dispatcher.clone().run_waker(self.tasks.clone()));
        }
    }

    /// Asks every backend's `/healthz` (or the health check path) for its
    /// thread count once, before traffic, so an `auto` capacity is right from
    /// the first request. Backends that don't answer keep `default_capacity`.
    pub async fn probe_capacity(&self) {
        let mut set = tokio::task::JoinSet::new();
        for up in self.upstreams.values() {
            let path = up
                .cfg
                .health_check
                .as_ref()
                .map_or("/healthz".to_string(), |h| h.path.clone());
            for b in up.dispatcher.backends() {
                let (up, path) = (up.clone(), path.clone());
                set.spawn(async move {
                    let r = crate::health::probe(&up.client, b.addr, &path, Duration::from_secs(1))
                        .await;
                    if let Some(t) = r.threads {
                        b.report_threads(t);
                    }
                });
            }
        }
        while set.join_next().await.is_some() {}
    }

    /// The route for a request: the most specific host match (exact, then
    /// wildcard, then `*`), then the longest path prefix; the first listed
    /// wins a tie.
    pub fn route(&self, host: &str, path: &str) -> Option<&Route> {
        let host = match host.rsplit_once(':') {
            Some((h, p)) if p.chars().all(|c| c.is_ascii_digit()) => h,
            _ => host,
        };
        let mut best: Option<(&Route, (u8, usize))> = None;
        for r in &self.routes {
            if !r.host.matches(host) || !path.starts_with(&r.prefix) {
                continue;
            }
            let rank = match r.host {
                HostMatch::Exact(_) => 2,
                HostMatch::Suffix(_) => 1,
                HostMatch::Any => 0,
            };
            let score = (rank, r.prefix.len());
            if best.is_none_or(|(_, s)| score > s) {
                best = Some((r, score));
            }
        }
        best.map(|(r, _)| r)
    }

    /// Updates the per-backend gauges from live state (at scrape time).
    pub fn refresh_gauges(&self, metrics: &Metrics) {
        let now = std::time::Instant::now();
        for (name, up) in &self.upstreams {
            metrics
                .queue_depth
                .with_label_values(&[name])
                .set(up.dispatcher.queue_len() as i64);
            for b in up.dispatcher.backends() {
                let l = [name.as_str(), b.key.as_str()];
                metrics
                    .backend_in_flight
                    .with_label_values(&l)
                    .set(i64::from(b.in_flight()));
                metrics
                    .backend_capacity
                    .with_label_values(&l)
                    .set(i64::from(b.capacity()));
                metrics
                    .backend_up
                    .with_label_values(&l)
                    .set(i64::from(b.health.is_available(now)));
                metrics
                    .upgraded_connections
                    .with_label_values(&l)
                    .set(i64::from(b.upgraded()));
            }
        }
    }

    /// True when some upstream has a backend able to take requests.
    pub fn any_backend_available(&self) -> bool {
        let now = std::time::Instant::now();
        self.upstreams.values().any(|u| {
            u.dispatcher
                .backends()
                .iter()
                .any(|b| b.health.is_available(now))
        })
    }
}

/// Discovery publishes into the hot state through this.
impl crate::discovery::Live for arc_swap::ArcSwap<State> {
    fn publish(&self, upstream: &str, addrs: &[SocketAddr], fixed_capacity: Option<u32>) {
        if let Some(up) = self.load().upstreams.get(upstream) {
            apply_dynamic(up, addrs, fixed_capacity);
        }
    }

    fn backend(&self, upstream: &str, addr: SocketAddr) -> Option<Arc<Backend>> {
        let state = self.load();
        let up = state.upstreams.get(upstream)?;
        up.dispatcher
            .backends()
            .into_iter()
            .find(|b| b.addr == addr)
    }
}

/// Applies a new set of dynamic (DNS or fleet) addresses to a live upstream:
/// static backends stay, new addresses join with slow start, vanished ones
/// leave (their in-flight requests finish on the objects their slots hold).
pub fn apply_dynamic(up: &Upstream, addrs: &[SocketAddr], fixed: Option<u32>) {
    let current = up.dispatcher.backends();
    let statics: Vec<SocketAddr> = up
        .cfg
        .backends
        .iter()
        .filter_map(|b| resolve_addr(&b.address).ok())
        .collect();
    let mut next: Vec<Arc<Backend>> = current
        .iter()
        .filter(|b| statics.contains(&b.addr) || addrs.contains(&b.addr))
        .cloned()
        .collect();
    for a in addrs {
        if !next.iter().any(|b| b.addr == *a) {
            let b = Backend::new(*a, 1, fixed, up.cfg.default_capacity)
                .with_slow_start(up.cfg.slow_start.0);
            b.set_share(up.cfg.proxy_replicas);
            b.attach_metrics(|| BackendMetrics::new(&up.metrics, &up.name, &b.key));
            b.start_slow();
            up.metrics.init_backend(&up.name, &b.key);
            next.push(Arc::new(b));
        }
    }
    for b in &current {
        if !next.iter().any(|n| Arc::ptr_eq(n, b)) {
            up.metrics.forget_backend(&up.name, &b.key);
        }
    }
    up.dispatcher.set_backends(next);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(yaml: &str) -> State {
        let c = crate::config::parse(yaml, "t").unwrap();
        State::build(c, None, &FleetAddrs::new(), &Arc::new(Metrics::new())).unwrap()
    }

    const Y: &str = r#"
listeners: [{ name: p, address: "127.0.0.1:1" }]
routes:
  - { host: "*", path_prefix: /, upstream: a }
  - { host: "*", path_prefix: /api, upstream: b }
  - { host: "*.example.com", path_prefix: /, upstream: b }
  - { host: "admin.local", path_prefix: /, upstream: a, name: adm }
upstreams:
  a: { backends: [{ address: "127.0.0.1:2" }] }
  b: { backends: [{ address: "127.0.0.1:3" }, { address: "127.0.0.1:4" }] }
"#;

    #[tokio::test]
    async fn routes_by_host_and_longest_prefix() {
        let s = state(Y);
        assert_eq!(s.route("x", "/").unwrap().upstream.name, "a");
        assert_eq!(s.route("x", "/api/v1").unwrap().upstream.name, "b");
        assert_eq!(
            s.route("www.example.com:8080", "/z").unwrap().upstream.name,
            "b"
        );
        assert_eq!(s.route("example.com", "/z").unwrap().upstream.name, "a");
        assert_eq!(s.route("admin.local", "/").unwrap().name, "adm");
    }

    #[tokio::test]
    async fn rebuild_keeps_backend_objects_by_address() {
        let metrics = Arc::new(Metrics::new());
        let c = crate::config::parse(Y, "t").unwrap();
        let s1 = State::build(c, None, &FleetAddrs::new(), &metrics).unwrap();
        let b3 = s1.upstreams["b"].dispatcher.backends()[0].clone();
        b3.inc();
        let c2 = crate::config::parse(&Y.replace("127.0.0.1:4", "127.0.0.1:5"), "t").unwrap();
        let s2 = State::build(c2, Some(&s1), &FleetAddrs::new(), &metrics).unwrap();
        let now = s2.upstreams["b"].dispatcher.backends();
        assert!(Arc::ptr_eq(&now[0], &b3));
        assert_eq!(now[0].in_flight(), 1);
        assert_eq!(now[1].key, "127.0.0.1:5");
        assert!(Arc::ptr_eq(
            &s1.upstreams["b"].dispatcher,
            &s2.upstreams["b"].dispatcher
        ));
    }
}
