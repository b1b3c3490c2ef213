//! Usher's own HTTP/1.1 server side, for plain (non-TLS) client connections.
//!
//! Why not hyper's: hyper's HTTP/1 connection keeps a read buffer and a write
//! buffer (8 KiB each) for the connection's whole life, and has no setting to
//! give them back between requests. Most client connections of an edge proxy
//! are idle keep-alives, so that was most of Usher's memory per connection.
//! Here an idle connection holds no buffer at all: it waits for readability
//! with nothing allocated (`TcpStream::readable`), and a buffer exists only
//! from a request's first byte to the end of its response.
//!
//! What stays hyper's:
//! - the parser: `httparse`, with the same (strict, default) configuration
//!   hyper uses, so request lines and headers are accepted or refused exactly
//!   as before;
//! - hyper's framing rules, restated in [`parse`]: `Transfer-Encoding` only
//!   on HTTP/1.1 and only ending in `chunked` (a `Content-Length` beside it is
//!   dropped and the connection closes after the answer); `Content-Length` as
//!   digits only, duplicates equal; a URI up to 65534 bytes (else 414); at
//!   most 100 headers and `MAX_HEAD` bytes of head (else 431);
//! - the request and response types (`http`), so the handler is the same for
//!   HTTP/1 on TLS and h2 (still hyper's) and for this.
//!
//! The chunked decoder ([`H1Body`]) is strict: hex digits only, no overflow,
//! CRLF and nothing else after the size line and after each chunk's data,
//! extensions bounded (16 KiB per body), and any trailer section is handed to
//! the handler as trailers, which it refuses (see `handler::read_request`).
//!
//! Life of a connection ([`serve`]): wait for bytes (up to
//! `client_keepalive`, or `client_header` for the first request) → read the
//! head (the whole head within `client_header` of its first byte; past it
//! the connection is closed without an answer, like nginx) → the handler
//! reads the body through [`H1Body`] and answers → the response is written →
//! keep alive, or close. While the handler works, a client that closes its
//! side is noticed and the handler's future is dropped (a queued request
//! leaves the queue; one that already has a slot finishes on its own task,
//! see `upstream::detach`). A close that may leave unread request bytes
//! behind first shuts down the write side and reads what the client still
//! sends for a moment, so that the kernel does not reset the connection
//! under an answer the client has not read yet (nginx's lingering close).

use std::future::{poll_fn, Future};
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use hyper::body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::edge::handler::error_response;
use crate::edge::headers::{has_token, read_by_usher_in_requests};
use crate::edge::listener::ListenerSettings;
use crate::edge::upgrade::{ClientUpgrade, TunnelIo};
use crate::edge::{handle, ConnCtx, Drain};
use crate::error::Error;
use crate::http1::{
    digits, hex_line, itoa, last_coding_is_chunked, offset, BodyError, Decode, Decoder, Lines,
    Trailers,
};
use crate::upstream::ProxyBody;

/// The most headers a request may have (hyper's default); past it, 431.
const MAX_HEADERS: usize = 100;
/// The longest request target (hyper's limit); past it, 414.
const MAX_URI: usize = 65534;
/// The first read of a request: most heads fit.
const FIRST_READ: usize = 4096;
/// Longest a client may take to accept more of a response (nginx's
/// `send_timeout` default); past it the connection is closed.
const SEND_TIMEOUT: Duration = Duration::from_secs(60);
/// How long, and how much, a closing connection reads and discards.
const LINGER: Duration = Duration::from_secs(2);
const LINGER_BYTES: usize = 1 << 20;

const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

/// The socket and what has been read from it but not consumed yet.
struct Wire {
    stream: TcpStream,
    buf: BytesMut,
    /// The request body has been read to its end (or there was none).
    body_done: bool,
    /// Woken when `body_done` turns true (the client-gone watch starts then).
    watch: Option<Waker>,
    /// Bytes of a next request arrived while this one was in the handler:
    /// a close can no longer be told from them, so the watch stops.
    pipelined: bool,
}

/// The wire is shared between the connection loop and the request body the
/// handler reads; each takes the lock only inside a poll, never across one.
type Slot = Arc<Mutex<Option<Wire>>>;

fn lock(slot: &Slot) -> std::sync::MutexGuard<'_, Option<Wire>> {
    // A poisoned lock only means a panic elsewhere while polling; the wire
    // itself is plain data.
    slot.lock().unwrap_or_else(|p| p.into_inner())
}

/// What ended an idle wait between requests.
enum Idle {
    /// The first bytes of the next request are in the buffer.
    Read,
    /// The client closed, its socket failed, or the drain fired.
    Closed,
    /// The idle timer fired (maybe set for an earlier wait).
    Timer,
}

