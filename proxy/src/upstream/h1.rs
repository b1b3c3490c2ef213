//! Usher's own HTTP/1.1 client side, for the pooled connections to backends
//! (`pool.rs`). `protocol: http2` upstreams, health checks and capacity
//! probes keep hyper-util's client.
//!
//! Why not hyper's client connection: it runs each connection on a task of
//! its own, and a request travels to that task through a channel and its
//! response back through another, two task hops per exchange on the request
//! path. Here the request's own future writes the request and reads the
//! response, and the body is read straight off the connection by whoever
//! polls it; a connection between two requests is its socket and, when its
//! last response came in one read, the rest of that read's buffer (no task).
//!
//! What a backend may send is what hyper's client accepted, or less:
//! - heads are parsed by `httparse` with hyper's (strict, default)
//!   configuration: no obs-fold, no bare CR, no NUL, at most 100 headers
//!   and `MAX_HEAD` bytes, a three-digit status;
//! - 1xx answers other than `101` are skipped; a `101` ends the connection
//!   (the caller refuses it: `Upstream::send`);
//! - a body is framed by `Transfer-Encoding: chunked` (HTTP/1.1 only, one
//!   header, nothing else) or `Content-Length` (digits, duplicates equal),
//!   never both; with neither it ends at the close; HEAD, 1xx, 204 and 304
//!   have none, whatever they say;
//! - a connection is reused only after a response read to its end with
//!   nothing after it, framed by its length or chunks, and kept alive by
//!   the backend (HTTP/1.1 without `close`, HTTP/1.0 with `keep-alive`).
//!   Bytes past a body, and bytes arriving on an idle connection, end the
//!   connection: they never become the answer to the next request.

use std::future::{poll_fn, Future};
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Response, StatusCode, Version};
use hyper::body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_util::either::Either;

use super::pool::Conn;
use crate::edge::headers::{has_token, read_or_set_by_usher, Identity};
use crate::edge::listener::MAX_HEAD;
use crate::http1::{digits, offset, BodyError, Decode, Decoder, Lines, Trailers};
use crate::tls::connector::UpstreamStream;

/// The most headers a response may have (hyper's default).
const MAX_HEADERS: usize = 100;
/// The first read of a response: a head and a small body.
const FIRST_READ: usize = 8 * 1024;

/// A backend connection's socket: plain, or TLS.
pub type Io = Either<TcpStream, Box<TlsStream<TcpStream>>>;

impl From<UpstreamStream> for Io {
    fn from(s: UpstreamStream) -> Self {
        match s {
            UpstreamStream::Plain(t) => Either::Left(t.into_inner()),
            UpstreamStream::Tls(t) => Either::Right(Box::new(t.into_inner())),
        }
    }
}

/// A request as it goes on the wire: encoded once, so it can be sent again
/// on a new connection when a pooled one turns out closed.
pub struct Outgoing {
    pub head: Vec<u8>,
    pub body: Bytes,
    pub method: Method,
}

impl Outgoing {
    /// Encodes the request `head` for a backend: origin-form `target`, every
    /// header of `head` except those that `identity` or `set` replace and
    /// `Content-Length` (Usher's own, from the buffered body), the `lines`
    /// kept out of its map as they came, then theirs.
    /// The `Host` is `identity`'s, else the request's own, else `host` (the
    /// backend's authority: an HTTP/1.0 request may have none). The headers
    /// in `set` have numbers for values (`stamp::Stamp`).
    pub fn new(
        head: &http::request::Parts,
        lines: Option<&Lines>,
        target: &str,
        host: &str,
        body: Bytes,
        identity: Option<&Identity>,
        set: &[(&HeaderName, u64)],
    ) -> Self {
        let mut out =
            Vec::with_capacity(256 + head.headers.len() * 48 + lines.map_or(0, Lines::len));
        out.extend_from_slice(head.method.as_str().as_bytes());
        out.push(b' ');
        out.extend_from_slice(target.as_bytes());
        out.extend_from_slice(b" HTTP/1.1\r\n");
        fn line(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
            out.extend_from_slice(name);
            out.extend_from_slice(b": ");
            out.extend_from_slice(value);
            out.extend_from_slice(b"\r\n");
        }
        match identity.and_then(Identity::host) {
            Some(v) => line(&mut out, b"host", v.as_bytes()),
            None if !head.headers.contains_key(header::HOST) => {
                line(&mut out, b"host", host.as_bytes())
            }
            None => {}
        }
        for (name, value) in &head.headers {
            if *name == header::CONTENT_LENGTH
                || identity.is_some_and(|i| i.replaces(name))
                || set.iter().any(|(n, _)| *n == name)
            {
                continue;
            }
            line(&mut out, name.as_str().as_bytes(), value.as_bytes());
        }
        // None of them is one that `identity` or `set` replaces
        // (`headers::read_by_usher_in_requests`).
        if let Some(lines) = lines {
            lines.write_to(&mut out);
        }
        for (name, value) in identity.into_iter().flat_map(Identity::fields) {
            line(&mut out, name.as_str().as_bytes(), value.as_bytes());
        }
        for &(name, n) in set {
            line(
                &mut out,
                name.as_str().as_bytes(),
                crate::http1::itoa(n, &mut [0; 20]),
            );
        }
        if super::framing::request_has_length(&head.method, body.len()) {
            line(
                &mut out,
                b"content-length",
                crate::http1::itoa(body.len() as u64, &mut [0; 20]),
            );
        }
        out.extend_from_slice(b"\r\n");
        Outgoing {
            head: out,
            body,
            method: head.method.clone(),
        }
    }
}

