//! Client listeners: accept, TLS handshake, serve HTTP/1.1 and HTTP/2,
//! drain on shutdown.
//!
//! One port serves HTTP/1.1 and HTTP/2: h2 by prior knowledge (h2c) on a
//! plain listener, and by ALPN on a TLS one. A plain connection's first bytes
//! are peeked at: HTTP/1 goes to Usher's own server side (`h1.rs`), h2c to
//! hyper's HTTP/2 builder. On TLS, ALPN picks hyper's HTTP/1 or HTTP/2
//! builder. Only a connection that leaves it open (a preface cut short, a TLS
//! client without ALPN) goes to hyper-util's auto builder, which reads the
//! first bytes itself. See `serve_conn` for why.
//!
//! The TLS handshake runs in the connection's own task under
//! `handshake_timeout`, so a slow handshake never holds up the accept loop.
//!
//! Timeouts. Plain HTTP/1 (`h1.rs`): an idle keep-alive connection waits up
//! to `client_keepalive` for its next request (nginx's `keepalive_timeout`),
//! and a head must be whole within `client_header` of its first byte. hyper
//! (TLS, h2c, sniffed) has one timer for both: it starts whenever a
//! connection waits for a head, so there the idle timeout is the smaller of
//! `client_header` and `client_keepalive`. (hyper is given a timer: without
//! one its header-read timeout silently does nothing.) A plain connection's
//! first bytes are waited for no longer than that smaller one.
//!
//! A semaphore caps open connections per listener, shared by the worker
//! threads' copies of it; past the cap, new connections wait in the kernel's
//! backlog instead of being accepted. On shutdown every connection is asked
//! to finish its request in flight and close, and the listener waits for them
//! up to the grace period.

use std::convert::Infallible;
use std::future::Future;
use std::pin::{pin, Pin};
use std::sync::Arc;
use std::time::Duration;

use http::HeaderValue;
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use prometheus::IntGauge;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::task::TaskTracker;

use crate::config::{Http2Config, ListenerConfig};
use crate::edge::{handle, ConnCtx, Drain, Shared};
use crate::tls::TlsListener;
use crate::upstream::ProxyBody;

#[derive(Clone)]
pub struct ListenerSettings {
    pub name: String,
    pub header_timeout: Duration,
    pub keepalive: Duration,
    /// Set on a TLS listener.
    pub tls: Option<Arc<TlsListener>>,
    /// `max_connections`, shared by every worker thread's copy of the listener.
    pub permits: Arc<Semaphore>,
}

impl ListenerSettings {
    pub fn new(
        l: &ListenerConfig,
        header_timeout: Duration,
        keepalive: Duration,
        tls: Option<Arc<TlsListener>>,
    ) -> Self {
        ListenerSettings {
            name: l.name.clone(),
            header_timeout,
            keepalive,
            tls,
            permits: Arc::new(Semaphore::new(l.max_connections)),
        }
    }
}

/// The largest request head (request line and headers); past it, 431.
pub const MAX_HEAD: usize = 256 * 1024;

/// hyper's settings for HTTP/1, applied alike to hyper's own builder and to
/// the auto builder's (same method names, different types).
macro_rules! http1_settings {
    ($b:expr, $s:expr) => {
        $b.timer(TokioTimer::new())
            .keep_alive(true)
            .header_read_timeout($s.header_timeout.min($s.keepalive))
            .max_buf_size(MAX_HEAD)
    };
}

/// The same for HTTP/2.
macro_rules! http2_settings {
    ($b:expr, $h2:expr) => {
        $b.timer(TokioTimer::new())
            .max_concurrent_streams($h2.max_concurrent_streams)
            .max_header_list_size(u32::try_from($h2.max_header_list_size.0).unwrap_or(u32::MAX))
            .keep_alive_interval(Some($h2.keepalive_interval.0).filter(|d| !d.is_zero()))
            .keep_alive_timeout($h2.keepalive_timeout.0)
            .max_pending_accept_reset_streams($h2.max_pending_accept_reset_streams)
            .max_local_error_reset_streams($h2.max_local_error_reset_streams)
    };
}

/// The protocol a connection speaks, as far as Usher could tell before
/// handing it to hyper.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Proto {
    Http1,
    Http2,
    /// Not known yet: hyper-util's auto builder reads the first bytes.
    Sniff,
}

/// The client preface every h2 connection starts with (RFC 9113 §3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// What the first bytes of a plain connection say it speaks.
fn proto_of(first: &[u8]) -> Proto {
    if first.starts_with(H2_PREFACE) {
        Proto::Http2
    } else if H2_PREFACE.starts_with(first) {
        // Empty, or a preface cut short: cannot tell yet.
        Proto::Sniff
    } else {
        Proto::Http1
    }
}

