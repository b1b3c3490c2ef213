//! The daemon's life: bind, start the fleet, serve, reload, drain, exit.
//!
//! Shutdown (SIGTERM or SIGINT): `/readyz` turns 503, listeners stop
//! accepting, in-flight and queued requests get up to `shutdown_grace` to
//! finish, and upgraded connections (WebSockets) get what is left of the same
//! grace to end on their own before they are closed. Then the fleet is stopped
//! and the process exits 0. A second signal during the drain ends it at once.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;

use crate::config::{resolve_addr, Config};
use crate::control::admin::Admin;
use crate::control::reload::Reloader;
use crate::control::state::{FleetAddrs, State};
use crate::discovery::fleet::{Fleet, Supervision};
use crate::edge::listener::{self, ListenerSettings};
use crate::edge::{Drain, Shared};
use crate::observe::access_log::AccessLog;
use crate::observe::metrics::Metrics;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr} ({name})")]
    Bind {
        name: String,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Config(String),
    #[error("cannot install signal handlers: {0}")]
    Signals(#[source] std::io::Error),
}

/// How Usher lays out its threads (`workers`).
///
/// - One worker: one thread, tokio's current-thread scheduler (like one
///   nginx worker; no cross-thread queues or wake-ups).
/// - N workers: N threads, each a current-thread runtime with its own
///   accept queue on every listener (`SO_REUSEPORT`, like nginx's worker
///   processes); a connection lives on the thread that accepted it. The
///   first thread also runs everything else (admin, health checks,
///   discovery, reloads). Dispatchers, pools and metrics are shared.
/// - `USHER_RUNTIME=multi_thread`: tokio's work-stealing multi-thread
///   scheduler with N workers and one accept queue, as before `workers`
///   existed; kept for comparison (`bench/overhead.sh`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Threads {
    pub workers: usize,
    /// One current-thread runtime per worker (else tokio's multi-thread one).
    pub per_core: bool,
}

impl Threads {
    pub fn of(config: &Config) -> Threads {
        let workers = config.workers.count().max(1);
        let multi = std::env::var("USHER_RUNTIME").is_ok_and(|v| v == "multi_thread");
        Threads {
            workers,
            per_core: !multi,
        }
    }

    /// Worker threads besides the one `run` is on.
    fn extra(self) -> usize {
        if self.per_core {
            self.workers - 1
        } else {
            0
        }
    }
}

/// Binds `address`, with `SO_REUSEPORT` when other sockets will share it
/// (one accept queue per worker thread), and returns `copies` more bound to
/// the same address (the same port when the configured one is 0).
async fn bind(
    name: &str,
    address: &str,
    copies: usize,
) -> Result<(TcpListener, Vec<std::net::TcpListener>), StartError> {
    let addr = resolve_addr(address).map_err(StartError::Config)?;
    let err = |addr, source| StartError::Bind {
        name: name.to_string(),
        addr,
        source,
    };
    let one = |addr: SocketAddr| -> std::io::Result<TcpListener> {
        let s = if addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        s.set_reuseaddr(true)?;
        if copies > 0 {
            s.set_reuseport(true)?;
        }
        s.bind(addr)?;
        s.listen(1024)
    };
    let first = one(addr).map_err(|e| err(addr, e))?;
    let bound = first.local_addr().map_err(|e| err(addr, e))?;
    let mut more = Vec::with_capacity(copies);
    for _ in 0..copies {
        // Handed to another thread's runtime, which registers it there.
        let l = one(bound)
            .and_then(TcpListener::into_std)
            .map_err(|e| err(bound, e))?;
        more.push(l);
    }
    Ok((first, more))
}

/// The process's signals, installed before anything starts.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
    usr1: tokio::signal::unix::Signal,
    usr2: tokio::signal::unix::Signal,
}

/// What a signal asks for.
enum Asked {
    Stop,
    Reload,
    /// SIGUSR1: reopen the access log (logrotate).
    Reopen,
}

