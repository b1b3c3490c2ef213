//! An operator's first day (issue 11): what Usher tells the person running it.
//!
//! - Health checks that explain themselves, against a real Django app on
//!   waitress that serves one Host only (`tests/apps/django_one_host/app.py`):
//!   without `health_check.host` every probe gets Django's 400, and Usher says
//!   so in its log, in `/status` and in a metric; with it, the backend is up.
//!   `expect` decides which codes pass.
//! - gunicorn's gevent worker: one process serves many requests at once, so
//!   its capacity is `worker_connections` × workers, not threads.
//! - `usher reload`: what changed, or the error with file and line; one bad
//!   edit seen by both the file watch and a SIGHUP counts once.
//! - The access log in a file, reopened on SIGUSR1 after a logrotate-style
//!   rename, without losing a line.
//! - The startup summary and the one-time `default_capacity` warning.
//! - `usher check` with a file, with `-c FILE`, and with none.
//!
//! waitress, gunicorn, gevent and Django must be installed (test.sh does it).
//! A missing one FAILS the test; nothing here skips.
//!
//! Needs `cargo build --workspace --bins` first.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use http::StatusCode;
use usher_e2e::usher::{backends, log_field, metric_value, Config, TempDir, Usher};
use usher_e2e::{
    bin_path, blocking, free_port, healthz_ok, spawn_python, spawn_worker, url, wait_until, Client,
    PyServer, Resp, HTTP_TIMEOUT, START_TIMEOUT,
};

/// The one Host the Django app allows.
const SHOP: &str = "shop.example.com";

/// What Usher says about a health check that got Django's 400.
const REASON_400: &str =
    "answered 400, expected 200-399 (an app that checks Host wants `health_check.host`)";

/// A health check quick enough for a test: down after 2 failures.
const FAST_CHECK: &str = "interval: 100ms, timeout: 1s, rise: 1, fall: 2";

fn tests_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Fails the test (never skips) when a Python module is missing.
fn require_python_modules(modules: &str) {
    let out = Command::new("python3")
        .args(["-c", &format!("import {modules}")])
        .output()
        .unwrap_or_else(|e| panic!("cannot run python3: {e}"));
    assert!(
        out.status.success(),
        "python modules `{modules}` are not all installed; run test.sh, or \
         `python3 -m pip install waitress gunicorn gevent django`:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `GET path` to `addr` with `Host: host`, one connection.
fn get_with_host(addr: SocketAddr, path: &str, host: &str) -> anyhow::Result<Resp> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(HTTP_TIMEOUT))?;
    s.set_write_timeout(Some(HTTP_TIMEOUT))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    blocking::parse_response(&raw)
}

/// The one-Host Django app on waitress.
fn django() -> PyServer {
    require_python_modules("waitress, django");
    let mut cmd = Command::new("python3");
    cmd.args(["-m", "waitress", "--listen=127.0.0.1:0", "app:application"]);
    spawn_python(
        cmd,
        &tests_dir().join("apps/django_one_host"),
        "Serving on http://",
        |a| get_with_host(a, "/healthz", SHOP).is_ok_and(|r| r.status == StatusCode::OK),
    )
}

/// `tests/python/wsgi_app.py` (`/sleep`, `/stats` with its peak
/// concurrency) under `python3 -m <server> <args>`.
fn wsgi_app(server_args: &[&str], marker: &str) -> PyServer {
    let mut cmd = Command::new("python3");
    cmd.args(server_args).arg("wsgi_app:app");
    spawn_python(cmd, &tests_dir().join("python"), marker, healthz_ok)
}

fn waitress_wsgi_app() -> PyServer {
    require_python_modules("waitress");
    wsgi_app(
        &["-m", "waitress", "--listen=127.0.0.1:0", "--threads=4"],
        "Serving on http://",
    )
}

