//! Raw-socket peers for the adversarial tests.
//!
//! hyper, as a client or a server, refuses to send or accept most of what an
//! attacker writes: smuggling payloads, malformed heads, lying lengths. So
//! both ends here speak HTTP/1.1 by hand on `std::net`:
//!
//! - [`RawClient`] writes any bytes to Usher and reads what comes back. It
//!   tells a response apart from a connection closed (or reset) with nothing,
//!   from a body cut short, and from silence ([`NoResponse`], [`After`]).
//! - [`RecordingBackend`] records every byte each connection sent it, frames
//!   requests from them by head and `Content-Length` (Usher always sends a
//!   request body with a `Content-Length`), and answers each request as its
//!   script says ([`Reply`]): a normal 200, hostile raw bytes, silence, a
//!   close mid-body, or a large body of deterministic bytes.
//!
//! A test can then assert what the client got *and* what the backend saw: a
//! smuggled request must never reach a backend.
//!
//! Large bodies are never held whole: both sides fold them into a [`Digest`]
//! (length and FNV-1a hash) of [`pattern`] bytes.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Default wait for a response in these helpers.
pub const READ_TIMEOUT: Duration = Duration::from_secs(10);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Whether `needle` occurs anywhere in `hay`.
pub fn contains(hay: &[u8], needle: &[u8]) -> bool {
    find(hay, needle).is_some()
}

/// Length and FNV-1a hash of a byte stream, however it was split.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Digest {
    pub len: u64,
    pub hash: u64,
}

impl Default for Digest {
    fn default() -> Self {
        Digest {
            len: 0,
            hash: 0xcbf2_9ce4_8422_2325,
        }
    }
}

impl Digest {
    pub fn update(&mut self, bytes: &[u8]) {
        let mut h = self.hash;
        for &b in bytes {
            h = (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
        }
        self.hash = h;
        self.len += bytes.len() as u64;
    }

    pub fn of(bytes: &[u8]) -> Digest {
        let mut d = Digest::default();
        d.update(bytes);
        d
    }
}

/// Fills `out` with the deterministic body bytes at `offset..`: a hash of
/// each byte's position, so no stretch repeats and a dropped, duplicated or
/// shifted block changes the digest.
pub fn pattern(offset: u64, out: &mut [u8]) {
    for (i, b) in out.iter_mut().enumerate() {
        *b = ((offset + i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 56) as u8;
    }
}

/// A parsed HTTP/1.x response.
#[derive(Debug, Clone, Default)]
pub struct RawResponse {
    pub status: u16,
    /// The head as received, status line to the blank line.
    pub head: String,
    pub headers: Headers,
    /// The body, de-chunked; empty when read with [`RawClient::response_digest`].
    pub body: Vec<u8>,
    /// Digest of the (de-chunked) body bytes read.
    pub digest: Digest,
}

impl RawResponse {
    /// The first value of header `name` (any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        first_header(&self.headers, name)
    }

    /// Every value of header `name` (any case), in order.
    pub fn header_values(&self, name: &str) -> Vec<&str> {
        header_values(&self.headers, name)
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Why no complete response was read.
#[derive(Debug)]
pub enum NoResponse {
    /// The connection ended (EOF, or reset when `reset`) before a whole head;
    /// `partial` is what had come.
    Closed { partial: Vec<u8>, reset: bool },
    /// The head came but the body stopped short of its framing.
    Cut { response: RawResponse, end: End },
    /// Nothing complete within the timeout.
    TimedOut { partial: Vec<u8> },
    /// What came is not an HTTP/1.x response.
    Malformed { partial: Vec<u8>, why: String },
}

impl NoResponse {
    /// Closed or reset with no byte at all: the "empty reply" case.
    pub fn is_empty_close(&self) -> bool {
        matches!(self, NoResponse::Closed { partial, .. } if partial.is_empty())
    }
}

/// How a body read stopped short.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    Eof,
    Reset,
    TimedOut,
    Malformed(String),
}

/// What the connection did after the bytes read so far ([`RawClient::after`]).
#[derive(Debug, PartialEq, Eq)]
pub enum After {
    /// Orderly close.
    Eof,
    /// Connection reset.
    Reset,
    /// Still open and silent when the timeout passed.
    Open,
    /// More bytes came.
    Bytes(Vec<u8>),
}

impl After {
    pub fn is_closed(&self) -> bool {
        matches!(self, After::Eof | After::Reset)
    }
}

enum Fill {
    Data,
    Eof,
    Reset,
    TimedOut,
}

/// A client connection that writes raw bytes and reads responses by hand.
pub struct RawClient {
    stream: TcpStream,
    /// Read but not yet consumed.
    buf: Vec<u8>,
}

impl RawClient {
    pub fn connect(addr: SocketAddr) -> RawClient {
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
            .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
        let _ = stream.set_nodelay(true);
        stream
            .set_write_timeout(Some(READ_TIMEOUT))
            .expect("set write timeout");
        RawClient {
            stream,
            buf: Vec::new(),
        }
    }

    /// Writes all of `bytes`. Errors are returned, not raised: a peer that
    /// refused the request may already have closed.
    pub fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes)
    }

