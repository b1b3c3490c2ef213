//! The request path: route, buffer the body, forward, answer.
//!
//! Each client request is read whole before it is admitted, so a slow client
//! never holds a worker thread; see `upstream.rs` for the response side.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Body;

use crate::control::state::State;
use crate::edge::headers::{self, Identity, Present};
use crate::error::Error;
use crate::http1::Lines;
use crate::observe::access_log::{AccessLog, Entry};
use crate::observe::metrics::Metrics;
use crate::upstream::{text, Failed, Forwarded, Outbound, ProxyBody, RequestHead};

/// What every request on one listener shares.
pub struct Shared {
    pub state: Arc<ArcSwap<State>>,
    pub metrics: Arc<Metrics>,
    pub access_log: AccessLog,
    /// Open upgraded connections, drained on shutdown (`upgrade.rs`).
    pub tunnels: crate::edge::upgrade::Tunnels,
}

/// Per-connection context.
pub struct ConnCtx {
    pub shared: Arc<Shared>,
    pub peer: SocketAddr,
    /// `peer`'s IP as a header value, for `X-Forwarded-For` (made once per
    /// connection, shared by its requests).
    pub peer_ip: HeaderValue,
    pub tls: bool,
    /// `Strict-Transport-Security` for every response (TLS listeners).
    pub hsts: Option<HeaderValue>,
    /// Set when the listener redirects everything to `https://` on this port.
    pub redirect_https_port: Option<u16>,
}

/// A request body as the edge hands it over: hyper's (TLS, h2) or Usher's
/// own HTTP/1 reader's (`h1.rs`), which carries the head's lines that are
/// not in its map (`http1::Lines`).
pub trait RequestBody: Body<Data = Bytes, Error: Into<BoxError>> + Send + Unpin + 'static {
    /// The request head's lines kept out of its map, if any.
    fn take_lines(&mut self) -> Option<Box<Lines>> {
        None
    }
}

impl RequestBody for hyper::body::Incoming {}

