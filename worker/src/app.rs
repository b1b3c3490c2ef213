//! The built-in demo and load-test app, the binary's default handler.
//!
//! | route | what | with `--gil` |
//! |---|---|---|
//! | `GET /sleep?ms=N` | sleeps N ms on the worker thread (I/O-bound work) | holds the GIL for `--gil-io-cpu` of CPU work, half before and half after the sleep, and releases it during the sleep |
//! | `GET /cpu?ms=N` | burns CPU for N ms of wall time | burns CPU until it has held the GIL for N ms, time-sliced with other threads every `--gil-switch-interval` |
//! | `POST /echo` | returns the request body | holds the GIL for `--gil-io-cpu` |
//! | `ANY /status/{code}` | answers with that status, 200..=599 | holds the GIL for `--gil-io-cpu` |
//! | `GET /healthz`, `GET /metrics` | answered by the server's front, see [`crate::Builder::builtin_endpoints`] | no GIL |
//!
//! `/sleep/NAME` and `/cpu/NAME` are the same views under a view name (distinct
//! paths for distinct views, as in a real app).
//!
//! Any other answer of the app (`400`, `404`, `405`) also holds the GIL for
//! `--gil-io-cpu`: in a Python app, a request runs some Python whatever it does.
//! And with `--gil` the server's own I/O thread holds it for `--gil-server-cpu` to
//! read each request and again to write its response, as waitress's main thread
//! does ([`App::with_server_cpu`]).
//!
//! `/sleep` and `/cpu` return `{"start_us":..,"end_us":..,"thread":".."}`: when the
//! work started and ended (µs since the UNIX epoch) and which pool thread did it, so
//! tests can see which requests ran in parallel. With the GIL on they also carry
//! `"gil_wait_us"`, how long the request waited for the GIL in all (to start, between
//! its time slices and back from its sleep), and `"gil_takes"`, how many times it
//! took the GIL (1 if it ran uninterrupted). The interval starts when the pool thread
//! starts the request, before it waits for the GIL.
//!
//! `N` must be an integer from 0 to 60000; anything else is a `400`.
//!
//! # Why the GIL is more than a lock
//!
//! See [`crate::gil`]: CPU-bound requests take turns in slices of a switch interval
//! rather than queuing one after another, and an I/O-bound request waits up to a
//! switch interval for the GIL every time its I/O returns (the convoy effect).

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use serde::Serialize;

use crate::gil::{Gil, GilGuard};
use crate::Handler;

/// Largest accepted `ms` for `/sleep` and `/cpu`.
pub const MAX_MS: u64 = 60_000;

/// Default CPU work a view does under the GIL besides `/cpu`'s (`--gil-io-cpu`): a
/// Django view runs at least this much Python around its I/O.
pub const DEFAULT_IO_CPU: Duration = Duration::from_micros(500);

/// Default CPU work of the server's own I/O thread under the GIL, per step
/// (`--gil-server-cpu`): waitress's main thread parses each request and sends
/// each response in Python.
pub const DEFAULT_SERVER_CPU: Duration = Duration::from_micros(200);

/// The built-in app. See the [module docs](self).
#[derive(Debug, Default)]
pub struct App {
    /// `Some` when the app models CPython's global interpreter lock.
    python: Option<Python>,
}

/// The GIL, and the Python work each request does under it besides `/cpu`'s.
#[derive(Debug)]
struct Python {
    gil: Arc<Gil>,
    io_cpu: Duration,
    /// The server I/O thread's work per step (`Handler::server_io`); zero:
    /// no such thread.
    server_cpu: Duration,
}

/// When a piece of work ran, and on which thread.
#[derive(Debug, Serialize)]
struct Timing {
    start_us: u64,
    end_us: u64,
    thread: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    gil_wait_us: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    gil_takes: Option<u32>,
}

impl App {
    /// The app without a GIL: `/cpu` requests burn CPU in parallel.
    pub fn new() -> Self {
        Self::default()
    }

