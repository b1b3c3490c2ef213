//! The YAML configuration: its schema, its defaults and its validation.
//!
//! The schema here is the truth; `DESIGN.md` only sketches it. Every struct
//! denies unknown keys, because a misspelt key that is silently ignored is the
//! most expensive kind of configuration bug. Every error names the file, the
//! line and the key, like `nginx -t`.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;

/// The embedded default configuration (`config/usher.yaml`).
pub const DEFAULT_CONFIG: &str = include_str!("../../../config/usher.yaml");
/// The name used for the embedded default in error messages.
pub const DEFAULT_CONFIG_NAME: &str = "<embedded config/usher.yaml>";

/// A configuration problem, with where it was found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: String,
    pub line: Option<usize>,
    pub column: Option<usize>,
    /// The key path, e.g. `upstreams.app.queue.max_depth`.
    pub key: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file)?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
            if let Some(col) = self.column {
                write!(f, ":{col}")?;
            }
        }
        if self.key.is_empty() {
            write!(f, ": {}", self.message)
        } else {
            write!(f, ": {}: {}", self.key, self.message)
        }
    }
}

impl std::error::Error for ConfigError {}

/// A duration written with a unit: `250ms`, `5s`, `2m`, `1h`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dur(pub Duration);

impl Dur {
    pub const fn secs(s: u64) -> Self {
        Dur(Duration::from_secs(s))
    }
}

