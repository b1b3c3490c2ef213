//! Usher: a buffered edge proxy with capacity-aware dispatch for threaded
//! worker backends.
//!
//! The folders follow a request, and each answers one question:
//!
//! - [`edge`]: how a request arrives: listeners, connections, reading and
//!   checking the request, headers, routing, upgrades.
//! - [`dispatch`]: **where a request waits** and **gets its backend**: the
//!   central queue, the RAII slot, the queue discipline, service-time
//!   estimates, the balancer, and each backend's capacity and in-flight count.
//! - [`upstream`]: how it is sent: forwarding over the keep-alive pool,
//!   **where it is retried** (one loop and one budget), response framing and
//!   the response body.
//! - [`health`]: **where a backend is marked unhealthy**: active checks with
//!   their rise/fall threshold, and passive outlier ejection.
//! - [`discovery`]: where backends come from besides the file: DNS and the
//!   fleet of processes Usher runs.
//! - [`control`]: the hot state and its two-phase rebuild, reload, the admin
//!   API.
//! - [`config`]: the YAML schema, units, validation and error locations.
//! - [`observe`]: metrics and the access log.
//! - [`tls`]: certificates, SNI, rotation, upstream TLS.
//!
//! [`app`] wires them together: build, spawn, wait for signals, drain.

pub mod app;
pub mod config;
pub mod control;
pub mod discovery;
pub mod dispatch;
pub mod edge;
pub mod error;
pub mod health;
pub mod observe;
pub mod syntax;
pub mod tls;
pub mod upstream;

#[cfg(test)]
mod prop_tests;
