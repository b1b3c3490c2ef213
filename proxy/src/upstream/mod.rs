//! One upstream: its dispatcher, its connection pool, and forwarding with
//! retries.
//!
//! When does a request complete, from a worker's point of view? When its
//! thread is free again, which is when the worker has written the whole
//! response. So the slot is held until the response body has been read from
//! the backend (or the connection failed) — not until the client has read it.
//! Responses up to `max_response_buffer` are read whole into memory, the slot
//! is released, and the client is then served at its own pace. Larger ones
//! stream and hold the slot until done.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Full};

use crate::config::{UpstreamConfig, UpstreamProtocol};
use crate::dispatch::backend::{parse_load, Backend};
use crate::dispatch::{Dispatcher, Slot};
use crate::edge::headers::Identity;
use crate::error::Error;
use crate::health::{self, Verdict};
use crate::http1::Lines;
use crate::observe::metrics::Metrics;
use crate::timer::Deadline;
use crate::tls::connector::UpstreamConnector;
use framing::{REFUSED_BUSY, X_USHER_LOAD, X_USHER_REFUSED};

pub mod body;
pub mod detach;
pub mod framing;
pub mod h1;
pub mod pool;
pub mod retry;
pub mod stamp;

pub use crate::error::error_chain;
use body::UpstreamBody;
pub use body::{text, ProxyBody};
use detach::Detached;
use h1::Outgoing;
use pool::{Pool, SendError};
use retry::is_idempotent;
pub use retry::RetryBudget;

pub use crate::tls::connector::{build_client, HttpClient as UpstreamClient};

pub struct Upstream {
    pub name: String,
    pub cfg: UpstreamConfig,
    pub dispatcher: Arc<Dispatcher>,
    /// hyper-util's client: requests to `protocol: http2` upstreams, and
    /// health checks and capacity probes.
    pub client: UpstreamClient,
    /// Usher's own pool: requests to HTTP/1 upstreams (`pool.rs`).
    pub pool: Pool,
    /// Connections outside the pool (upgraded requests).
    pub connector: UpstreamConnector,
    pub metrics: Arc<Metrics>,
    pub max_response_buffer: u64,
    pub retry_budget: Arc<RetryBudget>,
}

/// A response on its way to the client, with what the access log needs.
pub struct Forwarded {
    /// Boxed from the backend's answer to the client's socket: moved
    /// through a handful of futures, a pointer costs less than its 272 bytes.
    pub response: Box<Response<ProxyBody>>,
    /// The backend that answered (none for answers Usher makes itself).
    pub backend: Option<Arc<Backend>>,
    pub queue_wait: Duration,
}

/// Details of a failed forward, for the access log.
pub struct Failed {
    pub error: Error,
    /// The last backend tried, if any.
    pub backend: Option<Arc<Backend>>,
    pub queue_wait: Duration,
}

/// One attempt's outcome, as the retry loop sees it.
pub enum Attempt<T> {
    Done(T),
    /// Failed before the request reached the backend: safe to retry anywhere.
    NotSent(Error),
    /// Failed after the request may have reached the backend: retried only
    /// for idempotent methods.
    Sent(Error),
    /// Never retried: a timed-out request is most likely still running on
    /// the backend's thread (retrying would pile more work on a fleet that
    /// is already too slow), and a tunnel cannot be replayed.
    Final(Error),
    /// The worker refused it at once for lack of a free thread
    /// (`X-Usher-Refused: busy`): nothing of it ran. It queues again at the
    /// head, without counting an attempt or a failure.
    Refused,
}

/// What admission to a backend hands an attempt: a request slot, or an
/// upgraded connection's ticket.
pub trait Admission {
    fn backend(&self) -> &Arc<Backend>;
    /// Time spent queued for it.
    fn waited(&self) -> Duration;
    /// When the wait for it began, on tokio's clock.
    fn since(&self) -> tokio::time::Instant;
}

impl Admission for crate::dispatch::Admitted {
    fn backend(&self) -> &Arc<Backend> {
        self.slot.backend()
    }
    fn waited(&self) -> Duration {
        self.waited
    }
    fn since(&self) -> tokio::time::Instant {
        self.since
    }
}

