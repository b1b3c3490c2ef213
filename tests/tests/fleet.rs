//! Usher's process supervision and shutdown, with real processes (issue 3).
//!
//! - `fleet:` restarts a worker killed with SIGKILL while traffic keeps
//!   flowing without a single failed request;
//! - SIGTERM stops Usher with exit code 0 and takes every fleet process with it;
//! - SIGTERM while 50 requests are queued or in flight lets all of them finish,
//!   with `/readyz` answering 503 during the drain;
//! - fleet processes do not outlive an Usher killed with SIGKILL.
//!
//! Needs `cargo build --workspace --bins` first.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::StatusCode;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use usher_e2e::usher::{log_field, metric_value, pid_gone, Config, Usher};
use usher_e2e::{blocking, spawn_worker, url, wait_until, Client, Resp};

/// The fleet config of these tests: 2 `usher-worker --threads 2` processes
/// on free ports, with fast health checks.
const FLEET_YAML: &str = r#"listeners: [{ name: public, address: LISTEN }]
admin: { address: ADMIN }
routes: [{ upstream: app }]
upstreams:
  app:
    fleet:
      command: [usher-worker, --threads, "2", --listen, "127.0.0.1:{port}"]
      processes: 2
      base_port: 0
    health_check: { path: /healthz, interval: 200ms, timeout: 500ms, rise: 1, fall: 2 }
    queue: { max_depth: 1000, timeout: 20s }
timeouts: { shutdown_grace: 5s }
access_log: { format: json }
"#;

/// A running Usher with a fleet. On drop (also when a test fails) it stops
/// Usher with SIGTERM and then SIGKILLs any fleet process still alive, so no
/// test leaves workers behind even if Usher's own cleanup is broken.
struct FleetUsher(Usher);

impl std::ops::Deref for FleetUsher {
    type Target = Usher;
    fn deref(&self) -> &Usher {
        &self.0
    }
}

impl std::ops::DerefMut for FleetUsher {
    fn deref_mut(&mut self) -> &mut Usher {
        &mut self.0
    }
}