impl Signals {
    fn install() -> Result<Signals, StartError> {
        let s = |k| signal(k).map_err(StartError::Signals);
        Ok(Signals {
            term: s(SignalKind::terminate())?,
            int: s(SignalKind::interrupt())?,
            hup: s(SignalKind::hangup())?,
            // nginx operators send USR1 to reopen logs; the default action
            // would kill Usher.
            usr1: s(SignalKind::user_defined1())?,
            usr2: s(SignalKind::user_defined2())?,
        })
    }

    /// Waits for the next signal that asks for something.
    async fn next(&mut self) -> Asked {
        loop {
            tokio::select! {
                _ = self.term.recv() => { tracing::info!("SIGTERM: draining"); return Asked::Stop; }
                _ = self.int.recv() => { tracing::info!("SIGINT: draining"); return Asked::Stop; }
                _ = self.hup.recv() => { tracing::info!("SIGHUP: reloading configuration"); return Asked::Reload; }
                _ = self.usr1.recv() => return Asked::Reopen,
                _ = self.usr2.recv() => tracing::info!("SIGUSR2 ignored: use SIGHUP to reload, SIGTERM to stop"),
            }
        }
    }

    /// A second SIGTERM or SIGINT (during the drain).
    async fn stop_again(&mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
    }
}

/// Binds every client listener and the admin listener. Bound first, so a
/// busy port fails fast before any process is started.
async fn bind_all(
    config: &Config,
    copies: usize,
) -> Result<
    (
        Vec<(
            crate::config::ListenerConfig,
            TcpListener,
            Vec<std::net::TcpListener>,
        )>,
        Option<TcpListener>,
    ),
    StartError,
> {
    let local = |tcp: &TcpListener| {
        tcp.local_addr()
            .map_err(|e| StartError::Config(e.to_string()))
    };
    let mut listeners = Vec::new();
    for l in &config.listeners {
        let (tcp, more) = bind(&l.name, &l.address, copies).await?;
        tracing::info!(listener = %l.name, addr = %local(&tcp)?, "listening");
        listeners.push((l.clone(), tcp, more));
    }
    let admin = match &config.admin {
        Some(a) => {
            let (tcp, _) = bind("admin", &a.address, 0).await?;
            tracing::info!(addr = %local(&tcp)?, "admin listening");
            Some(tcp)
        }
        None => None,
    };
    Ok((listeners, admin))
}

/// The addresses each upstream's fleet will run on.
fn plan_fleets(config: &Config) -> Result<FleetAddrs, StartError> {
    let mut fleet_addrs = FleetAddrs::new();
    for (name, u) in &config.upstreams {
        if let Some(f) = &u.fleet {
            let addrs = crate::discovery::fleet::plan(f).map_err(StartError::Config)?;
            fleet_addrs.insert(name.clone(), addrs);
        }
    }
    Ok(fleet_addrs)
}

/// Starts every upstream's fleet on its planned addresses, without waiting
/// for the processes to accept connections: their backends, already in
/// `state`, are down until they do (see `discovery::fleet`).
async fn start_fleets(
    config: &Config,
    fleet_addrs: &FleetAddrs,
    state: &Arc<ArcSwap<State>>,
    metrics: &Metrics,
    grace: Duration,
) -> Result<std::collections::HashMap<String, Fleet>, StartError> {
    let mut fleets = std::collections::HashMap::new();
    for (name, u) in &config.upstreams {
        let (Some(f), Some(addrs)) = (&u.fleet, fleet_addrs.get(name)) else {
            continue;
        };
        let sup = Supervision {
            live: state.clone(),
            gates: state.load().gates.clone(),
            restarts: metrics.fleet_restarts.with_label_values(&[name]),
            grace: grace.min(Duration::from_secs(10)),
        };
        let fleet = Fleet::start(name, f, addrs.clone(), sup)
            .await
            .map_err(StartError::Config)?;
        fleets.insert(name.clone(), fleet);
    }
    Ok(fleets)
}

