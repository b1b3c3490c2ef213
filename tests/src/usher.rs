//! Running the real `usher` binary in tests, and writing its config.
//!
//! [`Usher::start`] writes a config to a temp file, starts `usher -c FILE`
//! with its listener and admin on `127.0.0.1:0`, and reads the bound
//! addresses from its log ([`log_field`]). Write `LISTEN` and `ADMIN` in the
//! YAML where the addresses go; [`Config`] does.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use http::StatusCode;

use crate::{bin_path, blocking, wait_until, Proc, START_TIMEOUT};

/// A running Usher.
pub struct Usher {
    pub proc: Proc,
    /// The first client listener.
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub config_path: PathBuf,
    _dir: TempDir,
}

/// A temporary directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!(
            "usher-test-{tag}-{}-{}",
            std::process::id(),
            fastrand::u64(..)
        ));
        std::fs::create_dir_all(&p).expect("create temp dir");
        TempDir(p)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The value of the field `key` in one of Usher's log lines
/// (`... listening listener=public addr=127.0.0.1:4000`), quotes trimmed.
/// Matches whole field names only: `addr` does not find `peer_addr=`.
pub fn log_field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|field| field.strip_prefix(key)?.strip_prefix('='))
        .map(|v| v.trim_matches('"'))
}

/// The `addr=` of a log line, parsed.
pub fn log_addr(line: &str) -> Option<SocketAddr> {
    log_field(line, "addr")?.parse().ok()
}

/// `yaml` with its `LISTEN`/`ADMIN` placeholders filled in as
/// [`Usher::start`] fills them, for a config written while Usher runs (a
/// reload must not change the listener addresses).
pub fn concrete(yaml: &str) -> String {
    yaml.replace("LISTEN", "127.0.0.1:0")
        .replace("ADMIN", "127.0.0.1:0")
}

impl Usher {
    /// Starts Usher on `yaml` (with `LISTEN`/`ADMIN` placeholders) and waits
    /// until `/livez` answers. Does not wait for readiness: see [`Usher::wait_ready`].
    pub fn start(yaml: &str) -> Usher {
        Usher::start_with_env(yaml, &[])
    }

    /// [`Usher::start`] with more environment variables (e.g. `USHER_REPLICA_ID`).
    pub fn start_with_env(yaml: &str, env: &[(&str, &str)]) -> Usher {
        let dir = TempDir::new("usher");
        let config_path = dir.0.join("usher.yaml");
        std::fs::write(&config_path, concrete(yaml)).expect("write config");
        let mut cmd = Command::new(bin_path("usher"));
        cmd.arg("-c").arg(&config_path).env("RUST_LOG", "info");
        cmd.envs(env.iter().copied());
        let mut proc = Proc::spawn(cmd);
        let mut line = None;
        wait_until(START_TIMEOUT, || {
            line = proc
                .output()
                .lines()
                .find(|l| l.contains("listening listener="))
                .map(String::from);
            line.is_some() || proc.wait_exit(Duration::ZERO).is_some()
        });
        let line = line.unwrap_or_else(|| panic!("usher did not start:\n{}", proc.output()));
        let addr = log_addr(&line).expect("listener address in log");
        let admin_line = proc
            .wait_for_output("admin listening", START_TIMEOUT)
            .expect("admin listener in log");
        let admin = log_addr(&admin_line).expect("admin address in log");
        let livez = format!("http://{admin}/livez");
        assert!(
            wait_until(START_TIMEOUT, || blocking::get(&livez)
                .is_ok_and(|r| r.status == StatusCode::OK)),
            "usher admin did not answer"
        );
        Usher {
            proc,
            addr,
            admin,
            config_path,
            _dir: dir,
        }
    }

    /// Starts and waits until `/readyz` is 200.
    pub fn start_ready(yaml: &str) -> Usher {
        let u = Usher::start(yaml);
        u.wait_ready();
        u
    }

