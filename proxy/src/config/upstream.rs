//! The `upstreams:` section of the schema: an upstream, its backends and
//! where they come from (static, fleet, DNS), its queue, health, retries,
//! timeouts, pool, TLS and upgrades.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;

use super::schema::CertConfig;
use super::units::Dur;

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UpstreamConfig {
    /// Processes Usher starts and supervises. Default: none.
    pub fleet: Option<FleetConfig>,
    /// Fixed backend addresses. Default: none.
    pub backends: Vec<BackendConfig>,
    /// Backends discovered by DNS. Default: none.
    pub dns: Option<DnsConfig>,
    /// Default `least_outstanding`.
    pub balance: Balance,
    /// A backend that comes back (or is added) ramps its capacity from 1 to
    /// full over this time. Default 0s (off).
    pub slow_start: Dur,
    /// Capacity of a backend with `max_in_flight: auto` that reports no load.
    /// Default 4 (waitress's default thread count).
    pub default_capacity: u32,
    /// How many Usher replicas send to these same backends (e.g. the
    /// Deployment's replicas in Kubernetes). Together they never hold more
    /// requests on a backend than it has threads: by the worker's load
    /// reports where it sends them, else a static split (see
    /// `dispatch/share.rs`). Default 1.
    pub proxy_replicas: u32,
    pub queue: QueueConfig,
    /// Active health checks. Default: none (only passive ejection).
    pub health_check: Option<HealthCheckConfig>,
    pub outlier: OutlierConfig,
    pub retries: RetryConfig,
    pub timeouts: UpstreamTimeouts,
    pub pool: PoolConfig,
    /// `http1` (the default) or `http2`: h2c, or h2 over `tls`.
    pub protocol: UpstreamProtocol,
    /// Talk TLS to the backends. Default: plain TCP.
    pub tls: Option<UpstreamTlsConfig>,
    /// WebSocket and other `Upgrade` connections to this upstream's backends.
    pub upgrades: UpgradesConfig,
    /// Stamp each forwarded request with `X-Request-Start: <ms since the
    /// epoch>` (when Usher finished reading it; replaces a client's value)
    /// and `X-Usher-Queue-Ms` (its wait in Usher's queue), so an APM agent
    /// or autoscaler in the app sees request queueing. Default true.
    pub request_start_header: bool,
    /// With `max_in_flight: auto`, learn per backend the number of requests
    /// at once past which its throughput stops rising (CPU-bound views under
    /// a GIL), and send no more than that; never above its threads (see
    /// `dispatch/learn.rs`). Default true.
    pub learn_concurrency: bool,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        UpstreamConfig {
            fleet: None,
            backends: Vec::new(),
            dns: None,
            balance: Balance::default(),
            slow_start: Dur::secs(0),
            default_capacity: 4,
            proxy_replicas: 1,
            queue: QueueConfig::default(),
            health_check: None,
            outlier: OutlierConfig::default(),
            retries: RetryConfig::default(),
            timeouts: UpstreamTimeouts::default(),
            pool: PoolConfig::default(),
            protocol: UpstreamProtocol::default(),
            tls: None,
            upgrades: UpgradesConfig::default(),
            request_start_header: true,
            learn_concurrency: true,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Balance {
    #[default]
    LeastOutstanding,
    RoundRobin,
    Random,
}

/// `max_in_flight: auto` or a number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MaxInFlight {
    /// Learn the capacity from the worker's `X-Usher-Load` report, falling back
    /// to the upstream's `default_capacity`.
    #[default]
    Auto,
    Fixed(u32),
}

impl MaxInFlight {
    /// The configured number, or `None` for `auto`.
    pub fn fixed(self) -> Option<u32> {
        match self {
            MaxInFlight::Fixed(n) => Some(n),
            MaxInFlight::Auto => None,
        }
    }
}

impl<'de> Deserialize<'de> for MaxInFlight {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let n = d.deserialize_any(AutoOrCount {
            expecting: "`auto` or a positive number",
            min: 1,
            out_of_range: "max_in_flight must be between 1 and 2^32-1",
            negative: "max_in_flight must be positive",
        })?;
        Ok(n.map_or(MaxInFlight::Auto, MaxInFlight::Fixed))
    }
}

