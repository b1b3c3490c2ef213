//! Usher's own keep-alive pool of HTTP/1 connections to backends (plain, or
//! TLS through [`UpstreamConnector`]), spoken to by Usher's own client side
//! (`h1.rs`); `protocol: http2` upstreams and health checks keep hyper-util's
//! client.
//!
//! Why not hyper-util's pool: a backend's capacity is its threads and Usher
//! already decides, under the dispatcher's lock, which backend a request goes
//! to and that one of its threads is free (the slot). All a pool must add is
//! a connection for that slot. So a checkout is a pop from the backend's idle
//! stack, or else one new connection; there is no waiting for a connection to
//! come back and no racing a connect against an idle one (hyper issue #4134),
//! and no task or channel per connection or request: the exchange runs in
//! the request's own future.
//!
//! - Idle connections are kept per backend, newest first (LIFO: the newest is
//!   the least likely to have been closed by the backend), at most
//!   `pool.max_idle_per_backend`, and dropped after `pool.idle_timeout`
//!   (which should stay below the backend's keep-alive timeout).
//! - A connection goes back to the pool when its response body has been read
//!   whole (`h1::ResponseBody` does it); one dropped earlier (an error, a
//!   timeout) is closed.
//! - A checked-out idle connection that the backend has closed, or that has
//!   unasked-for bytes on it, is dropped before anything is written to it.
//! - A reused connection that the backend closed before the request was all
//!   written (nothing came back) sends the request once more on a new
//!   connection: nothing of it ran (a non-idempotent request only if none of
//!   it went out, in case a backend acted on a part). Once the request is all out, a close is
//!   a failure of the attempt (the backend may have crashed mid-request),
//!   which the retry loop retries for idempotent methods only, as it did
//!   with hyper's client.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use http::Response;
use tokio::time::Instant;

use super::h1::{ClientError, Connection, Failure, Io, Outgoing, ResponseBody};
use super::retry::is_idempotent;
use super::UpstreamBody;
use crate::tls::connector::UpstreamConnector;

/// Why a request did not get a response head.
#[derive(Debug)]
pub enum SendError {
    /// No connection could be made (refused, timed out, TLS handshake): the
    /// request never left Usher.
    Connect(Box<dyn std::error::Error + Send + Sync>),
    /// The exchange failed once the request was handed to a connection: it
    /// may have reached the backend.
    Sent(ClientError),
}

/// The HTTP/1 pool of one upstream. Cheap to clone.
#[derive(Clone)]
pub struct Pool {
    shared: Arc<Shared>,
}

struct Shared {
    connector: UpstreamConnector,
    idle_timeout: Duration,
    max_idle: usize,
    idle: Mutex<Idle>,
}

thread_local! {
    /// Which worker thread this is (`app::worker_thread`; 0 for the first).
    static WORKER: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Marks the calling thread as worker `index`: its idle connections are its
/// own, so that a request never drives a connection registered with another
/// thread's event loop.
pub fn set_worker(index: usize) {
    WORKER.with(|w| w.set(index));
}

fn worker() -> usize {
    WORKER.with(|w| w.get())
}

/// A poisoned lock only means a panic elsewhere while it was held; the idle
/// stacks are plain data.
fn lock(idle: &Mutex<Idle>) -> std::sync::MutexGuard<'_, Idle> {
    idle.lock().unwrap_or_else(|p| p.into_inner())
}

#[derive(Default)]
struct Idle {
    /// Per backend and worker thread. Keyed by backend addresses, which come
    /// from the config and discovery, so a fast hasher is safe (two lookups
    /// per request).
    by_backend: rustc_hash::FxHashMap<(SocketAddr, usize), VecDeque<(Connection, Instant)>>,
    /// Whether the eviction task runs (it ends when nothing is idle).
    sweeping: bool,
}

/// A connection checked out for one exchange. [`Conn::checkin`] returns it
/// once the response has been read whole; dropping it closes it.
pub struct Conn {
    connection: Connection,
    addr: SocketAddr,
    shared: Arc<Shared>,
}

impl Pool {
    /// `idle_timeout` and `max_idle` per backend: `pool.*` of the upstream.
    pub fn new(connector: UpstreamConnector, idle_timeout: Duration, max_idle: usize) -> Self {
        Pool {
            shared: Arc::new(Shared {
                connector,
                idle_timeout,
                max_idle,
                idle: Mutex::new(Idle::default()),
            }),
        }
    }