    pub fn wait_ready(&self) {
        let readyz = self.admin_url("/readyz");
        assert!(
            wait_until(START_TIMEOUT, || blocking::get(&readyz)
                .is_ok_and(|r| r.status == StatusCode::OK)),
            "usher did not become ready:\n{}",
            self.proc.output()
        );
    }

    /// Every client listener's address, by name, from the log.
    pub fn listeners(&self) -> HashMap<String, SocketAddr> {
        self.proc
            .output()
            .lines()
            .filter(|l| l.contains("listening listener="))
            .filter_map(|l| Some((log_field(l, "listener")?.to_string(), log_addr(l)?)))
            .collect()
    }

    /// Every `fleet process started` log line so far, in order, as
    /// (address, pid): a restarted process appears again.
    pub fn fleet_processes(&self) -> Vec<(SocketAddr, i32)> {
        self.proc
            .output()
            .lines()
            .filter(|l| l.contains("fleet process started"))
            .map(|l| {
                let addr = log_addr(l).unwrap_or_else(|| panic!("no addr in {l:?}"));
                let pid = log_field(l, "pid")
                    .and_then(|p| p.parse().ok())
                    .unwrap_or_else(|| panic!("no pid in {l:?}"));
                (addr, pid)
            })
            .collect()
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{}", self.admin, path)
    }

    /// The `/metrics` text.
    pub fn metrics(&self) -> String {
        blocking::get(&self.admin_url("/metrics"))
            .expect("GET /metrics")
            .text()
    }

    /// The `/status` JSON.
    pub fn status(&self) -> serde_json::Value {
        blocking::get(&self.admin_url("/status"))
            .expect("GET /status")
            .json()
    }

    /// Sum of the samples of `name` whose labels contain every `k="v"` in `labels`.
    pub fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        metric_value(&self.metrics(), name, labels)
    }
}

/// An Usher config, built from parts; [`Config::yaml`] writes it out.
///
/// It starts with one listener, `public` on `LISTEN`, and admin on `ADMIN`
/// (both filled in by [`Usher::start`]), and has only the routes and
/// upstreams added to it. The YAML given to it is pasted in as is, so a test
/// can say anything the config format can.
#[derive(Debug, Clone)]
pub struct Config {
    listeners: String,
    routes: Vec<String>,
    upstreams: Vec<String>,
    top: Vec<String>,
}

impl Default for Config {
    fn default() -> Self {
        Self::new()
    }
}

impl Config {
    /// One listener and admin; no routes, no upstreams.
    pub fn new() -> Config {
        Config {
            listeners: r#"  - { name: public, address: "LISTEN" }"#.to_string(),
            routes: Vec::new(),
            upstreams: Vec::new(),
            top: Vec::new(),
        }
    }

    /// Every request routed to upstream `app` over `addrs`: `backend_extra`
    /// goes inside each backend's map (e.g. `, max_in_flight: 1`),
    /// `upstream_extra` after the backend list (more keys of `app`, indented
    /// by 4).
    pub fn app(addrs: &[SocketAddr], backend_extra: &str, upstream_extra: &str) -> Config {
        Config::new().route("*", "app").upstream(
            "app",
            &format!("{}\n{upstream_extra}", backends(addrs, backend_extra)),
        )
    }

    /// Replaces the listeners with `block`: the items of the `listeners:`
    /// list, indented by 2.
    pub fn listeners(mut self, block: &str) -> Config {
        self.listeners = block.to_string();
        self
    }

    /// Routes requests for `host` (`"*"` for any), every path, to `upstream`.
    pub fn route(mut self, host: &str, upstream: &str) -> Config {
        self.routes.push(format!(
            "  - {{ host: {host:?}, path_prefix: /, upstream: {upstream} }}"
        ));
        self
    }

    /// Adds upstream `name` with the keys in `body`, indented by 4 (see
    /// [`backends`] for a backend list).
    pub fn upstream(mut self, name: &str, body: &str) -> Config {
        self.upstreams.push(format!("  {name}:\n{body}"));
        self
    }

    /// Adds top-level sections (`access_log: ...`, `timeouts: ...`).
    pub fn top(mut self, yaml: &str) -> Config {
        self.top.push(yaml.to_string());
        self
    }

