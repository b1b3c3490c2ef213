//! Resilience end to end (issue 4, "Must show"), with the real `usher` and
//! `usher-worker` binaries and, where a misbehaving backend is needed, tiny
//! raw-TCP backends written here:
//!
//! 1. a worker SIGKILLed under load costs no failed GET, is marked `down`
//!    within `fall × interval`, and comes back (and gets traffic) once a new
//!    worker listens on its port;
//! 2. a POST whose connection dies after it was written is not retried (502,
//!    seen once by the backends), a GET in the same spot is; a POST refused at
//!    connect is retried on a live worker;
//! 3. a backend answering 503 is ejected after `consecutive_failures`, gets
//!    nothing while ejected, is readmitted, and its second ejection lasts
//!    longer than the first;
//! 4. 20 reloads under load (file poll and SIGHUP) lose no request and are
//!    counted; a broken file keeps the old config and `usher check` names the
//!    line;
//! 5. draining a backend lets its in-flight request finish and sends it
//!    nothing new; undrain restores it;
//! 6. with every backend down, a request gets a fast, clear 503.
//!
//! The tests take a file-wide lock so that they run one at a time: they
//! measure timings, and the machine is small.
//!
//! Needs `cargo build --workspace --bins` first.

use std::ffi::OsStr;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::{Method, StatusCode};
use nix::sys::signal::Signal;
use usher_e2e::usher::{check_rejects, concrete, Config, Usher};
use usher_e2e::{blocking, free_port, replace_file, spawn_worker, wait_for_port, Client, Proc};

/// One test at a time (see the module doc).
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

// ---------------------------------------------------------------------------
// Config

/// A config with one upstream `app` over `addrs`. `LISTEN`/`ADMIN` are left
/// for [`Usher::start`] (or [`concrete`]) to fill in.
fn config(addrs: &[SocketAddr], upstream_extra: &str) -> String {
    Config::app(addrs, "", upstream_extra)
        .top("access_log: { format: off }")
        .yaml()
}

// ---------------------------------------------------------------------------
// Admin view

fn backend_json(usher: &Usher, addr: SocketAddr) -> Option<serde_json::Value> {
    let status = usher.status();
    status["upstreams"]["app"]["backends"]
        .as_array()?
        .iter()
        .find(|b| b["address"] == addr.to_string())
        .cloned()
}

/// The backend's `state` in `/status` ("up", "down", "ejected", "draining"),
/// or "absent".
fn state_of(usher: &Usher, addr: SocketAddr) -> String {
    backend_json(usher, addr)
        .and_then(|b| b["state"].as_str().map(String::from))
        .unwrap_or_else(|| "absent".into())
}

fn backend_count(usher: &Usher) -> usize {
    usher.status()["upstreams"]["app"]["backends"]
        .as_array()
        .map_or(0, Vec::len)
}

fn backend_up(usher: &Usher, addr: SocketAddr) -> f64 {
    let a = addr.to_string();
    usher.metric(
        "usher_backend_up",
        &[("upstream", "app"), ("backend", a.as_str())],
    )
}

fn reloads(usher: &Usher, result: &str) -> f64 {
    usher.metric("usher_config_reloads_total", &[("result", result)])
}

/// Polls a plain (non-async) `cond` without blocking the runtime between
/// polls, until it holds or `timeout` passes. Returns whether it held.
async fn poll_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    usher_e2e::wait_until_async(timeout, || std::future::ready(cond())).await
}

fn healthz(addr: SocketAddr) -> serde_json::Value {
    blocking::get(&format!("http://{addr}/healthz"))
        .expect("worker /healthz")
        .json()
}

// ---------------------------------------------------------------------------
// Load

/// One request of a [`Load`].
#[derive(Debug, Clone)]
struct Outcome {
    /// When the answer (or the error) came.
    at: Instant,
    status: Option<StatusCode>,
    worker: Option<String>,
    error: Option<String>,
}

impl Outcome {
    fn describe(&self) -> String {
        match (&self.status, &self.error) {
            (Some(s), _) => format!("{s} from {:?}", self.worker),
            (None, Some(e)) => format!("error: {e}"),
            (None, None) => "nothing".into(),
        }
    }
}

