//! The edge: how a request arrives.
//!
//! [`listener`] accepts connections (HTTP/1.1, h2c, TLS), [`handler`] checks,
//! routes and buffers each request, [`headers`] holds the header rules, and
//! [`upgrade`] tunnels WebSockets and other upgrades.

pub mod handler;
pub mod headers;
pub mod listener;
pub mod upgrade;

pub use handler::{handle, ConnCtx, Shared};
