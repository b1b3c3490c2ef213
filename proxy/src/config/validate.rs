//! The checks serde cannot make: at least one listener and one route,
//! addresses that resolve and do not collide, routes that name a defined
//! upstream, and numbers whose type is wider than their meaning. Every
//! problem is reported, not just the first, each with its key and the line
//! it is on (a best-effort search of the text, see `locate.rs`).

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::Duration;

use super::locate::{find_line, Locations};
use super::schema::{
    AdminConfig, BackendConfig, Config, DnsConfig, FleetConfig, HealthCheckConfig, ListenerConfig,
    Overload, Prefetch, QueueConfig, RouteConfig, UpstreamConfig,
};
use super::{resolve_addr, ConfigError};

/// Every problem in `c`, in the order of the sections in the file.
pub(super) fn validate(c: &Config, text: &str, file: &str, at: &Locations) -> Vec<ConfigError> {
    let mut r = Report {
        text,
        file,
        at,
        errors: Vec::new(),
    };
    let listener_addrs = listeners(&c.listeners, &mut r);
    if let Some(a) = &c.admin {
        admin(a, &listener_addrs, &mut r);
    }
    routes(c, &mut r);
    for (name, u) in &c.upstreams {
        upstream(name, u, &mut r);
    }
    r.errors
}

/// The problems found so far, and where to locate new ones.
struct Report<'a> {
    text: &'a str,
    file: &'a str,
    at: &'a Locations,
    errors: Vec<ConfigError>,
}

impl Report<'_> {
    /// Records a problem at `key`: at its value's line and column in the
    /// parsed document, or, for a key left to its default, at the nearest
    /// enclosing section; `needles` are the last resort (a text search).
    fn err(&mut self, key: impl Into<String>, needles: &[&str], message: impl Into<String>) {
        let key = key.into();
        let (line, column) = match self.at.find(&key) {
            Some((l, c)) => (Some(l), Some(c)),
            None => (find_line(self.text, needles), None),
        };
        self.errors.push(ConfigError {
            file: self.file.to_string(),
            line,
            column,
            key,
            message: message.into(),
        });
    }
}

/// Checks the listeners and returns their addresses (port 0 left out: any
/// number of listeners may ask for an ephemeral port).
fn listeners(ls: &[ListenerConfig], r: &mut Report) -> HashSet<SocketAddr> {
    if ls.is_empty() {
        r.err(
            "listeners",
            &["listeners"],
            "at least one listener is required",
        );
    }
    let mut seen_addrs = HashSet::new();
    let mut seen_names = HashSet::new();
    for (i, l) in ls.iter().enumerate() {
        let key = format!("listeners[{i}].address");
        match resolve_addr(&l.address) {
            Ok(a) => {
                if a.port() != 0 && !seen_addrs.insert(a) {
                    r.err(
                        key,
                        &[&l.address],
                        format!("duplicate listener address {a}"),
                    );
                }
            }
            Err(m) => r.err(key, &[&l.address], m),
        }
        if !seen_names.insert(&l.name) {
            r.err(
                format!("listeners[{i}].name"),
                &[&l.name],
                format!("duplicate listener name `{}`", l.name),
            );
        }
        if l.max_connections == 0 {
            r.err(
                format!("listeners[{i}].max_connections"),
                &["max_connections"],
                "must be at least 1",
            );
        }
    }
    seen_addrs
}

fn admin(admin: &AdminConfig, listener_addrs: &HashSet<SocketAddr>, r: &mut Report) {
    match resolve_addr(&admin.address) {
        Ok(a) => {
            if a.port() != 0 && listener_addrs.contains(&a) {
                r.err(
                    "admin.address",
                    &[&admin.address],
                    format!("admin address {a} is also a listener address"),
                );
            }
        }
        Err(m) => r.err("admin.address", &[&admin.address], m),
    }
}

fn routes(c: &Config, r: &mut Report) {
    if c.routes.is_empty() {
        r.err("routes", &["routes"], "at least one route is required");
    }
    for (i, route) in c.routes.iter().enumerate() {
        route_upstream_exists(c, i, route, r);
        if !route.path_prefix.starts_with('/') {
            r.err(
                format!("routes[{i}].path_prefix"),
                &[&route.path_prefix],
                "must start with `/`",
            );
        }
    }
}

fn route_upstream_exists(c: &Config, i: usize, route: &RouteConfig, r: &mut Report) {
    if c.upstreams.contains_key(&route.upstream) {
        return;
    }
    let known: Vec<_> = c.upstreams.keys().map(String::as_str).collect();
    let known = if known.is_empty() {
        "none".into()
    } else {
        known.join(", ")
    };
    r.err(
        format!("routes[{i}].upstream"),
        &["upstream", &route.upstream],
        format!(
            "route points to unknown upstream `{}` (defined: {known})",
            route.upstream
        ),
    );
}