/// Serves one plain HTTP/1 connection until it closes or `drain` fires.
///
/// This future is what an idle connection costs, so it holds only the wire
/// and the idle wait; everything a request needs lives in [`exchange`]'s
/// future, boxed and freed per request.
pub async fn serve(
    stream: TcpStream,
    ctx: Arc<ConnCtx>,
    settings: &ListenerSettings,
    drain: Drain,
) {
    let (header_timeout, keepalive) = (settings.header_timeout, settings.keepalive);
    let slot: Slot = Arc::new(Mutex::new(None));
    let mut wire = Wire {
        stream,
        buf: BytesMut::new(),
        body_done: true,
        watch: None,
        pipelined: false,
    };
    let mut idle_for = header_timeout.min(keepalive);
    // One wait for the drain for the connection's life: registered once,
    // not once per request.
    let mut drained = std::pin::pin!(drain.token().clone().cancelled_owned());
    // One timer for the idle waits, also for the connection's life, kept in
    // tokio's wheel across them (`timer::set_by`, `timer::fired_by`): a busy
    // connection never inserts it or takes it out.
    let mut idle_timer = std::pin::pin!(tokio::time::sleep(idle_for));
    // The waker the drain wait and the idle timer were last polled with.
    // While a wait's poll comes with that waker (this task's, so always but
    // the first time), they keep it and are only checked (`is_cancelled`,
    // `is_elapsed`), not polled again: a poll of each cost more than the
    // rest of the wait.
    let mut armed: Option<Waker> = None;
    loop {
        // Empty lines between requests are allowed (RFC 9112 §2.2).
        while let Some(n) = [&b"\r\n"[..], b"\n"]
            .iter()
            .find(|e| wire.buf.starts_with(e))
        {
            wire.buf.advance(n.len());
        }
        if wire.buf.is_empty() {
            // Idle: give the buffer back and wait with nothing allocated.
            // Readiness can be left over from a read that filled its buffer
            // exactly: a read that would block means "not yet", and the wait
            // goes on (with the buffer given back again).
            wire.buf = BytesMut::new();
            let deadline = Instant::now() + idle_for;
            if crate::timer::set_by(idle_timer.as_mut(), deadline) {
                armed = None;
            }
            loop {
                // The socket first: the wake that ends a wait is almost
                // always the next request. A request that is already there
                // when the drain fires is served, and its answer closes the
                // connection (`respond`).
                let woke = poll_fn(|cx| {
                    // A read, not a readiness check then a read: its poll
                    // keeps the waker when nothing is there, and clears the
                    // readiness after a short read, so the next idle wait
                    // does not wake for nothing. It lands on the stack and
                    // the buffer is made to its size: a short head costs a
                    // small allocation (mimalloc's fast path), not a 4 KiB
                    // one.
                    let mut room = [MaybeUninit::uninit(); FIRST_READ];
                    let mut into = ReadBuf::uninit(&mut room);
                    match Pin::new(&mut wire.stream).poll_read(cx, &mut into) {
                        Poll::Ready(Ok(())) if !into.filled().is_empty() => {
                            wire.buf = BytesMut::from(into.filled());
                            return Poll::Ready(Idle::Read);
                        }
                        Poll::Ready(_) => return Poll::Ready(Idle::Closed),
                        Poll::Pending => {}
                    }
                    if armed.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                        if drain.has_fired() {
                            return Poll::Ready(Idle::Closed);
                        }
                        if idle_timer.is_elapsed() {
                            return Poll::Ready(Idle::Timer);
                        }
                        return Poll::Pending;
                    }
                    // Unconstrained: a poll out of the task's budget would
                    // return without keeping the waker.
                    let drain_wait = tokio::task::unconstrained(drained.as_mut());
                    if std::pin::pin!(drain_wait).poll(cx).is_ready() {
                        return Poll::Ready(Idle::Closed);
                    }
                    let timer = tokio::task::unconstrained(idle_timer.as_mut());
                    if std::pin::pin!(timer).poll(cx).is_ready() {
                        return Poll::Ready(Idle::Timer);
                    }
                    armed = Some(cx.waker().clone());
                    Poll::Pending
                })
                .await;
                match woke {
                    Idle::Read => break,
                    Idle::Closed => return,
                    Idle::Timer => {
                        if crate::timer::fired_by(idle_timer.as_mut(), deadline) {
                            return;
                        }
                        // Set by an earlier wait: now for the rest of this one.
                        armed = None;
                    }
                }
            }
        }
        idle_for = keepalive;
        match crate::boxed::pin_with(|| exchange(wire, &slot, &ctx, header_timeout, &drain)).await {
            Some(w) => wire = w,
            None => return,
        }
    }
}