    /// Writes `parts` from another thread, waiting `gap` before each part
    /// after the first, so that the test can read while a peer that stopped
    /// reading blocks the writer. The handle yields how many bytes were
    /// written before the end or the first error.
    pub fn send_in_background(&self, parts: Vec<Vec<u8>>, gap: Duration) -> JoinHandle<u64> {
        let mut s = self.stream.try_clone().expect("clone client socket");
        std::thread::spawn(move || {
            let mut written = 0u64;
            for (i, part) in parts.iter().enumerate() {
                if i > 0 && !gap.is_zero() {
                    std::thread::sleep(gap);
                }
                if s.write_all(part).is_err() {
                    break;
                }
                written += part.len() as u64;
            }
            written
        })
    }

    /// Half-closes: no more bytes from the client.
    pub fn shutdown_write(&self) {
        let _ = self.stream.shutdown(Shutdown::Write);
    }

    fn fill(&mut self, deadline: Instant) -> Fill {
        let mut tmp = [0u8; 64 * 1024];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Fill::TimedOut;
            }
            let _ = self
                .stream
                .set_read_timeout(Some(left.max(Duration::from_millis(1))));
            return match self.stream.read(&mut tmp) {
                Ok(0) => Fill::Eof,
                Ok(n) => {
                    self.buf.extend_from_slice(&tmp[..n]);
                    Fill::Data
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    Fill::TimedOut
                }
                Err(_) => Fill::Reset,
            };
        }
    }

    /// The next response, body kept.
    pub fn response(&mut self, timeout: Duration) -> Result<RawResponse, NoResponse> {
        self.read_response(timeout, true, false)
    }

    /// The response to a `HEAD` request: a head, never a body, whatever its
    /// framing headers say.
    pub fn head_response(&mut self, timeout: Duration) -> Result<RawResponse, NoResponse> {
        self.read_response(timeout, true, true)
    }

    /// The next response, body only digested (for large bodies).
    pub fn response_digest(&mut self, timeout: Duration) -> Result<RawResponse, NoResponse> {
        self.read_response(timeout, false, false)
    }

    /// The next response that is not `1xx`.
    pub fn final_response(&mut self, timeout: Duration) -> Result<RawResponse, NoResponse> {
        let deadline = Instant::now() + timeout;
        loop {
            let r = self.response(deadline.saturating_duration_since(Instant::now()))?;
            if !(100..200).contains(&r.status) || r.status == 101 {
                return Ok(r);
            }
        }
    }

    /// Like [`RawClient::response`], but panics, saying what came instead,
    /// when no complete response does.
    pub fn expect_response(&mut self, what: &str) -> RawResponse {
        self.response(READ_TIMEOUT)
            .unwrap_or_else(|e| panic!("{what}: no complete response: {}", describe(&e)))
    }

    fn read_response(
        &mut self,
        timeout: Duration,
        keep: bool,
        head_only: bool,
    ) -> Result<RawResponse, NoResponse> {
        let deadline = Instant::now() + timeout;
        let head_end = loop {
            if let Some(p) = find(&self.buf, b"\r\n\r\n") {
                break p + 4;
            }
            match self.fill(deadline) {
                Fill::Data => {}
                Fill::Eof => {
                    return Err(NoResponse::Closed {
                        partial: std::mem::take(&mut self.buf),
                        reset: false,
                    })
                }
                Fill::Reset => {
                    return Err(NoResponse::Closed {
                        partial: std::mem::take(&mut self.buf),
                        reset: true,
                    })
                }
                Fill::TimedOut => {
                    return Err(NoResponse::TimedOut {
                        partial: self.buf.clone(),
                    })
                }
            }
        };
        let head: Vec<u8> = self.buf.drain(..head_end).collect();
        let (status, headers) =
            parse_response_head(&head).map_err(|why| NoResponse::Malformed {
                partial: head.clone(),
                why,
            })?;
        let mut resp = RawResponse {
            status,
            head: String::from_utf8_lossy(&head).into_owned(),
            headers,
            ..RawResponse::default()
        };
        let chunked = resp
            .header("transfer-encoding")
            .is_some_and(|v| v.eq_ignore_ascii_case("chunked"));
        let length = resp
            .header("content-length")
            .and_then(|v| v.trim().parse::<u64>().ok());
        let result = if head_only || (100..200).contains(&status) || status == 204 || status == 304
        {
            Ok(())
        } else if chunked {
            self.read_chunked(&mut resp, keep, deadline)
        } else if let Some(n) = length {
            self.take_body(n, &mut resp, keep, deadline)
        } else {
            self.read_to_close(&mut resp, keep, deadline)
        };
        match result {
            Ok(()) => Ok(resp),
            Err(end) => Err(NoResponse::Cut {
                response: resp,
                end,
            }),
        }
    }

    fn fill_or_end(&mut self, deadline: Instant) -> Result<(), End> {
        match self.fill(deadline) {
            Fill::Data => Ok(()),
            Fill::Eof => Err(End::Eof),
            Fill::Reset => Err(End::Reset),
            Fill::TimedOut => Err(End::TimedOut),
        }
    }

    fn consume(&mut self, n: usize, resp: &mut RawResponse, keep: bool) {
        resp.digest.update(&self.buf[..n]);
        if keep {
            resp.body.extend_from_slice(&self.buf[..n]);
        }
        self.buf.drain(..n);
    }

    fn take_body(
        &mut self,
        mut n: u64,
        resp: &mut RawResponse,
        keep: bool,
        deadline: Instant,
    ) -> Result<(), End> {
        while n > 0 {
            if self.buf.is_empty() {
                self.fill_or_end(deadline)?;
            }
            let k = self.buf.len().min(usize::try_from(n).unwrap_or(usize::MAX));
            self.consume(k, resp, keep);
            n -= k as u64;
        }
        Ok(())
    }

    fn read_to_close(
        &mut self,
        resp: &mut RawResponse,
        keep: bool,
        deadline: Instant,
    ) -> Result<(), End> {
        loop {
            let k = self.buf.len();
            self.consume(k, resp, keep);
            match self.fill_or_end(deadline) {
                Ok(()) => {}
                Err(End::Eof) => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    }

    /// One CRLF-terminated line, without its CRLF.
    fn line(&mut self, deadline: Instant) -> Result<Vec<u8>, End> {
        loop {
            if let Some(p) = find(&self.buf, b"\r\n") {
                let line = self.buf[..p].to_vec();
                self.buf.drain(..p + 2);
                return Ok(line);
            }
            self.fill_or_end(deadline)?;
        }
    }

    fn read_chunked(
        &mut self,
        resp: &mut RawResponse,
        keep: bool,
        deadline: Instant,
    ) -> Result<(), End> {
        loop {
            let line = self.line(deadline)?;
            let text = String::from_utf8_lossy(&line);
            let hex = text.split(';').next().unwrap_or_default().trim();
            let size = u64::from_str_radix(hex, 16)
                .map_err(|_| End::Malformed(format!("chunk size line {text:?}")))?;
            if size == 0 {
                // Trailers, up to the blank line.
                while !self.line(deadline)?.is_empty() {}
                return Ok(());
            }
            self.take_body(size, resp, keep, deadline)?;
            let after = self.line(deadline)?;
            if !after.is_empty() {
                return Err(End::Malformed(format!(
                    "{} bytes after a chunk's data",
                    after.len()
                )));
            }
        }
    }

    /// What the connection does next, within `timeout`: bytes already read
    /// and not consumed count as [`After::Bytes`].
    pub fn after(&mut self, timeout: Duration) -> After {
        if !self.buf.is_empty() {
            return After::Bytes(std::mem::take(&mut self.buf));
        }
        match self.fill(Instant::now() + timeout) {
            Fill::Data => After::Bytes(std::mem::take(&mut self.buf)),
            Fill::Eof => After::Eof,
            Fill::Reset => After::Reset,
            Fill::TimedOut => After::Open,
        }
    }

    /// Panics unless the connection is closed (EOF or reset) within
    /// `timeout` with no further byte.
    pub fn expect_closed(&mut self, what: &str, timeout: Duration) {
        match self.after(timeout) {
            After::Eof | After::Reset => {}
            After::Open => panic!("{what}: the connection is still open after {timeout:?}"),
            After::Bytes(b) => panic!(
                "{what}: expected the connection closed, got more bytes: {:?}",
                String::from_utf8_lossy(&b)
            ),
        }
    }
}

/// A one-line account of a [`NoResponse`], for assertion messages.
pub fn describe(e: &NoResponse) -> String {
    match e {
        NoResponse::Closed { partial, reset } => format!(
            "connection {} after {} bytes: {:?}",
            if *reset { "reset" } else { "closed" },
            partial.len(),
            String::from_utf8_lossy(&partial[..partial.len().min(300)])
        ),
        NoResponse::Cut { response, end } => format!(
            "status {} with its body cut short ({end:?}) after {} bytes; head {:?}",
            response.status, response.digest.len, response.head
        ),
        NoResponse::TimedOut { partial } => format!(
            "timed out after {} bytes: {:?}",
            partial.len(),
            String::from_utf8_lossy(&partial[..partial.len().min(300)])
        ),
        NoResponse::Malformed { partial, why } => format!(
            "malformed ({why}): {:?}",
            String::from_utf8_lossy(&partial[..partial.len().min(300)])
        ),
    }
}

type Headers = Vec<(String, String)>;

/// Every value of header `name` (any case) in `headers`, in order.
fn header_values<'a>(headers: &'a [(String, String)], name: &str) -> Vec<&'a str> {
    headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
        .collect()
}

