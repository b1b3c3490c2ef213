//! Usher in front of real threaded Python servers (issue 3, "Real peers").
//!
//! Each test starts real waitress or gunicorn processes serving
//! `tests/python/wsgi_app.py`, which records its own peak concurrency. Usher
//! caps every backend at `max_in_flight: 2`; the tests then check from the
//! workers' side that no process ever ran more than 2 requests at once, that
//! every process did work, and that the excess waited in Usher's own queue.
//!
//! waitress and gunicorn must be installed (`python3 -m pip install waitress
//! gunicorn`, see test.sh). A missing one FAILS the test; nothing here skips.
//!
//! Needs `cargo build --workspace --bins` first.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use http::StatusCode;
use usher_e2e::usher::{metric_value, Config, Usher};
use usher_e2e::{blocking, healthz_ok, spawn_python, url, Client, PyServer, Resp};

/// The per-backend cap Usher enforces in every test here.
const CAP: u64 = 2;

/// Directory of the WSGI test app.
fn python_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("python")
}

/// Fails the test (never skips) when a Python module is missing.
fn require_python_module(module: &str) {
    let out = Command::new("python3")
        .args(["-c", &format!("import {module}")])
        .output()
        .unwrap_or_else(|e| panic!("cannot run python3: {e}"));
    assert!(
        out.status.success(),
        "python module `{module}` is missing; install it with \
         `python3 -m pip install waitress gunicorn` (see test.sh):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `python3 -m waitress --threads=N` on a free port.
fn waitress(threads: u32) -> PyServer {
    let mut cmd = Command::new("python3");
    cmd.args(["-m", "waitress", "--listen=127.0.0.1:0"])
        .arg(format!("--threads={threads}"))
        .arg("wsgi_app:app");
    spawn_python(cmd, &python_dir(), "Serving on http://", healthz_ok)
}

/// `gunicorn` with `args` (worker class, threads, workers) on a free port.
fn gunicorn(args: &[&str]) -> PyServer {
    let mut cmd = Command::new("python3");
    cmd.args([
        "-m",
        "gunicorn",
        "--bind",
        "127.0.0.1:0",
        "--no-control-socket",
    ])
    .args(args)
    .args(["--chdir", python_dir().to_str().expect("utf-8 path")])
    .arg("wsgi_app:app");
    spawn_python(cmd, &python_dir(), "Listening at: http://", healthz_ok)
}

/// Usher in front of `backends`, each capped at [`CAP`], with a deep, patient queue.
fn usher_for(backends: &[&PyServer]) -> Usher {
    let addrs: Vec<SocketAddr> = backends.iter().map(|b| b.addr).collect();
    Usher::start_ready(
        &Config::app(
            &addrs,
            &format!(", max_in_flight: {CAP}"),
            "    queue: { max_depth: 1000, timeout: 30s }\n    \
             timeouts: { connect: 2s, response: 30s }",
        )
        .top("access_log: { format: off }")
        .yaml(),
    )
}

/// `/stats` of one backend, asked directly (not through Usher).
fn stats(b: &PyServer) -> serde_json::Value {
    let r = blocking::get(&url(b.addr, "/stats")).expect("GET /stats");
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    r.json()
}

/// Sends `n` GETs for `path` through Usher at once; every result, in order.
async fn burst(usher: &Usher, path: &str, n: usize) -> Vec<anyhow::Result<Resp>> {
    let client = Client::new();
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let (client, u) = (client.clone(), usher.url(path));
            tokio::spawn(async move { client.get(&u).await })
        })
        .collect();
    let mut out = Vec::with_capacity(n);
    for t in tasks {
        out.push(t.await.expect("request task panicked"));
    }
    out
}

/// Panics listing every request that failed or did not answer 200 `want_body`.
fn assert_all_ok(results: &[anyhow::Result<Resp>], want_body: &str) {
    let bad: Vec<String> = results
        .iter()
        .enumerate()
        .filter_map(|(i, r)| match r {
            Ok(r) if r.status == StatusCode::OK && r.text() == want_body => None,
            Ok(r) => Some(format!("#{i}: {} {:?}", r.status, r.text())),
            Err(e) => Some(format!("#{i}: {e:#}")),
        })
        .collect();
    assert!(
        bad.is_empty(),
        "{} of {} requests failed:\n{}",
        bad.len(),
        results.len(),
        bad.join("\n")
    );
}