    /// The config as YAML, with the `LISTEN`/`ADMIN` placeholders.
    pub fn yaml(&self) -> String {
        let mut lines = vec![
            "listeners:".to_string(),
            self.listeners.clone(),
            r#"admin: { address: "ADMIN" }"#.to_string(),
            "routes:".to_string(),
        ];
        lines.extend(self.routes.iter().cloned());
        lines.push("upstreams:".to_string());
        lines.extend(self.upstreams.iter().cloned());
        lines.extend(self.top.iter().cloned());
        lines.join("\n") + "\n"
    }
}

/// A `backends:` key (indented by 4) listing `addrs`, with `extra` inside
/// each backend's map (e.g. `, max_in_flight: 1`).
pub fn backends(addrs: &[SocketAddr], extra: &str) -> String {
    let mut out = "    backends:".to_string();
    for a in addrs {
        out.push_str(&format!("\n      - {{ address: \"{a}\"{extra} }}"));
    }
    out
}

/// Sum of the samples of `name` (exact metric name) in Prometheus text
/// whose labels include every `k="v"` of `labels`.
pub fn metric_value(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (n, lbl) = match series.split_once('{') {
                Some((n, rest)) => (n, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            if n != name {
                return None;
            }
            let ok = labels
                .iter()
                .all(|(k, v)| lbl.split(',').any(|kv| kv == format!("{k}=\"{v}\"")));
            ok.then(|| value.parse::<f64>().ok()).flatten()
        })
        .sum()
}

/// Runs `usher check ARGS`, asserts that it rejects the config (exit 1), and
/// returns its stderr.
pub fn check_rejects<I, S>(args: I) -> String
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let out = Command::new(bin_path("usher"))
        .arg("check")
        .args(args)
        .output()
        .expect("run usher check");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "usher check: {stderr}");
    stderr
}

/// Waits up to `timeout` for the process to have exited.
pub fn pid_gone(pid: i32, timeout: Duration) -> bool {
    wait_until(timeout, || {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_err()
            || std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .map(|s| s.contains(") Z "))
                .unwrap_or(true)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_fields_match_whole_names() {
        let line = "2026-01-01T00:00:00Z  INFO usher::app: listening listener=\"public\" \
                    peer_addr=10.0.0.1:1 addr=127.0.0.1:4000 pid=7";
        assert_eq!(log_field(line, "listener"), Some("public"));
        assert_eq!(log_addr(line), Some("127.0.0.1:4000".parse().unwrap()));
        assert_eq!(log_field(line, "pid"), Some("7"));
        assert_eq!(log_field(line, "id"), None);
    }

    #[test]
    fn config_writes_every_part_in_place() {
        let a: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let b: SocketAddr = "127.0.0.1:2".parse().unwrap();
        let yaml = Config::app(
            &[a, b],
            ", max_in_flight: 1",
            "    retries: { attempts: 0 }",
        )
        .route("x.test", "other")
        .upstream("other", &backends(&[b], ""))
        .top("access_log: { format: off }")
        .yaml();
        let v: serde_yaml::Value = serde_yaml::from_str(&yaml).expect(&yaml);
        assert_eq!(v["listeners"][0]["address"], "LISTEN", "{yaml}");
        assert_eq!(v["admin"]["address"], "ADMIN", "{yaml}");
        assert_eq!(v["routes"][0]["host"], "*", "{yaml}");
        assert_eq!(v["routes"][1]["upstream"], "other", "{yaml}");
        let app = &v["upstreams"]["app"];
        assert_eq!(app["backends"][1]["address"], "127.0.0.1:2", "{yaml}");
        assert_eq!(app["backends"][1]["max_in_flight"], 1, "{yaml}");
        assert_eq!(app["retries"]["attempts"], 0, "{yaml}");
        assert_eq!(
            v["upstreams"]["other"]["backends"][0]["address"],
            "127.0.0.1:2"
        );
        assert_eq!(v["access_log"]["format"], "off", "{yaml}");
    }
}
