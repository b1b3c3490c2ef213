//! Helpers shared by the end-to-end tests.
//!
//! The tests run the real binaries (`usher`, `usher-worker`) as child processes and
//! talk to them over loopback. These helpers cover the parts every such test needs:
//!
//! - finding a built binary: [`bin_path`];
//! - running it so that it cannot outlive the test: [`Proc`] (SIGKILL on drop, its
//!   output captured and printed if the test fails);
//! - waiting on conditions instead of sleeping: [`wait_until`], [`wait_until_async`],
//!   [`wait_for_port`], [`Proc::wait_for_output`];
//! - starting a worker: [`spawn_worker`]; a Python server: [`spawn_python`];
//! - HTTP: an async [`Client`] (HTTP/1.1 or h2c) with the shorthands [`get`] and
//!   [`request`], and a dependency-free [`blocking`] client usable anywhere, also
//!   inside an async test;
//! - replacing a file that a server watches in one step: [`replace_file`].
//!
//! Its modules serve one kind of test each:
//!
//! - [`usher`]: run the real `usher` ([`usher::Usher`]), build its config
//!   ([`usher::Config`]), read its log and metrics;
//! - [`load`]: steady background load that counts failures;
//! - [`raw`]: raw-socket clients and recording backends for the adversarial tests;
//! - [`edge`]: test certificates, rustls clients and a recording backend that
//!   speaks WebSocket, for the TLS, HTTP/2 and WebSocket tests;
//! - [`deploy`]: reading `deploy/` (dashboards, rules, PromQL) and running a
//!   real Prometheus against it;
//! - [`dns`]: a real DNS server (dnsmasq) for the DNS-discovery tests.
//!
//! Every network call has a timeout ([`HTTP_TIMEOUT`]), so a broken server fails a
//! test instead of hanging it. Everything binds `127.0.0.1`, on port 0 or a
//! [`free_port`].
//!
//! The binaries are not built by `cargo test -p usher-e2e` itself; run
//! `cargo build --workspace --bins` first (test.sh does).

use std::ffi::OsStr;
use std::future::Future;
use std::io::{BufRead, BufReader, Read};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode, Uri, Version};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};

/// Timeout for one HTTP exchange made by these helpers.
pub const HTTP_TIMEOUT: Duration = Duration::from_secs(30);

/// How long [`spawn_worker`] waits for a worker to start answering.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);