/// The first value of header `name` (any case) in `headers`.
fn first_header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

fn parse_headers<'a>(lines: impl Iterator<Item = &'a str>) -> Result<Headers, String> {
    lines
        .filter(|l| !l.is_empty())
        .map(|l| {
            l.split_once(':')
                .map(|(n, v)| (n.trim().to_string(), v.trim().to_string()))
                .ok_or_else(|| format!("header line {l:?}"))
        })
        .collect()
}

fn parse_response_head(head: &[u8]) -> Result<(u16, Headers), String> {
    let text = std::str::from_utf8(head).map_err(|_| "head is not UTF-8".to_string())?;
    let mut lines = text.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    if version != "HTTP/1.1" && version != "HTTP/1.0" {
        return Err(format!("status line {status_line:?}"));
    }
    let status = parts
        .next()
        .and_then(|c| c.parse::<u16>().ok())
        .ok_or_else(|| format!("status line {status_line:?}"))?;
    Ok((status, parse_headers(lines)?))
}

/// One request as a [`RecordingBackend`] framed it.
#[derive(Debug, Clone)]
pub struct SeenRequest {
    /// Index of the backend connection it came on, in accept order.
    pub conn: usize,
    pub method: String,
    pub target: String,
    pub version: String,
    pub headers: Headers,
    pub body: Vec<u8>,
}