/// The shared scenario of the waitress and gunicorn-gthread tests: 40
/// concurrent 100 ms requests through Usher onto 4 processes, Usher capping
/// each at 2.
async fn forty_sleeps_on_four_capped_processes(backends: &[PyServer]) {
    const N: usize = 40;
    let usher = usher_for(&backends.iter().collect::<Vec<_>>());
    let capacity = CAP as usize * backends.len();

    let started = Instant::now();
    let results = burst(&usher, "/sleep?ms=100", N).await;
    let elapsed = started.elapsed();
    assert_all_ok(&results, "slept 100\n");
    // 40 requests on 8 slots take at least 5 rounds of 100 ms.
    assert!(
        elapsed >= Duration::from_millis(450),
        "{N} × 100 ms on {capacity} slots finished in {elapsed:?}"
    );

    // Each process's own view: never more than the cap at once, and each did work.
    let mut served = 0;
    for b in backends {
        let s = stats(b);
        let (peak, n) = (s["peak"].as_u64(), s["served"].as_u64());
        assert!(
            peak.is_some_and(|p| (1..=CAP).contains(&p)),
            "backend {} reports peak {peak:?} concurrent requests; \
             Usher promised at most {CAP} and every backend should have been used: {s}",
            b.addr
        );
        served += n.expect("served in /stats");
    }
    assert_eq!(
        served, N as u64,
        "the backends served {served} requests for {N} sent (lost or duplicated requests)"
    );

    // The excess waited in Usher's queue, not in a worker's backlog.
    let m = usher.metrics();
    let labels = [("upstream", "app")];
    let waits = metric_value(&m, "usher_queue_wait_seconds_count", &labels);
    let short = metric_value(
        &m,
        "usher_queue_wait_seconds_bucket",
        &[("upstream", "app"), ("le", "0.05")],
    );
    let sum = metric_value(&m, "usher_queue_wait_seconds_sum", &labels);
    assert_eq!(waits, N as f64, "every request passes the queue once:\n{m}");
    assert!(
        waits - short >= 8.0 && sum >= 1.0,
        "with {N} requests on {capacity} slots, many must wait ≥ 100 ms in Usher's queue; \
         got {} waits over 50 ms and {sum:.3} s in total:\n{m}",
        waits - short
    );
    assert_eq!(
        metric_value(&m, "usher_queue_rejections_total", &labels),
        0.0,
        "{m}"
    );
    assert_eq!(
        metric_value(&m, "usher_queue_depth", &labels),
        0.0,
        "the queue is empty afterwards:\n{m}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn four_waitress_processes_never_see_more_than_two_at_once() {
    require_python_module("waitress");
    let backends: Vec<PyServer> = (0..4).map(|_| waitress(2)).collect();
    forty_sleeps_on_four_capped_processes(&backends).await;
}

/// With 2 threads per process the worker itself caps at 2; here each waitress
/// has 4 threads, so a peak of 3 or 4 would mean Usher broke its own cap.
#[tokio::test(flavor = "multi_thread")]
async fn four_thread_waitress_processes_capped_at_two_never_see_three() {
    require_python_module("waitress");
    let backends: Vec<PyServer> = (0..4).map(|_| waitress(4)).collect();
    forty_sleeps_on_four_capped_processes(&backends).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn four_gunicorn_gthread_processes_never_see_more_than_two_at_once() {
    require_python_module("gunicorn");
    let backends: Vec<PyServer> = (0..4)
        .map(|_| gunicorn(&["-k", "gthread", "--threads", "2", "-w", "1"]))
        .collect();
    forty_sleeps_on_four_capped_processes(&backends).await;
}

/// gunicorn's sync workers answer `Connection: close` and close every
/// connection after one response, so Usher can never reuse a pooled
/// connection. Sequential and concurrent requests must all still succeed.
#[tokio::test(flavor = "multi_thread")]
async fn gunicorn_sync_closing_every_connection_gives_no_errors() {
    require_python_module("gunicorn");
    let backend = gunicorn(&["-k", "sync", "-w", "2"]);
    let usher = usher_for(&[&backend]);

    // Sequential, on one keep-alive client connection to Usher.
    let client = Client::new();
    let mut sequential = Vec::new();
    for _ in 0..20 {
        sequential.push(client.get(&usher.url("/sleep?ms=5")).await);
    }
    assert_all_ok(&sequential, "slept 5\n");

    // Concurrent: 2 at a time in the workers, the rest in Usher's queue.
    let concurrent = burst(&usher, "/sleep?ms=20", 40).await;
    assert_all_ok(&concurrent, "slept 20\n");

    let m = usher.metrics();
    let labels = [("upstream", "app")];
    assert_eq!(
        metric_value(&m, "usher_requests_total", &[("code", "200")]),
        60.0,
        "{m}"
    );
    let errors: f64 = ["502", "503", "504"]
        .iter()
        .map(|c| metric_value(&m, "usher_requests_total", &[("code", c)]))
        .sum();
    assert_eq!(errors, 0.0, "{m}");
    assert_eq!(
        metric_value(&m, "usher_backend_ejections_total", &labels),
        0.0,
        "closed connections are not backend failures:\n{m}"
    );
}