/// Path of a workspace binary, e.g. `bin_path("usher-worker")`.
///
/// Derived from the running test executable: `.../target/debug/deps/worker-1a2b`
/// gives `.../target/debug/usher-worker`. Panics with instructions when the binary
/// has not been built.
pub fn bin_path(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("path of the test executable");
    let mut dir = exe
        .parent()
        .expect("test executable has a directory")
        .to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let path = dir.join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    assert!(
        path.is_file(),
        "binary {} not found; run `cargo build --workspace --bins` before the end-to-end tests",
        path.display()
    );
    path
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
///
/// Another process may take it before you bind it; where the program can report
/// its own address, prefer listening on port 0 (as [`spawn_worker`] does).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

/// Polls `cond` every 10 ms until it returns true or `timeout` passes. Returns
/// whether it became true.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Async [`wait_until`]: awaits `cond()` every 10 ms until it yields true or
/// `timeout` passes. Returns whether it became true.
pub async fn wait_until_async<F, Fut>(timeout: Duration, mut cond: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if tokio::time::timeout_at(deadline, cond()).await == Ok(true) {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Replaces `path` with `text` in one step (write a sibling, rename it over),
/// so a server polling the file never reads it half-written.
pub fn replace_file(path: &Path, text: &str) {
    let tmp = path.with_extension(format!("tmp{}", fastrand::u32(..)));
    std::fs::write(&tmp, text).unwrap_or_else(|e| panic!("write {}: {e}", tmp.display()));
    std::fs::rename(&tmp, path)
        .unwrap_or_else(|e| panic!("rename {} into place: {e}", path.display()));
}

/// Waits until a TCP connect to `addr` succeeds. Returns whether it did in time.
pub fn wait_for_port(addr: SocketAddr, timeout: Duration) -> bool {
    wait_until(timeout, || {
        TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
    })
}

/// A child process that is killed (SIGKILL) when dropped.
///
/// Its stdout and stderr are captured line by line (see [`Proc::output`]) and
/// printed when the owning test panics, so a failing test shows the server's log.
#[derive(Debug)]
pub struct Proc {
    name: String,
    child: Child,
    output: Arc<Mutex<String>>,
    readers: Vec<std::thread::JoinHandle<()>>,
    exit: Option<ExitStatus>,
}

impl Proc {
    /// Starts `cmd` with stdin closed and stdout/stderr captured.
    pub fn spawn(mut cmd: Command) -> Proc {
        let name = cmd.get_program().to_string_lossy().into_owned();
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        let output = Arc::new(Mutex::new(String::new()));
        let stdout = child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>);
        let stderr = child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>);
        let mut readers = Vec::new();
        for stream in [stdout, stderr].into_iter().flatten() {
            let output = output.clone();
            // Draining the pipes also keeps a chatty child from blocking on a full pipe.
            readers.push(std::thread::spawn(move || {
                for line in BufReader::new(stream).lines() {
                    let Ok(line) = line else { break };
                    let mut out = output.lock().unwrap_or_else(|e| e.into_inner());
                    out.push_str(&line);
                    out.push('\n');
                }
            }));
        }
        Proc {
            name,
            child,
            output,
            readers,
            exit: None,
        }
    }

    /// Starts the workspace binary `name` (see [`bin_path`]) with `args`.
    pub fn spawn_bin<I, S>(name: &str, args: I) -> Proc
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = Command::new(bin_path(name));
        cmd.args(args);
        Proc::spawn(cmd)
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `sig` to the process.
    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, sig)
            .unwrap_or_else(|e| panic!("cannot send {sig} to {}: {e}", self.name));
    }

    /// Sends SIGTERM (the polite "please stop").
    pub fn term(&self) {
        self.signal(nix::sys::signal::Signal::SIGTERM);
    }

    /// Waits up to `timeout` for the process to exit. `None` if it is still running.
    /// Once it has exited, [`Proc::output`] holds everything it wrote.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        if self.exit.is_none() {
            let child = &mut self.child;
            let mut exit = None;
            wait_until(timeout, || {
                exit = child.try_wait().expect("try_wait on own child");
                exit.is_some()
            });
            self.exit = exit;
            if exit.is_some() {
                // The pipes reach EOF right after the exit, unless a grandchild
                // inherited them: wait for the readers, but not forever.
                let readers = &self.readers;
                wait_until(Duration::from_secs(2), || {
                    readers.iter().all(|r| r.is_finished())
                });
            }
        }
        self.exit
    }

    /// Everything the process wrote to stdout and stderr so far, line by line.
    pub fn output(&self) -> String {
        self.output
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Waits until an output line contains `needle` and returns that line.
    pub fn wait_for_output(&self, needle: &str, timeout: Duration) -> Option<String> {
        let mut found = None;
        wait_until(timeout, || {
            found = self
                .output()
                .lines()
                .find(|l| l.contains(needle))
                .map(String::from);
            found.is_some()
        });
        found
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.exit.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            eprintln!(
                "----- output of {} (pid {}) -----\n{}-----",
                self.name,
                self.child.id(),
                self.output()
            );
        }
    }
}

/// Starts `usher-worker` with `args` on a free loopback port and waits until its
/// `/healthz` answers 200. Returns the process and its address.
///
/// The worker listens on `127.0.0.1:0` and the address is read from its
/// `listening on ADDR` log line, so there is no race for the port. Do not pass
/// `--listen` in `args`.
pub fn spawn_worker<I, S>(args: I) -> (Proc, SocketAddr)
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut cmd = Command::new(bin_path("usher-worker"));
    cmd.args(["--listen", "127.0.0.1:0"]).args(args);
    // The start line is logged at info; make sure a RUST_LOG in the test's
    // environment does not hide it.
    cmd.env("RUST_LOG", "info");
    let proc = Proc::spawn(cmd);
    let line = proc
        .wait_for_output("listening on ", START_TIMEOUT)
        .unwrap_or_else(|| panic!("usher-worker did not log `listening on` in {START_TIMEOUT:?}"));
    let addr: SocketAddr = line
        .split("listening on ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no address in start line {line:?}"));
    let healthz = format!("http://{addr}/healthz");
    let up = wait_until(START_TIMEOUT, || {
        blocking::get(&healthz).is_ok_and(|r| r.status == StatusCode::OK)
    });
    assert!(up, "usher-worker at {addr} did not answer {healthz}");
    (proc, addr)
}

/// A Python server process (waitress, gunicorn, ...) started by [`spawn_python`].
/// Dropping it sends SIGTERM and waits for a clean exit (gunicorn then stops
/// its workers), before [`Proc`]'s SIGKILL.
pub struct PyServer {
    pub proc: Proc,
    pub addr: SocketAddr,
}

