//! Fleet: worker processes that Usher starts and supervises itself, like
//! gunicorn's master or Passenger.
//!
//! Each process gets its own port (`{port}` in the command). Starting is
//! asynchronous: Usher serves (admin, signals, listeners) at once, and a
//! process's backend is down until the process accepts connections on its
//! port; its supervisor then opens the process's [`Gate`], which the backend
//! follows (see `health`). A process that exits closes its gate and is
//! restarted with exponential backoff (100 ms doubling to 10 s, reset after
//! it has run for 10 s); each restart is logged and counted in
//! `usher_fleet_restarts_total`. Before each start the port is bind-tested:
//! a port another process holds is logged with that process's pid and
//! command line (see [`super::port_owner`]) and retried with the same
//! backoff, without counting a restart.
//!
//! Nothing is left behind. Each process leads its own process group; on
//! shutdown the group gets SIGTERM, then SIGKILL after the grace period, and
//! whatever is left of a group once its process is gone is killed, so a
//! shell wrapper's or a master's children go with it. When Usher itself is
//! SIGKILLed, processes started as `usher worker` exit on their own (they
//! watch their parent), and any other command runs through `usher spawn`,
//! which arms the parent-death signal before it execs the command and leaves
//! a watchdog in the group that kills the group once the command is gone.
//!
//! `usher-worker` as the command's program means Usher's own binary in its
//! worker role (`usher worker ...`): the fleet then works from a fresh clone
//! with `cargo run`, and worker and proxy are always the same version.
//! `usher check` refuses a command that cannot be found or is not
//! executable ([`check_commands`]).

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use prometheus::IntCounter;
use tokio::process::{Child, Command};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, FleetConfig, Problem};
use crate::discovery::{port_owner, Gates, Live, SharedAddresses};
use crate::health::Gate;

/// Environment variable naming the parent Usher's pid, for worker processes.
pub const PARENT_PID_ENV: &str = "USHER_PARENT_PID";

/// The first argument of `usher spawn` that makes it the group watchdog.
const WATCH_GROUP_ARG: &str = "--watch-group";

/// A process still not accepting connections this long after it started is
/// logged (once).
const SLOW_START_WARNING: Duration = Duration::from_secs(30);

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

/// The check `control::load` adds to the schema: every fleet command's
/// program exists and is executable, so a typo fails `usher check` (and a
/// reload) instead of restarting forever at runtime.
pub fn check_commands(c: &Config) -> Vec<Problem> {
    let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("."));
    c.upstreams
        .iter()
        .filter_map(|(name, u)| {
            let f = u.fleet.as_ref()?;
            let program = f.command.first()?;
            if program == "usher-worker" || program.contains("{port}") {
                return None;
            }
            // `usher spawn` runs the program with the fleet's environment,
            // so its PATH is the one searched.
            let path = f
                .env
                .get("PATH")
                .cloned()
                .or_else(|| std::env::var("PATH").ok())
                .unwrap_or_default();
            let message = find_program(program, &path, &cwd).err()?;
            Some(Problem {
                key: format!("upstreams.{name}.fleet.command"),
                needle: program.clone(),
                message,
            })
        })
        .collect()
}

