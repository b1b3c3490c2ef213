//! A fleet's life as an operator sees it on the first day (issue 11), with
//! commands that are not `usher-worker`: Python's `http.server`, a shell
//! wrapper, a command that exits at once, one that starts slowly, one whose
//! port is taken.
//!
//! - fleet processes, and their own children, are gone within seconds of a
//!   SIGKILLed Usher, and the next Usher starts its fleet on the same config;
//! - `usher check` (and a reload) refuses a command that does not exist,
//!   naming `upstreams.X.fleet.command` and its line;
//! - a command that exits at once leaves Usher answering `/livez` at once,
//!   `/readyz` 503, requests 503, and SIGTERM stops it promptly;
//! - a slow starter is down (503) until it accepts, then up, and no request
//!   in between gets a 502;
//! - a process that exits is down until its restart accepts;
//! - a taken port is logged with the pid and command line holding it, and
//!   retried without counting restarts until it is free.
//!
//! Needs `cargo build --workspace --bins` first, and `python3` on PATH.

use std::collections::HashSet;
use std::net::{SocketAddr, TcpListener};
use std::process::Command;
use std::time::{Duration, Instant};

use http::StatusCode;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use usher_e2e::usher::{check_rejects, concrete, pid_gone, Config, TempDir, Usher};
use usher_e2e::{bin_path, blocking, wait_until, Proc};

/// An upstream `app` run as a fleet of `processes` of `command` (a YAML
/// flow list), on free ports unless `base_port` says otherwise.
fn fleet_yaml(command: &str, processes: u32, base_port: u16) -> String {
    Config::new()
        .route("*", "app")
        .upstream(
            "app",
            &format!(
                "    fleet:\n      command: {command}\n      processes: {processes}\n      base_port: {base_port}"
            ),
        )
        .top("timeouts: { shutdown_grace: 5s }")
        .yaml()
}

/// Python's file server on the process's port.
const HTTP_SERVER: &str = r#"[python3, -m, http.server, "{port}", --bind, 127.0.0.1]"#;

/// The status of a GET, or the error as text.
fn status(url: &str) -> Result<StatusCode, String> {
    blocking::get_within(url, Duration::from_secs(5))
        .map(|r| r.status)
        .map_err(|e| format!("{e:#}"))
}

fn readyz(usher: &Usher) -> Result<StatusCode, String> {
    status(&usher.admin_url("/readyz"))
}

/// Sends SIGTERM to Usher, asserts that it exits 0, and returns how long
/// that took.
fn term_exits_zero(proc: &mut Proc) -> Duration {
    let sent = Instant::now();
    proc.term();
    let exit = proc.wait_exit(Duration::from_secs(10));
    let took = sent.elapsed();
    assert_eq!(
        exit.and_then(|s| s.code()),
        Some(0),
        "usher did not exit 0 after SIGTERM:\n{}",
        proc.output()
    );
    took
}

/// Every process whose process group is `leader` (a fleet process leads
/// its own group: itself, its children, the spawn watchdog).
fn group_members(leader: i32) -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                return false;
            };
            // `pid (comm) state ppid pgrp ...`; comm may hold spaces.
            let Some((_, rest)) = stat.rsplit_once(") ") else {
                return false;
            };
            let fields: Vec<&str> = rest.split_whitespace().collect();
            fields.get(2).and_then(|g| g.parse::<i32>().ok()) == Some(leader)
                && fields.first() != Some(&"Z")
        })
        .collect()
}

/// SIGKILLs whatever of `pids` still runs (so a failing test leaves
/// nothing behind) and returns those.
fn kill_survivors(pids: &[i32], within: Duration) -> Vec<i32> {
    let survivors: Vec<i32> = pids
        .iter()
        .copied()
        .filter(|&p| !pid_gone(p, within))
        .collect();
    for &p in &survivors {
        let _ = kill(Pid::from_raw(p), Signal::SIGKILL);
    }
    survivors
}

