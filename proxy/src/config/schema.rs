//! The configuration's schema: every section of `usher.yaml` as a type.
//!
//! A section whose keys are all optional takes `#[serde(default)]` as a
//! whole, so its defaults are written once, in its `impl Default`, and a
//! missing key reads as the default's field. Sections with required keys
//! (a listener's `address`, a route's `upstream`) cannot have a `Default`;
//! their optional keys name a small `default_*` function instead. Every
//! field's doc comment says its default.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;

use super::units::{Dur, Size};

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Client listeners. At least one (checked by validation).
    pub listeners: Vec<ListenerConfig>,
    /// The admin server (metrics, status, reload). Default: none.
    pub admin: Option<AdminConfig>,
    /// At least one (checked by validation).
    pub routes: Vec<RouteConfig>,
    pub upstreams: BTreeMap<String, UpstreamConfig>,
    pub limits: Limits,
    pub timeouts: ClientTimeouts,
    pub access_log: AccessLogConfig,
}

// ---------------------------------------------------------------------------
// Listeners.

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    pub name: String,
    pub address: String,
    /// Most client connections open at once; past it, new connections wait
    /// in the kernel's accept backlog. Default 10000.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Serve HTTPS (HTTP/1.1 and h2 by ALPN) on this listener. Default: off,
    /// plain HTTP/1.1 and h2c.
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// HTTP/2 limits for this listener's clients.
    #[serde(default)]
    pub http2: Http2Config,
    /// Answer every request with `308 Permanent Redirect` to the same host
    /// and path on `https://` instead of proxying it. Only on a plain
    /// listener. Default false.
    #[serde(default)]
    pub redirect_to_https: bool,
    /// The port put in a redirect's `Location` (left out when 443).
    /// Default 443.
    #[serde(default = "default_https_port")]
    pub https_port: u16,
}

fn default_max_connections() -> usize {
    10_000
}
fn default_https_port() -> u16 {
    443
}

/// TLS on a client listener (see `tls.rs`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// Certificates, chosen by the client's SNI. At least one.
    pub certificates: Vec<CertConfig>,
    /// Served when the client sends no SNI or a name no certificate has.
    /// Default: the first of `certificates`.
    #[serde(default)]
    pub default: Option<CertConfig>,
    /// Longest time a client may take to finish the TLS handshake. Default 10s.
    #[serde(default = "default_handshake_timeout")]
    pub handshake_timeout: Dur,
    /// `Strict-Transport-Security` value added to every response, e.g.
    /// `max-age=31536000; includeSubDomains`. Default: none.
    #[serde(default)]
    pub hsts: Option<String>,
}

fn default_handshake_timeout() -> Dur {
    Dur::secs(10)
}

/// A certificate and its key, as PEM files. Relative paths are relative to
/// the config file's directory.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertConfig {
    /// The certificate, followed by its intermediate chain.
    pub cert: PathBuf,
    /// The private key: PKCS#8, PKCS#1 (RSA) or SEC1 (EC).
    pub key: PathBuf,
    /// Host names this certificate serves: exact (`www.example.com`) or
    /// wildcard (`*.example.com`). Default: the DNS names in the
    /// certificate's subjectAltName.
    #[serde(default)]
    pub names: Option<Vec<String>>,
}

/// HTTP/2 server limits, per listener. The defaults follow hyper/h2 and
/// nginx; they bound what one client connection can make Usher hold.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Http2Config {
    /// Streams one connection may have open at once (SETTINGS_MAX_CONCURRENT_STREAMS).
    /// Default 250.
    pub max_concurrent_streams: u32,
    /// Largest decoded request header list (SETTINGS_MAX_HEADER_LIST_SIZE);
    /// larger ones are refused with 431 / REFUSED_STREAM, and far larger ones
    /// close the connection. Default 64KiB.
    pub max_header_list_size: Size,
    /// Interval of PING frames on an idle connection; `0s` turns them off. Default 20s.
    pub keepalive_interval: Dur,
    /// A connection whose PING is not answered within this is closed. Default 20s.
    pub keepalive_timeout: Dur,
    /// Rapid-reset protection (CVE-2023-44487): streams the client opened and
    /// reset before Usher accepted them, allowed at once; past it the
    /// connection gets GOAWAY `ENHANCE_YOUR_CALM`. Default 20.
    pub max_pending_accept_reset_streams: usize,
    /// Streams Usher itself reset for protocol errors, allowed per
    /// connection before GOAWAY. Default 1024.
    pub max_local_error_reset_streams: usize,
}