/// Where `program` would be run from: a path (relative to `cwd`) when it has
/// a `/`, else the first executable file of that name on `path`.
fn find_program(program: &str, path: &str, cwd: &Path) -> Result<PathBuf, String> {
    use std::os::unix::fs::PermissionsExt;
    let executable =
        |p: &Path| std::fs::metadata(p).map(|m| (m.is_file(), m.permissions().mode() & 0o777));
    if program.contains('/') {
        let full = cwd.join(program);
        return match executable(&full) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Err(format!("`{program}` does not exist"))
            }
            Err(e) => Err(format!("`{program}` cannot be read: {e}")),
            Ok((false, _)) => Err(format!("`{program}` is not a file")),
            Ok((true, mode)) if mode & 0o111 == 0 => Err(format!(
                "`{program}` is not executable (mode {mode:o}; try chmod +x)"
            )),
            Ok(_) => Ok(full),
        };
    }
    let mut not_executable = None;
    for dir in path.split(':') {
        // An empty entry is the working directory, as for execvp.
        let candidate = if dir.is_empty() {
            cwd.join(program)
        } else {
            Path::new(dir).join(program)
        };
        match executable(&candidate) {
            Ok((true, mode)) if mode & 0o111 != 0 => return Ok(candidate),
            Ok((true, _)) => {
                not_executable.get_or_insert(candidate);
            }
            _ => {}
        }
    }
    Err(match not_executable {
        Some(p) => format!(
            "`{program}` is found at {} but is not executable",
            p.display()
        ),
        None => format!("`{program}` is not found on PATH ({path})"),
    })
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
/// before the signal was armed), starts the group watchdog, then becomes
/// `PROGRAM`.
///
/// The death signal follows the *thread* that forked; the fleet spawns from
/// the runtime's worker threads, which live as long as Usher does. It is not
/// inherited by `PROGRAM`'s own children, hence the watchdog
/// (`usher spawn --watch-group PID`, see [`watch_group`]).
pub fn exec_child(args: Vec<String>) -> std::process::ExitCode {
    use std::os::unix::process::CommandExt;
    use std::process::ExitCode;
    let mut args = args.into_iter();
    let first = args.next();
    if first.as_deref() == Some(WATCH_GROUP_ARG) {
        return watch_group(args.next());
    }
    let (Some(parent), Some(program)) = (first, args.next()) else {
        eprintln!("usher spawn: usage: usher spawn PARENT_PID PROGRAM [ARGS...]");
        return ExitCode::from(2);
    };
    if let Err(e) = nix::sys::prctl::set_pdeathsig(Signal::SIGKILL) {
        eprintln!("usher spawn: cannot arm the parent-death signal: {e}");
        return ExitCode::from(1);
    }
    if nix::unistd::getppid().as_raw().to_string() != parent {
        // Usher is already gone: do not start an orphan.
        return ExitCode::from(1);
    }
    let me = nix::unistd::getpid();
    // Only a process that leads its own group (as the fleet starts it) gets
    // a watchdog: the watchdog kills the whole group.
    if nix::unistd::getpgrp() == me {
        let watchdog = std::process::Command::new("/proc/self/exe")
            .arg0("usher")
            .args(["spawn", WATCH_GROUP_ARG, &me.as_raw().to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn();
        if let Err(e) = watchdog {
            eprintln!("usher spawn: cannot start the group watchdog ({e}); `{program}`'s own children may outlive a killed Usher");
        }
    }
    let err = std::process::Command::new(&program).args(args).exec();
    eprintln!("usher spawn: cannot run `{program}`: {err}");
    ExitCode::from(127)
}

/// `usher spawn --watch-group PID`: the watchdog of one fleet process's
/// group, a child of the process `PID` (the command, once `usher spawn` has
/// exec'd it). When that process is gone, for any reason, it SIGKILLs the
/// group, itself included: the command's own children do not outlive it,
/// even when Usher was SIGKILLed and cannot clean up.
///
/// It ignores the group's SIGTERM (Usher's graceful stop), so it is there
/// until the command has exited.
fn watch_group(parent: Option<String>) -> std::process::ExitCode {
    use nix::sys::signal::SigSet;
    let Some(parent) = parent.and_then(|p| p.parse::<i32>().ok()) else {
        eprintln!("usher spawn: usage: usher spawn {WATCH_GROUP_ARG} PID");
        return std::process::ExitCode::from(2);
    };
    let mut blocked = SigSet::empty();
    for s in [
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGHUP,
        Signal::SIGQUIT,
    ] {
        blocked.add(s);
    }
    let _ = blocked.thread_block();
    // Polling, not a parent-death signal: that one fires when the parent's
    // *thread* exits, which a multi-threaded command may do while it runs.
    while nix::unistd::getppid().as_raw() == parent {
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = killpg(nix::unistd::getpgrp(), Signal::SIGKILL);
    std::process::ExitCode::from(1)
}

/// What the processes of a fleet report to.
#[derive(Clone)]
pub struct Supervision {
    /// The live upstreams, told when a process starts accepting connections.
    pub live: Arc<dyn Live>,
    /// The gates the fleet's backends follow (the state's [`Gates`]).
    pub gates: Gates,
    /// `usher_fleet_restarts_total{upstream}`.
    pub restarts: IntCounter,
    /// From SIGTERM to SIGKILL when a process is stopped.
    pub grace: Duration,
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
    gate: Arc<Gate>,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl FleetProc {
    /// Starts supervising a process on `addr`. The receiver fires once the
    /// first start was tried (the process spawned, or its port found taken).
    fn start(
        upstream: &str,
        cfg: &FleetConfig,
        addr: SocketAddr,
        sup: &Supervision,
    ) -> Result<(FleetProc, oneshot::Receiver<()>), String> {
        let (program, args) = command_for(cfg, addr.port())?;
        let gate = sup.gates.gate(addr);
        let supervisor = Supervisor {
            upstream: upstream.to_string(),
            addr,
            program,
            args,
            env: cfg.env.clone().into_iter().collect(),
            gate: gate.clone(),
            sup: sup.clone(),
        };
        let stop = CancellationToken::new();
        let (tried, first_try) = oneshot::channel();
        let task = tokio::spawn(supervisor.run(stop.clone(), tried));
        let p = FleetProc {
            addr,
            gate,
            stop,
            task,
        };
        Ok((p, first_try))
    }

    /// SIGTERM, then SIGKILL after the grace; returns when it is gone.
    async fn stop(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }

    /// Waits until the process accepts connections, up to `limit`.
    async fn wait_accepting(&self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while !self.gate.is_open() {
            if Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        true
    }
}

/// The processes of one upstream's fleet.
pub struct Fleet {
    upstream: String,
    cfg: FleetConfig,
    procs: Vec<FleetProc>,
    sup: Supervision,
}

impl Fleet {
    /// Starts a process on each of `addrs` and supervises it until
    /// [`Fleet::shutdown`]. Returns once each start was tried, without
    /// waiting for any process to accept connections.
    pub async fn start(
        upstream: &str,
        cfg: &FleetConfig,
        addrs: Vec<SocketAddr>,
        sup: Supervision,
    ) -> Result<Fleet, String> {
        let mut procs = Vec::new();
        let mut tried = Vec::new();
        for a in addrs {
            let (p, first_try) = FleetProc::start(upstream, cfg, a, &sup)?;
            procs.push(p);
            tried.push(first_try);
        }
        // A fork and exec each: their `fleet process started` lines come
        // before `usher is serving`. Bounded, in case the machine is stuck.
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            for t in tried {
                let _ = t.await;
            }
        })
        .await;
        Ok(Fleet {
            upstream: upstream.to_string(),
            cfg: cfg.clone(),
            procs,
            sup,
        })
    }

    pub fn addrs(&self) -> Vec<SocketAddr> {
        self.procs.iter().map(|p| p.addr).collect()
    }

    pub fn config(&self) -> &FleetConfig {
        &self.cfg
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
                let (p, _) = FleetProc::start(&self.upstream, &cfg, addr, &self.sup)?;
                if !p.wait_accepting(Duration::from_secs(30)).await {
                    p.stop().await;
                    self.sup.gates.forget(addr);
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
                live.drain(retiring.addr, self.sup.grace).await;
                live.publish(remaining);
                tracing::info!(upstream = %self.upstream, addr = %retiring.addr, "rolling restart: old process drained; stopping it");
                let addr = retiring.addr;
                retiring.stop().await;
                self.sup.gates.forget(addr);
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

/// How one run of a process ended.
enum Ended {
    /// The fleet is stopping, and the process was stopped.
    Stopped,
    /// It exited on its own.
    Exited {
        status: std::io::Result<std::process::ExitStatus>,
        accepted: bool,
    },
}

struct Supervisor {
    upstream: String,
    addr: SocketAddr,
    program: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
    gate: Arc<Gate>,
    sup: Supervision,
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
            // Its own process group, so that stopping it stops its children
            // too, and a terminal's Ctrl-C reaches only Usher, which stops
            // the fleet in order.
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
    }

    async fn run(self, stop: CancellationToken, tried: oneshot::Sender<()>) {
        let mut tried = Some(tried);
        let mut first_try_done = || {
            if let Some(t) = tried.take() {
                let _ = t.send(());
            }
        };
        let mut backoff = Duration::from_millis(100);
        // What held the port at the last try, so a long wait logs it once.
        let mut last_taken: Option<String> = None;
        loop {
            let addr = self.addr;
            let free = tokio::task::spawn_blocking(move || check_port(addr))
                .await
                .unwrap_or(Ok(()));
            if let Err(why) = free {
                let wait = next_wait(&mut backoff);
                if last_taken.as_ref() != Some(&why) {
                    tracing::warn!(upstream = %self.upstream, retry_in = ?wait, "fleet port {} {why}; not starting", self.addr);
                } else {
                    tracing::debug!(upstream = %self.upstream, retry_in = ?wait, "fleet port {} {why}; not starting", self.addr);
                }
                last_taken = Some(why);
                first_try_done();
                if !pause(&stop, wait).await {
                    return;
                }
                continue;
            }
            last_taken = None;
            let child = match self.spawn() {
                Ok(c) => c,
                Err(e) => {
                    let wait = next_wait(&mut backoff);
                    tracing::error!(upstream = %self.upstream, addr = %self.addr, program = %self.program.display(), error = %e, retry_in = ?wait, "cannot start fleet process");
                    first_try_done();
                    if !pause(&stop, wait).await {
                        return;
                    }
                    continue;
                }
            };
            let pid = child.id();
            self.gate.started(pid);
            tracing::info!(upstream = %self.upstream, addr = %self.addr, pid, "fleet process started");
            first_try_done();
            let started = Instant::now();
            let (status, accepted) = match self.watch(child, pid, &stop).await {
                Ended::Stopped => return,
                Ended::Exited { status, accepted } => (status, accepted),
            };
            self.gate.close();
            // What it leaves behind (a wrapper's children) goes with it.
            signal_group(pid, Signal::SIGKILL);
            if stop.is_cancelled() {
                return;
            }
            if started.elapsed() > Duration::from_secs(10) {
                backoff = Duration::from_millis(100);
            }
            let wait = next_wait(&mut backoff);
            let status = exit_text(&status);
            if accepted {
                tracing::warn!(upstream = %self.upstream, addr = %self.addr, pid, %status, retry_in = ?wait, "fleet process exited; restarting");
            } else {
                tracing::warn!(upstream = %self.upstream, addr = %self.addr, pid, %status, retry_in = ?wait, "fleet process exited before it accepted connections; restarting");
            }
            self.sup.restarts.inc();
            self.gate.restarted();
            if !pause(&stop, wait).await {
                return;
            }
        }
    }

    /// One run of the process: opens the gate once it accepts connections,
    /// until it exits or the fleet stops.
    async fn watch(&self, mut child: Child, pid: Option<u32>, stop: &CancellationToken) -> Ended {
        let started = Instant::now();
        let accepting = async {
            wait_accepting(self.addr).await;
            self.sup.live.prepare(&self.upstream, self.addr).await;
        };
        tokio::pin!(accepting);
        let slow = tokio::time::sleep(SLOW_START_WARNING);
        tokio::pin!(slow);
        let (mut accepted, mut warned) = (false, false);
        loop {
            tokio::select! {
                status = child.wait() => return Ended::Exited { status, accepted },
                _ = stop.cancelled() => {
                    self.gate.close();
                    self.terminate(child, pid).await;
                    return Ended::Stopped;
                }
                _ = &mut accepting, if !accepted => {
                    accepted = true;
                    self.gate.open();
                    self.sup.live.opened(&self.upstream, self.addr);
                    tracing::info!(upstream = %self.upstream, addr = %self.addr, pid, after = ?started.elapsed(), "fleet process is accepting connections");
                }
                _ = &mut slow, if !accepted && !warned => {
                    warned = true;
                    tracing::warn!(upstream = %self.upstream, addr = %self.addr, pid, "fleet process is running but not accepting connections after {SLOW_START_WARNING:?}; it gets no requests until it does");
                }
            }
        }
    }

    /// SIGTERM to the process's group; SIGKILL if it is still running after
    /// the grace; then SIGKILL to whatever is left of the group.
    async fn terminate(&self, mut child: Child, pid: Option<u32>) {
        signal_group(pid, Signal::SIGTERM);
        match tokio::time::timeout(self.sup.grace, child.wait()).await {
            Ok(_) => tracing::info!(addr = %self.addr, pid, "fleet process stopped"),
            Err(_) => {
                tracing::warn!(addr = %self.addr, pid, "fleet process ignored SIGTERM; killing");
                signal_group(pid, Signal::SIGKILL);
                let _ = child.kill().await;
            }
        }
        signal_group(pid, Signal::SIGKILL);
    }
}

/// The port is free to bind, or what holds it, as the log says it.
/// Blocking: finding the owner reads every process's fds in `/proc`.
fn check_port(addr: SocketAddr) -> Result<(), String> {
    match TcpListener::bind(addr) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            Err(match port_owner::find(addr.port()) {
                Some(o) => format!("is taken by pid {} ({})", o.pid, o.command),
                None => "is taken (by a process whose sockets this user cannot see)".into(),
            })
        }
        Err(e) => Err(format!("cannot be bound ({e})")),
    }
}

/// Signals the process group led by `pid` (each fleet process leads its own).
fn signal_group(pid: Option<u32>, signal: Signal) {
    if let Some(pid) = pid.and_then(|p| i32::try_from(p).ok()) {
        let _ = killpg(Pid::from_raw(pid), signal);
    }
}

/// The backoff to wait now, doubling the next one (up to 10 s).
fn next_wait(backoff: &mut Duration) -> Duration {
    let wait = *backoff;
    *backoff = (*backoff * 2).min(Duration::from_secs(10));
    wait
}

/// Waits `wait`; false if the fleet is stopping.
async fn pause(stop: &CancellationToken, wait: Duration) -> bool {
    tokio::select! {
        _ = stop.cancelled() => false,
        _ = tokio::time::sleep(wait) => true,
    }
}

/// Returns once `addr` accepts a connection: tried every 10 ms at first,
/// then less often (up to every 250 ms) for a process that starts slowly.
async fn wait_accepting(addr: SocketAddr) {
    let mut every = Duration::from_millis(10);
    loop {
        let connect = tokio::net::TcpStream::connect(addr);
        if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_secs(1), connect).await {
            return;
        }
        tokio::time::sleep(every).await;
        every = (every * 3 / 2).min(Duration::from_millis(250));
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn temp_dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "usher-fleet-{tag}-{}-{}",
            std::process::id(),
            fastrand::u64(..)
        ));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn finds_a_program_on_path_or_by_path_and_says_why_not() {
        let dir = temp_dir("find");
        let app = dir.join("app");
        std::fs::write(&app, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&app, std::fs::Permissions::from_mode(0o755)).unwrap();
        let plain = dir.join("notes");
        std::fs::write(&plain, "").unwrap();
        std::fs::set_permissions(&plain, std::fs::Permissions::from_mode(0o644)).unwrap();
        let path = format!("/nonexistent-dir:{}", dir.display());
        let cwd = Path::new("/");

        assert_eq!(find_program("app", &path, cwd), Ok(app.clone()));
        assert_eq!(find_program(app.to_str().unwrap(), "", cwd), Ok(app));
        let e = find_program("nope", &path, cwd).unwrap_err();
        assert!(
            e.contains("`nope` is not found on PATH (/nonexistent-dir:"),
            "{e}"
        );
        let e = find_program("notes", &path, cwd).unwrap_err();
        assert!(
            e.contains("is found at") && e.contains("not executable"),
            "{e}"
        );
        let e = find_program("/nonexistent/app", &path, cwd).unwrap_err();
        assert_eq!(e, "`/nonexistent/app` does not exist");
        let e = find_program(plain.to_str().unwrap(), &path, cwd).unwrap_err();
        assert!(e.contains("is not executable (mode 644"), "{e}");
        let e = find_program(dir.to_str().unwrap(), &path, cwd).unwrap_err();
        assert!(e.contains("is not a file"), "{e}");
        // A relative path is relative to the working directory.
        assert!(find_program("./app", "", &dir).is_ok());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn check_names_the_fleet_command_of_a_missing_program() {
        let yaml = r#"
listeners: [{ name: p, address: "127.0.0.1:1" }]
routes: [{ upstream: a }, { upstream: w, path_prefix: /w }, { upstream: s, path_prefix: /s }]
upstreams:
  a: { fleet: { command: [/nonexistent/app, "{port}"] } }
  w: { fleet: { command: [usher-worker, --listen, "127.0.0.1:{port}"] } }
  s: { fleet: { command: [sh, -c, "exec sleep {port}"] } }
"#;
        let c = crate::config::parse(yaml, "t").unwrap();
        let problems = check_commands(&c);
        assert_eq!(problems.len(), 1, "only the missing program");
        assert_eq!(problems[0].key, "upstreams.a.fleet.command");
        assert_eq!(problems[0].needle, "/nonexistent/app");
        assert_eq!(problems[0].message, "`/nonexistent/app` does not exist");
    }
}
