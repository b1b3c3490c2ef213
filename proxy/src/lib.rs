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
//! - [`upstream`]: how it is sent: forwarding over the keep-alive pool and
//!   Usher's own HTTP/1 client side,
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
//! - [`http1`]: HTTP/1 body framing shared by the edge and the upstream
//!   client.
//!
//! [`app`] wires them together: build, spawn, wait for signals, drain.

pub(crate) mod app;
pub(crate) mod boxed;
pub(crate) mod config;
pub(crate) mod control;
pub(crate) mod discovery;
pub(crate) mod dispatch;
pub(crate) mod edge;
pub(crate) mod error;
pub(crate) mod health;
pub(crate) mod http1;
pub(crate) mod observe;
pub(crate) mod syntax;
pub(crate) mod timer;
pub(crate) mod tls;
pub(crate) mod upstream;

#[cfg(test)]
mod prop_tests;

// What the `usher` binary uses; everything else is crate-private, so rustc
// flags what nothing uses.
pub use app::{run, Threads};
pub use config::{ConfigError, Source};
pub use control::admin::request_reload;
pub use control::load;
pub use discovery::fleet::{exec_child, watch_parent};