    /// With `gil = true`, [`under_gil`](Self::under_gil) a [`Gil`] with CPython's
    /// default switch interval (5 ms) and [`DEFAULT_IO_CPU`], and
    /// [`with_server_cpu`](Self::with_server_cpu) [`DEFAULT_SERVER_CPU`];
    /// otherwise [`new`](Self::new).
    pub fn with_gil(gil: bool) -> Self {
        if gil {
            Self::under_gil(Arc::new(Gil::default()), DEFAULT_IO_CPU)
                .with_server_cpu(DEFAULT_SERVER_CPU)
        } else {
            Self::new()
        }
    }

    /// Every request runs under `gil`, like a pure-Python app under CPython: `/cpu`
    /// holds it for its whole CPU time, time-sliced with other threads, and the other
    /// routes hold it for `io_cpu` (`/sleep` half before and half after its sleep,
    /// releasing it while it sleeps). Keep a clone of `gil` to read
    /// [`Gil::switches`].
    pub fn under_gil(gil: Arc<Gil>, io_cpu: Duration) -> Self {
        Self {
            python: Some(Python {
                gil,
                io_cpu,
                server_cpu: Duration::ZERO,
            }),
        }
    }

    /// Under a GIL, the server's I/O thread also runs Python, `cpu` of it
    /// when a request has been read and again when its response is written,
    /// as waitress's main thread does: then even a response whose view has
    /// ended waits for a CPU-bound view to hand the GIL over (up to a switch
    /// interval), once to be read and once to be written. Zero: no I/O thread.
    /// Without a GIL this does nothing.
    pub fn with_server_cpu(mut self, cpu: Duration) -> Self {
        if let Some(p) = &mut self.python {
            p.server_cpu = cpu;
        }
        self
    }

    /// The GIL, when the app models one.
    pub fn gil(&self) -> Option<&Arc<Gil>> {
        self.python.as_ref().map(|p| &p.gil)
    }

    fn io_cpu(&self) -> Duration {
        self.python.as_ref().map_or(Duration::ZERO, |p| p.io_cpu)
    }
}

/// One request's work on its pool thread, holding the GIL if the app has one.
struct View<'a> {
    gil: Option<GilGuard<'a>>,
    start_us: u64,
}

impl<'a> View<'a> {
    /// Takes the GIL (if any) before the request's first line of "Python".
    fn enter(python: Option<&'a Python>) -> Self {
        let start_us = now_us();
        Self {
            gil: python.map(|p| p.gil.acquire()),
            start_us,
        }
    }

    /// CPU work for `d`: wall time without a GIL, GIL-holding time with one.
    fn cpu(&mut self, d: Duration) {
        let mut x: u64 = 1;
        match &mut self.gil {
            Some(gil) => gil.run(d, || step(&mut x)),
            None => {
                let until = Instant::now() + d;
                while Instant::now() < until {
                    step(&mut x);
                }
            }
        }
    }

    /// Blocking I/O for `d`, with the GIL released.
    fn io(&mut self, d: Duration) {
        match &mut self.gil {
            Some(gil) => gil.allow_threads(|| std::thread::sleep(d)),
            None => std::thread::sleep(d),
        }
    }

    fn timing(self) -> Response<Bytes> {
        let t = Timing {
            start_us: self.start_us,
            end_us: now_us(),
            thread: std::thread::current()
                .name()
                .unwrap_or("unnamed")
                .to_owned(),
            gil_wait_us: self.gil.as_ref().map(|g| g.waited().as_micros() as u64),
            gil_takes: self.gil.as_ref().map(GilGuard::takes),
        };
        drop(self);
        let mut resp = Response::new(Bytes::from(serde_json::to_vec(&t).expect("plain struct")));
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        resp
    }
}

/// A few microseconds of CPU work that the optimiser cannot remove.
fn step(x: &mut u64) {
    for _ in 0..1_000 {
        *x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
    }
    std::hint::black_box(*x);
}

impl Handler for App {
    fn has_server_io(&self) -> bool {
        self.python
            .as_ref()
            .is_some_and(|p| !p.server_cpu.is_zero())
    }