impl Drop for FleetUsher {
    fn drop(&mut self) {
        let pids: Vec<i32> = self.0.fleet_processes().iter().map(|&(_, p)| p).collect();
        if self.0.proc.wait_exit(Duration::ZERO).is_none() {
            let _ = kill(Pid::from_raw(self.0.proc.pid() as i32), Signal::SIGTERM);
            self.0.proc.wait_exit(Duration::from_secs(15));
        }
        for pid in pids {
            if !pid_gone(pid, Duration::from_secs(2)) {
                eprintln!("fleet process {pid} outlived usher; killing it");
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
    }
}

/// Usher supervising [`FLEET_YAML`]'s fleet, ready, with both backends up.
fn start_fleet() -> FleetUsher {
    let usher = FleetUsher(Usher::start(FLEET_YAML));
    usher.wait_ready();
    assert!(
        wait_until(Duration::from_secs(20), || usher.fleet_processes().len()
            >= 2),
        "usher did not log 2 `fleet process started` lines:\n{}",
        usher.proc.output()
    );
    assert!(
        wait_until(Duration::from_secs(20), || all_backends_up(&usher, 2)),
        "the fleet's backends did not come up: {}",
        usher.status()
    );
    usher
}

/// Whether `/status` lists `n` backends for `app`, all `up`.
fn all_backends_up(usher: &Usher, n: usize) -> bool {
    let Ok(r) = blocking::get(&usher.admin_url("/status")) else {
        return false;
    };
    let s = r.json();
    let backends = s["upstreams"]["app"]["backends"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    backends.len() == n && backends.iter().all(|b| b["state"] == "up")
}

fn sigkill(pid: i32) {
    kill(Pid::from_raw(pid), Signal::SIGKILL).unwrap_or_else(|e| panic!("kill -9 {pid}: {e}"));
}

/// Results of a background load: one (time sent, outcome) per request.
type Outcomes = Arc<Mutex<Vec<(Instant, Result<(), String>)>>>;

#[test]
fn fleet_restarts_a_killed_worker_and_no_request_fails() {
    let usher = start_fleet();
    let first = usher.fleet_processes();
    let (victim_addr, victim) = first[0];

    // Background load: 4 clients, each at most 1500 requests and 60 s, one
    // new connection per request.
    const CLIENTS: usize = 4;
    const PER_CLIENT: usize = 1500;
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicUsize::new(0));
    let outcomes: Outcomes = Arc::default();
    let deadline = Instant::now() + Duration::from_secs(60);
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let (stop, done, outcomes) = (stop.clone(), done.clone(), outcomes.clone());
            let u = usher.url("/sleep?ms=10");
            std::thread::spawn(move || {
                for _ in 0..PER_CLIENT {
                    if stop.load(Ordering::Relaxed) || Instant::now() > deadline {
                        break;
                    }
                    let sent = Instant::now();
                    let outcome = match blocking::get(&u) {
                        Ok(r) if r.status == StatusCode::OK => Ok(()),
                        Ok(r) => Err(format!("{} {:?}", r.status, r.text())),
                        Err(e) => Err(format!("{e:#}")),
                    };
                    outcomes.lock().unwrap().push((sent, outcome));
                    done.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();

    let traffic = |n: usize| {
        let target = done.load(Ordering::Relaxed) + n;
        wait_until(Duration::from_secs(30), || {
            done.load(Ordering::Relaxed) >= target
        })
    };
    assert!(traffic(40), "no traffic flowing before the kill");

    let killed_at = Instant::now();
    sigkill(victim);
    assert!(
        pid_gone(victim, Duration::from_secs(5)),
        "pid {victim} survived kill -9"
    );

    // A new process is started on the same address.
    let replaced = wait_until(Duration::from_secs(20), || {
        usher
            .fleet_processes()
            .iter()
            .any(|&(a, p)| a == victim_addr && p != victim)
    });
    assert!(
        replaced,
        "no new fleet process for {victim_addr} after kill -9 of pid {victim}:\n{}",
        usher.proc.output()
    );
    let (_, new_pid) = *usher
        .fleet_processes()
        .iter()
        .rfind(|&&(a, _)| a == victim_addr)
        .expect("new process line");
    assert!(
        wait_until(Duration::from_secs(10), || usher
            .metric("usher_fleet_restarts_total", &[("upstream", "app")])
            >= 1.0),
        "usher_fleet_restarts_total did not count the restart:\n{}",
        usher.metrics()
    );
    assert!(
        wait_until(Duration::from_secs(20), || all_backends_up(&usher, 2)),
        "the restarted backend did not come back up: {}",
        usher.status()
    );
    // Traffic after the restart, reaching the new process too.
    assert!(traffic(100), "traffic stalled after the restart");
    let worker_served = |addr: SocketAddr| {
        blocking::get(&url(addr, "/metrics")).map_or(0.0, |r| {
            metric_value(&r.text(), "usher_worker_requests_total", &[("code", "200")])
        })
    };
    assert!(
        wait_until(Duration::from_secs(20), || worker_served(victim_addr) > 0.0),
        "the new process (pid {new_pid}) at {victim_addr} got no proxied requests"
    );

    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.join().expect("client thread panicked");
    }
    let outcomes = outcomes.lock().unwrap();
    let failures: Vec<String> = outcomes
        .iter()
        .filter_map(|(sent, o)| {
            o.as_ref().err().map(|e| {
                let at = if *sent >= killed_at {
                    format!("{:?} after", sent.duration_since(killed_at))
                } else {
                    format!("{:?} before", killed_at.duration_since(*sent))
                };
                format!("sent {at} the kill: {e}")
            })
        })
        .collect();
    let after = outcomes.iter().filter(|(s, _)| *s >= killed_at).count();
    assert!(after >= 100, "only {after} requests after the kill");
    // PROXY BUG (reported; this assertion fails intermittently, about 1 run
    // in 10): a GET in flight on the killed worker fails there ("error"),
    // and its retries, which avoid that backend only "if anything else is
    // free" (Balancer::pick), go straight back to it while the surviving
    // backend's slots are busy: a stale pooled connection, then a refused
    // connect, and the 3 attempts are spent within ~7 ms. The client gets
    // "502 cannot reach backend" although the other backend frees a slot
    // 10 ms later. Expected: a retry waits for a backend it has not failed
    // on while one is up.
    let m = usher.metrics();
    let related: Vec<&str> = m
        .lines()
        .filter(|l| {
            [
                "usher_retries_total",
                "usher_backend_requests_total",
                "usher_backend_ejections_total",
            ]
            .iter()
            .any(|n| l.starts_with(n))
        })
        .collect();
    let out = usher.proc.output();
    let log: Vec<&str> = out
        .lines()
        .filter(|l| !l.contains("\"status\":200"))
        .collect();
    assert!(
        failures.is_empty(),
        "{} of {} GETs failed around kill -9 of a fleet worker \
         (expected none: connect failures are retried on the other backend):\n{}\n\
         metrics:\n{}\nusher's log without 200s:\n{}",
        failures.len(),
        outcomes.len(),
        failures.join("\n"),
        related.join("\n"),
        log.join("\n")
    );
}

#[test]
fn sigterm_exits_zero_and_stops_every_fleet_process() {
    let mut usher = start_fleet();
    for _ in 0..10 {
        let r = blocking::get(&usher.url("/sleep?ms=1")).expect("GET through usher");
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    }
    let pids: Vec<i32> = usher.fleet_processes().iter().map(|&(_, p)| p).collect();
    assert_eq!(pids.len(), 2, "{}", usher.proc.output());

    let sent = Instant::now();
    usher.proc.term();
    // Grace is 5 s; an idle Usher has nothing to drain.
    let status = usher.proc.wait_exit(Duration::from_secs(10));
    let took = sent.elapsed();
    let status = status.unwrap_or_else(|| {
        panic!(
            "usher still running 10 s after SIGTERM:\n{}",
            usher.proc.output()
        )
    });
    assert_eq!(
        status.code(),
        Some(0),
        "usher exit {status} after SIGTERM:\n{}",
        usher.proc.output()
    );
    assert!(
        took <= Duration::from_secs(5),
        "an idle usher took {took:?} to stop (grace 5 s)"
    );
    for pid in pids {
        assert!(
            pid_gone(pid, Duration::from_secs(2)),
            "fleet process {pid} survived usher's exit:\n{}",
            usher.proc.output()
        );
    }
}

#[test]
fn fleet_processes_exit_when_usher_is_killed() {
    let mut usher = start_fleet();
    let pids: Vec<i32> = usher.fleet_processes().iter().map(|&(_, p)| p).collect();
    assert_eq!(pids.len(), 2, "{}", usher.proc.output());

    usher.proc.signal(Signal::SIGKILL);
    assert!(
        usher.proc.wait_exit(Duration::from_secs(5)).is_some(),
        "usher survived kill -9"
    );
    for pid in pids {
        let gone = pid_gone(pid, Duration::from_secs(5));
        if !gone {
            // Do not leave it behind for the next test.
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        assert!(
            gone,
            "fleet process {pid} still runs 5 s after usher was killed with SIGKILL"
        );
    }
}

/// `kill -9` of Usher together with whatever reads its log (a pipeline such
/// as `usher | logger`, a container runtime's log pipe): the workers inherit
/// Usher's stderr, whose reader is gone too. They must still exit.
///
/// Regression test: `watch_parent` used to announce the exit with
/// `eprintln!`, which panics when stderr is a pipe without a reader (EPIPE).
/// The panic ended only the watcher thread, so the worker ran on forever as
/// an orphan of init, still bound to its port (fixed in 2afbf5a).
#[test]
fn fleet_processes_exit_when_usher_is_killed_with_its_log_reader() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};

    let dir = usher_e2e::usher::TempDir::new("fleet-pipe");
    let config = dir.0.join("usher.yaml");
    let yaml = FLEET_YAML
        .replace("LISTEN", "127.0.0.1:0")
        .replace("admin: { address: ADMIN }\n", "");
    std::fs::write(&config, yaml).expect("write config");
    let mut child = Command::new(usher_e2e::bin_path("usher"))
        .arg("-c")
        .arg(&config)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start usher");
    let stderr = child.stderr.take().expect("usher stderr");

    // The log reader: it reads until the fleet is serving, then goes away,
    // closing the only read end of the pipe.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut log = String::new();
        let mut pids = Vec::new();
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if line.contains("fleet process started") {
                if let Some(pid) = log_field(&line, "pid").and_then(|p| p.parse::<i32>().ok()) {
                    pids.push(pid);
                }
            }
            let serving = line.contains("usher is serving");
            log.push_str(&line);
            log.push('\n');
            if serving {
                break;
            }
        }
        let _ = tx.send((pids, log));
    });
    let got = rx.recv_timeout(Duration::from_secs(30));
    let usher_pid = Pid::from_raw(child.id() as i32);
    let _ = kill(usher_pid, Signal::SIGKILL);
    let _ = child.wait();
    let (pids, log) = got.expect("usher did not log `usher is serving` within 30 s");
    assert_eq!(pids.len(), 2, "fleet pids in the log:\n{log}");