fn upstream(name: &str, u: &UpstreamConfig, r: &mut Report) {
    let k = |s: &str| format!("upstreams.{name}.{s}");
    if u.backends.is_empty() && u.fleet.is_none() && u.dns.is_none() {
        r.err(
            k("backends"),
            &[&format!("{name}:")],
            "an upstream needs `backends`, a `fleet` or `dns`",
        );
    }
    backends(&u.backends, &k, r);
    if let Some(d) = &u.dns {
        dns(d, &k, r);
    }
    if let Some(f) = &u.fleet {
        fleet(f, &k, r);
    }
    if u.proxy_replicas == 0 {
        r.err(
            k("proxy_replicas"),
            &["proxy_replicas"],
            "must be at least 1",
        );
    }
    if u.default_capacity == 0 {
        r.err(
            k("default_capacity"),
            &["default_capacity"],
            "must be at least 1",
        );
    }
    if u.queue.timeout.0.is_zero() {
        r.err(k("queue.timeout"), &["timeout"], "must be above zero");
    }
    if u.queue.overload == Overload::Codel {
        overload(&u.queue, &k, r);
    }
    if let Prefetch::Fixed(n) = u.queue.prefetch {
        if n > MAX_PREFETCH {
            r.err(
                k("queue.prefetch"),
                &["prefetch"],
                format!(
                    "must be at most {MAX_PREFETCH} (usher-worker's default --queue); \
                     beyond one per thread it never helps"
                ),
            );
        }
    }
    if let Some(h) = &u.health_check {
        health_check(h, &k, r);
    }
    if u.outlier.max_ejected_percent > 100 {
        r.err(
            k("outlier.max_ejected_percent"),
            &["max_ejected_percent"],
            "must be 0..=100",
        );
    }
}

/// The most `queue.prefetch` may say: usher-worker's default `--queue`, far
/// above the one request per thread that can ever help (the dispatcher also
/// caps it at each backend's capacity).
const MAX_PREFETCH: u32 = 64;

/// A target at or above `queue.timeout` is allowed (a waiter then times out
/// before it is old enough to shed): refusing it would reject configs with a
/// short timeout that were valid before overload control existed.
fn overload(q: &QueueConfig, k: &impl Fn(&str) -> String, r: &mut Report) {
    let (target, interval) = (q.overload_target.0, q.overload_interval.0);
    if target.is_zero() {
        r.err(
            k("queue.overload_target"),
            &["overload_target"],
            "must be above zero (or set `overload: off`)",
        );
    }
    if interval <= target {
        r.err(
            k("queue.overload_interval"),
            &["overload_interval"],
            format!(
                "must be longer than overload_target ({target:?}): the shortest wait \
                 over the interval is compared with the target"
            ),
        );
    }
}

fn backends(bs: &[BackendConfig], k: &impl Fn(&str) -> String, r: &mut Report) {
    let mut seen = HashSet::new();
    for (i, b) in bs.iter().enumerate() {
        match resolve_addr(&b.address) {
            Ok(a) => {
                if !seen.insert(a) {
                    r.err(
                        k(&format!("backends[{i}].address")),
                        &[&b.address],
                        format!("duplicate backend {a}"),
                    );
                }
            }
            Err(m) => r.err(k(&format!("backends[{i}].address")), &[&b.address], m),
        }
        if b.weight == 0 {
            r.err(
                k(&format!("backends[{i}].weight")),
                &["weight"],
                "weight must be at least 1",
            );
        }
    }
}

fn dns(d: &DnsConfig, k: &impl Fn(&str) -> String, r: &mut Report) {
    if d.name.is_empty() || d.port == 0 {
        r.err(k("dns"), &["dns"], "dns needs a name and a non-zero port");
    }
    if d.refresh.0 < Duration::from_millis(100) {
        r.err(k("dns.refresh"), &["refresh"], "must be at least 100ms");
    }
}

fn fleet(f: &FleetConfig, k: &impl Fn(&str) -> String, r: &mut Report) {
    if f.command.is_empty() {
        r.err(
            k("fleet.command"),
            &["command"],
            "the fleet command is empty",
        );
    }
    if f.processes == 0 || f.processes > 1024 {
        r.err(
            k("fleet.processes"),
            &["processes"],
            "processes must be between 1 and 1024",
        );
    }
    if !f.command.iter().any(|a| a.contains("{port}")) {
        r.err(
            k("fleet.command"),
            &["command"],
            "the fleet command must contain `{port}` so each process gets its own port",
        );
    }
    // Summed in u64: `processes` is any u32 here (its range error is separate).
    if f.base_port != 0 && u64::from(f.base_port) + u64::from(f.processes) > 65536 {
        r.err(
            k("fleet.base_port"),
            &["base_port"],
            "base_port + processes exceeds 65535",
        );
    }
}

