//! The admin listener (loopback by default).
//!
//! | route | what |
//! |---|---|
//! | `GET /` | the status page: HTML, self-refreshing from `/status` |
//! | `GET /metrics` | Prometheus text format |
//! | `GET /livez` | 200 while the process runs |
//! | `GET /readyz` | 200 when serving; 503 while draining or before any backend is up |
//! | `GET /status` | JSON: every upstream, its queue, each backend's state, in_flight, capacity, learned_capacity and why (`learned`), upgraded, share (under `proxy_replicas`) |
//! | `POST /reload` | reload the config file: 200 and a summary of what changed, or 422 and the errors (`usher reload` calls it) |
//! | `POST /upstreams/{u}/backends/{addr}/drain` | stop sending new requests to a backend |
//! | `POST /upstreams/{u}/backends/{addr}/undrain` | resume it |
//!
//! Readiness is a latch that shutdown flips: once draining, `/readyz` stays 503.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::control::state::State;
use crate::observe::metrics::Metrics;
use crate::observe::unix_ms;
use crate::upstream::{text, ProxyBody};

pub struct Admin {
    /// When Usher started (for `/status` `uptime_s`).
    pub started: std::time::Instant,
    pub state: Arc<arc_swap::ArcSwap<State>>,
    pub metrics: Arc<Metrics>,
    pub draining: AtomicBool,
    pub reloader: Arc<crate::control::reload::Reloader>,
}

impl Admin {
    fn route(&self, req: &Request<Incoming>) -> Response<ProxyBody> {
        let path = req.uri().path();
        let state = self.state.load_full();
        match (req.method(), path) {
            (&Method::GET, "/metrics") => {
                state.refresh_gauges(&self.metrics);
                let mut r = Response::new(ProxyBody::full(self.metrics.render()));
                r.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
                );
                r
            }
            (&Method::GET, "/livez") => text(StatusCode::OK, "ok\n"),
            (&Method::GET, "/readyz") => {
                if self.draining.load(Ordering::Relaxed) {
                    text(StatusCode::SERVICE_UNAVAILABLE, "draining\n")
                } else if !state.any_backend_available() {
                    text(StatusCode::SERVICE_UNAVAILABLE, "no backend is up\n")
                } else {
                    text(StatusCode::OK, "ready\n")
                }
            }
            (&Method::GET, "/") => {
                let mut r = Response::new(ProxyBody::full(crate::control::status_page::render(
                    &self.status_json(),
                )));
                r.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("text/html; charset=utf-8"),
                );
                r
            }
            (&Method::GET, "/status") => {
                let mut r = Response::new(ProxyBody::full(self.status_json().to_string()));
                r.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                );
                r
            }
            (&Method::POST, p) if p.starts_with("/upstreams/") => self.drain(p),
            (_, "/metrics" | "/livez" | "/readyz" | "/status") => {
                text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n")
            }
            _ => text(
                StatusCode::NOT_FOUND,
                "not found; try /metrics, /livez, /readyz, /status\n",
            ),
        }
    }

    /// `POST /reload`: the same reload as SIGHUP, answered with its result.
    async fn reload(&self) -> Response<ProxyBody> {
        let reloader = self.reloader.clone();
        // File I/O and the build stay off the runtime's threads.
        match tokio::task::spawn_blocking(move || reloader.reload()).await {
            Ok(Ok(summary)) => text(
                StatusCode::OK,
                format!("usher: configuration reloaded: {summary}\n"),
            ),
            Ok(Err(errors)) => {
                let mut body: String = errors
                    .lines()
                    .map(|l| format!("usher: error: {l}\n"))
                    .collect();
                body.push_str("usher: reload rejected; the running configuration is unchanged\n");
                text(StatusCode::UNPROCESSABLE_ENTITY, body)
            }
            Err(e) => text(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("usher: reload failed: {e}\n"),
            ),
        }
    }

    fn status_json(&self) -> serde_json::Value {
        let state = self.state.load_full();
        let now = std::time::Instant::now();
        let mut ups = serde_json::Map::new();
        let mut names: Vec<_> = state.upstreams.keys().collect();
        names.sort();
        for name in names {
            let u = &state.upstreams[name];
            let backends: Vec<_> = u
                .dispatcher
                .backends()
                .iter()
                .map(|b| {
                    let learned = b.learned_view();
                    serde_json::json!({
                        "address": b.key,
                        "state": b.health.state(now),
                        "in_flight": b.in_flight(),
                        "capacity": b.capacity(),
                        "learned_capacity": learned.capacity,
                        "learned": learned.why,
                        "weight": b.weight(),
                        "upgraded": b.upgraded(),
                        "share": b.share_view(),
                        "ejections": b.health.ejections(),
                        "fleet": state.gates.find(b.addr).map(|g| {
                            let p = g.process();
                            serde_json::json!({
                                "pid": p.pid,
                                "restarts": p.restarts,
                                "uptime_s": p.started.and_then(|t| t.elapsed().ok()).map(|d| d.as_secs()),
                            })
                        }),
                        "check": b.health.last_check().map(|(at, failure)| serde_json::json!({
                            "at_unix_ms": unix_ms(at),
                            "ok": failure.is_none(),
                            "reason": failure,
                        })),
                    })
                })
                .collect();
            ups.insert(
                name.clone(),
                serde_json::json!({
                    "queue": {
                        "depth": u.dispatcher.queue_len(),
                        "max_depth": u.cfg.queue.max_depth,
                        "recent_wait_ms": u.dispatcher.recent_wait().as_secs_f64() * 1000.0,
                    },
                    "balance": balance_name(u.cfg.balance),
                    "discipline": discipline_name(u.cfg.queue.discipline),
                    "backends": backends,
                }),
            );
        }
        let reload = self.reloader.last.lock().unwrap().clone().map(|last| {
            serde_json::json!({
                "at_unix_ms": unix_ms(last.at),
                "ok": last.outcome.is_ok(),
                "detail": match last.outcome { Ok(s) | Err(s) => s },
            })
        });
        serde_json::json!({
            "version": env!("CARGO_PKG_VERSION"),
            "uptime_s": self.started.elapsed().as_secs(),
            "draining": self.draining.load(Ordering::Relaxed),
            "reload": reload,
            "upstreams": ups,
        })
    }

    fn drain(&self, path: &str) -> Response<ProxyBody> {
        // /upstreams/{u}/backends/{addr}/{drain|undrain}
        let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
        let (u, addr, action) = match parts.as_slice() {
            ["upstreams", u, "backends", addr, action] => (*u, *addr, *action),
            _ => {
                return text(
                    StatusCode::NOT_FOUND,
                    "expected /upstreams/{u}/backends/{addr}/drain or /undrain\n",
                )
            }
        };
        let drain = match action {
            "drain" => true,
            "undrain" => false,
            _ => return text(StatusCode::NOT_FOUND, "action must be drain or undrain\n"),
        };
        let state = self.state.load_full();
        let Some(up) = state.upstreams.get(u) else {
            return text(StatusCode::NOT_FOUND, format!("no upstream `{u}`\n"));
        };
        let Some(b) = up.dispatcher.backends().into_iter().find(|b| b.key == addr) else {
            return text(
                StatusCode::NOT_FOUND,
                format!("no backend `{addr}` in upstream `{u}`\n"),
            );
        };
        b.health.set_draining(drain);
        up.dispatcher.kick();
        tracing::info!(upstream = %u, backend = %addr, drain, "backend drain changed by admin API");
        text(StatusCode::OK, format!("{action}ed {addr}\n"))
    }
}

