//! Fleet: worker processes that Usher starts and supervises itself, like
//! gunicorn's master or Passenger.
//!
//! Each process gets its own port (`{port}` in the command). A process that
//! exits is restarted with exponential backoff (100 ms doubling to 10 s, reset
//! after it has run for 10 s); each restart is logged and counted in
//! `usher_fleet_restarts_total`. On shutdown every process gets SIGTERM, then
//! SIGKILL after the grace period. Children are also killed when their handle
//! is dropped, and processes started as `usher worker` exit on their own when
//! Usher's process goes away, so none is left behind.
//!
//! `usher-worker` as the command's program means Usher's own binary in its
//! worker role (`usher worker ...`): the fleet then works from a fresh clone
//! with `cargo run`, and worker and proxy are always the same version.

use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use prometheus::IntCounter;
use tokio::process::{Child, Command};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::config::FleetConfig;

/// Environment variable naming the parent Usher's pid, for worker processes.
pub const PARENT_PID_ENV: &str = "USHER_PARENT_PID";

/// Picks the addresses the fleet's processes will listen on.
pub fn plan(cfg: &FleetConfig) -> Result<Vec<SocketAddr>, String> {
    let host: std::net::IpAddr = cfg
        .host
        .parse()
        .map_err(|_| format!("fleet host `{}` is not an IP address", cfg.host))?;
    (0..cfg.processes)
        .map(|i| {
            if cfg.base_port == 0 {
                // Ask the kernel for a free port; the process binds it right after.
                let l = TcpListener::bind((host, 0))
                    .map_err(|e| format!("cannot find a free port: {e}"))?;
                l.local_addr().map_err(|e| e.to_string())
            } else {
                Ok(SocketAddr::new(host, cfg.base_port + i as u16))
            }
        })
        .collect()
}

/// The program and arguments for one process.
fn command_for(cfg: &FleetConfig, port: u16) -> Result<(PathBuf, Vec<String>), String> {
    let mut args: Vec<String> = cfg
        .command
        .iter()
        .map(|a| a.replace("{port}", &port.to_string()))
        .collect();
    let program = args.remove(0);
    if program == "usher-worker" {
        let me =
            std::env::current_exe().map_err(|e| format!("cannot find Usher's own binary: {e}"))?;
        args.insert(0, "worker".to_string());
        return Ok((me, args));
    }
    Ok((PathBuf::from(program), args))
}

pub struct Fleet {
    stop: CancellationToken,
    tasks: JoinSet<()>,
    pub addrs: Vec<SocketAddr>,
}

impl Fleet {
    /// Starts every process and supervises it until [`Fleet::shutdown`].
    pub fn start(
        upstream: &str,
        cfg: &FleetConfig,
        addrs: Vec<SocketAddr>,
        restarts: IntCounter,
        grace: Duration,
    ) -> Result<Fleet, String> {
        let stop = CancellationToken::new();
        let mut tasks = JoinSet::new();
        for addr in &addrs {
            let (program, args) = command_for(cfg, addr.port())?;
            let sup = Supervisor {
                upstream: upstream.to_string(),
                addr: *addr,
                program,
                args,
                env: cfg.env.clone().into_iter().collect(),
                restarts: restarts.clone(),
                grace,
            };
            tasks.spawn(sup.run(stop.clone()));
        }
        Ok(Fleet { stop, tasks, addrs })
    }

    /// Waits until every process accepts connections, up to `limit`.
    pub async fn wait_ready(&self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        for addr in &self.addrs {
            loop {
                if tokio::net::TcpStream::connect(addr).await.is_ok() {
                    break;
                }
                if Instant::now() > deadline {
                    tracing::warn!(%addr, "fleet process is not accepting connections yet");
                    return false;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        true
    }

    /// SIGTERM to every process, SIGKILL to those still running after the grace.
    pub async fn shutdown(mut self) {
        self.stop.cancel();
        while self.tasks.join_next().await.is_some() {}
    }
}

struct Supervisor {
    upstream: String,
    addr: SocketAddr,
    program: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
    restarts: IntCounter,
    grace: Duration,
}

impl Supervisor {
    fn spawn(&self) -> std::io::Result<Child> {
        Command::new(&self.program)
            .args(&self.args)
            .envs(self.env.iter().cloned())
            .env(PARENT_PID_ENV, std::process::id().to_string())
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .spawn()
    }

    async fn run(self, stop: CancellationToken) {
        let mut backoff = Duration::from_millis(100);
        loop {
            let started = Instant::now();
            let mut child = match self.spawn() {
                Ok(c) => c,
                Err(e) => {
                    tracing::error!(upstream = %self.upstream, addr = %self.addr, program = %self.program.display(), error = %e, "cannot start fleet process");
                    if !self.pause(&stop, &mut backoff).await {
                        return;
                    }
                    continue;
                }
            };
            let pid = child.id();
            tracing::info!(upstream = %self.upstream, addr = %self.addr, pid, "fleet process started");
            tokio::select! {
                status = child.wait() => {
                    if stop.is_cancelled() {
                        return;
                    }
                    tracing::warn!(upstream = %self.upstream, addr = %self.addr, pid, status = ?status.ok(), "fleet process exited; restarting");
                    self.restarts.inc();
                    if started.elapsed() > Duration::from_secs(10) {
                        backoff = Duration::from_millis(100);
                    }
                    if !self.pause(&stop, &mut backoff).await {
                        return;
                    }
                }
                _ = stop.cancelled() => {
                    self.terminate(child, pid).await;
                    return;
                }
            }
        }
    }

    /// Waits out the backoff; false if the fleet is stopping.
    async fn pause(&self, stop: &CancellationToken, backoff: &mut Duration) -> bool {
        let wait = *backoff;
        *backoff = (*backoff * 2).min(Duration::from_secs(10));
        tokio::select! {
            _ = stop.cancelled() => false,
            _ = tokio::time::sleep(wait) => true,
        }
    }

    async fn terminate(&self, mut child: Child, pid: Option<u32>) {
        if let Some(pid) = pid.and_then(|p| i32::try_from(p).ok()) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
        }
        match tokio::time::timeout(self.grace, child.wait()).await {
            Ok(_) => tracing::info!(addr = %self.addr, pid, "fleet process stopped"),
            Err(_) => {
                tracing::warn!(addr = %self.addr, pid, "fleet process ignored SIGTERM; killing");
                let _ = child.kill().await;
            }
        }
    }
}

/// In a worker process started by a fleet: exit when the parent Usher is gone
/// (even if it was killed with SIGKILL and could not stop us).
pub fn watch_parent() {
    let Some(parent) = std::env::var(PARENT_PID_ENV)
        .ok()
        .and_then(|p| p.parse::<i32>().ok())
    else {
        return;
    };
    std::thread::Builder::new()
        .name("usher-parent-watch".into())
        .spawn(move || loop {
            std::thread::sleep(Duration::from_millis(500));
            if nix::unistd::getppid().as_raw() != parent {
                eprintln!("usher worker: parent usher (pid {parent}) is gone; exiting");
                std::process::exit(0);
            }
        })
        .expect("spawn parent watch thread");
}