/// What ALPN agreed on a TLS connection; a client that offered none is sniffed.
fn proto_of_alpn(alpn: Option<&[u8]>) -> Proto {
    match alpn {
        Some(b"h2") => Proto::Http2,
        Some(_) => Proto::Http1,
        None => Proto::Sniff,
    }
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

/// Serves one connection (plain or TLS) until it ends; `drain` asks it to
/// finish the request in flight and close.
///
/// A connection whose protocol is known goes to hyper's own HTTP/1 or HTTP/2
/// builder, not to the auto builder: the auto builder reads the first bytes
/// itself and replays them, and that replay makes hyper's HTTP/1 read buffer
/// grow from 8 to 16 KiB on the first request, which an idle keep-alive
/// connection then keeps.
async fn serve_conn<I>(
    io: I,
    proto: Proto,
    settings: &ListenerSettings,
    h2: &Http2Config,
    ctx: Arc<ConnCtx>,
    drain: Drain,
) where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let peer = ctx.peer;
    // Boxed: hyper keeps the service future's slot allocated for the whole
    // connection, so an unboxed `handle` future (~4 KiB) would stay resident
    // on every idle keep-alive connection. Boxed, it lives only per request.
    // hyper writes the map alone: the lines kept out of it go in first.
    let service = service_fn(move |req| {
        let ctx = ctx.clone();
        Box::pin(async move {
            let answer = handle(Box::new(req), &ctx).await;
            Ok::<_, Infallible>(ProxyBody::lines_into_map(*answer))
        })
    });
    let ended: Result<(), Box<dyn std::error::Error + Send + Sync>> = match proto {
        Proto::Http1 => {
            let mut b = http1::Builder::new();
            http1_settings!(b, settings);
            // `max_buf_size` alone is not a hard limit: one read can take the
            // buffer past it and complete a head that is too large. hyper-util's
            // auto builder does not offer this one.
            b.max_header_size(MAX_HEAD);
            let conn = b.serve_connection(io, service).with_upgrades();
            until_drained(conn, |c| c.graceful_shutdown(), &drain)
                .await
                .map_err(Into::into)
        }
        Proto::Http2 => {
            let mut b = http2::Builder::new(TokioExecutor::new());
            http2_settings!(b, h2);
            let conn = b.serve_connection(io, service);
            // Boxed, here and below: the task of every connection is as big
            // as the largest of these arms, and most connections are HTTP/1.
            Box::pin(until_drained(conn, |c| c.graceful_shutdown(), &drain))
                .await
                .map_err(Into::into)
        }
        Proto::Sniff => {
            let mut b = auto::Builder::new(TokioExecutor::new());
            http1_settings!(b.http1(), settings);
            http2_settings!(b.http2(), h2);
            let conn = b.serve_connection_with_upgrades(io, service);
            Box::pin(until_drained(conn, |c| c.graceful_shutdown(), &drain)).await
        }
    };
    if let Err(e) = ended {
        tracing::debug!(%peer, error = %e, "client connection ended with an error");
    }
}

/// Runs `conn` to its end; once `drain` fires, asks it to wind down first.
async fn until_drained<C, E>(
    conn: C,
    shutdown: impl FnOnce(Pin<&mut C>),
    drain: &Drain,
) -> Result<(), E>
where
    C: Future<Output = Result<(), E>>,
{
    let mut conn = pin!(conn);
    tokio::select! {
        r = conn.as_mut() => return r,
        () = drain.fired() => {}
    }
    shutdown(conn.as_mut());
    conn.await
}

/// Waits for a plain connection's first bytes and peeks at them, so that
/// hyper gets the stream untouched. `None`: closed, or nothing came within
/// `wait` (hyper's own head timeout only starts once it serves the connection).
async fn sniff(stream: &TcpStream, wait: Duration) -> Option<Proto> {
    let mut first = [0u8; H2_PREFACE.len()];
    match tokio::time::timeout(wait, stream.peek(&mut first)).await {
        Ok(Ok(n)) if n > 0 => Some(proto_of(&first[..n])),
        _ => None,
    }
}

/// What a connection's task owns, from accept to close.
struct Conn {
    settings: Arc<ListenerSettings>,
    h2: Http2Config,
    ctx: Arc<ConnCtx>,
    drain: Drain,
    _open: Open,
}

