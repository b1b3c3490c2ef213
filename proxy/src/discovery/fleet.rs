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
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use prometheus::IntCounter;
use tokio::process::{Child, Command};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use std::sync::Arc;

use crate::config::FleetConfig;
use crate::discovery::{Live, SharedAddresses};

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
        // Usher's own binary in its worker role, keeping worker and proxy
        // the same version.
        let me = own_binary()?;
        args.insert(0, "worker".to_string());
        return Ok((me, args));
    }
    // Any other command runs through `usher spawn`, which arms the
    // parent-death signal and then execs it: the process dies with Usher even
    // when Usher is SIGKILLed (the parent watch of `usher worker` does this
    // for the built-in worker).
    let me = own_binary()?;
    let mut wrapped = vec!["spawn".to_string(), std::process::id().to_string(), program];
    wrapped.extend(args);
    Ok((me, wrapped))
}

/// Usher's own binary, for re-executing itself.
fn own_binary() -> Result<PathBuf, String> {
    // /proc/self/exe still runs this very binary after it was replaced or
    // deleted on disk (an upgrade in place).
    let proc_exe = std::path::Path::new("/proc/self/exe");
    if proc_exe.exists() {
        return Ok(proc_exe.to_path_buf());
    }
    std::env::current_exe().map_err(|e| format!("cannot find Usher's own binary: {e}"))
}

/// `usher spawn PARENT_PID PROGRAM ARGS...`: asks the kernel to SIGKILL this
/// process when its parent dies (`PR_SET_PDEATHSIG`, which survives `exec`),
/// checks the parent is still the Usher that started it (it may have died
/// before the signal was armed), then becomes `PROGRAM`.
///
/// The death signal follows the *thread* that forked; the fleet spawns from
/// the runtime's worker threads, which live as long as Usher does.
pub fn exec_child(args: Vec<String>) -> std::process::ExitCode {
    use std::os::unix::process::CommandExt;
    use std::process::ExitCode;
    let mut args = args.into_iter();
    let (Some(parent), Some(program)) = (args.next(), args.next()) else {
        eprintln!("usher spawn: usage: usher spawn PARENT_PID PROGRAM [ARGS...]");
        return ExitCode::from(2);
    };
    if let Err(e) = nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL) {
        eprintln!("usher spawn: cannot arm the parent-death signal: {e}");
        return ExitCode::from(1);
    }
    if nix::unistd::getppid().as_raw().to_string() != parent {
        // Usher is already gone: do not start an orphan.
        return ExitCode::from(1);
    }
    let err = std::process::Command::new(&program).args(args).exec();
    eprintln!("usher spawn: cannot run `{program}`: {err}");
    ExitCode::from(127)
}

/// The live upstream a fleet feeds: where a rolling restart publishes its
/// addresses and drains retiring processes.
pub struct LiveUpstream {
    pub name: String,
    pub live: Arc<dyn Live>,
    pub addrs: SharedAddresses,
    pub fixed_capacity: Option<u32>,
}

impl LiveUpstream {
    /// Makes `addrs` the fleet's backends, in the shared map (for later
    /// reloads) and in the live upstream.
    pub fn publish(&self, addrs: Vec<SocketAddr>) {
        self.addrs
            .lock()
            .unwrap()
            .insert(self.name.clone(), addrs.clone());
        self.live.publish(&self.name, &addrs, self.fixed_capacity);
    }

