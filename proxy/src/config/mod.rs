//! The YAML configuration: its schema, its defaults and its validation.
//!
//! The schema here is the truth; `DESIGN.md` only sketches it. Every struct
//! denies unknown keys, because a misspelt key that is silently ignored is the
//! most expensive kind of configuration bug. Every error names the file, the
//! line and the key, like `nginx -t`.
//!
//! - `schema.rs`: the sections of the file as types, with their defaults;
//! - `units.rs`: durations (`250ms`) and sizes (`10MiB`);
//! - `validate.rs`: the checks serde cannot make (addresses, references, ranges);
//! - `locate.rs`: which line an error is on.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

mod locate;
mod schema;
mod units;
mod upstream;
mod validate;

pub use schema::*;
#[cfg(test)]
pub use units::{parse_duration, parse_size, Dur};

use locate::{find_line, yaml_error};

/// The embedded default configuration (`config/usher.yaml`).
pub const DEFAULT_CONFIG: &str = include_str!("../../../config/usher.yaml");
/// The name used for the embedded default in error messages.
pub const DEFAULT_CONFIG_NAME: &str = "<embedded config/usher.yaml>";

/// A configuration problem, with where it was found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: String,
    pub line: Option<usize>,
    pub column: Option<usize>,
    /// The key path, e.g. `upstreams.app.queue.max_depth`.
    pub key: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file)?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
            if let Some(col) = self.column {
                write!(f, ":{col}")?;
            }
        }
        if self.key.is_empty() {
            write!(f, ": {}", self.message)
        } else {
            write!(f, ": {}: {}", self.key, self.message)
        }
    }
}

impl std::error::Error for ConfigError {}

/// Where the config came from, for error messages and reloads.
#[derive(Debug, Clone)]
pub enum Source {
    Embedded,
    File(PathBuf),
}

impl Source {
    pub fn name(&self) -> String {
        match self {
            Source::Embedded => DEFAULT_CONFIG_NAME.to_string(),
            Source::File(p) => p.display().to_string(),
        }
    }

    /// Reads and validates the config, with `check` as in [`parse_checked`].
    pub fn load_checked(
        &self,
        check: impl FnOnce(&Config) -> Vec<Problem>,
    ) -> Result<Config, Vec<ConfigError>> {
        match self {
            Source::Embedded => parse_checked(DEFAULT_CONFIG, DEFAULT_CONFIG_NAME, check),
            Source::File(path) => load_file_checked(path, check),
        }
    }
}

/// Reads a config file and parses it as [`parse_checked`] does.
pub fn load_file_checked(
    path: &Path,
    check: impl FnOnce(&Config) -> Vec<Problem>,
) -> Result<Config, Vec<ConfigError>> {
    let name = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| {
        vec![ConfigError {
            file: name.clone(),
            line: None,
            column: None,
            key: String::new(),
            message: format!("cannot read: {e}"),
        }]
    })?;
    parse_checked(&text, &name, check)
}

/// Makes relative certificate paths relative to the config file's directory.
pub fn resolve_paths(c: &mut Config, dir: &Path) {
    let fix = |p: &mut std::path::PathBuf| {
        if p.is_relative() {
            *p = dir.join(&*p);
        }
    };
    for l in &mut c.listeners {
        if let Some(t) = &mut l.tls {
            for cc in t.certificates.iter_mut().chain(t.default.iter_mut()) {
                fix(&mut cc.cert);
                fix(&mut cc.key);
            }
        }
    }
    for u in c.upstreams.values_mut() {
        if let Some(t) = &mut u.tls {
            fix(&mut t.ca);
            if let Some(cc) = &mut t.client_cert {
                fix(&mut cc.cert);
                fix(&mut cc.key);
            }
        }
    }
    if let Some(p) = &mut c.access_log.path {
        fix(p);
    }
}

/// A problem found by a check outside the schema (`tls::check_config`
/// loads the certificate files): the key, a text to find its line by, and
/// the message.
pub struct Problem {
    pub key: String,
    pub needle: String,
    pub message: String,
}

#[cfg(test)]
/// Parses and validates config text against the schema alone. `file` names
/// it in errors. See [`parse_checked`] for checks that read other files.
pub fn parse(text: &str, file: &str) -> Result<Config, Vec<ConfigError>> {
    parse_checked(text, file, |_| Vec::new())
}

/// [`parse`], then `check` (e.g. `tls::check_config`, which loads the
/// certificates), with its problems located in the text like any other.
pub fn parse_checked(
    text: &str,
    file: &str,
    check: impl FnOnce(&Config) -> Vec<Problem>,
) -> Result<Config, Vec<ConfigError>> {
    let mut config: Config = serde_yaml::from_str(text).map_err(|e| vec![yaml_error(e, file)])?;
    if file != DEFAULT_CONFIG_NAME {
        if let Some(dir) = Path::new(file).parent() {
            resolve_paths(&mut config, dir);
        }
    }
    let at = locate::Locations::new(text);
    let mut errors = validate::validate(&config, text, file, &at);
    errors.extend(check(&config).into_iter().map(|p| {
        // A file a key names (a certificate) is found by that key's value.
        let (line, column) = match at.exact(&p.key).or_else(|| at.find(&p.key)) {
            Some((l, c)) => (Some(l), Some(c)),
            None => (find_line(text, &[&p.needle]), None),
        };
        ConfigError {
            file: file.to_string(),
            line,
            column,
            key: p.key,
            message: p.message,
        }
    }));
    if errors.is_empty() {
        Ok(config)
    } else {
        Err(errors)
    }
}