impl Drop for PyServer {
    fn drop(&mut self) {
        if self.proc.wait_exit(Duration::ZERO).is_none() {
            // Not `Proc::term`: a panic here, while a failed test unwinds, would abort.
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(self.proc.pid() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            self.proc.wait_exit(Duration::from_secs(10));
        }
    }
}

/// Starts the Python server `cmd` in `dir` (it listens on 127.0.0.1:0), reads
/// its address from the first log line containing `marker` followed by
/// `http://ADDR`, and waits until `ready(addr)`.
pub fn spawn_python(
    mut cmd: Command,
    dir: &Path,
    marker: &str,
    ready: impl Fn(SocketAddr) -> bool,
) -> PyServer {
    cmd.current_dir(dir)
        .env("PYTHONUNBUFFERED", "1")
        .env("PYTHONDONTWRITEBYTECODE", "1");
    let proc = Proc::spawn(cmd);
    let line = proc
        .wait_for_output(marker, START_TIMEOUT)
        .unwrap_or_else(|| {
            panic!(
                "server did not log {marker:?} in {START_TIMEOUT:?}:\n{}",
                proc.output()
            )
        });
    let addr: SocketAddr = line
        .split("http://")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|a| a.trim_end_matches('/').parse().ok())
        .unwrap_or_else(|| panic!("no address in start line {line:?}"));
    assert!(
        wait_until(START_TIMEOUT, || ready(addr)),
        "{addr} did not become ready:\n{}",
        proc.output()
    );
    PyServer { proc, addr }
}

/// Whether `GET http://{addr}/healthz` answers 200: the usual `ready` for
/// [`spawn_python`].
pub fn healthz_ok(addr: SocketAddr) -> bool {
    blocking::get(&url(addr, "/healthz")).is_ok_and(|r| r.status == StatusCode::OK)
}

/// `http://{addr}{path}`.
pub fn url(addr: SocketAddr, path: &str) -> String {
    format!("http://{addr}{path}")
}

/// A whole HTTP response.
#[derive(Debug, Clone)]
pub struct Resp {
    /// Status code.
    pub status: StatusCode,
    /// HTTP version of the response.
    pub version: Version,
    /// Response headers.
    pub headers: HeaderMap,
    /// The complete body.
    pub body: Bytes,
}

impl Resp {
    /// The body as (lossy) UTF-8.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body parsed as JSON; panics, quoting the body, if it is not JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("response body is not JSON ({e}): {:?}", self.text()))
    }

    /// A header's value as a string, if present and valid UTF-8.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// An async HTTP client for tests: hyper-util's pooled client with a timer and a
/// per-request timeout. Create one per test (it spawns tasks on the current
/// runtime); clones share the connection pool.
#[derive(Debug, Clone)]
pub struct Client {
    inner: hyper_util::client::legacy::Client<HttpConnector, Full<Bytes>>,
    timeout: Duration,
}

impl Default for Client {
    fn default() -> Self {
        Self::new()
    }
}

impl Client {
    /// HTTP/1.1 with keep-alive.
    pub fn new() -> Self {
        Self::build(false)
    }

    /// HTTP/2 over cleartext with prior knowledge (h2c).
    pub fn http2() -> Self {
        Self::build(true)
    }

    fn build(http2_only: bool) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(5)));
        let inner = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .http2_only(http2_only)
            .build(connector);
        Self {
            inner,
            timeout: HTTP_TIMEOUT,
        }
    }

    /// Replaces the per-request timeout (default [`HTTP_TIMEOUT`]).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// `GET url`.
    pub async fn get(&self, url: &str) -> Result<Resp> {
        self.request(Method::GET, url, Bytes::new()).await
    }

    /// `method url` with `body`.
    pub async fn request(&self, method: Method, url: &str, body: impl Into<Bytes>) -> Result<Resp> {
        let req = Request::builder()
            .method(method)
            .uri(url)
            .body(Full::new(body.into()))
            .with_context(|| format!("bad request to {url}"))?;
        self.send(req).await
    }

    /// Sends a prepared request and reads the whole response, within the timeout.
    pub async fn send(&self, req: Request<Full<Bytes>>) -> Result<Resp> {
        let what = format!("{} {}", req.method(), req.uri());
        let exchange = async {
            let resp = self.inner.request(req).await?;
            let (parts, body) = resp.into_parts();
            let body = body.collect().await?.to_bytes();
            anyhow::Ok(Resp {
                status: parts.status,
                version: parts.version,
                headers: parts.headers,
                body,
            })
        };
        tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| anyhow!("{what}: no complete response within {:?}", self.timeout))?
            .with_context(|| what)
    }
}

/// `GET url` with a fresh HTTP/1.1 [`Client`].
pub async fn get(url: &str) -> Result<Resp> {
    Client::new().get(url).await
}

/// `method url` with `body`, with a fresh HTTP/1.1 [`Client`].
pub async fn request(method: Method, url: &str, body: impl Into<Bytes>) -> Result<Resp> {
    Client::new().request(method, url, body).await
}

/// A tiny blocking HTTP/1.1 client on `std::net`, one connection per request.
///
/// It needs no runtime, so it works in sync tests, in `wait_until` conditions and
/// inside async tests alike.
pub mod blocking {
    use std::io::{Read, Write};
    use std::net::{TcpStream, ToSocketAddrs};

    use super::*;