/// One request's way to a backend, as the retry loop drives it: how it is
/// admitted (a queued slot, a tunnel ticket) and what one attempt does.
pub trait Exchange: Send {
    type Admission: Admission + Send;
    type Output: Send;
    /// Waits for admission; `avoid` lists backends already tried, `retry`
    /// says this is not the first attempt.
    fn admit(
        &mut self,
        avoid: &[SocketAddr],
        retry: bool,
    ) -> impl std::future::Future<Output = Result<Self::Admission, Error>> + Send;
    /// One attempt on the admitted backend.
    fn attempt(
        &mut self,
        admitted: Self::Admission,
    ) -> impl std::future::Future<Output = Attempt<Self::Output>> + Send;
}

/// A request head as the edge read it: its header map, and the lines kept
/// out of the map (`http1::Lines`), which go to the backend as they came.
pub struct RequestHead {
    pub parts: http::request::Parts,
    pub lines: Option<Box<Lines>>,
}

/// A request read whole and rewritten for the backend (`edge::handler`):
/// made once, in one allocation, and shared by its attempts and by an
/// exchange that outlives its client (`Detached`).
pub struct Outbound {
    pub head: RequestHead,
    /// What Usher tells the backend beside the head.
    pub identity: Identity,
    pub body: Bytes,
    /// When Usher finished reading the request, for an upstream with
    /// `request_start_header` (`X-Request-Start`).
    pub read_at: Option<std::time::SystemTime>,
}

/// A buffered request: a slot from the dispatcher, then [`Upstream::send`].
struct Buffered<'a> {
    /// Borrowed: only an attempt, which may outlive the client, owns one.
    up: &'a Arc<Upstream>,
    req: Arc<Outbound>,
    /// Its class (`queue.classify`), hashed once for all its attempts.
    class: crate::dispatch::Class,
}

impl Exchange for Buffered<'_> {
    type Admission = crate::dispatch::Admitted;
    type Output = Box<Response<ProxyBody>>;

    async fn admit(&mut self, avoid: &[SocketAddr], retry: bool) -> Result<Self::Admission, Error> {
        self.up
            .dispatcher
            .acquire_as(avoid, retry, self.class)
            .await
            .map_err(|r| r.into_error(&self.up.name))
    }

    async fn attempt(&mut self, admitted: Self::Admission) -> Attempt<Self::Output> {
        // Once a slot is granted, the exchange must finish: if the client
        // goes away, the request still runs to its end on the backend, and
        // its slot stays taken until the backend's thread is really free.
        // `Detached` runs it here and moves only an abandoned remainder to a
        // task of its own. (While queued, a vanished client just leaves.)
        let (up, req, class) = (self.up.clone(), self.req.clone(), self.class);
        Detached::new(move || up.send(req, admitted.slot, class, admitted.waited)).await
    }
}

impl Upstream {
    /// Sends the request to a backend, retrying where it is safe, and returns
    /// the response.
    pub async fn forward(self: &Arc<Self>, req: Arc<Outbound>) -> Result<Forwarded, Failed> {
        let method = req.head.parts.method.clone();
        let class = crate::dispatch::Class::of(self.class_of(&req.head.parts));
        let mut exchange = Buffered {
            class,
            up: self,
            req,
        };
        self.with_retries(&method, &mut exchange)
            .await
            .map(|(response, backend, queue_wait)| Forwarded {
                response,
                backend: Some(backend),
                queue_wait,
            })
    }

