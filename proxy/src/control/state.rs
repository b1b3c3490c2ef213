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

use crate::config::{resolve_addr, Config, UpstreamConfig};
use crate::discovery::Gates;
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
    /// The fleet processes' gates (is each accepting connections yet?),
    /// shared with the fleets and carried across reloads: a backend built
    /// for a fleet address follows its gate.
    pub gates: Gates,
    pub routes: Vec<Route>,
    pub upstreams: HashMap<String, Arc<Upstream>>,
    /// Cancels this state's background tasks (health checks) when replaced.
    pub tasks: CancellationToken,
}

/// What a built state will change on live objects it shares with the
/// running one (a kept dispatcher's limits and backend set, a kept
/// backend's weight and capacity, metric series). Nothing of it happens in
/// [`State::build`], so a build that fails halfway leaves the running state
/// untouched; [`Commit::apply`] runs once the new state is swapped in.
#[derive(Default)]
#[must_use = "a built state's changes to live objects apply only on commit"]
pub struct Commit(Vec<Box<dyn FnOnce() + Send>>);

impl Commit {
    fn then(&mut self, f: impl FnOnce() + Send + 'static) {
        self.0.push(Box::new(f));
    }

    /// Applies the changes, in the order they were planned.
    pub fn apply(self) {
        for f in self.0 {
            f();
        }
    }
}

/// One backend the new config wants: address, weight, `max_in_flight`.
type Wanted = (SocketAddr, u32, Option<u32>);

