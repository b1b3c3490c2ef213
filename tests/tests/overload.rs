//! End-to-end test of overload control in the central queue (CoDel detection
//! with adaptive LIFO, `queue.overload`, on by default): a real Usher in
//! front of a real `usher-worker` with 2 threads, driven past capacity by
//! closed-loop clients. Loopback only; bounded by a request count.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::StatusCode;
use usher_e2e::usher::{Config, Usher};
use usher_e2e::{blocking, spawn_worker, wait_until, Client};

/// One answer a client saw.
struct Seen {
    status: StatusCode,
    took: Duration,
    retry_after: Option<String>,
    body: String,
}

/// The nearest-rank `p` quantile of `v` (sorted here).
fn quantile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() as f64 * p).ceil() as usize).clamp(1, v.len()) - 1]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn past_capacity_the_excess_is_shed_fast_and_the_admitted_barely_wait() {
    // 2 threads of 50 ms views: 40 requests/s. 8 clients sending back to
    // back keep 4 times that many requests open.
    let (_w, addr) = spawn_worker(["--threads", "2"]);
    let usher = Usher::start_ready(
        &Config::app(
            &[addr],
            ", max_in_flight: 2",
            "    queue: { max_depth: 1000, timeout: 5s }\n    retries: { attempts: 0 }",
        )
        .top("access_log: { format: json }")
        .yaml(),
    );
    let healthz = move || -> serde_json::Value {
        blocking::get(&format!("http://{addr}/healthz"))
            .expect("worker /healthz")
            .json()
    };
    let served_before = healthz()["served"].as_u64().unwrap();

    const ADMITTED: u64 = 160;
    const CLIENTS: usize = 8;
    let admitted = Arc::new(AtomicU64::new(0));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let client = Client::new().with_timeout(Duration::from_secs(20));
    let started = Instant::now();
    let tasks: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let (admitted, seen, c) = (admitted.clone(), seen.clone(), client.clone());
            let url = usher.url("/sleep?ms=50");
            tokio::spawn(async move {
                let deadline = Instant::now() + Duration::from_secs(60);
                for _ in 0..10_000 {
                    if admitted.load(Ordering::Relaxed) >= ADMITTED || Instant::now() > deadline {
                        break;
                    }
                    let t0 = Instant::now();
                    let r = c.get(&url).await.expect("every request gets an answer");
                    if r.status == StatusCode::OK {
                        admitted.fetch_add(1, Ordering::Relaxed);
                    }
                    seen.lock().unwrap().push(Seen {
                        status: r.status,
                        took: t0.elapsed(),
                        retry_after: r.header("retry-after").map(String::from),
                        body: r.text(),
                    });
                }
            })
        })
        .collect();

    // While the load runs, the worker's threads stay busy: shedding never
    // leaves a thread idle while someone waits.
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut busy = Vec::new();
            while !stop.load(Ordering::Relaxed) && busy.len() < 100_000 {
                busy.push(healthz()["busy"].as_u64().unwrap());
                std::thread::sleep(Duration::from_millis(10));
            }
            busy
        })
    };
    for t in tasks {
        t.await.unwrap();
    }
    let elapsed = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    let busy = sampler.join().unwrap();
    let seen = std::mem::take(&mut *seen.lock().unwrap());

    let ok = seen.iter().filter(|s| s.status == StatusCode::OK).count() as u64;
    let shed: Vec<&Seen> = seen
        .iter()
        .filter(|s| s.status == StatusCode::SERVICE_UNAVAILABLE)
        .collect();
    assert_eq!(
        ok + shed.len() as u64,
        seen.len() as u64,
        "only 200s and 503s"
    );
    assert!(ok >= ADMITTED);

    // The excess is shed: 503 + Retry-After, saying why, long before the
    // 5 s queue timeout.
    assert!(
        shed.len() >= 20,
        "only {} of {} shed",
        shed.len(),
        seen.len()
    );
    for s in &shed {
        assert_eq!(s.retry_after.as_deref(), Some("1"));
        assert!(s.body.contains("queue overloaded"), "{}", s.body);
        assert!(
            s.took < Duration::from_millis(2500),
            "shed after {:?}",
            s.took
        );
    }
    let mut shed_ms: Vec<f64> = shed.iter().map(|s| s.took.as_secs_f64() * 1e3).collect();
    let shed_p50 = quantile(&mut shed_ms, 0.5);
    assert!(shed_p50 < 500.0, "shed p50 {shed_p50:.0} ms");

    // Every shed request is counted under its own reason; none timed out.
    let metric = |reason| {
        usher.metric(
            "usher_queue_rejections_total",
            &[("upstream", "app"), ("reason", reason)],
        )
    };
    assert_eq!(metric("overload"), shed.len() as f64);
    assert_eq!(metric("timeout"), 0.0);

    // The admitted requests' queue waits (from the access log) stay far
    // below the queue timeout: under LIFO the served ones are the fresh ones.
    assert!(
        wait_until(Duration::from_secs(10), || {
            usher.proc.output().matches("\"status\":200").count() as u64 >= ok
        }),
        "every 200 reaches the access log"
    );
    let mut waits: Vec<f64> = usher
        .proc
        .output()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["status"] == 200 && v["path"] == "/sleep?ms=50")
        .map(|v| v["queue_ms"].as_f64().unwrap())
        .collect();
    assert_eq!(waits.len() as u64, ok);
    let p50 = quantile(&mut waits, 0.5);
    let p90 = quantile(&mut waits, 0.9);
    let max = quantile(&mut waits, 1.0);
    assert!(p50 < 150.0, "admitted queue wait p50 {p50:.0} ms");
    assert!(p90 < 500.0, "admitted queue wait p90 {p90:.0} ms");
    assert!(max < 2500.0, "admitted queue wait max {max:.0} ms");

    // Goodput is the worker's capacity: it served exactly the admitted
    // requests, at close to 2 threads / 50 ms.
    let served = healthz()["served"].as_u64().unwrap() - served_before;
    assert_eq!(served, ok, "the worker ran exactly the admitted requests");
    let goodput = ok as f64 / elapsed.as_secs_f64();
    assert!(goodput > 0.75 * 40.0, "goodput {goodput:.1}/s of 40/s");
    let full = busy.iter().filter(|&&b| b == 2).count();
    assert!(
        busy.len() >= 10 && full as f64 >= 0.75 * busy.len() as f64,
        "both threads busy in only {full} of {} samples",
        busy.len()
    );
    eprintln!(
        "{ok} admitted and {} shed in {elapsed:?}: goodput {goodput:.1}/s; admitted wait \
         p50 {p50:.1} ms, p90 {p90:.1} ms, max {max:.1} ms; shed after p50 {shed_p50:.0} ms; \
         both threads busy in {full}/{} samples",
        shed.len(),
        busy.len()
    );
}
