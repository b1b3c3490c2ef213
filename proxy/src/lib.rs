//! Usher: a buffered edge proxy with capacity-aware dispatch for threaded
//! worker backends.
//!
//! Where does a request wait? In [`dispatch`]. The rest of the request path
//! is [`server`] (accept) → [`proxy`] (route, buffer) → [`dispatch`] (admit)
//! → [`balance`] (pick) → [`upstream`] (forward, retry, buffer the response).

pub mod access_log;
pub mod admin;
pub mod backend;
pub mod balance;
pub mod config;
pub mod daemon;
pub mod dispatch;
pub mod dns;
pub mod error;
pub mod estimate;
pub mod fleet;
pub mod headers;
pub mod health;
pub mod metrics;
pub mod proxy;
pub mod reload;
pub mod server;
pub mod state;
pub mod tls;
pub mod upgrade;
pub mod upstream;

#[cfg(test)]
mod prop_tests;