/// Steady, bounded GET load: `tasks` tasks, each sending one request per
/// `pace` (waiting for its answer first), until stopped or `max_duration`.
struct Load {
    stop: Arc<AtomicBool>,
    outcomes: Arc<Mutex<Vec<Outcome>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(url: String, tasks: usize, pace: Duration, max_duration: Duration) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let outcomes = Arc::new(Mutex::new(Vec::new()));
        let client = Client::new().with_timeout(Duration::from_secs(20));
        let max_count = (max_duration.as_millis() / pace.as_millis().max(1)) as usize + 1;
        let handles = (0..tasks)
            .map(|i| {
                let (stop, outcomes, client, url) =
                    (stop.clone(), outcomes.clone(), client.clone(), url.clone());
                tokio::spawn(async move {
                    let deadline = Instant::now() + max_duration;
                    // Spread the tasks' ticks over one pace.
                    tokio::time::sleep(pace.mul_f64(i as f64 / tasks as f64)).await;
                    let mut tick = tokio::time::interval(pace);
                    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    for _ in 0..max_count {
                        tick.tick().await;
                        if stop.load(Ordering::Relaxed) || Instant::now() >= deadline {
                            break;
                        }
                        let r = client.get(&url).await;
                        let o = match r {
                            Ok(r) => Outcome {
                                at: Instant::now(),
                                status: Some(r.status),
                                worker: r.header("x-usher-worker").map(String::from),
                                error: (r.status != StatusCode::OK).then(|| r.text()),
                            },
                            Err(e) => Outcome {
                                at: Instant::now(),
                                status: None,
                                worker: None,
                                error: Some(format!("{e:#}")),
                            },
                        };
                        outcomes.lock().unwrap().push(o);
                    }
                })
            })
            .collect();
        Load {
            stop,
            outcomes,
            tasks: handles,
        }
    }

    fn snapshot(&self) -> Vec<Outcome> {
        self.outcomes.lock().unwrap().clone()
    }

    /// Answers served by `worker` that came after `since`.
    fn served_by_since(&self, worker: SocketAddr, since: Instant) -> usize {
        let w = worker.to_string();
        self.outcomes
            .lock()
            .unwrap()
            .iter()
            .filter(|o| o.at > since && o.worker.as_deref() == Some(w.as_str()))
            .count()
    }

    async fn finish(self) -> Vec<Outcome> {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.await.expect("load task");
        }
        let out = self.outcomes.lock().unwrap().clone();
        out
    }
}

/// The outcomes that are not a 200, described.
fn failures(outcomes: &[Outcome]) -> Vec<String> {
    outcomes
        .iter()
        .filter(|o| o.status != Some(StatusCode::OK))
        .map(Outcome::describe)
        .collect()
}

fn served_by(outcomes: &[Outcome], worker: SocketAddr) -> usize {
    let w = worker.to_string();
    outcomes
        .iter()
        .filter(|o| o.worker.as_deref() == Some(w.as_str()))
        .count()
}

// ---------------------------------------------------------------------------
// Raw test backends

/// What a [`RawBackend`] does with each request after reading it whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Behaviour {
    /// Closes the connection without answering.
    CloseWithoutAnswer,
    /// Answers `503 Service Unavailable` and keeps the connection open.
    Answer503,
}

/// One request a [`RawBackend`] received.
#[derive(Debug, Clone)]
struct Hit {
    at: Instant,
    method: String,
    path: String,
}

/// A minimal HTTP/1.1 backend on a std `TcpListener`, recording every request
/// it reads. Stops accepting when dropped.
struct RawBackend {
    addr: SocketAddr,
    hits: Arc<Mutex<Vec<Hit>>>,
    stop: Arc<AtomicBool>,
    accept: Option<std::thread::JoinHandle<()>>,
}

