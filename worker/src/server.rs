//! [`Server`] and its [`Builder`]: the accept loop, connection handling and drain.

use std::convert::Infallible;
use std::future::Future;
use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use http::HeaderValue;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tracing::{debug, info, warn};

use crate::front::{Front, ServerIo};
use crate::metrics::Metrics;
use crate::pool::{Pool, Shared};
use crate::{Error, Handler, LoadSnapshot};

/// Default for [`Builder::threads`].
pub const DEFAULT_THREADS: usize = 4;
/// Default for [`Builder::queue`].
pub const DEFAULT_QUEUE: usize = 64;
/// Default for [`Builder::max_body`]: 10 MiB.
pub const DEFAULT_MAX_BODY: usize = 10 * 1024 * 1024;
/// Default for [`Builder::header_read_timeout`] and [`Builder::body_read_timeout`].
pub const DEFAULT_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Default for [`Builder::grace`].
pub const DEFAULT_GRACE: Duration = Duration::from_secs(30);

/// Configures a [`Server`]. Start with [`Server::builder`].
#[derive(Debug, Clone)]
pub struct Builder {
    threads: usize,
    queue: usize,
    max_body: usize,
    header_read_timeout: Duration,
    body_read_timeout: Duration,
    grace: Duration,
    builtin_endpoints: bool,
    worker_id: Option<String>,
}

impl Default for Builder {
    fn default() -> Self {
        Self {
            threads: DEFAULT_THREADS,
            queue: DEFAULT_QUEUE,
            max_body: DEFAULT_MAX_BODY,
            header_read_timeout: DEFAULT_READ_TIMEOUT,
            body_read_timeout: DEFAULT_READ_TIMEOUT,
            grace: DEFAULT_GRACE,
            builtin_endpoints: true,
            worker_id: None,
        }
    }
}

impl Builder {
    /// Number of handler threads, each running one request at a time.
    ///
    /// Default: 4 (waitress's default). Panics if `n` is 0.
    pub fn threads(mut self, n: usize) -> Self {
        assert!(n > 0, "usher_worker: threads must be at least 1");
        self.threads = n;
        self
    }

    /// How many requests may wait for a thread once none is idle. Beyond that the
    /// answer is `503` with `Retry-After: 1`. `0` means "only when a thread is free".
    ///
    /// Default: 64.
    pub fn queue(mut self, n: usize) -> Self {
        self.queue = n;
        self
    }

    /// Largest accepted request body in bytes; larger ones get `413`.
    ///
    /// Default: 10 MiB.
    pub fn max_body(mut self, bytes: usize) -> Self {
        self.max_body = bytes;
        self
    }

    /// How long an HTTP/1 client may take to send a request head, including the wait
    /// for the next request on an idle keep-alive connection. When it expires the
    /// connection is closed.
    ///
    /// Default: 30 s.
    pub fn header_read_timeout(mut self, timeout: Duration) -> Self {
        self.header_read_timeout = timeout;
        self
    }

    /// How long the client may pause between two chunks of a request body before it
    /// gets `408`.
    ///
    /// Default: 30 s.
    pub fn body_read_timeout(mut self, timeout: Duration) -> Self {
        self.body_read_timeout = timeout;
        self
    }

    /// On shutdown, how long to wait for queued and in-flight requests before giving
    /// up on them.
    ///
    /// Default: 30 s.
    pub fn grace(mut self, grace: Duration) -> Self {
        self.grace = grace;
        self
    }

    /// Whether the front itself answers `GET /healthz` (load as JSON) and
    /// `GET /metrics` (Prometheus text) without queueing them to the pool.
    ///
    /// Default: `true`.
    pub fn builtin_endpoints(mut self, enabled: bool) -> Self {
        self.builtin_endpoints = enabled;
        self
    }

    /// The value of the `X-Usher-Worker` response header.
    ///
    /// Default: the listener's local address, e.g. `127.0.0.1:9001`.
    pub fn worker_id(mut self, id: impl Into<String>) -> Self {
        self.worker_id = Some(id.into());
        self
    }

    /// Builds the server without starting anything.
    pub fn build(self) -> Server {
        let shared = Arc::new(Shared::new(self.threads, self.queue));
        Server {
            config: self,
            shared,
        }
    }

    /// Shorthand for `self.build().serve(listener, handler)`.
    pub async fn serve<H: Handler>(self, listener: TcpListener, handler: H) -> Result<(), Error> {
        self.build().serve(listener, handler).await
    }

    /// Shorthand for `self.build().serve_with_shutdown(listener, handler, signal)`.
    pub async fn serve_with_shutdown<H, F>(
        self,
        listener: TcpListener,
        handler: H,
        signal: F,
    ) -> Result<(), Error>
    where
        H: Handler,
        F: Future<Output = ()> + Send,
    {
        self.build()
            .serve_with_shutdown(listener, handler, signal)
            .await
    }
}

