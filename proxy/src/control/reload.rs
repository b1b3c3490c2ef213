//! Configuration reload: on SIGHUP or when the config file changes.
//!
//! The new file is parsed, validated and built into a new [`State`] off the
//! request path, then swapped in whole. A bad file keeps the running state,
//! logs the error with file and line, and counts
//! `usher_config_reloads_total{result="failure"}`.
//!
//! Listeners and the admin address are bound at start: a reload that changes
//! them is refused with a message saying a restart is needed, as is adding or
//! removing a whole fleet. A changed fleet (new command, process count or
//! environment: a new app version) is applied by a rolling restart, one
//! process at a time, with no failed requests (see `Fleet::roll`).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;

use crate::config::Config;
use crate::control::state::{FleetAddrs, State};
use crate::observe::metrics::Metrics;

pub struct Reloader {
    pub path: Option<PathBuf>,
    /// The last reload attempt (for `/status`, and so that a trigger that
    /// finds the same bytes answers its outcome again).
    pub last: std::sync::Mutex<Option<LastReload>>,
    pub state: Arc<ArcSwap<State>>,
    pub metrics: Arc<Metrics>,
    pub fleet: Arc<std::sync::Mutex<FleetAddrs>>,
    pub lock: std::sync::Mutex<()>,
    pub fleets:
        Arc<tokio::sync::Mutex<std::collections::HashMap<String, crate::discovery::fleet::Fleet>>>,
    pub access_log: crate::observe::access_log::AccessLog,
    /// TLS listeners: their certificates are re-read on every reload.
    pub tls: Arc<crate::tls::TlsSet>,
}

/// One reload attempt.
#[derive(Debug, Clone)]
pub struct LastReload {
    pub at: SystemTime,
    /// A hash of the file's bytes. A trigger that finds the same bytes (an
    /// edit is seen by the file watch *and* followed by a SIGHUP) answers
    /// `outcome` again instead of reloading twice and counting one bad edit
    /// as two failures.
    content: Option<u64>,
    /// The summary of what changed, or the errors.
    pub outcome: Result<String, String>,
}

fn listener_addrs(c: &Config) -> Vec<(String, String)> {
    let mut v: Vec<_> = c
        .listeners
        .iter()
        .map(|l| (l.name.clone(), l.address.clone()))
        .collect();
    if let Some(a) = &c.admin {
        v.push(("admin".into(), a.address.clone()));
    }
    v
}

impl Reloader {
    /// Reloads now, from whichever trigger (SIGHUP, the file watch,
    /// `POST /reload`). Returns a one-line summary of what changed, or the
    /// errors (one per line, `file:line:col: key: message`).
    pub fn reload(&self) -> Result<String, String> {
        // SIGHUP and the file watch may fire together: one reload at a time,
        // so each builds on the state the previous one swapped in.
        let _one_at_a_time = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        // Read once: the same bytes are hashed and parsed.
        let text = self
            .path
            .as_ref()
            .and_then(|p| std::fs::read_to_string(p).ok());
        let content = text.as_ref().map(|t| {
            use std::hash::{Hash, Hasher};
            let mut h = std::collections::hash_map::DefaultHasher::new();
            t.hash(&mut h);
            h.finish()
        });
        if let Some(last) = &*self.last.lock().unwrap() {
            if content.is_some() && content == last.content {
                tracing::info!("configuration file unchanged since the last reload; nothing to do");
                // The same outcome as when this content was loaded (by the
                // file watch, usually, a moment before a SIGHUP or `usher
                // reload`), not a second reload.
                return last.outcome.clone();
            }
        }
        let result = self.try_reload(text.as_deref());
        let label = if result.is_ok() { "success" } else { "failure" };
        self.metrics
            .config_reloads
            .with_label_values(&[label])
            .inc();
        match &result {
            Ok(summary) => tracing::info!("configuration reloaded: {summary}"),
            Err(e) => {
                tracing::error!(error = %e.replace('\n', "; "), "configuration reload failed; keeping the running configuration")
            }
        }
        *self.last.lock().unwrap() = Some(LastReload {
            at: SystemTime::now(),
            content,
            outcome: result.clone(),
        });
        result
    }