    /// The one retry loop, for plain and upgraded requests alike: admit
    /// (queue for a slot, or a tunnel ticket), attempt, and on failure try
    /// another backend where it is safe — up to `retries.attempts` more
    /// times, within the upstream's retry budget, never back to a backend
    /// this request already failed on while another one is up.
    pub async fn with_retries<E: Exchange>(
        &self,
        method: &http::Method,
        exchange: &mut E,
    ) -> Result<(E::Output, Arc<Backend>, Duration), Failed> {
        let mut avoid: Vec<SocketAddr> = Vec::new();
        let mut queue_wait = Duration::ZERO;
        let mut last: Option<Arc<Backend>> = None;
        let max_attempts = 1 + self.cfg.retries.attempts;
        self.retry_budget.deposit();
        // When the first admission's wait began: the request is refused for
        // at most the queue's timeout from there.
        let (mut first_wait, mut refusals) = (None, 0u32);
        let mut n = 1;
        while n <= max_attempts {
            let admitted = match exchange.admit(&avoid, n > 1 || refusals > 0).await {
                Ok(a) => a,
                Err(error) => {
                    return Err(Failed {
                        error,
                        backend: last,
                        queue_wait,
                    })
                }
            };
            queue_wait += admitted.waited();
            let started = *first_wait.get_or_insert(admitted.since());
            // One reference per attempt (atomics): `last` takes it over
            // only when the attempt fails.
            let backend = admitted.backend().clone();
            let (error, reason) = match exchange.attempt(admitted).await {
                Attempt::Done(value) => return Ok((value, backend, queue_wait)),
                Attempt::Refused => {
                    // Each refusal lowers this replica's part of that worker
                    // for a moment, so the next try waits for a thread; a
                    // request is refused for at most the queue's timeout.
                    refusals += 1;
                    if started.elapsed() >= self.cfg.queue.timeout.0 {
                        return Err(Failed {
                            error: Error::QueueTimeout {
                                upstream: self.name.clone(),
                            },
                            backend: Some(backend),
                            queue_wait,
                        });
                    }
                    last = Some(backend);
                    continue;
                }
                Attempt::NotSent(e) => (e, "connect"),
                Attempt::Sent(e) if is_idempotent(method) => (e, "error"),
                Attempt::Sent(e) | Attempt::Final(e) => {
                    return Err(Failed {
                        error: e,
                        backend: Some(backend),
                        queue_wait,
                    })
                }
            };
            avoid.push(backend.addr);
            if n == max_attempts || !self.retry_budget.withdraw() {
                return Err(Failed {
                    error,
                    backend: Some(backend),
                    queue_wait,
                });
            }
            tracing::debug!(upstream = %self.name, backend = %backend.key, %error, "retrying");
            last = Some(backend);
            self.metrics
                .retries
                .with_label_values(&[&self.name, reason])
                .inc();
            n += 1;
        }
        unreachable!("the loop returns on its last attempt")
    }