    fn server_io(&self, steps: usize) {
        if let Some(p) = &self.python {
            let mut view = View::enter(Some(p));
            view.cpu(p.server_cpu * u32::try_from(steps).unwrap_or(u32::MAX));
        }
    }

    fn handle(&self, req: Request<Bytes>) -> Response<Bytes> {
        let mut view = View::enter(self.python.as_ref());
        let io_cpu = self.io_cpu();
        let path = timed_route(req.uri().path());
        match path {
            "/sleep" | "/cpu" if req.method() == Method::GET => match parse_ms(req.uri().query()) {
                Ok(ms) if path == "/cpu" => {
                    view.cpu(Duration::from_millis(ms));
                    view.timing()
                }
                Ok(ms) => {
                    view.cpu(io_cpu / 2);
                    view.io(Duration::from_millis(ms));
                    view.cpu(io_cpu - io_cpu / 2);
                    view.timing()
                }
                Err(msg) => {
                    view.cpu(io_cpu);
                    text(StatusCode::BAD_REQUEST, msg)
                }
            },
            _ => {
                view.cpu(io_cpu);
                plain_route(req)
            }
        }
    }
}

/// `/sleep` and `/cpu`, also under a view name (`/sleep/report`): distinct
/// paths for distinct views, as in a real app, so a proxy that classifies by
/// path can tell them apart. Any other path is itself.
fn timed_route(path: &str) -> &str {
    ["/sleep", "/cpu"]
        .into_iter()
        .find(|r| {
            path.strip_prefix(r)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
        })
        .unwrap_or(path)
}

/// The routes that do no timed work.
fn plain_route(req: Request<Bytes>) -> Response<Bytes> {
    let path = timed_route(req.uri().path());
    let method = req.method();
    match path {
        "/sleep" | "/cpu" => method_not_allowed("GET"),
        "/echo" if method != Method::POST => method_not_allowed("POST"),
        "/echo" => {
            let content_type = req.headers().get(header::CONTENT_TYPE).cloned();
            let mut resp = Response::new(req.into_body());
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                content_type.unwrap_or(HeaderValue::from_static("application/octet-stream")),
            );
            resp
        }
        _ => match path.strip_prefix("/status/") {
            Some(code) => status(code),
            None => text(StatusCode::NOT_FOUND, format!("no route for {path}")),
        },
    }
}

/// Parses `ms` from a query string like `ms=250&x=1`.
fn parse_ms(query: Option<&str>) -> Result<u64, String> {
    let value = query
        .unwrap_or("")
        .split('&')
        .find_map(|pair| pair.strip_prefix("ms="))
        .ok_or("missing query parameter ms (milliseconds, 0 to 60000)")?;
    match value.parse::<u64>() {
        Ok(ms) if ms <= MAX_MS => Ok(ms),
        _ => Err(format!(
            "bad query parameter ms={value:?}: expected an integer number of milliseconds from 0 to {MAX_MS}"
        )),
    }
}

fn status(code: &str) -> Response<Bytes> {
    let status = code
        .parse::<u16>()
        .ok()
        .filter(|c| (200..=599).contains(c))
        .and_then(|c| StatusCode::from_u16(c).ok());
    match status {
        // 204 and 304 must not carry a body.
        Some(s @ (StatusCode::NO_CONTENT | StatusCode::NOT_MODIFIED)) => {
            let mut resp = Response::new(Bytes::new());
            *resp.status_mut() = s;
            resp
        }
        Some(s) => text(s, s.to_string()),
        None => text(
            StatusCode::BAD_REQUEST,
            format!("bad status code {code:?}: expected 200 to 599"),
        ),
    }
}