impl RequestBody for crate::edge::h1::H1Body {
    fn take_lines(&mut self) -> Option<Box<Lines>> {
        self.take_lines()
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// `req` comes boxed: moved from the edge into `handle` and on into
/// `read_request`, it would be copied into each future (an async fn keeps
/// its arguments in its state), and make each as much larger.
pub async fn handle<B: RequestBody>(
    req: Box<Request<B>>,
    ctx: &ConnCtx,
) -> Box<Response<ProxyBody>> {
    let started = Instant::now();
    let state = ctx.shared.state.load_full();
    let present = Present::of(req.headers());
    let request_id = if present.request_id {
        headers::request_id(req.headers())
    } else {
        headers::new_request_id()
    };

    let (host, host_str, bad_host) =
        match headers::request_host(req.version(), req.uri(), req.headers()) {
            Ok(Some((value, text))) => (Some(value), Some(text), None),
            Ok(None) => (None, None, None),
            Err(reason) => (None, None, Some(reason)),
        };
    let route = match bad_host {
        Some(_) => None,
        None => state.route(host_str.unwrap_or(""), req.uri().path()),
    };
    let (route_name, upstream_name) = match route {
        Some(r) => (r.name.as_str(), r.upstream.name.as_str()),
        None => ("-", "-"),
    };
    // What the access log needs from the request, taken before the request
    // is consumed, and only when lines are written at all.
    let log_fields = ctx.shared.access_log.enabled().then(|| {
        (
            req.method().to_string(),
            req.uri()
                .path_and_query()
                .map_or_else(|| "/".to_string(), |p| p.as_str().to_string()),
            req.version(),
            req.headers()
                .get(header::USER_AGENT)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string),
        )
    });
    let backend: Option<Arc<crate::dispatch::Backend>>;
    let queue_wait: Duration;
    let mut error_text: Option<String> = None;

    let upgrade = route.is_some() && present.connection && crate::edge::upgrade::is_upgrade(&req);
    let result = match route {
        _ if bad_host.is_some() => Err(Failed {
            error: Error::BadRequest(bad_host.unwrap_or("invalid Host")),
            backend: None,
            queue_wait: Duration::ZERO,
        }),
        _ if ctx.redirect_https_port.is_some() => Ok(Forwarded {
            response: Box::new(redirect_to_https(
                host_str,
                req.uri().path_and_query().map_or("/", |p| p.as_str()),
                ctx.redirect_https_port.unwrap_or(443),
            )),
            backend: None,
            queue_wait: Duration::ZERO,
        }),
        // Usher is a reverse proxy, not a forward one: no CONNECT tunnels.
        _ if req.method() == http::Method::CONNECT && !upgrade => Err(Failed {
            error: Error::MethodNotAllowed(req.method().to_string()),
            backend: None,
            queue_wait: Duration::ZERO,
        }),
        None => Err(Failed {
            error: Error::NoRoute {
                host: host_str.unwrap_or_default().to_string(),
                path: req.uri().path().to_string(),
            },
            backend: None,
            queue_wait: Duration::ZERO,
        }),
        Some(route) => {
            let upstream = &route.upstream;
            if upgrade {
                // A tunnel's request goes through hyper's client, which
                // sees the map alone: an upgrade has a `Connection` header,
                // so every line is in it (`http1::has_connection`).
                let mut req = req;
                debug_assert!(req.body_mut().take_lines().is_none());
                // Boxed: a tunnel's future is large, and would make every
                // request's future (boxed per request: `edge::h1`) as large.
                Box::pin(crate::edge::upgrade::forward(
                    *req,
                    upstream,
                    ctx,
                    host.as_ref(),
                    &request_id,
                ))
                .await
            } else {
                match read_request(
                    req,
                    present,
                    &state,
                    ctx,
                    host.as_ref(),
                    &request_id,
                    upstream.cfg.request_start_header,
                )
                .await
                {
                    Err(error) => Err(Failed {
                        error,
                        backend: None,
                        queue_wait: Duration::ZERO,
                    }),
                    Ok(outbound) => upstream.forward(outbound).await,
                }
            }
        }
    };

    let mut response = match result {
        Ok(fwd) => {
            backend = fwd.backend;
            queue_wait = fwd.queue_wait;
            let mut resp = fwd.response;
            // A 101 keeps its Upgrade/Connection (`upgrade.rs` set them).
            if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
                headers::strip_hop_by_hop(resp.headers_mut());
                if upgrade {
                    // The backend declined the upgrade. Whatever the client
                    // sent after its request was meant for the new protocol:
                    // close rather than read it as HTTP.
                    resp.headers_mut()
                        .insert(header::CONNECTION, HeaderValue::from_static("close"));
                }
            }
            resp
        }
        Err(failed) => {
            backend = failed.backend;
            queue_wait = failed.queue_wait;
            error_text = Some(failed.error.to_string());
            if failed.error.status().is_server_error() {
                tracing::warn!(
                    upstream = upstream_name,
                    request_id = request_id.to_str().unwrap_or("-"),
                    error = %failed.error,
                    "request failed"
                );
            }
            let mut resp = error_response(&failed.error);
            if upgrade {
                // As for a declined upgrade: what the client sent after its
                // request was meant for the new protocol.
                resp.headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            resp
        }
    };
    ProxyBody::set_request_id(&mut response, request_id.clone());
    if let Some(v) = &ctx.hsts {
        response
            .headers_mut()
            .insert(header::STRICT_TRANSPORT_SECURITY, v.clone());
    }

    let duration = started.elapsed();
    let m = &ctx.shared.metrics;
    match route {
        Some(r) => {
            r.metrics.requests.inc(response.status().as_str());
            r.metrics.duration.observe(duration.as_secs_f64());
        }
        None => {
            m.requests
                .with_label_values(&[route_name, upstream_name, response.status().as_str()])
                .inc();
            m.request_duration
                .with_label_values(&[route_name, upstream_name])
                .observe(duration.as_secs_f64());
        }
    }
    if let Some((method, path, version, user_agent)) = log_fields {
        ctx.shared.access_log.log(Entry {
            time: SystemTime::now() - duration,
            peer: ctx.peer,
            method,
            path,
            version,
            status: response.status().as_u16(),
            bytes: response.body().known_len(),
            route: route_name.to_string(),
            upstream: upstream_name.to_string(),
            backend: backend.map(|b| b.key.clone()),
            duration,
            queue_wait,
            request_id: request_id.to_str().unwrap_or("-").to_string(),
            user_agent,
            error: error_text,
        });
    }
    response
}

/// Checks framing, reads the whole body (bounded in size, in time between
/// reads, and in total time), and rewrites the head for the backend: less
/// its hop-by-hop and framing headers, with what Usher tells the backend
/// beside it (`Identity`).
///
/// HTTP/1 request trailers are refused (400, and the connection closes): no
/// backend needs them (the body is re-sent with a `Content-Length`), and a
/// trailer section is where a lenient chunked parser hides the next request:
/// `0\r\nX: 1\n\r\nGET /hidden ...` reads as one trailer to hyper (bare LF
/// ends a line, `\r\n\r\n` ends the section), so `/hidden` would vanish
/// inside this request while a front proxy sees it as a request of its own.
/// h2 frames trailers itself; they are dropped.
async fn read_request<B: RequestBody>(
    req: Box<Request<B>>,
    present: Present,
    state: &State,
    ctx: &ConnCtx,
    host: Option<&HeaderValue>,
    request_id: &HeaderValue,
    stamp: bool,
) -> Result<Arc<Outbound>, Error> {
    // What `present` says the head lacks is not looked up.
    let framed = present.content_length || present.transfer_encoding;
    if framed {
        headers::check_framing(req.headers()).map_err(Error::BadRequest)?;
    }
    let limit = state.config.limits.max_request_body.0;
    let declared = present
        .content_length
        .then(|| req.headers().get(header::CONTENT_LENGTH))
        .flatten()
        .map(|v| {
            v.to_str()
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
                .ok_or(Error::BadRequest("invalid Content-Length"))
        })
        .transpose()?;
    if declared.is_some_and(|n| n > limit) {
        return Err(Error::BodyTooLarge { limit });
    }
    let (mut head, mut body) = (*req).into_parts();
    let lines = body.take_lines();
    let gap = state.config.timeouts.client_body.0;
    let total = state.config.timeouts.client_request.0;
    // Both clocks start at the first wait: a request without a body (most)
    // reads none.
    let mut deadline = None;
    // A body that arrives in one frame is passed on as it is; only one that
    // comes in pieces is copied together.
    let mut first: Option<Bytes> = None;
    let mut buf = BytesMut::new();
    loop {
        if body.is_end_stream() {
            break;
        }
        let now = tokio::time::Instant::now();
        let deadline = *deadline.get_or_insert(now + total);
        let next = now + gap;
        let frame = match tokio::time::timeout_at(next.min(deadline), body.frame()).await {
            Err(_) if next < deadline => return Err(Error::ClientTooSlow(gap)),
            Err(_) => return Err(Error::RequestDeadline(total)),
            Ok(None) => break,
            Ok(Some(Err(e))) => return Err(Error::ClientBody(e.into())),
            Ok(Some(Ok(f))) => f,
        };
        match frame.into_data() {
            Ok(data) => {
                let had = first.as_ref().map_or(0, Bytes::len) + buf.len();
                if had as u64 + data.len() as u64 > limit {
                    return Err(Error::BodyTooLarge { limit });
                }
                if had == 0 {
                    first = Some(data);
                } else {
                    if let Some(f) = first.take() {
                        buf.extend_from_slice(&f);
                    }
                    buf.extend_from_slice(&data);
                }
            }
            Err(_) if head.version < http::Version::HTTP_2 => {
                return Err(Error::BadRequest("request trailers are not accepted"));
            }
            Err(_) => {}
        }
    }

    // The wall clock is read only for an upstream that is told it.
    let read_at = stamp.then(std::time::SystemTime::now);
    let h = &mut head.headers;
    headers::strip_hop_by_hop(h);
    if present.content_length {
        h.remove(header::CONTENT_LENGTH);
    }
    let proto = if ctx.tls { "https" } else { "http" };
    let identity = Identity::of_request(h, present, &ctx.peer_ip, proto, host, request_id);
    head.version = http::Version::HTTP_11;
    let body = match first {
        Some(f) if buf.is_empty() => f,
        _ => buf.freeze(),
    };
    Ok(Arc::new(Outbound {
        head: RequestHead { parts: head, lines },
        identity,
        body,
        read_at,
    }))
}

/// `308` to the same host (without its port) and path on `https://`.
fn redirect_to_https(host: Option<&str>, path: &str, port: u16) -> Response<ProxyBody> {
    let Some(host) = host.filter(|h| !h.is_empty()) else {
        return text(
            StatusCode::BAD_REQUEST,
            "400 Bad Request: a Host header is needed to redirect to HTTPS\n",
        );
    };
    // Strip a port, keeping IPv6 brackets: `[::1]:80` → `[::1]`.
    let name = match host.rsplit_once(':') {
        Some((h, p)) if p.chars().all(|c| c.is_ascii_digit()) && !h.ends_with(':') => h,
        _ => host,
    };
    let location = if port == 443 {
        format!("https://{name}{path}")
    } else {
        format!("https://{name}:{port}{path}")
    };
    match HeaderValue::from_str(&location) {
        Ok(v) => {
            let mut resp = text(
                StatusCode::PERMANENT_REDIRECT,
                format!("308 Permanent Redirect: {location}\n"),
            );
            resp.headers_mut().insert(header::LOCATION, v);
            resp
        }
        Err(_) => text(StatusCode::BAD_REQUEST, "400 Bad Request: invalid Host\n"),
    }
}

/// A short plain-text answer naming the reason. Never empty. Boxed, as every
/// response on its way to a client is (`Forwarded`).
pub fn error_response(e: &Error) -> Box<Response<ProxyBody>> {
    let status = e.status();
    let body = format!(
        "{} {}: {}\n",
        status.as_u16(),
        status.canonical_reason().unwrap_or(""),
        e.client_text()
    );
    let mut resp = Response::new(ProxyBody::full(body));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    if let Some(secs) = e.retry_after() {
        h.insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
    if e.closes_connection() {
        h.insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    Box::new(resp)
}
