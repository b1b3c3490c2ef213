//! Upgraded connections: WebSocket and any other HTTP/1.1 `Upgrade`.
//!
//! Every other request is buffered whole and sent over a pooled connection.
//! An upgrade request cannot be: after a `101 Switching Protocols` the
//! connection carries another protocol in both directions, for as long as
//! the peers like. So it goes its own way:
//!
//! 1. It is admitted against the chosen backend's `max_upgraded` count, not
//!    a request slot, since a socket open for hours must not hold one of the
//!    worker's threads (unless `upgrades.hold_slot: true`, for threaded
//!    backends whose handler really does hold a thread; the slot is then
//!    held until the socket closes).
//! 2. It is sent, with `Upgrade` and `Connection: upgrade` intact, over a
//!    connection of its own, never a pooled one.
//! 3. Only if the backend answers 101 are both sides taken over
//!    (`hyper::upgrade::on`) and bytes copied both ways until either side
//!    closes. Any other answer is an ordinary response: the backend
//!    connection is dropped, and the client connection is closed after the
//!    answer (`proxy.rs`), so bytes a client sent after its upgrade request
//!    are never read as requests, let alone forwarded.
//!
//! `Upgrade: h2c` is not passed on: it is a hop-by-hop protocol switch of
//! the client's own connection, and Usher talks to backends on its own terms.
//!
//! A tunnel ends when both sides have closed, when it has carried no byte
//! either way for `upgrades.idle_timeout`, or at shutdown. hyper's graceful
//! shutdown cannot see tunnels (once a connection is upgraded, hyper hands
//! its socket over and forgets it), so every tunnel runs on [`Tunnels`], which
//! the daemon drains after the listeners: open tunnels get what is left of
//! `shutdown_grace` to end on their own, then the rest are closed.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::dispatch::backend::Backend;
use crate::dispatch::{Slot, Tunnel};
use crate::edge::headers;
use crate::edge::ConnCtx;
use crate::error::Error;
use crate::upstream::{error_chain, Admission, Attempt, Failed, Forwarded, ProxyBody, Upstream};

/// The client's socket after a `101`, as a tunnel end.
pub trait TunnelIo: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> TunnelIo for T {}

/// How Usher's own HTTP/1 server side (`h1.rs`) hands a request's socket
/// over after writing the `101`; hyper's connections use `hyper::upgrade`.
/// (Shared and taken once: request extensions must be `Clone`.)
#[derive(Clone)]
pub struct ClientUpgrade(Arc<std::sync::Mutex<Option<UpgradeRx>>>);

type UpgradeRx = tokio::sync::oneshot::Receiver<Box<dyn TunnelIo>>;

impl ClientUpgrade {
    pub fn new(rx: UpgradeRx) -> Self {
        ClientUpgrade(Arc::new(std::sync::Mutex::new(Some(rx))))
    }

    fn take(&self) -> Option<UpgradeRx> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

/// The client's side of a tunnel, once the `101` has been written.
type ClientSide = Pin<Box<dyn Future<Output = Result<Box<dyn TunnelIo>, String>> + Send>>;

fn client_side<B>(req: &mut Request<B>) -> ClientSide {
    match req.extensions_mut().remove::<ClientUpgrade>() {
        Some(u) => {
            let rx = u.take();
            Box::pin(async move {
                match rx {
                    Some(rx) => rx
                        .await
                        .map_err(|_| "the client connection ended before the upgrade".to_string()),
                    None => Err("the upgrade was already taken".to_string()),
                }
            })
        }
        None => {
            let on = hyper::upgrade::on(req);
            Box::pin(async move {
                on.await
                    .map(|u| Box::new(TokioIo::new(u)) as Box<dyn TunnelIo>)
                    .map_err(|e| e.to_string())
            })
        }
    }
}

/// Whether a request asks to switch protocols (HTTP/1.1 `Connection:
/// upgrade` with an `Upgrade` other than `h2c`).
pub fn is_upgrade<B>(req: &Request<B>) -> bool {
    if req.version() != Version::HTTP_11 {
        return false;
    }
    let connection_upgrade = req
        .headers()
        .get_all(header::CONNECTION)
        .iter()
        .any(|v| headers::has_token(v, "upgrade"));
    let protocol = req
        .headers()
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    connection_upgrade && !protocol.is_empty() && !protocol.eq_ignore_ascii_case("h2c")
}

/// The process's open tunnels, so that shutdown can wait for them.
#[derive(Clone, Default)]
pub struct Tunnels {
    tracker: TaskTracker,
    /// Fired when the drain's time is up: every tunnel closes at once.
    close: CancellationToken,
}

impl Tunnels {
    /// Tunnels open (or being set up) now.
    pub fn open(&self) -> usize {
        self.tracker.len()
    }