/// Why an exchange on a connection failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("the backend closed the connection before answering")]
    Closed,
    #[error("invalid response from the backend: {0}")]
    Head(&'static str),
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// How [`Connection::round_trip`] failed.
pub enum Failure {
    /// A reused connection that the backend had closed: the request did not
    /// all go out, and nothing came back. `partly`: some of it went out.
    Stale {
        partly: bool,
    },
    Broken(ClientError),
}

impl From<Failure> for ClientError {
    /// A stale connection not sent on again: nothing came back.
    fn from(f: Failure) -> Self {
        match f {
            Failure::Stale { .. } => ClientError::Closed,
            Failure::Broken(e) => e,
        }
    }
}

/// A response head, and how its body is framed.
pub struct Head {
    parts: http::response::Parts,
    decode: Decode,
    keep_alive: bool,
    /// `X-Usher-Load`: taken off the head, not put in `parts`.
    load: Option<Bytes>,
    /// The lines relayed as they came, not put in `parts` either.
    lines: Lines,
}

/// One connection to a backend, between requests or in one.
pub struct Connection {
    io: Io,
    /// Read but not consumed yet; empty between requests. Kept with its
    /// room when the last response came whole in one read (`keep_buf`):
    /// the next one is read into the rest of the same allocation, or into
    /// its start again once no earlier response's bytes refer to it (an
    /// 8 KiB allocation per response cost more than its parse: ~250
    /// instructions). A buffer that took more reads may have grown (body
    /// reads ask for up to 64 KiB), and is given back rather than pinned
    /// by the next small responses.
    buf: BytesMut,
    /// The last response's head was whole after one read, and its body
    /// with it: `buf` never grew past [`FIRST_READ`].
    keep_buf: bool,
    /// Responses read whole on it: a reused connection may have been closed
    /// by the backend while idle.
    served: u64,
}

impl Connection {
    pub fn new(io: Io) -> Self {
        Connection {
            io,
            buf: BytesMut::new(),
            keep_buf: false,
            served: 0,
        }
    }

    /// Whether an idle connection can take a request: still open, and
    /// nothing arrived on it. Does not wait, and makes no system call
    /// unless the socket became readable since it was last read.
    pub fn is_idle_and_open(&mut self) -> bool {
        if !self.buf.is_empty() {
            return false;
        }
        let mut probe = [0u8; 1];
        match &mut self.io {
            // Answered from the readiness tokio holds: no waker to register
            // and no budget to spend (a poll cost both).
            Either::Left(tcp) => {
                matches!(tcp.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
            }
            // TLS may hold a record already read: its stream is asked.
            Either::Right(tls) => {
                let mut cx = Context::from_waker(Waker::noop());
                let mut probe = ReadBuf::new(&mut probe);
                // Unconstrained: with the task's budget spent, tokio
                // answers `Pending` without looking at the socket.
                let read =
                    poll_fn(|cx| Poll::Ready(Pin::new(&mut **tls).poll_read(cx, &mut probe)));
                let mut read = std::pin::pin!(tokio::task::unconstrained(read));
                matches!(read.as_mut().poll(&mut cx), Poll::Ready(Poll::Pending))
            }
        }
    }

    /// Writes `req` and reads the response head. Reading starts while the
    /// request is still being written, so a backend that answers early (a
    /// 413 before the whole upload) is heard; the connection then closes
    /// after the response.
    pub async fn round_trip(&mut self, req: &Outgoing) -> Result<Head, Failure> {
        let reused = self.served > 0;
        let (head, body) = (&req.head[..], &req.body[..]);
        let total = head.len() + body.len();
        let mut written = 0;
        // Written, and flushed: TLS takes bytes into its buffer before they
        // reach the socket.
        let mut out = false;
        let mut write_failed = false;
        let mut received = false;
        // A read left the head partial: the buffer may have grown.
        let mut partial = false;
        let no_body = req.method == Method::HEAD;
        // Not all out and nothing back: the backend had closed the
        // connection, and never had a whole request to run. Once all of it
        // is out, a close may be a crash mid-request: that is the caller's
        // failure to retry (idempotent requests only), as with hyper.
        let stale_or = |received: bool, out: bool, written: usize, e: ClientError| {
            if reused && !received && !out {
                Failure::Stale {
                    partly: written > 0,
                }
            } else {
                Failure::Broken(e)
            }
        };
        poll_fn(|cx| {
            while !write_failed && written < total {
                let mut rest = if written < head.len() {
                    Buf::chain(&head[written..], body)
                } else {
                    Buf::chain(&[][..], &body[written - head.len()..])
                };
                match crate::http1::poll_write_gathered(&mut self.io, cx, &mut rest) {
                    Poll::Ready(Ok(n)) if n > 0 => written += n,
                    Poll::Ready(_) => write_failed = true,
                    Poll::Pending => break,
                }
            }
            if !write_failed && !out && written == total {
                match Pin::new(&mut self.io).poll_flush(cx) {
                    Poll::Ready(Ok(())) => out = true,
                    Poll::Ready(Err(_)) => write_failed = true,
                    Poll::Pending => {}
                }
            }
            // A failed write ends the writing, not the exchange: the backend
            // may have answered before it closed (a 413 to an upload), and
            // its close is read next.
            loop {
                if !self.buf.is_empty() {
                    received = true;
                    match parse(&mut self.buf, no_body) {
                        Ok(Parsed::Informational) => continue,
                        Ok(Parsed::Final(mut h)) => {
                            // An early answer: the rest of the request
                            // would be read as the next one.
                            h.keep_alive &= out;
                            self.keep_buf = !partial
                                && match h.decode {
                                    Decode::Done => true,
                                    Decode::Length(n) => self.buf.len() as u64 >= n,
                                    _ => false,
                                };
                            return Poll::Ready(Ok(h));
                        }
                        Ok(Parsed::Partial) if self.buf.len() > MAX_HEAD => {
                            return Poll::Ready(Err(Failure::Broken(ClientError::Head(
                                "response head too large",
                            ))))
                        }
                        Ok(Parsed::Partial) => partial = true,
                        Err(reason) => {
                            return Poll::Ready(Err(Failure::Broken(ClientError::Head(reason))))
                        }
                    }
                }
                crate::http1::reserve_for_head(&mut self.buf, FIRST_READ);
                match tokio_util::io::poll_read_buf(Pin::new(&mut self.io), cx, &mut self.buf) {
                    Poll::Ready(Ok(0)) => {
                        let e = ClientError::Closed;
                        return Poll::Ready(Err(stale_or(received, out, written, e)));
                    }
                    Poll::Ready(Ok(_)) => {}
                    Poll::Ready(Err(e)) => {
                        return Poll::Ready(Err(stale_or(received, out, written, e.into())))
                    }
                    Poll::Pending => return Poll::Pending,
                }
            }
        })
        .await
    }
}

// Returned once per response head and taken apart at once: a box would
// cost an allocation per response.
#[allow(clippy::large_enum_variant)]
enum Parsed {
    Partial,
    /// A 1xx other than 101, taken off the buffer.
    Informational,
    Final(Head),
}

fn invalid(e: httparse::Error) -> &'static str {
    match e {
        httparse::Error::TooManyHeaders => "too many headers",
        httparse::Error::Status => "invalid status code",
        httparse::Error::Version => "invalid status line",
        httparse::Error::HeaderName => "invalid header name",
        httparse::Error::HeaderValue => "invalid header value",
        httparse::Error::NewLine => "invalid line ending",
        _ => "invalid response head",
    }
}

/// Parses a response head at the start of `buf` and, when it is whole, takes
/// it off `buf`. `no_body`: the answer to a HEAD.
fn parse(buf: &mut BytesMut, no_body: bool) -> Result<Parsed, &'static str> {
    // Uninitialised, as the edge's (`edge::h1::parse`).
    let mut slots = [std::mem::MaybeUninit::uninit(); MAX_HEADERS];
    let mut res = httparse::Response::new(&mut []);
    let len = match httparse::ParserConfig::default()
        .parse_response_with_uninit_headers(&mut res, buf, &mut slots)
    {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(Parsed::Partial),
        Err(e) => return Err(invalid(e)),
    };
    if len > MAX_HEAD {
        return Err("response head too large");
    }
    let (Some(code), Some(minor)) = (res.code, res.version) else {
        return Err("invalid status line");
    };
    let status = StatusCode::from_u16(code).map_err(|_| "invalid status code")?;
    if status.is_informational() && status != StatusCode::SWITCHING_PROTOCOLS {
        buf.advance(len);
        return Ok(Parsed::Informational);
    }
    let version = if minor == 1 {
        Version::HTTP_11
    } else {
        Version::HTTP_10
    };
    let reason = res.reason.unwrap_or("");
    let reason = (Some(reason) != status.canonical_reason())
        .then(|| hyper::ext::ReasonPhrase::try_from(reason.as_bytes().to_vec()).ok())
        .flatten();
    // Where each name and value is, so that values share the head's bytes.
    let mut at = Vec::with_capacity(res.headers.len());
    for h in res.headers.iter() {
        let name = offset(buf, h.name.as_bytes()).ok_or("invalid header name")?;
        let value = if h.value.is_empty() {
            0..0
        } else {
            offset(buf, h.value).ok_or("invalid header value")?
        };
        at.push((name, value));
    }
    let head = buf.split_to(len).freeze();

    let mut keep_alive = version == Version::HTTP_11;
    let mut saw_close = false;
    let (mut te, mut chunked) = (0, false);
    let mut length: Option<u64> = None;
    let mut load = None;
    // The length of a HEAD's or a 304's answer describes the
    // representation and is relayed; any other framing is Usher's own:
    // kept out of the map, so `framing::take_response_framing` is skipped
    // for an HTTP/1 backend.
    let relay_length = no_body || status == StatusCode::NOT_MODIFIED;
    // Lines Usher does not touch go to the client as they came.
    let named_by_connection = crate::http1::has_connection(&head, &at);
    let mut date = false;
    // Most lines are kept as they came: the map is made for the rest as
    // they come.
    let mut headers = if named_by_connection {
        HeaderMap::with_capacity(at.len())
    } else {
        HeaderMap::new()
    };
    let mut walk = crate::http1::Kept::new(at);
    while let Some((name_at, at)) = walk.next_line() {
        let name =
            crate::http1::header_name(&head[name_at.clone()]).map_err(|_| "invalid header name")?;
        // httparse has checked the value's bytes; a header value is made
        // only for what goes on in the map.
        let raw = &head[at.clone()];
        match name {
            header::TRANSFER_ENCODING => {
                te += 1;
                chunked = raw.eq_ignore_ascii_case(b"chunked");
                continue;
            }
            header::CONTENT_LENGTH => {
                let n = digits(raw).ok_or("invalid Content-Length")?;
                if length.is_some_and(|prev| prev != n) {
                    return Err("conflicting Content-Length headers");
                }
                length = Some(n);
                if !relay_length {
                    continue;
                }
            }
            // Read by the exchange (the first one, as `remove` would), and
            // never relayed: no need to index it in the map.
            _ if name == super::framing::X_USHER_LOAD => {
                load.get_or_insert_with(|| head.slice(at));
                continue;
            }
            _ => {}
        }
        if !named_by_connection && !read_or_set_by_usher(&name) {
            date |= name == header::DATE;
            walk.keep();
            continue;
        }
        let value = if at.is_empty() {
            HeaderValue::from_static("")
        } else {
            HeaderValue::from_maybe_shared(head.slice(at)).map_err(|_| "invalid header value")?
        };
        if name == header::CONNECTION {
            if saw_close || has_token(&value, "close") {
                saw_close = true;
                keep_alive = false;
            } else if !keep_alive {
                keep_alive = has_token(&value, "keep-alive");
            }
        }
        headers.append(name, value);
    }
    // Framed two ways, or by a coding Usher cannot frame: a splitting
    // attempt or a body that cannot be relayed; either way never reused.
    if te > 0 {
        if length.is_some() {
            return Err("response has both Content-Length and Transfer-Encoding");
        }
        if te > 1 || !chunked {
            return Err("response has a Transfer-Encoding other than `chunked`");
        }
        if version == Version::HTTP_10 {
            return Err("Transfer-Encoding in an HTTP/1.0 response");
        }
    }
    let decode = if no_body
        || status == StatusCode::SWITCHING_PROTOCOLS
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        Decode::Done
    } else if te > 0 {
        Decode::ChunkSize
    } else {
        match length {
            Some(0) => Decode::Done,
            Some(n) => Decode::Length(n),
            None => {
                keep_alive = false;
                Decode::UntilClose
            }
        }
    };
    if status == StatusCode::SWITCHING_PROTOCOLS {
        keep_alive = false;
    }
    let mut response = Response::new(());
    *response.status_mut() = status;
    *response.version_mut() = version;
    *response.headers_mut() = headers;
    if let Some(r) = reason {
        response.extensions_mut().insert(r);
    }
    let (parts, ()) = response.into_parts();
    let mut lines = walk.into_lines(&head);
    lines.date = date;
    Ok(Parsed::Final(Head {
        parts,
        decode,
        keep_alive,
        load,
        lines,
    }))
}