    /// The request class for service-time estimates (`queue.classify`).
    fn class_of<'a>(&self, head: &'a http::request::Parts) -> &'a str {
        match self.cfg.queue.classify {
            crate::config::Classify::Path => head.uri.path(),
            crate::config::Classify::PathAndQuery => head
                .uri
                .path_and_query()
                .map_or(head.uri.path(), |p| p.as_str()),
        }
    }

    /// One attempt on the backend that `slot` reserves.
    async fn send(
        self: Arc<Self>,
        req: Arc<Outbound>,
        slot: Slot,
        class_key: crate::dispatch::Class,
        queued: Duration,
    ) -> Attempt<Box<Response<ProxyBody>>> {
        let class = self.class_of(&req.head.parts);
        let backend = slot.backend().clone();
        let started = Instant::now();
        // The same reading as `started`, on tokio's clock: it is the system's
        // outside paused tests, and none pauses this path.
        let at = tokio::time::Instant::from_std(started);
        let sent = backend.load_mark_at(started);
        // Read only if `request_start_header` is on (`edge::handler`).
        let stamp = req.read_at.map(|wall| stamp::Stamp::new(wall, queued));
        let mut pending = match self.transmit(&req, &backend, stamp, at) {
            Ok(p) => p,
            Err(e) => return Attempt::NotSent(e),
        };
        let timeout = self.cfg.timeouts.response.0;
        let deadline = at + timeout;

        // One timer for all of the attempt's waits.
        let mut timer = Deadline::new(deadline);
        let mut response = match within(&mut timer, &mut pending).await {
            Err(_) => {
                self.count(&backend, "timeout");
                self.note_failure(&backend, false);
                // The client gets its 504 now, but the backend's thread is
                // most likely still on this request: keep its slot until the
                // backend answers after all (capped, see `linger`). A body
                // read whole puts its connection back in the pool.
                linger(slot, timeout, async move {
                    if let Ok(r) = pending.await {
                        let _ = r.into_body().collect().await;
                    }
                });
                return Attempt::Final(Error::UpstreamTimeout {
                    backend: backend.key.clone(),
                    timeout,
                });
            }
            Ok(Err(Transmit::Connect(reason))) => {
                self.count(&backend, "connect_error");
                self.note_failure(&backend, true);
                return Attempt::NotSent(Error::Connect {
                    backend: backend.key.clone(),
                    reason,
                });
            }
            Ok(Err(Transmit::Sent(reason))) => {
                self.count(&backend, "error");
                self.note_failure(&backend, false);
                return Attempt::Sent(Error::Upstream {
                    backend: backend.key.clone(),
                    reason,
                });
            }
            Ok(Ok(r)) => r,
        };

        // The worker's load report is for Usher: consume it here, so it
        // never reaches the client. This replica's other requests on the
        // backend hold threads; this one no longer does.
        let own = backend.in_flight().saturating_sub(1);
        // In a block: the raw reports it holds (and borrows from) are
        // dropped at its end, not kept in the future's later states (boxed
        // per request: `Detached`).
        let (load, lines) = {
            let (h1_load, h2_load, lines) = match response.body_mut() {
                UpstreamBody::Left(h1) => (h1.take_load(), None, h1.take_lines()),
                UpstreamBody::Right(_) => (
                    None,
                    response.headers_mut().remove(&X_USHER_LOAD),
                    Lines::default(),
                ),
            };
            let load = h1_load
                .as_deref()
                .or(h2_load.as_ref().map(HeaderValue::as_bytes))
                .and_then(parse_load);
            (load, lines)
        };
        if response.status() == StatusCode::SERVICE_UNAVAILABLE
            && response
                .headers()
                .get(&X_USHER_REFUSED)
                .is_some_and(|v| v == REFUSED_BUSY)
        {
            if let Some(load) = load {
                backend.report_threads(load.threads);
            }
            backend.note_refused(own);
            // Its part there comes back when the backoff ends: the waker
            // must know that deadline.
            self.dispatcher.wake();
            self.count(&backend, "refused");
            // Read the short refusal so the connection stays reusable
            // (boxed: a rare wait, kept out of the future's size).
            let body = Box::pin(response.into_body().collect());
            let _ = within(&mut timer, body).await;
            drop(slot);
            return Attempt::Refused;
        }
        if let Some(load) = load {
            if backend.note_load(load, own) {
                self.dispatcher.kick();
            } else if self.cfg.proxy_replicas > 1 {
                // The report's expiry is a new capacity deadline.
                self.dispatcher.wake();
            }
        } else if backend.first_default_fallback() {
            tracing::warn!(
                upstream = %self.name,
                backend = %backend.key,
                capacity = backend.full_capacity(),
                "max_in_flight is auto but the backend reports no thread count (no X-Usher-Load header): using default_capacity; set max_in_flight to what the app serves at once (waitress --threads; gunicorn --workers × --threads; gevent --workers × --worker-connections)"
            );
        }
        let status = response.status();
        // A response Usher cannot frame for the client on its own terms is
        // a broken backend, not an answer: 502, counted by passive health.
        let refused = if status == StatusCode::SWITCHING_PROTOCOLS {
            Err("101 Switching Protocols to a request that did not ask to upgrade")
        } else if let UpstreamBody::Left(_) = response.body() {
            // Checked, and kept out of the map, by the HTTP/1 parser.
            Ok(())
        } else {
            framing::take_response_framing(&req.head.parts.method, status, response.headers_mut())
        };
        if let Err(reason) = refused {
            self.count(&backend, "error");
            self.note_failure(&backend, false);
            tracing::warn!(upstream = %self.name, backend = %backend.key, reason, "refused a malformed backend response");
            return Attempt::Sent(Error::Upstream {
                backend: backend.key.clone(),
                reason: reason.to_string(),
            });
        }
        if matches!(
            status,
            StatusCode::BAD_GATEWAY | StatusCode::SERVICE_UNAVAILABLE | StatusCode::GATEWAY_TIMEOUT
        ) {
            self.note_failure(&backend, false);
        } else {
            backend.health.record_success();
        }

        let (parts, mut incoming) = (*response).into_parts();
        let mut buffered = body::Chunks::default();
        let mut size: u64 = 0;
        let mut trailers = None;
        loop {
            let frame = match within(&mut timer, incoming.frame()).await {
                Err(_) => {
                    self.count(&backend, "timeout");
                    linger(slot, timeout, async move {
                        let _ = incoming.collect().await;
                    });
                    return Attempt::Final(Error::UpstreamTimeout {
                        backend: backend.key.clone(),
                        timeout,
                    });
                }
                Ok(None) => break,
                Ok(Some(Err(e))) => {
                    self.count(&backend, "error");
                    self.note_failure(&backend, false);
                    return Attempt::Sent(Error::Upstream {
                        backend: backend.key.clone(),
                        reason: format!("response body: {}", error_chain(&*e)),
                    });
                }
                Ok(Some(Ok(f))) => f,
            };
            match frame.into_data() {
                Ok(data) => {
                    size += data.len() as u64;
                    buffered.push_back(data);
                    if size > self.max_response_buffer {
                        // Too big to hold: stream the rest, keeping the slot.
                        self.count(&backend, status.as_str());
                        let body = ProxyBody::relay(
                            buffered,
                            incoming,
                            slot,
                            Some((self.response_histogram(&backend).into_owned(), started)),
                        )
                        .with_lines(lines);
                        return Attempt::Done(Box::new(Response::from_parts(parts, body)));
                    }
                }
                Err(frame) => {
                    if let Ok(t) = frame.into_trailers() {
                        // Boxed as the body keeps them, and so as not to
                        // add a header map to this future's size.
                        trailers = Some(Box::new(t));
                    }
                }
            }
        }
        // The body's end has put the connection back in the pool already,
        // so a waiter the slot goes to finds it idle.
        let done = Instant::now();
        let took = done.saturating_duration_since(started).as_secs_f64();
        // Learned from its time on a thread: a prefetched extra's wait in
        // the worker's queue is not contention. Server errors say nothing
        // of how fast the backend works.
        // The same reading as `done`, on tokio's clock (as `at` is `started`).
        let done_at = tokio::time::Instant::from_std(done);
        if let Some(mark) = slot.finish(class_key, took, sent, done_at) {
            if !status.is_server_error() && backend.learn(class, mark, self.cfg.learn_concurrency) {
                self.dispatcher.kick();
            }
        }
        self.count(&backend, status.as_str());
        self.response_histogram(&backend).observe(took);
        let body = ProxyBody::buffered(buffered, size, trailers).with_lines(lines);
        Attempt::Done(Box::new(Response::from_parts(parts, body)))
    }

    /// Sends the request to `backend` through the upstream's pool (HTTP/1:
    /// encoded here, once) or client (h2); the response body arrives on the
    /// connection. Owned, so that a timed-out exchange can finish it while
    /// lingering.
    fn transmit(
        &self,
        req: &Outbound,
        backend: &Backend,
        stamp: Option<stamp::Stamp>,
        at: tokio::time::Instant,
    ) -> Result<Pending, Error> {
        let (head, identity, body) = (&req.head, &req.identity, req.body.clone());
        match self.cfg.protocol {
            UpstreamProtocol::Http1 => {
                // Origin-form, with the `Host` the edge set (an HTTP/1.0
                // request may have none: then the backend's address).
                let target = head.parts.uri.path_and_query().map_or("/", |p| p.as_str());
                let set = stamp.as_ref().map_or(&[][..], stamp::Stamp::fields);
                let out = Outgoing::new(
                    &head.parts,
                    head.lines.as_deref(),
                    target,
                    backend.authority.as_str(),
                    body,
                    Some(identity),
                    set,
                );
                let (pool, addr) = (self.pool.clone(), backend.addr);
                Ok(crate::boxed::pin_with(move || async move {
                    pool.send(addr, &out, at).await.map_err(|e| match e {
                        SendError::Connect(e) => Transmit::Connect(error_chain(&*e)),
                        SendError::Sent(e) => Transmit::Sent(error_chain(&e)),
                    })
                }))
            }
            UpstreamProtocol::Http2 => {
                let mut req = self.h2_request(&head.parts, identity, body, backend)?;
                if let Some(lines) = &head.lines {
                    lines.append_to(req.headers_mut());
                }
                if let Some(stamp) = stamp {
                    stamp.insert_into(req.headers_mut());
                }
                let pending = self.client.request(req);
                Ok(Box::pin(async move {
                    match pending.await {
                        Ok(r) => Ok(Box::new(r.map(UpstreamBody::Right))),
                        Err(e) if e.is_connect() => Err(Transmit::Connect(error_chain(&e))),
                        Err(e) => Err(Transmit::Sent(error_chain(&e))),
                    }
                }))
            }
        }
    }

    /// `backend`'s `usher_backend_response_seconds`: its cached handle
    /// (borrowed: no reference count on the request path), or, for a
    /// backend built without metrics, looked up by label.
    fn response_histogram<'b>(
        &self,
        backend: &'b Backend,
    ) -> std::borrow::Cow<'b, crate::observe::histogram::Histogram> {
        match backend.metrics() {
            Some(m) => std::borrow::Cow::Borrowed(&m.response),
            None => std::borrow::Cow::Owned(
                self.metrics
                    .backend_response
                    .with_label_values(&[&self.name, &backend.key]),
            ),
        }
    }

    /// Counts one answer (or failure) of `backend` in
    /// `usher_backend_requests_total`, through its cached handles.
    pub(crate) fn count(&self, backend: &Backend, code: &str) {
        match backend.metrics() {
            Some(m) => m.requests.inc(code),
            None => self
                .metrics
                .backend_requests
                .with_label_values(&[&self.name, &backend.key, code])
                .inc(),
        }
    }

    /// Passive health: counts a gateway failure and maybe ejects. A refused
    /// connection is decisive on its own; other failures need a run of
    /// `outlier.consecutive_failures`.
    pub(crate) fn note_failure(&self, backend: &Arc<Backend>, connect: bool) {
        let now = Instant::now();
        let all = self.dispatcher.backends();
        let policy = health::Policy::from(&self.cfg.outlier);
        let verdict = health::note_failure(
            all.iter().map(|b| &b.health),
            &backend.health,
            connect,
            &policy,
            now,
        );
        if let Verdict::Ejected(d) = verdict {
            backend.start_slow_after(d);
            // The ejection ends at `now + d`: the waker sleeps until then.
            self.dispatcher.wake();
            tracing::warn!(upstream = %self.name, backend = %backend.key, ejected_for = ?d, "backend ejected after failures");
            self.metrics
                .backend_ejections
                .with_label_values(&[&self.name, &backend.key])
                .inc();
        }
    }

    /// The request for an h2 backend: absolute URI (h2 names the authority
    /// in `:authority`, which hyper takes from it), no `host`.
    fn h2_request(
        &self,
        head: &http::request::Parts,
        identity: &Identity,
        body: Bytes,
        backend: &Backend,
    ) -> Result<Request<Full<Bytes>>, Error> {
        let path_and_query = head
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
        let len = body.len();
        let mut req = Request::new(Full::new(body));
        *req.method_mut() = head.method.clone();
        *req.headers_mut() = head.headers.clone();
        identity.insert_into(req.headers_mut());
        let mut uri = http::uri::Parts::default();
        uri.scheme = Some(if self.cfg.tls.is_some() {
            http::uri::Scheme::HTTPS
        } else {
            http::uri::Scheme::HTTP
        });
        uri.authority = Some(backend.authority.clone());
        uri.path_and_query = Some(path_and_query);
        *req.uri_mut() =
            Uri::from_parts(uri).map_err(|_| Error::BadRequest("invalid request target"))?;
        // The `:authority` is the backend's address, since the pool dials by
        // it. A `host` header beside it would disagree, which an h2 server
        // must refuse (Usher does); the client's host travels in
        // `X-Forwarded-Host`.
        req.headers_mut().remove(http::header::HOST);
        if framing::request_has_length(&head.method, len) {
            req.headers_mut()
                .insert(http::header::CONTENT_LENGTH, HeaderValue::from(len));
        } else {
            req.headers_mut().remove(http::header::CONTENT_LENGTH);
        }
        Ok(req)
    }
}

