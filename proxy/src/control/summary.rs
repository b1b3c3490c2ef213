//! The startup summary: what Usher is about to serve, in a few lines an
//! operator can check against what they meant — the config file, the
//! listeners, and each upstream with its backends and where each backend's
//! capacity came from. (An `auto` capacity that falls back to
//! `default_capacity` is also warned about once per backend, at its first
//! response without a load report: see `upstream`.)

use crate::config::Config;
use crate::control::state::State;
use crate::dispatch::backend::CapacitySource;

/// Logs the summary (after the startup capacity probe, so reported
/// capacities are in).
pub fn log_startup(state: &State, config_name: &str, bound: &[(String, std::net::SocketAddr)]) {
    let c: &Config = &state.config;
    tracing::info!(config = %config_name, "usher starting");
    // The addresses really bound (a configured port 0 is a chosen one now).
    let addr = |name: &str, configured: &str| {
        bound
            .iter()
            .find(|(n, _)| n == name)
            .map_or_else(|| configured.to_string(), |(_, a)| a.to_string())
    };
    for l in &c.listeners {
        let proto = if l.tls.is_some() { "https" } else { "http" };
        tracing::info!(listener = %l.name, address = %addr(&l.name, &l.address), %proto, "listener");
    }
    if let Some(a) = &c.admin {
        tracing::info!(address = %addr("admin", &a.address), "admin listener (/ status page, /status, /metrics, /readyz, POST /reload)");
    }
    let mut names: Vec<&String> = state.upstreams.keys().collect();
    names.sort();
    for name in names {
        let up = &state.upstreams[name];
        let backends = up.dispatcher.backends();
        let listed: Vec<String> = backends
            .iter()
            .map(|b| {
                let source = match b.capacity_source() {
                    CapacitySource::MaxInFlight => "max_in_flight",
                    CapacitySource::Reported => "worker's report",
                    CapacitySource::Default => "default_capacity",
                };
                format!("{} ×{} ({source})", b.key, b.full_capacity())
            })
            .collect();
        let source = if up.cfg.fleet.is_some() {
            "fleet"
        } else if up.cfg.dns.is_some() {
            "dns"
        } else {
            "static"
        };
        tracing::info!(
            upstream = %name,
            %source,
            backends = %if listed.is_empty() { "none yet".to_string() } else { listed.join(", ") },
            "upstream"
        );
        let replicas = up.cfg.proxy_replicas;
        if replicas > 1 {
            let id = crate::dispatch::share::ReplicaId::get();
            let statics: Vec<String> = backends
                .iter()
                .filter(|b| b.capacity_source() != CapacitySource::Reported)
                .map(|b| format!("{} ×{}", b.key, b.static_share()))
                .collect();
            tracing::info!(
                upstream = %name,
                replicas,
                identity = %id.describe(replicas),
                "shared with other Usher replicas: workers that report their load (X-Usher-Load with busy) are shared by report; others by a static split that never over-fills"
            );
            if !statics.is_empty() {
                tracing::info!(upstream = %name, backends = %statics.join(", "), "static split (no load report yet)");
            }
        }
    }
}