/// Lets client connections finish within `grace`, then upgraded ones
/// within what is left of it.
async fn drain(mut serving: tokio::task::JoinSet<()>, shared: &Shared, grace: Duration) {
    let deadline = tokio::time::Instant::now() + grace;
    while serving.join_next().await.is_some() {}
    tracing::info!("all client connections drained");
    // hyper's drain does not see upgraded connections: they are drained
    // here, within the same grace.
    let open = shared.tunnels.open();
    if open > 0 {
        tracing::info!(open, "waiting for upgraded connections to close");
    }
    match shared.tunnels.drain(deadline).await {
        0 => {}
        closed => tracing::warn!(
            closed,
            ?grace,
            "grace period over: upgraded connections closed"
        ),
    }
}

/// Runs Usher until it is told to stop. `path` is the config file, if any
/// (reloads re-read it). Shaped like linkerd2-proxy's main: build, spawn,
/// wait for signals, drain with a deadline.
pub async fn run(config: Config, path: Option<PathBuf>) -> Result<(), StartError> {
    let metrics = Arc::new(Metrics::new());
    // The first worker (with one runtime per worker) is this thread.
    crate::observe::histogram::claim_shard();
    let mut signals = Signals::install()?;

    // Build: certificates first (a bad one is a config error), then the
    // sockets and the state, then the fleet, whose processes start in the
    // background while Usher already serves.
    let tls = Arc::new(crate::tls::TlsSet::build(&config).map_err(StartError::Config)?);
    let threads = Threads::of(&config);
    let (listeners, admin_listener) = bind_all(&config, threads.extra()).await?;
    let grace = config.timeouts.shutdown_grace.0;
    let fleet_addrs = plan_fleets(&config)?;
    let access_log = AccessLog::new(
        config.access_log.format,
        config.access_log.path.clone(),
        metrics.access_log_dropped.clone(),
    )
    .map_err(StartError::Config)?;
    let (state, commit) =
        State::build(config.clone(), None, &fleet_addrs, &metrics).map_err(StartError::Config)?;
    commit.apply();
    state.probe_capacity().await;
    let config_name = path.as_ref().map_or_else(
        || crate::config::DEFAULT_CONFIG_NAME.to_string(),
        |p| p.display().to_string(),
    );
    let mut bound: Vec<(String, SocketAddr)> = listeners
        .iter()
        .filter_map(|(l, tcp, _)| Some((l.name.clone(), tcp.local_addr().ok()?)))
        .collect();
    if let Some(a) = admin_listener.as_ref().and_then(|t| t.local_addr().ok()) {
        bound.push(("admin".to_string(), a));
    }
    crate::control::summary::log_startup(&state, &config_name, &bound);
    let state = Arc::new(ArcSwap::from_pointee(state));
    state.load().start(&state, &metrics);
    let fleets = start_fleets(&config, &fleet_addrs, &state, &metrics, grace).await?;
    let shared = Arc::new(Shared {
        state: state.clone(),
        metrics: metrics.clone(),
        access_log: access_log.clone(),
        tunnels: Default::default(),
    });

    // Spawn: listeners, admin, the reload watcher, certificate rotation.
    let stop = Drain::new();
    let mut serving = tokio::task::JoinSet::new();
    // Per worker thread: its copy of every listener.
    let mut copies: Vec<Vec<(ListenerSettings, std::net::TcpListener)>> =
        (0..threads.extra()).map(|_| Vec::new()).collect();
    for (l, tcp, more) in listeners {
        let settings = ListenerSettings::new(
            &l,
            config.timeouts.client_header.0,
            config.timeouts.client_keepalive.0,
            tls.get(&l.name),
        );
        metrics.client_connections.with_label_values(&[&l.name]);
        for (w, std_l) in more.into_iter().enumerate() {
            copies[w].push((settings.clone(), std_l));
        }
        serving.spawn(listener::serve(
            tcp,
            settings,
            shared.clone(),
            stop.clone(),
            grace,
        ));
    }
    // Worker threads live until the process is done (not only until their
    // listeners have drained): tunnels and detached exchanges run on them.
    let exit = CancellationToken::new();
    let mut worker_threads = Vec::new();
    for (i, socks) in copies.into_iter().enumerate() {
        let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
        let (shared, stop, exit) = (shared.clone(), stop.clone(), exit.clone());
        let spawned = std::thread::Builder::new()
            .name(format!("usher-w{}", i + 1))
            .spawn(move || worker_thread(i + 1, socks, shared, stop, exit, grace, done_tx));
        match spawned {
            Ok(h) => worker_threads.push(h),
            Err(e) => {
                return Err(StartError::Config(format!(
                    "cannot start worker thread {}: {e}",
                    i + 1
                )))
            }
        }
        serving.spawn(async move {
            let _ = done_rx.await;
        });
    }
    let reloader = Arc::new(Reloader {
        path,
        last: Default::default(),
        state: state.clone(),
        metrics: metrics.clone(),
        fleet: Arc::new(std::sync::Mutex::new(fleet_addrs)),
        fleets: Arc::new(tokio::sync::Mutex::new(fleets)),
        lock: Default::default(),
        access_log,
        tls: tls.clone(),
    });
    let admin = Arc::new(Admin {
        started: std::time::Instant::now(),
        state: state.clone(),
        metrics: metrics.clone(),
        draining: Default::default(),
        reloader: reloader.clone(),
    });
    let admin_stop = CancellationToken::new();
    if let Some(tcp) = admin_listener {
        tokio::spawn(crate::control::admin::serve(
            tcp,
            admin.clone(),
            admin_stop.clone(),
        ));
    }
    tokio::spawn(crate::control::reload::watch(
        reloader.clone(),
        stop.token().clone(),
    ));
    tokio::spawn(crate::tls::rotate::watch(
        tls,
        metrics.clone(),
        stop.token().clone(),
    ));

    // Wait for signals. Every reload, from SIGHUP or the file watch, goes
    // through `Reloader::reload`.
    tracing::info!(version = env!("CARGO_PKG_VERSION"), "usher is serving");
    loop {
        match signals.next().await {
            Asked::Stop => break,
            Asked::Reload => {
                let r = reloader.clone();
                // Building a state is quick, but keep file I/O off the runtime.
                let _ = tokio::task::spawn_blocking(move || r.reload()).await;
            }
            Asked::Reopen => {
                if !shared.access_log.reopen() {
                    tracing::info!("SIGUSR1 ignored: the access log goes to stdout, there is nothing to reopen; use SIGHUP to reload, SIGTERM to stop");
                }
            }
        }
    }

    // Drain with a deadline; a second signal ends it at once.
    admin.draining.store(true, Ordering::Relaxed);
    stop.fire();
    tokio::select! {
        _ = drain(serving, &shared, grace) => {}
        _ = signals.stop_again() => tracing::warn!("second signal: stopping now"),
    }
    state.load().tasks.cancel();
    let fleets = std::mem::take(&mut *reloader.fleets.lock().await);
    for (_, f) in fleets {
        f.shutdown().await;
    }
    admin_stop.cancel();
    exit.cancel();
    for h in worker_threads {
        let _ = h.join();
    }
    tracing::info!("usher stopped");
    Ok(())
}

/// One worker thread (`workers` > 1): a current-thread runtime serving its
/// copies of the listeners until `stop`, then kept up until `exit`.
fn worker_thread(
    index: usize,
    socks: Vec<(ListenerSettings, std::net::TcpListener)>,
    shared: Arc<Shared>,
    stop: Drain,
    exit: CancellationToken,
    grace: Duration,
    done: tokio::sync::oneshot::Sender<()>,
) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(worker = index, error = %e, "cannot start a worker runtime; its share of connections goes to the others");
            return;
        }
    };
    crate::upstream::pool::set_worker(index);
    crate::observe::histogram::claim_shard();
    rt.block_on(async move {
        let mut set = tokio::task::JoinSet::new();
        for (settings, std_l) in socks {
            match std_l
                .set_nonblocking(true)
                .and_then(|()| TcpListener::from_std(std_l))
            {
                Ok(l) => {
                    set.spawn(listener::serve(
                        l,
                        settings,
                        shared.clone(),
                        stop.clone(),
                        grace,
                    ));
                }
                Err(e) => {
                    tracing::error!(worker = index, error = %e, "cannot serve a listener copy")
                }
            }
        }
        while set.join_next().await.is_some() {}
        let _ = done.send(());
        exit.cancelled().await;
    });
}
