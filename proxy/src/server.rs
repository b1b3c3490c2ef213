//! Client listeners: accept, serve HTTP/1.1 and h2c, drain on shutdown.
//!
//! hyper-util's auto builder serves HTTP/1.1 and HTTP/2 with prior knowledge
//! on the same port. It is given a timer: without one the header-read timeout
//! silently does nothing. hyper starts that timer whenever a connection waits
//! for a request head, so it is also the keep-alive idle timeout; Usher sets
//! it to the smaller of `client_header` and `client_keepalive`.
//!
//! A semaphore caps open connections per listener; past the cap, new
//! connections wait in the kernel's backlog instead of being accepted.

use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::proxy::{handle, ConnCtx, Shared};

pub struct ListenerSettings {
    pub name: String,
    pub max_connections: usize,
    pub header_timeout: Duration,
    pub keepalive: Duration,
}

pub fn builder(s: &ListenerSettings) -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1()
        .timer(TokioTimer::new())
        .keep_alive(true)
        .header_read_timeout(s.header_timeout.min(s.keepalive))
        .max_buf_size(256 * 1024);
    b.http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(250)
        .max_header_list_size(64 * 1024)
        .keep_alive_interval(Some(Duration::from_secs(20)))
        .keep_alive_timeout(Duration::from_secs(20));
    b
}

/// Serves one listener until `stop` fires, then lets open connections finish
/// their requests for up to `grace`.
pub async fn serve(
    listener: TcpListener,
    settings: ListenerSettings,
    shared: Arc<Shared>,
    stop: CancellationToken,
    grace: Duration,
) {
    let builder = builder(&settings);
    let graceful = GracefulShutdown::new();
    let permits = Arc::new(Semaphore::new(settings.max_connections));
    let gauge = shared
        .metrics
        .client_connections
        .with_label_values(&[&settings.name]);
    loop {
        let permit = tokio::select! {
            _ = stop.cancelled() => break,
            p = permits.clone().acquire_owned() => p.expect("semaphore never closed"),
        };
        let (stream, peer) = tokio::select! {
            _ = stop.cancelled() => break,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(listener = %settings.name, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let ctx = Arc::new(ConnCtx {
            shared: shared.clone(),
            listener: settings.name.clone(),
            peer,
            tls: false,
        });
        let service = service_fn(move |req| handle(req, ctx.clone()));
        let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
        let conn = graceful.watch(conn.into_owned());
        let gauge = gauge.clone();
        gauge.inc();
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(%peer, error = %e, "client connection ended with an error");
            }
            gauge.dec();
            drop(permit);
        });
    }
    drop(listener);
    tracing::info!(listener = %settings.name, "stopped accepting; draining connections");
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(listener = %settings.name, ?grace, "grace period over with connections still open");
    }
}