impl SeenRequest {
    /// The first value of header `name` (any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        first_header(&self.headers, name)
    }

    /// How many times header `name` appears.
    pub fn header_count(&self, name: &str) -> usize {
        self.header_values(name).len()
    }

    /// Every value of header `name` (any case), in order.
    pub fn header_values(&self, name: &str) -> Vec<&str> {
        header_values(&self.headers, name)
    }
}

/// Frames one request from the front of `buf`: its head up to the blank
/// line, then `Content-Length` bytes of body. `None` until it is all there,
/// or forever if the head cannot be read (the raw bytes are kept anyway).
fn frame_request(buf: &[u8], conn: usize) -> Option<(SeenRequest, usize)> {
    let head_end = find(buf, b"\r\n\r\n")? + 4;
    let text = std::str::from_utf8(&buf[..head_end]).ok()?;
    let mut lines = text.split("\r\n");
    let mut rl = lines.next()?.split(' ');
    let (method, target, version) = (rl.next()?, rl.next()?, rl.next()?);
    let headers = parse_headers(lines).ok()?;
    let len = headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
        .map_or(Some(0), |(_, v)| v.parse::<usize>().ok())?;
    if buf.len() < head_end + len {
        return None;
    }
    Some((
        SeenRequest {
            conn,
            method: method.to_string(),
            target: target.to_string(),
            version: version.to_string(),
            headers,
            body: buf[head_end..head_end + len].to_vec(),
        },
        head_end + len,
    ))
}

