//! Certificate rotation without a restart.
//!
//! Each TLS listener has one rustls `ServerConfig`, made at start, whose
//! certificate resolver reads an `ArcSwap` (see `sni.rs`). Rotation only
//! swaps that: connections already established keep their session, new
//! handshakes get the new certificate.
//!
//! Two things rotate: a config reload (SIGHUP or file change) re-reads every
//! certificate, possibly at new paths; and a change of a certificate or key
//! file itself, seen by polling their modification times once a second
//! (which also catches Kubernetes Secret volumes, whose updates are symlink
//! swaps). A rotation that fails (missing file, bad PEM, key not matching,
//! expired) keeps the certificates in use, logs the file and the reason, and
//! counts `usher_config_reloads_total{result="failure"}`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use super::server_config;
use super::sni::{Certs, SniResolver};
use crate::config::{Config, TlsConfig};
use crate::observe::metrics::Metrics;

/// What a file looked like when last read: its modification time and size.
type Stamp = Vec<(PathBuf, Option<(SystemTime, u64)>)>;

fn stamp(cfg: &TlsConfig) -> Stamp {
    let mut paths: Vec<PathBuf> = cfg
        .certificates
        .iter()
        .chain(cfg.default.iter())
        .flat_map(|c| [c.cert.clone(), c.key.clone()])
        .collect();
    paths.dedup();
    paths
        .into_iter()
        .map(|p| {
            // metadata follows symlinks: a swapped symlink target counts.
            let s = std::fs::metadata(&p)
                .ok()
                .and_then(|m| Some((m.modified().ok()?, m.len())));
            (p, s)
        })
        .collect()
}

/// One TLS listener: its acceptor and what it was last loaded from.
pub struct TlsListener {
    pub name: String,
    pub acceptor: TlsAcceptor,
    resolver: Arc<SniResolver>,
    current: Mutex<(TlsConfig, Stamp)>,
}

impl TlsListener {
    fn new(name: &str, cfg: &TlsConfig) -> Result<TlsListener, String> {
        let before = stamp(cfg);
        let certs = Certs::load(cfg).map_err(|e| format!("listener `{name}`: {e}"))?;
        let resolver = Arc::new(SniResolver::new(certs));
        Ok(TlsListener {
            name: name.to_string(),
            acceptor: TlsAcceptor::from(server_config(resolver.clone())),
            resolver,
            current: Mutex::new((cfg.clone(), before)),
        })
    }

    pub fn handshake_timeout(&self) -> Duration {
        self.current.lock().unwrap().0.handshake_timeout.0
    }

    fn config(&self) -> TlsConfig {
        self.current.lock().unwrap().0.clone()
    }
}

/// A rotation that loaded fine and waits to be applied.
pub struct Prepared(Vec<(Arc<TlsListener>, TlsConfig, Stamp, Certs)>);

impl Prepared {
    /// Swaps the new certificates in.
    pub fn commit(self) {
        for (l, cfg, st, certs) in self.0 {
            l.resolver.store(certs);
            *l.current.lock().unwrap() = (cfg, st);
        }
    }
}

/// Every TLS listener of the process, by name.
#[derive(Default)]
pub struct TlsSet {
    listeners: BTreeMap<String, Arc<TlsListener>>,
}

fn tls_of(c: &Config) -> BTreeMap<&str, Option<&TlsConfig>> {
    c.listeners
        .iter()
        .map(|l| (l.name.as_str(), l.tls.as_ref()))
        .collect()
}

impl TlsSet {
    /// Loads the certificates of every TLS listener (at start).
    pub fn build(c: &Config) -> Result<TlsSet, String> {
        let mut listeners = BTreeMap::new();
        for (name, tls) in tls_of(c) {
            if let Some(tls) = tls {
                listeners.insert(name.to_string(), Arc::new(TlsListener::new(name, tls)?));
            }
        }
        Ok(TlsSet { listeners })
    }

    pub fn get(&self, name: &str) -> Option<Arc<TlsListener>> {
        self.listeners.get(name).cloned()
    }

    /// Loads the certificates a new configuration names, without applying
    /// them. Turning TLS on or off needs a restart (the socket's protocol
    /// changes under open connections).
    pub fn prepare(&self, new: &Config) -> Result<Prepared, String> {
        let mut out = Vec::new();
        for (name, tls) in tls_of(new) {
            match (self.listeners.get(name), tls) {
                (Some(l), Some(cfg)) => {
                    let st = stamp(cfg);
                    let certs = Certs::load(cfg).map_err(|e| format!("listener `{name}`: {e}"))?;
                    out.push((l.clone(), cfg.clone(), st, certs));
                }
                (None, None) => {}
                _ => {
                    return Err(format!(
                        "listener `{name}`: turning TLS on or off needs a restart"
                    ))
                }
            }
        }
        Ok(Prepared(out))
    }

    /// One poll: reloads the listeners whose certificate or key files
    /// changed since they were loaded.
    pub fn check_files(&self, metrics: &Metrics) {
        for l in self.listeners.values() {
            let cfg = l.config();
            let seen = l.current.lock().unwrap().1.clone();
            if stamp(&cfg) == seen {
                continue;
            }
            // Let a writer that replaces cert and key one after the other
            // finish both.
            std::thread::sleep(Duration::from_millis(200));
            let st = stamp(&cfg);
            let result = Certs::load(&cfg);
            // Either way this version of the files is dealt with: a broken
            // file is reported once, not every second.
            let label = match result {
                Ok(certs) => {
                    l.resolver.store(certs);
                    tracing::info!(listener = %l.name, "certificate files changed; new certificates in use");
                    "success"
                }
                Err(e) => {
                    tracing::error!(listener = %l.name, error = %e, "certificate files changed but cannot be used; keeping the certificates in use");
                    "failure"
                }
            };
            l.current.lock().unwrap().1 = st;
            metrics.config_reloads.with_label_values(&[label]).inc();
        }
    }
}

/// Polls the certificate files once a second until `stop`.
pub async fn watch(set: Arc<TlsSet>, metrics: Arc<Metrics>, stop: CancellationToken) {
    if set.listeners.is_empty() {
        return;
    }
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        let (set, metrics) = (set.clone(), metrics.clone());
        let _ = tokio::task::spawn_blocking(move || set.check_files(&metrics)).await;
    }
}