    /// Sends `req` to `addr` on an idle connection, or a new one, and returns
    /// the response; its body arrives on the connection, which goes back to
    /// the pool once the body has been read whole. `now` is the clock's
    /// reading for the attempt, against which idle connections are aged.
    pub async fn send(
        &self,
        addr: SocketAddr,
        req: &Outgoing,
        now: Instant,
    ) -> Result<Box<Response<UpstreamBody>>, SendError> {
        if let Some(mut conn) = self.checkout(addr, now) {
            match conn.connection.round_trip(req).await {
                Ok(head) => return Ok(ResponseBody::response(head, conn)),
                // Closed by the backend before the request was all out:
                // nothing of it ran, unless a backend acted on a part (so a
                // non-idempotent request goes again only if none went out).
                Err(Failure::Stale { partly }) if !partly || is_idempotent(&req.method) => {
                    tracing::debug!(backend = %addr, "stale pooled connection; resending on a new one");
                }
                Err(f) => return Err(SendError::Sent(f.into())),
            }
        }
        // Boxed: connecting (TCP, maybe TLS) is rare on a warm pool, and its
        // future would make every request's as large.
        let mut conn = Box::pin(self.connect(addr)).await?;
        match conn.connection.round_trip(req).await {
            Ok(head) => Ok(ResponseBody::response(head, conn)),
            Err(f) => Err(SendError::Sent(f.into())),
        }
    }

    /// The newest idle connection to `addr` that is still open and young
    /// enough at `now`; older and closed ones are dropped on the way.
    fn checkout(&self, addr: SocketAddr, now: Instant) -> Option<Conn> {
        let mut idle = lock(&self.shared.idle);
        let stack = idle.by_backend.get_mut(&(addr, worker()))?;
        while let Some((mut connection, since)) = stack.pop_back() {
            if now.saturating_duration_since(since) >= self.shared.idle_timeout {
                // The rest are older still.
                stack.clear();
                break;
            }
            if connection.is_idle_and_open() {
                return Some(Conn {
                    connection,
                    addr,
                    shared: self.shared.clone(),
                });
            }
        }
        None
    }

    async fn connect(&self, addr: SocketAddr) -> Result<Conn, SendError> {
        let io = self
            .shared
            .connector
            .connect_to(addr)
            .await
            .map_err(SendError::Connect)?;
        Ok(Conn {
            connection: Connection::new(Io::from(io)),
            addr,
            shared: self.shared.clone(),
        })
    }

    /// Idle connections to `addr` (for tests).
    #[cfg(test)]
    fn idle_count(&self, addr: SocketAddr) -> usize {
        let idle = lock(&self.shared.idle);
        idle.by_backend
            .iter()
            .filter(|((a, _), _)| *a == addr)
            .map(|(_, s)| s.len())
            .sum()
    }
}

impl Conn {
    pub(super) fn connection(&mut self) -> &mut Connection {
        &mut self.connection
    }

    /// Returns the connection to the pool: its last response has been read
    /// whole and the backend keeps it alive.
    pub(super) fn checkin(self) {
        let Conn {
            connection,
            addr,
            shared,
        } = self;
        if shared.max_idle == 0 {
            return;
        }
        let mut idle = lock(&shared.idle);
        let stack = idle.by_backend.entry((addr, worker())).or_default();
        if stack.len() >= shared.max_idle {
            stack.pop_front();
        }
        stack.push_back((connection, Instant::now()));
        if !idle.sweeping {
            idle.sweeping = true;
            tokio::spawn(sweep(Arc::downgrade(&shared)));
        }
    }
}