/// One request on the connection, from its first byte to the end of its
/// response. Gives the wire back if the connection stays open for another.
///
/// Its future is boxed per request (`serve`, built in its box:
/// `boxed::pin_with`), so its phases are futures of their own: awaited one
/// after the other, they share the space, and the box stays small.
async fn exchange(
    mut wire: Wire,
    slot: &Slot,
    ctx: &Arc<ConnCtx>,
    header_timeout: Duration,
    drain: &Drain,
) -> Option<Wire> {
    let head = match read_head(&mut wire, slot, header_timeout).await {
        Ok(Some(h)) => h,
        // Closed, failed or too slow before a whole head: nothing to answer.
        Ok(None) => return None,
        Err(refusal) => {
            refuse(wire, refusal).await;
            return None;
        }
    };
    let answered = answer(head, wire, slot, ctx).await?;
    respond(answered, drain).await
}

/// A head that cannot be served: a short text naming the reason, and the
/// connection closes after it.
async fn refuse(mut wire: Wire, refusal: Error) {
    let resp = error_response(&refusal);
    let _ = write_response(&mut wire, resp, &Method::GET, Version::HTTP_11, false).await;
    linger(wire).await;
}

/// The handler's answer to a request, with what writing it needs.
struct Answered {
    wire: Wire,
    response: Box<Response<ProxyBody>>,
    method: Method,
    version: Version,
    keep_alive: bool,
    /// Where the socket goes after a `101`.
    upgrade: Option<oneshot::Sender<Box<dyn TunnelIo>>>,
}

/// Runs the handler on a parsed request. `None`: the client went away while
/// its request was in the handler.
async fn answer(head: Parsed, mut wire: Wire, slot: &Slot, ctx: &Arc<ConnCtx>) -> Option<Answered> {
    let Parsed {
        mut request,
        keep_alive,
        body,
        wants_upgrade,
    } = head;
    let method = request.method().clone();
    let version = request.version();
    let upgrade = wants_upgrade.then(|| {
        let (tx, rx) = oneshot::channel();
        request.extensions_mut().insert(ClientUpgrade::new(rx));
        tx
    });
    wire.body_done = body == Decode::Done;
    wire.pipelined = false;
    // No body (most requests): the handler never reads the wire, so it
    // stays here, and the watch needs no lock (see `H1Body::slot`).
    let mut held = if wire.body_done {
        Some(wire)
    } else {
        *lock(slot) = Some(wire);
        None
    };
    let mut handler = std::pin::pin!(handle(request, ctx));
    let response = tokio::select! {
        biased;
        r = &mut handler => Some(r),
        () = client_gone(&mut held, slot) => None,
    };
    let wire = match held {
        Some(w) => w,
        None => lock(slot).take()?,
    };
    Some(Answered {
        // A body the handler did not read to its end cannot be skipped
        // safely: close after the answer (as hyper does).
        keep_alive: keep_alive && wire.body_done,
        wire,
        response: response?,
        method,
        version,
        upgrade,
    })
}

/// Writes the answer. `Some`: the connection stays open for another request.
async fn respond(a: Answered, drain: &Drain) -> Option<Wire> {
    let Answered {
        mut wire,
        response,
        method,
        version,
        keep_alive,
        upgrade,
    } = a;
    let keep = keep_alive && !drain.has_fired();
    if response.status() == StatusCode::SWITCHING_PROTOCOLS {
        let Some(tx) = upgrade else {
            // The handler never lets one through (`upstream::transmit`);
            // if it did, the client still gets an answer.
            let e = Error::Upstream {
                backend: "-".into(),
                reason: "101 to a request that did not ask to upgrade".into(),
            };
            let mut resp = error_response(&e);
            resp.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
            let _ = write_response(&mut wire, resp, &method, version, false).await;
            return None;
        };
        if write_response(&mut wire, response, &method, version, true)
            .await
            .is_ok()
        {
            let Wire { stream, buf, .. } = wire;
            let io: Box<dyn TunnelIo> = Box::new(Rewind {
                pre: buf.freeze(),
                stream,
            });
            let _ = tx.send(io);
        }
        return None;
    }
    drop(upgrade);
    match write_response(&mut wire, response, &method, version, keep).await {
        Ok(true) => Some(wire),
        Ok(false) => {
            linger(wire).await;
            None
        }
        Err(_) => None,
    }
}

