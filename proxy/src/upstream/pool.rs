//! Usher's own keep-alive pool of HTTP/1 connections to backends (plain, or
//! TLS through [`UpstreamConnector`]); `protocol: http2` upstreams and health
//! checks keep hyper-util's client.
//!
//! Why not hyper-util's pool: a backend's capacity is its threads and Usher
//! already decides, under the dispatcher's lock, which backend a request goes
//! to and that one of its threads is free (the slot). All a pool must add is
//! a connection for that slot. So a checkout is a pop from the backend's idle
//! stack, or else one new connection; there is no waiting for a connection to
//! come back and no racing a connect against an idle one (hyper issue #4134),
//! and no per-request channel or task besides the connection's own driver.
//!
//! - Idle connections are kept per backend, newest first (LIFO: the newest is
//!   the least likely to have been closed by the backend), at most
//!   `pool.max_idle_per_backend`, and dropped after `pool.idle_timeout`
//!   (which should stay below the backend's keep-alive timeout).
//! - A connection goes back to the pool when its response body has been read
//!   whole; one dropped earlier (an error, a timeout) is closed.
//! - A reused connection that the backend had closed before the request was
//!   written gives the request back (`try_send_request`); it is sent once
//!   more on a new connection, so a stale keep-alive never becomes a client
//!   error.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use tokio::time::Instant;

use crate::tls::connector::UpstreamConnector;

type Sender = SendRequest<Full<Bytes>>;

/// Why a request did not get a response head.
#[derive(Debug)]
pub enum SendError {
    /// No connection could be made (refused, timed out, TLS handshake): the
    /// request never left Usher.
    Connect(Box<dyn std::error::Error + Send + Sync>),
    /// The exchange failed once the request was handed to a connection: it
    /// may have reached the backend.
    Sent(hyper::Error),
}

/// The HTTP/1 pool of one upstream. Cheap to clone.
#[derive(Clone)]
pub struct Pool {
    shared: Arc<Shared>,
}

struct Shared {
    connector: UpstreamConnector,
    builder: http1::Builder,
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

#[derive(Default)]
struct Idle {
    /// Per backend and worker thread.
    by_backend: HashMap<(SocketAddr, usize), VecDeque<(Sender, Instant)>>,
    /// Whether the eviction task runs (it ends when nothing is idle).
    sweeping: bool,
}

/// A connection checked out for one exchange. [`Conn::checkin`] returns it
/// once the response has been read whole; dropping it closes it.
pub struct Conn {
    sender: Sender,
    addr: SocketAddr,
    shared: Arc<Shared>,
}

impl Pool {
    /// `idle_timeout` and `max_idle` per backend: `pool.*` of the upstream.
    pub fn new(connector: UpstreamConnector, idle_timeout: Duration, max_idle: usize) -> Self {
        Pool {
            shared: Arc::new(Shared {
                connector,
                builder: http1::Builder::new(),
                idle_timeout,
                max_idle,
                idle: Mutex::new(Idle::default()),
            }),
        }
    }

    /// Sends `req` (origin-form target, with `Host`) to `addr` on an idle
    /// connection, or a new one, and returns the response head with the
    /// connection its body arrives on.
    pub async fn send(
        &self,
        addr: SocketAddr,
        mut req: Request<Full<Bytes>>,
    ) -> Result<(Response<Incoming>, Conn), SendError> {
        if let Some(mut conn) = self.checkout(addr) {
            // Ready at once, normally: it was checked in after its last
            // response was read whole.
            if conn.sender.ready().await.is_ok() {
                match conn.sender.try_send_request(req).await {
                    Ok(resp) => return Ok((resp, conn)),
                    Err(mut e) => match e.take_message() {
                        // Closed by the backend before the request was
                        // written: nothing of it ran, send it on a new one.
                        Some(r) => {
                            tracing::debug!(backend = %addr, "stale pooled connection; resending on a new one");
                            req = r;
                        }
                        None => return Err(SendError::Sent(e.into_error())),
                    },
                }
            }
        }
        let mut conn = self.connect(addr).await?;
        match conn.sender.try_send_request(req).await {
            Ok(resp) => Ok((resp, conn)),
            Err(e) => Err(SendError::Sent(e.into_error())),
        }
    }

