//! The built-in demo and load-test app, the binary's default handler.
//!
//! | route | what |
//! |---|---|
//! | `GET /sleep?ms=N` | sleeps N ms on the worker thread (I/O-bound work) |
//! | `GET /cpu?ms=N` | burns CPU for N ms of wall time; with `--gil` under one process-wide lock |
//! | `POST /echo` | returns the request body |
//! | `ANY /status/{code}` | answers with that status, 200..=599 |
//! | `GET /healthz`, `GET /metrics` | answered by the server's front, see [`crate::Builder::builtin_endpoints`] |
//!
//! `/sleep` and `/cpu` return `{"start_us":..,"end_us":..,"thread":".."}`: when the
//! work started and ended (µs since the UNIX epoch) and which pool thread did it, so
//! tests can see which requests ran in parallel. For `/cpu` with the GIL on, the
//! interval starts once the lock is held.
//!
//! `N` must be an integer from 0 to 60000; anything else is a `400`.

use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use serde::Serialize;

use crate::Handler;

/// Largest accepted `ms` for `/sleep` and `/cpu`.
pub const MAX_MS: u64 = 60_000;

/// The built-in app. See the [module docs](self).
#[derive(Debug, Default)]
pub struct App {
    /// `Some` when the app models CPython's global interpreter lock.
    gil: Option<Mutex<()>>,
}

/// When a piece of work ran, and on which thread.
#[derive(Debug, Serialize)]
struct Timing {
    start_us: u64,
    end_us: u64,
    thread: String,
}

impl App {
    /// The app without a GIL: `/cpu` requests burn CPU in parallel.
    pub fn new() -> Self {
        Self::default()
    }

    /// With `gil = true`, `/cpu` holds one process-wide lock while it burns CPU, so
    /// CPU-bound requests run one at a time however many threads there are, like
    /// pure-Python code under CPython. `/sleep` does not take the lock (CPython
    /// releases the GIL around blocking I/O).
    pub fn with_gil(gil: bool) -> Self {
        Self {
            gil: gil.then(|| Mutex::new(())),
        }
    }

    fn sleep(&self, ms: u64) -> Response<Bytes> {
        let start = now_us();
        std::thread::sleep(Duration::from_millis(ms));
        timing(start)
    }

    fn cpu(&self, ms: u64) -> Response<Bytes> {
        // Nothing panics while the lock is held, but a poisoned GIL still works.
        let _gil = self
            .gil
            .as_ref()
            .map(|gil| gil.lock().unwrap_or_else(PoisonError::into_inner));
        let start = now_us();
        let until = Instant::now() + Duration::from_millis(ms);
        let mut x: u64 = 1;
        while Instant::now() < until {
            for _ in 0..1_000 {
                x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            }
            std::hint::black_box(x);
        }
        timing(start)
    }
}

impl Handler for App {
    fn handle(&self, req: Request<Bytes>) -> Response<Bytes> {
        let path = req.uri().path();
        let method = req.method();
        match path {
            "/sleep" | "/cpu" if method != Method::GET => method_not_allowed("GET"),
            "/sleep" => match parse_ms(req.uri().query()) {
                Ok(ms) => self.sleep(ms),
                Err(msg) => text(StatusCode::BAD_REQUEST, msg),
            },
            "/cpu" => match parse_ms(req.uri().query()) {
                Ok(ms) => self.cpu(ms),
                Err(msg) => text(StatusCode::BAD_REQUEST, msg),
            },
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

fn timing(start_us: u64) -> Response<Bytes> {
    let t = Timing {
        start_us,
        end_us: now_us(),
        thread: std::thread::current()
            .name()
            .unwrap_or("unnamed")
            .to_owned(),
    };
    let mut resp = Response::new(Bytes::from(serde_json::to_vec(&t).expect("plain struct")));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
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