/// Where [`Upstream::transmit`] fails: before the request left Usher
/// (connect, TLS), or after.
enum Transmit {
    Connect(String),
    Sent(String),
}

type Pending = Pin<Box<dyn Future<Output = Result<Box<Response<UpstreamBody>>, Transmit>> + Send>>;

/// `fut`'s output, or `Err` when `timer` fires first. Polled first, `fut`
/// needs no timer when it is ready at once (a body frame already read), and
/// the attempt's waits share one timer: a `timeout_at` each would make and
/// drop one per wait.
async fn within<F: Future>(timer: &mut Deadline, fut: F) -> Result<F::Output, Elapsed> {
    let mut fut = std::pin::pin!(fut);
    std::future::poll_fn(|cx| {
        if let Poll::Ready(out) = fut.as_mut().poll(cx) {
            return Poll::Ready(Ok(out));
        }
        timer.poll(cx).map(|()| Err(Elapsed))
    })
    .await
}

/// What [`within`] answers when its timer fired.
struct Elapsed;

/// Holds `slot` while `rest` (the remainder of a timed-out exchange) runs, so
/// the backend is not given another request while its thread is still busy
/// with this one. Capped at the larger of the response timeout and 60 s: a
/// thread stuck for longer is counted as lost only that long.
fn linger(
    slot: Slot,
    timeout: Duration,
    rest: impl std::future::Future<Output = ()> + Send + 'static,
) {
    let limit = timeout.max(Duration::from_secs(60));
    tokio::spawn(async move {
        let started = Instant::now();
        let done = tokio::time::timeout(limit, rest).await.is_ok();
        tracing::debug!(backend = %slot.backend().key, held = ?started.elapsed(), done, "released the slot of a timed-out request");
        drop(slot);
    });
}
