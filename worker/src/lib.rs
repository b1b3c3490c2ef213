//! A threaded worker server: the waitress model, in Rust.
//!
//! One async I/O front (tokio + hyper, HTTP/1.1 keep-alive and h2c) accepts any
//! number of connections and reads each request *whole*. A fixed pool of named OS
//! threads (`usher-worker-0`, `usher-worker-1`, ...) runs a blocking [`Handler`], one
//! request per thread at a time. Between them sits a bounded queue.
//!
//! # Why the queue is bounded
//!
//! A worker with `threads` threads can only make progress on `threads` requests at
//! once. Any request beyond that waits, and a request waiting *here* cannot be
//! served by another worker that has an idle thread. An unbounded queue (such as
//! tokio's `spawn_blocking`) hides overload: latency grows without limit while the
//! load balancer in front still sees a healthy worker. A bounded queue turns
//! overload into a fast, explicit `503` with `Retry-After: 1`, which a proxy such as
//! Usher can retry elsewhere, and it bounds memory. Usher itself keeps the real
//! queue and sends a worker only as much as it has threads for; it learns the thread
//! count from the `X-Usher-Load: threads=4, busy=1, queued=0` header on every
//! response and from `GET /healthz`.
//!
//! # What the server does on its own
//!
//! - `GET /healthz` answers the [`LoadSnapshot`] as JSON and `GET /metrics` the
//!   Prometheus text (`usher_worker_threads`, `usher_worker_busy_threads`,
//!   `usher_worker_queue_depth`, `usher_worker_requests_total{code}`, `process_*`).
//!   The front answers both itself, so they work while the pool is saturated.
//! - `413` for a body over [`Builder::max_body`], `408` when the client stalls
//!   mid-body, `503` + `Retry-After: 1` when the queue is full, `500` when the handler
//!   panics (the thread survives).
//! - Every response carries `X-Usher-Load` (measured when the response leaves the
//!   front, so the request being answered no longer counts as busy) and
//!   `X-Usher-Worker` ([`Builder::worker_id`]).
//! - [`Server::serve_with_shutdown`] drains: it stops accepting, closes keep-alive
//!   connections after their current request, and finishes queued and in-flight
//!   work within [`Builder::grace`].
//!
//! # Example
//!
//! ```no_run
//! use bytes::Bytes;
//! use http::{Request, Response};
//!
//! #[tokio::main]
//! async fn main() -> Result<(), Box<dyn std::error::Error>> {
//!     let listener = tokio::net::TcpListener::bind("127.0.0.1:8000").await?;
//!     let hello = |req: Request<Bytes>| {
//!         // Blocking code is fine here: this runs on a pool thread.
//!         std::thread::sleep(std::time::Duration::from_millis(10));
//!         Response::new(Bytes::from(format!("hello from {}\n", req.uri().path())))
//!     };
//!     usher_worker::Server::builder()
//!         .threads(8)
//!         .queue(64)
//!         .max_body(1 << 20)
//!         .serve_with_shutdown(listener, hello, usher_worker::shutdown_signal())
//!         .await?;
//!     Ok(())
//! }
//! ```
//!
//! The `usher-worker` binary serves the built-in [`App`]; see [`cli`]. With `--gil`
//! the app runs every request under a model of CPython's GIL ([`gil`]), so that a
//! benchmark can show the GIL's effect on a threaded worker without Python.

pub mod app;
pub mod cli;
mod error;
mod front;
pub mod gil;
mod handler;
mod load;
pub mod metrics;
mod pool;
mod queue;
mod server;
pub mod units;

pub use app::App;
pub use error::Error;
pub use front::X_USHER_WORKER;
pub use handler::Handler;
pub use load::{
    LoadReport, LoadReportError, LoadSnapshot, REFUSED_BUSY, X_USHER_LOAD, X_USHER_REFUSED,
};
pub use server::{
    Builder, Server, Stats, DEFAULT_GRACE, DEFAULT_MAX_BODY, DEFAULT_QUEUE, DEFAULT_READ_TIMEOUT,
    DEFAULT_THREADS,
};

/// The crate version.
pub fn version() -> &'static str {
    env!("CARGO_PKG_VERSION")
}

/// Completes on SIGTERM or SIGINT (Ctrl-C); pass it to
/// [`Server::serve_with_shutdown`].
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM received"),
                _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
            },
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch SIGTERM; only SIGINT stops the server");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
        tracing::info!("Ctrl-C received");
    }
}
