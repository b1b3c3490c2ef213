//! Client listeners: accept, TLS handshake, serve HTTP/1.1 and HTTP/2,
//! drain on shutdown.
//!
//! hyper-util's auto builder serves HTTP/1.1 and HTTP/2 on the same port: h2
//! by prior knowledge (h2c) on a plain listener, and by ALPN on a TLS one.
//! The TLS handshake runs in the connection's own task under
//! `handshake_timeout`, so a slow handshake never holds up the accept loop. It is given a timer: without one the header-read timeout
//! silently does nothing. hyper starts that timer whenever a connection waits
//! for a request head, so it is also the keep-alive idle timeout; Usher sets
//! it to the smaller of `client_header` and `client_keepalive`.
//!
//! A semaphore caps open connections per listener; past the cap, new
//! connections wait in the kernel's backlog instead of being accepted.

use std::sync::Arc;
use std::time::Duration;

use http::HeaderValue;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::config::{Http2Config, ListenerConfig};
use crate::edge::{handle, ConnCtx, Shared};
use crate::tls::TlsListener;

pub struct ListenerSettings {
    pub name: String,
    pub max_connections: usize,
    pub header_timeout: Duration,
    pub keepalive: Duration,
    /// Set on a TLS listener.
    pub tls: Option<Arc<TlsListener>>,
}

pub fn builder(s: &ListenerSettings, h2: &Http2Config) -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1()
        .timer(TokioTimer::new())
        .keep_alive(true)
        .header_read_timeout(s.header_timeout.min(s.keepalive))
        .max_buf_size(256 * 1024);
    let ping = Some(h2.keepalive_interval.0).filter(|d| !d.is_zero());
    b.http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(h2.max_concurrent_streams)
        .max_header_list_size(u32::try_from(h2.max_header_list_size.0).unwrap_or(u32::MAX))
        .keep_alive_interval(ping)
        .keep_alive_timeout(h2.keepalive_timeout.0)
        .max_pending_accept_reset_streams(h2.max_pending_accept_reset_streams)
        .max_local_error_reset_streams(h2.max_local_error_reset_streams);
    b
}

/// What a connection takes from its listener's current configuration: read
/// at accept, so a reload applies to new connections.
fn listener_config(shared: &Shared, name: &str) -> Option<ListenerConfig> {
    shared
        .state
        .load()
        .config
        .listeners
        .iter()
        .find(|l| l.name == name)
        .cloned()
}

/// Serves one connection (plain or TLS) until it ends or is drained.
async fn serve_conn<I>(
    io: I,
    builder: auto::Builder<TokioExecutor>,
    ctx: Arc<ConnCtx>,
    watcher: Watcher,
) where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let peer = ctx.peer;
    let service = service_fn(move |req| handle(req, ctx.clone()));
    let conn = builder
        .serve_connection_with_upgrades(io, service)
        .into_owned();
    if let Err(e) = watcher.watch(conn).await {
        tracing::debug!(%peer, error = %e, "client connection ended with an error");
    }
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
        let lc = listener_config(&shared, &settings.name);
        let h2 = lc.as_ref().map(|l| l.http2.clone()).unwrap_or_default();
        let builder = builder(&settings, &h2);
        let tls = settings.tls.clone();
        let ctx = Arc::new(ConnCtx {
            shared: shared.clone(),
            peer,
            peer_ip: peer.ip().to_string(),
            tls: tls.is_some(),
            hsts: lc
                .as_ref()
                .and_then(|l| l.tls.as_ref()?.hsts.as_deref())
                .and_then(|h| HeaderValue::from_str(h).ok()),
            redirect_https_port: lc
                .as_ref()
                .filter(|l| l.redirect_to_https)
                .map(|l| l.https_port),
        });
        let watcher = graceful.watcher();
        let gauge = gauge.clone();
        gauge.inc();
        tokio::spawn(async move {
            match tls {
                None => serve_conn(TokioIo::new(stream), builder, ctx, watcher).await,
                Some(t) => {
                    match tokio::time::timeout(t.handshake_timeout(), t.acceptor.accept(stream))
                        .await
                    {
                        Ok(Ok(s)) => serve_conn(TokioIo::new(s), builder, ctx, watcher).await,
                        Ok(Err(e)) => {
                            tracing::debug!(%peer, listener = %t.name, error = %e, "TLS handshake failed")
                        }
                        Err(_) => {
                            tracing::debug!(%peer, listener = %t.name, "TLS handshake timed out")
                        }
                    }
                }
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