/// Usher in front of `addr` alone, with `upstream_extra` keys (indented by 4).
fn usher_for(addr: SocketAddr, upstream_extra: &str) -> Usher {
    Usher::start(&Config::app(&[addr], "", upstream_extra).yaml())
}

/// The first backend of upstream `app` in `/status`.
fn status_backend(u: &Usher) -> serde_json::Value {
    u.status()["upstreams"]["app"]["backends"][0].clone()
}

/// Waits until the first backend's last health check has `ok`, and returns
/// that backend's `/status` entry.
fn wait_for_check(u: &Usher, ok: bool) -> serde_json::Value {
    let mut b = serde_json::Value::Null;
    let seen = wait_until(Duration::from_secs(10), || {
        b = status_backend(u);
        b["check"]["ok"] == ok
    });
    assert!(
        seen,
        "no health check with ok={ok} in /status; last: {b}\n{}",
        u.proc.output()
    );
    b
}

/// Usher's log line for the backend's health check turning it down.
fn wait_for_down_line(u: &Usher) -> String {
    u.proc
        .wait_for_output("health check failed: backend is down", START_TIMEOUT)
        .unwrap_or_else(|| panic!("no state-change line:\n{}", u.proc.output()))
}

#[test]
fn health_check_without_host_says_the_app_answered_400() {
    let app = django();
    let u = usher_for(
        app.addr,
        &format!("    health_check: {{ path: /healthz, {FAST_CHECK} }}"),
    );

    // The log line of the state change carries the reason and the hint.
    let line = wait_for_down_line(&u);
    assert!(
        line.contains(&format!("reason={REASON_400}")),
        "state-change line without the reason: {line}"
    );
    assert_eq!(
        log_field(&line, "backend"),
        Some(app.addr.to_string().as_str())
    );

    // /status says the same, per backend.
    let b = wait_for_check(&u, false);
    assert_eq!(b["state"], "down", "{b}");
    assert_eq!(b["check"]["reason"], REASON_400, "{b}");

    let failures = u.metric(
        "usher_health_check_failures_total",
        &[("upstream", "app"), ("reason", "status")],
    );
    assert!(
        failures > 0.0,
        "no status failures counted:\n{}",
        u.metrics()
    );

    // And a client, even with the right Host, finds no backend.
    let r = get_with_host(u.addr, "/", SHOP).expect("GET / through usher");
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{}", r.text());
}

#[test]
fn health_check_with_host_and_headers_reaches_django() {
    let app = django();
    // /healthz/token also wants a header: without it Django answers 403.
    let u = usher_for(
        app.addr,
        &format!(
            "    health_check: {{ path: /healthz/token, {FAST_CHECK}, host: {SHOP}, \
             headers: {{ X-Health-Token: s3cret }} }}"
        ),
    );
    u.wait_ready();
    let checks = || {
        let m = u.metrics();
        let ok = metric_value(&m, "usher_health_checks_total", &[("result", "success")]);
        let failed = metric_value(&m, "usher_health_checks_total", &[("result", "failure")]);
        (ok, failed)
    };
    assert!(
        wait_until(Duration::from_secs(10), || checks().0 >= 3.0),
        "fewer than 3 passed checks: {:?}\n{}",
        checks(),
        u.proc.output()
    );
    assert_eq!(checks().1, 0.0, "some checks failed:\n{}", u.metrics());
    let b = wait_for_check(&u, true);
    assert_eq!(b["state"], "up", "{b}");
    assert_eq!(b["check"]["reason"], serde_json::Value::Null, "{b}");

    let r = get_with_host(u.addr, "/", SHOP).expect("GET / through usher");
    assert_eq!(
        (r.status, r.text().as_str()),
        (StatusCode::OK, "shop front\n")
    );
}

