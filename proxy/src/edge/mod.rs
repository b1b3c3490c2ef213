//! The edge: how a request arrives.
//!
//! [`listener`] accepts connections (HTTP/1.1, h2c, TLS); [`h1`] is Usher's own
//! HTTP/1.1 server side for plain connections (hyper serves TLS and h2); [`handler`] checks,
//! routes and buffers each request, [`headers`] holds the header rules, and
//! [`upgrade`] tunnels WebSockets and other upgrades.

mod date;
pub mod h1;
pub mod handler;
pub mod headers;
pub mod listener;
pub mod upgrade;

pub use handler::{handle, ConnCtx, Shared};