    fn spawn(&self, task: impl Future<Output = ()> + Send + 'static) {
        self.tracker.spawn(task);
    }

    /// Lets open tunnels end on their own until `deadline`, then closes the
    /// rest. Returns how many had to be closed.
    pub async fn drain(&self, deadline: tokio::time::Instant) -> usize {
        // A tunnel that an in-flight upgrade opens after this is still
        // tracked; `close` only lets `wait` return once none are left.
        self.tracker.close();
        if tokio::time::timeout_at(deadline, self.tracker.wait())
            .await
            .is_ok()
        {
            return 0;
        }
        let left = self.tracker.len();
        self.close.cancel();
        // Each tunnel drops its sockets as soon as it sees the token.
        let _ = tokio::time::timeout(Duration::from_secs(1), self.tracker.wait()).await;
        left
    }
}

/// What keeps an upgraded connection admitted; dropping it releases. It is
/// always counted on the backend (a [`Tunnel`]); under `hold_slot` it also
/// holds a request slot.
struct Ticket {
    tunnel: Tunnel,
    _slot: Option<Slot>,
    waited: Duration,
    since: tokio::time::Instant,
}

impl Admission for Ticket {
    fn backend(&self) -> &Arc<Backend> {
        self.tunnel.backend()
    }
    fn waited(&self) -> Duration {
        self.waited
    }
    fn since(&self) -> tokio::time::Instant {
        self.since
    }
}

/// Forwards an upgrade request and, on 101, tunnels the two connections.
/// Admission, backend choice and retries are the ones every request gets
/// ([`Upstream::with_retries`]): a refused connect is retried on another
/// backend and counts for passive health; once the request is written, a
/// failure is final (a tunnel cannot be replayed).
pub async fn forward<B>(
    mut req: Request<B>,
    up: &Arc<Upstream>,
    ctx: &ConnCtx,
    host: Option<&HeaderValue>,
    request_id: &HeaderValue,
) -> Result<Forwarded, Failed> {
    let has_body = req.headers().contains_key(header::TRANSFER_ENCODING)
        || req
            .headers()
            .get(header::CONTENT_LENGTH)
            .is_some_and(|v| v.as_bytes() != b"0");
    if has_body {
        return Err(Failed {
            error: Error::BadRequest("an upgrade request must not have a body"),
            backend: None,
            queue_wait: Duration::ZERO,
        });
    }
    let client_side = client_side(&mut req);
    let (mut head, _) = req.into_parts();
    prepare_head(&mut head, ctx, host, request_id);
    if up.cfg.request_start_header {
        // An upgrade waits for no slot (unless `hold_slot`): no queue time.
        crate::upstream::stamp::Stamp::new(std::time::SystemTime::now(), Duration::ZERO)
            .insert_into(&mut head.headers);
    }
    let mut exchange = Upgrade {
        up: up.clone(),
        tunnels: ctx.shared.tunnels.clone(),
        request: Some((head, client_side)),
    };
    up.with_retries(&http::Method::GET, &mut exchange)
        .await
        .map(|(response, backend, queue_wait)| Forwarded {
            response: Box::new(response),
            backend: Some(backend),
            queue_wait,
        })
}

/// An upgrade request on its way: a ticket, a connection of its own, and on
/// 101 a tunnel.
struct Upgrade {
    up: Arc<Upstream>,
    tunnels: Tunnels,
    /// Taken by the attempt that connects: only it sends the request.
    request: Option<(http::request::Parts, ClientSide)>,
}

impl crate::upstream::Exchange for Upgrade {
    type Admission = Ticket;
    type Output = Response<ProxyBody>;

