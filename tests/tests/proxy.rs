//! End-to-end tests of the proxy core: capacity caps, the central queue and
//! its bounds, request/response buffering against slow clients, error
//! mapping, headers and metrics. Real `usher` and `usher-worker` binaries.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{Method, StatusCode};
use usher_e2e::usher::{metric_value, Config, Usher};
use usher_e2e::{blocking, free_port, spawn_worker, wait_until, Client, Proc};

fn config(
    addrs: &[SocketAddr],
    backend_extra: &str,
    upstream_extra: &str,
    top_extra: &str,
) -> String {
    Config::app(addrs, backend_extra, upstream_extra)
        .top("access_log: { format: json }")
        .top(top_extra)
        .yaml()
}

fn healthz(addr: SocketAddr) -> serde_json::Value {
    blocking::get(&format!("http://{addr}/healthz"))
        .expect("worker /healthz")
        .json()
}

/// Calls `f` every 10 ms in a background thread, from [`Sampler::start`]
/// until [`Sampler::finish`], and keeps every value it returned.
struct Sampler<T> {
    stop: Arc<AtomicBool>,
    handle: Option<std::thread::JoinHandle<Vec<T>>>,
}

impl<T: Send + 'static> Sampler<T> {
    fn start(f: impl Fn() -> T + Send + 'static) -> Sampler<T> {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let handle = std::thread::spawn(move || {
            let mut samples = Vec::new();
            let deadline = Instant::now() + Duration::from_secs(60);
            while !s.load(Ordering::Relaxed) && Instant::now() < deadline {
                samples.push(f());
                std::thread::sleep(Duration::from_millis(10));
            }
            samples
        });
        Sampler {
            stop,
            handle: Some(handle),
        }
    }

    /// Stops sampling; the samples, oldest first.
    fn finish(mut self) -> Vec<T> {
        self.stop.store(true, Ordering::Relaxed);
        let handle = self.handle.take().expect("finish is called once");
        handle.join().expect("the sampler thread panicked")
    }
}