impl State {
    /// Builds a state, carrying over from `prev` by upstream name and backend
    /// address, without touching anything live: the changes to objects it
    /// shares with `prev` come back as a [`Commit`], to apply after the swap.
    /// Spawns nothing; call [`State::start`] once it is swapped in.
    pub fn build(
        config: Config,
        prev: Option<&State>,
        fleet: &FleetAddrs,
        metrics: &Arc<Metrics>,
    ) -> Result<(State, Commit), String> {
        let mut commit = Commit::default();
        let gates = prev.map(|p| p.gates.clone()).unwrap_or_default();
        let mut upstreams = HashMap::new();
        for (name, ucfg) in &config.upstreams {
            let up = build_upstream(
                name,
                ucfg,
                &config,
                prev,
                (fleet, &gates),
                metrics,
                &mut commit,
            )?;
            upstreams.insert(name.clone(), up);
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
        let state = State {
            config,
            discovered: prev.map(|p| p.discovered.clone()).unwrap_or_default(),
            gates,
            routes,
            upstreams,
            tasks: CancellationToken::new(),
        };
        Ok((state, commit))
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
    /// A fleet process not accepting yet is asked when it starts to, before
    /// it takes requests (see [`crate::discovery::Live::prepare`]).
    pub async fn probe_capacity(&self) {
        let mut set = tokio::task::JoinSet::new();
        for up in self.upstreams.values() {
            let spec = Arc::new(capacity_probe(up));
            for b in up.dispatcher.backends() {
                if b.health.is_accepting() {
                    set.spawn(ask_threads(up.clone(), spec.clone(), b));
                }
            }
        }
        while set.join_next().await.is_some() {}
    }

    /// The route for a request: the most specific host match (exact, then
    /// wildcard, then `*`), then the longest path prefix; the first listed
    /// wins a tie.
    pub fn route(&self, host: &str, path: &str) -> Option<&Route> {
        // Strips the port, scanning bytes: `rsplit_once` would run a char
        // searcher on every request.
        let host = match host.bytes().rposition(|b| b == b':') {
            Some(i) if host.as_bytes()[i + 1..].iter().all(u8::is_ascii_digit) => &host[..i],
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

/// The request that asks a backend for its thread count: the health
/// check's own (path, Host, headers) where there is one, since an app that
/// checks Host answers nothing else.
fn capacity_probe(up: &Upstream) -> crate::health::ProbeSpec {
    up.cfg.health_check.as_ref().map_or_else(
        || crate::health::ProbeSpec::plain("/healthz"),
        crate::health::ProbeSpec::new,
    )
}

/// Asks `b` for its thread count once; true if its capacity grew.
async fn ask_threads(
    up: Arc<Upstream>,
    spec: Arc<crate::health::ProbeSpec>,
    b: Arc<Backend>,
) -> bool {
    let r = crate::health::probe(&up.client, b.addr, &spec, Duration::from_secs(1)).await;
    r.load
        .is_some_and(|l| crate::health::Target::report_load(&*b, l))
}

/// The backends `ucfg` wants: static ones, then discovered and fleet
/// addresses not already listed.
fn wanted_backends(
    name: &str,
    ucfg: &UpstreamConfig,
    prev: Option<&State>,
    fleet: &FleetAddrs,
) -> Result<Vec<Wanted>, String> {
    let mut wanted: Vec<Wanted> = Vec::new();
    for b in &ucfg.backends {
        let addr = resolve_addr(&b.address).map_err(|e| format!("upstreams.{name}: {e}"))?;
        wanted.push((addr, b.weight, b.max_in_flight.fixed()));
    }
    let mut add = |addrs: &[SocketAddr], fixed: Option<u32>| {
        for a in addrs {
            if !wanted.iter().any(|w| w.0 == *a) {
                wanted.push((*a, 1, fixed));
            }
        }
    };
    if let Some(d) = &ucfg.dns {
        let discovered = prev
            .and_then(|p| p.discovered.lock().unwrap().get(name).cloned())
            .unwrap_or_default();
        add(&discovered, d.max_in_flight.fixed());
    }
    if let (Some(f), Some(addrs)) = (&ucfg.fleet, fleet.get(name)) {
        add(addrs, f.max_in_flight.fixed());
    }
    Ok(wanted)
}

/// One upstream of a new state: the previous upstream's dispatcher, retry
/// budget and backend objects where they exist (their reconfiguration goes
/// into `commit`), new ones otherwise. A new backend for a fleet address
/// follows the process's gate, so it is down until the process accepts.
fn build_upstream(
    name: &str,
    ucfg: &UpstreamConfig,
    config: &Config,
    prev: Option<&State>,
    (fleet, gates): (&FleetAddrs, &Gates),
    metrics: &Arc<Metrics>,
    commit: &mut Commit,
) -> Result<Arc<Upstream>, String> {
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
    let wanted = wanted_backends(name, ucfg, prev, fleet)?;

    let (m, n) = (metrics.clone(), name.to_string());
    commit.then(move || m.init_upstream(&n));
    let (default_capacity, slow_start, share) = (
        ucfg.default_capacity,
        ucfg.slow_start.0,
        ucfg.proxy_replicas,
    );
    let mut backends: Vec<Arc<Backend>> = Vec::with_capacity(wanted.len());
    for &(addr, weight, fixed) in &wanted {
        if let Some(b) = old_backends.get(&addr) {
            let kept = b.clone();
            commit.then(move || {
                kept.reconfigure(weight, fixed, default_capacity);
                kept.set_slow_start(slow_start);
                kept.set_share(share);
            });
            backends.push(b.clone());
            continue;
        }
        let b = Backend::new(addr, weight, fixed, default_capacity).with_slow_start(slow_start);
        b.set_share(share);
        if ucfg.fleet.is_some() && fleet.get(name).is_some_and(|f| f.contains(&addr)) {
            b.health.follow(gates.gate(addr));
        }
        b.attach_metrics(|| BackendMetrics::new(metrics, name, &b.key));
        if prev.is_some() {
            // Added while serving: ramp up gently.
            b.start_slow();
        }
        let (m, n, k) = (metrics.clone(), name.to_string(), b.key.clone());
        commit.then(move || m.init_backend(&n, &k));
        backends.push(Arc::new(b));
    }
    for (addr, b) in &old_backends {
        if !wanted.iter().any(|w| w.0 == *addr) {
            let (m, n, k) = (metrics.clone(), name.to_string(), b.key.clone());
            commit.then(move || m.forget_backend(&n, &k));
        }
    }

    let q = &ucfg.queue;
    let overload = (q.overload == crate::config::Overload::Codel).then_some(
        crate::dispatch::overload::Settings {
            target: q.overload_target.0,
            interval: q.overload_interval.0,
        },
    );
    let prefetch = crate::dispatch::prefetch::Policy::new(q.prefetch, ucfg.proxy_replicas);
    let dispatcher = match old {
        Some(u) => {
            let d = u.dispatcher.clone();
            let (balance, depth, timeout, discipline) =
                (ucfg.balance, q.max_depth, q.timeout.0, q.discipline);
            commit.then(move || {
                d.set_limits(balance, depth, timeout);
                d.set_discipline(discipline);
                d.set_overload(overload);
                d.set_prefetch(prefetch);
                d.set_backends(backends);
            });
            u.dispatcher.clone()
        }
        None => {
            let d = Dispatcher::new(
                backends,
                ucfg.balance,
                q.max_depth,
                q.timeout.0,
                QueueMetrics {
                    depth: metrics.queue_depth.with_label_values(&[name]),
                    wait: metrics.queue_wait.with_label_values(&[name]),
                    rejected_full: metrics.queue_rejections.with_label_values(&[name, "full"]),
                    rejected_timeout: metrics
                        .queue_rejections
                        .with_label_values(&[name, "timeout"]),
                    rejected_overload: metrics
                        .queue_rejections
                        .with_label_values(&[name, "overload"]),
                },
            );
            d.set_discipline(q.discipline);
            d.set_overload(overload);
            d.set_prefetch(prefetch);
            d
        }
    };
    let retry_budget = old
        .map(|u| u.retry_budget.clone())
        .unwrap_or_else(|| Arc::new(RetryBudget::new(0.2, 10.0)));
    Ok(Arc::new(Upstream {
        name: name.to_string(),
        cfg: ucfg.clone(),
        dispatcher,
        client: build_client(ucfg),
        pool: crate::upstream::pool::Pool::new(
            crate::tls::connector::UpstreamConnector::new(ucfg),
            ucfg.pool.idle_timeout.0,
            ucfg.pool.max_idle_per_backend,
        ),
        connector: crate::tls::connector::UpstreamConnector::new(ucfg),
        metrics: metrics.clone(),
        max_response_buffer: config.limits.max_response_buffer.0,
        retry_budget,
    }))
}

/// Discovery publishes into the hot state through this.
impl crate::discovery::Live for arc_swap::ArcSwap<State> {
    fn publish(&self, upstream: &str, addrs: &[SocketAddr], fixed_capacity: Option<u32>) {
        let state = self.load();
        if let Some(up) = state.upstreams.get(upstream) {
            apply_dynamic(up, addrs, fixed_capacity, &state.gates);
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

    fn prepare(&self, upstream: &str, addr: SocketAddr) -> crate::discovery::Pending {
        let state = self.load_full();
        let Some(up) = state.upstreams.get(upstream).cloned() else {
            return Box::pin(async {});
        };
        // A process a rolling restart adds has no backend yet: it joins with
        // slow start and reports its threads on its responses.
        let Some(b) = up
            .dispatcher
            .backends()
            .into_iter()
            .find(|b| b.addr == addr)
        else {
            return Box::pin(async {});
        };
        // Its thread count, as [`State::probe_capacity`] asks at startup.
        let spec = Arc::new(capacity_probe(&up));
        Box::pin(async move {
            ask_threads(up, spec, b).await;
        })
    }

    fn opened(&self, upstream: &str, _addr: SocketAddr) {
        if let Some(up) = self.load().upstreams.get(upstream) {
            up.dispatcher.kick();
        }
    }
}

/// Applies a new set of dynamic (DNS or fleet) addresses to a live upstream:
/// static backends stay, new addresses join with slow start (a fleet
/// process's behind its gate), vanished ones leave (their in-flight requests
/// finish on the objects their slots hold).
pub fn apply_dynamic(up: &Upstream, addrs: &[SocketAddr], fixed: Option<u32>, gates: &Gates) {
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
            if let Some(gate) = gates.find(*a) {
                b.health.follow(gate);
            }
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
        let (s, commit) =
            State::build(c, None, &FleetAddrs::new(), &Arc::new(Metrics::new())).unwrap();
        commit.apply();
        s
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
        let (s1, commit) = State::build(c, None, &FleetAddrs::new(), &metrics).unwrap();
        commit.apply();
        let b3 = s1.upstreams["b"].dispatcher.backends()[0].clone();
        b3.inc();
        let c2 = crate::config::parse(&Y.replace("127.0.0.1:4", "127.0.0.1:5"), "t").unwrap();
        let (s2, commit) = State::build(c2, Some(&s1), &FleetAddrs::new(), &metrics).unwrap();
        commit.apply();
        let now = s2.upstreams["b"].dispatcher.backends();
        assert!(Arc::ptr_eq(&now[0], &b3));
        assert_eq!(now[0].in_flight(), 1);
        assert_eq!(now[1].key, "127.0.0.1:5");
        assert!(Arc::ptr_eq(
            &s1.upstreams["b"].dispatcher,
            &s2.upstreams["b"].dispatcher
        ));
    }

    #[tokio::test]
    async fn a_build_that_fails_on_a_later_upstream_changes_nothing_live() {
        let metrics = Arc::new(Metrics::new());
        let c = crate::config::parse(Y, "t").unwrap();
        let (s1, commit) = State::build(c, None, &FleetAddrs::new(), &metrics).unwrap();
        commit.apply();
        let a = s1.upstreams["a"].dispatcher.backends()[0].clone();
        assert_eq!(a.capacity(), 4);
        // `a` (built first) gets a fixed capacity and a new backend; `b`
        // (built after it) has an address that cannot resolve.
        let yaml = Y.replace(
            r#"a: { backends: [{ address: "127.0.0.1:2" }] }"#,
            r#"a: { backends: [{ address: "127.0.0.1:2", max_in_flight: 1 }, { address: "127.0.0.1:9" }] }"#,
        );
        let mut c2 = crate::config::parse(&yaml, "t").unwrap();
        c2.upstreams.get_mut("b").unwrap().backends[0].address = "no port".into();
        assert!(State::build(c2.clone(), Some(&s1), &FleetAddrs::new(), &metrics).is_err());
        assert_eq!(a.capacity(), 4, "capacity of a live backend changed");
        assert_eq!(s1.upstreams["a"].dispatcher.backends().len(), 1);
        // A build that succeeds changes them only on commit.
        c2.upstreams.get_mut("b").unwrap().backends[0].address = "127.0.0.1:3".into();
        let (_s2, commit) = State::build(c2, Some(&s1), &FleetAddrs::new(), &metrics).unwrap();
        assert_eq!(a.capacity(), 4);
        assert_eq!(s1.upstreams["a"].dispatcher.backends().len(), 1);
        commit.apply();
        assert_eq!(a.capacity(), 1);
        assert_eq!(s1.upstreams["a"].dispatcher.backends().len(), 2);
    }

    #[tokio::test]
    async fn a_fleet_backend_is_down_until_its_process_accepts() {
        let yaml = r#"
listeners: [{ name: p, address: "127.0.0.1:1" }]
routes: [{ upstream: f }]
upstreams:
  f: { fleet: { command: [usher-worker, --listen, "127.0.0.1:{port}"], processes: 1 } }
"#;
        let metrics = Arc::new(Metrics::new());
        let addr: SocketAddr = "127.0.0.1:7001".parse().unwrap();
        let fleet = FleetAddrs::from([("f".to_string(), vec![addr])]);
        let c = crate::config::parse(yaml, "t").unwrap();
        let (s1, commit) = State::build(c.clone(), None, &fleet, &metrics).unwrap();
        commit.apply();
        assert!(!s1.any_backend_available(), "up before its process accepts");

        // The fleet, started after the state, finds the same gate.
        let gate = s1.gates.gate(addr);
        assert!(gate.open());
        assert!(s1.any_backend_available());

        // A reload keeps the backend and its gate.
        let (s2, commit) = State::build(c, Some(&s1), &fleet, &metrics).unwrap();
        commit.apply();
        gate.close();
        assert!(!s2.any_backend_available(), "an exited process still up");

        // A process a rolling restart adds follows its own gate.
        let next: SocketAddr = "127.0.0.1:7002".parse().unwrap();
        let next_gate = s2.gates.gate(next);
        apply_dynamic(&s2.upstreams["f"], &[next], None, &s2.gates);
        assert!(!s2.any_backend_available());
        next_gate.open();
        assert!(s2.any_backend_available());
    }
}