impl RawBackend {
    fn start(behaviour: Behaviour) -> RawBackend {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind raw backend");
        listener.set_nonblocking(true).expect("nonblocking accept");
        let addr = listener.local_addr().unwrap();
        let hits = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (h, s) = (hits.clone(), stop.clone());
        let accept = std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(300);
            while !s.load(Ordering::Relaxed) && Instant::now() < deadline {
                match listener.accept() {
                    Ok((stream, _)) => {
                        let h = h.clone();
                        std::thread::spawn(move || serve_raw(stream, behaviour, &h));
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        RawBackend {
            addr,
            hits,
            stop,
            accept: Some(accept),
        }
    }

    /// Requests received, other than Usher's `/healthz` probes.
    fn hits(&self) -> Vec<Hit> {
        self.hits
            .lock()
            .unwrap()
            .iter()
            .filter(|h| h.path != "/healthz")
            .cloned()
            .collect()
    }

    fn count(&self, method: &str, path: &str) -> usize {
        self.hits()
            .iter()
            .filter(|h| h.method == method && h.path == path)
            .count()
    }
}

impl Drop for RawBackend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
    }
}

/// Serves one connection: reads requests (head and `Content-Length` body),
/// records them, and answers or closes as `behaviour` says.
fn serve_raw(mut stream: TcpStream, behaviour: Behaviour, hits: &Mutex<Vec<Hit>>) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
    let _ = stream.set_write_timeout(Some(Duration::from_secs(10)));
    let mut buf: Vec<u8> = Vec::new();
    let mut chunk = [0u8; 4096];
    for _ in 0..100_000 {
        // The head.
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            if buf.len() > 64 * 1024 {
                return;
            }
            match stream.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
        let mut words = head.split_whitespace();
        let method = words.next().unwrap_or_default().to_string();
        let path = words.next().unwrap_or_default().to_string();
        let body_len: usize = head
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.trim()
                    .eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse().ok())
                    .flatten()
            })
            .unwrap_or(0);
        // The body.
        while buf.len() < head_end + body_len {
            match stream.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        buf.drain(..head_end + body_len);
        hits.lock().unwrap().push(Hit {
            at: Instant::now(),
            method,
            path,
        });
        match behaviour {
            Behaviour::CloseWithoutAnswer => return,
            Behaviour::Answer503 => {
                let resp = b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\n\
                             Content-Length: 12\r\n\r\nunavailable\n";
                if stream.write_all(resp).is_err() {
                    return;
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------
// 1. Crash under load

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_killed_under_load_costs_no_request_and_comes_back() {
    let _serial = SERIAL.lock().await;
    let mut workers: Vec<(Proc, SocketAddr)> =
        (0..4).map(|_| spawn_worker(["--threads", "4"])).collect();
    let addrs: Vec<SocketAddr> = workers.iter().map(|w| w.1).collect();
    let usher = Usher::start_ready(&config(
        &addrs,
        "    health_check: { path: /healthz, interval: 200ms, timeout: 500ms, rise: 2, fall: 2 }\n    \
         queue: { max_depth: 1000, timeout: 20s }",
    ));
    let victim = addrs[0];

    // ~100 requests/s of 20 ms each.
    let load = Load::start(
        usher.url("/sleep?ms=20"),
        4,
        Duration::from_millis(40),
        Duration::from_secs(40),
    );
    assert!(
        poll_until(Duration::from_secs(10), || load.snapshot().len() >= 50).await,
        "the load did not get going: {:?}",
        load.snapshot().last()
    );

    // Slow requests, so that some are surely in flight on the victim when it
    // dies: 8 of them over 4 workers, least outstanding first.
    let retries_before = usher.metric(
        "usher_retries_total",
        &[("upstream", "app"), ("reason", "error")],
    );
    let client = Client::new().with_timeout(Duration::from_secs(30));
    let slow: Vec<_> = (0..8)
        .map(|_| {
            let (c, u) = (client.clone(), usher.url("/sleep?ms=1500"));
            tokio::spawn(async move { c.get(&u).await })
        })
        .collect();
    assert!(
        poll_until(Duration::from_secs(5), || healthz(victim)["busy"]
            .as_u64()
            .unwrap_or(0)
            >= 1)
        .await,
        "no request reached the victim"
    );
    // Kill at once, while that request runs.
    let killed_at = Instant::now();
    workers[0].0.signal(Signal::SIGKILL);
    assert!(
        workers[0].0.wait_exit(Duration::from_secs(5)).is_some(),
        "the victim did not die"
    );

    // Marked down within fall × interval (400 ms), plus a margin for probe
    // jitter and a busy machine.
    assert!(
        poll_until(Duration::from_secs(5), || state_of(&usher, victim)
            == "down")
        .await,
        "the killed backend is not `down`: {}",
        usher.status()
    );
    let down_after = killed_at.elapsed();
    assert!(
        down_after <= Duration::from_millis(400 + 1600),
        "marked down {down_after:?} after the kill; fall × interval is 400 ms"
    );
    assert_eq!(backend_up(&usher, victim), 0.0);

    for s in slow {
        let r = s.await.unwrap().expect("slow request through usher");
        assert_eq!(r.status, StatusCode::OK, "slow request: {}", r.text());
        assert_ne!(
            r.header("x-usher-worker"),
            Some(victim.to_string().as_str()),
            "a response cannot come from the killed worker"
        );
    }
    assert!(
        usher.metric(
            "usher_retries_total",
            &[("upstream", "app"), ("reason", "error")]
        ) > retries_before,
        "the request in flight on the killed worker must have been retried"
    );

    // A new worker on the same port is brought back by the health check.
    let mut restarted = None;
    for _ in 0..20 {
        let p = Proc::spawn_bin(
            "usher-worker",
            ["--listen", &victim.to_string(), "--threads", "4"],
        );
        if wait_for_port(victim, Duration::from_secs(5)) {
            restarted = Some(p);
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let _restarted = restarted.expect("cannot restart a worker on the victim's port");
    let restarted_at = Instant::now();
    // rise × interval is 400 ms; an ejection from the crash (connect
    // failures) may still have a few seconds to run.
    assert!(
        poll_until(Duration::from_secs(15), || state_of(&usher, victim) == "up").await,
        "the restarted backend is not `up`: {}",
        usher.status()
    );
    let up_at = Instant::now();
    let up_after = up_at - restarted_at;
    assert_eq!(backend_up(&usher, victim), 1.0);
    assert!(
        poll_until(Duration::from_secs(10), || load
            .served_by_since(victim, up_at)
            >= 5)
        .await,
        "the restarted worker gets no traffic"
    );

    let outcomes = load.finish().await;
    let failed = failures(&outcomes);
    assert!(
        failed.is_empty(),
        "{} of {} requests failed: {:?}",
        failed.len(),
        outcomes.len(),
        &failed[..failed.len().min(10)]
    );
    for &a in &addrs[1..] {
        assert!(served_by(&outcomes, a) > 0, "{a} served nothing");
    }
    eprintln!(
        "crash under load: {} requests, 0 failed; down {down_after:?} after the kill, \
         up {up_after:?} after the restart ({:?} after the kill)",
        outcomes.len(),
        up_at - killed_at
    );
}

// ---------------------------------------------------------------------------
// 2. Non-idempotent safety

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_post_that_reached_a_backend_is_never_retried_but_a_get_is() {
    let _serial = SERIAL.lock().await;
    let a = RawBackend::start(Behaviour::CloseWithoutAnswer);
    let b = RawBackend::start(Behaviour::CloseWithoutAnswer);
    // Outlier ejection is kept out of the way: this test is about retries.
    let usher = Usher::start_ready(&config(
        &[a.addr, b.addr],
        "    retries: { attempts: 2 }\n    outlier: { consecutive_failures: 100 }",
    ));
    let client = Client::new().with_timeout(Duration::from_secs(20));

    let r = client
        .request(Method::POST, &usher.url("/post-once"), "pay 10 EUR")
        .await
        .expect("POST through usher");
    assert_eq!(r.status, StatusCode::BAD_GATEWAY, "{}", r.text());
    assert!(!r.body.is_empty(), "a 502 names its reason");
    let posts = a.count("POST", "/post-once") + b.count("POST", "/post-once");
    assert_eq!(
        posts, 1,
        "the POST reached the backends {posts} times; it must not be retried once written"
    );

    let r = client
        .get(&usher.url("/get-retried"))
        .await
        .expect("GET through usher");
    assert_eq!(r.status, StatusCode::BAD_GATEWAY, "{}", r.text());
    let (ga, gb) = (
        a.count("GET", "/get-retried"),
        b.count("GET", "/get-retried"),
    );
    assert!(
        (2..=3).contains(&(ga + gb)),
        "a GET is retried (attempts: 2): seen {ga} + {gb} times"
    );
    assert!(
        ga >= 1 && gb >= 1,
        "the retry goes to the other backend: {ga} / {gb}"
    );
    eprintln!("POST seen once; GET seen {ga} + {gb} times");
    drop(usher);

    // Refused at connect: the request never left, so even a POST is retried.
    let (_worker, live) = spawn_worker(["--threads", "2"]);
    let dead: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let usher = Usher::start_ready(&config(&[dead, live], "    retries: { attempts: 2 }"));
    let mut retried = false;
    for i in 0..20 {
        let body = format!("order {i}");
        let r = client
            .request(Method::POST, &usher.url("/echo"), body.clone())
            .await
            .expect("POST through usher");
        assert_eq!(r.status, StatusCode::OK, "POST {i}: {}", r.text());
        assert_eq!(r.text(), body, "the echo of POST {i}");
        assert_eq!(r.header("x-usher-worker"), Some(live.to_string().as_str()));
        if usher.metric(
            "usher_retries_total",
            &[("upstream", "app"), ("reason", "connect")],
        ) >= 1.0
        {
            retried = true;
            break;
        }
    }
    assert!(
        retried,
        "no POST was ever sent to the refusing backend first: {}",
        usher.metrics()
    );
}

// ---------------------------------------------------------------------------
// 3. Outlier ejection

/// Gaps longer than `min` between consecutive hits, in order.
fn long_gaps(hits: &[Hit], min: Duration) -> Vec<Duration> {
    hits.windows(2)
        .map(|w| w[1].at.duration_since(w[0].at))
        .filter(|g| *g > min)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failing_backend_is_ejected_for_longer_each_time() {
    let _serial = SERIAL.lock().await;
    let bad = RawBackend::start(Behaviour::Answer503);
    let (_worker, good) = spawn_worker(["--threads", "4"]);
    let usher = Usher::start_ready(&config(
        &[bad.addr, good],
        "    outlier: { consecutive_failures: 3, base_ejection: 1s, max_ejection: 10s, max_ejected_percent: 50 }",
    ));
    let bad_label = bad.addr.to_string();
    let ejections = || {
        usher.metric(
            "usher_backend_ejections_total",
            &[("upstream", "app"), ("backend", bad_label.as_str())],
        )
    };

    let load = Load::start(
        usher.url("/sleep?ms=1"),
        2,
        Duration::from_millis(20),
        Duration::from_secs(40),
    );

    // First ejection, after 3 failures.
    assert!(
        poll_until(Duration::from_secs(10), || ejections() >= 1.0).await,
        "the 503 backend was not ejected: {}",
        usher.metrics()
    );
    let first_at = Instant::now();
    let (state, up) = (state_of(&usher, bad.addr), backend_up(&usher, bad.addr));
    // Only meaningful while the 1 s ejection surely lasts.
    if first_at.elapsed() < Duration::from_millis(800) {
        assert_eq!(state, "ejected", "{}", usher.status());
        assert_eq!(up, 0.0);
    }
    assert_eq!(ejections(), 1.0);

    // Readmitted after ~1 s, then ejected again after 3 more failures.
    assert!(
        poll_until(Duration::from_secs(10), || ejections() >= 2.0).await,
        "the 503 backend was not ejected a second time: {}",
        usher.status()
    );
    let second_at = Instant::now();
    assert_eq!(state_of(&usher, bad.addr), "ejected", "{}", usher.status());
    assert_eq!(ejections(), 2.0);
    // Readmitted again after ~2 s.
    let hits_then = bad.hits().len();
    assert!(
        poll_until(Duration::from_secs(10), || bad.hits().len() > hits_then).await,
        "the 503 backend was never readmitted after its second ejection"
    );
    let outcomes = load.finish().await;

    let hits = bad.hits();
    let gaps = long_gaps(&hits, Duration::from_millis(500));
    eprintln!(
        "outlier: {} hits on the 503 backend, gaps over 500 ms: {gaps:?}; \
         ejection #2 seen {:?} after #1",
        hits.len(),
        second_at - first_at
    );
    assert!(gaps.len() >= 2, "two ejection gaps expected: {gaps:?}");
    let (g1, g2) = (gaps[0], gaps[1]);
    assert!(
        g1 >= Duration::from_millis(900) && g1 < Duration::from_millis(1900),
        "first ejection: no request for {g1:?}; base_ejection is 1 s"
    );
    assert!(
        g2 >= Duration::from_millis(1900) && g2 < Duration::from_millis(3500),
        "second ejection: no request for {g2:?}; expected base × 2 = 2 s"
    );
    assert!(
        g2 >= g1 + Duration::from_millis(600),
        "the second ejection ({g2:?}) must last longer than the first ({g1:?})"
    );
    // The clients saw the 503s that caused the ejections, and otherwise 200s.
    let odd: Vec<String> = outcomes
        .iter()
        .filter(|o| {
            !matches!(
                o.status,
                Some(StatusCode::OK | StatusCode::SERVICE_UNAVAILABLE)
            )
        })
        .map(Outcome::describe)
        .collect();
    assert!(odd.is_empty(), "unexpected answers: {odd:?}");
    assert!(served_by(&outcomes, good) > 0);
}

// ---------------------------------------------------------------------------
// 4. Reload under load

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn twenty_reloads_under_load_lose_nothing_and_a_broken_file_changes_nothing() {
    let _serial = SERIAL.lock().await;
    let workers: Vec<(Proc, SocketAddr)> =
        (0..3).map(|_| spawn_worker(["--threads", "4"])).collect();
    let (a, b, c) = (workers[0].1, workers[1].1, workers[2].1);
    let extra = "    queue: { max_depth: 1000, timeout: 20s }";
    let two = config(&[a, b], extra);
    let three = config(&[a, b, c], extra);
    let usher = Usher::start_ready(&two);
    let path = usher.config_path.clone();
    assert_eq!(reloads(&usher, "success"), 0.0);

    let load = Load::start(
        usher.url("/sleep?ms=20"),
        3,
        Duration::from_millis(30),
        Duration::from_secs(120),
    );
    let mut expected = 0.0;
    for i in 0..20 {
        let (text, count) = if i % 2 == 0 { (&three, 3) } else { (&two, 2) };
        replace_file(&path, &concrete(text));
        let via_sighup = i % 4 == 3;
        if via_sighup {
            // The file poll sees the change as well, but the same content
            // reloads once.
            usher.proc.signal(Signal::SIGHUP);
        }
        expected += 1.0;
        assert!(
            poll_until(Duration::from_secs(10), || reloads(&usher, "success")
                >= expected)
            .await,
            "reload {i} did not land: {} successful reloads, {expected} expected\n{}",
            reloads(&usher, "success"),
            usher.proc.output()
        );
        assert_eq!(backend_count(&usher), count, "after reload {i}");
        // Let some traffic through each configuration.
        let seen = load.snapshot().len();
        assert!(
            poll_until(Duration::from_secs(10), || load.snapshot().len()
                >= seen + 10)
            .await,
            "the load stalled after reload {i}"
        );
    }
    assert_eq!(
        reloads(&usher, "success"),
        expected,
        "each reload counted once"
    );
    assert_eq!(reloads(&usher, "failure"), 0.0);

    // A broken file: the running config stays.
    let broken = concrete(&two).replace("max_depth", "max_dept");
    let bad_line = broken
        .lines()
        .position(|l| l.contains("max_dept"))
        .expect("the broken key is in the file")
        + 1;
    replace_file(&path, &broken);
    assert!(
        poll_until(Duration::from_secs(10), || reloads(&usher, "failure")
            >= 1.0)
        .await,
        "the broken file was not noticed\n{}",
        usher.proc.output()
    );
    assert_eq!(backend_count(&usher), 2, "the old config keeps serving");
    let seen = load.snapshot().len();
    assert!(
        poll_until(Duration::from_secs(10), || load.snapshot().len()
            >= seen + 20)
        .await,
        "the load stalled after the broken file"
    );
    let outcomes = load.finish().await;
    let failed = failures(&outcomes);
    assert!(
        failed.is_empty(),
        "{} of {} requests failed: {:?}",
        failed.len(),
        outcomes.len(),
        &failed[..failed.len().min(10)]
    );
    assert!(served_by(&outcomes, c) > 0, "the added backend got traffic");
    let after = outcomes
        .iter()
        .filter(|o| o.at.elapsed() < Duration::from_secs(2));
    assert!(after.count() > 0);
    eprintln!(
        "reloads: {expected} successful, {} requests, 0 failed",
        outcomes.len()
    );

    let stderr = check_rejects([OsStr::new("-c"), path.as_os_str()]);
    let at = format!("{}:{bad_line}:", path.display());
    assert!(
        stderr.contains(&at) && stderr.contains("max_dept"),
        "usher check must name {at} and the key: {stderr}"
    );
}

// ---------------------------------------------------------------------------
// 5. Drain

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_drained_backend_finishes_its_request_and_gets_no_new_ones() {
    let _serial = SERIAL.lock().await;
    let (_w1, one) = spawn_worker(["--threads", "4"]);
    let (_w2, two) = spawn_worker(["--threads", "4"]);
    let usher = Usher::start_ready(&config(&[one, two], ""));
    let client = Client::new().with_timeout(Duration::from_secs(20));

    let slow = {
        let (c, u) = (client.clone(), usher.url("/sleep?ms=800"));
        tokio::spawn(async move { c.get(&u).await })
    };
    let mut target = None;
    assert!(
        poll_until(Duration::from_secs(5), || {
            target = [one, two]
                .into_iter()
                .find(|&a| backend_json(&usher, a).is_some_and(|b| b["in_flight"] == 1));
            target.is_some()
        })
        .await,
        "the slow request is not in flight: {}",
        usher.status()
    );
    let drained = target.unwrap();
    let other = if drained == one { two } else { one };
    let served_before = healthz(drained)["served"].as_u64().unwrap();

    let r = blocking::request(
        "POST",
        &usher.admin_url(&format!("/upstreams/app/backends/{drained}/drain")),
        b"",
    )
    .expect("drain");
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let b = backend_json(&usher, drained).unwrap();
    assert_eq!(b["state"], "draining", "{b}");
    assert!(!slow.is_finished(), "the slow request ended too early");
    assert_eq!(backend_up(&usher, drained), 0.0);

    let mut tasks = Vec::new();
    for _ in 0..20 {
        let (c, u) = (client.clone(), usher.url("/sleep?ms=10"));
        tasks.push(tokio::spawn(async move { c.get(&u).await }));
    }
    for t in tasks {
        let r = t.await.unwrap().expect("request during the drain");
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        assert_eq!(
            r.header("x-usher-worker"),
            Some(other.to_string().as_str()),
            "a request went to the drained backend"
        );
    }
    let r = slow.await.unwrap().expect("the in-flight request");
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(
        r.header("x-usher-worker"),
        Some(drained.to_string().as_str())
    );
    assert_eq!(
        healthz(drained)["served"].as_u64().unwrap(),
        served_before + 1,
        "the drained worker served only the request it already had"
    );
    assert_eq!(state_of(&usher, drained), "draining");

    let r = blocking::request(
        "POST",
        &usher.admin_url(&format!("/upstreams/app/backends/{drained}/undrain")),
        b"",
    )
    .expect("undrain");
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(state_of(&usher, drained), "up");
    assert_eq!(backend_up(&usher, drained), 1.0);
    let mut back = false;
    for _ in 0..60 {
        let r = client.get(&usher.url("/sleep?ms=1")).await.expect("GET");
        assert_eq!(r.status, StatusCode::OK);
        if r.header("x-usher-worker") == Some(drained.to_string().as_str()) {
            back = true;
            break;
        }
    }
    assert!(back, "the undrained backend gets no requests");
}

// ---------------------------------------------------------------------------
// 6. All backends down

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_every_backend_down_a_request_gets_a_fast_clear_503() {
    let _serial = SERIAL.lock().await;
    let mut workers: Vec<(Proc, SocketAddr)> =
        (0..2).map(|_| spawn_worker(["--threads", "2"])).collect();
    let addrs: Vec<SocketAddr> = workers.iter().map(|w| w.1).collect();
    let usher = Usher::start_ready(&config(
        &addrs,
        "    health_check: { path: /healthz, interval: 200ms, timeout: 500ms, rise: 2, fall: 2 }\n    \
         queue: { max_depth: 100, timeout: 10s }",
    ));
    let client = Client::new().with_timeout(Duration::from_secs(30));
    let r = client.get(&usher.url("/sleep?ms=1")).await.expect("GET");
    assert_eq!(r.status, StatusCode::OK);

    for (p, _) in &mut workers {
        p.signal(Signal::SIGKILL);
        assert!(p.wait_exit(Duration::from_secs(5)).is_some());
    }
    assert!(
        poll_until(Duration::from_secs(10), || addrs
            .iter()
            .all(|&a| state_of(&usher, a) == "down"))
        .await,
        "the killed backends are not `down`: {}",
        usher.status()
    );
    let readyz = blocking::get(&usher.admin_url("/readyz")).expect("/readyz");
    assert_eq!(readyz.status, StatusCode::SERVICE_UNAVAILABLE);

    for i in 0..3 {
        let started = Instant::now();
        let r = client.get(&usher.url("/sleep?ms=1")).await.expect("GET");
        let took = started.elapsed();
        assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{}", r.text());
        assert!(
            took < Duration::from_secs(2),
            "request {i}: the 503 took {took:?}; the queue timeout is 10 s"
        );
        let body = r.text();
        assert!(
            body.contains("no healthy backend") && body.contains("app"),
            "the body names the reason: {body:?}"
        );
        assert!(r.header("retry-after").is_some(), "503 without Retry-After");
    }
}