/// Usher started on `yaml`, with how long `/livez` took to answer after the
/// admin listener's log line.
fn start_timed(yaml: &str) -> (Proc, SocketAddr, SocketAddr, Duration, TempDir) {
    let dir = TempDir::new("lifecycle");
    let config = dir.path().join("usher.yaml");
    std::fs::write(&config, concrete(yaml)).expect("write config");
    let mut cmd = Command::new(bin_path("usher"));
    cmd.arg("-c").arg(&config).env("RUST_LOG", "info");
    let proc = Proc::spawn(cmd);
    let admin_line = proc
        .wait_for_output("admin listening", Duration::from_secs(30))
        .unwrap_or_else(|| panic!("no admin listener line:\n{}", proc.output()));
    let seen = Instant::now();
    let admin = usher_e2e::usher::log_addr(&admin_line).expect("admin address");
    let livez = format!("http://{admin}/livez");
    assert!(
        wait_until(Duration::from_secs(30), || status(&livez)
            == Ok(StatusCode::OK)),
        "/livez never answered:\n{}",
        proc.output()
    );
    let took = seen.elapsed();
    let line = proc
        .wait_for_output("listening listener=", Duration::from_secs(5))
        .expect("listener line");
    let addr = usher_e2e::usher::log_addr(&line).expect("listener address");
    (proc, addr, admin, took, dir)
}

#[test]
fn fleet_processes_and_their_children_die_with_a_sigkilled_usher() {
    // Python directly, and Python under a shell that stays its parent (the
    // `; exit` keeps sh from exec'ing it), so Python is a grandchild.
    let yaml = Config::new()
        .route("*", "app")
        .route("wrapped.test", "wrapped")
        .upstream(
            "app",
            &format!("    fleet: {{ command: {HTTP_SERVER}, processes: 2, base_port: 0 }}"),
        )
        .upstream(
            "wrapped",
            r#"    fleet: { command: [sh, -c, 'python3 -m http.server "$0" --bind 127.0.0.1; exit 0', "{port}"], processes: 1, base_port: 0 }"#,
        )
        .yaml();
    let mut usher = Usher::start(&yaml);
    usher.wait_ready();
    let status_has_all_up = || {
        let s = usher.status();
        ["app", "wrapped"].iter().all(|u| {
            s["upstreams"][u]["backends"]
                .as_array()
                .is_some_and(|bs| bs.iter().all(|b| b["state"] == "up"))
        })
    };
    assert!(
        wait_until(Duration::from_secs(20), status_has_all_up),
        "the fleets did not all come up: {}",
        usher.status()
    );
    let fleet = usher.fleet_processes();
    assert_eq!(fleet.len(), 3, "{}", usher.proc.output());
    let ports: Vec<u16> = fleet.iter().map(|(a, _)| a.port()).collect();
    // Every process of every fleet process's group: the Pythons, the shell,
    // the spawn watchdogs.
    let all: Vec<i32> = fleet
        .iter()
        .flat_map(|&(_, pid)| group_members(pid))
        .collect();
    assert!(
        all.len() >= 4,
        "expected the 3 fleet processes and the wrapped Python at least, found {all:?}"
    );
    let wrapped_leader = fleet
        .iter()
        .map(|&(_, pid)| pid)
        .find(|&pid| {
            std::fs::read_to_string(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| c.starts_with("sh"))
        })
        .expect("the shell wrapper among the fleet processes");
    let python_under_sh = group_members(wrapped_leader)
        .into_iter()
        .filter(|&p| {
            std::fs::read_to_string(format!("/proc/{p}/cmdline"))
                .is_ok_and(|c| c.contains("http.server"))
                && p != wrapped_leader
        })
        .count();
    assert_eq!(python_under_sh, 1, "Python is not a child of the shell");

    usher.proc.signal(Signal::SIGKILL);
    assert!(usher.proc.wait_exit(Duration::from_secs(5)).is_some());
    let survivors = kill_survivors(&all, Duration::from_secs(5));
    assert!(
        survivors.is_empty(),
        "processes {survivors:?} of the fleet (of {all:?}) still run 5 s after usher was SIGKILLed"
    );
    // Nothing holds the fleet's ports any more.
    for port in ports {
        assert!(
            wait_until(Duration::from_secs(5), || TcpListener::bind((
                "127.0.0.1",
                port
            ))
            .is_ok()),
            "port {port} is still taken after usher and its fleet are gone"
        );
    }

    // The next Usher on the same config starts its fleet.
    let next = Usher::start(&yaml);
    next.wait_ready();
    assert!(
        wait_until(Duration::from_secs(20), || {
            let s = next.status();
            s["upstreams"]["wrapped"]["backends"][0]["state"] == "up"
                && s["upstreams"]["app"]["backends"]
                    .as_array()
                    .is_some_and(|bs| bs.len() == 2 && bs.iter().all(|b| b["state"] == "up"))
        }),
        "the second usher's fleet did not come up: {}\n{}",
        next.status(),
        next.proc.output()
    );
    let r = blocking::get(&next.url("/")).expect("GET through the second usher");
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
}