    /// `text`: the file's content, if it could be read (else reading it
    /// again reports why it cannot be).
    fn try_reload(&self, text: Option<&str>) -> Result<String, String> {
        let Some(path) = &self.path else {
            return Err("running on the embedded default config; nothing to reload".into());
        };
        let loaded = match text {
            Some(t) => crate::control::load_text(t, path),
            None => crate::control::load_file(path),
        };
        let new = loaded.map_err(|errs| {
            errs.iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("\n")
        })?;
        let old = self.state.load_full();
        if listener_addrs(&new) != listener_addrs(&old.config) {
            return Err(format!(
                "{}: listeners and admin address cannot change on reload; restart Usher to apply",
                path.display()
            ));
        }
        let mut rolls = Vec::new();
        for (name, u) in &new.upstreams {
            let before = old
                .config
                .upstreams
                .get(name)
                .and_then(|o| o.fleet.as_ref());
            if let (Some(a), Some(b)) = (before, &u.fleet) {
                if a.command != b.command
                    || a.processes != b.processes
                    || a.env != b.env
                    || a.host != b.host
                    || a.max_in_flight != b.max_in_flight
                {
                    rolls.push((name.clone(), b.clone()));
                }
            } else if before.is_some() != u.fleet.is_some() {
                return Err(format!(
                    "{}: upstreams.{name}.fleet added or removed; fleet changes apply on restart",
                    path.display()
                ));
            }
        }
        let fleet_addrs = self.fleet.lock().unwrap().clone();
        let tls = self.tls.prepare(&new)?;
        // Two phases: everything above builds without touching what is
        // live, so any error leaves the running state as it was. From here
        // on nothing fails: swap, then commit the changes to shared objects.
        let summary = summarize(&old, &new);
        let (state, commit) = State::build(new, Some(&old), &fleet_addrs, &self.metrics)?;
        self.access_log
            .set_path(state.config.access_log.path.clone());
        self.access_log.set_format(state.config.access_log.format);
        let state = Arc::new(state);
        self.state.store(state.clone());
        commit.apply();
        tls.commit();
        state.start(&self.state, &self.metrics);
        old.tasks.cancel();
        for (name, cfg) in rolls {
            self.spawn_roll(name, cfg);
        }
        Ok(summary)
    }

    /// Starts a rolling restart of one upstream's fleet in the background.
    fn spawn_roll(&self, name: String, cfg: crate::config::FleetConfig) {
        let live = crate::discovery::fleet::LiveUpstream {
            name: name.clone(),
            live: self.state.clone(),
            addrs: self.fleet.clone(),
            fixed_capacity: cfg.max_in_flight.fixed(),
        };
        let fleets = self.fleets.clone();
        tokio::spawn(async move {
            // One rollout at a time per Usher; a later reload waits its turn.
            let mut fleets = fleets.lock().await;
            let Some(fleet) = fleets.get_mut(&name) else {
                return;
            };
            if fleet.config().command == cfg.command
                && fleet.config().processes == cfg.processes
                && fleet.config().env == cfg.env
                && fleet.config().host == cfg.host
                && fleet.config().max_in_flight == cfg.max_in_flight
            {
                return;
            }
            tracing::info!(upstream = %name, "fleet changed: rolling restart");
            match fleet.roll(cfg, &live).await {
                Ok(()) => tracing::info!(upstream = %name, "rolling restart done"),
                Err(e) => tracing::error!(upstream = %name, error = %e, "rolling restart failed"),
            }
        });
    }
}

