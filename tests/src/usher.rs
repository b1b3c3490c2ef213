//! Running the real `usher` binary in tests.
//!
//! [`Usher::start`] writes a config to a temp file, starts `usher -c FILE`
//! with its listener and admin on `127.0.0.1:0`, and reads the bound
//! addresses from its log. Write `LISTEN` and `ADMIN` in the YAML where the
//! addresses go.

use std::net::SocketAddr;
use std::path::PathBuf;
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
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn addr_after(line: &str, key: &str) -> Option<SocketAddr> {
    line.split(key)
        .nth(1)?
        .split_whitespace()
        .next()?
        .trim_matches('"')
        .parse()
        .ok()
}

impl Usher {
    /// Starts Usher on `yaml` (with `LISTEN`/`ADMIN` placeholders) and waits
    /// until `/livez` answers. Does not wait for readiness: see [`Usher::wait_ready`].
    pub fn start(yaml: &str) -> Usher {
        let dir = TempDir::new("usher");
        let config_path = dir.0.join("usher.yaml");
        let yaml = yaml
            .replace("LISTEN", "127.0.0.1:0")
            .replace("ADMIN", "127.0.0.1:0");
        std::fs::write(&config_path, yaml).expect("write config");
        let mut cmd = Command::new(bin_path("usher"));
        cmd.arg("-c").arg(&config_path).env("RUST_LOG", "info");
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
        let addr = addr_after(&line, "addr=").expect("listener address in log");
        let admin_line = proc
            .wait_for_output("admin listening", START_TIMEOUT)
            .expect("admin listener in log");
        let admin = addr_after(&admin_line, "addr=").expect("admin address in log");
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

/// A config with its listener on `LISTEN`, admin on `ADMIN`, and every
/// request routed to upstream `app` over `addrs`; `backend_extra` is appended
/// inside each backend's map (e.g. `, max_in_flight: 1`) and `rest` after the
/// backend list (more keys of `app` indented by 4, then top-level sections).
pub fn config_with_backends(addrs: &[SocketAddr], backend_extra: &str, rest: &str) -> String {
    let backends: Vec<String> = addrs
        .iter()
        .map(|a| format!("      - {{ address: \"{a}\"{backend_extra} }}"))
        .collect();
    format!(
        r#"listeners:
  - {{ name: public, address: "LISTEN" }}
admin: {{ address: "ADMIN" }}
routes:
  - {{ host: "*", path_prefix: /, upstream: app }}
upstreams:
  app:
    backends:
{}
{rest}
"#,
        backends.join("\n")
    )
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

/// Waits up to `timeout` for the process to have exited.
pub fn pid_gone(pid: i32, timeout: Duration) -> bool {
    wait_until(timeout, || {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_err()
            || std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .map(|s| s.contains(") Z "))
                .unwrap_or(true)
    })
}