/// A threaded worker server: an async HTTP front feeding a fixed pool of blocking
/// handler threads through a bounded queue. See the [crate docs](crate).
#[derive(Debug)]
pub struct Server {
    config: Builder,
    shared: Arc<Shared>,
}

/// A cheap, cloneable handle to a server's live load.
#[derive(Debug, Clone)]
pub struct Stats(Arc<Shared>);

impl Stats {
    /// The load right now.
    pub fn snapshot(&self) -> LoadSnapshot {
        self.0.snapshot()
    }
}

impl Server {
    /// A builder with the defaults documented on each of its methods.
    pub fn builder() -> Builder {
        Builder::default()
    }

    /// A handle to this server's load, usable while it serves.
    pub fn stats(&self) -> Stats {
        Stats(self.shared.clone())
    }

    /// Serves until the future is dropped. Never returns `Ok`.
    pub async fn serve<H: Handler>(self, listener: TcpListener, handler: H) -> Result<(), Error> {
        self.serve_with_shutdown(listener, handler, std::future::pending())
            .await
    }

    /// Serves until `signal` completes, then drains: stops accepting, closes
    /// keep-alive connections after their current request, finishes queued and
    /// in-flight requests, and returns once all is done or the
    /// [grace period](Builder::grace) is over (whatever is left is abandoned, with a
    /// warning in the log).
    pub async fn serve_with_shutdown<H, F>(
        self,
        listener: TcpListener,
        handler: H,
        signal: F,
    ) -> Result<(), Error>
    where
        H: Handler,
        F: Future<Output = ()> + Send,
    {
        let Self { config, shared } = self;
        let local = listener.local_addr().map_err(Error::LocalAddr)?;
        let worker_id = config.worker_id.unwrap_or_else(|| local.to_string());
        let worker_id = HeaderValue::from_str(&worker_id)
            .unwrap_or_else(|_| HeaderValue::from_static("invalid-worker-id"));
        let handler: Arc<dyn Handler> = Arc::new(handler);
        let io = if handler.has_server_io() {
            let started =
                ServerIo::start(handler.clone()).map_err(|source| Error::SpawnThread {
                    name: "usher-worker-io".into(),
                    source,
                })?;
            Some(started)
        } else {
            None
        };
        let pool = Pool::start(shared.clone(), handler, config.threads)?;
        let front = Arc::new(Front {
            shared: shared.clone(),
            metrics: Metrics::new(),
            max_body: config.max_body,
            body_read_timeout: config.body_read_timeout,
            builtin_endpoints: config.builtin_endpoints,
            queue_capacity: config.queue,
            worker_id,
            io,
        });

        let mut http = auto::Builder::new(TokioExecutor::new());
        http.http1()
            .timer(TokioTimer::new())
            .header_read_timeout(config.header_read_timeout)
            .keep_alive(true);
        http.http2().timer(TokioTimer::new());
        let http = Arc::new(http);

        let graceful = GracefulShutdown::new();
        let mut signal = pin!(signal);
        loop {
            let (stream, peer) = tokio::select! {
                biased;
                () = &mut signal => break,
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        // Usually EMFILE or a connection reset before accept; back off
                        // briefly instead of spinning.
                        warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let _ = stream.set_nodelay(true);
            let (front, http, watcher) = (front.clone(), http.clone(), graceful.watcher());
            tokio::spawn(async move {
                let service = service_fn(move |req| {
                    let front = front.clone();
                    async move { Ok::<_, Infallible>(front.serve(req).await) }
                });
                let conn = http.serve_connection(TokioIo::new(stream), service);
                if let Err(e) = watcher.watch(conn).await {
                    debug!(%peer, error = %e, "connection ended with an error");
                }
            });
        }

        drop(listener);
        let load = shared.snapshot();
        info!(
            connections = graceful.count(),
            busy = load.busy,
            queued = load.queued,
            grace = ?config.grace,
            "stopped accepting; draining"
        );
        let deadline = tokio::time::Instant::now() + config.grace;
        let conns_done = tokio::time::timeout_at(deadline, graceful.shutdown())
            .await
            .is_ok();
        let threads_done = pool.shutdown(deadline).await;
        if conns_done && threads_done {
            info!(served = shared.snapshot().served, "drained");
        } else {
            let load = shared.snapshot();
            warn!(
                busy = load.busy,
                queued = load.queued,
                "grace period of {:?} over; abandoning unfinished requests",
                config.grace
            );
        }
        Ok(())
    }
}