    /// Stops new requests to `addr` and waits (up to `limit`) until it has
    /// none in flight.
    pub async fn drain(&self, addr: SocketAddr, limit: Duration) {
        let Some(b) = self.live.backend(&self.name, addr) else {
            return;
        };
        b.health.set_draining(true);
        let deadline = Instant::now() + limit;
        while b.in_flight() > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// One supervised process (restarted whenever it exits) and its address.
struct FleetProc {
    addr: SocketAddr,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl FleetProc {
    fn start(
        upstream: &str,
        cfg: &FleetConfig,
        addr: SocketAddr,
        restarts: IntCounter,
        grace: Duration,
    ) -> Result<FleetProc, String> {
        let (program, args) = command_for(cfg, addr.port())?;
        let sup = Supervisor {
            upstream: upstream.to_string(),
            addr,
            program,
            args,
            env: cfg.env.clone().into_iter().collect(),
            restarts,
            grace,
        };
        let stop = CancellationToken::new();
        let task = tokio::spawn(sup.run(stop.clone()));
        Ok(FleetProc { addr, stop, task })
    }

    /// SIGTERM, then SIGKILL after the grace; returns when it is gone.
    async fn stop(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

/// Waits until `addr` accepts connections, up to `limit`.
async fn wait_accepting(addr: SocketAddr, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The processes of one upstream's fleet.
pub struct Fleet {
    upstream: String,
    cfg: FleetConfig,
    procs: Vec<FleetProc>,
    restarts: IntCounter,
    grace: Duration,
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
        let procs = addrs
            .iter()
            .map(|a| FleetProc::start(upstream, cfg, *a, restarts.clone(), grace))
            .collect::<Result<_, _>>()?;
        Ok(Fleet {
            upstream: upstream.to_string(),
            cfg: cfg.clone(),
            procs,
            restarts,
            grace,
        })
    }

    pub fn addrs(&self) -> Vec<SocketAddr> {
        self.procs.iter().map(|p| p.addr).collect()
    }

    pub fn config(&self) -> &FleetConfig {
        &self.cfg
    }

    /// Waits until every process accepts connections, up to `limit`.
    pub async fn wait_ready(&self, limit: Duration) -> bool {
        for addr in self.addrs() {
            if !wait_accepting(addr, limit).await {
                tracing::warn!(%addr, "fleet process is not accepting connections yet");
                return false;
            }
        }
        true
    }

    /// Replaces the processes one at a time with ones running `cfg` (a new
    /// app version): start a new one, wait until it accepts connections, add
    /// it to the upstream, drain the old one, wait for its in-flight requests,
    /// stop it. `publish` is called with the fleet's addresses after every
    /// change so the upstream follows. New processes get free ports, since
    /// the old ones still hold theirs while they drain.
    pub async fn roll(&mut self, cfg: FleetConfig, live: &LiveUpstream) -> Result<(), String> {
        let mut fresh_cfg = cfg.clone();
        fresh_cfg.base_port = 0;
        fresh_cfg.processes = 1;
        let old: Vec<FleetProc> = std::mem::take(&mut self.procs);
        let mut old = std::collections::VecDeque::from(old);
        let target = cfg.processes as usize;
        let mut started = 0;
        while started < target || !old.is_empty() {
            if started < target {
                let addr = plan(&fresh_cfg)?.remove(0);
                let p = FleetProc::start(
                    &self.upstream,
                    &cfg,
                    addr,
                    self.restarts.clone(),
                    self.grace,
                )?;
                if !wait_accepting(addr, Duration::from_secs(30)).await {
                    p.stop().await;
                    // Keep what still runs; the operator sees the error.
                    self.procs.extend(old);
                    live.publish(self.addrs());
                    return Err(format!("new fleet process on {addr} did not start accepting connections within 30s; rollout stopped"));
                }
                tracing::info!(upstream = %self.upstream, %addr, "rolling restart: new process is up");
                self.procs.push(p);
                started += 1;
                let all: Vec<SocketAddr> = self
                    .addrs()
                    .into_iter()
                    .chain(old.iter().map(|p| p.addr))
                    .collect();
                live.publish(all);
            }
            if let Some(retiring) = old.pop_front() {
                let remaining: Vec<SocketAddr> = self
                    .addrs()
                    .into_iter()
                    .chain(old.iter().map(|p| p.addr))
                    .collect();
                live.drain(retiring.addr, self.grace).await;
                live.publish(remaining);
                tracing::info!(upstream = %self.upstream, addr = %retiring.addr, "rolling restart: old process drained; stopping it");
                retiring.stop().await;
            }
        }
        self.cfg = cfg;
        Ok(())
    }

    /// SIGTERM to every process, SIGKILL to those still running after the grace.
    pub async fn shutdown(self) {
        for p in &self.procs {
            p.stop.cancel();
        }
        for p in self.procs {
            let _ = p.task.await;
        }
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
        let mut cmd = Command::new(&self.program);
        if self.program == Path::new("/proc/self/exe") {
            // Show up in `ps` as `usher worker ...`, not `/proc/self/exe worker ...`.
            let name = std::env::current_exe()
                .map(|p| {
                    p.display()
                        .to_string()
                        .trim_end_matches(" (deleted)")
                        .to_string()
                })
                .unwrap_or_else(|_| "usher".into());
            cmd.arg0(name);
        }
        cmd.args(&self.args)
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
                    tracing::warn!(upstream = %self.upstream, addr = %self.addr, pid, status = %exit_text(&status), "fleet process exited; restarting");
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

/// How a process ended, as an operator reads it: `exit code 1`, `killed by
/// SIGKILL`.
pub fn exit_text(status: &std::io::Result<std::process::ExitStatus>) -> String {
    use std::os::unix::process::ExitStatusExt;
    match status {
        Err(e) => format!("unknown ({e})"),
        Ok(s) => match (s.code(), s.signal()) {
            (Some(code), _) => format!("exit code {code}"),
            (None, Some(sig)) => match nix::sys::signal::Signal::try_from(sig) {
                Ok(name) => format!("killed by {name}"),
                Err(_) => format!("killed by signal {sig}"),
            },
            (None, None) => "ended".to_string(),
        },
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
                // Not eprintln!: with the parent gone, stderr is usually a
                // broken pipe, and eprintln! would panic instead of exiting.
                use std::io::Write;
                let _ = writeln!(
                    std::io::stderr(),
                    "usher worker: parent usher (pid {parent}) is gone; exiting"
                );
                std::process::exit(0);
            }
        })
        .expect("spawn parent watch thread");
}
