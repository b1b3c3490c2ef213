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
//! Tunnels are not drained on shutdown; they end with the process.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

use crate::backend::Backend;
use crate::dispatch::Slot;
use crate::error::Error;
use crate::headers;
use crate::proxy::ConnCtx;
use crate::upstream::{error_chain, Failed, Forwarded, ProxyBody, Upstream};

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
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    let protocol = req
        .headers()
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    connection_upgrade && !protocol.is_empty() && !protocol.eq_ignore_ascii_case("h2c")
}

/// What keeps an upgraded connection admitted; dropping it releases.
enum Ticket {
    Upgraded(UpgradeGuard),
    Slot(Slot),
}

impl Ticket {
    fn backend(&self) -> &Arc<Backend> {
        match self {
            Ticket::Upgraded(g) => &g.0,
            Ticket::Slot(s) => s.backend(),
        }
    }
}

/// One counted upgraded connection on a backend.
struct UpgradeGuard(Arc<Backend>);

impl Drop for UpgradeGuard {
    fn drop(&mut self) {
        self.0.dec_upgraded();
    }
}

/// Picks the available backend with the fewest upgraded connections
/// relative to its weight (random tie-break) that is under `max`.
fn pick(backends: &[Arc<Backend>], avoid: &[Arc<Backend>], max: u32) -> Result<UpgradeGuard, bool> {
    let now = Instant::now();
    let mut candidates: Vec<&Arc<Backend>> = backends
        .iter()
        .filter(|b| b.is_available(now) && !avoid.iter().any(|a| Arc::ptr_eq(a, b)))
        .collect();
    if candidates.is_empty() {
        return Err(false);
    }
    fastrand::shuffle(&mut candidates);
    candidates.sort_by(|a, b| {
        let la = u64::from(a.upgraded()) * u64::from(b.weight());
        let lb = u64::from(b.upgraded()) * u64::from(a.weight());
        la.cmp(&lb)
    });
    candidates
        .into_iter()
        .find(|b| b.try_inc_upgraded(max))
        .map(|b| UpgradeGuard(b.clone()))
        .ok_or(true)
}

/// Forwards an upgrade request and, on 101, tunnels the two connections.
pub async fn forward(
    mut req: Request<Incoming>,
    up: &Arc<Upstream>,
    ctx: &ConnCtx,
    host: Option<&str>,
    request_id: &str,
) -> Result<Forwarded, Failed> {
    let fail = |error: Error, backend: Option<String>, queue_wait: Duration| Failed {
        error,
        backend,
        queue_wait,
    };
    let has_body = req.headers().contains_key(header::TRANSFER_ENCODING)
        || req
            .headers()
            .get(header::CONTENT_LENGTH)
            .is_some_and(|v| v.as_bytes() != b"0");
    if has_body {
        return Err(fail(
            Error::BadRequest("an upgrade request must not have a body"),
            None,
            Duration::ZERO,
        ));
    }
    let client_side = hyper::upgrade::on(&mut req);
    let (mut head, _) = req.into_parts();
    prepare_head(&mut head, ctx, host, request_id);

    let cfg = &up.cfg.upgrades;
    let max_attempts = 1 + up.cfg.retries.attempts;
    let mut avoid: Vec<Arc<Backend>> = Vec::new();
    let mut queue_wait = Duration::ZERO;
    let mut last: Option<String> = None;
    for attempt in 1..=max_attempts {
        let ticket = if cfg.hold_slot {
            let avoid_addrs: Vec<_> = avoid.iter().map(|b| b.addr).collect();
            match up.dispatcher.acquire(&avoid_addrs, attempt > 1).await {
                Ok(a) => {
                    queue_wait += a.waited;
                    Ticket::Slot(a.slot)
                }
                Err(r) => return Err(fail(Error::from_rejection(r, &up.name), last, queue_wait)),
            }
        } else {
            match pick(&up.dispatcher.backends(), &avoid, cfg.max_upgraded) {
                Ok(g) => Ticket::Upgraded(g),
                Err(full) => {
                    let upstream = up.name.clone();
                    let error = if full {
                        Error::UpgradeLimit { upstream }
                    } else {
                        Error::NoBackend { upstream }
                    };
                    return Err(fail(error, last, queue_wait));
                }
            }
        };
        let backend = ticket.backend().clone();
        last = Some(backend.key.clone());
        let connect = tokio::time::timeout(
            up.cfg.timeouts.connect.0,
            up.connector.connect_to(backend.addr),
        )
        .await;
        let io = match connect {
            Ok(Ok(io)) => io,
            Ok(Err(e)) => {
                count(up, &backend, "connect_error");
                tracing::debug!(upstream = %up.name, backend = %backend.key, error = %e, "upgrade: connect failed");
                avoid.push(backend.clone());
                if attempt == max_attempts {
                    return Err(fail(
                        Error::Connect {
                            backend: backend.key.clone(),
                            reason: e.to_string(),
                        },
                        last,
                        queue_wait,
                    ));
                }
                continue;
            }
            Err(_) => {
                count(up, &backend, "connect_error");
                avoid.push(backend.clone());
                if attempt == max_attempts {
                    return Err(fail(
                        Error::Connect {
                            backend: backend.key.clone(),
                            reason: "connect timed out".into(),
                        },
                        last,
                        queue_wait,
                    ));
                }
                continue;
            }
        };
        return exchange(up, head, io, ticket, client_side)
            .await
            .map(|response| Forwarded {
                response,
                backend: backend.key.clone(),
                queue_wait,
            })
            .map_err(|e| fail(e, last, queue_wait));
    }
    unreachable!("the loop returns on its last attempt")
}