/// Resolves when the client closes its side while its request is in the
/// handler (after the body has been read: before that, the body sees it).
/// The wire is `held` here, or else in the `slot` the body reads.
fn client_gone<'a>(held: &'a mut Option<Wire>, slot: &'a Slot) -> impl Future<Output = ()> + 'a {
    poll_fn(move |cx| match held.as_mut() {
        Some(w) => poll_gone(w, cx),
        None => lock(slot)
            .as_mut()
            .map_or(Poll::Pending, |w| poll_gone(w, cx)),
    })
}

/// `client_gone`'s check on the wire.
fn poll_gone(w: &mut Wire, cx: &mut Context<'_>) -> Poll<()> {
    if !w.body_done {
        w.watch = Some(cx.waker().clone());
        return Poll::Pending;
    }
    if w.pipelined || !w.buf.is_empty() {
        return Poll::Pending;
    }
    let mut one = [0u8; 1];
    let mut rb = ReadBuf::new(&mut one);
    match w.stream.poll_peek(cx, &mut rb) {
        Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => Poll::Ready(()),
        Poll::Ready(Ok(_)) => {
            w.pipelined = true;
            Poll::Pending
        }
        Poll::Pending => Poll::Pending,
    }
}

fn bad(reason: &'static str) -> Error {
    Error::BadRequest(reason)
}

/// A parsed request head.
struct Parsed {
    /// Boxed as the handler takes it, and built with its body in `parse`:
    /// the head then moves from future to future as a pointer, where a
    /// `Request` moved through `read_head` and `answer` was copied at each
    /// step.
    request: Box<Request<H1Body>>,
    keep_alive: bool,
    body: Decode,
    wants_upgrade: bool,
}

/// Reads until a whole head is in `wire.buf`, and parses it. `Ok(None)`:
/// the client closed, failed, or did not finish the head within `timeout`
/// (counted from the first wait: a head already read whole needs no clock).
async fn read_head(
    wire: &mut Wire,
    slot: &Slot,
    timeout: Duration,
) -> Result<Option<Parsed>, Error> {
    let mut deadline = None;
    loop {
        if !wire.buf.is_empty() {
            if let Some(p) = parse(&mut wire.buf, slot)? {
                return Ok(Some(p));
            }
            if wire.buf.len() > crate::edge::listener::MAX_HEAD {
                return Err(Error::HeadTooLarge("request head too large"));
            }
        }
        crate::http1::reserve_for_head(&mut wire.buf, FIRST_READ);
        let deadline = *deadline.get_or_insert_with(|| Instant::now() + timeout);
        match tokio::time::timeout_at(deadline, wire.stream.read_buf(&mut wire.buf)).await {
            Ok(Ok(n)) if n > 0 => {}
            _ => return Ok(None),
        }
    }
}

