//! Where backends come from besides the config file: DNS (a Kubernetes
//! headless Service) and the fleet of processes Usher starts itself.
//!
//! Discovery only finds addresses. It hands each new set to a callback that
//! the control layer gives it ([`Live`]), so it never reaches into the state.
//! The fleet also says whether each of its processes accepts connections
//! yet, through the [`Gates`] its backends follow.

pub mod dns;
pub mod fleet;
pub mod port_owner;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use crate::dispatch::Backend;
use crate::health::Gate;

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
    /// The fleet process at `addr` accepts connections, and its gate opens
    /// once this completes: learn what the upstream needs to know of it
    /// before it takes requests (its thread count, for an `auto` capacity).
    /// Bounded in time.
    fn prepare(&self, upstream: &str, addr: SocketAddr) -> Pending;
    /// The gate of the fleet process at `addr` opened: requests waiting in
    /// the upstream's queue may go to it.
    fn opened(&self, upstream: &str, addr: SocketAddr);
}

/// Work [`Live::prepare`] hands back to be awaited.
pub type Pending = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// The fleet processes' [`Gate`]s, by address: the fleet opens and closes
/// them, and each backend built for a fleet address follows its gate, so a
/// process that does not accept connections yet gets no requests. Either
/// side may come first: [`Gates::gate`] creates a closed gate for an address
/// it does not know yet. Carried across reloads with the state.
#[derive(Clone, Default, Debug)]
pub struct Gates(Arc<Mutex<HashMap<SocketAddr, Arc<Gate>>>>);

impl Gates {
    /// The gate of the process at `addr`, closed if it is new.
    pub fn gate(&self, addr: SocketAddr) -> Arc<Gate> {
        self.0.lock().unwrap().entry(addr).or_default().clone()
    }

    /// The gate of `addr`, if a fleet process runs there.
    pub fn find(&self, addr: SocketAddr) -> Option<Arc<Gate>> {
        self.0.lock().unwrap().get(&addr).cloned()
    }

    /// The process at `addr` is retired for good (a rolling restart).
    pub fn forget(&self, addr: SocketAddr) {
        self.0.lock().unwrap().remove(&addr);
    }
}