impl<T> Drop for Sampler<T> {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// A worker's `(busy, queued)` from its `/healthz`, or `None` if it did not answer.
fn worker_load(addr: SocketAddr) -> Option<(u64, u64)> {
    let h = blocking::get(&format!("http://{addr}/healthz"))
        .ok()?
        .json();
    Some((h["busy"].as_u64()?, h["queued"].as_u64()?))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn caps_hold_and_the_excess_waits_in_usher() {
    let workers: Vec<(Proc, SocketAddr)> =
        (0..4).map(|_| spawn_worker(["--threads", "2"])).collect();
    let addrs: Vec<SocketAddr> = workers.iter().map(|w| w.1).collect();
    // Capacity is `auto`: learned from each worker's own report (2 threads).
    let usher = Usher::start_ready(&config(&addrs, "", "", ""));
    let status = usher.status();
    for b in status["upstreams"]["app"]["backends"].as_array().unwrap() {
        assert_eq!(
            b["capacity"], 2,
            "capacity learned from the worker: {status}"
        );
    }

    let admin = usher.admin_url("/metrics");
    let depth = Sampler::start(move || {
        blocking::get(&admin)
            .map(|r| metric_value(&r.text(), "usher_queue_depth", &[("upstream", "app")]) as u64)
            .unwrap_or(0)
    });
    // What each worker reports while the load runs. Usher sends a worker no
    // more requests than it has threads, so busy + queued never exceeds 2. (A
    // request may sit in the queue for the moment between a thread answering
    // and taking the next one, so `queued` alone is not always 0.)
    let worker_loads: Vec<_> = addrs
        .iter()
        .map(|&addr| (addr, Sampler::start(move || worker_load(addr))))
        .collect();
    let client = Client::new();
    let mut tasks = Vec::new();
    for _ in 0..40 {
        let (c, u) = (client.clone(), usher.url("/sleep?ms=200"));
        tasks.push(tokio::spawn(async move { c.get(&u).await }));
    }
    let mut served_by = std::collections::HashMap::new();
    for t in tasks {
        let r = t.await.unwrap().expect("request through usher");
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        *served_by
            .entry(r.header("x-usher-worker").unwrap().to_string())
            .or_insert(0) += 1;
    }
    let max_depth = depth.finish().into_iter().max().unwrap_or(0);

    for (addr, sampler) in worker_loads {
        let h = healthz(addr);
        assert!(
            h["peak_busy"].as_u64().unwrap() <= 2,
            "worker {addr} exceeded its 2 threads: {h}"
        );
        // Idle again, the worker has nothing queued.
        assert_eq!(h["queued"], 0, "worker {addr} after the load: {h}");
        let samples: Vec<(u64, u64)> = sampler.finish().into_iter().flatten().collect();
        // Without samples taken mid-request, the check below would prove nothing.
        let in_flight = samples.iter().filter(|&&(busy, _)| busy > 0).count();
        assert!(
            in_flight > 0,
            "no /healthz sample of worker {addr} saw a request in flight: {samples:?}"
        );
        let over: Vec<&(u64, u64)> = samples.iter().filter(|&&(b, q)| b + q > 2).collect();
        assert!(
            over.is_empty(),
            "worker {addr} held more requests than its 2 threads in {} of {} samples \
             ({in_flight} with requests in flight); (busy, queued) = {:?}",
            over.len(),
            samples.len(),
            &over[..over.len().min(10)]
        );
    }
    assert_eq!(served_by.len(), 4, "all four workers served: {served_by:?}");
    assert!(
        max_depth > 0,
        "40 requests on 8 threads must have queued in usher"
    );
    assert!(usher.metric("usher_queue_wait_seconds_count", &[("upstream", "app")]) >= 40.0);
    assert_eq!(
        usher.metric("usher_requests_total", &[("code", "200")]),
        40.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_queue_answers_503_at_once_and_a_slow_queue_after_its_timeout() {
    let (_w, addr) = spawn_worker(["--threads", "1"]);
    let usher = Usher::start_ready(&config(
        &[addr],
        ", max_in_flight: 1",
        "    queue: { max_depth: 5, timeout: 10s }",
        "",
    ));
    let client = Client::new();
    // 1 in flight + 5 queued fit; the other 6 must be refused at once.
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..12 {
        let (c, u) = (client.clone(), usher.url("/sleep?ms=500"));
        tasks.push(tokio::spawn(async move {
            let r = c.get(&u).await;
            (r, started.elapsed())
        }));
    }
    let mut ok = 0;
    let mut refused = 0;
    for t in tasks {
        let (r, took) = t.await.unwrap();
        let r = r.expect("every request gets an answer");
        match r.status {
            StatusCode::OK => ok += 1,
            StatusCode::SERVICE_UNAVAILABLE => {
                refused += 1;
                assert_eq!(r.header("retry-after"), Some("1"));
                assert!(r.text().contains("queue full"), "{}", r.text());
                assert!(
                    took < Duration::from_secs(2),
                    "a full queue answers promptly, took {took:?}"
                );
            }
            s => panic!("unexpected {s}: {}", r.text()),
        }
    }
    assert_eq!(ok, 6, "one in flight and five queued are served");
    assert_eq!(refused, 6);
    assert_eq!(
        usher.metric("usher_queue_rejections_total", &[("reason", "full")]),
        6.0
    );
    drop(usher);

    // With a tiny queue timeout, a waiting request gives up after it.
    let usher = Usher::start_ready(&config(
        &[addr],
        ", max_in_flight: 1",
        "    queue: { max_depth: 5, timeout: 300ms }",
        "",
    ));
    let hold = {
        let (c, u) = (client.clone(), usher.url("/sleep?ms=1500"));
        tokio::spawn(async move { c.get(&u).await })
    };
    assert!(
        wait_until(Duration::from_secs(10), || healthz(addr)["busy"] == 1),
        "the slow request reached the worker"
    );
    let t0 = Instant::now();
    let r = client.get(&usher.url("/sleep?ms=1")).await.unwrap();
    let waited = t0.elapsed();
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(r.header("retry-after").is_some());
    assert!(r.text().contains("timed out"), "{}", r.text());
    assert!(
        waited >= Duration::from_millis(250),
        "answered after the queue timeout, not before: {waited:?}"
    );
    assert!(
        waited < Duration::from_millis(1400),
        "answered at the queue timeout, not when the slot freed: {waited:?}"
    );
    assert_eq!(
        usher.metric("usher_queue_rejections_total", &[("reason", "timeout")]),
        1.0
    );
    assert_eq!(hold.await.unwrap().unwrap().status, StatusCode::OK);
}

#[test]
fn a_slow_uploader_holds_no_worker_thread() {
    let (_w, addr) = spawn_worker(["--threads", "1"]);
    let usher = Usher::start_ready(&config(&[addr], "", "", ""));
    let served_before = healthz(addr)["served"].as_u64().unwrap();

    let mut s = TcpStream::connect(usher.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let body_len = 64 * 1024;
    write!(
        s,
        "POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: {body_len}\r\n\r\n"
    )
    .unwrap();
    let chunk = vec![b'x'; 1024];
    let mut max_busy = 0;
    for i in 0..64 {
        s.write_all(&chunk).unwrap();
        if i % 8 == 0 {
            let h = healthz(addr);
            max_busy = max_busy.max(h["busy"].as_u64().unwrap());
            assert_eq!(
                h["served"].as_u64().unwrap(),
                served_before + (i / 8) as u64,
                "nothing reached the worker yet"
            );
            // While the upload crawls, other clients are served by the one thread.
            let r = blocking::get(&usher.url("/sleep?ms=1")).unwrap();
            assert_eq!(r.status, StatusCode::OK);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        max_busy, 0,
        "the worker thread stayed free during the upload"
    );
    let mut raw = Vec::new();
    let mut buf = [0u8; 65536];
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        let n = s.read(&mut buf).unwrap();
        raw.extend_from_slice(&buf[..n]);
        if n == 0 || raw.len() >= body_len {
            if let Ok(r) = blocking::parse_response(&raw) {
                if r.body.len() == body_len {
                    break;
                }
            }
        }
    }
    let r = blocking::parse_response(&raw).unwrap();
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.body.len(), body_len, "the whole body was echoed");
}

#[test]
fn a_slow_reader_does_not_hold_the_worker_slot() {
    let (_w, addr) = spawn_worker(["--threads", "1"]);
    let usher = Usher::start_ready(&config(
        &[addr],
        ", max_in_flight: 1",
        "    queue: { max_depth: 10, timeout: 3s }",
        "",
    ));
    let served_before = healthz(addr)["served"].as_u64().unwrap();
    // A 2 MiB response that the client does not read at all.
    let body = vec![b'y'; 2 << 20];
    let mut slow = TcpStream::connect(usher.addr).unwrap();
    write!(
        slow,
        "POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .unwrap();
    slow.write_all(&body).unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || healthz(addr)["served"]
            .as_u64()
            .unwrap()
            > served_before),
        "the big echo was served by the worker"
    );
    // The next request gets the only thread although the first client has
    // not read its response.
    let t0 = Instant::now();
    let r = blocking::get(&usher.url("/sleep?ms=10")).unwrap();
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert!(
        t0.elapsed() < Duration::from_secs(2),
        "not stuck behind the slow reader"
    );
    // And the slow client still gets its whole response when it reads.
    slow.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut got = 0usize;
    let mut buf = vec![0u8; 1 << 16];
    while got < body.len() {
        match slow.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) => panic!("slow reader: {e}"),
        }
    }
    assert!(got >= body.len(), "read {got} bytes");
}

fn raw_exchange(addr: SocketAddr, request: &[u8]) -> (String, bool) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(request).unwrap();
    let mut raw = Vec::new();
    let closed = s.read_to_end(&mut raw).is_ok();
    (String::from_utf8_lossy(&raw).into_owned(), closed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn errors_map_to_clear_statuses() {
    let (_w, live) = spawn_worker(["--threads", "2"]);
    let dead1: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let dead2: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();

    // Backend down: both backends refuse; the answer is 502 after trying each.
    let usher = Usher::start(&config(&[dead1, dead2], ", max_in_flight: 2", "", ""));
    let r = blocking::get(&usher.url("/x")).unwrap();
    assert_eq!(r.status, StatusCode::BAD_GATEWAY, "{}", r.text());
    // The client reads a generic reason; the backend address and the
    // connect error are for the operator (access log, error log).
    assert!(
        r.text().contains("upstream app unavailable"),
        "{}",
        r.text()
    );
    for addr in [dead1, dead2] {
        assert!(!r.text().contains(&addr.to_string()), "{}", r.text());
    }
    assert!(
        usher
            .proc
            .wait_for_output("cannot reach backend", Duration::from_secs(5))
            .is_some(),
        "the detail is in Usher's log"
    );
    assert!(usher.metric("usher_retries_total", &[("reason", "connect")]) >= 1.0);
    drop(usher);

    // One dead, one live: the dead one is retried away, the client sees 200.
    let usher = Usher::start_ready(&config(&[dead1, live], ", max_in_flight: 2", "", ""));
    for _ in 0..10 {
        let r = blocking::get(&usher.url("/sleep?ms=1")).unwrap();
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    }
    drop(usher);

    // Slow backend → 504; oversized body → 413; ambiguous framing → 400.
    let usher = Usher::start_ready(&config(
        &[live],
        "",
        "    timeouts: { response: 300ms }\n    retries: { attempts: 2 }",
        "limits: { max_request_body: 1KiB }",
    ));
    let t0 = Instant::now();
    let r = blocking::get(&usher.url("/sleep?ms=3000")).unwrap();
    assert_eq!(r.status, StatusCode::GATEWAY_TIMEOUT, "{}", r.text());
    // Not retried, though GET is idempotent: the request is most likely still
    // running on the backend's thread.
    assert!(
        t0.elapsed() < Duration::from_millis(800),
        "one timeout, not three: {:?}",
        t0.elapsed()
    );
    assert_eq!(usher.metric("usher_retries_total", &[]), 0.0);
    let r = blocking::request("POST", &usher.url("/echo"), &[b'z'; 2048]).unwrap();
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE, "{}", r.text());
    // A chunked body over the limit (no Content-Length to check up front).
    let mut req = b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    for _ in 0..3 {
        req.extend_from_slice(b"200\r\n");
        req.extend_from_slice(&[b'q'; 512]);
        req.extend_from_slice(b"\r\n");
    }
    req.extend_from_slice(b"0\r\n\r\n");
    let (resp, _) = raw_exchange(usher.addr, &req);
    assert!(resp.starts_with("HTTP/1.1 413"), "{resp}");

    let (resp, closed) = raw_exchange(
        usher.addr,
        b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\nGET /status/200 HTTP/1.1\r\nHost: t\r\n\r\n",
    );
    // hyper's parser drops the Content-Length and decodes by Transfer-Encoding
    // alone, then closes the connection (RFC 9112 §6.1 allows this instead of
    // a 400). Either way, what a smuggler needs never happens: the pipelined
    // request behind the body is not served, and the connection is closed.
    assert!(
        resp.starts_with("HTTP/1.1 400") || resp.starts_with("HTTP/1.1 200"),
        "CL+TE is refused or framed by TE alone: {resp}"
    );
    assert!(closed, "and the connection is closed");
    assert_eq!(
        resp.matches("HTTP/1.1 ").count(),
        1,
        "the smuggled request is not answered: {resp}"
    );
    let (resp, _) = raw_exchange(
        usher.addr,
        b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
    );
    assert!(
        resp.starts_with("HTTP/1.1 400"),
        "non-chunked TE is refused: {resp}"
    );
    // Usher is a reverse proxy: CONNECT is refused, not tunnelled.
    let (resp, _) = raw_exchange(
        usher.addr,
        b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n",
    );
    assert!(
        resp.starts_with("HTTP/1.1 405"),
        "CONNECT is refused: {resp}"
    );
    assert!(resp.contains("not supported"), "{resp}");
    // Every error answer names its reason; none is empty.
    let r = blocking::get(&usher.url("/sleep?ms=3000")).unwrap();
    assert!(!r.body.is_empty());
}

#[test]
fn usher_check_names_the_file_line_and_key() {
    let dir = usher_e2e::usher::TempDir::new("check");
    let good = dir.0.join("good.yaml");
    let yaml = config(
        &["127.0.0.1:9".parse().unwrap()],
        "",
        "    queue: { max_depth: 5 }",
        "",
    );
    std::fs::write(
        &good,
        yaml.replace("LISTEN", "127.0.0.1:8080")
            .replace("ADMIN", "127.0.0.1:9901"),
    )
    .unwrap();
    let out = std::process::Command::new(usher_e2e::bin_path("usher"))
        .args(["check", "-c"])
        .arg(&good)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let bad = dir.0.join("bad.yaml");
    let text = std::fs::read_to_string(&good)
        .unwrap()
        .replace("max_depth: 5", "max_dpth: 5");
    std::fs::write(&bad, &text).unwrap();
    let line = text.lines().position(|l| l.contains("max_dpth")).unwrap() + 1;
    let out = std::process::Command::new(usher_e2e::bin_path("usher"))
        .args(["check", "-c"])
        .arg(&bad)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        err.contains(&format!("bad.yaml:{line}:")),
        "names the line {line}: {err}"
    );
    assert!(
        err.contains("upstreams.app.queue") && err.contains("max_dpth"),
        "names the key: {err}"
    );