/// Parses `250ms`, `5s`, `2m`, `1h`, `1.5s`. A bare number is refused: the
/// unit is what makes a config readable.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .ok_or_else(|| format!("duration `{s}` needs a unit (ms, s, m or h), e.g. `5s`"))?;
    let (num, unit) = s.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a duration (expected e.g. 250ms, 5s, 2m)"))?;
    let secs = match unit.trim() {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        other => {
            return Err(format!(
                "unknown duration unit `{other}` in `{s}` (use ms, s, m or h)"
            ))
        }
    };
    if !secs.is_finite() || secs > 365.0 * 86400.0 {
        return Err(format!("duration `{s}` is out of range"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Parses `10MiB`, `64KiB`, `1GiB`, `512B`, `10MB`, or a plain number of bytes.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a size (expected e.g. 64KiB, 10MiB)"))?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" | "K" | "k" => 1 << 10,
        "MiB" | "M" => 1 << 20,
        "GiB" | "G" => 1 << 30,
        "KB" | "kB" => 1000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        other => {
            return Err(format!(
                "unknown size unit `{other}` in `{s}` (use B, KiB, MiB or GiB)"
            ))
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("size `{s}` is out of range"))
}

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Dur;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a duration with a unit, like 250ms, 5s or 2m")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Dur, E> {
                parse_duration(v).map(Dur).map_err(E::custom)
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Dur, E> {
                Err(E::custom(format!(
                    "duration `{v}` needs a unit (ms, s, m or h), e.g. `{v}s`"
                )))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Dur, E> {
                Err(E::custom(format!("duration `{v}` needs a unit, e.g. `5s`")))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Dur, E> {
                Err(E::custom(format!("duration `{v}` needs a unit, e.g. `5s`")))
            }
        }
        d.deserialize_any(V)
    }
}

/// A size in bytes, written `10MiB`, `64KiB` or as a number of bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Size(pub u64);

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Size;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a size like 64KiB or 10MiB")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Size, E> {
                parse_size(v).map(Size).map_err(E::custom)
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Size, E> {
                Ok(Size(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Size, E> {
                u64::try_from(v)
                    .map(Size)
                    .map_err(|_| E::custom("a size cannot be negative"))
            }
        }
        d.deserialize_any(V)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub listeners: Vec<ListenerConfig>,
    #[serde(default)]
    pub admin: Option<AdminConfig>,
    #[serde(default)]
    pub routes: Vec<RouteConfig>,
    #[serde(default)]
    pub upstreams: BTreeMap<String, UpstreamConfig>,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub timeouts: ClientTimeouts,
    #[serde(default)]
    pub access_log: AccessLogConfig,
}

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
#[serde(deny_unknown_fields)]
pub struct Http2Config {
    /// Streams one connection may have open at once (SETTINGS_MAX_CONCURRENT_STREAMS).
    /// Default 250.
    #[serde(default = "default_h2_streams")]
    pub max_concurrent_streams: u32,
    /// Largest decoded request header list (SETTINGS_MAX_HEADER_LIST_SIZE);
    /// larger ones are refused with 431 / REFUSED_STREAM, and far larger ones
    /// close the connection. Default 64KiB.
    #[serde(default = "default_h2_header_list")]
    pub max_header_list_size: Size,
    /// Interval of PING frames on an idle connection; `0s` turns them off. Default 20s.
    #[serde(default = "default_h2_ping")]
    pub keepalive_interval: Dur,
    /// A connection whose PING is not answered within this is closed. Default 20s.
    #[serde(default = "default_h2_ping")]
    pub keepalive_timeout: Dur,
    /// Rapid-reset protection (CVE-2023-44487): streams the client opened and
    /// reset before Usher accepted them, allowed at once; past it the
    /// connection gets GOAWAY `ENHANCE_YOUR_CALM`. Default 20.
    #[serde(default = "default_h2_pending_resets")]
    pub max_pending_accept_reset_streams: usize,
    /// Streams Usher itself reset for protocol errors, allowed per
    /// connection before GOAWAY. Default 1024.
    #[serde(default = "default_h2_local_resets")]
    pub max_local_error_reset_streams: usize,
}

fn default_h2_streams() -> u32 {
    250
}
fn default_h2_header_list() -> Size {
    Size(64 << 10)
}
fn default_h2_ping() -> Dur {
    Dur::secs(20)
}
fn default_h2_pending_resets() -> usize {
    20
}
fn default_h2_local_resets() -> usize {
    1024
}

impl Default for Http2Config {
    fn default() -> Self {
        Http2Config {
            max_concurrent_streams: default_h2_streams(),
            max_header_list_size: default_h2_header_list(),
            keepalive_interval: default_h2_ping(),
            keepalive_timeout: default_h2_ping(),
            max_pending_accept_reset_streams: default_h2_pending_resets(),
            max_local_error_reset_streams: default_h2_local_resets(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    pub address: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// `*` (any), an exact host, or `*.example.com`. Default `*`.
    #[serde(default = "default_host")]
    pub host: String,
    /// Default `/`.
    #[serde(default = "default_prefix")]
    pub path_prefix: String,
    pub upstream: String,
    /// Name used in metrics and logs. Default `host+prefix`.
    #[serde(default)]
    pub name: Option<String>,
}

fn default_host() -> String {
    "*".into()
}
fn default_prefix() -> String {
    "/".into()
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
    #[serde(default)]
    pub max_in_flight: MaxInFlight,
    #[serde(default = "one")]
    pub weight: u32,
}

fn one() -> u32 {
    1
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetConfig {
    /// The command; `{port}` in any argument is replaced by the process's port.
    /// `usher-worker` resolves to the binary next to `usher`, or to `usher worker`.
    pub command: Vec<String>,
    #[serde(default = "default_processes")]
    pub processes: u32,
    /// Ports are `base_port + i`. `0` picks free ephemeral ports.
    #[serde(default)]
    pub base_port: u16,
    /// Host the processes listen on. Default 127.0.0.1.
    #[serde(default = "default_fleet_host")]
    pub host: String,
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
    /// A DNS server to ask (A records over UDP) instead of the system
    /// resolver. Default: the system resolver.
    #[serde(default)]
    pub resolver: Option<SocketAddr>,
    /// Capacity of the discovered backends. Default `auto`.
    #[serde(default)]
    pub max_in_flight: MaxInFlight,
}

fn default_refresh() -> Dur {
    Dur::secs(5)
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

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueueConfig {
    /// Most requests waiting at once. Default 1024.
    #[serde(default = "default_depth")]
    pub max_depth: usize,
    /// Longest wait for a free slot. Default 5s.
    #[serde(default = "default_queue_timeout")]
    pub timeout: Dur,
    /// `shortest_first` (shortest expected service time first, with ageing;
    /// see `dispatch.rs`) or `fifo`. Default `shortest_first`.
    #[serde(default)]
    pub discipline: Discipline,
    /// What makes two requests "the same kind" for service-time estimates:
    /// `path` (the default) or `path_and_query`.
    #[serde(default)]
    pub classify: Classify,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Classify {
    #[default]
    Path,
    PathAndQuery,
}

fn default_depth() -> usize {
    1024
}
fn default_queue_timeout() -> Dur {
    Dur::secs(5)
}

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig {
            max_depth: default_depth(),
            timeout: default_queue_timeout(),
            discipline: Default::default(),
            classify: Default::default(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheckConfig {
    /// Default `/healthz`.
    #[serde(default = "default_hc_path")]
    pub path: String,
    /// Default 2s.
    #[serde(default = "default_hc_interval")]
    pub interval: Dur,
    /// Default 1s.
    #[serde(default = "default_hc_timeout")]
    pub timeout: Dur,
    /// Consecutive successes to become up. Default 2.
    #[serde(default = "default_rise")]
    pub rise: u32,
    /// Consecutive failures to become down. Default 3.
    #[serde(default = "default_fall")]
    pub fall: u32,
}

fn default_hc_path() -> String {
    "/healthz".into()
}
fn default_hc_interval() -> Dur {
    Dur::secs(2)
}
fn default_hc_timeout() -> Dur {
    Dur::secs(1)
}
fn default_rise() -> u32 {
    2
}
fn default_fall() -> u32 {
    3
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryConfig {
    /// Extra attempts after the first. Default 2.
    #[serde(default = "default_attempts")]
    pub attempts: u32,
}

fn default_attempts() -> u32 {
    2
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            attempts: default_attempts(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamTimeouts {
    /// Default 2s.
    #[serde(default = "default_connect")]
    pub connect: Dur,
    /// Time for the backend to answer in full (head and buffered body). Default 60s.
    #[serde(default = "default_response")]
    pub response: Dur,
}

fn default_connect() -> Dur {
    Dur::secs(2)
}
fn default_response() -> Dur {
    Dur::secs(60)
}

impl Default for UpstreamTimeouts {
    fn default() -> Self {
        UpstreamTimeouts {
            connect: default_connect(),
            response: default_response(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    /// Idle keep-alive connections are closed after this. Keep it below the
    /// backend's own keep-alive timeout (gunicorn: 2s). Default 1s.
    #[serde(default = "default_idle")]
    pub idle_timeout: Dur,
    /// Idle connections kept per backend. Default 64.
    #[serde(default = "default_max_idle")]
    pub max_idle_per_backend: usize,
}

fn default_idle() -> Dur {
    Dur::secs(1)
}
fn default_max_idle() -> usize {
    64
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            idle_timeout: default_idle(),
            max_idle_per_backend: default_max_idle(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutlierConfig {
    /// Consecutive gateway failures that eject a backend. Default 5.
    #[serde(default = "default_consecutive")]
    pub consecutive_failures: u32,
    /// Ejection time is `base_ejection × times_ejected`. Default 5s.
    #[serde(default = "default_base_ejection")]
    pub base_ejection: Dur,
    /// Cap on one ejection. Default 60s.
    #[serde(default = "default_max_ejection")]
    pub max_ejection: Dur,
    /// At most this share of an upstream is ejected at once. Default 50.
    #[serde(default = "default_max_ejected_percent")]
    pub max_ejected_percent: u32,
}

fn default_consecutive() -> u32 {
    5
}
fn default_base_ejection() -> Dur {
    Dur::secs(5)
}
fn default_max_ejection() -> Dur {
    Dur::secs(60)
}
fn default_max_ejected_percent() -> u32 {
    50
}

impl Default for OutlierConfig {
    fn default() -> Self {
        OutlierConfig {
            consecutive_failures: default_consecutive(),
            base_ejection: default_base_ejection(),
            max_ejection: default_max_ejection(),
            max_ejected_percent: default_max_ejected_percent(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    #[serde(default)]
    pub fleet: Option<FleetConfig>,
    #[serde(default)]
    pub backends: Vec<BackendConfig>,
    #[serde(default)]
    pub dns: Option<DnsConfig>,
    #[serde(default)]
    pub balance: Balance,
    /// A backend that comes back (or is added) ramps its capacity from 1 to
    /// full over this time. Default 0s (off).
    #[serde(default = "default_slow_start")]
    pub slow_start: Dur,
    /// Capacity of a backend with `max_in_flight: auto` that reports no load.
    /// Default 4 (waitress's default thread count).
    #[serde(default = "default_capacity")]
    pub default_capacity: u32,
    /// How many Usher replicas send to these same backends (e.g. the
    /// Deployment's replicas in Kubernetes). Each replica takes its share of
    /// every backend's threads, `ceil(capacity / proxy_replicas)`, so together
    /// they still never overfill a worker. Default 1.
    #[serde(default = "one")]
    pub proxy_replicas: u32,
    #[serde(default)]
    pub queue: QueueConfig,
    #[serde(default)]
    pub health_check: Option<HealthCheckConfig>,
    #[serde(default)]
    pub outlier: OutlierConfig,
    #[serde(default)]
    pub retries: RetryConfig,
    #[serde(default)]
    pub timeouts: UpstreamTimeouts,
    #[serde(default)]
    pub pool: PoolConfig,
    /// `http1` (the default) or `http2`: h2c, or h2 over `tls`.
    #[serde(default)]
    pub protocol: UpstreamProtocol,
    /// Talk TLS to the backends. Default: plain TCP.
    #[serde(default)]
    pub tls: Option<UpstreamTlsConfig>,
    /// WebSocket and other `Upgrade` connections to this upstream's backends.
    #[serde(default)]
    pub upgrades: UpgradesConfig,
}

fn default_capacity() -> u32 {
    4
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
#[serde(deny_unknown_fields)]
pub struct UpgradesConfig {
    /// Upgraded connections open at once per backend; past it on every
    /// backend, new ones get 503. Default 1024.
    #[serde(default = "default_max_upgraded")]
    pub max_upgraded: u32,
    /// Hold a request slot for the life of the upgraded connection. Default false.
    #[serde(default)]
    pub hold_slot: bool,
    /// An upgraded connection that carries no bytes either way for this
    /// long is closed. Default 1h; `0s` means never.
    #[serde(default = "default_upgrade_idle")]
    pub idle_timeout: Dur,
}

fn default_max_upgraded() -> u32 {
    1024
}
fn default_upgrade_idle() -> Dur {
    Dur::secs(3600)
}

impl Default for UpgradesConfig {
    fn default() -> Self {
        UpgradesConfig {
            max_upgraded: default_max_upgraded(),
            hold_slot: false,
            idle_timeout: default_upgrade_idle(),
        }
    }
}

fn default_slow_start() -> Dur {
    Dur::secs(0)
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Default 10MiB; larger bodies get 413.
    #[serde(default = "default_max_body")]
    pub max_request_body: Size,
    /// Responses up to this size are read whole before the worker slot is
    /// released; larger ones stream and hold the slot. Default 4MiB.
    #[serde(default = "default_max_response")]
    pub max_response_buffer: Size,
}

fn default_max_body() -> Size {
    Size(10 << 20)
}
fn default_max_response() -> Size {
    Size(4 << 20)
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_request_body: default_max_body(),
            max_response_buffer: default_max_response(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientTimeouts {
    /// Time to receive a request head. Default 30s.
    #[serde(default = "default_30s")]
    pub client_header: Dur,
    /// Longest gap between two reads of a request body (408). Default 30s.
    #[serde(default = "default_30s")]
    pub client_body: Dur,
    /// Deadline for the whole request body, counted from the moment its head
    /// has arrived (408 when it passes); the head itself is bounded by
    /// `client_header`. A client trickling one byte per `client_body` gap
    /// can hold a connection no longer than this. Default 60s (nginx's
    /// `client_body_timeout` default, there per read).
    #[serde(default = "default_60s")]
    pub client_request: Dur,
    /// Idle keep-alive connections are closed after this. Default 75s.
    #[serde(default = "default_75s")]
    pub client_keepalive: Dur,
    /// On SIGTERM, how long in-flight and queued requests may take. Default 30s.
    #[serde(default = "default_30s")]
    pub shutdown_grace: Dur,
}

fn default_30s() -> Dur {
    Dur::secs(30)
}
fn default_60s() -> Dur {
    Dur::secs(60)
}
fn default_75s() -> Dur {
    Dur::secs(75)
}

impl Default for ClientTimeouts {
    fn default() -> Self {
        ClientTimeouts {
            client_header: default_30s(),
            client_body: default_30s(),
            client_request: default_60s(),
            client_keepalive: default_75s(),
            shutdown_grace: default_30s(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    #[default]
    Json,
    Combined,
    Off,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct AccessLogConfig {
    #[serde(default)]
    pub format: LogFormat,
}

/// Where the config came from, for error messages and reloads.
#[derive(Debug, Clone)]
pub enum Source {
    Embedded,
    File(PathBuf),
}

impl Source {
    pub fn name(&self) -> String {
        match self {
            Source::Embedded => DEFAULT_CONFIG_NAME.to_string(),
            Source::File(p) => p.display().to_string(),
        }
    }

    /// Reads and validates the config, with `check` as in [`parse_checked`].
    pub fn load_checked(
        &self,
        check: impl FnOnce(&Config) -> Vec<Problem>,
    ) -> Result<Config, Vec<ConfigError>> {
        match self {
            Source::Embedded => parse_checked(DEFAULT_CONFIG, DEFAULT_CONFIG_NAME, check),
            Source::File(path) => load_file_checked(path, check),
        }
    }
}

/// Reads a config file and parses it as [`parse_checked`] does.
pub fn load_file_checked(
    path: &Path,
    check: impl FnOnce(&Config) -> Vec<Problem>,
) -> Result<Config, Vec<ConfigError>> {
    let name = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| {
        vec![ConfigError {
            file: name.clone(),
            line: None,
            column: None,
            key: String::new(),
            message: format!("cannot read: {e}"),
        }]
    })?;
    parse_checked(&text, &name, check)
}

/// Makes relative certificate paths relative to the config file's directory.
pub fn resolve_paths(c: &mut Config, dir: &Path) {
    let fix = |p: &mut std::path::PathBuf| {
        if p.is_relative() {
            *p = dir.join(&*p);
        }
    };
    for l in &mut c.listeners {
        if let Some(t) = &mut l.tls {
            for cc in t.certificates.iter_mut().chain(t.default.iter_mut()) {
                fix(&mut cc.cert);
                fix(&mut cc.key);
            }
        }
    }
    for u in c.upstreams.values_mut() {
        if let Some(t) = &mut u.tls {
            fix(&mut t.ca);
            if let Some(cc) = &mut t.client_cert {
                fix(&mut cc.cert);
                fix(&mut cc.key);
            }
        }
    }
}

/// A problem found by a check outside the schema (`tls::check_config`
/// loads the certificate files): the key, a text to find its line by, and
/// the message.
pub struct Problem {
    pub key: String,
    pub needle: String,
    pub message: String,
}

/// Parses and validates config text against the schema alone. `file` names
/// it in errors. See [`parse_checked`] for checks that read other files.
pub fn parse(text: &str, file: &str) -> Result<Config, Vec<ConfigError>> {
    parse_checked(text, file, |_| Vec::new())
}

/// [`parse`], then `check` (e.g. `tls::check_config`, which loads the
/// certificates), with its problems located in the text like any other.
pub fn parse_checked(
    text: &str,
    file: &str,
    check: impl FnOnce(&Config) -> Vec<Problem>,
) -> Result<Config, Vec<ConfigError>> {
    let mut config: Config = serde_yaml::from_str(text).map_err(|e| vec![yaml_error(e, file)])?;
    if file != DEFAULT_CONFIG_NAME {
        if let Some(dir) = Path::new(file).parent() {
            resolve_paths(&mut config, dir);
        }
    }
    let mut errors = validate(&config, text, file);
    errors.extend(check(&config).into_iter().map(|p| ConfigError {
        file: file.to_string(),
        line: find_line(text, &[&p.needle]),
        column: None,
        key: p.key,
        message: p.message,
    }));
    if errors.is_empty() {
        Ok(config)
    } else {
        Err(errors)
    }
}

fn yaml_error(e: serde_yaml::Error, file: &str) -> ConfigError {
    let loc = e.location();
    let mut message = e.to_string();
    // serde_yaml appends " at line L column C"; we print the location ourselves.
    if let Some(i) = message.rfind(" at line ") {
        message.truncate(i);
    }
    let (key, message) = match message.split_once(": ") {
        Some((k, m)) if !k.contains(' ') => (k.to_string(), m.to_string()),
        _ => (String::new(), message),
    };
    ConfigError {
        file: file.to_string(),
        line: loc.as_ref().map(|l| l.line()),
        column: loc.as_ref().map(|l| l.column()),
        key,
        message,
    }
}

/// Finds the first line (1-based) at or after `from` whose text contains
/// all of `needles`. Best effort, for errors found after parsing.
fn find_line(text: &str, needles: &[&str]) -> Option<usize> {
    text.lines()
        .position(|l| {
            let l = l.split('#').next().unwrap_or("");
            needles.iter().all(|n| l.contains(n))
        })
        .map(|i| i + 1)
}

/// Resolves `host:port` into one address; names like `localhost` are allowed.
pub fn resolve_addr(s: &str) -> Result<SocketAddr, String> {
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok(a);
    }
    use std::net::ToSocketAddrs;
    if !s.contains(':') {
        return Err(format!("`{s}` is not an address (expected host:port)"));
    }
    s.to_socket_addrs()
        .map_err(|e| format!("`{s}` is not a valid address: {e}"))?
        .next()
        .ok_or_else(|| format!("`{s}` resolves to no address"))
}

fn validate(c: &Config, text: &str, file: &str) -> Vec<ConfigError> {
    let mut errs = Vec::new();
    let mut err = |key: String, needles: &[&str], message: String| {
        errs.push(ConfigError {
            file: file.to_string(),
            line: find_line(text, needles),
            column: None,
            key,
            message,
        })
    };

    if c.listeners.is_empty() {
        err(
            "listeners".into(),
            &["listeners"],
            "at least one listener is required".into(),
        );
    }
    let mut seen_addrs = HashSet::new();
    let mut seen_names = HashSet::new();
    for (i, l) in c.listeners.iter().enumerate() {
        let key = format!("listeners[{i}].address");
        match resolve_addr(&l.address) {
            Ok(a) => {
                if a.port() != 0 && !seen_addrs.insert(a) {
                    err(
                        key,
                        &[&l.address],
                        format!("duplicate listener address {a}"),
                    );
                }
            }
            Err(m) => err(key, &[&l.address], m),
        }
        if !seen_names.insert(l.name.clone()) {
            err(
                format!("listeners[{i}].name"),
                &[&l.name],
                format!("duplicate listener name `{}`", l.name),
            );
        }
        if l.max_connections == 0 {
            err(
                format!("listeners[{i}].max_connections"),
                &["max_connections"],
                "must be at least 1".into(),
            );
        }
    }
    if let Some(admin) = &c.admin {
        match resolve_addr(&admin.address) {
            Ok(a) => {
                if a.port() != 0 && seen_addrs.contains(&a) {
                    err(
                        "admin.address".into(),
                        &[&admin.address],
                        format!("admin address {a} is also a listener address"),
                    );
                }
            }
            Err(m) => err("admin.address".into(), &[&admin.address], m),
        }
    }
    if c.routes.is_empty() {
        err(
            "routes".into(),
            &["routes"],
            "at least one route is required".into(),
        );
    }
    for (i, r) in c.routes.iter().enumerate() {
        if !c.upstreams.contains_key(&r.upstream) {
            let known: Vec<_> = c.upstreams.keys().map(String::as_str).collect();
            err(
                format!("routes[{i}].upstream"),
                &["upstream", &r.upstream],
                format!(
                    "route points to unknown upstream `{}` (defined: {})",
                    r.upstream,
                    if known.is_empty() {
                        "none".into()
                    } else {
                        known.join(", ")
                    }
                ),
            );
        }
        if !r.path_prefix.starts_with('/') {
            err(
                format!("routes[{i}].path_prefix"),
                &[&r.path_prefix],
                "must start with `/`".into(),
            );
        }
    }
    for (name, u) in &c.upstreams {
        let k = |s: &str| format!("upstreams.{name}.{s}");
        if u.backends.is_empty() && u.fleet.is_none() && u.dns.is_none() {
            err(
                k("backends"),
                &[&format!("{name}:")],
                "an upstream needs `backends`, a `fleet` or `dns`".into(),
            );
        }
        let mut seen = HashSet::new();
        for (i, b) in u.backends.iter().enumerate() {
            match resolve_addr(&b.address) {
                Ok(a) => {
                    if !seen.insert(a) {
                        err(
                            k(&format!("backends[{i}].address")),
                            &[&b.address],
                            format!("duplicate backend {a}"),
                        );
                    }
                }
                Err(m) => err(k(&format!("backends[{i}].address")), &[&b.address], m),
            }
            if b.weight == 0 {
                err(
                    k(&format!("backends[{i}].weight")),
                    &["weight"],
                    "weight must be at least 1".into(),
                );
            }
        }
        if let Some(d) = &u.dns {
            if d.name.is_empty() || d.port == 0 {
                err(
                    k("dns"),
                    &["dns"],
                    "dns needs a name and a non-zero port".into(),
                );
            }
            if d.refresh.0 < Duration::from_millis(100) {
                err(
                    k("dns.refresh"),
                    &["refresh"],
                    "must be at least 100ms".into(),
                );
            }
        }
        if let Some(f) = &u.fleet {
            if f.command.is_empty() {
                err(
                    k("fleet.command"),
                    &["command"],
                    "the fleet command is empty".into(),
                );
            }
            if f.processes == 0 || f.processes > 1024 {
                err(
                    k("fleet.processes"),
                    &["processes"],
                    "processes must be between 1 and 1024".into(),
                );
            }
            if !f.command.iter().any(|a| a.contains("{port}")) {
                err(
                    k("fleet.command"),
                    &["command"],
                    "the fleet command must contain `{port}` so each process gets its own port"
                        .into(),
                );
            }
            // Summed in u64: `processes` is any u32 here (its range error is separate).
            if f.base_port != 0 && u64::from(f.base_port) + u64::from(f.processes) > 65536 {
                err(
                    k("fleet.base_port"),
                    &["base_port"],
                    "base_port + processes exceeds 65535".into(),
                );
            }
        }
        if u.proxy_replicas == 0 {
            err(
                k("proxy_replicas"),
                &["proxy_replicas"],
                "must be at least 1".into(),
            );
        }
        if u.default_capacity == 0 {
            err(
                k("default_capacity"),
                &["default_capacity"],
                "must be at least 1".into(),
            );
        }
        if u.queue.timeout.0.is_zero() {
            err(
                k("queue.timeout"),
                &["timeout"],
                "must be above zero".into(),
            );
        }
        if let Some(h) = &u.health_check {
            if h.rise == 0 || h.fall == 0 {
                err(
                    k("health_check"),
                    &["rise"],
                    "rise and fall must be at least 1".into(),
                );
            }
            if !h.path.starts_with('/') {
                err(
                    k("health_check.path"),
                    &[&h.path],
                    "must start with `/`".into(),
                );
            }
            if h.interval.0 < Duration::from_millis(10) {
                err(
                    k("health_check.interval"),
                    &["interval"],
                    "must be at least 10ms".into(),
                );
            }
        }
        if u.outlier.max_ejected_percent > 100 {
            err(
                k("outlier.max_ejected_percent"),
                &["max_ejected_percent"],
                "must be 0..=100".into(),
            );
        }
    }
    errs
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
listeners:
  - name: public
    address: 127.0.0.1:8080
admin: { address: 127.0.0.1:9901 }
routes:
  - { host: "*", path_prefix: /, upstream: app }
upstreams:
  app:
    backends:
      - { address: 127.0.0.1:9001, max_in_flight: 8, weight: 2 }
      - { address: 127.0.0.1:9002 }
    queue: { max_depth: 10, timeout: 250ms }
limits: { max_request_body: 64KiB }
"#;

    #[test]
    fn parses_a_good_config_with_defaults() {
        let c = parse(GOOD, "t.yaml").unwrap();
        let app = &c.upstreams["app"];
        assert_eq!(app.backends[0].max_in_flight, MaxInFlight::Fixed(8));
        assert_eq!(app.backends[1].max_in_flight, MaxInFlight::Auto);
        assert_eq!(app.queue.timeout.0, Duration::from_millis(250));
        assert_eq!(c.limits.max_request_body.0, 64 * 1024);
        assert_eq!(c.limits.max_response_buffer.0, 4 << 20);
        assert_eq!(app.default_capacity, 4);
        assert_eq!(app.upgrades.idle_timeout.0, Duration::from_secs(3600));
    }

    #[test]
    fn upgrade_idle_timeout_reads_a_duration_and_zero_means_none() {
        let with = |v: &str| {
            GOOD.replace(
                "    queue: { max_depth: 10",
                &format!("    upgrades: {{ idle_timeout: {v} }}\n    queue: {{ max_depth: 10"),
            )
        };
        let c = parse(&with("300ms"), "t.yaml").unwrap();
        assert_eq!(
            c.upstreams["app"].upgrades.idle_timeout.0,
            Duration::from_millis(300)
        );
        let c = parse(&with("0s"), "t.yaml").unwrap();
        assert!(c.upstreams["app"].upgrades.idle_timeout.0.is_zero());
        let e = parse(&with("5"), "t.yaml").unwrap_err();
        assert!(e[0].to_string().contains("upgrades"), "{e:?}");
    }

    #[test]
    fn the_embedded_default_is_valid() {
        let c = parse(DEFAULT_CONFIG, DEFAULT_CONFIG_NAME).unwrap();
        assert!(c.upstreams.values().any(|u| u.fleet.is_some()));
    }

    #[test]
    fn unknown_keys_name_line_and_key() {
        let bad = GOOD.replace("max_depth: 10", "max_dept: 10");
        let e = parse(&bad, "t.yaml").unwrap_err();
        let s = e[0].to_string();
        assert!(s.starts_with("t.yaml:13:"), "{s}");
        assert!(s.contains("upstreams.app.queue"), "{s}");
        assert!(s.contains("max_dept"), "{s}");
    }

    #[test]
    fn bad_durations_and_sizes_are_errors() {
        let e = parse(&GOOD.replace("250ms", "250"), "t.yaml").unwrap_err();
        assert!(e[0].message.contains("needs a unit"), "{e:?}");
        let e = parse(&GOOD.replace("64KiB", "64KB!"), "t.yaml").unwrap_err();
        assert!(
            e[0].to_string().contains("limits.max_request_body"),
            "{e:?}"
        );
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_size("10MiB").unwrap(), 10 << 20);
        assert!(parse_duration("5 parsecs").is_err());
    }

    #[test]
    fn semantic_errors_name_the_line() {
        let bad = GOOD.replace("upstream: app }", "upstream: nope }");
        let e = parse(&bad, "t.yaml").unwrap_err();
        assert_eq!(e[0].key, "routes[0].upstream");
        assert_eq!(e[0].line, Some(7));
        assert!(e[0].message.contains("unknown upstream `nope`"));

        let dup = GOOD.replace("127.0.0.1:9002", "127.0.0.1:9001");
        let e = parse(&dup, "t.yaml").unwrap_err();
        assert!(e[0].message.contains("duplicate backend"), "{e:?}");

        let bad_addr = GOOD.replace("127.0.0.1:8080", "not-an-address");
        let e = parse(&bad_addr, "t.yaml").unwrap_err();
        assert_eq!(e[0].key, "listeners[0].address");
        assert_eq!(e[0].line, Some(4));
    }
}
