//! Fleet rolling restart: a reload with a changed fleet command (a new app
//! version) replaces the processes one at a time — start new, wait until it
//! accepts, drain old, stop old — with zero failed requests.

use std::time::Duration;

use usher_e2e::load::SteadyLoad;
use usher_e2e::usher::{concrete, Config, Usher};
use usher_e2e::{replace_file, wait_until};

fn config(threads: u32) -> String {
    let fleet = format!(
        r#"    fleet:
      command: [usher-worker, --threads, "{threads}", --listen, "127.0.0.1:{{port}}"]
      processes: 2
      base_port: 0
    health_check: {{ path: /healthz, interval: 200ms, timeout: 500ms, rise: 1, fall: 2 }}
    queue: {{ max_depth: 1000, timeout: 10s }}"#
    );
    Config::new()
        .route("*", "app")
        .upstream("app", &fleet)
        .top("access_log: { format: off }")
        .top("timeouts: { shutdown_grace: 10s }")
        .yaml()
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
    // Ready means one backend is up; the fleet starts in the background, so
    // wait for both (each at its reported 2 threads).
    assert!(
        wait_until(Duration::from_secs(20), || {
            let b = backends(&usher);
            b.len() == 2 && b.iter().all(|b| b.1 == 2 && b.2 == "up")
        }),
        "both fleet processes up: {:?}",
        backends(&usher)
    );
    let before = backends(&usher);
    let old_addrs: Vec<String> = before.iter().map(|b| b.0.clone()).collect();

    // Some slow requests, so old processes have work in flight when drained.
    let urls = [
        usher.url("/sleep?ms=300"),
        usher.url("/sleep?ms=5"),
        usher.url("/sleep?ms=5"),
        usher.url("/sleep?ms=5"),
    ];
    let load = SteadyLoad::start(&urls, Duration::from_millis(5), Duration::from_secs(90));
    assert!(load.wait_for_more(50, Duration::from_secs(10)));

    // New app version: three threads per process.
    // Same listener strings as at start (Usher::start writes 127.0.0.1:0).
    replace_file(&usher.config_path, &concrete(&config(3)));
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
    assert!(load.wait_for_more(50, Duration::from_secs(10)));
    let (_, failures) = load.finish().await;
    assert!(
        failures.is_empty(),
        "no request failed during the rollout: {failures:?}"
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