/// A response body read straight off its backend connection. Read to its
/// end, the connection goes back to the pool by itself (when it may be
/// reused); dropped before, it is closed.
pub struct ResponseBody {
    conn: Option<Conn>,
    decoder: Decoder,
    keep_alive: bool,
    /// The head's `X-Usher-Load`, kept out of its header map (see `parse`).
    load: Option<Bytes>,
    /// The head's lines relayed as they came (see `parse`).
    lines: Lines,
}

impl ResponseBody {
    /// The response whose head `head` is, with its body on `conn`: boxed,
    /// and with the body as the exchange holds it (`UpstreamBody`), so it is
    /// made once and moved as a pointer from here to `Upstream::send`. (So
    /// the HTTP/1 client names the h2 body type too: `UpstreamBody` is the
    /// one response body of both protocols.)
    pub fn response(head: Head, conn: Conn) -> Box<Response<super::UpstreamBody>> {
        let mut body = ResponseBody {
            decoder: Decoder::new(head.decode, Trailers::Parse),
            keep_alive: head.keep_alive,
            conn: None,
            load: head.load,
            lines: head.lines,
        };
        if body.decoder.is_done() {
            body.finish(conn);
        } else {
            body.conn = Some(conn);
        }
        Box::new(Response::from_parts(
            head.parts,
            super::UpstreamBody::Left(body),
        ))
    }