    /// `GET url`.
    pub fn get(url: &str) -> Result<Resp> {
        request("GET", url, b"")
    }

    /// `GET url`, giving up after `timeout` (to connect, and each read or write).
    pub fn get_within(url: &str, timeout: Duration) -> Result<Resp> {
        request_within("GET", url, b"", timeout)
    }

    /// `method url` with `body` (sent with a `Content-Length`).
    pub fn request(method: &str, url: &str, body: &[u8]) -> Result<Resp> {
        request_within(method, url, body, HTTP_TIMEOUT)
    }

    /// [`request`], giving up after `timeout` (to connect, and each read or
    /// write) instead of [`HTTP_TIMEOUT`].
    pub fn request_within(method: &str, url: &str, body: &[u8], timeout: Duration) -> Result<Resp> {
        let uri: Uri = url.parse().with_context(|| format!("bad url {url}"))?;
        let authority = uri.authority().context("url without host")?.clone();
        let port = authority.port_u16().unwrap_or(80);
        let addr = (authority.host(), port)
            .to_socket_addrs()?
            .next()
            .with_context(|| format!("{authority} does not resolve"))?;
        let path = uri.path_and_query().map_or("/", |p| p.as_str());
        let mut stream = TcpStream::connect_timeout(&addr, timeout.min(Duration::from_secs(5)))
            .with_context(|| format!("connect {addr}"))?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\
             Content-Length: {}\r\n\r\n",
            body.len()
        );
        stream.write_all(head.as_bytes())?;
        stream.write_all(body)?;
        let mut raw = Vec::new();
        stream
            .read_to_end(&mut raw)
            .with_context(|| format!("{method} {url}: reading the response"))?;
        parse_response(&raw).with_context(|| format!("{method} {url}"))
    }

    /// Parses a complete HTTP/1.x response (as read until EOF).
    pub fn parse_response(raw: &[u8]) -> Result<Resp> {
        let split = raw
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .context("no complete response head")?;
        let head = std::str::from_utf8(&raw[..split]).context("response head is not UTF-8")?;
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or_default();
        let mut parts = status_line.splitn(3, ' ');
        let version = match parts.next() {
            Some("HTTP/1.0") => Version::HTTP_10,
            Some("HTTP/1.1") => Version::HTTP_11,
            _ => bail!("bad status line {status_line:?}"),
        };
        let status: StatusCode = parts
            .next()
            .and_then(|c| c.parse().ok())
            .with_context(|| format!("bad status line {status_line:?}"))?;
        let mut headers = HeaderMap::new();
        for line in lines {
            let (name, value) = line
                .split_once(':')
                .with_context(|| format!("bad header line {line:?}"))?;
            headers.append(
                http::HeaderName::from_bytes(name.trim().as_bytes())?,
                http::HeaderValue::from_str(value.trim())?,
            );
        }
        let rest = &raw[split + 4..];
        let chunked = headers
            .get(http::header::TRANSFER_ENCODING)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"chunked"));
        let body = if chunked {
            dechunk(rest)?
        } else if let Some(len) = headers
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<usize>().ok())
        {
            if rest.len() < len {
                bail!("body cut short: {} of {len} bytes", rest.len());
            }
            rest[..len].to_vec()
        } else {
            rest.to_vec()
        };
        Ok(Resp {
            status,
            version,
            headers,
            body: body.into(),
        })
    }

    fn dechunk(mut rest: &[u8]) -> Result<Vec<u8>> {
        let mut body = Vec::new();
        loop {
            let eol = rest
                .windows(2)
                .position(|w| w == b"\r\n")
                .context("chunk size line cut short")?;
            let size_line = std::str::from_utf8(&rest[..eol])?;
            let size_hex = size_line.split(';').next().unwrap_or_default().trim();
            let size = usize::from_str_radix(size_hex, 16)
                .with_context(|| format!("bad chunk size {size_line:?}"))?;
            rest = &rest[eol + 2..];
            if size == 0 {
                return Ok(body);
            }
            if rest.len() < size + 2 {
                bail!("chunk cut short");
            }
            body.extend_from_slice(&rest[..size]);
            rest = &rest[size + 2..];
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn parses_length_and_chunked_bodies() {
            let r = parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-A: b\r\n\r\nhi")
                .unwrap();
            assert_eq!(
                (r.status, r.text().as_str(), r.header("x-a")),
                (StatusCode::OK, "hi", Some("b"))
            );
            let r = parse_response(
                b"HTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nab\r\n1\r\nc\r\n0\r\n\r\n",
            )
            .unwrap();
            assert_eq!(
                (r.status, r.text().as_str()),
                (StatusCode::NOT_FOUND, "abc")
            );
        }
    }
}
pub mod deploy;
pub mod dns;
pub mod edge;
pub mod load;
pub mod raw;
pub mod usher;