/// How a [`RecordingBackend`] answers one request.
#[derive(Debug, Clone)]
pub enum Reply {
    /// `200 OK` with `Content-Length` and this body.
    Ok(Vec<u8>),
    /// These bytes as they are; the connection then waits for the next request.
    Raw(Vec<u8>),
    /// These bytes, then close.
    RawThenClose(Vec<u8>),
    /// No answer ever; the connection stays open (still recorded) until the
    /// client closes it or the backend is dropped.
    Hang,
    /// `200 OK` with `len` bytes of [`pattern`], framed by `Content-Length`
    /// or chunked. With `cut_at`, the connection is closed after that many
    /// body bytes. The digest of the body bytes written is recorded
    /// ([`RecordingBackend::sent`]).
    Stream {
        len: u64,
        chunked: bool,
        cut_at: Option<u64>,
    },
}

impl Reply {
    pub fn ok(body: impl Into<Vec<u8>>) -> Reply {
        Reply::Ok(body.into())
    }

    pub fn raw(bytes: impl Into<Vec<u8>>) -> Reply {
        Reply::Raw(bytes.into())
    }

    pub fn raw_then_close(bytes: impl Into<Vec<u8>>) -> Reply {
        Reply::RawThenClose(bytes.into())
    }
}

type Script = dyn Fn(&SeenRequest) -> Reply + Send + Sync;

struct Record {
    name: String,
    script: Box<Script>,
    stop: AtomicBool,
    /// Every byte received, per connection.
    conns: Mutex<Vec<Vec<u8>>>,
    requests: Mutex<Vec<SeenRequest>>,
    sent: Mutex<Vec<Digest>>,
}

/// A backend on `127.0.0.1:0` that records everything it is sent and
/// answers as scripted. Stops (and closes its connections within ~50 ms)
/// when dropped.
pub struct RecordingBackend {
    pub addr: SocketAddr,
    record: Arc<Record>,
    accept: Option<JoinHandle<()>>,
}

enum Next {
    KeepReading,
    Close,
    Hang,
}