#[test]
fn usher_check_and_reload_refuse_a_fleet_command_that_does_not_exist() {
    let bad = fleet_yaml(r#"[/nonexistent/app, "{port}"]"#, 1, 0);
    let line = concrete(&bad)
        .lines()
        .position(|l| l.contains("/nonexistent/app"))
        .expect("command line in the config")
        + 1;
    let dir = TempDir::new("check");
    let file = dir.path().join("bad.yaml");
    std::fs::write(&file, concrete(&bad)).unwrap();

    let stderr = check_rejects([&file]);
    let expected = format!("{}:{line}:", file.display());
    assert!(
        stderr.lines().any(|l| l.contains(&expected)
            && l.contains("upstreams.app.fleet.command")
            && l.contains("`/nonexistent/app` does not exist")),
        "usher check did not name the key and line {expected}:\n{stderr}"
    );

    // A running Usher refuses the same file on reload and keeps serving.
    let usher = Usher::start(&fleet_yaml(HTTP_SERVER, 1, 0));
    usher.wait_ready();
    std::fs::write(&usher.config_path, concrete(&bad)).unwrap();
    let r = blocking::request("POST", &usher.admin_url("/reload"), b"").expect("POST /reload");
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", r.text());
    assert!(
        r.text().contains("upstreams.app.fleet.command") && r.text().contains("does not exist"),
        "the reload did not say why: {}",
        r.text()
    );
    assert_eq!(readyz(&usher), Ok(StatusCode::OK));
}

#[test]
fn a_command_that_exits_at_once_leaves_usher_answering_and_stoppable() {
    let yaml = fleet_yaml(
        r#"[python3, -c, "import sys; sys.exit(3)", "{port}"]"#,
        2,
        0,
    );
    let (mut proc, addr, admin, livez_took, _dir) = start_timed(&yaml);
    assert!(
        livez_took < Duration::from_secs(1),
        "/livez took {livez_took:?} after the admin listener's line"
    );
    // It keeps exiting and being restarted; nothing is ever up.
    assert!(
        wait_until(Duration::from_secs(20), || proc
            .output()
            .matches("fleet process exited before it accepted connections; restarting")
            .count()
            >= 4),
        "no restarts logged:\n{}",
        proc.output()
    );
    assert!(
        proc.output().contains("status=exit code 3"),
        "{}",
        proc.output()
    );
    assert_eq!(
        status(&format!("http://{admin}/readyz")),
        Ok(StatusCode::SERVICE_UNAVAILABLE)
    );
    let r = blocking::get_within(&format!("http://{addr}/"), Duration::from_secs(5))
        .expect("GET through usher");
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{}", r.text());

    let took = term_exits_zero(&mut proc);
    assert!(
        took < Duration::from_secs(2),
        "SIGTERM took {took:?} to stop usher"
    );
}

#[test]
fn a_slow_starter_is_down_until_it_accepts_and_no_request_gets_a_502() {
    // Sleeps 2 s before it binds its port.
    let command = r#"[python3, -c, "import runpy, sys, time; time.sleep(2); sys.argv = ['http.server', sys.argv[1], '--bind', '127.0.0.1']; runpy.run_module('http.server', run_name='__main__')", "{port}"]"#;
    let (proc, addr, admin, livez_took, _dir) = start_timed(&fleet_yaml(command, 1, 0));
    assert!(
        livez_took < Duration::from_secs(1),
        "/livez took {livez_took:?} while the fleet was starting"
    );
    let readyz = format!("http://{admin}/readyz");
    let app = format!("http://{addr}/");
    assert_eq!(
        status(&readyz),
        Ok(StatusCode::SERVICE_UNAVAILABLE),
        "ready before the process accepts:\n{}",
        proc.output()
    );

    // Requests all through the start, until one gets through.
    let mut seen = Vec::new();
    let up = wait_until(Duration::from_secs(30), || {
        let s = status(&app);
        let ok = s == Ok(StatusCode::OK);
        seen.push(s);
        ok
    });
    assert!(up, "the slow starter never served:\n{}", proc.output());
    assert!(
        seen.iter().all(
            |s| matches!(s, Ok(c) if *c == StatusCode::OK || *c == StatusCode::SERVICE_UNAVAILABLE)
        ),
        "requests during the start got something else than 503 or 200: {:?}",
        seen.iter()
            .filter(|s| **s != Ok(StatusCode::SERVICE_UNAVAILABLE))
            .collect::<Vec<_>>()
    );
    assert!(
        seen.contains(&Ok(StatusCode::SERVICE_UNAVAILABLE)),
        "no request was sent while it started"
    );
    assert_eq!(status(&readyz), Ok(StatusCode::OK));
    assert!(
        proc.output()
            .contains("fleet process is accepting connections"),
        "{}",
        proc.output()
    );
}

#[test]
fn a_process_that_exits_is_down_until_its_restart_accepts() {
    let usher = Usher::start(&fleet_yaml(HTTP_SERVER, 1, 0));
    usher.wait_ready();
    let state = || usher.status()["upstreams"]["app"]["backends"][0]["state"].clone();
    assert!(wait_until(Duration::from_secs(20), || state() == "up"));
    let (_, pid) = usher.fleet_processes()[0];

    kill(Pid::from_raw(pid), Signal::SIGKILL).unwrap();
    assert!(
        wait_until(Duration::from_secs(5), || state() == "down"),
        "the backend was not marked down"
    );
    assert!(
        wait_until(Duration::from_secs(20), || usher.fleet_processes().len()
            == 2
            && state() == "up"),
        "the restarted process did not come up: {}\n{}",
        usher.status(),
        usher.proc.output()
    );
    assert_eq!(
        usher.metric("usher_fleet_restarts_total", &[("upstream", "app")]),
        1.0
    );
    assert!(usher.proc.output().contains("status=killed by SIGKILL"));
    let r = blocking::get(&usher.url("/")).expect("GET after the restart");
    assert_eq!(r.status, StatusCode::OK);
}

#[test]
fn a_taken_port_is_reported_with_its_owner_and_retried_until_free() {
    let squatter = TcpListener::bind("127.0.0.1:0").expect("bind a port");
    let port = squatter.local_addr().unwrap().port();
    let usher = Usher::start(&fleet_yaml(HTTP_SERVER, 1, port));

    let expected = format!(
        "fleet port 127.0.0.1:{port} is taken by pid {} (",
        std::process::id()
    );
    let line = usher
        .proc
        .wait_for_output(&expected, Duration::from_secs(10))
        .unwrap_or_else(|| panic!("no `{expected}` line:\n{}", usher.proc.output()));
    assert!(line.contains("; not starting"), "{line}");
    let me = std::env::current_exe().unwrap();
    let me = me.file_name().unwrap().to_str().unwrap();
    assert!(
        line.contains(me),
        "the line does not name this test's command: {line}"
    );

    // While the port is taken (Usher retries at 100 ms, 200 ms, ...):
    // not ready, nothing started, no restart counted.
    let watch_until = Instant::now() + Duration::from_millis(1500);
    while Instant::now() < watch_until {
        assert_eq!(readyz(&usher), Ok(StatusCode::SERVICE_UNAVAILABLE));
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        usher.fleet_processes().is_empty(),
        "{}",
        usher.proc.output()
    );
    assert_eq!(
        usher.metric("usher_fleet_restarts_total", &[("upstream", "app")]),
        0.0
    );
    assert_eq!(
        usher.proc.output().matches(&expected).count(),
        1,
        "the same owner was logged more than once"
    );

    drop(squatter);
    assert!(
        wait_until(Duration::from_secs(20), || readyz(&usher)
            == Ok(StatusCode::OK)),
        "usher did not become ready once the port was free:\n{}",
        usher.proc.output()
    );
    let started: HashSet<u16> = usher
        .fleet_processes()
        .iter()
        .map(|(a, _)| a.port())
        .collect();
    assert_eq!(started, HashSet::from([port]));
    assert_eq!(
        usher.metric("usher_fleet_restarts_total", &[("upstream", "app")]),
        0.0
    );
    let r = blocking::get(&usher.url("/")).expect("GET once started");
    assert_eq!(r.status, StatusCode::OK);
}

#[test]
fn sigterm_while_the_fleet_is_still_starting_stops_usher_at_once() {
    // A process that takes 60 s before it binds its port.
    let command = r#"[python3, -c, "import time; time.sleep(60)", "{port}"]"#;
    let (mut proc, _addr, admin, _, _dir) = start_timed(&fleet_yaml(command, 2, 0));
    let line = proc
        .wait_for_output("fleet process started", Duration::from_secs(10))
        .expect("a fleet process started");
    let pid: i32 = usher_e2e::usher::log_field(&line, "pid")
        .and_then(|p| p.parse().ok())
        .expect("pid in the started line");
    assert_eq!(
        status(&format!("http://{admin}/readyz")),
        Ok(StatusCode::SERVICE_UNAVAILABLE)
    );

    let took = term_exits_zero(&mut proc);
    assert!(
        took < Duration::from_secs(2),
        "SIGTERM took {took:?} with the fleet still starting"
    );
    assert!(
        kill_survivors(&[pid], Duration::from_secs(2)).is_empty(),
        "the starting process {pid} outlived usher"
    );
}