/// Parses a request head at the start of `buf` and, when it is whole, takes
/// it off `buf`. `Ok(None)`: not whole yet.
fn parse(buf: &mut BytesMut, slot: &Slot) -> Result<Option<Parsed>, Error> {
    // Uninitialised: filling 100 empty headers per request cost more than
    // parsing a short head.
    let mut slots = [std::mem::MaybeUninit::uninit(); MAX_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    let len = match req.parse_with_uninit_headers(buf, &mut slots) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(Error::HeadTooLarge("too many headers"))
        }
        Err(e) => return Err(bad(parse_error(e, &req))),
    };
    if len > crate::edge::listener::MAX_HEAD {
        return Err(Error::HeadTooLarge("request head too large"));
    }
    let (Some(method), Some(path), Some(minor)) = (req.method, req.path, req.version) else {
        return Err(bad("invalid request line"));
    };
    if path.len() > MAX_URI {
        return Err(Error::UriTooLong);
    }
    let method = Method::from_bytes(method.as_bytes()).map_err(|_| bad("invalid method"))?;
    let version = if minor == 1 {
        Version::HTTP_11
    } else {
        Version::HTTP_10
    };
    let path_at = offset(buf, path.as_bytes()).ok_or(bad("invalid request target"))?;
    // Where each name and value is, so that the values can share the head's
    // bytes instead of each being copied.
    let mut at = Vec::with_capacity(req.headers.len());
    for h in req.headers.iter() {
        let name = offset(buf, h.name.as_bytes()).ok_or(bad("invalid header name"))?;
        let value = if h.value.is_empty() {
            0..0
        } else {
            offset(buf, h.value).ok_or(bad("invalid header value"))?
        };
        at.push((name, value));
    }
    let head = buf.split_to(len).freeze();
    let uri =
        Uri::from_maybe_shared(head.slice(path_at)).map_err(|_| bad("invalid request target"))?;

    let http11 = version == Version::HTTP_11;
    let mut keep_alive = http11;
    let mut saw_close = false;
    let mut te = false;
    let mut te_chunked = false;
    let mut cl: Option<u64> = None;
    let mut saw_cl = false;
    let mut expect_continue = false;
    let mut wants_upgrade = method == Method::CONNECT;
    // Lines Usher does not read go to the backend as they came.
    let named_by_connection = crate::http1::has_connection(&head, &at);

    // Only the names Usher reads go to the map: `Host` and a few more. What
    // Usher tells an HTTP/1 backend is written beside it (`Identity`).
    let mut headers = if named_by_connection {
        HeaderMap::with_capacity(at.len())
    } else {
        HeaderMap::with_capacity(at.len().min(4))
    };
    let mut walk = crate::http1::Kept::new(at);
    while let Some((name_at, value)) = walk.next_line() {
        let name = crate::http1::header_name(&head[name_at.clone()])
            .map_err(|_| bad("invalid header name"))?;
        if !named_by_connection && !read_by_usher_in_requests(&name) {
            walk.keep();
            continue;
        }
        let value = if value.is_empty() {
            HeaderValue::from_static("")
        } else {
            HeaderValue::from_maybe_shared(head.slice(value))
                .map_err(|_| bad("invalid header value"))?
        };
        match name {
            header::TRANSFER_ENCODING => {
                if !http11 {
                    return Err(bad("Transfer-Encoding in an HTTP/1.0 request"));
                }
                te = true;
                if cl.take().is_some() {
                    headers.remove(header::CONTENT_LENGTH);
                }
                te_chunked = last_coding_is_chunked(&value);
            }
            header::CONTENT_LENGTH => {
                saw_cl = true;
                if te {
                    continue;
                }
                let n = digits(value.as_bytes()).ok_or(bad("invalid Content-Length"))?;
                match cl {
                    Some(prev) if prev != n => {
                        return Err(bad("conflicting Content-Length headers"))
                    }
                    Some(_) => continue,
                    None => cl = Some(n),
                }
            }
            header::CONNECTION => {
                if saw_close || has_token(&value, "close") {
                    saw_close = true;
                    keep_alive = false;
                } else if !keep_alive {
                    keep_alive = has_token(&value, "keep-alive");
                }
            }
            header::EXPECT => {
                expect_continue = value.as_bytes().eq_ignore_ascii_case(b"100-continue");
            }
            header::UPGRADE => wants_upgrade = http11,
            _ => {}
        }
        headers.append(name, value);
    }
    if te && !te_chunked {
        return Err(bad(
            "unsupported Transfer-Encoding (only `chunked` is accepted)",
        ));
    }
    if te && saw_cl {
        // Framed by chunked; the connection is not trusted past this one.
        keep_alive = false;
    }
    let lines = walk.into_lines(&head);
    let body = match (te, cl) {
        (true, _) => Decode::ChunkSize,
        (false, Some(n)) if n > 0 => Decode::Length(n),
        _ => Decode::Done,
    };
    let has_body = body != Decode::Done;
    let mut request = Box::new(Request::new(H1Body {
        slot: has_body.then(|| slot.clone()),
        decoder: Decoder::new(body, Trailers::Refuse),
        continue_left: if expect_continue && has_body && http11 {
            CONTINUE.len()
        } else {
            0
        },
        // Boxed, and only when there are any: a request often has none
        // (`Host` goes to the map).
        lines: (!lines.is_empty()).then(|| Box::new(lines)),
    }));
    *request.method_mut() = method;
    *request.uri_mut() = uri;
    *request.version_mut() = version;
    *request.headers_mut() = headers;
    Ok(Some(Parsed {
        request,
        keep_alive,
        body,
        wants_upgrade,
    }))
}

/// What a parse error was about, for the 400's text.
fn parse_error(e: httparse::Error, req: &httparse::Request<'_, '_>) -> &'static str {
    match e {
        httparse::Error::Token if req.method.is_none() => "invalid method",
        httparse::Error::Token => "invalid request target",
        httparse::Error::Version => "invalid HTTP version",
        httparse::Error::HeaderName => "invalid header name",
        httparse::Error::HeaderValue => "invalid header value",
        httparse::Error::NewLine => "invalid line ending",
        _ => "invalid request head",
    }
}

/// A request body read straight off the connection: `Content-Length` or
/// chunked, decoded strictly (`http1::Decoder`). Sends `100 Continue` when
/// first polled, if the client asked for it.
pub struct H1Body {
    /// The wire, for a body to read; `None` for a request without one,
    /// whose wire stays with the connection (`answer`): sharing it costs a
    /// reference count and a lock per poll, atomics all.
    slot: Option<Slot>,
    decoder: Decoder,
    /// Bytes of `100 Continue` still to write.
    continue_left: usize,
    /// The head's lines relayed as they came (see `parse`): they travel
    /// with the body, as a response's do (`ProxyBody`).
    lines: Option<Box<Lines>>,
}