    async fn admit(
        &mut self,
        avoid: &[std::net::SocketAddr],
        retry: bool,
    ) -> Result<Ticket, Error> {
        let (up, cfg) = (&self.up, &self.up.cfg.upgrades);
        if cfg.hold_slot {
            let a = up
                .dispatcher
                .acquire(avoid, retry)
                .await
                .map_err(|r| r.into_error(&up.name))?;
            return Ok(Ticket {
                tunnel: Tunnel::open(a.slot.backend().clone()),
                _slot: Some(a.slot),
                waited: a.waited,
                since: a.since,
            });
        }
        let tunnel = up
            .dispatcher
            .admit_upgrade(avoid, cfg.max_upgraded)
            .map_err(|r| r.into_error(&up.name))?;
        Ok(Ticket {
            tunnel,
            _slot: None,
            waited: Duration::ZERO,
            since: tokio::time::Instant::now(),
        })
    }

    async fn attempt(&mut self, ticket: Ticket) -> Attempt<Response<ProxyBody>> {
        let up = &self.up;
        let backend = ticket.backend().clone();
        let connect = tokio::time::timeout(
            up.cfg.timeouts.connect.0,
            up.connector.connect_to(backend.addr),
        )
        .await;
        let reason = match connect {
            Ok(Ok(io)) => {
                let Some((head, client_side)) = self.request.take() else {
                    return Attempt::Final(Error::Upstream {
                        backend: backend.key.clone(),
                        reason: "upgrade request already sent".into(),
                    });
                };
                return match exchange(up, head, io, ticket, client_side, &self.tunnels).await {
                    Ok(response) => Attempt::Done(response),
                    Err(e) => Attempt::Final(e),
                };
            }
            Ok(Err(e)) => e.to_string(),
            Err(_) => "connect timed out".to_string(),
        };
        up.count(&backend, "connect_error");
        up.note_failure(&backend, true);
        tracing::debug!(upstream = %up.name, backend = %backend.key, %reason, "upgrade: connect failed");
        Attempt::NotSent(Error::Connect {
            backend: backend.key.clone(),
            reason,
        })
    }
}

/// Rewrites the head for the backend like any request (forwarded headers,
/// request id), but keeps the upgrade: `Connection: upgrade` and `Upgrade`.
fn prepare_head(
    head: &mut http::request::Parts,
    ctx: &ConnCtx,
    host: Option<&HeaderValue>,
    request_id: &HeaderValue,
) {
    let h = &mut head.headers;
    let protocol = h.get(header::UPGRADE).cloned();
    headers::strip_hop_by_hop(h);
    h.remove(header::CONTENT_LENGTH);
    if let Some(p) = protocol {
        h.insert(header::UPGRADE, p);
        h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
    let proto = if ctx.tls { "https" } else { "http" };
    headers::set_upstream_identity(h, &ctx.peer_ip, proto, host, request_id);
    let pq = head.uri.path_and_query().map_or("/", |p| p.as_str());
    head.uri = pq.parse().unwrap_or_else(|_| http::Uri::from_static("/"));
    head.version = Version::HTTP_11;
}

/// After one side of a tunnel has closed, how long the other may go on
/// sending before the tunnel is torn down. WebSocket peers close both ways
/// at once; this only bounds a peer that never closes its end.
const HALF_CLOSE_GRACE: Duration = Duration::from_secs(5);

/// Why a tunnel ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// Both sides closed (or one did, [`HALF_CLOSE_GRACE`] before the other).
    Closed,
    /// No byte either way for the idle timeout.
    Idle,
    /// Shutdown's grace ran out.
    Shutdown,
}

/// When bytes last moved through a tunnel, either way.
struct Activity {
    start: tokio::time::Instant,
    /// Milliseconds after `start`.
    last: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Activity {
            start: tokio::time::Instant::now(),
            last: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        let ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last.fetch_max(ms, Ordering::Relaxed);
    }

    fn last(&self) -> tokio::time::Instant {
        self.start + Duration::from_millis(self.last.load(Ordering::Relaxed))
    }

