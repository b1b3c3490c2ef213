//! Where backends come from besides the config file: DNS (a Kubernetes
//! headless Service) and the fleet of processes Usher starts itself.
//!
//! Discovery only finds addresses. It hands each new set to a callback that
//! the control layer gives it, so it never reaches into the state.

pub mod dns;
pub mod fleet;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use crate::dispatch::Backend;

/// Addresses found per upstream (DNS answers, fleet ports), by upstream name.
pub type Addresses = HashMap<String, Vec<SocketAddr>>;

/// [`Addresses`] shared between a discovery task and the state it feeds, and
/// carried across reloads.
pub type SharedAddresses = Arc<Mutex<Addresses>>;

/// The live upstreams, as discovery sees them: where it publishes a new
/// address set, and where a rolling restart finds a backend to drain. The
/// control layer implements it over the hot state.
pub trait Live: Send + Sync {
    /// Makes `addrs` the upstream's discovered backends (static ones stay).
    fn publish(&self, upstream: &str, addrs: &[SocketAddr], fixed_capacity: Option<u32>);
    /// The upstream's live backend at `addr`, if there is one.
    fn backend(&self, upstream: &str, addr: SocketAddr) -> Option<Arc<Backend>>;
}