#[test]
fn health_check_expect_200_marks_a_redirect_down() {
    let app = django();
    // The default expect (200-399) passes the 302 of /login: only the 200
    // that `expect: [200]` asks for fails it.
    let u = usher_for(
        app.addr,
        &format!("    health_check: {{ path: /login, {FAST_CHECK}, host: {SHOP}, expect: [200] }}"),
    );
    let line = wait_for_down_line(&u);
    assert!(
        line.contains("reason=answered 302, expected 200 path=/login"),
        "{line}"
    );
    let b = wait_for_check(&u, false);
    assert_eq!(
        (&b["state"], &b["check"]["reason"]),
        (
            &serde_json::json!("down"),
            &serde_json::json!("answered 302, expected 200")
        ),
        "{b}"
    );

    // The same check with the default `expect` keeps it up.
    let u = usher_for(
        app.addr,
        &format!("    health_check: {{ path: /login, {FAST_CHECK}, host: {SHOP} }}"),
    );
    u.wait_ready();
    let b = wait_for_check(&u, true);
    assert_eq!(b["state"], "up", "{b}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gunicorn_gevent_serves_many_requests_at_once_in_one_process() {
    const N: usize = 40;
    require_python_modules("gunicorn, gevent");
    let app = tokio::task::spawn_blocking(|| {
        wsgi_app(
            &[
                "-m",
                "gunicorn",
                "--bind",
                "127.0.0.1:0",
                "--no-control-socket",
                "-k",
                "gevent",
                "--worker-connections",
                "50",
                "--workers",
                "1",
            ],
            "Listening at: http://",
        )
    })
    .await
    .expect("start gunicorn");
    // Capacity = worker_connections × workers: the process has no thread pool
    // to count, and `auto` would guess default_capacity (4).
    let usher = tokio::task::spawn_blocking({
        let addr = app.addr;
        move || {
            Usher::start_ready(
                &Config::app(
                    &[addr],
                    ", max_in_flight: 50",
                    "    queue: { max_depth: 1000, timeout: 30s }\n    timeouts: { response: 30s }",
                )
                .top("access_log: { format: off }")
                .yaml(),
            )
        }
    })
    .await
    .expect("start usher");

    let client = Client::new();
    let tasks: Vec<_> = (0..N)
        .map(|_| {
            let (client, u) = (client.clone(), usher.url("/sleep?ms=500"));
            tokio::spawn(async move { client.get(&u).await })
        })
        .collect();
    let mut bad = Vec::new();
    for (i, t) in tasks.into_iter().enumerate() {
        match t.await.expect("request task") {
            Ok(r) if r.status == StatusCode::OK && r.text() == "slept 500\n" => {}
            Ok(r) => bad.push(format!("#{i}: {} {:?}", r.status, r.text())),
            Err(e) => bad.push(format!("#{i}: {e:#}")),
        }
    }
    assert!(
        bad.is_empty(),
        "{} of {N} failed:\n{}",
        bad.len(),
        bad.join("\n")
    );

    let stats = blocking::get(&url(app.addr, "/stats"))
        .expect("GET /stats")
        .json();
    let (peak, served) = (stats["peak"].as_u64(), stats["served"].as_u64());
    assert_eq!(served, Some(N as u64), "{stats}");
    assert!(
        peak.is_some_and(|p| (20..=50).contains(&p)),
        "one gevent process should have served 20..=50 requests at once: {stats}"
    );
}

/// Runs `usher ARGS` to the end.
fn usher_cli(args: &[&str]) -> Output {
    Command::new(bin_path("usher"))
        .args(args)
        .output()
        .expect("run usher")
}

fn text(out: &[u8]) -> String {
    String::from_utf8_lossy(out).into_owned()
}

/// Replaces `path` with `content` (same length) so that Usher's file watch
/// does not notice: the new file keeps the old modification time. Only the
/// `usher reload` run after it applies the edit, so what it prints is not
/// racing the watch (which polls mtime and length once a second).
fn edit_unseen(path: &Path, from: &str, to: &str) {
    assert_eq!(from.len(), to.len(), "an unseen edit keeps the length");
    let old = std::fs::read_to_string(path).expect("read config");
    assert!(old.contains(from), "{from:?} not in:\n{old}");
    let mtime = std::fs::metadata(path)
        .and_then(|m| m.modified())
        .expect("config mtime");
    let tmp = path.with_extension("edit");
    std::fs::write(&tmp, old.replacen(from, to, 1)).expect("write edit");
    std::fs::File::options()
        .write(true)
        .open(&tmp)
        .and_then(|f| f.set_modified(mtime))
        .expect("keep the mtime");
    std::fs::rename(&tmp, path).expect("rename the edit into place");
}

fn reloads(u: &Usher, result: &str) -> f64 {
    u.metric("usher_config_reloads_total", &[("result", result)])
}

fn count_lines(u: &Usher, needle: &str) -> usize {
    u.proc
        .output()
        .lines()
        .filter(|l| l.contains(needle))
        .count()
}

#[test]
fn usher_reload_prints_what_changed_and_rejects_a_bad_edit() {
    let app = waitress_wsgi_app();
    let admin = format!("127.0.0.1:{}", free_port());
    // A `timeout:` key (the health check's) comes before the queue's, so the
    // error's line number must come from the key path, not a text search.
    let yaml = Config::app(
        &[app.addr],
        ", max_in_flight: 4",
        "    health_check: { path: /healthz, timeout: 1s, interval: 200ms }\n    \
         queue: { max_depth: 100 }",
    )
    .yaml()
    .replace("ADMIN", &admin);
    let u = Usher::start_ready(&yaml);
    let file = u.config_path.to_str().expect("utf-8 path").to_string();
    let capacity = || status_backend(&u)["capacity"].clone();
    assert_eq!(capacity(), 4);

    // `usher reload -c FILE`: exit 0 and what changed.
    edit_unseen(&u.config_path, "max_in_flight: 4", "max_in_flight: 2");
    let out = usher_cli(&["reload", "-c", &file]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        text(&out.stdout),
        format!(
            "usher: configuration reloaded: upstream app: {} max_in_flight 4 → 2\n",
            app.addr
        )
    );
    assert_eq!(capacity(), 2);
    assert_eq!(reloads(&u, "success"), 1.0);

    // `usher reload FILE` is the same.
    edit_unseen(&u.config_path, "max_in_flight: 2", "max_in_flight: 3");
    let out = usher_cli(&["reload", &file]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        text(&out.stdout),
        format!(
            "usher: configuration reloaded: upstream app: {} max_in_flight 2 → 3\n",
            app.addr
        )
    );
    assert_eq!(capacity(), 3);

    // A file that is valid but that the running Usher refuses: exit 1, the
    // reason from Usher itself, nothing changed.
    let listen = r#"address: "127.0.0.1:0""#;
    let moved = r#"address: "127.0.0.1:1""#;
    edit_unseen(&u.config_path, listen, moved);
    let failed_before = reloads(&u, "failure");
    let out = usher_cli(&["reload", &file]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = text(&out.stderr);
    assert!(
        err.contains("listeners and admin address cannot change on reload")
            && err.contains("reload rejected; the running configuration is unchanged"),
        "{err}"
    );
    assert_eq!(reloads(&u, "failure"), failed_before + 1.0);
    edit_unseen(&u.config_path, moved, listen);

    // A broken edit, seen by the file watch and followed by a SIGHUP.
    let broken = std::fs::read_to_string(&u.config_path)
        .expect("read config")
        .replace(
            "queue: { max_depth: 100 }",
            "queue: { max_depth: 100, timeout: 0s }",
        );
    let (line_no, line) = broken
        .lines()
        .enumerate()
        .find(|(_, l)| l.contains("timeout: 0s"))
        .expect("the broken line");
    let at = format!("{file}:{}:{}:", line_no + 1, line.find("0s").unwrap() + 1);
    let failed_before = reloads(&u, "failure");
    let (failed_lines, unchanged_lines) = (
        count_lines(&u, "configuration reload failed"),
        count_lines(&u, "configuration file unchanged since the last reload"),
    );
    std::fs::write(&u.config_path, &broken).expect("write broken config");
    let out = usher_cli(&["reload", &file]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = text(&out.stderr);
    assert!(
        err.contains(&format!(
            "{at} upstreams.app.queue.timeout: must be above zero"
        )),
        "want the error at {at}, got:\n{err}"
    );
    u.proc.signal(nix::sys::signal::Signal::SIGHUP);
    // Both triggers handled: one reload that failed, one that found the
    // same bytes.
    assert!(
        wait_until(Duration::from_secs(10), || {
            count_lines(&u, "configuration reload failed") > failed_lines
                && count_lines(&u, "configuration file unchanged since the last reload")
                    > unchanged_lines
        }),
        "the file watch and SIGHUP were not both handled:\n{}",
        u.proc.output()
    );
    assert_eq!(
        reloads(&u, "failure"),
        failed_before + 1.0,
        "{}",
        u.metrics()
    );
    assert_eq!(capacity(), 3, "the running config changed");
    let r = blocking::get(&u.url("/sleep?ms=1")).expect("GET through usher");
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
}

/// The access-log lines in `path` (none if it does not exist), parsed.
fn access_lines(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l:?}")))
        .collect()
}

/// The `path`s of the access-log lines, sorted.
fn paths(lines: &[serde_json::Value]) -> Vec<String> {
    let mut v: Vec<String> = lines
        .iter()
        .map(|l| l["path"].as_str().unwrap_or_default().to_string())
        .collect();
    v.sort();
    v
}

#[test]
fn access_log_file_is_reopened_on_sigusr1_without_losing_lines() {
    const N: usize = 25;
    let (_w, addr) = spawn_worker(["--threads", "2"]);
    let dir = TempDir::new("access-log");
    let log = dir.path().join("access.log");
    let rotated = dir.path().join("access.log.1");
    let u = Usher::start_ready(
        &Config::app(&[addr], "", "")
            .top(&format!(
                "access_log: {{ format: json, path: {:?} }}",
                log.display()
            ))
            .yaml(),
    );
    let send = |from: usize| -> Vec<String> {
        (from..from + N)
            .map(|i| {
                let p = format!("/sleep?ms=0&n={i:03}");
                let r = blocking::get(&u.url(&p)).expect("GET through usher");
                assert_eq!(r.status, StatusCode::OK, "{}", r.text());
                p
            })
            .collect()
    };

    let first = send(0);
    assert!(
        wait_until(Duration::from_secs(10), || access_lines(&log).len() >= N),
        "{} of {N} lines in {}",
        access_lines(&log).len(),
        log.display()
    );
    // logrotate: rename, then signal.
    std::fs::rename(&log, &rotated).expect("rotate");
    u.proc.signal(nix::sys::signal::Signal::SIGUSR1);
    u.proc
        .wait_for_output("access log reopened", Duration::from_secs(10))
        .unwrap_or_else(|| panic!("no reopen:\n{}", u.proc.output()));
    let second = send(N);
    assert!(
        wait_until(Duration::from_secs(10), || access_lines(&log).len() >= N),
        "{} of {N} lines in the new {}",
        access_lines(&log).len(),
        log.display()
    );

    assert_eq!(paths(&access_lines(&rotated)), first, "the rotated file");
    assert_eq!(paths(&access_lines(&log)), second, "the new file");
    assert!(
        access_lines(&log).iter().all(|l| l["status"] == 200),
        "{:?}",
        access_lines(&log)
    );
    let metrics = u.metrics();
    assert!(
        metrics
            .lines()
            .any(|l| l == "usher_access_log_dropped_total 0"),
        "usher_access_log_dropped_total 0 not exported:\n{metrics}"
    );
}

/// `format: off` at start, turned on by a reload and off again: lines are
/// written from the reload on, to the configured file, and stop when it is
/// off (the writer is started only when the log is first turned on).
#[test]
fn access_log_turned_on_by_a_reload_writes_to_its_file() {
    let (_w, addr) = spawn_worker(["--threads", "2"]);
    let dir = TempDir::new("access-log-on");
    let log = dir.path().join("access.log");
    let off = format!("access_log: {{ format: off,  path: {:?} }}", log.display());
    let json = format!("access_log: {{ format: json, path: {:?} }}", log.display());
    let u = Usher::start_ready(&Config::app(&[addr], "", "").top(&off).yaml());
    let get = |p: &str| {
        let r = blocking::get(&u.url(p)).expect("GET through usher");
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    };
    let reload = |from: &str, to: &str| {
        let before = reloads(&u, "success");
        edit_unseen(&u.config_path, from, to);
        u.proc.signal(nix::sys::signal::Signal::SIGHUP);
        assert!(
            wait_until(Duration::from_secs(10), || reloads(&u, "success") > before),
            "the reload to {to:?} did not succeed:\n{}",
            u.proc.output()
        );
    };

    let lines_reach = |n: usize| {
        assert!(
            wait_until(Duration::from_secs(10), || access_lines(&log).len() >= n),
            "{:?} in {}",
            access_lines(&log),
            log.display()
        );
    };

    get("/sleep?ms=0&n=off-1");
    reload(&off, &json);
    get("/sleep?ms=0&n=on-1");
    get("/sleep?ms=0&n=on-2");
    lines_reach(2);
    reload(&json, &off);
    get("/sleep?ms=0&n=off-2");
    // Lines are written in order: one sent after this marker shows that
    // "off-2" was not written.
    reload(&off, &json);
    get("/sleep?ms=0&n=on-3");
    lines_reach(3);
    assert_eq!(
        paths(&access_lines(&log)),
        [
            "/sleep?ms=0&n=on-1",
            "/sleep?ms=0&n=on-2",
            "/sleep?ms=0&n=on-3"
        ],
        "only the requests made while the log was on"
    );
}

#[test]
fn startup_summary_names_config_listeners_and_capacity_sources() {
    let (_fixed, fixed) = spawn_worker(["--threads", "2"]);
    let (_reporting, reporting) = spawn_worker(["--threads", "5"]);
    let waitress = waitress_wsgi_app();
    let internal = format!("127.0.0.1:{}", free_port());
    let yaml = Config::new()
        .listeners(&format!(
            "  - {{ name: public, address: \"LISTEN\" }}\n  - {{ name: internal, address: \"{internal}\" }}"
        ))
        .route("fixed.test", "fixed")
        .route("reporting.test", "reporting")
        .route("*", "guessed")
        .upstream("fixed", &backends(&[fixed], ", max_in_flight: 3"))
        .upstream("reporting", &backends(&[reporting], ""))
        .upstream(
            "guessed",
            &format!("{}\n    default_capacity: 6", backends(&[waitress.addr], "")),
        )
        .top("access_log: { format: off }")
        .yaml();
    let u = Usher::start_ready(&yaml);
    // The summary's last line: everything before it has been read too.
    let _ = u
        .proc
        .wait_for_output("usher is serving", Duration::from_secs(10));
    let log = u.proc.output();
    let line = |needle: &str| -> String {
        log.lines()
            .find(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("no line with {needle:?} in:\n{log}"))
            .to_string()
    };

    let start = line("usher starting");
    assert_eq!(
        log_field(&start, "config"),
        u.config_path.to_str(),
        "{start}"
    );
    let public = line("listener listener=public");
    assert!(public.contains("proto=http"), "{public}");
    let internal_line = line("listener listener=internal");
    assert!(
        internal_line.contains(&format!("address={internal} proto=http")),
        "{internal_line}"
    );
    for (name, want) in [
        ("fixed", format!("backends={fixed} ×3 (max_in_flight)")),
        (
            "reporting",
            format!("backends={reporting} ×5 (worker's report)"),
        ),
        (
            "guessed",
            format!("backends={} ×6 (default_capacity)", waitress.addr),
        ),
    ] {
        let l = line(&format!("upstream upstream={name} source=static"));
        assert!(l.ends_with(&want), "want {want:?} in {l}");
    }

    // waitress sends no load report: the first response warns, once.
    const WARNING: &str = "max_in_flight is auto but the backend reports no thread count";
    for _ in 0..10 {
        let r = blocking::get(&u.url("/")).expect("GET through usher");
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        let r = get_with_host(u.addr, "/sleep?ms=1", "reporting.test").expect("GET reporting");
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    }
    // A line logged after every request is done: what precedes it in the
    // log has been read.
    u.proc.signal(nix::sys::signal::Signal::SIGUSR1);
    u.proc
        .wait_for_output("SIGUSR1 ignored", Duration::from_secs(10))
        .unwrap_or_else(|| panic!("no SIGUSR1 line:\n{}", u.proc.output()));
    let warnings: Vec<String> = u
        .proc
        .output()
        .lines()
        .filter(|l| l.contains(WARNING))
        .map(String::from)
        .collect();
    assert_eq!(warnings.len(), 1, "{warnings:#?}");
    let w = &warnings[0];
    assert_eq!(
        log_field(w, "backend"),
        Some(waitress.addr.to_string().as_str()),
        "{w}"
    );
    assert!(
        w.contains("using default_capacity") && w.contains("capacity=6"),
        "{w}"
    );
}

#[test]
fn usher_check_takes_a_file_or_checks_the_embedded_default() {
    let dir = TempDir::new("check");
    let good = dir.path().join("good.yaml");
    let bad = dir.path().join("bad.yaml");
    let no_admin = dir.path().join("no-admin.yaml");
    let yaml = Config::app(&["127.0.0.1:9".parse().unwrap()], "", "").yaml();
    let yaml = yaml.replace("LISTEN", "127.0.0.1:0");
    std::fs::write(&good, yaml.replace("ADMIN", "127.0.0.1:0")).unwrap();
    std::fs::write(
        &no_admin,
        yaml.lines()
            .filter(|l| !l.starts_with("admin:"))
            .collect::<Vec<_>>()
            .join("\n"),
    )
    .unwrap();
    std::fs::write(
        &bad,
        yaml.replace("ADMIN", "127.0.0.1:0")
            .replace("backends:", "default_capacity: 0\n    backends:"),
    )
    .unwrap();
    let (good, bad, no_admin) = (
        good.to_str().unwrap(),
        bad.to_str().unwrap(),
        no_admin.to_str().unwrap(),
    );

    for args in [
        ["check", good].as_slice(),
        &["check", "-c", good],
        &["-c", good, "check"],
    ] {
        let out = usher_cli(args);
        assert!(out.status.success(), "{args:?}: {out:?}");
        assert_eq!(
            text(&out.stdout),
            format!("usher: configuration {good} is valid\n"),
            "{args:?}"
        );
    }

    let out = usher_cli(&["check"]);
    assert!(out.status.success(), "{out:?}");
    assert!(
        text(&out.stdout).contains("the embedded default configuration is valid"),
        "{out:?}"
    );

    let out = usher_cli(&["check", bad]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = text(&out.stderr);
    assert!(
        err.contains(&format!("usher: error: {bad}:"))
            && err.contains("upstreams.app.default_capacity: must be at least 1")
            && err.contains(&format!("usher: configuration {bad} has 1 error(s)")),
        "{err}"
    );

    // `usher reload` needs the admin listener to send the reload to.
    let out = usher_cli(&["reload", no_admin]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        text(&out.stderr).contains("has no `admin:` listener")
            && text(&out.stderr).contains("kill -HUP"),
        "{out:?}"
    );
}