impl Conn {
    async fn plain(self, stream: TcpStream) {
        let wait = self.settings.header_timeout.min(self.settings.keepalive);
        let first = tokio::select! {
            p = sniff(&stream, wait) => p,
            () = self.drain.fired() => None,
        };
        let Some(proto) = first else {
            return;
        };
        if proto == Proto::Http1 {
            crate::edge::h1::serve(stream, self.ctx, &self.settings, self.drain).await;
            return;
        }
        serve_conn(
            TokioIo::new(stream),
            proto,
            &self.settings,
            &self.h2,
            self.ctx,
            self.drain,
        )
        .await;
    }

    async fn tls(self, stream: TcpStream, t: Arc<TlsListener>) {
        let peer = self.ctx.peer;
        match tokio::time::timeout(t.handshake_timeout(), t.acceptor.accept(stream)).await {
            Ok(Ok(s)) => {
                let proto = proto_of_alpn(s.get_ref().1.alpn_protocol());
                let io = TokioIo::new(s);
                serve_conn(io, proto, &self.settings, &self.h2, self.ctx, self.drain).await;
            }
            Ok(Err(e)) => {
                tracing::debug!(%peer, listener = %t.name, error = %e, "TLS handshake failed")
            }
            Err(_) => tracing::debug!(%peer, listener = %t.name, "TLS handshake timed out"),
        }
    }
}

/// One open client connection: counted in the gauge and holding a permit of
/// the listener's `max_connections` until dropped.
struct Open {
    gauge: IntGauge,
    _permit: OwnedSemaphorePermit,
}

impl Open {
    fn new(gauge: IntGauge, permit: OwnedSemaphorePermit) -> Open {
        gauge.inc();
        Open {
            gauge,
            _permit: permit,
        }
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

/// Serves one listener until `stop` fires, then lets open connections finish
/// their requests for up to `grace`.
pub async fn serve(
    listener: TcpListener,
    settings: ListenerSettings,
    shared: Arc<Shared>,
    stop: Drain,
    grace: Duration,
) {
    let settings = Arc::new(settings);
    let conns = TaskTracker::new();
    let permits = settings.permits.clone();
    let gauge = shared
        .metrics
        .client_connections
        .with_label_values(&[&settings.name]);
    loop {
        let permit = tokio::select! {
            _ = stop.fired() => break,
            p = permits.clone().acquire_owned() => p.expect("semaphore never closed"),
        };
        let (stream, peer) = tokio::select! {
            _ = stop.fired() => break,
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
        let conn = Conn {
            settings: settings.clone(),
            h2,
            ctx: Arc::new(ConnCtx {
                shared: shared.clone(),
                peer,
                peer_ip: crate::edge::headers::ip_value(peer.ip()),
                tls: settings.tls.is_some(),
                hsts: lc
                    .as_ref()
                    .and_then(|l| l.tls.as_ref()?.hsts.as_deref())
                    .and_then(|h| HeaderValue::from_str(h).ok()),
                redirect_https_port: lc
                    .as_ref()
                    .filter(|l| l.redirect_to_https)
                    .map(|l| l.https_port),
            }),
            drain: stop.clone(),
            _open: Open::new(gauge.clone(), permit),
        };
        // Two kinds of task, not one `match` inside a task: a task is as big
        // as its future, and the TLS handshake's (~7 KiB) would otherwise be
        // paid by every plain connection too.
        match settings.tls.clone() {
            None => conns.spawn(conn.plain(stream)),
            Some(t) => conns.spawn(conn.tls(stream, t)),
        };
    }
    drop(listener);
    tracing::info!(listener = %settings.name, "stopped accepting; draining connections");
    conns.close();
    if tokio::time::timeout(grace, conns.wait()).await.is_err() {
        tracing::warn!(listener = %settings.name, ?grace, "grace period over with connections still open");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_bytes_tell_h1_from_h2() {
        assert_eq!(proto_of(b"GET / HTTP/1.1\r\n"), Proto::Http1);
        assert_eq!(proto_of(b"G"), Proto::Http1);
        // "PRI" could still be an HTTP/1 method, but hyper answers it either way.
        assert_eq!(proto_of(b"PRI / HTTP/1.1\r\n\r\n"), Proto::Http1);
        assert_eq!(proto_of(H2_PREFACE), Proto::Http2);
        assert_eq!(
            proto_of(&[H2_PREFACE, b"\0\0\x12\x04"].concat()),
            Proto::Http2
        );
        assert_eq!(proto_of(b"PRI * HTTP/2.0\r\n"), Proto::Sniff);
        assert_eq!(proto_of(b"P"), Proto::Sniff);
    }

    #[test]
    fn alpn_decides_on_tls() {
        assert_eq!(proto_of_alpn(Some(b"h2")), Proto::Http2);
        assert_eq!(proto_of_alpn(Some(b"http/1.1")), Proto::Http1);
        assert_eq!(proto_of_alpn(None), Proto::Sniff);
    }
}