/// Serves the admin listener until `stop` fires.
pub async fn serve(listener: TcpListener, admin: Arc<Admin>, stop: CancellationToken) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(std::time::Duration::from_secs(10));
    loop {
        let (stream, _) = tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(_) => {
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let admin = admin.clone();
        let builder = builder.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: Request<Incoming>| {
                let admin = admin.clone();
                async move {
                    if req.method() == Method::POST && req.uri().path() == "/reload" {
                        return Ok::<_, std::convert::Infallible>(admin.reload().await);
                    }
                    Ok(admin.route(&req))
                }
            });
            let _ = builder.serve_connection(TokioIo::new(stream), svc).await;
        });
    }
}

/// `usher reload`: sends `POST /reload` to the admin listener at `address`
/// and returns whether it was accepted, with the answer's text.
pub fn request_reload(address: &str) -> std::io::Result<(bool, String)> {
    use std::io::{Read, Write};
    let addr = crate::config::resolve_addr(address)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let mut s = std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(5))?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(120)))?;
    write!(
        s,
        "POST /reload HTTP/1.1\r\nHost: {address}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let raw = String::from_utf8_lossy(&raw);
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let ok = head.split_whitespace().nth(1) == Some("200");
    Ok((ok, body.to_string()))
}

/// The config's spelling, for `/status`.
fn balance_name(b: crate::config::Balance) -> &'static str {
    use crate::config::Balance;
    match b {
        Balance::LeastOutstanding => "least_outstanding",
        Balance::RoundRobin => "round_robin",
        Balance::Random => "random",
    }
}

fn discipline_name(d: crate::config::Discipline) -> &'static str {
    use crate::config::Discipline;
    match d {
        Discipline::Fifo => "fifo",
        Discipline::ShortestFirst => "shortest_first",
    }
}
