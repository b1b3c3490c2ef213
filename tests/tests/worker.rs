//! End-to-end tests of the `usher-worker` binary: a real process on a loopback port.
//!
//! Needs `cargo build --workspace --bins` first (see `usher_e2e::bin_path`).

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use http::{Method, StatusCode};
use usher_e2e::{get, spawn_worker, url, wait_until_async, Client, Proc, Resp};

/// A handler run as reported by `/sleep` and `/cpu`: µs since the UNIX epoch.
#[derive(Debug, Clone)]
struct Run {
    start: u64,
    end: u64,
    thread: String,
}

fn run_of(resp: &Resp) -> Run {
    assert_eq!(resp.status, StatusCode::OK, "{}", resp.text());
    let v = resp.json();
    Run {
        start: v["start_us"].as_u64().expect("start_us"),
        end: v["end_us"].as_u64().expect("end_us"),
        thread: v["thread"].as_str().expect("thread").to_owned(),
    }
}

/// The largest number of runs in progress at one instant.
fn max_overlap(runs: &[Run]) -> usize {
    runs.iter()
        .map(|r| {
            runs.iter()
                .filter(|o| o.start <= r.start && r.start < o.end)
                .count()
        })
        .max()
        .unwrap_or(0)
}

/// Sends `n` requests for `path` at once and returns the results in order.
async fn concurrently(addr: SocketAddr, path: &str, n: usize) -> Vec<anyhow::Result<Resp>> {
    let client = Client::new();
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let (client, u) = (client.clone(), url(addr, path));
            tokio::spawn(async move { client.get(&u).await })
        })
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.expect("request task panicked"));
    }
    out
}

async fn healthz(addr: SocketAddr) -> serde_json::Value {
    let resp = get(&url(addr, "/healthz")).await.expect("GET /healthz");
    assert_eq!(resp.status, StatusCode::OK);
    resp.json()
}

