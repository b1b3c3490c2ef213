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
use crate::edge::Shared;
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

async fn bind(name: &str, address: &str) -> Result<TcpListener, StartError> {
    let addr = resolve_addr(address).map_err(StartError::Config)?;
    TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind {
            name: name.to_string(),
            addr,
            source,
        })
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
) -> Result<
    (
        Vec<(crate::config::ListenerConfig, TcpListener)>,
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
        let tcp = bind(&l.name, &l.address).await?;
        tracing::info!(listener = %l.name, addr = %local(&tcp)?, "listening");
        listeners.push((l.clone(), tcp));
    }
    let admin = match &config.admin {
        Some(a) => {
            let tcp = bind("admin", &a.address).await?;
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
    let mut signals = Signals::install()?;

    // Build: certificates first (a bad one is a config error), then the
    // sockets and the state, then the fleet, whose processes start in the
    // background while Usher already serves.
    let tls = Arc::new(crate::tls::TlsSet::build(&config).map_err(StartError::Config)?);
    let (listeners, admin_listener) = bind_all(&config).await?;
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
        .filter_map(|(l, tcp)| Some((l.name.clone(), tcp.local_addr().ok()?)))
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
    let stop = CancellationToken::new();
    let mut serving = tokio::task::JoinSet::new();
    for (l, tcp) in listeners {
        let settings = ListenerSettings {
            name: l.name.clone(),
            max_connections: l.max_connections,
            header_timeout: config.timeouts.client_header.0,
            keepalive: config.timeouts.client_keepalive.0,
            tls: tls.get(&l.name),
        };
        metrics.client_connections.with_label_values(&[&l.name]);
        serving.spawn(listener::serve(
            tcp,
            settings,
            shared.clone(),
            stop.clone(),
            grace,
        ));
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
        stop.clone(),
    ));
    tokio::spawn(crate::tls::rotate::watch(
        tls,
        metrics.clone(),
        stop.clone(),
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
    stop.cancel();
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
    tracing::info!("usher stopped");
    Ok(())
}