fn count(up: &Upstream, backend: &Backend, code: &str) {
    up.metrics
        .backend_requests
        .with_label_values(&[&up.name, &backend.key, code])
        .inc();
}

/// Rewrites the head for the backend like any request (forwarded headers,
/// request id), but keeps the upgrade: `Connection: upgrade` and `Upgrade`.
fn prepare_head(
    head: &mut http::request::Parts,
    ctx: &ConnCtx,
    host: Option<&str>,
    request_id: &str,
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
    headers::set_upstream_identity(h, &ctx.peer.ip().to_string(), proto, host, request_id);
    let pq = head.uri.path_and_query().map_or("/", |p| p.as_str());
    head.uri = pq.parse().unwrap_or_else(|_| http::Uri::from_static("/"));
    head.version = Version::HTTP_11;
}

/// After one side of a tunnel has closed, how long the other may go on
/// sending before the tunnel is torn down. WebSocket peers close both ways
/// at once; this only bounds a peer that never closes its end.
const HALF_CLOSE_GRACE: Duration = Duration::from_secs(5);

/// Copies bytes both ways until both directions end (or one ended
/// [`HALF_CLOSE_GRACE`] ago). Returns the bytes sent each way.
async fn tunnel<C, S>(client: C, server: S) -> (u64, u64)
where
    C: tokio::io::AsyncRead + tokio::io::AsyncWrite,
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite,
{
    use tokio::io::AsyncWriteExt;
    let (mut cr, mut cw) = tokio::io::split(client);
    let (mut sr, mut sw) = tokio::io::split(server);
    let up = async {
        let n = tokio::io::copy(&mut cr, &mut sw).await.unwrap_or(0);
        let _ = sw.shutdown().await;
        n
    };
    let down = async {
        let n = tokio::io::copy(&mut sr, &mut cw).await.unwrap_or(0);
        let _ = cw.shutdown().await;
        n
    };
    tokio::pin!(up, down);
    tokio::select! {
        n = &mut up => (n, tokio::time::timeout(HALF_CLOSE_GRACE, down).await.unwrap_or(0)),
        n = &mut down => (tokio::time::timeout(HALF_CLOSE_GRACE, up).await.unwrap_or(0), n),
    }
}

/// Sends the request on its own connection; on 101 starts the tunnel.
async fn exchange(
    up: &Upstream,
    head: http::request::Parts,
    io: crate::tls::connector::UpstreamStream,
    ticket: Ticket,
    client_side: hyper::upgrade::OnUpgrade,
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
    let req = Request::from_parts(head, Full::new(Bytes::new()));
    let mut resp = match tokio::time::timeout_at(deadline, sender.send_request(req)).await {
        Err(_) => {
            count(up, &backend, "timeout");
            return Err(Error::UpstreamTimeout {
                backend: backend.key.clone(),
                timeout,
            });
        }
        Ok(Err(e)) => {
            count(up, &backend, "error");
            return Err(upstream_err(error_chain(&e)));
        }
        Ok(Ok(r)) => r,
    };
    let status = resp.status();
    count(up, &backend, status.as_str());
    if status != StatusCode::SWITCHING_PROTOCOLS {
        // An ordinary answer: read it whole, and let the connection go.
        let (parts, body) = resp.into_parts();
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
    tokio::spawn(async move {
        let (client, server) = tokio::join!(client_side, backend_side);
        match (client, server) {
            (Ok(client), Ok(server)) => {
                let (up_bytes, down_bytes) =
                    tunnel(TokioIo::new(client), TokioIo::new(server)).await;
                tracing::debug!(upstream = %name, backend = %key, up_bytes, down_bytes, "upgraded connection closed");
            }
            (c, s) => tracing::debug!(
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

    #[test]
    fn picks_the_least_upgraded_backend_under_the_limit() {
        let b = |port| {
            Arc::new(Backend::new(
                format!("127.0.0.1:{port}").parse().unwrap(),
                1,
                None,
                4,
            ))
        };
        let (a, c) = (b(1), b(2));
        let all = vec![a.clone(), c.clone()];
        let g1 = pick(&all, &[], 1).unwrap();
        let g2 = pick(&all, &[], 1).unwrap();
        assert!(!Arc::ptr_eq(&g1.0, &g2.0));
        assert_eq!(pick(&all, &[], 1).err(), Some(true), "both are full");
        drop(g1);
        let g3 = pick(&all, &[], 1).unwrap();
        assert_eq!(g3.0.upgraded(), 1);
        assert_eq!(
            pick(&all, &all, 5).err(),
            Some(false),
            "nothing left to try"
        );
        drop((g2, g3));
        assert_eq!(a.upgraded() + c.upgraded(), 0);
    }
}