#[tokio::test(flavor = "multi_thread")]
async fn eight_sleeps_on_four_threads_never_run_more_than_four_at_once() {
    let (_worker, addr) = spawn_worker(["--threads", "4"]);
    let started = Instant::now();
    let results = concurrently(addr, "/sleep?ms=300", 8).await;
    let elapsed = started.elapsed();

    let runs: Vec<Run> = results
        .iter()
        .map(|r| run_of(r.as_ref().unwrap()))
        .collect();
    let threads: HashSet<_> = runs.iter().map(|r| r.thread.as_str()).collect();
    assert_eq!(threads.len(), 4, "{threads:?}");
    assert!(
        threads.iter().all(|t| t.starts_with("usher-worker-")),
        "{threads:?}"
    );
    assert!(max_overlap(&runs) <= 4, "{runs:?}");
    // Two waves of four: a user sees at least 2 × 300 ms.
    assert!(elapsed >= Duration::from_millis(600), "{elapsed:?}");

    let h = healthz(addr).await;
    assert_eq!(h["threads"], 4, "{h}");
    assert_eq!(h["peak_busy"], 4, "{h}");
    assert_eq!(h["served"], 8, "{h}");
    assert_eq!(
        (h["busy"].as_u64(), h["queued"].as_u64()),
        (Some(0), Some(0)),
        "{h}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn full_queue_answers_503_fast_and_healthz_stays_up() {
    let (_worker, addr) = spawn_worker(["--threads", "2", "--queue", "2"]);
    let flood = tokio::spawn(concurrently(addr, "/sleep?ms=1500", 10));

    // While both threads are busy and the queue is full, /healthz still answers
    // promptly: the front answers it without the pool.
    let deadline = Instant::now() + Duration::from_secs(10);
    let latency = loop {
        assert!(
            Instant::now() < deadline,
            "never saw busy=2 queued=2 during the flood"
        );
        let asked = Instant::now();
        let h = healthz(addr).await;
        if h["busy"] == 2 && h["queued"] == 2 {
            break asked.elapsed();
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert!(
        latency < Duration::from_secs(1),
        "/healthz took {latency:?}"
    );

    let results = tokio::time::timeout(Duration::from_secs(30), flood)
        .await
        .expect("no request may hang")
        .unwrap();
    let (mut ok, mut busy) = (0, 0);
    for r in &results {
        let r = r.as_ref().expect("every request gets an answer");
        match r.status {
            StatusCode::OK => ok += 1,
            StatusCode::SERVICE_UNAVAILABLE => {
                busy += 1;
                assert_eq!(r.header("retry-after"), Some("1"));
                assert!(r.header("x-usher-load").unwrap().starts_with("threads=2,"));
                assert!(r.text().contains("busy"), "{}", r.text());
            }
            other => panic!("unexpected {other}: {}", r.text()),
        }
    }
    assert!(busy >= 1, "no 503 among {ok} successes");
    assert!(ok >= 4, "threads + queue = 4 should succeed, got {ok}");
}

async fn cpu_runs(gil: bool) -> Vec<Run> {
    let mut args = vec!["--threads", "4"];
    if gil {
        args.push("--gil");
    }
    let (_worker, addr) = spawn_worker(args);
    let mut runs: Vec<Run> = concurrently(addr, "/cpu?ms=250", 4)
        .await
        .iter()
        .map(|r| run_of(r.as_ref().unwrap()))
        .collect();
    runs.sort_by_key(|r| r.start);
    runs
}

#[tokio::test(flavor = "multi_thread")]
async fn gil_time_slices_cpu_bound_requests() {
    // Four 250 ms CPU runs under one GIL: no two run in parallel, so they
    // take at least their sum from the first start to the last end, and
    // they take turns (CPython's switch interval) instead of queuing one
    // behind the other, so they overlap in wall time.
    let runs = cpu_runs(true).await;
    const TOLERANCE_US: u64 = 20_000;
    let span = runs.iter().map(|r| r.end).max().unwrap() - runs[0].start;
    assert!(
        span + TOLERANCE_US >= 4 * 250_000,
        "CPU runs ran in parallel under --gil: {runs:?}"
    );
    assert!(
        max_overlap(&runs) >= 2,
        "CPU runs queued one behind the other instead of time-slicing: {runs:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn without_gil_cpu_bound_requests_overlap() {
    let runs = cpu_runs(false).await;
    assert!(
        max_overlap(&runs) >= 2,
        "no two CPU runs overlapped: {runs:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_requests_get_clear_4xx_answers() {
    let (_worker, addr) = spawn_worker(["--max-body", "1KiB"]);
    let client = Client::new();
    for q in ["ms=abc", "ms=-5", "ms=60001", ""] {
        let resp = client
            .get(&url(addr, &format!("/sleep?{q}")))
            .await
            .unwrap();
        assert_eq!(resp.status, StatusCode::BAD_REQUEST, "{q}");
        assert!(resp.text().contains("ms"), "{q}: {}", resp.text());
    }
    let resp = client.get(&url(addr, "/nope")).await.unwrap();
    assert_eq!(resp.status, StatusCode::NOT_FOUND);
    assert!(resp.header("x-usher-load").is_some());
    assert_eq!(
        resp.header("x-usher-worker"),
        Some(addr.to_string().as_str())
    );

    let big = client
        .request(Method::POST, &url(addr, "/echo"), vec![b'x'; 2048])
        .await
        .unwrap();
    assert_eq!(big.status, StatusCode::PAYLOAD_TOO_LARGE, "{}", big.text());
    assert!(big.header("x-usher-load").is_some());
    let echo = client
        .request(Method::POST, &url(addr, "/echo"), "hello usher")
        .await
        .unwrap();
    assert_eq!(
        (echo.status, echo.text().as_str()),
        (StatusCode::OK, "hello usher")
    );

    let teapot = client.get(&url(addr, "/status/418")).await.unwrap();
    assert_eq!(teapot.status, StatusCode::IM_A_TEAPOT);
    let bad = client.get(&url(addr, "/status/99")).await.unwrap();
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_finishes_in_flight_requests_then_exits_0() {
    let (mut worker, addr) = spawn_worker(["--threads", "2"]);
    let work = tokio::spawn(concurrently(addr, "/sleep?ms=1500", 3));
    let all_in = wait_until_async(Duration::from_secs(10), || async move {
        let h = healthz(addr).await;
        h["busy"] == 2 && h["queued"] == 1
    })
    .await;
    assert!(all_in, "the three requests never reached the worker");

    worker.term();
    for r in work.await.unwrap() {
        let r = r.expect("in-flight request answered during drain");
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    }
    let status = tokio::task::block_in_place(|| worker.wait_exit(Duration::from_secs(30)))
        .expect("worker exited after draining");
    assert_eq!(status.code(), Some(0), "{}", worker.output());
    assert!(worker.output().contains("drained"), "{}", worker.output());
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_expose_the_worker_metrics() {
    let (_worker, addr) = spawn_worker(["--threads", "3"]);
    assert_eq!(
        get(&url(addr, "/sleep?ms=0")).await.unwrap().status,
        StatusCode::OK
    );
    let resp = get(&url(addr, "/metrics")).await.unwrap();
    assert_eq!(resp.status, StatusCode::OK);
    let text = resp.text();
    for needle in [
        "usher_worker_threads 3",
        "usher_worker_busy_threads ",
        "usher_worker_queue_depth ",
        "usher_worker_requests_total{code=\"200\"}",
        "process_resident_memory_bytes",
    ] {
        assert!(text.contains(needle), "{needle} missing from:\n{text}");
    }
}

#[test]
fn help_explains_every_flag_with_its_default() {
    let out = std::process::Command::new(usher_e2e::bin_path("usher-worker"))
        .arg("--help")
        .output()
        .unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for needle in [
        "--listen",
        "--threads",
        "[default: 4]",
        "--queue",
        "[default: 64]",
        "--gil",
        "--max-body",
        "[default: 10MiB]",
        "--grace",
        "[default: 30s]",
    ] {
        assert!(help.contains(needle), "{needle} missing from:\n{help}");
    }
    // A bad flag value is refused with a usage error, not a crash.
    let mut bad = Proc::spawn_bin("usher-worker", ["--grace", "soon"]);
    let status = bad.wait_exit(Duration::from_secs(10)).unwrap();
    assert_eq!(status.code(), Some(2));
    assert!(bad.output().contains("--grace"), "{}", bad.output());
}