    /// The newest idle connection to `addr` that is still open and young
    /// enough; older and closed ones are dropped on the way.
    fn checkout(&self, addr: SocketAddr) -> Option<Conn> {
        let mut idle = self.shared.idle.lock().unwrap();
        let stack = idle.by_backend.get_mut(&(addr, worker()))?;
        let now = Instant::now();
        while let Some((sender, since)) = stack.pop_back() {
            if now.saturating_duration_since(since) >= self.shared.idle_timeout {
                // The rest are older still.
                stack.clear();
                break;
            }
            if !sender.is_closed() {
                return Some(Conn {
                    sender,
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
        let (sender, driver) = self
            .shared
            .builder
            .handshake(io)
            .await
            .map_err(|e| SendError::Connect(e.into()))?;
        // The connection's driver: it ends when the connection closes, or
        // once every handle to it (idle or checked out) is dropped.
        tokio::spawn(async move {
            if let Err(e) = driver.await {
                tracing::debug!(backend = %addr, error = %e, "backend connection ended");
            }
        });
        Ok(Conn {
            sender,
            addr,
            shared: self.shared.clone(),
        })
    }

    /// Idle connections to `addr` (for tests).
    #[cfg(test)]
    fn idle_count(&self, addr: SocketAddr) -> usize {
        let idle = self.shared.idle.lock().unwrap();
        idle.by_backend
            .iter()
            .filter(|((a, _), _)| *a == addr)
            .map(|(_, s)| s.len())
            .sum()
    }
}

impl Conn {
    /// Returns the connection to the pool: its last response has been read
    /// whole. A closed one (the backend said `Connection: close`) is dropped.
    pub fn checkin(self) {
        let Conn {
            sender,
            addr,
            shared,
        } = self;
        if sender.is_closed() || shared.max_idle == 0 {
            return;
        }
        let mut idle = shared.idle.lock().unwrap();
        let stack = idle.by_backend.entry((addr, worker())).or_default();
        if stack.len() >= shared.max_idle {
            stack.pop_front();
        }
        stack.push_back((sender, Instant::now()));
        if !idle.sweeping {
            idle.sweeping = true;
            tokio::spawn(sweep(Arc::downgrade(&shared)));
        }
    }
}

/// Closes connections idle for `idle_timeout`, every `idle_timeout`, until
/// nothing is idle or the pool is gone (the upstream was replaced).
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
        let mut idle = shared.idle.lock().unwrap();
        let now = Instant::now();
        idle.by_backend.retain(|_, stack| {
            stack.retain(|(sender, since)| {
                !sender.is_closed() && now.saturating_duration_since(*since) < shared.idle_timeout
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

    fn get() -> Request<Full<Bytes>> {
        let mut r = Request::new(Full::new(Bytes::new()));
        r.headers_mut()
            .insert(http::header::HOST, "t".parse().unwrap());
        *r.uri_mut() = "/".parse().unwrap();
        r
    }

    async fn roundtrip(p: &Pool, addr: SocketAddr) -> Result<String, String> {
        let (resp, conn) = p.send(addr, get()).await.map_err(|e| format!("{e:?}"))?;
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        conn.checkin();
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
            // Let the driver see the close, or not: both must work.
            tokio::task::yield_now().await;
        }
        assert_eq!(conns.load(Ordering::SeqCst), 5);
    }

    #[tokio::test]
    async fn concurrent_checkouts_take_separate_connections_and_keep_at_most_max_idle() {
        let (addr, conns) = backend(usize::MAX).await;
        let p = pool(Duration::from_secs(10), 2);
        let mut held = Vec::new();
        for _ in 0..3 {
            let (resp, conn) = p.send(addr, get()).await.unwrap();
            resp.into_body().collect().await.unwrap();
            held.push(conn);
        }
        assert_eq!(conns.load(Ordering::SeqCst), 3);
        for c in held {
            c.checkin();
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
            p.send(addr, get()).await,
            Err(SendError::Connect(_))
        ));
    }
}
