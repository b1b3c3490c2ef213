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

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

/// Usher's stop as the edge sees it: listeners stop accepting and open
/// connections finish the request in flight and close. Cheap to clone.
///
/// The token wakes waits; the flag answers "has it fired?" with a plain
/// load, where the token's `is_cancelled` takes its lock (two locked
/// instructions), and HTTP/1 asks twice per request.
#[derive(Clone, Default)]
pub struct Drain {
    inner: Arc<DrainInner>,
}

#[derive(Default)]
struct DrainInner {
    token: CancellationToken,
    fired: AtomicBool,
}

impl Drain {
    pub fn new() -> Drain {
        Drain::default()
    }

    /// Starts the drain: the flag first, so that whatever the token wakes
    /// sees it.
    pub fn fire(&self) {
        self.inner.fired.store(true, Ordering::Release);
        self.inner.token.cancel();
    }

    pub fn has_fired(&self) -> bool {
        self.inner.fired.load(Ordering::Acquire)
    }

    /// The token, for waits and for tasks that stop with the edge.
    pub fn token(&self) -> &CancellationToken {
        &self.inner.token
    }

    /// Resolves once the drain has fired. The token's own future, not an
    /// `async fn` around it: a connection's task holds it in its future,
    /// whose size every connection pays, and the wrapper took an idle
    /// keep-alive connection from 2.6 to 3.1 KiB (`bench/idle_conns.sh`).
    pub fn fired(&self) -> tokio_util::sync::WaitForCancellationFuture<'_> {
        self.inner.token.cancelled()
    }
}
