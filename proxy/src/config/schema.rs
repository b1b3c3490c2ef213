//! The configuration's schema: every section of `usher.yaml` as a type.
//!
//! A section whose keys are all optional takes `#[serde(default)]` as a
//! whole, so its defaults are written once, in its `impl Default`, and a
//! missing key reads as the default's field. Sections with required keys
//! (a listener's `address`, a route's `upstream`) cannot have a `Default`;
//! their optional keys name a small `default_*` function instead. Every
//! field's doc comment says its default.

use std::collections::BTreeMap;
use std::path::PathBuf;

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
    /// Threads serving client connections, like nginx's `worker_processes`:
    /// `auto` (default: the cores Usher may use, or `TOKIO_WORKER_THREADS`)
    /// or a number. Each runs its own event loop with its own accept queue
    /// on every listener (`SO_REUSEPORT`); the first also runs the admin
    /// listener, health checks, discovery and reloads. Read at start only.
    pub workers: Workers,
}

/// `workers: auto` or a count.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Workers {
    #[default]
    Auto,
    Fixed(u32),
}

impl Workers {
    /// How many: a fixed count, else `TOKIO_WORKER_THREADS`, else the cores
    /// this process may run on (its CPU affinity and cgroup quota).
    pub fn count(self) -> usize {
        match self {
            Workers::Fixed(n) => n as usize,
            Workers::Auto => std::env::var("TOKIO_WORKER_THREADS")
                .ok()
                .and_then(|v| v.trim().parse::<usize>().ok())
                .filter(|&n| n > 0)
                .or_else(|| std::thread::available_parallelism().ok().map(|n| n.get()))
                .unwrap_or(1),
        }
    }
}

impl<'de> Deserialize<'de> for Workers {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let n = d.deserialize_any(super::upstream::AutoOrCount {
            expecting: "`auto` or a positive number",
            min: 1,
            out_of_range: "workers must be between 1 and 2^32-1",
            negative: "workers must be positive",
        })?;
        Ok(n.map_or(Workers::Auto, Workers::Fixed))
    }
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

/// The `upstreams:` section lives in `upstream.rs`.
pub use super::upstream::*;

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