fn health_check(h: &HealthCheckConfig, k: &impl Fn(&str) -> String, r: &mut Report) {
    if h.rise == 0 || h.fall == 0 {
        r.err(
            k("health_check"),
            &["rise"],
            "rise and fall must be at least 1",
        );
    }
    if !h.path.starts_with('/') {
        r.err(k("health_check.path"), &[&h.path], "must start with `/`");
    }
    if h.interval.0 < Duration::from_millis(10) {
        r.err(
            k("health_check.interval"),
            &["interval"],
            "must be at least 10ms",
        );
    }
    if let Some(host) = &h.host {
        if !crate::syntax::valid_authority(host) {
            r.err(
                k("health_check.host"),
                &[host],
                "must be a host name or IP, with an optional port",
            );
        }
    }
    for (name, value) in &h.headers {
        let ok = http::HeaderName::from_bytes(name.as_bytes()).is_ok()
            && http::HeaderValue::from_str(value).is_ok();
        if !ok {
            r.err(
                k(&format!("health_check.headers.{name}")),
                &[name],
                "not a valid header name and value",
            );
        } else if name.eq_ignore_ascii_case("host") {
            r.err(
                k(&format!("health_check.headers.{name}")),
                &[name],
                "set the probe's Host with `health_check.host`",
            );
        }
    }
    if h.expect.is_empty() {
        r.err(
            k("health_check.expect"),
            &["expect"],
            "must list at least one status code or range",
        );
    }
}

#[cfg(test)]
mod tests {
    use super::super::parse;

    fn with_queue(queue: &str) -> String {
        format!(
            "listeners: [{{ name: public, address: 127.0.0.1:8080 }}]\n\
             routes: [{{ host: \"*\", path_prefix: /, upstream: app }}]\n\
             upstreams:\n  app:\n    backends: [{{ address: 127.0.0.1:9001 }}]\n    \
             queue: {{ {queue} }}\n"
        )
    }

    #[test]
    fn overload_settings_default_to_codel_and_are_checked() {
        let c = parse(&with_queue("max_depth: 10"), "t.yaml").unwrap();
        let q = &c.upstreams["app"].queue;
        assert_eq!(q.overload, super::Overload::Codel);
        assert_eq!(q.overload_target.0.as_millis(), 100);
        assert_eq!(q.overload_interval.0.as_millis(), 200);

        let c = parse(&with_queue("overload: off, overload_target: 0s"), "t.yaml").unwrap();
        assert_eq!(c.upstreams["app"].queue.overload, super::Overload::Off);

        let e = parse(&with_queue("overload_target: 0s"), "t.yaml").unwrap_err();
        assert_eq!(e[0].key, "upstreams.app.queue.overload_target");
        assert!(e[0].message.contains("above zero"), "{e:?}");

        let e = parse(&with_queue("overload_target: 300ms"), "t.yaml").unwrap_err();
        assert_eq!(e[0].key, "upstreams.app.queue.overload_interval");
        assert!(
            e[0].message.contains("longer than overload_target"),
            "{e:?}"
        );
        assert_eq!(e[0].line, Some(6), "{e:?}");

        let e = parse(&with_queue("overload: lifo"), "t.yaml").unwrap_err();
        assert!(e[0].to_string().contains("overload"), "{e:?}");
    }

    #[test]
    fn prefetch_is_auto_zero_or_a_bounded_number() {
        use super::Prefetch;
        let q =
            |s: &str| parse(&with_queue(s), "t.yaml").map(|c| c.upstreams["app"].queue.prefetch);
        assert_eq!(q("max_depth: 10").unwrap(), Prefetch::Auto);
        assert_eq!(q("prefetch: auto").unwrap(), Prefetch::Auto);
        assert_eq!(q("prefetch: 0").unwrap(), Prefetch::Fixed(0));
        assert_eq!(q("prefetch: 2").unwrap(), Prefetch::Fixed(2));
        let e = q("prefetch: 65").unwrap_err();
        assert_eq!(e[0].key, "upstreams.app.queue.prefetch");
        assert!(e[0].message.contains("at most 64"), "{e:?}");
        for bad in ["-1", "on", "1.5", "\"1\""] {
            assert!(q(&format!("prefetch: {bad}")).is_err(), "{bad}");
        }
    }
}
