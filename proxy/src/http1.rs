//! HTTP/1 framing shared by both of Usher's HTTP/1 sides: the edge's server
//! side (`edge::h1`, request bodies) and the upstream client
//! (`upstream::h1`, response bodies).
//!
//! One strict body decoder ([`Decoder`]) serves both: `Content-Length`,
//! chunked, or (responses only) delimited by the close. Chunk-size lines are
//! hex digits only, checked against overflow however they are split into
//! reads; exactly CRLF follows each size line and each chunk's data;
//! extensions are bounded (16 KiB per body). A failed body ends in
//! [`Decode::Failed`] and is never done, so its connection is never reused.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::body::{Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite};

/// A body's first read asks for this much room; each read that fills it
/// doubles it, up to `BODY_READ`. (A slow peer holds 8 KiB, not 64.)
pub const BODY_FIRST_READ: usize = 8 * 1024;
pub const BODY_READ: usize = 64 * 1024;
/// The most chunk-extension bytes in one body (hyper's limit), which also
/// bounds one chunk-size line.
const CHUNK_EXT_TOTAL: usize = 16 * 1024;
const CHUNK_LINE_MAX: usize = CHUNK_EXT_TOTAL + 64;
/// The largest trailer section of a chunked response.
const TRAILERS_MAX: usize = 16 * 1024;
/// The most fields in a trailer section.
const TRAILERS_COUNT: usize = 100;

/// Where a body's decoder is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decode {
    /// Bytes left of a `Content-Length` body.
    Length(u64),
    /// Waiting for a chunk-size line.
    ChunkSize,
    /// Bytes left of a chunk's data.
    ChunkData(u64),
    /// The CRLF after a chunk's data.
    ChunkEnd,
    /// After the last chunk: CRLF, or a trailer section.
    LastChunk,
    /// In a trailer section (responses only).
    Trailers,
    /// Everything until the peer closes (a response with no length).
    UntilClose,
    Done,
    /// Failed, or (a request) ended in trailers: never read further, and
    /// never done.
    Failed,
}

/// What a chunked body's trailer section becomes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trailers {
    /// An empty trailers frame, and the body fails: the edge refuses
    /// request trailers (`handler::read_request`), and the connection
    /// closes.
    Refuse,
    /// Parsed into a trailers frame, and the body ends cleanly.
    Parse,
}