/// `auto` (`None`) or a count of at least `min`, with the setting's own
/// messages: what `max_in_flight` and `queue.prefetch` take.
pub(crate) struct AutoOrCount {
    pub(crate) expecting: &'static str,
    pub(crate) min: u32,
    pub(crate) out_of_range: &'static str,
    pub(crate) negative: &'static str,
}

impl Visitor<'_> for AutoOrCount {
    type Value = Option<u32>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(self.expecting)
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Option<u32>, E> {
        if v == "auto" {
            Ok(None)
        } else {
            Err(E::custom(format!("expected `auto` or a number, got `{v}`")))
        }
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Option<u32>, E> {
        match u32::try_from(v) {
            Ok(n) if n >= self.min => Ok(Some(n)),
            _ => Err(E::custom(self.out_of_range)),
        }
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Option<u32>, E> {
        match u64::try_from(v) {
            Ok(v) => self.visit_u64(v),
            Err(_) => Err(E::custom(self.negative)),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendConfig {
    pub address: String,
    /// Default `auto`.
    #[serde(default)]
    pub max_in_flight: MaxInFlight,
    /// Relative weight among the upstream's backends. Default 1.
    #[serde(default = "default_weight")]
    pub weight: u32,
}

fn default_weight() -> u32 {
    1
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetConfig {
    /// The command; `{port}` in any argument is replaced by the process's port.
    /// `usher-worker` resolves to the binary next to `usher`, or to `usher worker`.
    pub command: Vec<String>,
    /// How many processes to run. Default 4.
    #[serde(default = "default_processes")]
    pub processes: u32,
    /// Ports are `base_port + i`. `0` picks free ephemeral ports. Default 0.
    #[serde(default)]
    pub base_port: u16,
    /// Host the processes listen on. Default 127.0.0.1.
    #[serde(default = "default_fleet_host")]
    pub host: String,
    /// Capacity of each process. Default `auto`.
    #[serde(default)]
    pub max_in_flight: MaxInFlight,
    /// Extra environment for the processes.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
}

fn default_processes() -> u32 {
    4
}
fn default_fleet_host() -> String {
    "127.0.0.1".into()
}

/// DNS discovery of backends (e.g. a Kubernetes headless Service).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DnsConfig {
    pub name: String,
    pub port: u16,
    /// How often the name is re-resolved. Default 5s.
    #[serde(default = "default_refresh")]
    pub refresh: Dur,
    /// A DNS server to ask (A and AAAA, over UDP with TCP when an answer is
    /// truncated) instead of the system resolver. Default: the system
    /// resolver.
    #[serde(default)]
    pub resolver: Option<SocketAddr>,
    /// Capacity of the discovered backends. Default `auto`.
    #[serde(default)]
    pub max_in_flight: MaxInFlight,
}

fn default_refresh() -> Dur {
    Dur::secs(5)
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct QueueConfig {
    /// Most requests waiting at once. Default 1024.
    pub max_depth: usize,
    /// Longest wait for a free slot. Default 5s.
    pub timeout: Dur,
    /// `shortest_first` (shortest expected service time first, with ageing;
    /// see `dispatch.rs`) or `fifo`. Default `shortest_first`.
    pub discipline: Discipline,
    /// What makes two requests "the same kind" for service-time estimates:
    /// `path` (the default) or `path_and_query`.
    pub classify: Classify,
    /// What the queue does past capacity: `codel` (the default) detects a
    /// standing queue, then serves the newest waiter first and sheds waiters
    /// older than `overload_target` with 503; `off` keeps the discipline and
    /// lets waiters wait up to `timeout`. See `dispatch/overload.rs`.
    pub overload: Overload,
    /// The wait that counts as "too long" while overloaded, and the shortest
    /// wait that, held for 5 `overload_interval`s in a row
    /// (`overload::STANDING_WINDOWS`), means overload. Default 100ms (a few
    /// short views of a threaded app).
    pub overload_target: Dur,
    /// The window over which the shortest wait is taken; 5 standing windows in
    /// a row are an overload. Default 200ms.
    pub overload_interval: Dur,
    /// While requests are queued, how many more than its capacity a backend
    /// may hold, waiting in the worker's own queue so that a freed thread
    /// finds its next request at once (RabbitMQ's `prefetch_count`): `auto`
    /// (the default: 1, or 0 under `proxy_replicas > 1`), 0 (a strict cap)
    /// or N (at most one per thread counts). The extra request goes only to
    /// a backend whose next thread is expected to free within the request's
    /// own expected service time; see `dispatch/prefetch.rs`.
    pub prefetch: Prefetch,
}

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig {
            max_depth: 1024,
            timeout: Dur::secs(5),
            discipline: Discipline::default(),
            classify: Classify::default(),
            overload: Overload::default(),
            overload_target: Dur(Duration::from_millis(100)),
            overload_interval: Dur(Duration::from_millis(200)),
            prefetch: Prefetch::default(),
        }
    }
}

/// `queue.prefetch: auto` or a number (0 is a strict cap).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Prefetch {
    /// 1 where it pays and is safe, 0 under `proxy_replicas > 1`.
    #[default]
    Auto,
    Fixed(u32),
}

impl<'de> Deserialize<'de> for Prefetch {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let n = d.deserialize_any(AutoOrCount {
            expecting: "`auto` or a number (0 for none)",
            min: 0,
            out_of_range: "prefetch must be between 0 and 2^32-1",
            negative: "prefetch must not be negative",
        })?;
        Ok(n.map_or(Prefetch::Auto, Prefetch::Fixed))
    }
}

/// Overload control of the queue (`queue.overload`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Overload {
    /// CoDel detection with adaptive LIFO and shedding of stale waiters.
    #[default]
    Codel,
    /// Never shed: waiters wait up to `queue.timeout` in discipline order.
    Off,
}