    /// The worker's load report that came with the head. It is for Usher
    /// alone, so it was never put among the headers the client gets.
    pub fn take_load(&mut self) -> Option<Bytes> {
        self.load.take()
    }

    /// The head's lines that go to the client as they came.
    pub fn take_lines(&mut self) -> Lines {
        std::mem::take(&mut self.lines)
    }

    /// The body has been read whole: the connection goes back to the pool
    /// if nothing follows it.
    fn finish(&mut self, mut conn: Conn) {
        let c = conn.connection();
        c.served += 1;
        if self.keep_alive && c.buf.is_empty() {
            if !c.keep_buf {
                c.buf = BytesMut::new();
            }
            conn.checkin();
        }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = &mut *self;
        let Some(conn) = this.conn.as_mut() else {
            return Poll::Ready(None);
        };
        let c = conn.connection();
        let out = this.decoder.poll_frame(&mut c.io, &mut c.buf, cx);
        if this.decoder.is_done() {
            if let Some(conn) = this.conn.take() {
                this.finish(conn);
            }
        } else if let Poll::Ready(Some(Err(_))) = out {
            this.conn = None;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn head(s: &str) -> Result<Head, &'static str> {
        match parse(&mut BytesMut::from(s.as_bytes()), false)? {
            Parsed::Final(h) => Ok(h),
            Parsed::Partial => Err("partial"),
            Parsed::Informational => Err("informational"),
        }
    }

    #[test]
    fn framing_is_checked_and_decided() {
        let h = head("HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n").unwrap();
        assert_eq!((h.decode, h.keep_alive), (Decode::Length(5), true));
        // The framing the client gets is Usher's own: not in the map...
        assert!(h.parts.headers.is_empty());
        let h = head("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n").unwrap();
        assert_eq!(h.decode, Decode::ChunkSize);
        assert!(h.parts.headers.is_empty());
        // ...but for the length a HEAD's or a 304's answer describes.
        let h = head("HTTP/1.1 304 Not Modified\r\nContent-Length: 7\r\n\r\n").unwrap();
        assert_eq!(h.decode, Decode::Done);
        assert_eq!(h.parts.headers["content-length"], "7");
        let mut b = BytesMut::from(&b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\n"[..]);
        let Ok(Parsed::Final(h)) = parse(&mut b, true) else {
            panic!("no answer to a HEAD");
        };
        assert_eq!(h.decode, Decode::Done);
        assert_eq!(h.parts.headers["content-length"], "7");
        let h = head("HTTP/1.0 200 OK\r\n\r\n").unwrap();
        assert_eq!((h.decode, h.keep_alive), (Decode::UntilClose, false));
        let h = head("HTTP/1.1 204 No Content\r\nContent-Length: 9\r\n\r\n").unwrap();
        assert_eq!(h.decode, Decode::Done);
        let h = head("HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").unwrap();
        assert_eq!((h.decode, h.keep_alive), (Decode::Done, false));
        let h =
            head("HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 1\r\n\r\n").unwrap();
        assert!(h.keep_alive);
        for bad in [
            "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
            "HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: +2\r\n\r\n",
            "HTTP/1.1 200 OK\r\nX: a\r\n b\r\n\r\n",
            "HTTP/1.1 abc\r\n\r\n",
            "FOO\r\n\r\n",
        ] {
            assert!(head(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn lines_usher_does_not_touch_are_relayed_as_they_came() {
        let h = head(concat!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nX-Request-Id: theirs\r\n",
            "Set-Cookie: a=1\r\nX-Usher-Refused: busy\r\nSet-Cookie:b=2  \r\nX-Empty:\r\n",
            "Date: Wed, 02 Dec 2026 04:47:52 GMT\r\nKeep-Alive: timeout=5\r\n",
            "Content-Length: 0\r\n\r\n"
        ))
        .unwrap();
        // What Usher reads, replaces or drops is in the map...
        let names: Vec<&str> = h.parts.headers.keys().map(|n| n.as_str()).collect();
        assert_eq!(names, ["x-request-id", "x-usher-refused", "keep-alive"]);
        // ...the rest, in order, as written.
        let mut out = Vec::new();
        h.lines.write_to(&mut out);
        assert_eq!(out.len(), h.lines.len());
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "Content-Type: text/plain\r\nSet-Cookie: a=1\r\nSet-Cookie:b=2\r\nX-Empty:\r\nDate: Wed, 02 Dec 2026 04:47:52 GMT\r\n"
        );
        assert!(h.lines.date);
        let mut map = HeaderMap::new();
        h.lines.append_to(&mut map);
        assert_eq!(map.get_all("set-cookie").iter().count(), 2);
        assert_eq!(map["content-type"], "text/plain");
        assert_eq!(map["x-empty"], "");
        let cookies: Vec<_> = map.get_all("set-cookie").iter().collect();
        assert_eq!(cookies, ["a=1", "b=2"]);

        // A `Connection` header may name any of them: all go to the map,
        // for the hop-by-hop strip to see.
        let h = head(concat!(
            "HTTP/1.1 200 OK\r\nX-Secret: 1\r\nCONNECTION: x-secret\r\n",
            "Content-Type: text/plain\r\nContent-Length: 0\r\n\r\n"
        ))
        .unwrap();
        assert!(h.lines.is_empty());
        assert_eq!(h.parts.headers.len(), 3);
    }

    #[test]
    fn informational_answers_are_taken_off_and_reasons_kept() {
        let mut b = BytesMut::from(
            &b"HTTP/1.1 103 Early Hints\r\nLink: x\r\n\r\nHTTP/1.1 200 Fine\r\n\r\n"[..],
        );
        assert!(matches!(parse(&mut b, false), Ok(Parsed::Informational)));
        let Ok(Parsed::Final(h)) = parse(&mut b, true) else {
            panic!("no final answer");
        };
        assert_eq!(h.decode, Decode::Done, "the answer to a HEAD has no body");
        let reason = h
            .parts
            .extensions
            .get::<hyper::ext::ReasonPhrase>()
            .unwrap();
        assert_eq!(reason.as_bytes(), b"Fine");
        assert!(b.is_empty());
    }

    #[test]
    fn requests_are_encoded_with_usher_s_length_and_overrides() {
        let mut req = http::Request::post("/a?b").body(()).unwrap();
        req.headers_mut()
            .insert("x-request-start", "1".parse().unwrap());
        req.headers_mut()
            .insert("content-length", "99".parse().unwrap());
        req.headers_mut().append("x-multi", "1".parse().unwrap());
        req.headers_mut().append("x-multi", "2".parse().unwrap());
        let (parts, ()) = req.into_parts();
        let start = HeaderName::from_static("x-request-start");
        // A client's lines kept out of the map go after the map's headers,
        // as they came, and before what Usher sets.
        let raw = Bytes::from_static(b"Cookie: a=1\r\nX-E:\r\n");
        let lines = Lines::new(&raw, vec![(0..6, 8..11), (13..16, 0..0)]);
        let (map, relayed) = ("x-multi: 1\r\nx-multi: 2\r\n", "Cookie: a=1\r\nX-E:\r\n");
        for (lines, between) in [(None, ""), (Some(&lines), relayed)] {
            let out = Outgoing::new(
                &parts,
                lines,
                "/a?b",
                "10.0.0.1:80",
                Bytes::from_static(b"hey"),
                None,
                &[(&start, 2)],
            );
            let want = format!(
                "POST /a?b HTTP/1.1\r\nhost: 10.0.0.1:80\r\n{map}{between}x-request-start: 2\r\ncontent-length: 3\r\n\r\n"
            );
            assert_eq!(String::from_utf8_lossy(&out.head), want);
        }
    }

    #[test]
    fn the_identity_replaces_the_client_s_own_and_matches_a_header_map_s() {
        let mut req = http::Request::get("/").body(()).unwrap();
        let h = req.headers_mut();
        h.insert("host", "Spoofed".parse().unwrap());
        h.append("x-forwarded-for", "1.1.1.1".parse().unwrap());
        h.append("x-forwarded-for", "2.2.2.2".parse().unwrap());
        h.insert("x-forwarded-proto", "gopher".parse().unwrap());
        h.insert("x-forwarded-host", "spoofed".parse().unwrap());
        h.insert("x-request-id", "theirs".parse().unwrap());
        h.insert("accept", "*/*".parse().unwrap());
        let (parts, ()) = req.into_parts();
        let peer = HeaderValue::from_static("9.9.9.9");
        let id = HeaderValue::from_static("ours");
        for host in [Some(HeaderValue::from_static("app.test")), None] {
            let identity = Identity::new(&parts.headers, &peer, "https", host.as_ref(), &id);
            let out = Outgoing::new(
                &parts,
                None,
                "/",
                "10.0.0.1:80",
                Bytes::new(),
                Some(&identity),
                &[],
            );
            let mut map = parts.headers.clone();
            identity.insert_into(&mut map);
            // What an HTTP/1 backend reads is what an h2 one gets in its map.
            let mut slots = [httparse::EMPTY_HEADER; 16];
            let mut read = httparse::Request::new(&mut slots);
            assert!(read.parse(&out.head).unwrap().is_complete());
            let mut sent = HeaderMap::new();
            for h in read.headers.iter() {
                sent.append(
                    HeaderName::from_bytes(h.name.as_bytes()).unwrap(),
                    HeaderValue::from_bytes(h.value).unwrap(),
                );
            }
            assert_eq!(sent, map, "host {host:?}");
            assert_eq!(sent["x-forwarded-for"], "1.1.1.1, 2.2.2.2, 9.9.9.9");
            assert_eq!(sent["x-request-id"], "ours");
            match host {
                Some(_) => {
                    assert_eq!(sent["host"], "app.test");
                    assert_eq!(sent["x-forwarded-host"], "app.test");
                }
                None => {
                    assert_eq!(sent["host"], "Spoofed");
                    assert!(!sent.contains_key("x-forwarded-host"));
                }
            }
        }
    }
}