/// Resolves `host:port` into one address; names like `localhost` are allowed.
pub fn resolve_addr(s: &str) -> Result<SocketAddr, String> {
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok(a);
    }
    use std::net::ToSocketAddrs;
    if !s.contains(':') {
        return Err(format!("`{s}` is not an address (expected host:port)"));
    }
    s.to_socket_addrs()
        .map_err(|e| format!("`{s}` is not a valid address: {e}"))?
        .next()
        .ok_or_else(|| format!("`{s}` resolves to no address"))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    const GOOD: &str = r#"
listeners:
  - name: public
    address: 127.0.0.1:8080
admin: { address: 127.0.0.1:9901 }
routes:
  - { host: "*", path_prefix: /, upstream: app }
upstreams:
  app:
    backends:
      - { address: 127.0.0.1:9001, max_in_flight: 8, weight: 2 }
      - { address: 127.0.0.1:9002 }
    queue: { max_depth: 10, timeout: 250ms }
limits: { max_request_body: 64KiB }
"#;

    #[test]
    fn parses_a_good_config_with_defaults() {
        let c = parse(GOOD, "t.yaml").unwrap();
        let app = &c.upstreams["app"];
        assert_eq!(app.backends[0].max_in_flight, MaxInFlight::Fixed(8));
        assert_eq!(app.backends[1].max_in_flight, MaxInFlight::Auto);
        assert_eq!(app.queue.timeout.0, Duration::from_millis(250));
        assert_eq!(c.limits.max_request_body.0, 64 * 1024);
        assert_eq!(c.limits.max_response_buffer.0, 4 << 20);
        assert_eq!(app.default_capacity, 4);
        assert_eq!(app.upgrades.idle_timeout.0, Duration::from_secs(3600));
    }

    #[test]
    fn upgrade_idle_timeout_reads_a_duration_and_zero_means_none() {
        let with = |v: &str| {
            GOOD.replace(
                "    queue: { max_depth: 10",
                &format!("    upgrades: {{ idle_timeout: {v} }}\n    queue: {{ max_depth: 10"),
            )
        };
        let c = parse(&with("300ms"), "t.yaml").unwrap();
        assert_eq!(
            c.upstreams["app"].upgrades.idle_timeout.0,
            Duration::from_millis(300)
        );
        let c = parse(&with("0s"), "t.yaml").unwrap();
        assert!(c.upstreams["app"].upgrades.idle_timeout.0.is_zero());
        let e = parse(&with("5"), "t.yaml").unwrap_err();
        assert!(e[0].to_string().contains("upgrades"), "{e:?}");
    }

    #[test]
    fn the_embedded_default_is_valid() {
        let c = parse(DEFAULT_CONFIG, DEFAULT_CONFIG_NAME).unwrap();
        assert!(c.upstreams.values().any(|u| u.fleet.is_some()));
    }

    #[test]
    fn unknown_keys_name_line_and_key() {
        let bad = GOOD.replace("max_depth: 10", "max_dept: 10");
        let e = parse(&bad, "t.yaml").unwrap_err();
        let s = e[0].to_string();
        assert!(s.starts_with("t.yaml:13:"), "{s}");
        assert!(s.contains("upstreams.app.queue"), "{s}");
        assert!(s.contains("max_dept"), "{s}");
    }

    #[test]
    fn bad_durations_and_sizes_are_errors() {
        let e = parse(&GOOD.replace("250ms", "250"), "t.yaml").unwrap_err();
        assert!(e[0].message.contains("needs a unit"), "{e:?}");
        let e = parse(&GOOD.replace("64KiB", "64KB!"), "t.yaml").unwrap_err();
        assert!(
            e[0].to_string().contains("limits.max_request_body"),
            "{e:?}"
        );
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_size("10MiB").unwrap(), 10 << 20);
        assert!(parse_duration("5 parsecs").is_err());
    }

    #[test]
    fn semantic_errors_name_the_line() {
        let bad = GOOD.replace("upstream: app }", "upstream: nope }");
        let e = parse(&bad, "t.yaml").unwrap_err();
        assert_eq!(e[0].key, "routes[0].upstream");
        assert_eq!(e[0].line, Some(7));
        assert!(e[0].message.contains("unknown upstream `nope`"));

        let dup = GOOD.replace("127.0.0.1:9002", "127.0.0.1:9001");
        let e = parse(&dup, "t.yaml").unwrap_err();
        assert!(e[0].message.contains("duplicate backend"), "{e:?}");

        let bad_addr = GOOD.replace("127.0.0.1:8080", "not-an-address");
        let e = parse(&bad_addr, "t.yaml").unwrap_err();
        assert_eq!(e[0].key, "listeners[0].address");
        assert_eq!(e[0].line, Some(4));
    }
}
