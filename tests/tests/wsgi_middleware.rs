//! The WSGI middleware `usher_wsgi.UsherLoad` (worker/python, issue 14) under
//! the real servers whose pools it reads: waitress and gunicorn `-k gthread`,
//! each with 4 threads and nobody telling the middleware so.
//!
//! Per server:
//! - the thread count is found, and the header is usher-worker's, byte for byte;
//! - `/healthz` counts the requests inside the app while they run, and
//!   `served` counts them once they are done;
//! - under more load than threads, requests waiting for a thread show as
//!   `queued` (gthread's pool queue holds them as waitress's does);
//! - a real Usher with `max_in_flight: auto` takes the 4 as the backend's
//!   capacity, and the client never sees the header.
//!
//! And on a server whose pool it cannot see (gunicorn's sync worker): no
//! header, one warning, and `USHER_THREADS` as the way out.
//!
//! The app is `tests/python/usher_wsgi_app.py`; the middleware comes from
//! the repo (`worker/python` on `PYTHONPATH`), not from an installed copy.
//! waitress and gunicorn must be installed (test.sh does it): a missing one
//! FAILS the test. Needs `cargo build --workspace --bins` first.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::StatusCode;
use serde_json::json;
use usher_e2e::usher::{Config, Usher};
use usher_e2e::{blocking, healthz_ok, spawn_python, url, wait_until, PyServer, Resp};
use usher_worker::LoadReport;

/// The servers' thread count, which the middleware has to find by itself.
const THREADS: usize = 4;

#[derive(Debug, Clone, Copy)]
enum Server {
    Waitress,
    Gthread,
    /// gunicorn's sync worker: one request at a time, no pool to read.
    Sync,
}

fn repo_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
}