/// The order in which waiting requests get free slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Discipline {
    /// First come, first served.
    Fifo,
    /// Shortest expected service time first, with ageing: a request's place
    /// is `enqueued_at + expected_service_time`, so a long request that has
    /// waited as long as it is expected to run goes ahead of a newly arrived
    /// short one. Nothing starves; short requests stop queueing behind long
    /// ones. The default: in `bench/threaded.sh` at 98% load it cut the
    /// short-request p99 from ~210 ms (FIFO) to ~86 ms.
    #[default]
    ShortestFirst,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Classify {
    #[default]
    Path,
    PathAndQuery,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HealthCheckConfig {
    /// Default `/healthz`.
    pub path: String,
    /// Default 2s.
    pub interval: Dur,
    /// Default 1s.
    pub timeout: Dur,
    /// Consecutive successes to become up. Default 2.
    pub rise: u32,
    /// Consecutive failures to become down. Default 3.
    pub fall: u32,
    /// The probe's `Host`. Default: the backend's `ip:port`. Set it when the
    /// app checks the host (Django's `ALLOWED_HOSTS` answers any other host
    /// 400, so every probe would fail).
    pub host: Option<String>,
    /// Extra request headers for the probe. Default none.
    pub headers: BTreeMap<String, String>,
    /// Status codes that pass: codes and ranges, e.g. `[200, "200-299", 301]`.
    /// Default 200-399.
    pub expect: Vec<StatusRange>,
}

impl Default for HealthCheckConfig {
    fn default() -> Self {
        HealthCheckConfig {
            path: "/healthz".into(),
            interval: Dur::secs(2),
            timeout: Dur::secs(1),
            rise: 2,
            fall: 3,
            host: None,
            headers: BTreeMap::new(),
            expect: vec![StatusRange(200, 399)],
        }
    }
}

impl HealthCheckConfig {
    /// Whether `status` passes `expect`.
    pub fn accepts(&self, status: u16) -> bool {
        self.expect.iter().any(|r| r.0 <= status && status <= r.1)
    }

    /// `expect` as the config spells it, for messages: `200-399`.
    pub fn expect_text(&self) -> String {
        let parts: Vec<String> = self
            .expect
            .iter()
            .map(|r| {
                if r.0 == r.1 {
                    r.0.to_string()
                } else {
                    format!("{}-{}", r.0, r.1)
                }
            })
            .collect();
        parts.join(", ")
    }
}

/// An inclusive range of status codes, written `200` or `"200-299"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatusRange(pub u16, pub u16);

impl<'de> Deserialize<'de> for StatusRange {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Code(u64),
            Text(String),
        }
        let bad = || {
            serde::de::Error::custom(
                "expected a status code or a range like \"200-299\" (codes 100-599)",
            )
        };
        let code = |n: u64| u16::try_from(n).ok().filter(|c| (100..=599).contains(c));
        let (lo, hi) = match Raw::deserialize(d)? {
            Raw::Code(n) => (code(n).ok_or_else(bad)?, code(n).ok_or_else(bad)?),
            Raw::Text(t) => {
                let (a, b) = t.split_once('-').unwrap_or((&t, &t));
                let p = |s: &str| s.trim().parse::<u64>().ok().and_then(code);
                (p(a).ok_or_else(bad)?, p(b).ok_or_else(bad)?)
            }
        };
        if lo > hi {
            return Err(bad());
        }
        Ok(StatusRange(lo, hi))
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetryConfig {
    /// Extra attempts after the first. Default 2.
    pub attempts: u32,
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig { attempts: 2 }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UpstreamTimeouts {
    /// Default 2s.
    pub connect: Dur,
    /// Time for the backend to answer in full (head and buffered body). Default 60s.
    pub response: Dur,
}

impl Default for UpstreamTimeouts {
    fn default() -> Self {
        UpstreamTimeouts {
            connect: Dur::secs(2),
            response: Dur::secs(60),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PoolConfig {
    /// Idle keep-alive connections are closed after this. Keep it below the
    /// backend's own keep-alive timeout (gunicorn: 2s). Default 1s.
    pub idle_timeout: Dur,
    /// Idle connections kept per backend. Default 64.
    pub max_idle_per_backend: usize,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            idle_timeout: Dur::secs(1),
            max_idle_per_backend: 64,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OutlierConfig {
    /// Consecutive gateway failures that eject a backend. Default 5.
    pub consecutive_failures: u32,
    /// Ejection time is `base_ejection × times_ejected`. Default 5s.
    pub base_ejection: Dur,
    /// Cap on one ejection. Default 60s.
    pub max_ejection: Dur,
    /// At most this share of an upstream is ejected at once. Default 50.
    pub max_ejected_percent: u32,
}

impl Default for OutlierConfig {
    fn default() -> Self {
        OutlierConfig {
            consecutive_failures: 5,
            base_ejection: Dur::secs(5),
            max_ejection: Dur::secs(60),
            max_ejected_percent: 50,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum UpstreamProtocol {
    #[default]
    Http1,
    Http2,
}

/// TLS to the backends of one upstream.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamTlsConfig {
    /// PEM file of the CA certificates that sign the backends' certificates.
    pub ca: PathBuf,
    /// Name checked against the backend's certificate and sent as SNI.
    /// Default: the backend's address (an IP address must then be in the
    /// certificate's subjectAltName).
    #[serde(default)]
    pub server_name: Option<String>,
    /// A client certificate for backends that require one. Default: none.
    #[serde(default)]
    pub client_cert: Option<CertConfig>,
}

/// How upgraded (WebSocket) connections are admitted.
///
/// An upgraded connection can live for hours. By default it does not take
/// one of the backend's request slots (a thread): most WebSocket servers
/// serve sockets on an event loop, and a socket holding a slot for hours
/// would starve ordinary requests. It counts against `max_upgraded`
/// instead. Set `hold_slot: true` for threaded backends whose WebSocket
/// handler really occupies a thread for the socket's whole life; the
/// upgrade then waits in the queue like a request and keeps the slot until
/// the socket closes.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UpgradesConfig {
    /// Upgraded connections open at once per backend; past it on every
    /// backend, new ones get 503. Default 1024.
    pub max_upgraded: u32,
    /// Hold a request slot for the life of the upgraded connection. Default false.
    pub hold_slot: bool,
    /// An upgraded connection that carries no bytes either way for this
    /// long is closed. Default 1h; `0s` means never.
    pub idle_timeout: Dur,
}

impl Default for UpgradesConfig {
    fn default() -> Self {
        UpgradesConfig {
            max_upgraded: 1024,
            hold_slot: false,
            idle_timeout: Dur::secs(3600),
        }
    }
}
