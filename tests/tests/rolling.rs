//! Fleet rolling restart: a reload with a changed fleet command (a new app
//! version) replaces the processes one at a time — start new, wait until it
//! accepts, drain old, stop old — with zero failed requests.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::StatusCode;
use usher_e2e::usher::Usher;
use usher_e2e::{wait_until, Client};

fn config(threads: u32) -> String {
    format!(
        r#"
listeners: [{{ name: public, address: "LISTEN" }}]
admin: {{ address: "ADMIN" }}
routes: [{{ path_prefix: /, upstream: app }}]
upstreams:
  app:
    fleet:
      command: [usher-worker, --threads, "{threads}", --listen, "127.0.0.1:{{port}}"]
      processes: 2
      base_port: 0
    health_check: {{ path: /healthz, interval: 200ms, timeout: 500ms, rise: 1, fall: 2 }}
    queue: {{ max_depth: 1000, timeout: 10s }}
access_log: {{ format: off }}
timeouts: {{ shutdown_grace: 10s }}
"#
    )
}

fn backends(usher: &Usher) -> Vec<(String, u64, String)> {
    usher.status()["upstreams"]["app"]["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            (
                b["address"].as_str().unwrap().to_string(),
                b["capacity"].as_u64().unwrap(),
                b["state"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_changed_fleet_command_rolls_with_zero_failed_requests() {
    let usher = Usher::start_ready(&config(2));
    let before = backends(&usher);
    assert_eq!(before.len(), 2);
    assert!(before.iter().all(|b| b.1 == 2), "{before:?}");
    let old_addrs: Vec<String> = before.iter().map(|b| b.0.clone()).collect();

    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(AtomicU64::new(0));
    let ok = Arc::new(AtomicU64::new(0));
    let client = Client::new();
    let mut load = Vec::new();
    for i in 0..4 {
        let (stop, failures, ok, c) = (stop.clone(), failures.clone(), ok.clone(), client.clone());
        // Some slow requests, so old processes have work in flight when drained.
        let url = usher.url(if i == 0 {
            "/sleep?ms=300"
        } else {
            "/sleep?ms=5"
        });
        load.push(tokio::spawn(async move {
            let deadline = Instant::now() + Duration::from_secs(90);
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                match c.get(&url).await {
                    Ok(r) if r.status == StatusCode::OK => ok.fetch_add(1, Ordering::Relaxed),
                    Ok(r) => {
                        eprintln!("failed: {} {}", r.status, r.text());
                        failures.fetch_add(1, Ordering::Relaxed)
                    }
                    Err(e) => {
                        eprintln!("failed: {e:#}");
                        failures.fetch_add(1, Ordering::Relaxed)
                    }
                };
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }));
    }
    assert!(wait_until(Duration::from_secs(10), || ok
        .load(Ordering::Relaxed)
        > 50));

    // New app version: three threads per process.
    // Same listener strings as at start (Usher::start writes 127.0.0.1:0).
    let next = config(3)
        .replace("LISTEN", "127.0.0.1:0")
        .replace("ADMIN", "127.0.0.1:0");
    std::fs::write(&usher.config_path, next).unwrap();
    let rolled = wait_until(Duration::from_secs(60), || {
        let now = backends(&usher);
        now.len() == 2
            && now
                .iter()
                .all(|b| b.1 == 3 && b.2 == "up" && !old_addrs.contains(&b.0))
    });
    assert!(
        rolled,
        "fleet rolled to the new version: {:?}\n{}",
        backends(&usher),
        usher.proc.output()
    );
    let after = ok.load(Ordering::Relaxed);
    assert!(wait_until(Duration::from_secs(10), || ok
        .load(Ordering::Relaxed)
        > after + 50));
    stop.store(true, Ordering::Relaxed);
    for t in load {
        t.await.unwrap();
    }
    assert_eq!(
        failures.load(Ordering::Relaxed),
        0,
        "no request failed during the rollout"
    );
    assert_eq!(
        usher.metric("usher_config_reloads_total", &[("result", "success")]),
        1.0
    );
    assert!(usher.proc.output().contains("rolling restart done"));
    // The old processes are gone.
    for a in &old_addrs {
        let addr: std::net::SocketAddr = a.parse().unwrap();
        assert!(
            wait_until(Duration::from_secs(10), || std::net::TcpStream::connect(
                addr
            )
            .is_err()),
            "old process on {a} was stopped"
        );
    }
}