    /// Returns once nothing has moved for `limit`; never without one.
    async fn idle_for(&self, limit: Option<Duration>) {
        let Some(limit) = limit else {
            return std::future::pending().await;
        };
        loop {
            let due = self.last() + limit;
            if tokio::time::Instant::now() >= due {
                return;
            }
            tokio::time::sleep_until(due).await;
        }
    }
}

/// One direction's reader: counts the bytes it reads and marks activity.
struct Metered<'a, R> {
    inner: R,
    bytes: &'a AtomicU64,
    activity: &'a Activity,
}

impl<R: AsyncRead + Unpin> AsyncRead for Metered<'_, R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            self.bytes.fetch_add(n as u64, Ordering::Relaxed);
            self.activity.touch();
        }
        polled
    }
}

/// Copies bytes both ways until both directions end (or one ended
/// [`HALF_CLOSE_GRACE`] ago), nothing has moved for `idle_timeout`, or
/// `close` fires. Returns the bytes sent each way and why it ended; the
/// sockets are dropped (closed) on return.
async fn tunnel<C, S>(
    client: C,
    server: S,
    idle_timeout: Option<Duration>,
    close: &CancellationToken,
) -> (u64, u64, End)
where
    C: AsyncRead + AsyncWrite,
    S: AsyncRead + AsyncWrite,
{
    use tokio::io::AsyncWriteExt;
    let activity = Activity::new();
    let (up_bytes, down_bytes) = (AtomicU64::new(0), AtomicU64::new(0));
    let (cr, mut cw) = tokio::io::split(client);
    let (sr, mut sw) = tokio::io::split(server);
    let mut cr = Metered {
        inner: cr,
        bytes: &up_bytes,
        activity: &activity,
    };
    let mut sr = Metered {
        inner: sr,
        bytes: &down_bytes,
        activity: &activity,
    };
    let up = async {
        let _ = tokio::io::copy(&mut cr, &mut sw).await;
        let _ = sw.shutdown().await;
    };
    let down = async {
        let _ = tokio::io::copy(&mut sr, &mut cw).await;
        let _ = cw.shutdown().await;
    };
    let both = async {
        tokio::pin!(up, down);
        tokio::select! {
            _ = &mut up => { let _ = tokio::time::timeout(HALF_CLOSE_GRACE, down).await; }
            _ = &mut down => { let _ = tokio::time::timeout(HALF_CLOSE_GRACE, up).await; }
        }
    };
    let end = tokio::select! {
        _ = both => End::Closed,
        _ = activity.idle_for(idle_timeout) => End::Idle,
        _ = close.cancelled() => End::Shutdown,
    };
    (up_bytes.into_inner(), down_bytes.into_inner(), end)
}