fn text(status: StatusCode, msg: impl Into<String>) -> Response<Bytes> {
    let mut body = msg.into();
    body.push('\n');
    let mut resp = Response::new(Bytes::from(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

fn method_not_allowed(allow: &'static str) -> Response<Bytes> {
    let mut resp = text(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("method not allowed; use {allow}"),
    );
    resp.headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static(allow));
    resp
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(app: &App, uri: &str) -> Response<Bytes> {
        app.handle(Request::get(uri).body(Bytes::new()).unwrap())
    }

    #[test]
    fn ms_parsing() {
        assert_eq!(parse_ms(Some("ms=0")), Ok(0));
        assert_eq!(parse_ms(Some("x=1&ms=60000")), Ok(60_000));
        for bad in ["ms=abc", "ms=-5", "ms=60001", "ms=", "ms=1.5"] {
            let err = parse_ms(Some(bad)).unwrap_err();
            assert!(err.contains("ms="), "{bad}: {err}");
        }
        assert!(parse_ms(None).unwrap_err().contains("missing"));
    }

    #[test]
    fn sleep_reports_its_interval() {
        let resp = get(&App::new(), "/sleep?ms=5");
        assert_eq!(resp.status(), StatusCode::OK);
        let v: serde_json::Value = serde_json::from_slice(resp.body()).unwrap();
        let (start, end) = (
            v["start_us"].as_u64().unwrap(),
            v["end_us"].as_u64().unwrap(),
        );
        assert!(end >= start + 5_000, "{v}");
        assert!(v["thread"].is_string());
    }

    #[test]
    fn a_view_name_after_the_route_is_the_same_view() {
        for uri in ["/sleep/report?ms=1", "/cpu/search?ms=1"] {
            assert_eq!(get(&App::new(), uri).status(), StatusCode::OK, "{uri}");
        }
        for uri in ["/sleeper?ms=1", "/cpux"] {
            assert_eq!(
                get(&App::new(), uri).status(),
                StatusCode::NOT_FOUND,
                "{uri}"
            );
        }
        let post = Request::post("/sleep/report?ms=1")
            .body(Bytes::new())
            .unwrap();
        assert_eq!(
            App::new().handle(post).status(),
            StatusCode::METHOD_NOT_ALLOWED
        );
    }

    #[test]
    fn under_the_gil_views_report_their_wait() {
        let app = App::under_gil(Arc::new(Gil::default()), Duration::from_millis(2));
        let v: serde_json::Value = serde_json::from_slice(get(&app, "/sleep?ms=5").body()).unwrap();
        let took = v["end_us"].as_u64().unwrap() - v["start_us"].as_u64().unwrap();
        assert!(
            took >= 7_000,
            "5 ms asleep and 2 ms of CPU in {took} µs: {v}"
        );
        assert_eq!(v["gil_wait_us"], 0, "nobody else held the GIL: {v}");
        assert_eq!(v["gil_takes"], 2, "to start and back from the sleep: {v}");
        assert_eq!(get(&app, "/status/418").status(), StatusCode::IM_A_TEAPOT);
        assert_eq!(app.gil().unwrap().switches(), 1, "one thread took it");

        let plain = get(&App::with_gil(false), "/cpu?ms=1");
        let v: serde_json::Value = serde_json::from_slice(plain.body()).unwrap();
        assert!(v.get("gil_wait_us").is_none(), "{v}");
    }

    #[test]
    fn status_route() {
        let app = App::new();
        assert_eq!(get(&app, "/status/418").status(), StatusCode::IM_A_TEAPOT);
        assert_eq!(get(&app, "/status/204").body().len(), 0);
        for bad in ["/status/99", "/status/100", "/status/600", "/status/abc"] {
            assert_eq!(get(&app, bad).status(), StatusCode::BAD_REQUEST, "{bad}");
        }
    }

    #[test]
    fn echo_and_unknown() {
        let app = App::new();
        let req = Request::post("/echo")
            .header(header::CONTENT_TYPE, "text/plain")
            .body(Bytes::from_static(b"hi"))
            .unwrap();
        let resp = app.handle(req);
        assert_eq!(resp.body().as_ref(), b"hi");
        assert_eq!(resp.headers()[header::CONTENT_TYPE], "text/plain");
        assert_eq!(get(&app, "/echo").status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(get(&app, "/nope").status(), StatusCode::NOT_FOUND);
    }
}