    let survivors: Vec<i32> = pids
        .iter()
        .copied()
        .filter(|&pid| !pid_gone(pid, Duration::from_secs(5)))
        .collect();
    for &pid in &survivors {
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
    }
    assert!(
        survivors.is_empty(),
        "fleet processes {survivors:?} still run 5 s after usher and its log reader were killed"
    );
}

/// Gauge values from one `/metrics` scrape: (queued, in flight, completed).
async fn load_snapshot(client: &Client, usher: &Usher) -> Option<(f64, f64, f64)> {
    let m = client.get(&usher.admin_url("/metrics")).await.ok()?.text();
    let queued = metric_value(&m, "usher_queue_depth", &[("upstream", "app")]);
    let in_flight = metric_value(&m, "usher_backend_in_flight", &[("upstream", "app")]);
    let completed = metric_value(&m, "usher_requests_total", &[("upstream", "app")]);
    Some((queued, in_flight, completed))
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_drains_queued_and_in_flight_requests() {
    const N: usize = 50;
    let (_w1, a1) = spawn_worker(["--threads", "2"]);
    let (_w2, a2) = spawn_worker(["--threads", "2"]);
    let mut usher = Usher::start(
        &Config::app(&[a1, a2], "", "    queue: { max_depth: 100, timeout: 30s }")
            .top("timeouts: { shutdown_grace: 30s }")
            .top("access_log: { format: off }")
            .yaml(),
    );
    usher.wait_ready();

    // 50 × 300 ms on 2 × 2 threads: about 13 rounds, 4 s.
    let client = Client::new().with_timeout(Duration::from_secs(60));
    let requests: Vec<_> = (0..N)
        .map(|_| {
            let (client, u) = (client.clone(), usher.url("/sleep?ms=300"));
            tokio::spawn(async move { client.get(&u).await })
        })
        .collect();

    // Wait until every request is inside Usher (queued, in flight or done)
    // and some are still queued.
    let admin = Client::new().with_timeout(Duration::from_secs(5));
    let deadline = Instant::now() + Duration::from_secs(20);
    let (queued, in_flight, completed) = loop {
        let snap = load_snapshot(&admin, &usher).await;
        if let Some((q, f, c)) = snap {
            if q > 0.0 && q + f + c >= N as f64 {
                break (q, f, c);
            }
        }
        assert!(
            Instant::now() < deadline,
            "the {N} requests never were all inside usher with some queued; \
             last (queued, in flight, done) = {snap:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    };

    usher.proc.term();
    // /readyz turns 503 while the queue drains (about 4 s); a refused
    // connection is only acceptable once usher has exited.
    let readyz = usher.admin_url("/readyz");
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut seen = Vec::new();
    loop {
        let s = admin
            .get(&readyz)
            .await
            .map(|r| r.status)
            .map_err(|e| format!("{e:#}"));
        seen.push(s.clone());
        if s == Ok(StatusCode::SERVICE_UNAVAILABLE) || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let exited = usher.proc.wait_exit(Duration::ZERO);
    assert_eq!(
        seen.last(),
        Some(&Ok(StatusCode::SERVICE_UNAVAILABLE)),
        "/readyz did not answer 503 after SIGTERM (usher exited: {exited:?}); saw {seen:?}"
    );
    assert!(
        seen.iter().all(|s| match s {
            Ok(code) => [StatusCode::OK, StatusCode::SERVICE_UNAVAILABLE].contains(code),
            Err(_) => exited.is_some(),
        }),
        "/readyz after SIGTERM, with usher still running: {seen:?}"
    );

    let mut bad = Vec::new();
    for (i, t) in requests.into_iter().enumerate() {
        match t.await.expect("request task panicked") {
            Ok(Resp { status, .. }) if status == StatusCode::OK => {}
            Ok(r) => bad.push(format!("#{i}: {} {:?}", r.status, r.text())),
            Err(e) => bad.push(format!("#{i}: {e:#}")),
        }
    }
    assert!(
        bad.is_empty(),
        "{} of {N} requests failed after SIGTERM (at SIGTERM: {queued} queued, \
         {in_flight} in flight, {completed} done):\n{}",
        bad.len(),
        bad.join("\n")
    );

    let status = tokio::task::block_in_place(|| usher.proc.wait_exit(Duration::from_secs(30)));
    let status = status.unwrap_or_else(|| {
        panic!(
            "usher still running 30 s after SIGTERM with the queue drained:\n{}",
            usher.proc.output()
        )
    });
    assert_eq!(
        status.code(),
        Some(0),
        "usher exit {status}:\n{}",
        usher.proc.output()
    );
}