/// Sends the request on its own connection; on 101 starts the tunnel.
async fn exchange(
    up: &Upstream,
    head: http::request::Parts,
    io: crate::tls::connector::UpstreamStream,
    ticket: Ticket,
    client_side: ClientSide,
    tunnels: &Tunnels,
) -> Result<Response<ProxyBody>, Error> {
    let backend = ticket.backend().clone();
    let timeout = up.cfg.timeouts.response.0;
    let deadline = tokio::time::Instant::now() + timeout;
    let upstream_err = |reason: String| Error::Upstream {
        backend: backend.key.clone(),
        reason,
    };
    let (mut sender, conn) = hyper::client::conn::http1::handshake::<_, Full<Bytes>>(io)
        .await
        .map_err(|e| upstream_err(error_chain(&e)))?;
    tokio::spawn(async move {
        // Drives the connection; with upgrades, it hands the socket over
        // after a 101 instead of closing it.
        let _ = conn.with_upgrades().await;
    });
    let method = head.method.clone();
    let req = Request::from_parts(head, Full::new(Bytes::new()));
    let mut resp = match tokio::time::timeout_at(deadline, sender.send_request(req)).await {
        Err(_) => {
            up.count(&backend, "timeout");
            return Err(Error::UpstreamTimeout {
                backend: backend.key.clone(),
                timeout,
            });
        }
        Ok(Err(e)) => {
            up.count(&backend, "error");
            return Err(upstream_err(error_chain(&e)));
        }
        Ok(Ok(r)) => r,
    };
    // A worker's load report is for Usher, on a tunnel's answer as on any
    // other (tunnels are counted by ticket, not by the report).
    resp.headers_mut()
        .remove(&crate::upstream::framing::X_USHER_LOAD);
    let status = resp.status();
    up.count(&backend, status.as_str());
    if status != StatusCode::SWITCHING_PROTOCOLS {
        // An ordinary answer: read it whole, and let the connection go.
        // Framed by Usher like any response (see `upstream::framing`).
        let (mut parts, body) = resp.into_parts();
        crate::upstream::framing::take_response_framing(&method, status, &mut parts.headers)
            .map_err(|reason| {
                up.count(&backend, "error");
                up.note_failure(&backend, false);
                upstream_err(reason.to_string())
            })?;
        let limit = usize::try_from(up.max_response_buffer).unwrap_or(usize::MAX);
        let body = tokio::time::timeout_at(deadline, Limited::new(body, limit).collect())
            .await
            .map_err(|_| Error::UpstreamTimeout {
                backend: backend.key.clone(),
                timeout,
            })?
            .map_err(|e| upstream_err(format!("response body: {e}")))?
            .to_bytes();
        drop(ticket);
        return Ok(Response::from_parts(parts, ProxyBody::full(body)));
    }

    let backend_side = hyper::upgrade::on(&mut resp);
    let (mut parts, _) = resp.into_parts();
    let protocol = parts.headers.get(header::UPGRADE).cloned();
    headers::strip_hop_by_hop(&mut parts.headers);
    if let Some(p) = protocol {
        parts.headers.insert(header::UPGRADE, p);
    }
    parts
        .headers
        .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    let (name, key) = (up.name.clone(), backend.key.clone());
    let idle_timeout = Some(up.cfg.upgrades.idle_timeout.0).filter(|d| !d.is_zero());
    let close = tunnels.close.clone();
    tunnels.spawn(async move {
        let sides = tokio::select! {
            sides = async { tokio::join!(client_side, backend_side) } => Some(sides),
            _ = close.cancelled() => None,
        };
        match sides {
            None => tracing::debug!(upstream = %name, backend = %key, "shut down before the upgrade completed"),
            Some((Ok(client), Ok(server))) => {
                let (up_bytes, down_bytes, end) =
                    tunnel(client, TokioIo::new(server), idle_timeout, &close).await;
                tracing::debug!(upstream = %name, backend = %key, up_bytes, down_bytes, ?end, "upgraded connection closed");
            }
            Some((c, s)) => tracing::debug!(
                upstream = %name,
                backend = %key,
                client = ?c.err(),
                backend_err = ?s.err(),
                "upgrade did not complete"
            ),
        }
        drop(ticket);
    });
    Ok(Response::from_parts(parts, ProxyBody::empty()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(version: Version, headers: &[(&str, &str)]) -> Request<()> {
        let mut b = Request::get("/").version(version);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap()
    }

    #[test]
    fn recognises_upgrades_but_not_h2c_or_other_versions() {
        let ws = [
            ("connection", "keep-alive, Upgrade"),
            ("upgrade", "websocket"),
        ];
        assert!(is_upgrade(&req(Version::HTTP_11, &ws)));
        assert!(!is_upgrade(&req(Version::HTTP_10, &ws)));
        assert!(!is_upgrade(&req(Version::HTTP_2, &ws)));
        assert!(!is_upgrade(&req(
            Version::HTTP_11,
            &[("upgrade", "websocket")]
        )));
        assert!(!is_upgrade(&req(
            Version::HTTP_11,
            &[("connection", "upgrade"), ("upgrade", "h2c")]
        )));
        assert!(!is_upgrade(&req(
            Version::HTTP_11,
            &[("connection", "upgrade")]
        )));
    }

    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
    use tokio::time::Instant as TokioInstant;

    /// A tunnel between two in-memory peers: (client peer, backend peer, tunnel).
    fn pair(
        idle: Option<Duration>,
        close: CancellationToken,
    ) -> (
        DuplexStream,
        DuplexStream,
        tokio::task::JoinHandle<(u64, u64, End)>,
    ) {
        let (client, client_peer) = tokio::io::duplex(1024);
        let (server, server_peer) = tokio::io::duplex(1024);
        let t = tokio::spawn(async move { tunnel(client, server, idle, &close).await });
        (client_peer, server_peer, t)
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_tunnel_is_closed_after_the_idle_timeout() {
        let start = TokioInstant::now();
        let (mut c, mut s, t) = pair(Some(Duration::from_millis(300)), CancellationToken::new());
        c.write_all(b"hi").await.unwrap();
        let mut buf = [0u8; 2];
        s.read_exact(&mut buf).await.unwrap();
        let (up, down, end) = t.await.unwrap();
        assert_eq!((up, down, end), (2, 0, End::Idle));
        let took = start.elapsed();
        assert!(
            took >= Duration::from_millis(300) && took < Duration::from_millis(400),
            "{took:?}"
        );
        // Both peers see the tunnel gone.
        assert_eq!(c.read(&mut buf).await.unwrap(), 0);
        assert_eq!(s.read(&mut buf).await.unwrap(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn traffic_either_way_keeps_a_tunnel_open() {
        let start = TokioInstant::now();
        let (mut c, mut s, t) = pair(Some(Duration::from_millis(300)), CancellationToken::new());
        let mut buf = [0u8; 1];
        for i in 0..10u8 {
            tokio::time::sleep(Duration::from_millis(200)).await;
            assert!(!t.is_finished(), "closed after {:?}", start.elapsed());
            // Alternate directions: either one counts as activity.
            if i % 2 == 0 {
                c.write_all(&[i]).await.unwrap();
                s.read_exact(&mut buf).await.unwrap();
            } else {
                s.write_all(&[i]).await.unwrap();
                c.read_exact(&mut buf).await.unwrap();
            }
            assert_eq!(buf[0], i);
        }
        let (up, down, end) = t.await.unwrap();
        assert_eq!((up, down, end), (5, 5, End::Idle));
        assert!(start.elapsed() >= Duration::from_millis(2300));
    }

    #[tokio::test(start_paused = true)]
    async fn without_an_idle_timeout_a_tunnel_ends_when_both_sides_close() {
        let (c, s, t) = pair(None, CancellationToken::new());
        tokio::time::sleep(Duration::from_secs(24 * 3600)).await;
        assert!(!t.is_finished());
        drop((c, s));
        assert_eq!(t.await.unwrap(), (0, 0, End::Closed));
    }

    #[tokio::test(start_paused = true)]
    async fn closing_ends_a_tunnel_at_once() {
        let close = CancellationToken::new();
        let (_c, _s, t) = pair(None, close.clone());
        tokio::time::sleep(Duration::from_secs(60)).await;
        close.cancel();
        assert_eq!(t.await.unwrap().2, End::Shutdown);
    }

    #[tokio::test(start_paused = true)]
    async fn drain_waits_for_tunnels_then_closes_the_rest() {
        let tunnels = Tunnels::default();
        // One ends on its own within the grace, one never does.
        tunnels.spawn(tokio::time::sleep(Duration::from_secs(1)));
        let close = tunnels.close.clone();
        let (closed_tx, closed_rx) = tokio::sync::oneshot::channel();
        tunnels.spawn(async move {
            close.cancelled().await;
            let _ = closed_tx.send(());
        });
        assert_eq!(tunnels.open(), 2);
        let start = TokioInstant::now();
        assert_eq!(tunnels.drain(start + Duration::from_secs(2)).await, 1);
        assert_eq!(start.elapsed(), Duration::from_secs(2));
        closed_rx.await.expect("the open tunnel was told to close");
        assert_eq!(tunnels.open(), 0);

        // Nothing left open: the drain returns at once.
        let idle = Tunnels::default();
        let start = TokioInstant::now();
        assert_eq!(idle.drain(start + Duration::from_secs(30)).await, 0);
        assert_eq!(start.elapsed(), Duration::ZERO);
    }
}
