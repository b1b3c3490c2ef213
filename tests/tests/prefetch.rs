//! End-to-end tests of prefetch (`queue.prefetch`, `auto` by default): a real
//! Usher in front of real `usher-worker`s. While requests wait in Usher, a
//! worker whose next thread is due soon holds one request more than its
//! threads, in its own queue, so a freed thread finds work at once; never one
//! behind threads that all run long requests. Observed at the worker, through
//! its `/healthz` (answered by its front, without a thread). Loopback only;
//! bounded by request counts and deadlines.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::StatusCode;
use usher_e2e::usher::{Config, Usher};
use usher_e2e::{blocking, spawn_worker, wait_until, Client};

/// A standing queue is the point of these tests, and the default overload
/// control would shed it (see `overload.rs`); off, waiters just wait.
const QUEUE: &str = "    queue: { overload: \"off\", timeout: 30s, classify: path_and_query";

fn healthz(addr: SocketAddr) -> serde_json::Value {
    blocking::get(&format!("http://{addr}/healthz"))
        .expect("worker /healthz")
        .json()
}

/// `(busy, queued)` samples of the worker, every 2 ms until `stop`.
fn sample(addr: SocketAddr, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<Vec<(u64, u64)>> {
    std::thread::spawn(move || {
        let mut out = Vec::new();
        while !stop.load(Ordering::Relaxed) && out.len() < 100_000 {
            let h = healthz(addr);
            out.push((h["busy"].as_u64().unwrap(), h["queued"].as_u64().unwrap()));
            std::thread::sleep(Duration::from_millis(2));
        }
        out
    })
}

/// `n` requests for `path` from `clients` closed-loop clients; every one
/// must be a 200.
async fn load(usher: &Usher, path: &str, clients: usize, n: usize) {
    let client = Client::new().with_timeout(Duration::from_secs(30));
    let left = Arc::new(std::sync::atomic::AtomicUsize::new(n));
    let tasks: Vec<_> = (0..clients)
        .map(|_| {
            let (c, url, left) = (client.clone(), usher.url(path), left.clone());
            tokio::spawn(async move {
                while left
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |l| l.checked_sub(1))
                    .is_ok()
                {
                    let r = c.get(&url).await.expect("an answer");
                    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
}

/// Runs `n` requests of 10 ms from 8 clients at a 2-thread worker through an
/// Usher with `prefetch`, and returns the worker's `(busy, queued)` samples
/// taken while the load ran.
async fn short_queue(prefetch: &str, n: usize) -> Vec<(u64, u64)> {
    let (_w, addr) = spawn_worker(["--threads", "2", "--queue", "8"]);
    let usher = Usher::start_ready(
        &Config::app(&[addr], "", &format!("{QUEUE}, prefetch: {prefetch} }}")).yaml(),
    );
    // Learn the view's time first: with no estimate nothing is prefetched.
    load(&usher, "/sleep?ms=10", 1, 3).await;
    let served = healthz(addr)["served"].as_u64().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = sample(addr, stop.clone());
    load(&usher, "/sleep?ms=10", 8, n).await;
    stop.store(true, Ordering::Relaxed);
    let samples = sampler.join().unwrap();
    assert_eq!(
        healthz(addr)["served"].as_u64().unwrap() - served,
        n as u64,
        "the worker ran each request once"
    );
    samples
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn under_a_queue_of_short_requests_the_worker_holds_one_extra_and_never_more() {
    let samples = short_queue("auto", 400).await;
    // Only the samples while both threads worked count (the load's start
    // and end have no queue in Usher).
    let loaded: Vec<_> = samples.iter().filter(|s| s.0 == 2).collect();
    assert!(loaded.len() >= 50, "{} samples under load", loaded.len());
    let over: Vec<_> = samples.iter().filter(|(b, q)| b + q > 3).collect();
    assert!(
        over.is_empty(),
        "beyond 2 threads + 1 extra: {over:?} of {}",
        samples.len()
    );
    // A freed thread finds its next request waiting in the worker: an extra
    // is there in most samples.
    let ready = loaded.iter().filter(|s| s.1 >= 1).count();
    eprintln!(
        "prefetch auto: an extra waiting in {ready} of {} loaded samples ({} in all)",
        loaded.len(),
        samples.len()
    );
    assert!(
        ready * 10 >= loaded.len() * 2,
        "an extra waited in only {ready} of {} loaded samples",
        loaded.len()
    );

    // The same load with a strict cap: never anything waiting in the worker
    // beyond the moment a thread takes its next request.
    let strict = short_queue("0", 400).await;
    let loaded: Vec<_> = strict.iter().filter(|s| s.0 == 2).collect();
    let over: Vec<_> = strict.iter().filter(|(b, q)| b + q > 2).collect();
    assert!(over.is_empty(), "strict cap exceeded: {over:?}");
    let ready = loaded.iter().filter(|s| s.1 >= 1).count();
    eprintln!(
        "prefetch 0: a request waiting in {ready} of {} loaded samples",
        loaded.len()
    );
    assert!(
        ready * 10 <= loaded.len(),
        "with prefetch: 0, {ready} of {} samples had a request waiting",
        loaded.len()
    );
    // And the threads idle less for it (a ratio within this one test, not
    // a time): under the strict cap each one waits a proxy round trip for
    // its next request.
    let idle = |v: &[(u64, u64)]| v.iter().filter(|s| s.0 < 2).count() as f64 / v.len() as f64;
    let (idle_auto, idle_strict) = (idle(&samples), idle(&strict));
    eprintln!("a thread idle in {idle_auto:.3} of samples with auto, {idle_strict:.3} with 0");
    assert!(
        idle_auto < idle_strict * 0.8,
        "idle with prefetch {idle_auto:.3}, without {idle_strict:.3}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_short_request_is_never_sent_behind_threads_that_all_run_long_ones() {
    let (_w, addr) = spawn_worker(["--threads", "2", "--queue", "8"]);
    // An explicit prefetch, so long requests could be extras too (`auto`
    // sends only short ones): what keeps the short one out is the horizon.
    let usher =
        Usher::start_ready(&Config::app(&[addr], "", &format!("{QUEUE}, prefetch: 1 }}")).yaml());
    let client = Client::new().with_timeout(Duration::from_secs(30));
    // Learn both classes (path and query).
    let long = usher.url("/sleep?ms=1500");
    let short = usher.url("/sleep?ms=20");
    let warm: Vec<_> = (0..2)
        .map(|_| {
            let (c, u) = (client.clone(), long.clone());
            tokio::spawn(async move { c.get(&u).await.unwrap().status })
        })
        .collect();
    for t in warm {
        assert_eq!(t.await.unwrap(), StatusCode::OK);
    }
    for _ in 0..3 {
        assert_eq!(client.get(&short).await.unwrap().status, StatusCode::OK);
    }

    // Both threads on long requests, then a short one.
    let longs: Vec<_> = (0..2)
        .map(|_| {
            let (c, u) = (client.clone(), long.clone());
            tokio::spawn(async move { c.get(&u).await.unwrap().status })
        })
        .collect();
    assert!(
        wait_until(Duration::from_secs(5), || healthz(addr)["busy"] == 2),
        "both threads took the long requests"
    );
    let longs_started = Instant::now();
    let sent = Instant::now();
    let short_req = {
        let (c, u) = (client.clone(), short.clone());
        tokio::spawn(async move {
            let r = c.get(&u).await.unwrap();
            (r.status, sent.elapsed())
        })
    };
    // While they run (well before either is due), the short one waits in
    // Usher, not in the worker.
    let mut samples = Vec::new();
    while longs_started.elapsed() < Duration::from_millis(1200) {
        let h = healthz(addr);
        samples.push((h["busy"].as_u64().unwrap(), h["queued"].as_u64().unwrap()));
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(samples.len() >= 20, "{samples:?}");
    assert!(
        samples.iter().all(|&(b, q)| b == 2 && q == 0),
        "the worker queued the short request behind two long ones: {samples:?}"
    );
    assert_eq!(
        usher.metric("usher_queue_depth", &[("upstream", "app")]),
        1.0,
        "the short request waits in Usher"
    );
    // It goes out when the first thread frees (or just before).
    let (status, took) = short_req.await.unwrap();
    eprintln!(
        "short request behind two long ones: {} samples, answered after {took:?}",
        samples.len()
    );
    assert_eq!(status, StatusCode::OK);
    assert!(took >= Duration::from_millis(1000), "short took {took:?}");
    for t in longs {
        assert_eq!(t.await.unwrap(), StatusCode::OK);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_that_refuses_when_busy_gets_no_extras_and_no_client_sees_a_refusal() {
    // `--queue 0`: a request that finds no free thread is answered 503 +
    // `X-Usher-Refused: busy` at once. The first extra is refused (and
    // requeued at the head); then that worker gets none for 10 s.
    let (_w, addr) = spawn_worker(["--threads", "2", "--queue", "0"]);
    let usher = Usher::start_ready(
        &Config::app(&[addr], "", &format!("{QUEUE}, prefetch: auto }}")).yaml(),
    );
    load(&usher, "/sleep?ms=20", 1, 3).await;
    let served = healthz(addr)["served"].as_u64().unwrap();
    load(&usher, "/sleep?ms=20", 8, 150).await;
    let h = healthz(addr);
    assert_eq!(h["served"].as_u64().unwrap() - served, 150);
    let refused = h["refused"].as_u64().unwrap();
    eprintln!("--queue 0 worker: {refused} refusals in 150 requests");
    assert!(refused <= 3, "{refused} refusals in a ~2 s run");
}