/// Closes connections idle for `idle_timeout`, or closed by their backend,
/// every `idle_timeout`, until nothing is idle or the pool is gone (the
/// upstream was replaced).
async fn sweep(shared: Weak<Shared>) {
    let every = match shared.upgrade() {
        Some(s) => s.idle_timeout.max(Duration::from_millis(10)),
        None => return,
    };
    loop {
        tokio::time::sleep(every).await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let mut idle = lock(&shared.idle);
        let now = Instant::now();
        idle.by_backend.retain(|_, stack| {
            stack.retain_mut(|(connection, since)| {
                now.saturating_duration_since(*since) < shared.idle_timeout
                    && connection.is_idle_and_open()
            });
            !stack.is_empty()
        });
        if idle.by_backend.is_empty() {
            idle.sweeping = false;
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::UpstreamConfig;
    use http_body_util::BodyExt;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// A backend that answers every request on a connection with 200 "ok",
    /// and closes each connection after `per_conn` requests without saying so
    /// (like a server whose keep-alive ran out). Counts connections.
    async fn backend(per_conn: usize) -> (SocketAddr, Arc<AtomicUsize>) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let conns = Arc::new(AtomicUsize::new(0));
        let counted = conns.clone();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = l.accept().await.unwrap();
                counted.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    for _ in 0..per_conn {
                        let mut got = Vec::new();
                        while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                            match s.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => got.extend_from_slice(&buf[..n]),
                            }
                        }
                        let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                        if s.write_all(ok).await.is_err() {
                            return;
                        }
                    }
                    // Closed without `Connection: close`.
                });
            }
        });
        (addr, conns)
    }

    fn pool(idle: Duration, max_idle: usize) -> Pool {
        let cfg: UpstreamConfig = serde_yaml::from_str("backends: []").unwrap();
        Pool::new(UpstreamConnector::new(&cfg), idle, max_idle)
    }

    fn get() -> Outgoing {
        let (head, ()) = http::Request::get("/").body(()).unwrap().into_parts();
        Outgoing::new(&head, None, "/", "t", bytes::Bytes::new(), None, &[])
    }

    async fn roundtrip(p: &Pool, addr: SocketAddr) -> Result<String, String> {
        let resp = p
            .send(addr, &get(), Instant::now())
            .await
            .map_err(|e| format!("{e:?}"))?;
        // Read whole, the connection goes back by itself.
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        Ok(String::from_utf8(body.to_vec()).unwrap())
    }

    #[tokio::test]
    async fn reuses_one_connection_for_sequential_requests() {
        let (addr, conns) = backend(usize::MAX).await;
        let p = pool(Duration::from_secs(10), 4);
        for _ in 0..5 {
            assert_eq!(roundtrip(&p, addr).await.unwrap(), "ok");
        }
        assert_eq!(conns.load(Ordering::SeqCst), 1);
        assert_eq!(p.idle_count(addr), 1);
    }

    #[tokio::test]
    async fn a_connection_the_backend_closed_is_not_a_failure() {
        // Every connection serves one request and closes silently: each
        // reuse finds it stale and the request goes out on a new one.
        let (addr, conns) = backend(1).await;
        let p = pool(Duration::from_secs(10), 4);
        for _ in 0..5 {
            assert_eq!(roundtrip(&p, addr).await.unwrap(), "ok");
            // The close reaches the event loop before the next checkout,
            // which then drops the connection without writing to it.
            tokio::task::yield_now().await;
        }
        assert_eq!(conns.load(Ordering::SeqCst), 5);
    }

    #[tokio::test]
    async fn concurrent_checkouts_take_separate_connections_and_keep_at_most_max_idle() {
        let (addr, conns) = backend(usize::MAX).await;
        let p = pool(Duration::from_secs(10), 2);
        // A response whose body is unread holds its connection.
        let mut held = Vec::new();
        for _ in 0..3 {
            held.push(p.send(addr, &get(), Instant::now()).await.unwrap());
        }
        assert_eq!(conns.load(Ordering::SeqCst), 3);
        assert_eq!(p.idle_count(addr), 0);
        for r in held {
            r.into_body().collect().await.unwrap();
        }
        assert_eq!(p.idle_count(addr), 2);
    }

    #[tokio::test]
    async fn idle_connections_are_dropped_after_the_idle_timeout() {
        let (addr, conns) = backend(usize::MAX).await;
        let p = pool(Duration::from_millis(50), 4);
        roundtrip(&p, addr).await.unwrap();
        assert_eq!(p.idle_count(addr), 1);
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(p.idle_count(addr), 0, "the sweeper closed it");
        roundtrip(&p, addr).await.unwrap();
        assert_eq!(conns.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_refused_connect_is_a_connect_error() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        drop(l);
        let p = pool(Duration::from_secs(1), 4);
        assert!(matches!(
            p.send(addr, &get(), Instant::now()).await,
            Err(SendError::Connect(_))
        ));
    }
}