impl RecordingBackend {
    /// Answers every request with [`Reply`]s from `script`.
    pub fn start(
        name: &str,
        script: impl Fn(&SeenRequest) -> Reply + Send + Sync + 'static,
    ) -> RecordingBackend {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind backend");
        let addr = listener.local_addr().expect("backend address");
        let record = Arc::new(Record {
            name: name.to_string(),
            script: Box::new(script),
            stop: AtomicBool::new(false),
            conns: Mutex::new(Vec::new()),
            requests: Mutex::new(Vec::new()),
            sent: Mutex::new(Vec::new()),
        });
        let r = record.clone();
        let accept = std::thread::spawn(move || {
            for stream in listener.incoming() {
                if r.stop.load(Ordering::Relaxed) {
                    return;
                }
                let Ok(stream) = stream else { continue };
                let id = {
                    let mut conns = lock(&r.conns);
                    conns.push(Vec::new());
                    conns.len() - 1
                };
                let r = r.clone();
                std::thread::spawn(move || serve(&r, stream, id));
            }
        });
        RecordingBackend {
            addr,
            record,
            accept: Some(accept),
        }
    }

    /// Answers every request `200` with the body `"{name} {method} {target}"`.
    pub fn echo(name: &str) -> RecordingBackend {
        let n = name.to_string();
        RecordingBackend::start(name, move |r| {
            Reply::ok(format!("{n} {} {}", r.method, r.target))
        })
    }

    pub fn name(&self) -> &str {
        &self.record.name
    }

    /// Every request framed so far, in arrival order.
    pub fn requests(&self) -> Vec<SeenRequest> {
        lock(&self.record.requests).clone()
    }

    /// Every byte received so far, per connection.
    pub fn raw(&self) -> Vec<Vec<u8>> {
        lock(&self.record.conns).clone()
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        lock(&self.record.conns).len()
    }

    /// Whether any connection ever carried `needle`.
    pub fn saw(&self, needle: &[u8]) -> bool {
        lock(&self.record.conns).iter().any(|c| contains(c, needle))
    }

    /// Digests of the bodies written for [`Reply::Stream`], in order.
    pub fn sent(&self) -> Vec<Digest> {
        lock(&self.record.sent).clone()
    }
}

impl Drop for RecordingBackend {
    fn drop(&mut self) {
        self.record.stop.store(true, Ordering::Relaxed);
        // Wake the accept loop so it sees `stop`.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(h) = self.accept.take() {
            let _ = h.join();
        }
    }
}

fn serve(r: &Record, mut stream: TcpStream, id: usize) {
    let _ = stream.set_nodelay(true);
    let _ = stream.set_read_timeout(Some(Duration::from_millis(50)));
    let _ = stream.set_write_timeout(Some(READ_TIMEOUT));
    let mut pending = Vec::new();
    let mut hang = false;
    let mut tmp = [0u8; 64 * 1024];
    while !r.stop.load(Ordering::Relaxed) {
        match stream.read(&mut tmp) {
            Ok(0) => return,
            Ok(n) => {
                lock(&r.conns)[id].extend_from_slice(&tmp[..n]);
                pending.extend_from_slice(&tmp[..n]);
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) =>
            {
                continue
            }
            Err(_) => return,
        }
        // A hanging connection only records from now on.
        while !hang {
            let Some((req, used)) = frame_request(&pending, id) else {
                break;
            };
            pending.drain(..used);
            lock(&r.requests).push(req.clone());
            let reply = (r.script)(&req);
            match write_reply(r, &mut stream, reply) {
                Next::KeepReading => {}
                Next::Close => {
                    let _ = stream.shutdown(Shutdown::Both);
                    return;
                }
                Next::Hang => hang = true,
            }
        }
    }
}