impl H1Body {
    /// The head's lines kept out of its map (see `parse`).
    pub fn take_lines(&mut self) -> Option<Box<Lines>> {
        self.lines.take()
    }

    fn poll_body(
        &mut self,
        w: &mut Wire,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        while self.continue_left > 0 {
            let from = CONTINUE.len() - self.continue_left;
            match Pin::new(&mut w.stream).poll_write(cx, &CONTINUE[from..]) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Some(Err(BodyError::Eof))),
                Poll::Ready(Ok(n)) => self.continue_left -= n,
                Poll::Ready(Err(e)) => return Poll::Ready(Some(Err(e.into()))),
                Poll::Pending => return Poll::Pending,
            }
        }
        let out = self.decoder.poll_frame(&mut w.stream, &mut w.buf, cx);
        if self.decoder.is_done() && !w.body_done {
            w.body_done = true;
            if let Some(waker) = w.watch.take() {
                waker.wake();
            }
        }
        out
    }
}

impl Drop for H1Body {
    /// A `Content-Length` body left unread by the handler (a 404, a 308)
    /// that is already all in the buffer is skipped, so the connection can
    /// stay open; anything else left unread closes it after the answer.
    fn drop(&mut self) {
        if let (Decode::Length(n), Some(slot)) = (self.decoder.state, &self.slot) {
            let mut g = lock(slot);
            if let Some(w) = g.as_mut() {
                if usize::try_from(n).is_ok_and(|n| n <= w.buf.len()) && self.continue_left == 0 {
                    w.buf.advance(n as usize);
                    w.body_done = true;
                }
            }
        }
    }
}

impl Body for H1Body {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let Some(slot) = self.slot.clone() else {
            // Made without a wire only for a request without a body.
            return Poll::Ready(None);
        };
        let mut g = lock(&slot);
        let Some(w) = g.as_mut() else {
            return Poll::Ready(Some(Err(BodyError::Eof)));
        };
        let out = self.poll_body(w, cx);
        if let Poll::Ready(Some(Err(_))) = out {
            self.decoder.state = Decode::Failed;
            self.continue_left = 0;
        }
        out
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.decoder.state, Decode::Done | Decode::Failed)
    }

    fn size_hint(&self) -> SizeHint {
        self.decoder.size_hint()
    }
}