/// Fails the test (never skips) when a Python module is missing.
fn require_python_module(module: &str) {
    let out = Command::new("python3")
        .args(["-c", &format!("import {module}")])
        .output()
        .unwrap_or_else(|e| panic!("cannot run python3: {e}"));
    assert!(
        out.status.success(),
        "python module `{module}` is not installed; run test.sh, or \
         `python3 -m pip install {module}`:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `usher_wsgi_app:application` under `server`, with `env` added.
fn start(server: Server, env: &[(&str, &str)]) -> PyServer {
    let threads = THREADS.to_string();
    let mut cmd = Command::new("python3");
    let marker = match server {
        Server::Waitress => {
            require_python_module("waitress");
            cmd.args(["-m", "waitress", "--listen=127.0.0.1:0"])
                .arg(format!("--threads={threads}"));
            "Serving on http://"
        }
        Server::Gthread | Server::Sync => {
            require_python_module("gunicorn");
            cmd.args([
                "-m",
                "gunicorn",
                "--bind",
                "127.0.0.1:0",
                "--no-control-socket",
            ])
            .args(["--workers", "1"]);
            if matches!(server, Server::Gthread) {
                cmd.args(["-k", "gthread", "--threads", &threads]);
            } else {
                // Not with --threads: gunicorn would switch to gthread.
                cmd.args(["-k", "sync"]);
            }
            "Listening at: http://"
        }
    };
    let python_path: PathBuf = repo_dir().join("worker/python");
    cmd.arg("usher_wsgi_app:application")
        .env("PYTHONPATH", python_path)
        .env_remove("USHER_THREADS")
        .envs(env.iter().copied());
    spawn_python(cmd, &repo_dir().join("tests/python"), marker, healthz_ok)
}

fn get(addr: SocketAddr, path: &str) -> Resp {
    let r = blocking::get(&url(addr, path)).unwrap_or_else(|e| panic!("GET {path}: {e:#}"));
    assert_eq!(r.status, StatusCode::OK, "GET {path}: {}", r.text());
    r
}

fn healthz(addr: SocketAddr) -> serde_json::Value {
    let r = get(addr, "/healthz");
    assert_eq!(r.header("content-type"), Some("application/json"));
    r.json()
}

/// The response's `X-Usher-Load`, as Usher reads it.
fn load_of(r: &Resp) -> LoadReport {
    let value = r
        .header("x-usher-load")
        .unwrap_or_else(|| panic!("no X-Usher-Load in {:?}", r.headers));
    value
        .parse()
        .unwrap_or_else(|e| panic!("X-Usher-Load {value:?}: {e}"))
}

fn num(v: &serde_json::Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("no number {key} in {v}"))
}

/// `GET path` on `n` threads at once; joining yields the responses.
fn concurrently(addr: SocketAddr, path: &str, n: usize) -> Vec<std::thread::JoinHandle<Resp>> {
    (0..n)
        .map(|_| {
            let path = path.to_string();
            std::thread::spawn(move || get(addr, &path))
        })
        .collect()
}

fn reports_its_thread_count_in_the_usher_worker_format(server: Server) {
    let app = start(server, &[]);
    let r = get(app.addr, "/");
    assert_eq!(r.text(), "hello\n");
    assert_eq!(
        r.header("x-usher-load"),
        Some("threads=4, busy=0, queued=0"),
        "{:?}",
        r.headers
    );
    // What usher-worker writes for the same numbers.
    assert_eq!(
        load_of(&r).to_string(),
        "threads=4, busy=0, queued=0",
        "usher-worker's format"
    );

    let h = blocking::get(&url(app.addr, "/healthz")).expect("GET /healthz");
    assert_eq!(h.status, StatusCode::OK, "{}", h.text());
    assert_eq!(h.header("content-type"), Some("application/json"));
    assert_eq!(
        h.header("x-usher-load"),
        Some("threads=4, busy=0, queued=0")
    );
    // usher-worker's keys, no more: the `/` above was served, the health
    // checks (the readiness wait's, this one) are not counted.
    assert_eq!(
        h.json(),
        json!({"threads": 4, "busy": 0, "queued": 0, "served": 1, "peak_busy": 1})
    );
    let snapshot: usher_worker::LoadSnapshot =
        serde_json::from_slice(&h.body).expect("/healthz reads as usher-worker's LoadSnapshot");
    assert_eq!(snapshot.threads, THREADS);
}

fn healthz_counts_the_requests_in_the_app_while_they_run(server: Server) {
    const N: usize = 3;
    let app = start(server, &[]);
    let served_before = num(&healthz(app.addr), "served");

    let running = concurrently(app.addr, "/sleep?ms=3000", N);
    // The fourth thread is free to answer; sampled while the sleeps run.
    let mut last = serde_json::Value::Null;
    let seen = wait_until(Duration::from_secs(10), || {
        last = healthz(app.addr);
        num(&last, "busy") == N as u64
    });
    assert!(
        seen,
        "busy never reached {N} while {N} requests slept: {last}"
    );
    assert_eq!(num(&last, "queued"), 0, "{last}");
    assert!(num(&last, "peak_busy") >= N as u64, "{last}");
    assert_eq!(num(&last, "served"), served_before, "none done yet: {last}");

    for t in running {
        let r = t.join().expect("sleeping request");
        assert_eq!(r.text(), "slept 3000\n");
        let load = load_of(&r);
        // A response does not count the request it answers.
        assert!(load.busy < N, "{load:?}");
        assert_eq!((load.threads, load.queued), (THREADS, 0), "{load:?}");
    }
    let done = wait_until(Duration::from_secs(10), || {
        last = healthz(app.addr);
        num(&last, "busy") == 0
    });
    assert!(done, "busy did not return to 0 after the requests: {last}");
    assert_eq!(num(&last, "served"), served_before + N as u64, "{last}");
    assert_eq!(num(&last, "peak_busy"), N as u64, "{last}");
}

fn healthz_reports_requests_waiting_for_a_thread(server: Server) {
    // Twice the threads, each client sending its next request as soon as
    // one is answered: about half of them wait for a thread at any time.
    const CLIENTS: usize = 2 * THREADS;
    let app = start(server, &[]);
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let (stop, addr) = (stop.clone(), app.addr);
            std::thread::spawn(move || {
                let mut loads = Vec::new();
                while !stop.load(Ordering::SeqCst) {
                    loads.push(load_of(&get(addr, "/sleep?ms=300")));
                }
                loads
            })
        })
        .collect();

    // A health check waits for a thread too; while it waits, answered
    // clients send again and queue behind it.
    let mut samples = Vec::new();
    let seen = wait_until(Duration::from_secs(30), || {
        let h = healthz(app.addr);
        let queued = num(&h, "queued");
        samples.push(h);
        queued > 0
    });
    stop.store(true, Ordering::SeqCst);
    let loads: Vec<LoadReport> = clients
        .into_iter()
        .flat_map(|c| c.join().expect("client"))
        .collect();
    assert!(seen, "no /healthz showed a queue: {samples:?}");
    for h in &samples {
        // The health check holds a thread itself, and nobody sent more
        // than CLIENTS requests.
        let (busy, queued) = (num(h, "busy"), num(h, "queued"));
        assert!(busy < THREADS as u64, "{h}");
        assert!(busy + queued <= CLIENTS as u64, "{h}");
    }
    assert!(
        loads.iter().any(|l| l.queued > 0),
        "no response reported a queue: {loads:?}"
    );
    for l in &loads {
        assert_eq!(l.threads, THREADS, "{l:?}");
        assert!(l.busy < THREADS, "counts the request it answers: {l:?}");
        // The others: every other client, and maybe a queued health check.
        assert!(l.busy + l.queued <= CLIENTS, "more than was sent: {l:?}");
    }

    let mut last = serde_json::Value::Null;
    let drained = wait_until(Duration::from_secs(10), || {
        last = healthz(app.addr);
        num(&last, "busy") == 0 && num(&last, "queued") == 0
    });
    assert!(
        drained,
        "load did not return to 0 after the clients stopped: {last}"
    );
    assert_eq!(
        num(&last, "served"),
        loads.len() as u64,
        "every answered /sleep counted once: {last}"
    );
}

