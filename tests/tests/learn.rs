//! Learned concurrency (`proxy/src/dispatch/learn.rs`): in front of a real
//! `usher-worker --threads 4 --gil`, CPU-bound views bring a backend's learned
//! capacity down (its 4 threads share one GIL), and I/O-bound views bring it
//! back up to the threads. What is asserted is what an operator sees:
//! `/status` and `/metrics`.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::StatusCode;
use usher_e2e::usher::{Config, Usher};
use usher_e2e::{spawn_worker, Client};

/// Clients that each keep one request going: twice the threads, so requests
/// queue in Usher whatever the cap.
const CLIENTS: usize = 8;

/// Keeps `CLIENTS` requests to `path` going until dropped.
struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(url: String) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let tasks = (0..CLIENTS)
            .map(|_| {
                let (stop, ok, url) = (stop.clone(), ok.clone(), url.clone());
                tokio::spawn(async move {
                    let client = Client::new();
                    // Bounded: the test's deadlines end it long before this.
                    for _ in 0..100_000 {
                        if stop.load(Ordering::Relaxed) {
                            return;
                        }
                        let r = client.get(&url).await.expect("request");
                        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                })
            })
            .collect();
        Load { stop, ok, tasks }
    }

    async fn stop(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.await.unwrap();
        }
        self.ok.load(Ordering::Relaxed)
    }
}

/// The backend's learned capacity and why, from `/status`.
async fn learned(client: &Client, status_url: &str) -> (u64, String) {
    let status = client.get(status_url).await.expect("GET /status").json();
    let b = &status["upstreams"]["app"]["backends"][0];
    (
        b["learned_capacity"].as_u64().expect("learned_capacity"),
        b["learned"].as_str().expect("learned").to_string(),
    )
}

/// Polls `/status` every 50 ms until `cond` holds on the learned capacity
/// and why, or `timeout` passes; returns the last reading and when it held.
async fn wait_learned(
    client: &Client,
    status_url: &str,
    timeout: Duration,
    cond: impl Fn(u64, &str) -> bool,
) -> ((u64, String), Option<Duration>) {
    let start = Instant::now();
    loop {
        let seen = learned(client, status_url).await;
        if cond(seen.0, &seen.1) {
            return (seen, Some(start.elapsed()));
        }
        if start.elapsed() > timeout {
            return (seen, None);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn start_usher(worker: SocketAddr) -> Usher {
    // Overload control off: 8 clients on a learned cap of 1 queue on
    // purpose, and on a busy test machine their waits may pass the CoDel
    // target; a shed request would only make the load lighter, not wrong.
    let yaml = Config::app(&[worker], "", "    queue: { overload: \"off\" }").yaml();
    Usher::start_ready(&yaml)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_gil_bound_backend_learns_one_and_an_io_bound_one_its_threads() {
    let (_worker, addr) = spawn_worker(["--threads", "4", "--gil"]);
    let usher = tokio::task::spawn_blocking(move || start_usher(addr))
        .await
        .unwrap();
    let client = Client::new();
    let status_url = usher.admin_url("/status");

    // Nothing learned without evidence: capacity is the threads.
    let (cap, why) = learned(&client, &status_url).await;
    assert_eq!((cap, why.as_str()), (4, "learning"));
    let r = client.get(&usher.url("/cpu?ms=5")).await.unwrap();
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(learned(&client, &status_url).await.0, 4);

    // CPU-bound views: 4 in flight take 4 times as long as 1. A measuring
    // window (capacity 1 for a moment) does not count: the verdict must.
    let cpu = Load::start(usher.url("/cpu?ms=5"));
    let (seen, took) = wait_learned(&client, &status_url, Duration::from_secs(20), |c, why| {
        c <= 2 && ["cpu-bound", "contended"].contains(&why)
    })
    .await;
    let served = cpu.stop().await;
    eprintln!("cpu-bound: learned {seen:?} after {took:?}, {served} served");
    let took = took
        .unwrap_or_else(|| panic!("learned capacity still {seen:?} after 20 s of CPU-bound load"));
    assert!(took < Duration::from_secs(20));
    // The gauge says the same.
    let metric = move |usher: &Usher| {
        usher.metric(
            "usher_backend_learned_capacity",
            &[("upstream", "app"), ("backend", &addr.to_string())],
        )
    };
    let usher = Arc::new(usher);
    let u = usher.clone();
    let gauge = tokio::task::spawn_blocking(move || metric(&u))
        .await
        .unwrap();
    assert!(gauge <= 2.0, "gauge {gauge} while /status said {seen:?}");
    // Idle, nothing moves: the verdict stands until new evidence.
    let (cap, why) = learned(&client, &status_url).await;
    assert!(cap <= 2, "{cap} {why}");

    // I/O-bound views (sleeps, the GIL released): probes find that every
    // thread helps again.
    let io = Load::start(usher.url("/sleep?ms=20"));
    let (seen, took) = wait_learned(&client, &status_url, Duration::from_secs(30), |c, why| {
        c == 4 && why == "scales"
    })
    .await;
    let served = io.stop().await;
    eprintln!("io-bound: learned {seen:?} after {took:?}, {served} served");
    assert!(
        took.is_some(),
        "learned capacity still {seen:?} after 30 s of I/O-bound load"
    );
    let u = usher.clone();
    let gauge = tokio::task::spawn_blocking(move || metric(&u))
        .await
        .unwrap();
    assert_eq!(gauge, 4.0);
    for line in usher.proc.output().lines() {
        if line.contains("learned capacity") {
            eprintln!("{line}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn learning_off_keeps_the_threads() {
    let (_worker, addr) = spawn_worker(["--threads", "4", "--gil"]);
    let yaml = Config::app(
        &[addr],
        "",
        "    learn_concurrency: false\n    queue: { overload: \"off\" }",
    )
    .yaml();
    let usher = tokio::task::spawn_blocking(move || Usher::start_ready(&yaml))
        .await
        .unwrap();
    let client = Client::new();
    let status_url = usher.admin_url("/status");
    let cpu = Load::start(usher.url("/cpu?ms=5"));
    // Long enough for the learner to have moved (it takes well under a
    // second above): counted in served requests, not in time.
    let start = Instant::now();
    while cpu.ok.load(Ordering::Relaxed) < 400 && start.elapsed() < Duration::from_secs(30) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let seen = learned(&client, &status_url).await;
    let served = cpu.stop().await;
    assert!(served >= 400, "{served} served");
    assert_eq!((seen.0, seen.1.as_str()), (4, "off"));
}
