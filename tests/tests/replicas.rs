//! Several Usher replicas in front of one fleet (`proxy_replicas`): together
//! they never put more requests on a worker than it has threads, and a busy
//! replica uses the threads the quiet ones leave.
//!
//! Every replica is a real `usher` process with its own identity
//! (`USHER_REPLICA_ID=usher-N`, as a StatefulSet pod would have), every
//! worker a real server on loopback.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use usher_e2e::usher::{Config, Usher};
use usher_e2e::{spawn_worker, url, Client};

/// A backend that reports nothing about its load (no `X-Usher-Load`) and
/// counts how many requests it holds at once.
struct Counting {
    addr: SocketAddr,
    now: Arc<AtomicUsize>,
    peak: Arc<AtomicUsize>,
}

async fn counting_backend(hold: Duration) -> Counting {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (now, peak) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (n, p) = (now.clone(), peak.clone());
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let (n, p) = (n.clone(), p.clone());
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |_req: Request<Incoming>| {
                    let (n, p) = (n.clone(), p.clone());
                    async move {
                        let held = n.fetch_add(1, Ordering::SeqCst) + 1;
                        p.fetch_max(held, Ordering::SeqCst);
                        tokio::time::sleep(hold).await;
                        n.fetch_sub(1, Ordering::SeqCst);
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Counting { addr, now, peak }
}

/// The upstream's keys beyond the backends. `overload: off`: these tests
/// keep more clients waiting than there are threads on purpose, a standing
/// queue the default overload control would shed (see `overload.rs`).
const SHARED: &str = "    proxy_replicas: 3\n    queue: { overload: \"off\" }";

/// `count` replicas of `yaml`, named `usher-0` … as a StatefulSet names them.
fn replicas(yaml: &str, count: usize) -> Vec<Usher> {
    (0..count)
        .map(|i| {
            let id = format!("usher-{i}");
            let u = Usher::start_with_env(yaml, &[("USHER_REPLICA_ID", id.as_str())]);
            u.wait_ready();
            u
        })
        .collect()
}

/// `clients` loops on `usher`, each sending `path` until `stop` is set (or
/// `max` requests); returns the statuses seen.
fn load(
    u: &Usher,
    path: &str,
    clients: usize,
    max: usize,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<Vec<StatusCode>> {
    let target = u.url(path);
    tokio::spawn(async move {
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..clients {
            let (target, stop) = (target.clone(), stop.clone());
            tasks.spawn(async move {
                let client = Client::new();
                let mut seen = Vec::new();
                while !stop.load(Ordering::SeqCst) && seen.len() < max {
                    let status = match client.get(&target).await {
                        Ok(r) => r.status,
                        Err(_) => StatusCode::from_u16(599).unwrap(),
                    };
                    seen.push(status);
                }
                seen
            });
        }
        tasks.join_all().await.concat()
    })
}

/// This replica's in-flight requests over all backends, from `/status`.
async fn in_flight(client: &Client, u: &Usher) -> u64 {
    let Ok(r) = client.get(&u.admin_url("/status")).await else {
        return 0;
    };
    r.json()["upstreams"]["app"]["backends"]
        .as_array()
        .map_or(0, |bs| {
            bs.iter().filter_map(|b| b["in_flight"].as_u64()).sum()
        })
}

/// With `max_in_flight: 4` and no load reports, three replicas split the
/// worker's 4 threads 2/1/1 — never `ceil(4/3) = 2` each, which put 6
/// requests on a 4-thread worker.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_static_split_never_over_fills_a_worker_that_reports_nothing() {
    let backend = counting_backend(Duration::from_millis(80)).await;
    let yaml = Config::app(&[backend.addr], ", max_in_flight: 4", SHARED).yaml();
    let ushers = tokio::task::spawn_blocking(move || replicas(&yaml, 3))
        .await
        .unwrap();

    let client = Client::new();
    let mut capacities = Vec::new();
    for u in &ushers {
        let status = client.get(&u.admin_url("/status")).await.unwrap().json();
        let b = &status["upstreams"]["app"]["backends"][0];
        assert_eq!(b["share"]["by"], "static", "{b}");
        assert_eq!(b["share"]["replicas"], 3, "{b}");
        capacities.push(b["capacity"].as_u64().unwrap());
    }
    capacities.sort();
    assert_eq!(capacities, vec![1, 1, 2], "shares of 4 threads");

    // Every replica has more clients than its share: all three push at once.
    let stop = Arc::new(AtomicBool::new(false));
    let loads: Vec<_> = ushers
        .iter()
        .map(|u| load(u, "/", 4, 6, stop.clone()))
        .collect();
    let mut statuses = Vec::new();
    for l in loads {
        statuses.extend(l.await.unwrap());
    }
    assert_eq!(statuses.len(), 3 * 4 * 6);
    assert!(
        statuses.iter().all(|s| *s == StatusCode::OK),
        "{statuses:?}"
    );
    let peak = backend.peak.load(Ordering::SeqCst);
    assert!(
        peak <= 4,
        "the worker held {peak} requests at once, more than its 4 threads"
    );
    assert_eq!(peak, 4, "the replicas together used every thread");
    assert_eq!(backend.now.load(Ordering::SeqCst), 0);
}

/// Two `usher-worker --threads 4 --queue 0` (a worker that refuses at once
/// when no thread is free) behind three replicas, traffic 8/1/1 clients: the
/// busy replica holds more than any static share would give it, the quiet
/// ones are served, and no client ever sees the workers' refusals.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_busy_replica_borrows_the_idle_threads_and_refusals_stay_invisible() {
    let (_w1, a1) = spawn_worker(["--threads", "4", "--queue", "0"]);
    let (_w2, a2) = spawn_worker(["--threads", "4", "--queue", "0"]);
    let yaml = Config::app(&[a1, a2], "", SHARED).yaml();
    let ushers = tokio::task::spawn_blocking(move || replicas(&yaml, 3))
        .await
        .unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let path = "/sleep?ms=100";
    let busy = load(&ushers[0], path, 8, 12, stop.clone());
    let quiet: Vec<_> = ushers[1..]
        .iter()
        .map(|u| load(u, path, 1, 200, stop.clone()))
        .collect();

    // While the busy replica's clients run, sample how much it holds.
    let client = Client::new();
    let mut most = 0;
    while !busy.is_finished() {
        most = most.max(in_flight(&client, &ushers[0]).await);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stop.store(true, Ordering::SeqCst);
    let busy = busy.await.unwrap();
    let mut quiet_statuses = Vec::new();
    for q in quiet {
        quiet_statuses.extend(q.await.unwrap());
    }

    assert_eq!(busy.len(), 8 * 12);
    assert!(
        busy.iter().all(|s| *s == StatusCode::OK),
        "busy replica: {busy:?}"
    );
    assert!(
        quiet_statuses.iter().all(|s| *s == StatusCode::OK),
        "quiet replicas: {quiet_statuses:?}"
    );
    assert!(
        quiet_statuses.len() >= 4,
        "the quiet replicas were served while the busy one ran: {} requests",
        quiet_statuses.len()
    );
    // Its static split is at most 2 of each worker's 4 threads.
    assert!(
        most >= 5,
        "the busy replica held at most {most} requests: it did not use the threads the quiet replicas left"
    );
    for a in [a1, a2] {
        let h = Client::new().get(&url(a, "/healthz")).await.unwrap().json();
        assert!(h["peak_busy"].as_u64().unwrap() <= 4, "{h}");
    }
}