fn write_reply(r: &Record, s: &mut TcpStream, reply: Reply) -> Next {
    let ok = |res: io::Result<()>, next: Next| if res.is_ok() { next } else { Next::Close };
    match reply {
        Reply::Ok(body) => {
            let mut out =
                format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", body.len()).into_bytes();
            out.extend_from_slice(&body);
            ok(s.write_all(&out), Next::KeepReading)
        }
        Reply::Raw(bytes) => ok(s.write_all(&bytes), Next::KeepReading),
        Reply::RawThenClose(bytes) => {
            let _ = s.write_all(&bytes);
            Next::Close
        }
        Reply::Hang => Next::Hang,
        Reply::Stream {
            len,
            chunked,
            cut_at,
        } => {
            let head = if chunked {
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_string()
            } else {
                format!("HTTP/1.1 200 OK\r\nContent-Length: {len}\r\n\r\n")
            };
            let mut digest = Digest::default();
            let result = stream_body(s, head.as_bytes(), len, chunked, cut_at, &mut digest);
            lock(&r.sent).push(digest);
            match (result, cut_at) {
                (Ok(()), None) => Next::KeepReading,
                _ => Next::Close,
            }
        }
    }
}

fn stream_body(
    s: &mut TcpStream,
    head: &[u8],
    len: u64,
    chunked: bool,
    cut_at: Option<u64>,
    digest: &mut Digest,
) -> io::Result<()> {
    s.write_all(head)?;
    let end = cut_at.map_or(len, |c| c.min(len));
    let mut block = vec![0u8; 64 * 1024];
    let mut at = 0u64;
    while at < end {
        let n = usize::try_from(end - at).map_or(block.len(), |k| k.min(block.len()));
        pattern(at, &mut block[..n]);
        if chunked {
            s.write_all(format!("{n:x}\r\n").as_bytes())?;
            s.write_all(&block[..n])?;
            s.write_all(b"\r\n")?;
        } else {
            s.write_all(&block[..n])?;
        }
        digest.update(&block[..n]);
        at += n as u64;
    }
    if chunked && cut_at.is_none() {
        s.write_all(b"0\r\n\r\n")?;
    }
    s.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_ignores_how_the_stream_is_split() {
        let mut whole = vec![0u8; 1000];
        pattern(0, &mut whole);
        let mut parts = Digest::default();
        for (i, c) in whole.chunks(7).enumerate() {
            let mut p = vec![0u8; c.len()];
            pattern(i as u64 * 7, &mut p);
            parts.update(&p);
        }
        assert_eq!(parts, Digest::of(&whole));
        assert_ne!(Digest::of(&whole[1..]), Digest::of(&whole[..999]));
    }

    #[test]
    fn frames_requests_by_content_length() {
        let buf =
            b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabcGET /b HTTP/1.1\r\n\r\n";
        let (r, used) = frame_request(buf, 0).unwrap();
        assert_eq!((r.method.as_str(), r.target.as_str()), ("POST", "/a"));
        assert_eq!(r.body, b"abc");
        let (r, _) = frame_request(&buf[used..], 0).unwrap();
        assert_eq!(r.target, "/b");
        assert!(frame_request(b"GET / HTTP/1.1\r\nContent-Length: 9\r\n\r\nab", 0).is_none());
    }

    #[test]
    fn client_reads_framed_responses_and_sees_the_close() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            s.write_all(
                b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\
                  2\r\nab\r\n1;x=y\r\nc\r\n0\r\n\r\nHTTP/1.1 404 Not Found\r\nContent-Length: 9\r\n\r\nabc",
            )
            .unwrap();
        });
        let mut c = RawClient::connect(addr);
        let r = c.final_response(READ_TIMEOUT).unwrap();
        assert_eq!((r.status, r.text().as_str()), (200, "abc"));
        match c.response(READ_TIMEOUT) {
            Err(NoResponse::Cut { response, end }) => {
                assert_eq!(
                    (response.status, response.body, end),
                    (404, b"abc".to_vec(), End::Eof)
                )
            }
            other => panic!("{other:?}"),
        }
        assert!(c.after(READ_TIMEOUT).is_closed());
        server.join().unwrap();
    }
}