    // The daemon refuses to start on it too, with the same message.
    let out = std::process::Command::new(usher_e2e::bin_path("usher"))
        .arg("-c")
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("max_dpth"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarding_headers_and_request_ids() {
    let (_w, addr) = spawn_worker(["--threads", "2"]);
    let usher = Usher::start_ready(&config(&[addr], "", "", ""));
    // The worker's /echo returns the body; to see the headers the backend got
    // we use a tiny raw request with hop-by-hop headers and check the answer.
    let r = Client::new()
        .send(
            http::Request::post(usher.url("/echo"))
                .header("x-request-id", "abc-123")
                .header("x-forwarded-for", "10.1.2.3")
                .body(http_body_util::Full::new(bytes::Bytes::from_static(b"hi")))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.text(), "hi");
    assert_eq!(
        r.header("x-request-id"),
        Some("abc-123"),
        "request id passed through and returned"
    );
    let r = blocking::get(&usher.url("/status/204")).unwrap();
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    assert!(
        r.header("x-usher-load").is_none(),
        "the worker's load report stays between worker and Usher"
    );
    let id = r.header("x-request-id").expect("a generated request id");
    assert_eq!(id.len(), 32);
    // No route for this method/path mix is still answered by the upstream:
    let r = Client::new()
        .request(Method::DELETE, &usher.url("/status/404"), "")
        .await
        .unwrap();
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    // The access log has one JSON line per request with the backend and id.
    let line = usher
        .proc
        .wait_for_output("\"request_id\":\"abc-123\"", Duration::from_secs(5))
        .expect("access log line");
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(v["backend"], addr.to_string());
    assert_eq!(v["status"], 200);
    assert_eq!(v["upstream"], "app");
    assert!(v["queue_ms"].is_number() && v["duration_ms"].is_number());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_contract_metric_is_exported_and_promtool_accepts_them() {
    let (_w, addr) = spawn_worker(["--threads", "1"]);
    let dead: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let usher = Usher::start_ready(&config(
        &[addr, dead],
        ", max_in_flight: 1",
        "    queue: { max_depth: 1, timeout: 200ms }\n    health_check: { path: /healthz, interval: 100ms, timeout: 200ms, rise: 1, fall: 1 }\n    outlier: { consecutive_failures: 1, max_ejected_percent: 50 }",
        "",
    ));
    // Traffic with 200s, queue rejections (full and timeout), retries and an ejection.
    let client = Client::new();
    let mut tasks = Vec::new();
    for i in 0..8 {
        let (c, u) = (
            client.clone(),
            usher.url(if i % 2 == 0 {
                "/sleep?ms=400"
            } else {
                "/status/500"
            }),
        );
        tasks.push(tokio::spawn(async move { c.get(&u).await }));
    }
    for t in tasks {
        let r = t.await.unwrap().unwrap();
        assert!(!r.body.is_empty());
    }
    assert!(wait_until(Duration::from_secs(10), || usher
        .metric("usher_health_checks_total", &[("result", "failure")])
        > 0.0));
    let text = usher.metrics();
    for name in [
        "usher_requests_total",
        "usher_request_duration_seconds_bucket",
        "usher_queue_depth",
        "usher_queue_wait_seconds_bucket",
        "usher_queue_rejections_total",
        "usher_backend_in_flight",
        "usher_backend_capacity",
        "usher_backend_up",
        "usher_backend_requests_total",
        "usher_backend_response_seconds_bucket",
        "usher_backend_ejections_total",
        "usher_health_checks_total",
        "usher_retries_total",
        "usher_client_connections",
        "usher_config_reloads_total",
        "usher_build_info",
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
    ] {
        assert!(
            text.lines().any(|l| l.starts_with(name)),
            "{name} missing from /metrics"
        );
    }
    assert_eq!(
        metric_value(&text, "usher_backend_up", &[("backend", &dead.to_string())]),
        0.0
    );
    assert_eq!(
        metric_value(&text, "usher_backend_up", &[("backend", &addr.to_string())]),
        1.0
    );
    assert!(metric_value(&text, "usher_queue_rejections_total", &[]) >= 1.0);

    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus) must be installed");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn usr1_and_usr2_do_not_kill_usher() {
    // nginx operators send USR1 to reopen logs; it must not stop the proxy.
    let (_w, addr) = spawn_worker(["--threads", "1"]);
    let mut usher = Usher::start_ready(&config(&[addr], "", "", ""));
    for sig in [
        nix::sys::signal::Signal::SIGUSR1,
        nix::sys::signal::Signal::SIGUSR2,
    ] {
        usher.proc.signal(sig);
        assert!(
            usher
                .proc
                .wait_for_output(&format!("{sig} ignored"), Duration::from_secs(5))
                .is_some(),
            "usher says it ignored {sig}"
        );
        assert!(
            usher.proc.wait_exit(Duration::from_millis(200)).is_none(),
            "still running after {sig}"
        );
        let r = blocking::get(&usher.url("/sleep?ms=1")).unwrap();
        assert_eq!(r.status, StatusCode::OK);
    }
}

#[test]
fn a_timed_out_request_keeps_its_slot_until_the_backend_is_done() {
    // One thread and no queue in the worker: a second request sent while the
    // thread still runs the timed-out one would get the worker's own 503.
    let (_w, addr) = spawn_worker(["--threads", "1", "--queue", "0"]);
    let usher = Usher::start_ready(&config(
        &[addr],
        ", max_in_flight: 1",
        "    timeouts: { response: 300ms }\n    queue: { max_depth: 10, timeout: 5s }",
        "",
    ));
    let t0 = Instant::now();
    let r = blocking::get(&usher.url("/sleep?ms=1500")).unwrap();
    assert_eq!(r.status, StatusCode::GATEWAY_TIMEOUT);
    assert!(t0.elapsed() < Duration::from_millis(1000));
    // The worker is still busy with it: Usher must not send the next one yet.
    assert_eq!(healthz(addr)["busy"], 1);
    let r = blocking::get(&usher.url("/sleep?ms=1")).unwrap();
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert!(
        t0.elapsed() >= Duration::from_millis(1400),
        "waited for the backend's thread: {:?}",
        t0.elapsed()
    );
    assert_eq!(healthz(addr)["peak_busy"], 1);
}

#[test]
fn a_client_that_hangs_up_does_not_free_a_busy_thread() {
    // One thread and no queue in the worker: a request sent while the thread
    // still runs the abandoned one would get the worker's own 503.
    let (_w, addr) = spawn_worker(["--threads", "1", "--queue", "0"]);
    let usher = Usher::start_ready(&config(&[addr], ", max_in_flight: 1", "", ""));
    let served = healthz(addr)["served"].as_u64().unwrap();
    let t0 = Instant::now();
    {
        let mut s = TcpStream::connect(usher.addr).unwrap();
        s.write_all(b"GET /sleep?ms=800 HTTP/1.1\r\nHost: t\r\n\r\n")
            .unwrap();
        assert!(
            wait_until(Duration::from_secs(5), || healthz(addr)["busy"] == 1),
            "the request reached the worker"
        );
        // The client hangs up while the worker runs its request.
    }
    let r = blocking::get(&usher.url("/sleep?ms=1")).unwrap();
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert!(
        t0.elapsed() >= Duration::from_millis(700),
        "waited for the abandoned request to finish: {:?}",
        t0.elapsed()
    );
    let h = healthz(addr);
    assert_eq!(h["peak_busy"], 1);
    assert_eq!(
        h["served"].as_u64().unwrap(),
        served + 2,
        "both ran, nothing refused"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_usher_replicas_share_each_workers_threads() {
    // Two Usher replicas in front of the same two 4-thread workers, as in
    // Kubernetes: with `proxy_replicas: 2` each uses what the worker's last
    // load report leaves free, or half while it has no fresh report, and a
    // request the
    // worker refuses for lack of a thread (`--queue 0`) is sent again, never
    // answered 503: together they never overfill one, and no client notices.
    let workers: Vec<(Proc, SocketAddr)> = (0..2)
        .map(|_| spawn_worker(["--threads", "4", "--queue", "0"]))
        .collect();
    let addrs: Vec<SocketAddr> = workers.iter().map(|w| w.1).collect();
    let yaml = config(&addrs, "", "    proxy_replicas: 2", "");
    let ushers = [Usher::start_ready(&yaml), Usher::start_ready(&yaml)];
    for u in &ushers {
        for b in u.status()["upstreams"]["app"]["backends"]
            .as_array()
            .unwrap()
        {
            assert_eq!(b["share"]["replicas"], 2, "{b}");
            // A fresh report leaves what the other replica holds (nothing
            // yet); once it is stale, the static split: half of 4 each.
            let others = b["share"]["others"].as_u64().unwrap_or(0);
            let expected = if b["share"]["by"] == "report" {
                4 - others
            } else {
                2
            };
            assert_eq!(b["capacity"], expected, "{b}");
        }
    }
    let client = Client::new();
    let mut tasks = Vec::new();
    for i in 0..40 {
        let (c, u) = (client.clone(), ushers[i % 2].url("/sleep?ms=150"));
        tasks.push(tokio::spawn(async move { c.get(&u).await }));
    }
    for t in tasks {
        let r = t.await.unwrap().unwrap();
        assert_eq!(
            r.status,
            StatusCode::OK,
            "no worker was overfilled: {}",
            r.text()
        );
    }
    for a in &addrs {
        let h = healthz(*a);
        assert!(h["peak_busy"].as_u64().unwrap() <= 4, "{h}");
    }
}

/// On one core (here `TOKIO_WORKER_THREADS=1`; also `taskset -c 0` or a
/// one-CPU container) Usher runs tokio's current-thread scheduler. The same
/// caps, queue, bodies and graceful stop must hold on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn on_one_core_the_single_threaded_runtime_caps_queues_and_drains() {
    let (_w, addr) = spawn_worker(["--threads", "2"]);
    let mut usher = Usher::start_with_env(
        &config(&[addr], ", max_in_flight: 2", "", ""),
        &[("TOKIO_WORKER_THREADS", "1")],
    );
    usher.wait_ready();
    let client = Client::new();
    let mut tasks = Vec::new();
    for i in 0..12 {
        let c = client.clone();
        let (get, post) = (usher.url("/sleep?ms=100"), usher.url("/echo"));
        tasks.push(tokio::spawn(async move {
            if i % 2 == 0 {
                c.get(&get).await.map(|r| (r.status, String::new()))
            } else {
                let body = format!("body {i}");
                c.request(Method::POST, &post, body.clone()).await.map(|r| {
                    (
                        r.status,
                        if r.text() == body {
                            String::new()
                        } else {
                            r.text()
                        },
                    )
                })
            }
        }));
    }
    for t in tasks {
        let (status, wrong) = t.await.unwrap().expect("request through usher");
        assert_eq!(status, StatusCode::OK);
        assert!(wrong.is_empty(), "echo came back as {wrong:?}");
    }
    let h = healthz(addr);
    assert!(
        h["peak_busy"].as_u64().unwrap() <= 2,
        "worker exceeded its 2 threads: {h}"
    );
    assert!(usher.metric("usher_queue_wait_seconds_count", &[("upstream", "app")]) >= 12.0);
    // A request in flight when SIGTERM comes is still answered.
    let slow = {
        let (c, u) = (client.clone(), usher.url("/sleep?ms=500"));
        tokio::spawn(async move { c.get(&u).await })
    };
    assert!(
        wait_until(Duration::from_secs(10), || healthz(addr)["busy"] == 1),
        "the slow request reached the worker"
    );
    usher.proc.term();
    let r = slow.await.unwrap().expect("answered during the drain");
    assert_eq!(r.status, StatusCode::OK);
    let exit = usher.proc.wait_exit(Duration::from_secs(10));
    assert!(exit.is_some_and(|s| s.success()), "clean exit: {exit:?}");
}

/// Answers Usher makes itself, on a kept-alive plain HTTP/1.1 connection: a
/// HEAD gets the length its GET would have and no body, and a small request
/// body the answer did not need is skipped, so the request pipelined after
/// it is served on the same connection.
#[test]
fn usher_s_own_answers_frame_head_and_keep_the_connection() {
    let (_w, addr) = spawn_worker(["--threads", "1"]);
    let yaml = Config::new()
        .route("app.test", "app")
        .upstream("app", &usher_e2e::usher::backends(&[addr], ""))
        .yaml();
    let usher = Usher::start_ready(&yaml);
    let mut s = TcpStream::connect(usher.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(
        b"HEAD /x HTTP/1.1\r\nHost: nowhere.test\r\n\r\n\
          POST /x HTTP/1.1\r\nHost: nowhere.test\r\nContent-Length: 5\r\n\r\nhello\
          GET /sleep?ms=0 HTTP/1.1\r\nHost: app.test\r\n\r\n",
    )
    .unwrap();
    let mut raw = Vec::new();
    let mut buf = [0u8; 8192];
    // Until the third answer's body (the worker's JSON) is in.
    while !String::from_utf8_lossy(&raw).contains("\"thread\"") {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => raw.extend_from_slice(&buf[..n]),
        }
    }
    let text = String::from_utf8_lossy(&raw).into_owned();
    let heads: Vec<&str> = text
        .match_indices("HTTP/1.1 ")
        .map(|(i, _)| &text[i..i + 12])
        .collect();
    assert_eq!(
        heads,
        ["HTTP/1.1 404", "HTTP/1.1 404", "HTTP/1.1 200"],
        "{text}"
    );
    let (head_answer, rest) = text.split_once("\r\n\r\n").unwrap();
    assert!(
        head_answer
            .to_ascii_lowercase()
            .contains("content-length: "),
        "a HEAD answer says the length: {head_answer}"
    );
    assert!(rest.starts_with("HTTP/1.1 404"), "and has no body: {rest}");
    assert!(
        !text.to_ascii_lowercase().contains("connection: close"),
        "{text}"
    );
}