/// One line saying what a reload changes: upstreams added and removed, and
/// per upstream the static backends added and removed and the limits that
/// moved.
pub fn summarize(old: &State, new: &Config) -> String {
    let before = &old.config.upstreams;
    let mut parts: Vec<String> = Vec::new();
    for name in new.upstreams.keys().filter(|n| !before.contains_key(*n)) {
        parts.push(format!("upstream {name} added"));
    }
    for name in before.keys().filter(|n| !new.upstreams.contains_key(*n)) {
        parts.push(format!("upstream {name} removed"));
    }
    for (name, u) in &new.upstreams {
        let Some(o) = before.get(name) else { continue };
        let mut changes: Vec<String> = Vec::new();
        let addrs = |c: &crate::config::UpstreamConfig| -> Vec<String> {
            c.backends.iter().map(|b| b.address.clone()).collect()
        };
        let (was, now) = (addrs(o), addrs(u));
        for a in now.iter().filter(|a| !was.contains(a)) {
            changes.push(format!("+{a}"));
        }
        for a in was.iter().filter(|a| !now.contains(a)) {
            changes.push(format!("-{a}"));
        }
        for b in &u.backends {
            if let Some(ob) = o.backends.iter().find(|ob| ob.address == b.address) {
                if ob.max_in_flight != b.max_in_flight {
                    changes.push(format!(
                        "{} max_in_flight {} → {}",
                        b.address,
                        show_cap(ob.max_in_flight),
                        show_cap(b.max_in_flight)
                    ));
                }
                if ob.weight != b.weight {
                    changes.push(format!("{} weight {} → {}", b.address, ob.weight, b.weight));
                }
            }
        }
        if o.queue.max_depth != u.queue.max_depth {
            changes.push(format!(
                "queue.max_depth {} → {}",
                o.queue.max_depth, u.queue.max_depth
            ));
        }
        if o.queue.timeout != u.queue.timeout {
            changes.push(format!(
                "queue.timeout {:?} → {:?}",
                o.queue.timeout.0, u.queue.timeout.0
            ));
        }
        if o.timeouts.response != u.timeouts.response {
            changes.push(format!(
                "timeouts.response {:?} → {:?}",
                o.timeouts.response.0, u.timeouts.response.0
            ));
        }
        if o.default_capacity != u.default_capacity {
            changes.push(format!(
                "default_capacity {} → {}",
                o.default_capacity, u.default_capacity
            ));
        }
        if o.fleet.as_ref().map(|f| (&f.command, f.processes))
            != u.fleet.as_ref().map(|f| (&f.command, f.processes))
        {
            changes.push("fleet changed (rolling restart)".to_string());
        }
        if !changes.is_empty() {
            parts.push(format!("upstream {name}: {}", changes.join(", ")));
        }
    }
    if old.config.routes.len() != new.routes.len() {
        parts.push(format!(
            "routes {} → {}",
            old.config.routes.len(),
            new.routes.len()
        ));
    }
    if parts.is_empty() {
        "no change to upstreams or backends".to_string()
    } else {
        parts.join("; ")
    }
}

fn show_cap(m: crate::config::MaxInFlight) -> String {
    m.fixed()
        .map_or_else(|| "auto".to_string(), |n| n.to_string())
}

/// The config file's modification time, for the file watch.
pub fn mtime(path: &PathBuf) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// Polls the file once a second and reloads when it changes. Polling works
/// on every filesystem, including Kubernetes ConfigMap volumes, whose
/// updates are symlink swaps that inotify watches on the file itself miss.
pub async fn watch(reloader: Arc<Reloader>, stop: tokio_util::sync::CancellationToken) {
    let Some(path) = reloader.path.clone() else {
        return;
    };
    let mut last = mtime(&path);
    let mut last_len = std::fs::metadata(&path).map(|m| m.len()).ok();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        let now = mtime(&path);
        let len = std::fs::metadata(&path).map(|m| m.len()).ok();
        if now != last || len != last_len {
            last = now;
            last_len = len;
            if now.is_some() {
                tracing::info!(file = %path.display(), "config file changed; reloading");
                let _ = reloader.reload();
            }
        }
    }
}