/// Writes a response. `Ok(true)`: the connection can take another request.
async fn write_response(
    wire: &mut Wire,
    // Read through its box: the response is never moved into this future.
    mut resp: Box<Response<ProxyBody>>,
    method: &Method,
    version: Version,
    mut keep_alive: bool,
) -> io::Result<bool> {
    let status = resp.status();
    let no_body = status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
        || *method == Method::HEAD;
    // HEAD and 304 keep a `Content-Length` describing the representation
    // (see `upstream::framing`); every other length is Usher's own.
    let keep_length = no_body && status != StatusCode::NO_CONTENT && !status.is_informational();
    let exact = resp.body().size_hint().exact();
    let length = if no_body { None } else { exact };
    // A HEAD answered by Usher itself (a 404, a 503) says how long the GET
    // answer would be, as hyper did; a backend's HEAD keeps its own.
    let head_length = (*method == Method::HEAD
        && status.is_success() | status.is_client_error() | status.is_server_error()
        && !resp.headers().contains_key(header::CONTENT_LENGTH))
    .then_some(exact)
    .flatten()
    .filter(|&n| n > 0);
    let chunked = !no_body && length.is_none() && version == Version::HTTP_11;
    if !no_body && length.is_none() && !chunked {
        // HTTP/1.0 and a length not known up front: the close ends the body.
        keep_alive = false;
    }

    let lines = resp.body_mut().take_lines();
    let mut head = Vec::with_capacity(200 + resp.headers().len() * 48 + lines.len());
    head.extend_from_slice(if version == Version::HTTP_10 {
        b"HTTP/1.0 "
    } else {
        b"HTTP/1.1 "
    });
    head.extend_from_slice(status.as_str().as_bytes());
    head.push(b' ');
    match resp.extensions().get::<hyper::ext::ReasonPhrase>() {
        // The backend's own reason phrase (hyper's client keeps it).
        Some(r) => head.extend_from_slice(r.as_bytes()),
        None => head.extend_from_slice(status.canonical_reason().unwrap_or("Unknown").as_bytes()),
    }
    head.extend_from_slice(b"\r\n");
    let mut saw_connection = false;
    let mut saw_date = false;
    for (name, value) in resp.headers() {
        match *name {
            header::TRANSFER_ENCODING => continue,
            header::CONTENT_LENGTH if !keep_length => continue,
            header::CONNECTION => {
                saw_connection = true;
                // Usher's own `close` (an error, a declined upgrade) ends
                // the connection after this answer.
                keep_alive &= !has_token(value, "close");
            }
            header::DATE => saw_date = true,
            _ => {}
        }
        head.extend_from_slice(name.as_str().as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(value.as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    if let Some(id) = resp.body_mut().take_request_id() {
        head.extend_from_slice(b"x-request-id: ");
        head.extend_from_slice(id.as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    // Lines relayed as they came name nothing Usher reads here but `Date`.
    saw_date |= lines.date;
    lines.write_to(&mut head);
    drop(lines);
    if let Some(n) = length.or(head_length) {
        head.extend_from_slice(b"content-length: ");
        head.extend_from_slice(itoa(n, &mut [0; 20]));
        head.extend_from_slice(b"\r\n");
    } else if chunked {
        head.extend_from_slice(b"transfer-encoding: chunked\r\n");
    }
    if !saw_date {
        head.extend_from_slice(b"date: ");
        crate::edge::date::with(|d| head.extend_from_slice(d));
        head.extend_from_slice(b"\r\n");
    }
    if !saw_connection && status != StatusCode::SWITCHING_PROTOCOLS {
        if !keep_alive && version == Version::HTTP_11 {
            head.extend_from_slice(b"connection: close\r\n");
        } else if keep_alive && version == Version::HTTP_10 {
            head.extend_from_slice(b"connection: keep-alive\r\n");
        }
    }
    head.extend_from_slice(b"\r\n");
    let body = resp.body_mut();

    if no_body {
        write_all(&mut wire.stream, &head[..]).await?;
        return Ok(keep_alive);
    }
    // The head goes out with the first piece of body when that is ready at
    // once (one write for a buffered response), else on its own first.
    let mut head = Some(head);
    let mut sent: u64 = 0;
    loop {
        let frame = match poll_fn(|cx| Poll::Ready(Pin::new(&mut *body).poll_frame(cx))).await {
            Poll::Ready(f) => f,
            Poll::Pending => {
                if let Some(h) = head.take() {
                    write_all(&mut wire.stream, &h[..]).await?;
                }
                std::future::poll_fn(|cx| Pin::new(&mut *body).poll_frame(cx)).await
            }
        };
        let data = match frame {
            None => break,
            // The backend failed mid-body: the client sees the message
            // cut short (no last chunk, or fewer bytes than announced).
            Some(Err(_)) => return Err(io::Error::other("response body failed")),
            Some(Ok(f)) => match f.into_data() {
                Ok(d) if d.is_empty() => continue,
                Ok(d) => d,
                Err(_) => continue,
            },
        };
        sent += data.len() as u64;
        if length.is_some_and(|n| sent > n) {
            return Err(io::Error::other("response body longer than its length"));
        }
        let h: &[u8] = head.as_deref().unwrap_or(&[]);
        if chunked {
            let mut line = [0u8; 20];
            let size = hex_line(data.len(), &mut line);
            write_all(
                &mut wire.stream,
                Buf::chain(h, size).chain(&data[..]).chain(&b"\r\n"[..]),
            )
            .await?;
        } else {
            write_all(&mut wire.stream, Buf::chain(h, &data[..])).await?;
        }
        head = None;
    }
    if length.is_some_and(|n| sent != n) {
        return Err(io::Error::other("response body shorter than its length"));
    }
    let h: &[u8] = head.as_deref().unwrap_or(&[]);
    let end: &[u8] = if chunked { b"0\r\n\r\n" } else { b"" };
    if !h.is_empty() || !end.is_empty() {
        write_all(&mut wire.stream, Buf::chain(h, end)).await?;
    }
    Ok(keep_alive)
}

/// Writes all of `buf` (a chain of pieces goes out gathered: one `writev`
/// when the socket takes it all); a write that makes no progress for
/// `SEND_TIMEOUT` fails.
async fn write_all(stream: &mut TcpStream, mut buf: impl Buf) -> io::Result<()> {
    while buf.has_remaining() {
        let mut write = std::pin::pin!(poll_fn(|cx| {
            crate::http1::poll_write_gathered(&mut *stream, cx, &mut buf)
        }));
        // Polled once first: a socket with room takes it at once, and no
        // timer is made (nor the clock read) for a write that cannot stall.
        let n = match poll_fn(|cx| Poll::Ready(write.as_mut().poll(cx))).await {
            Poll::Ready(r) => r?,
            Poll::Pending => tokio::time::timeout(SEND_TIMEOUT, write)
                .await
                .map_err(|_| io::Error::from(io::ErrorKind::TimedOut))??,
        };
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
    }
    Ok(())
}

/// Closes a connection: the write side first, then whatever the client still
/// sends is read and dropped for a moment, so that unread request bytes do
/// not make the kernel reset the connection under the answer.
async fn linger(mut wire: Wire) {
    if wire.stream.shutdown().await.is_err() {
        return;
    }
    let deadline = Instant::now() + LINGER;
    let mut sink = vec![0u8; 16 * 1024];
    let mut total = 0;
    while total < LINGER_BYTES {
        match tokio::time::timeout_at(deadline, wire.stream.read(&mut sink)).await {
            Ok(Ok(n)) if n > 0 => total += n,
            _ => return,
        }
    }
}

/// The socket after a `101`: what was read past the request first, then the
/// socket itself.
struct Rewind {
    pre: Bytes,
    stream: TcpStream,
}

impl AsyncRead for Rewind {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.pre.is_empty() {
            let n = self.pre.len().min(buf.remaining());
            buf.put_slice(&self.pre[..n]);
            self.pre.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Rewind {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_str(s: &str) -> Result<Option<Parsed>, Error> {
        parse(&mut BytesMut::from(s.as_bytes()), &Slot::default())
    }

    #[test]
    fn a_head_is_parsed_and_taken_off_the_buffer() {
        let mut b = BytesMut::from(&b"GET /a?b HTTP/1.1\r\nHost: x\r\nX-E:\r\n\r\nNEXT"[..]);
        let p = parse(&mut b, &Slot::default()).unwrap().unwrap();
        assert_eq!(p.request.uri(), "/a?b");
        assert_eq!(p.request.headers()["host"], "x");
        // A line Usher does not read is kept as it came, out of the map.
        let mut lines = Vec::new();
        p.request
            .body()
            .lines
            .as_ref()
            .expect("a relayed line")
            .write_to(&mut lines);
        assert_eq!(lines, b"X-E:\r\n");
        assert!(!p.request.headers().contains_key("x-e"));
        assert!(p.keep_alive);
        assert_eq!(p.body, Decode::Done);
        assert_eq!(&b[..], b"NEXT");
        assert!(parse_str("GET / HTTP/1.1\r\nHost: x\r\n")
            .unwrap()
            .is_none());
    }

    #[test]
    fn framing_follows_hyper_s_rules() {
        let p = |s: &str| parse_str(s).unwrap().unwrap();
        let cl = p("POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n");
        assert_eq!(cl.body, Decode::Length(5));
        assert_eq!(
            cl.request
                .headers()
                .get_all("content-length")
                .iter()
                .count(),
            1
        );
        let te = p("POST / HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n");
        assert_eq!(te.body, Decode::ChunkSize);
        assert!(!te.keep_alive);
        assert!(!te.request.headers().contains_key("content-length"));
        let refused = |s: &str| parse_str(s).err().unwrap().status();
        assert_eq!(
            refused("POST / HTTP/1.1\r\nContent-Length: +5\r\n\r\n"),
            400
        );
        assert_eq!(
            refused("POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n"),
            400
        );
        assert_eq!(
            refused("POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n"),
            400
        );
        assert_eq!(
            refused("POST / HTTP/1.1\r\nTransfer-Encoding: chunked, gzip\r\n\r\n"),
            400
        );
        assert_eq!(refused("GET / HTTP/1.1\r\nX: a\r\n b\r\n\r\n"), 400);
        let long = format!("GET /{} HTTP/1.1\r\n\r\n", "a".repeat(MAX_URI));
        assert_eq!(refused(&long), 414);
        let many: String = (0..=MAX_HEADERS).map(|i| format!("X-{i}: v\r\n")).collect();
        assert_eq!(refused(&format!("GET / HTTP/1.1\r\n{many}\r\n")), 431);
    }

    #[test]
    fn keep_alive_follows_version_and_connection() {
        let ka = |s: &str| parse_str(s).unwrap().unwrap().keep_alive;
        assert!(ka("GET / HTTP/1.1\r\n\r\n"));
        assert!(!ka(
            "GET / HTTP/1.1\r\nConnection: keep-alive, close\r\n\r\n"
        ));
        assert!(!ka("GET / HTTP/1.0\r\n\r\n"));
        assert!(ka("GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n"));
    }
}