fn usher_takes_the_reported_threads_as_capacity(server: Server) {
    const NO_REPORT: &str = "max_in_flight is auto but the backend reports no thread count";
    let app = start(server, &[]);
    // default_capacity 2, so a capacity of 4 can only be the report's.
    let u = Usher::start_ready(
        &Config::app(&[app.addr], "", "    default_capacity: 2")
            .top("access_log: { format: off }")
            .yaml(),
    );
    let capacity = || u.status()["upstreams"]["app"]["backends"][0]["capacity"].clone();
    // Asked before the first request: Usher probes /healthz at startup.
    assert_eq!(capacity(), json!(THREADS), "{}", u.status());
    let summary = u
        .proc
        .wait_for_output("upstream upstream=app", Duration::from_secs(10))
        .unwrap_or_else(|| panic!("no startup line for upstream app:\n{}", u.proc.output()));
    assert!(
        summary.ends_with(&format!("backends={} ×4 (worker's report)", app.addr)),
        "{summary}"
    );

    for _ in 0..3 {
        let r = blocking::get(&u.url("/")).expect("GET / through usher");
        assert_eq!((r.status, r.text().as_str()), (StatusCode::OK, "hello\n"));
        assert_eq!(r.header("x-usher-load"), None, "{:?}", r.headers);
    }
    assert_eq!(capacity(), json!(THREADS), "{}", u.status());
    assert!(
        !u.proc.output().contains(NO_REPORT),
        "Usher missed the report:\n{}",
        u.proc.output()
    );
    // And the app did serve them.
    assert_eq!(num(&healthz(app.addr), "served"), 3);
}

#[test]
fn waitress_reports_its_thread_count_in_the_usher_worker_format() {
    reports_its_thread_count_in_the_usher_worker_format(Server::Waitress);
}

#[test]
fn gthread_reports_its_thread_count_in_the_usher_worker_format() {
    reports_its_thread_count_in_the_usher_worker_format(Server::Gthread);
}

#[test]
fn waitress_healthz_counts_the_requests_in_the_app_while_they_run() {
    healthz_counts_the_requests_in_the_app_while_they_run(Server::Waitress);
}