/// Why a body could not be read.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("{0}")]
    Framing(&'static str),
    #[error("the connection closed before the body ended")]
    Eof,
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// A strict body decoder over a connection's read buffer.
#[derive(Debug)]
pub struct Decoder {
    pub state: Decode,
    trailers: Trailers,
    /// Chunk-extension bytes seen so far.
    ext_total: usize,
    /// Room the next read asks for (`BODY_FIRST_READ`, doubling).
    room: usize,
}

/// Reads more into `buf`: up to `want` bytes, in at most `*room` of buffer,
/// which doubles (to `BODY_READ`) whenever a read fills it. `Ready(Ok(n))`
/// with the bytes read; 0 is the peer's close.
pub fn fill<R: AsyncRead + Unpin>(
    io: &mut R,
    buf: &mut BytesMut,
    cx: &mut Context<'_>,
    want: usize,
    room: &mut usize,
) -> Poll<io::Result<usize>> {
    let ask = want.clamp(1, *room);
    if buf.capacity() - buf.len() < ask {
        buf.reserve(ask);
    }
    let n = std::task::ready!(tokio_util::io::poll_read_buf(Pin::new(io), cx, buf))?;
    if n >= *room {
        *room = (*room * 2).min(BODY_READ);
    }
    Poll::Ready(Ok(n))
}

/// The most pieces one gathered write sends: a head, a chunk-size line, the
/// data and its CRLF.
const GATHER: usize = 4;

/// Writes what it can of `buf`, gathered into one `writev` when `io` takes
/// vectors, and advances `buf` past it. `Ready(Ok(0))` only for an empty
/// `buf` or a peer that takes nothing.
///
/// Like `tokio_util::io::poll_write_buf`, but with room for the few pieces
/// an HTTP/1 message is written in, not 64 (whose setup cost more than the
/// rest of a small write's user-space work); more pieces go in later calls.
pub fn poll_write_gathered<W: AsyncWrite + Unpin>(
    io: &mut W,
    cx: &mut Context<'_>,
    buf: &mut impl Buf,
) -> Poll<io::Result<usize>> {
    if !buf.has_remaining() {
        return Poll::Ready(Ok(0));
    }
    let n = if io.is_write_vectored() {
        let mut slices = [io::IoSlice::new(&[]); GATHER];
        let cnt = buf.chunks_vectored(&mut slices);
        std::task::ready!(Pin::new(&mut *io).poll_write_vectored(cx, &slices[..cnt]))?
    } else {
        std::task::ready!(Pin::new(&mut *io).poll_write(cx, buf.chunk()))?
    };
    buf.advance(n);
    Poll::Ready(Ok(n))
}

/// Room for the next read of a head: `first` bytes at first, then as much
/// again as is buffered, so a large head takes few reads.
pub fn reserve_for_head(buf: &mut BytesMut, first: usize) {
    if buf.capacity() == 0 {
        // None yet (a client's between requests, a backend connection's
        // after a response that took several reads): made straight away
        // (`reserve` on an empty one takes the slower path of growing it).
        *buf = BytesMut::with_capacity(first);
    } else if buf.capacity() - buf.len() < 1024 {
        let more = buf.len().max(first);
        buf.reserve(more);
    }
}

/// At least one more byte, or the close as [`BodyError::Eof`].
fn more<R: AsyncRead + Unpin>(
    io: &mut R,
    buf: &mut BytesMut,
    cx: &mut Context<'_>,
    want: usize,
    room: &mut usize,
) -> Poll<Result<(), BodyError>> {
    match std::task::ready!(fill(io, buf, cx, want, room)) {
        Ok(0) => Poll::Ready(Err(BodyError::Eof)),
        Ok(_) => Poll::Ready(Ok(())),
        Err(e) => Poll::Ready(Err(e.into())),
    }
}

fn clamp(n: u64) -> usize {
    usize::try_from(n).unwrap_or(usize::MAX).min(BODY_READ)
}

impl Decoder {
    pub fn new(state: Decode, trailers: Trailers) -> Self {
        Decoder {
            state,
            trailers,
            ext_total: 0,
            room: BODY_FIRST_READ,
        }
    }

    pub fn is_done(&self) -> bool {
        self.state == Decode::Done
    }

    /// The next frame of the body: data (sharing `buf`'s bytes), trailers,
    /// or `None` at its end (`Done`) or after a failure (`Failed`). An error
    /// leaves the decoder `Failed`.
    pub fn poll_frame<R: AsyncRead + Unpin>(
        &mut self,
        io: &mut R,
        buf: &mut BytesMut,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let out = self.poll_decode(io, buf, cx);
        if let Poll::Ready(Some(Err(_))) = out {
            self.state = Decode::Failed;
        }
        out
    }

    fn poll_decode<R: AsyncRead + Unpin>(
        &mut self,
        io: &mut R,
        buf: &mut BytesMut,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        macro_rules! more {
            ($want:expr) => {
                if let Err(e) = std::task::ready!(more(io, buf, cx, $want, &mut self.room)) {
                    return Poll::Ready(Some(Err(e)));
                }
            };
        }
        loop {
            match self.state {
                Decode::Failed | Decode::Done => return Poll::Ready(None),
                Decode::Length(0) => self.state = Decode::Done,
                Decode::UntilClose => {
                    if buf.is_empty() {
                        match std::task::ready!(fill(io, buf, cx, BODY_READ, &mut self.room)) {
                            Ok(0) => {
                                self.state = Decode::Done;
                                return Poll::Ready(None);
                            }
                            Ok(_) => {}
                            Err(e) => return Poll::Ready(Some(Err(e.into()))),
                        }
                    }
                    return Poll::Ready(Some(Ok(Frame::data(buf.split().freeze()))));
                }
                Decode::Length(n) | Decode::ChunkData(n) => {
                    if buf.is_empty() {
                        more!(clamp(n));
                    }
                    let take = clamp(n).min(buf.len());
                    let data = buf.split_to(take).freeze();
                    let left = n - take as u64;
                    // A length body is done with its last byte, so that its
                    // connection is free as soon as that byte is read.
                    self.state = match self.state {
                        Decode::Length(_) if left == 0 => Decode::Done,
                        Decode::Length(_) => Decode::Length(left),
                        _ if left == 0 => Decode::ChunkEnd,
                        _ => Decode::ChunkData(left),
                    };
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Decode::ChunkSize => match chunk_size_line(buf) {
                    Ok(Some((line, size, ext))) => {
                        self.ext_total += ext;
                        if self.ext_total > CHUNK_EXT_TOTAL {
                            return Poll::Ready(Some(Err(BodyError::Framing(
                                "chunk extensions too large",
                            ))));
                        }
                        buf.advance(line);
                        self.state = if size == 0 {
                            Decode::LastChunk
                        } else {
                            Decode::ChunkData(size)
                        };
                    }
                    Ok(None) if buf.len() > CHUNK_LINE_MAX => {
                        return Poll::Ready(Some(Err(BodyError::Framing(
                            "chunk size line too long",
                        ))))
                    }
                    Ok(None) => more!(512),
                    Err(reason) => return Poll::Ready(Some(Err(BodyError::Framing(reason)))),
                },
                Decode::ChunkEnd | Decode::LastChunk => {
                    // Read on while what is there could still become a CRLF.
                    if buf.len() < 2 && buf.first().is_none_or(|&c| c == b'\r') {
                        more!(512);
                        continue;
                    }
                    let crlf = buf.starts_with(b"\r\n");
                    match (self.state, crlf) {
                        (Decode::ChunkEnd, true) => {
                            buf.advance(2);
                            self.state = Decode::ChunkSize;
                        }
                        (Decode::ChunkEnd, false) => {
                            return Poll::Ready(Some(Err(BodyError::Framing(
                                "missing CRLF after chunk data",
                            ))))
                        }
                        (_, true) => {
                            buf.advance(2);
                            self.state = Decode::Done;
                        }
                        (_, false) if self.trailers == Trailers::Refuse => {
                            // Not parsed: the handler refuses trailers and
                            // the connection closes (never done).
                            self.state = Decode::Failed;
                            buf.clear();
                            return Poll::Ready(Some(Ok(Frame::trailers(HeaderMap::new()))));
                        }
                        (_, false) => self.state = Decode::Trailers,
                    }
                }
                Decode::Trailers => match parse_trailers(buf) {
                    Ok(Some(map)) => {
                        self.state = Decode::Done;
                        return Poll::Ready(Some(Ok(Frame::trailers(map))));
                    }
                    Ok(None) if buf.len() > TRAILERS_MAX => {
                        return Poll::Ready(Some(Err(BodyError::Framing(
                            "trailer section too large",
                        ))))
                    }
                    Ok(None) => more!(1024),
                    Err(reason) => return Poll::Ready(Some(Err(BodyError::Framing(reason)))),
                },
            }
        }
    }

    pub fn size_hint(&self) -> SizeHint {
        match self.state {
            Decode::Length(n) => SizeHint::with_exact(n),
            Decode::Done | Decode::Failed => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}

/// A trailer section at the start of `buf` (after the last chunk), taken off
/// when whole. Field lines follow the head's rules (httparse, strict).
fn parse_trailers(buf: &mut BytesMut) -> Result<Option<HeaderMap>, &'static str> {
    let mut slots = [httparse::EMPTY_HEADER; TRAILERS_COUNT];
    let (len, fields) = match httparse::parse_headers(buf, &mut slots) {
        Ok(httparse::Status::Complete(done)) => done,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(_) => return Err("invalid trailer section"),
    };
    let mut map = HeaderMap::with_capacity(fields.len());
    for f in fields.iter() {
        let name = header_name(f.name.as_bytes()).map_err(|_| "invalid trailer name")?;
        let value = HeaderValue::from_bytes(f.value).map_err(|_| "invalid trailer value")?;
        map.append(name, value);
    }
    buf.advance(len);
    Ok(Some(map))
}

/// Writes [`known_name`] and, for its test, [`known_names`]: `len => [names]`
/// lists lowercase names of exactly that length.
macro_rules! known_names {
    ($($len:literal => [$($name:expr),+ $(,)?]),+ $(,)?) => {
        /// `b` compared case-insensitively with the known names of its
        /// length: no hashing of the name, and no allocation for a custom
        /// one (`HeaderName::from_bytes` copies every name `http` does not
        /// know).
        fn known_name(b: &[u8]) -> Option<HeaderName> {
            match b.len() {
                $($len => {
                    $({
                        const N: HeaderName = $name;
                        if same_name(N.as_str().as_bytes(), b) {
                            return Some(N);
                        }
                    })+
                    None
                })+
                _ => None,
            }
        }

        #[cfg(test)]
        fn known_names() -> Vec<(usize, HeaderName)> {
            vec![$($(($len, $name)),+),+]
        }
    };
}

// The standard names that are common, and the `x-` and `sec-` ones that
// Usher reads or sets or that common apps and browsers send.
known_names! {
    2 => [header::TE],
    3 => [header::AGE, header::VIA, header::DNT],
    4 => [header::HOST, header::DATE, header::VARY, header::ETAG, header::LINK],
    5 => [header::ALLOW, header::RANGE],
    6 => [header::ACCEPT, header::COOKIE, header::EXPECT, header::ORIGIN, header::SERVER, header::PRAGMA],
    7 => [header::REFERER, header::UPGRADE, header::EXPIRES, header::TRAILER],
    8 => [header::LOCATION, header::IF_RANGE, header::IF_MATCH],
    9 => [header::FORWARDED, HeaderName::from_static("x-real-ip"), HeaderName::from_static("sec-ch-ua")],
    10 => [header::CONNECTION, header::USER_AGENT, header::SET_COOKIE, HeaderName::from_static("keep-alive")],
    11 => [header::RETRY_AFTER, HeaderName::from_static("x-csrftoken")],
    12 => [
        header::CONTENT_TYPE,
        usher_worker::X_USHER_LOAD,
        HeaderName::from_static("x-request-id"),
        HeaderName::from_static("x-powered-by"),
        header::MAX_FORWARDS,
    ],
    13 => [
        header::CACHE_CONTROL,
        header::AUTHORIZATION,
        header::LAST_MODIFIED,
        header::ACCEPT_RANGES,
        header::IF_NONE_MATCH,
        header::CONTENT_RANGE,
    ],
    14 => [
        header::CONTENT_LENGTH,
        usher_worker::X_USHER_WORKER,
        header::ACCEPT_CHARSET,
        HeaderName::from_static("sec-fetch-site"),
        HeaderName::from_static("sec-fetch-mode"),
        HeaderName::from_static("sec-fetch-dest"),
    ],
    15 => [
        header::ACCEPT_ENCODING,
        header::ACCEPT_LANGUAGE,
        HeaderName::from_static("x-forwarded-for"),
        HeaderName::from_static("x-request-start"),
        usher_worker::X_USHER_REFUSED,
        header::X_FRAME_OPTIONS,
    ],
    16 => [
        header::CONTENT_ENCODING,
        header::CONTENT_LANGUAGE,
        header::CONTENT_LOCATION,
        HeaderName::from_static("x-forwarded-host"),
        HeaderName::from_static("x-requested-with"),
        HeaderName::from_static("sec-ch-ua-mobile"),
        HeaderName::from_static("proxy-connection"),
    ],
    17 => [header::TRANSFER_ENCODING, header::IF_MODIFIED_SINCE, HeaderName::from_static("x-forwarded-proto")],
    18 => [HeaderName::from_static("sec-ch-ua-platform")],
    19 => [header::CONTENT_DISPOSITION],
    22 => [header::X_CONTENT_TYPE_OPTIONS],
    23 => [header::CONTENT_SECURITY_POLICY],
    25 => [header::STRICT_TRANSPORT_SECURITY],
    27 => [header::ACCESS_CONTROL_ALLOW_ORIGIN],
}

/// Whether `b` is the lowercase name `n` (of `a-z`, `0-9` and `-`, and as
/// long as `b`) in any ASCII case, compared eight bytes at a time past the
/// first eight.
fn same_name(n: &[u8], b: &[u8]) -> bool {
    const CASE: u64 = 0x2020_2020_2020_2020;
    const LOW3: u64 = 0xe0e0_e0e0_e0e0_e0e0;
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let len = n.len();
    if len < 8 || len != b.len() {
        return n.eq_ignore_ascii_case(b);
    }
    let word = |s: &[u8], at: usize| {
        let mut w = [0u8; 8];
        w.copy_from_slice(&s[at..at + 8]);
        u64::from_le_bytes(w)
    };
    let mut at = 0;
    loop {
        // The last word overlaps the one before it.
        let at8 = at.min(len - 8);
        let x = word(b, at8);
        // Setting bit 5 lowercases a letter and keeps `n`'s bytes as they
        // are; but a control byte (below 0x20) would pass for `-` or a digit:
        // no name holds one (a zero byte in `x & LOW3`).
        let y = x & LOW3;
        let control = y.wrapping_sub(ONES) & !y & HIGH != 0;
        if x | CASE != word(n, at8) || control {
            return false;
        }
        if at8 + 8 >= len {
            return true;
        }
        at += 8;
    }
}

/// A header name off the wire, as `HeaderName::from_bytes` reads it (same
/// validation, lowercased). A known name matched case-insensitively is made
/// of token bytes, so any match is valid.
pub fn header_name(b: &[u8]) -> Result<HeaderName, http::header::InvalidHeaderName> {
    match known_name(b) {
        Some(n) => Ok(n),
        None => HeaderName::from_bytes(b),
    }
}

/// Header lines of an HTTP/1 head that pass the proxy as they came, with no
/// header map made for them: making a map entry per line cost more than the
/// rest of relaying it. Only names Usher neither reads, replaces nor drops
/// are kept this way, and none when the head has a `Connection` header
/// (which may name any).
///
/// - A backend's response (`upstream::h1::parse`, by
///   `edge::headers::read_or_set_by_usher`): an HTTP/1 client gets them
///   written after the map's headers (`edge::h1`); hyper's edges get them put
///   into the map first (`edge::listener`).
/// - A client's request (`edge::h1::parse`, by
///   `edge::headers::read_by_usher_in_requests`): an HTTP/1 backend gets them
///   written after the map's headers (`upstream::h1::Outgoing`); an h2
///   backend and a tunnel get them put into the map.
#[derive(Debug, Default)]
pub struct Lines {
    head: Bytes,
    /// Each line's name and value, in `head`.
    at: Vec<(std::ops::Range<usize>, std::ops::Range<usize>)>,
    /// One of them is a `Date` (the client then gets no other).
    pub date: bool,
}

impl Lines {
    /// The lines whose names and values are at `at` in `head`, in order.
    /// A parser keeps them in the list it made of all of the head's lines
    /// (see [`Kept`]): no list of their own is allocated.
    pub fn new(head: &Bytes, at: Vec<(std::ops::Range<usize>, std::ops::Range<usize>)>) -> Self {
        if at.is_empty() {
            return Lines::default();
        }
        Lines {
            head: head.clone(),
            at,
            date: false,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.at.is_empty()
    }

    /// How many bytes [`Lines::write_to`] writes.
    pub fn len(&self) -> usize {
        let line = |(n, v): &(std::ops::Range<usize>, std::ops::Range<usize>)| match v.is_empty() {
            true => n.len() + 3,
            false => v.end - n.start + 2,
        };
        self.at.iter().map(line).sum()
    }

    /// Appends each line as its sender wrote it, from its name to the end
    /// of its value (httparse has checked that only `:` and blanks are
    /// between), then CRLF: the name as the sender spelled it, as nginx
    /// keeps it (names are case-insensitive), and the blanks after the colon
    /// as they came (nginx would write one space; any is valid).
    pub fn write_to(&self, out: &mut Vec<u8>) {
        for (name, value) in &self.at {
            if value.is_empty() {
                out.extend_from_slice(&self.head[name.clone()]);
                out.extend_from_slice(b":\r\n");
            } else {
                out.extend_from_slice(&self.head[name.start..value.end]);
                out.extend_from_slice(b"\r\n");
            }
        }
    }

    /// Puts them into `h` too, as the parser would have put them there.
    pub fn append_to(&self, h: &mut HeaderMap) {
        for (name, value) in &self.at {
            // Both were checked by the parser: neither fails here.
            let Ok(name) = header_name(&self.head[name.clone()]) else {
                continue;
            };
            let value = if value.is_empty() {
                Ok(HeaderValue::from_static(""))
            } else {
                HeaderValue::from_maybe_shared(self.head.slice(value.clone()))
            };
            if let Ok(value) = value {
                h.append(name, value);
            }
        }
    }
}

/// Whether any of a head's lines (`at`: where each name and value is in
/// `head`) is a `Connection` header, which may name any other to drop: then
/// no line is relayed as it came ([`Lines`]).
pub fn has_connection(
    head: &[u8],
    at: &[(std::ops::Range<usize>, std::ops::Range<usize>)],
) -> bool {
    at.iter()
        .any(|(n, _)| head[n.clone()].eq_ignore_ascii_case(b"connection"))
}

/// A parser's walk over a head's lines (`at`) that keeps some of them, in
/// order, in the same list: the kept ones end up at its front, where
/// [`Kept::into_lines`] makes them [`Lines`].
pub struct Kept {
    at: Vec<(std::ops::Range<usize>, std::ops::Range<usize>)>,
    next: usize,
    kept: usize,
}

impl Kept {
    pub fn new(at: Vec<(std::ops::Range<usize>, std::ops::Range<usize>)>) -> Self {
        Kept {
            at,
            next: 0,
            kept: 0,
        }
    }

    /// The next line's name and value, if any is left.
    pub fn next_line(&mut self) -> Option<(std::ops::Range<usize>, std::ops::Range<usize>)> {
        let line = self.at.get(self.next)?.clone();
        self.next += 1;
        Some(line)
    }

    /// Keeps the line [`Kept::next_line`] gave last.
    pub fn keep(&mut self) {
        debug_assert!(self.next > self.kept, "a line given and not yet kept");
        self.at.swap(self.kept, self.next - 1);
        self.kept += 1;
    }

    /// The kept lines, of `head`.
    pub fn into_lines(mut self, head: &Bytes) -> Lines {
        self.at.truncate(self.kept);
        Lines::new(head, self.at)
    }
}

/// Where `part` (a subslice of `base`) starts in `base`, if it is in it.
pub fn offset(base: &[u8], part: &[u8]) -> Option<std::ops::Range<usize>> {
    let start = (part.as_ptr() as usize).checked_sub(base.as_ptr() as usize)?;
    let end = start.checked_add(part.len())?;
    (end <= base.len()).then_some(start..end)
}

/// A `Content-Length` value: ASCII digits only (no sign, no spaces, no list).
pub fn digits(b: &[u8]) -> Option<u64> {
    if b.is_empty() {
        return None;
    }
    b.iter().try_fold(0u64, |n, &c| {
        c.is_ascii_digit()
            .then_some(())
            .and_then(|()| n.checked_mul(10)?.checked_add(u64::from(c - b'0')))
    })
}

/// `chunked` must be the last transfer coding (RFC 9112 §6.1).
pub fn last_coding_is_chunked(v: &HeaderValue) -> bool {
    v.to_str()
        .ok()
        .and_then(|s| s.rsplit(',').next())
        .is_some_and(|c| c.trim().eq_ignore_ascii_case("chunked"))
}

/// Reads the chunk-size line at the start of `buf`: `Ok(Some((line length,
/// size, extension bytes)))`, or `Ok(None)` if the line is not whole yet.
fn chunk_size_line(buf: &[u8]) -> Result<Option<(usize, u64, usize)>, &'static str> {
    let mut size: u64 = 0;
    let mut i = 0;
    while let Some(&c) = buf.get(i) {
        let Some(v) = (c as char).to_digit(16) else {
            break;
        };
        // Checked as it goes, so leading zeros are fine and an overflow is
        // refused however the line is split into reads.
        size = size
            .checked_mul(16)
            .and_then(|s| s.checked_add(u64::from(v)))
            .ok_or("chunk size too large")?;
        i += 1;
    }
    if i == buf.len() {
        return Ok(None);
    }
    if i == 0 {
        return Err("invalid chunk size");
    }
    while matches!(buf.get(i), Some(b' ' | b'\t')) {
        i += 1;
    }
    let ext_start = i;
    if buf.get(i) == Some(&b';') {
        while let Some(&c) = buf.get(i) {
            match c {
                b'\r' => break,
                b'\n' => return Err("chunk extension ends in a bare LF"),
                _ => i += 1,
            }
        }
    }
    match (buf.get(i), buf.get(i + 1)) {
        (None, _) | (Some(b'\r'), None) => Ok(None),
        (Some(b'\r'), Some(b'\n')) if i + 2 > CHUNK_LINE_MAX => Err("chunk size line too long"),
        (Some(b'\r'), Some(b'\n')) => Ok(Some((i + 2, size, i - ext_start))),
        (Some(b'\n'), _) => Err("chunk size line ends in a bare LF"),
        _ => Err("invalid chunk size line"),
    }
}

/// `n` in decimal, in `buf`.
pub fn itoa(mut n: u64, buf: &mut [u8; 20]) -> &[u8] {
    // Two digits a step: a `X-Request-Start` has sixteen.
    const PAIRS: &[u8; 200] = b"0001020304050607080910111213141516171819\
        2021222324252627282930313233343536373839\
        4041424344454647484950515253545556575859\
        6061626364656667686970717273747576777879\
        8081828384858687888990919293949596979899";
    let mut i = buf.len();
    while n >= 10 {
        let pair = (n % 100) as usize * 2;
        n /= 100;
        i -= 2;
        buf[i..i + 2].copy_from_slice(&PAIRS[pair..pair + 2]);
        if n == 0 {
            // `n` was 10..=99 at the last step: no leading zero to drop.
            return &buf[i..];
        }
    }
    i -= 1;
    buf[i] = b'0' + n as u8;
    &buf[i..]
}

/// A chunk-size line: `n` in hex, then CRLF.
pub fn hex_line(mut n: usize, buf: &mut [u8; 20]) -> &[u8] {
    let mut i = buf.len() - 2;
    buf[i] = b'\r';
    buf[i + 1] = b'\n';
    loop {
        i -= 1;
        buf[i] = b"0123456789abcdef"[n % 16];
        n /= 16;
        if n == 0 {
            return &buf[i..];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kept_lines_stay_in_their_order_and_alone() {
        let head = Bytes::from_static(b"A: 1\r\nB: 2\r\nC: 3\r\nD:\r\nE: 5\r\n");
        let at = vec![
            (0..1, 3..4),
            (6..7, 9..10),
            (12..13, 15..16),
            (18..19, 0..0),
            (22..23, 25..26),
        ];
        let mut walk = Kept::new(at);
        let mut names = Vec::new();
        while let Some((name, _)) = walk.next_line() {
            names.push(head[name.clone()].to_vec());
            if [&b"B"[..], b"D", b"E"].contains(&&head[name]) {
                walk.keep();
            }
        }
        assert_eq!(names, [b"A", b"B", b"C", b"D", b"E"]);
        let lines = walk.into_lines(&head);
        let mut out = Vec::new();
        lines.write_to(&mut out);
        assert_eq!(out, b"B: 2\r\nD:\r\nE: 5\r\n");
        assert_eq!(lines.len(), out.len());
        assert!(Kept::new(vec![(0..1, 3..4)]).into_lines(&head).is_empty());
    }

    #[test]
    fn header_names_read_as_from_bytes_reads_them() {
        for (len, n) in known_names() {
            assert_eq!(n.as_str().len(), len, "{n} is listed under {len}");
            assert_eq!(
                HeaderName::from_bytes(n.as_str().as_bytes()).ok().as_ref(),
                Some(&n)
            );
            let upper = n.as_str().to_ascii_uppercase();
            assert_eq!(header_name(upper.as_bytes()).ok().as_ref(), Some(&n));
        }
        for b in [
            &b"X-Usher-Load"[..],
            b"X-FORWARDED-FOR",
            b"Sec-Fetch-Site",
            b"x-other",
            b"X-",
            b"sec-",
            b"Content-Type",
            b"set-cookie",
            b"x-bad name",
            b"x-bad\xff",
            b"Content-Lengt\xe8",
            b"content-length ",
            b"content\rlength",
            b"x-usher-worker",
            b"X-USHER\x0dWORKER",
            b"x-forwarded\x0dfor",
            b"CONTENT-LOCATION",
            b"content-locatioN",
            b"Content-Locatiom",
            b"Content-Length\x00",
            b"",
            b"an-unusually-long-header-name-of-no-one-s",
        ] {
            let (ours, http) = (header_name(b), HeaderName::from_bytes(b));
            assert_eq!(ours.is_ok(), http.is_ok(), "{b:?}");
            assert_eq!(ours.ok(), http.ok(), "{b:?}");
        }
    }

    #[test]
    fn chunk_size_lines_are_strict() {
        assert_eq!(chunk_size_line(b"5\r\n"), Ok(Some((3, 5, 0))));
        assert_eq!(chunk_size_line(b"Ff;a=b\r\nx"), Ok(Some((8, 255, 4))));
        assert_eq!(
            chunk_size_line(b"0000000000000000000a\r\n"),
            Ok(Some((22, 10, 0)))
        );
        assert_eq!(chunk_size_line(b"5"), Ok(None));
        assert_eq!(chunk_size_line(b"5\r"), Ok(None));
        assert!(chunk_size_line(b"+5\r\n").is_err());
        assert!(chunk_size_line(b"0x5\r\n").is_err());
        assert!(chunk_size_line(b"5\n").is_err());
        assert!(chunk_size_line(b"5;a\nb\r\n").is_err());
        assert!(chunk_size_line(b"ffffffffffffffffff\r\n").is_err());
    }

    #[test]
    fn numbers_are_written_as_http_wants_them() {
        assert_eq!(itoa(0, &mut [0; 20]), b"0");
        assert_eq!(itoa(u64::MAX, &mut [0; 20]), b"18446744073709551615");
        let powers = (0..20).flat_map(|p| {
            let n = 10u64.pow(p);
            [n - 1, n, n + 1]
        });
        for v in (0..2000).chain(powers).chain([1_796_186_872_625_279]) {
            assert_eq!(itoa(v, &mut [0; 20]), v.to_string().as_bytes(), "{v}");
        }
        assert_eq!(hex_line(0, &mut [0; 20]), b"0\r\n");
        assert_eq!(hex_line(0x1a2b, &mut [0; 20]), b"1a2b\r\n");
    }

    /// Decodes `wire` (split into reads of `step` bytes) to the end.
    async fn decode(
        state: Decode,
        trailers: Trailers,
        wire: &[u8],
        step: usize,
    ) -> Vec<Frame<Bytes>> {
        let (mut a, mut b) = tokio::io::duplex(64);
        let wire = wire.to_vec();
        let writer = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            for part in wire.chunks(step) {
                if a.write_all(part).await.is_err() {
                    return;
                }
                tokio::task::yield_now().await;
            }
        });
        let mut d = Decoder::new(state, trailers);
        let mut buf = BytesMut::new();
        let mut frames = Vec::new();
        while let Some(f) = std::future::poll_fn(|cx| d.poll_frame(&mut b, &mut buf, cx)).await {
            match f {
                Ok(f) => frames.push(f),
                Err(_) => break,
            }
        }
        writer.abort();
        frames
    }

    fn data(frames: &[Frame<Bytes>]) -> Vec<u8> {
        frames
            .iter()
            .filter_map(|f| f.data_ref())
            .flat_map(|d| d.iter().copied())
            .collect()
    }

    #[tokio::test]
    async fn chunked_bodies_decode_however_they_are_split() {
        let wire = b"5;x=y\r\nhello\r\n1\r\n \r\n0\r\nX-T: 1\r\n\r\nNEXT";
        for step in [1, 2, 3, 7, 64] {
            let frames = decode(Decode::ChunkSize, Trailers::Parse, wire, step).await;
            assert_eq!(data(&frames), b"hello ", "step {step}");
            let t = frames
                .iter()
                .find_map(|f| f.trailers_ref())
                .expect("trailers");
            assert_eq!(t["x-t"], "1");
        }
        let refused = decode(Decode::ChunkSize, Trailers::Refuse, wire, 64).await;
        assert!(refused.last().unwrap().trailers_ref().unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_body_delimited_by_the_close_ends_with_it() {
        let frames = decode(Decode::UntilClose, Trailers::Parse, b"all of it", 4).await;
        assert_eq!(data(&frames), b"all of it");
    }
}