impl Default for Http2Config {
    fn default() -> Self {
        Http2Config {
            max_concurrent_streams: 250,
            max_header_list_size: Size(64 << 10),
            keepalive_interval: Dur::secs(20),
            keepalive_timeout: Dur::secs(20),
            max_pending_accept_reset_streams: 20,
            max_local_error_reset_streams: 1024,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    pub address: String,
}

// ---------------------------------------------------------------------------
// Routes.

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// `*` (any), an exact host, or `*.example.com`. Default `*`.
    #[serde(default = "default_host")]
    pub host: String,
    /// Default `/`.
    #[serde(default = "default_path_prefix")]
    pub path_prefix: String,
    pub upstream: String,
    /// Name used in metrics and logs. Default `host+prefix`.
    #[serde(default)]
    pub name: Option<String>,
}

fn default_host() -> String {
    "*".into()
}
fn default_path_prefix() -> String {
    "/".into()
}

// ---------------------------------------------------------------------------
// Upstreams.

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
    /// Deployment's replicas in Kubernetes). Each replica takes its share of
    /// every backend's threads, `ceil(capacity / proxy_replicas)`: exact when
    /// the replicas divide the threads; otherwise together they may hold up
    /// to `proxy_replicas - 1` more than a worker has. Default 1.
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
        struct V;
        impl Visitor<'_> for V {
            type Value = MaxInFlight;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("`auto` or a positive number")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<MaxInFlight, E> {
                if v == "auto" {
                    Ok(MaxInFlight::Auto)
                } else {
                    Err(E::custom(format!("expected `auto` or a number, got `{v}`")))
                }
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<MaxInFlight, E> {
                match u32::try_from(v) {
                    Ok(n) if n > 0 => Ok(MaxInFlight::Fixed(n)),
                    _ => Err(E::custom("max_in_flight must be between 1 and 2^32-1")),
                }
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<MaxInFlight, E> {
                u64::try_from(v)
                    .map_err(|_| E::custom("max_in_flight must be positive"))
                    .and_then(|v| self.visit_u64(v))
            }
        }
        d.deserialize_any(V)
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
}

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig {
            max_depth: 1024,
            timeout: Dur::secs(5),
            discipline: Discipline::default(),
            classify: Classify::default(),
        }
    }
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

// ---------------------------------------------------------------------------
// Limits, client timeouts, access log.

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Default 10MiB; larger bodies get 413.
    pub max_request_body: Size,
    /// Responses up to this size are read whole before the worker slot is
    /// released; larger ones stream and hold the slot. Default 4MiB.
    pub max_response_buffer: Size,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_request_body: Size(10 << 20),
            max_response_buffer: Size(4 << 20),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClientTimeouts {
    /// Time to receive a request head. Default 30s.
    pub client_header: Dur,
    /// Longest gap between two reads of a request body (408). Default 30s.
    pub client_body: Dur,
    /// Deadline for the whole request body, counted from the moment its head
    /// has arrived (408 when it passes); the head itself is bounded by
    /// `client_header`. A client trickling one byte per `client_body` gap
    /// can hold a connection no longer than this. Default 60s (nginx's
    /// `client_body_timeout` default, there per read).
    pub client_request: Dur,
    /// Idle keep-alive connections are closed after this. Default 75s.
    pub client_keepalive: Dur,
    /// On SIGTERM, how long in-flight and queued requests may take. Default 30s.
    pub shutdown_grace: Dur,
}

impl Default for ClientTimeouts {
    fn default() -> Self {
        ClientTimeouts {
            client_header: Dur::secs(30),
            client_body: Dur::secs(30),
            client_request: Dur::secs(60),
            client_keepalive: Dur::secs(75),
            shutdown_grace: Dur::secs(30),
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AccessLogConfig {
    /// `json` (the default), `combined` or `off`.
    pub format: LogFormat,
    /// Append lines to this file instead of stdout (relative to the config
    /// file's directory); SIGUSR1 reopens it after logrotate renamed it.
    pub path: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    #[default]
    Json,
    Combined,
    Off,
}