#[test]
fn gthread_healthz_counts_the_requests_in_the_app_while_they_run() {
    healthz_counts_the_requests_in_the_app_while_they_run(Server::Gthread);
}

#[test]
fn waitress_healthz_reports_requests_waiting_for_a_thread() {
    healthz_reports_requests_waiting_for_a_thread(Server::Waitress);
}

#[test]
fn gthread_healthz_reports_requests_waiting_for_a_thread() {
    healthz_reports_requests_waiting_for_a_thread(Server::Gthread);
}

#[test]
fn waitress_usher_takes_the_reported_threads_as_capacity() {
    usher_takes_the_reported_threads_as_capacity(Server::Waitress);
}

#[test]
fn gthread_usher_takes_the_reported_threads_as_capacity() {
    usher_takes_the_reported_threads_as_capacity(Server::Gthread);
}

#[test]
fn without_a_thread_count_there_is_no_header_and_one_warning() {
    const WARNING: &str = "usher_wsgi: cannot tell this server's thread count";
    let app = start(Server::Sync, &[]);
    for _ in 0..3 {
        let r = get(app.addr, "/");
        assert_eq!(r.header("x-usher-load"), None, "{:?}", r.headers);
    }
    // Still a health check, and still the load, without a capacity to claim.
    assert_eq!(
        healthz(app.addr),
        json!({"busy": 0, "queued": 0, "served": 3, "peak_busy": 1})
    );
    let warned = app.proc.wait_for_output(WARNING, Duration::from_secs(10));
    let line = warned.unwrap_or_else(|| panic!("no warning:\n{}", app.proc.output()));
    assert!(
        line.contains("threads=N") && line.contains("USHER_THREADS"),
        "{line}"
    );
    assert_eq!(
        app.proc.output().matches(WARNING).count(),
        1,
        "{}",
        app.proc.output()
    );

    let told = start(Server::Sync, &[("USHER_THREADS", "1")]);
    let r = get(told.addr, "/");
    assert_eq!(
        r.header("x-usher-load"),
        Some("threads=1, busy=0, queued=0")
    );
    assert_eq!(num(&healthz(told.addr), "threads"), 1);
}

/// A waitress app whose 4 threads all hold long requests cannot answer
/// `/healthz` until one frees: the check times out. Usher sees that every
/// thread holds its requests and that they are being answered, and keeps
/// the backend up — it does not take a busy app for a dead one (which
/// would turn full load into 503s for everyone).
#[test]
fn a_waitress_app_busy_with_long_requests_is_not_marked_down() {
    let app = start(Server::Waitress, &[]);
    let u = Usher::start_ready(
        &Config::app(
            &[app.addr],
            "",
            "    health_check: { path: /healthz, interval: 200ms, timeout: 100ms, rise: 1, fall: 2 }",
        )
        .top("access_log: { format: off }")
        .yaml(),
    );
    let target = u.url("/sleep?ms=1000");
    let clients: Vec<_> = (0..THREADS)
        .map(|_| {
            let target = target.clone();
            std::thread::spawn(move || {
                (0..3)
                    .map(|_| blocking::get(&target).map_or(0, |r| r.status.as_u16()))
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    // While they run: the checks time out, and the backend stays up.
    let mut states = Vec::new();
    let busy_checks = || {
        u.metric(
            "usher_health_checks_total",
            &[("upstream", "app"), ("result", "busy")],
        )
    };
    while clients.iter().any(|c| !c.is_finished()) {
        states.push(u.status()["upstreams"]["app"]["backends"][0]["state"].clone());
        std::thread::sleep(Duration::from_millis(50));
    }
    let busy = busy_checks();
    let statuses: Vec<u16> = clients
        .into_iter()
        .flat_map(|c| c.join().unwrap())
        .collect();
    assert_eq!(statuses, vec![200; THREADS * 3], "{}", u.proc.output());
    assert!(
        states.iter().all(|s| s == "up"),
        "the backend left `up` under load: {states:?}\n{}",
        u.proc.output()
    );
    assert!(busy >= 2.0, "checks counted busy: {busy}");
}
