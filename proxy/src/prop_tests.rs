//! Property tests (proptest) for the two places where Usher reads input it
//! does not control: the config parser (an operator's YAML, at start and on
//! every reload) and header rewriting (a client's headers).
//!
//! What "located" means for a config error, as [`ConfigError`] has it: an
//! error from reading the YAML into the schema (syntax, types, unknown keys,
//! bad durations) carries a 1-based `line:column`; an error found by
//! validation afterwards names its key path, and the line of that key when
//! the key is written in the text (a missing `listeners:` has no line to
//! point at). The structured generator writes documents from the real
//! schema so that most of them get past serde into validation, where the
//! arithmetic is.
//!
//! One file, long (~1250 lines) on purpose: it is test code only, mostly the
//! schema-shaped document generator, and its sections (config, units,
//! headers) share the case budget and helpers.
//!
//! No regression files are written (`failure_persistence: None`): a failure
//! found here is kept as a plain `#[test]` next to its property. For a
//! longer run: `PROPTEST_CASES=20000 cargo test -p usher --lib prop_tests`.

use std::collections::HashSet;
use std::fmt::Write as _;
use std::net::IpAddr;
use std::time::Duration;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::select;

use crate::config::{self, ConfigError};
use crate::edge::headers;

const FILE: &str = "fuzz.yaml";

/// `cases` per property, or `PROPTEST_CASES` from the environment for a
/// longer run.
fn cases(cases: u32) -> ProptestConfig {
    let default = ProptestConfig::default();
    ProptestConfig {
        cases: if std::env::var_os("PROPTEST_CASES").is_some() {
            default.cases
        } else {
            cases
        },
        failure_persistence: None,
        ..default
    }
}

// ---------------------------------------------------------------------------
// Config: what every result must satisfy.

/// Lines as libyaml counts them: `\r\n`, `\r`, `\n`, NEL, LS and PS each
/// end one, and a last line needs no break.
fn yaml_lines(text: &str) -> usize {
    let mut breaks = 0;
    let mut prev_cr = false;
    let mut open_line = false;
    for c in text.chars() {
        match c {
            '\n' if prev_cr => {}
            '\n' | '\r' | '\u{85}' | '\u{2028}' | '\u{2029}' => {
                breaks += 1;
                open_line = false;
            }
            _ => open_line = true,
        }
        prev_cr = c == '\r';
    }
    breaks + usize::from(open_line)
}

/// serde_yaml reports this one without a position (it is about the stream,
/// not a node).
const MULTI_DOCUMENT: &str = "more than one document";

fn assert_located(
    text: &str,
    result: &Result<config::Config, Vec<ConfigError>>,
) -> Result<(), TestCaseError> {
    let Err(errors) = result else { return Ok(()) };
    prop_assert!(!errors.is_empty(), "Err with no errors");
    // Which stage failed: reading into the schema, or validation after it.
    let schema_failed = serde_yaml::from_str::<config::Config>(text).is_err();
    if schema_failed {
        prop_assert_eq!(errors.len(), 1, "a YAML error is reported alone");
    }
    // One past the last line: libyaml puts the end of the stream on a line
    // of its own (an error there is "at line N+1, column 1").
    let lines = yaml_lines(text) + 1;
    let chars = text.chars().count();
    for e in errors {
        prop_assert_eq!(&e.file, FILE);
        prop_assert!(!e.message.is_empty(), "empty message: {:?}", e);
        if let Some(line) = e.line {
            prop_assert!(
                (1..=lines).contains(&line),
                "line out of 1..={}: {:?}",
                lines,
                e
            );
        }
        if let Some(col) = e.column {
            prop_assert!(e.line.is_some(), "a column without a line: {:?}", e);
            prop_assert!(
                (1..=chars + 1).contains(&col),
                "column out of range: {:?}",
                e
            );
        }
        if schema_failed {
            prop_assert_eq!(e.line.is_some(), e.column.is_some(), "{:?}", e);
            prop_assert!(
                e.line.is_some() || e.message.contains(MULTI_DOCUMENT),
                "a YAML error without a line: {:?}",
                e
            );
        } else {
            prop_assert!(
                !e.key.is_empty(),
                "a validation error without a key: {:?}",
                e
            );
        }
        // Display: `file:line:col: key: message`, the parts that exist.
        let shown = e.to_string();
        let mut want = FILE.to_string();
        if let Some(line) = e.line {
            write!(want, ":{line}").unwrap();
            if let Some(col) = e.column {
                write!(want, ":{col}").unwrap();
            }
        }
        if !e.key.is_empty() {
            write!(want, ": {}", e.key).unwrap();
        }
        write!(want, ": {}", e.message).unwrap();
        prop_assert_eq!(shown, want);
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Config: unstructured input.

/// Fragments of Usher's YAML: the schema's keys, values and YAML's own
/// syntax, to be strung together at random.
#[rustfmt::skip]
const FRAGMENTS: &[&str] = &[
    "listeners", "name", "address", "max_connections", "tls", "certificates", "cert", "key",
    "names", "default", "handshake_timeout", "hsts", "http2", "max_concurrent_streams",
    "max_header_list_size", "keepalive_interval", "keepalive_timeout", "redirect_to_https",
    "https_port", "admin", "routes", "host", "path_prefix", "upstream", "upstreams", "fleet",
    "command", "processes", "base_port", "env", "backends", "max_in_flight", "weight", "dns",
    "port", "refresh", "resolver", "balance", "slow_start", "default_capacity", "proxy_replicas",
    "queue", "max_depth", "timeout", "discipline", "classify", "overload", "overload_target",
    "overload_interval", "codel", "prefetch", "health_check", "path", "interval",
    "rise", "fall", "outlier", "max_ejected_percent", "retries", "attempts", "timeouts", "connect",
    "response", "pool", "idle_timeout", "protocol", "upgrades", "limits", "max_request_body",
    "max_response_buffer", "client_header", "client_body", "shutdown_grace", "access_log", "format",
    "app", ": ", ":", "\n", "\n  ", "\n    ", "  ", "- ", "\n- ", "[", "]", "{", "}", ", ", ",",
    "\"", "'", "# c\n", "&a ", "*a", "!!str ", "!!map ", "---\n", "...\n", "? ", "|\n", ">-\n",
    "\t", "\r", "\r\n", "%YAML 1.2\n", "@", "`", "\u{feff}", "\u{85}", "\u{2028}", "\\", "\\u00e9",
    "5s", "250ms", "1.5s", "-3s", "1e99s", "10MiB", "64KiB", "10mib", "99999999999999999999kib",
    "127.0.0.1:8080", "\"{port}\"", "auto", "0", "1", "65535", "4294967295", "18446744073709551616",
    "-1", "true", "~", "null", ".inf", "\"*\"", "/",
];

fn yamlish() -> impl Strategy<Value = String> {
    vec(select(FRAGMENTS), 0..80).prop_map(|f| f.concat())
}

proptest! {
    #![proptest_config(cases(256))]

    #[test]
    fn parse_any_string_is_ok_or_located(text in any::<String>()) {
        assert_located(&text, &config::parse(&text, FILE))?;
    }

    #[test]
    fn parse_any_bytes_is_ok_or_located(bytes in vec(any::<u8>(), 0..512)) {
        let text = String::from_utf8_lossy(&bytes);
        assert_located(&text, &config::parse(&text, FILE))?;
    }

    #[test]
    fn parse_yamlish_fragments_is_ok_or_located(text in yamlish()) {
        assert_located(&text, &config::parse(&text, FILE))?;
    }
}

// ---------------------------------------------------------------------------
// Config: documents from the schema.

/// A YAML node, rendered block or flow style. Scalars are kept as written:
/// the generator chooses their spelling (`5s`, `"*"`, `~`, `4294967296`).
#[derive(Debug, Clone)]
enum Y {
    Raw(String),
    Seq(Vec<Y>, bool),
    Map(Vec<(String, Y)>, bool),
}

impl Y {
    fn is_inline(&self) -> bool {
        match self {
            Y::Raw(_) => true,
            Y::Seq(v, flow) => *flow || v.is_empty(),
            Y::Map(m, flow) => *flow || m.is_empty(),
        }
    }

    fn flow(&self) -> String {
        match self {
            Y::Raw(s) => s.clone(),
            Y::Seq(v, _) => {
                let items: Vec<String> = v.iter().map(Y::flow).collect();
                format!("[{}]", items.join(", "))
            }
            Y::Map(m, _) => {
                let items: Vec<String> = m
                    .iter()
                    .map(|(k, v)| format!("{k}: {}", v.flow()))
                    .collect();
                format!("{{{}}}", items.join(", "))
            }
        }
    }

    fn block(&self, indent: usize, out: &mut String) {
        let pad = " ".repeat(indent);
        if self.is_inline() {
            writeln!(out, "{pad}{}", self.flow()).unwrap();
            return;
        }
        match self {
            Y::Raw(_) => unreachable!("a scalar is inline"),
            Y::Map(m, _) => {
                for (k, v) in m {
                    if v.is_inline() {
                        writeln!(out, "{pad}{k}: {}", v.flow()).unwrap();
                    } else {
                        writeln!(out, "{pad}{k}:").unwrap();
                        v.block(indent + 2, out);
                    }
                }
            }
            Y::Seq(v, _) => {
                for item in v {
                    if item.is_inline() {
                        writeln!(out, "{pad}- {}", item.flow()).unwrap();
                    } else {
                        writeln!(out, "{pad}-").unwrap();
                        item.block(indent + 2, out);
                    }
                }
            }
        }
    }

    fn render(&self) -> String {
        let mut out = String::new();
        self.block(0, &mut out);
        out
    }
}

type S = BoxedStrategy<Y>;
type Field = BoxedStrategy<Option<(String, Y)>>;

fn raw(pool: &'static [&'static str]) -> S {
    select(pool).prop_map(|s| Y::Raw(s.to_string())).boxed()
}

fn num<T: Strategy + 'static>(s: T) -> S
where
    T::Value: ToString,
{
    s.prop_map(|n| Y::Raw(n.to_string())).boxed()
}

/// Any string, as a YAML double-quoted scalar (a JSON string is one).
fn quoted() -> S {
    any::<String>()
        .prop_map(|s| Y::Raw(serde_json::to_string(&s).expect("a string serializes")))
        .boxed()
}

#[rustfmt::skip]
const WRONG_TYPE: &[&str] = &[
    "~", "null", "true", "yes", "-1", "1.5", ".inf", ".nan", "0x1F", "1_000", "\"text\"", "[]",
    "{}", "[1, 2]", "{a: 1}", "!!binary aGk=", "&x 1", "*nope", "!!str", "\"a\\qb\"",
];

/// A value of a type no field of the schema wants, or not YAML at all.
fn wrong_type() -> S {
    prop_oneof![raw(WRONG_TYPE), quoted()].boxed()
}

/// What the schema's type accepts (`common` mostly, values at the edges of
/// what validation allows the rest of the time); with `bad` per mille a
/// spelling or type it refuses.
fn typed(bad: u32, common: S, edges: S, refused: &'static [&'static str]) -> S {
    let good = prop_oneof![4 => common, 1 => edges].boxed();
    if bad == 0 {
        return good;
    }
    let refused = if refused.is_empty() {
        wrong_type()
    } else {
        prop_oneof![raw(refused), wrong_type()].boxed()
    };
    prop_oneof![1000 - bad => good, bad => refused].boxed()
}

#[rustfmt::skip]
const BAD_DURATIONS: &[&str] = &[
    "-3s", "1e99s", "5", "5 parsecs", "10mib", ".s", "1..2s", "99999999999999999999h", "8761h",
    "\"\"", "s", "inf s", "NaNs", "1,5s", "5sec", "+5s", "\"\u{661}s\"",
    "9999999999999999999999999999999999999999999999999999999999999999999999999999999ms",
];

fn duration(bad: u32) -> S {
    let common = (1u64..5000, select(&["ms", "s", "m", "h"][..]))
        .prop_map(|(n, u)| Y::Raw(format!("{n}{u}")))
        .boxed();
    let edges = raw(&["0s", "0ms", "1.5s", "9ms", "0.5ms", "8760h", "\"5 s\""]);
    typed(bad, common, edges, BAD_DURATIONS)
}

const SIZE_UNITS: &[&str] = &[
    "", "B", "KiB", "K", "k", "MiB", "M", "GiB", "G", "KB", "kB", "MB", "GB",
];

#[rustfmt::skip]
const BAD_SIZES: &[&str] = &[
    "10MiBs", "99999999999999999999kib", "18446744073709551615KiB", "-1", "1.5MiB", "64KB!", "KiB",
    "\"\"", "18446744073709551616", "17179869184GiB",
];

fn size(bad: u32) -> S {
    let common = (1u64..100_000, select(SIZE_UNITS))
        .prop_map(|(n, u)| Y::Raw(format!("{n}{u}")))
        .boxed();
    let edges = prop_oneof![raw(&["0", "1023", "4GiB", "4294967296"]), num(any::<u64>())].boxed();
    typed(bad, common, edges, BAD_SIZES)
}

#[rustfmt::skip]
const BAD_U32: &[&str] = &[
    "4294967296", "-1", "18446744073709551616", "1e3", "\"5\"", "1.0",
];
#[rustfmt::skip]
const EDGE_U32: &[&str] = &[
    "0", "1", "100", "101", "1024", "1025", "65535", "65536", "4294967295",
];

/// A small count (threads, processes, attempts, weights), or an edge.
fn count(bad: u32) -> S {
    typed(bad, num(1u32..=16), raw(EDGE_U32), BAD_U32)
}

/// A larger amount (queue depth, idle connections, resets), or an edge.
fn amount(bad: u32) -> S {
    typed(bad, num(0u32..5000), raw(EDGE_U32), BAD_U32)
}

fn percent(bad: u32) -> S {
    typed(bad, num(0u32..=100), raw(EDGE_U32), BAD_U32)
}

fn port(bad: u32) -> S {
    let refused = &["65536", "-1", "4294967296", "\"80\""];
    typed(bad, num(1024u16..), raw(&["0", "1", "65535"]), refused)
}

fn boolean(bad: u32) -> S {
    let refused = &["yes", "no", "on", "\"true\"", "1"];
    typed(bad, raw(&["true", "false"]), raw(&["false"]), refused)
}

/// One of a few spellings, else one that validation refuses.
fn choice(bad: u32, good: &'static [&'static str], edges: &'static [&'static str]) -> S {
    typed(bad, raw(good), raw(edges), &[])
}

/// Addresses only as IP literals, or refused before any lookup: parsing
/// resolves names, and a property test must not reach for DNS.
fn address(bad: u32) -> S {
    let common = raw(&[
        "127.0.0.1:8080",
        "127.0.0.1:8081",
        "127.0.0.1:9001",
        "127.0.0.1:9002",
        "127.0.0.1:9003",
        "0.0.0.0:9901",
        "\"[::1]:8080\"",
        "\"[::1]:9001\"",
    ]);
    let edges = raw(&[
        "127.0.0.1:0",
        "\"[::1]:0\"",
        "not-an-address",
        "127.0.0.1:99999",
        "\"\"",
    ]);
    typed(bad, common, edges, &["127.0.0.1", "\"[::1]\"", "8080"])
}

fn max_in_flight(bad: u32) -> S {
    let common = prop_oneof![raw(&["auto"]), num(1u32..64)].boxed();
    typed(
        bad,
        common,
        raw(&["1", "4294967295"]),
        &["Auto", "0", "4294967296", "-1", "\"8\"", "1.5"],
    )
}

fn prefetch(bad: u32) -> S {
    let common = prop_oneof![raw(&["auto"]), num(0u32..=64)].boxed();
    typed(
        bad,
        common,
        raw(&["0", "64"]),
        &["Auto", "65", "-1", "\"1\"", "1.5"],
    )
}

fn file_path() -> S {
    raw(&[
        "/nonexistent/usher-fuzz/a.pem",
        "relative/a.pem",
        "\"\"",
        "a.key",
    ])
}

/// A key with probability `p`.
fn field(p: f64, key: &'static str, value: S) -> Field {
    proptest::option::weighted(p, value.prop_map(move |v| (key.to_string(), v))).boxed()
}

fn req(key: &'static str, value: S) -> Field {
    field(0.97, key, value)
}

fn opt(key: &'static str, value: S) -> Field {
    field(0.5, key, value)
}

/// `Some` with `per_mille` / 1000 probability.
fn sometimes<T>(per_mille: u32, s: T) -> BoxedStrategy<Option<T::Value>>
where
    T: Strategy + 'static,
    T::Value: Clone,
{
    if per_mille == 0 {
        return Just(None).boxed();
    }
    proptest::option::weighted(f64::from(per_mille) / 1000.0, s).boxed()
}

#[rustfmt::skip]
const MISSPELT_KEYS: &[&str] = &[
    "nmae", "adress", "max_dept", "x", "listener", "Name", "\"\"", "? k", "\"a b\"", "<<",
];

/// A mapping of the given fields; when `bad` > 0 sometimes with a
/// misspelt key or a key given twice.
fn map(bad: u32, fields: Vec<Field>) -> S {
    let unknown = sometimes(bad, (any::<usize>(), select(MISSPELT_KEYS), count(0)));
    let dup = sometimes(bad, any::<usize>());
    (fields, unknown, dup, any::<bool>())
        .prop_map(|(fields, unknown, dup, flow)| {
            let mut m: Vec<(String, Y)> = fields.into_iter().flatten().collect();
            if let (Some(i), false) = (dup, m.is_empty()) {
                let kv = m[i % m.len()].clone();
                m.push(kv);
            }
            if let Some((i, k, v)) = unknown {
                m.insert(i % (m.len() + 1), (k.to_string(), v));
            }
            Y::Map(m, flow)
        })
        .boxed()
}

/// A mapping with keys of the caller's choosing (`upstreams`, `env`).
fn named(keys: S, value: S, len: std::ops::Range<usize>) -> S {
    let key = keys.prop_map(|k| match k {
        Y::Raw(k) => k,
        other => other.flow(),
    });
    (vec((key, value), len), any::<bool>())
        .prop_map(|(kv, flow)| Y::Map(kv, flow))
        .boxed()
}

/// A list; never empty when `bad` = 0, so that those documents have
/// listeners and routes (an empty list is tried in the other modes).
fn seq(bad: u32, item: S, len: std::ops::Range<usize>) -> S {
    let len = if bad == 0 {
        len.start.max(1)..len.end
    } else {
        len
    };
    (vec(item, len), any::<bool>())
        .prop_map(|(v, flow)| Y::Seq(v, flow))
        .boxed()
}

fn cert(bad: u32) -> S {
    let names = seq(
        bad,
        choice(
            bad,
            &["a.test", "\"*.a.test\""],
            &["\"a*\"", "\"\"", "\"a b\""],
        ),
        0..3,
    );
    map(
        bad,
        vec![
            req("cert", file_path()),
            req("key", file_path()),
            opt("names", names),
        ],
    )
}

fn listener(bad: u32) -> S {
    let tls = map(
        bad,
        vec![
            req("certificates", seq(bad, cert(bad), 0..2)),
            opt("default", cert(bad)),
            opt("handshake_timeout", duration(bad)),
            opt(
                "hsts",
                choice(
                    bad,
                    &["\"max-age=31536000\""],
                    &["\"nope\"", "\"max-age=1\\u0001\""],
                ),
            ),
        ],
    );
    let http2 = map(
        bad,
        vec![
            opt("max_concurrent_streams", amount(bad)),
            opt("max_header_list_size", size(bad)),
            opt("keepalive_interval", duration(bad)),
            opt("keepalive_timeout", duration(bad)),
            opt("max_pending_accept_reset_streams", amount(bad)),
            opt("max_local_error_reset_streams", amount(bad)),
        ],
    );
    let name = prop_oneof![9 => raw(&["public", "a", "b", "c", "internal"]), 1 => quoted()].boxed();
    map(
        bad,
        vec![
            req("name", name),
            req("address", address(bad)),
            opt("max_connections", amount(bad)),
            field(0.05, "tls", tls),
            opt("http2", http2),
            opt("redirect_to_https", boolean(bad)),
            opt("https_port", port(bad)),
        ],
    )
}

/// Upstream names, shared by `upstreams` and the routes that point at them.
fn upstream_name(bad: u32) -> S {
    choice(
        bad,
        &["app"],
        &["api", "b", "\"a.b\"", "\"\"", "名前", "\"*\""],
    )
}

fn route(bad: u32) -> S {
    map(
        bad,
        vec![
            opt(
                "host",
                choice(
                    bad,
                    &["\"*\"", "example.com", "\"*.example.com\""],
                    &["\"\""],
                ),
            ),
            opt("path_prefix", choice(bad, &["/", "/api"], &["api", "\"\""])),
            req("upstream", upstream_name(bad)),
            opt("name", choice(bad, &["main", "a b"], &["\"\""])),
        ],
    )
}

#[rustfmt::skip]
const FLEET_ARGS: &[&str] = &[
    "usher-worker", "--listen", "\"127.0.0.1:{port}\"", "\"{port}\"", "--threads", "\"4\"",
];

fn fleet(bad: u32) -> S {
    let command = prop_oneof![
        4 => Just(Y::Seq(vec![Y::Raw("usher-worker".into()), Y::Raw("\"{port}\"".into())], true)),
        1 => seq(bad, raw(FLEET_ARGS), 0..4),
    ]
    .boxed();
    let env = named(raw(&["A", "B", "PATH"]), quoted(), 0..3);
    map(
        bad,
        vec![
            req("command", command),
            field(0.8, "processes", count(bad)),
            field(0.8, "base_port", port(bad)),
            opt("host", raw(&["127.0.0.1", "\"::1\""])),
            opt("max_in_flight", max_in_flight(bad)),
            opt("env", env),
        ],
    )
}

fn upstream(bad: u32) -> S {
    let backend = map(
        bad,
        vec![
            req("address", address(bad)),
            opt("max_in_flight", max_in_flight(bad)),
            opt("weight", count(bad)),
        ],
    );
    let dns = map(
        bad,
        vec![
            req("name", choice(bad, &["app.svc"], &["\"\""])),
            req("port", port(bad)),
            opt("refresh", duration(bad)),
            opt(
                "resolver",
                typed(
                    bad,
                    raw(&["127.0.0.1:53"]),
                    raw(&["\"[::1]:53\""]),
                    &["nope", "53"],
                ),
            ),
            opt("max_in_flight", max_in_flight(bad)),
        ],
    );
    let queue = map(
        bad,
        vec![
            opt("max_depth", amount(bad)),
            opt("timeout", duration(bad)),
            opt(
                "discipline",
                typed(
                    bad,
                    raw(&["fifo", "shortest_first"]),
                    raw(&["fifo"]),
                    &["lifo", "FIFO"],
                ),
            ),
            opt(
                "classify",
                typed(
                    bad,
                    raw(&["path", "path_and_query"]),
                    raw(&["path"]),
                    &["host"],
                ),
            ),
            opt(
                "overload",
                typed(
                    bad,
                    raw(&["codel", "off"]),
                    raw(&["off"]),
                    &["lifo", "CoDel"],
                ),
            ),
            opt("overload_target", duration(bad)),
            opt("overload_interval", duration(bad)),
            opt("prefetch", prefetch(bad)),
        ],
    );
    let health_check = map(
        bad,
        vec![
            opt(
                "path",
                choice(bad, &["/healthz", "/"], &["healthz", "\"\""]),
            ),
            opt("interval", duration(bad)),
            opt("timeout", duration(bad)),
            opt("rise", count(bad)),
            opt("fall", count(bad)),
        ],
    );
    let outlier = map(
        bad,
        vec![
            opt("consecutive_failures", count(bad)),
            opt("base_ejection", duration(bad)),
            opt("max_ejection", duration(bad)),
            opt("max_ejected_percent", percent(bad)),
        ],
    );
    let retries = map(bad, vec![opt("attempts", count(bad))]);
    let timeouts = map(
        bad,
        vec![
            opt("connect", duration(bad)),
            opt("response", duration(bad)),
        ],
    );
    let pool = map(
        bad,
        vec![
            opt("idle_timeout", duration(bad)),
            opt("max_idle_per_backend", amount(bad)),
        ],
    );
    let tls = map(
        bad,
        vec![
            req("ca", file_path()),
            opt(
                "server_name",
                choice(
                    bad,
                    &["example.com", "127.0.0.1"],
                    &["\"not a name\"", "\"\""],
                ),
            ),
            field(0.2, "client_cert", cert(bad)),
        ],
    );
    let upgrades = map(
        bad,
        vec![
            opt("max_upgraded", amount(bad)),
            opt("hold_slot", boolean(bad)),
            opt("idle_timeout", duration(bad)),
        ],
    );
    let balance = typed(
        bad,
        raw(&["least_outstanding", "round_robin", "random"]),
        raw(&["random"]),
        &["fastest", "RoundRobin"],
    );
    let protocol = typed(
        bad,
        raw(&["http1", "http2"]),
        raw(&["http2"]),
        &["http3", "h2"],
    );
    map(
        bad,
        vec![
            field(0.4, "fleet", fleet(bad)),
            field(0.7, "backends", seq(bad, backend, 0..4)),
            field(0.1, "dns", dns),
            opt("balance", balance),
            opt("slow_start", duration(bad)),
            opt("default_capacity", count(bad)),
            opt("proxy_replicas", count(bad)),
            opt("queue", queue),
            opt("health_check", health_check),
            opt("outlier", outlier),
            opt("retries", retries),
            opt("timeouts", timeouts),
            opt("pool", pool),
            opt("protocol", protocol),
            field(0.05, "tls", tls),
            opt("upgrades", upgrades),
        ],
    )
}

fn document(bad: u32) -> S {
    let upstreams = named(
        upstream_name(bad),
        upstream(bad),
        if bad == 0 { 1..3 } else { 0..3 },
    );
    let limits = map(
        bad,
        vec![
            opt("max_request_body", size(bad)),
            opt("max_response_buffer", size(bad)),
        ],
    );
    let timeouts = map(
        bad,
        vec![
            opt("client_header", duration(bad)),
            opt("client_body", duration(bad)),
            opt("client_request", duration(bad)),
            opt("client_keepalive", duration(bad)),
            opt("shutdown_grace", duration(bad)),
        ],
    );
    let access_log = map(
        bad,
        vec![opt(
            "format",
            typed(
                bad,
                raw(&["json", "combined", "off"]),
                raw(&["off"]),
                &["xml", "JSON"],
            ),
        )],
    );
    map(
        bad,
        vec![
            req("listeners", seq(bad, listener(bad), 0..3)),
            opt("admin", map(bad, vec![req("address", address(bad))])),
            req("routes", seq(bad, route(bad), 0..3)),
            req("upstreams", upstreams),
            opt("limits", limits),
            opt("timeouts", timeouts),
            opt("access_log", access_log),
        ],
    )
}

/// Documents at several levels of wrongness. With none (`bad` = 0), every
/// value has the type its field wants, so most documents get past serde and
/// the checks after parsing are exercised; the edges make many of them fail
/// there.
fn yaml_document() -> impl Strategy<Value = String> {
    prop_oneof![3 => document(0), 1 => document(5), 1 => document(30), 1 => document(200)]
        .prop_map(|y| y.render())
}

proptest! {
    #![proptest_config(cases(512))]

    #[test]
    fn parse_schema_documents_is_ok_or_located(text in yaml_document()) {
        assert_located(&text, &config::parse(&text, FILE))?;
    }
}

/// Found by `parse_schema_documents_is_ok_or_located`: `base_port +
/// processes` was summed in `u32`, which overflowed (a panic in debug
/// builds; in release a wrapped sum and a missed `base_port` error).
#[test]
fn fleet_base_port_plus_huge_processes_is_an_error_not_an_overflow() {
    let text = "\
upstreams:
  app:
    fleet:
      command: [usher-worker, \"{port}\"]
      processes: 4294967295
      base_port: 1024
";
    let errors = config::parse(text, FILE).unwrap_err();
    let at = |key: &str| errors.iter().find(|e| e.key == key).map(|e| e.line);
    assert_eq!(
        at("upstreams.app.fleet.processes"),
        Some(Some(5)),
        "{errors:?}"
    );
    assert_eq!(
        at("upstreams.app.fleet.base_port"),
        Some(Some(6)),
        "{errors:?}"
    );
}

// ---------------------------------------------------------------------------
// Durations and sizes.

const YEAR_MS: u128 = 365 * 86_400 * 1000;
const DURATION_UNITS: &[(&str, u128)] = &[("ms", 1), ("s", 1000), ("m", 60_000), ("h", 3_600_000)];
/// 2^23 s in milliseconds: past it, `f64` seconds are coarser than a
/// nanosecond, so whole numbers around it are worth generating.
const EXACT_MS: u128 = (1 << 23) * 1000;

proptest! {
    #![proptest_config(cases(256))]

    #[test]
    fn parse_duration_never_panics_and_stays_in_range(
        s in prop_oneof![
            any::<String>(),
            "[ ]?[-+]?[0-9.]{0,25}[eE]?[0-9]{0,3}[ ]?[a-zA-Z]{0,3}[ ]?",
            "[0-9]{15,400}(\\.[0-9]{0,400})?(ms|s|m|h)",
        ]
    ) {
        if let Ok(d) = config::parse_duration(&s) {
            prop_assert!(d.as_millis() <= YEAR_MS, "{} parsed to {:?}", s, d);
        }
    }

    /// A whole number of any unit parses to exactly that duration, up to a
    /// year; past it, an error rather than a wrapped or saturated value.
    /// (Exact everywhere since whole numbers are parsed as integers: through
    /// `f64` seconds they were up to 4 ns off above 2^23 s, ~97 days.)
    #[test]
    fn parse_duration_whole_numbers_round_trip(
        n in prop_oneof![
            0u64..100_000,
            0u64..EXACT_MS as u64,
            0u64..=YEAR_MS as u64 + 1000,
            any::<u64>(),
        ],
        (unit, unit_ms) in select(DURATION_UNITS),
        space in select(&["", " "][..]),
    ) {
        let s = format!("{n}{space}{unit}");
        let ms = u128::from(n) * unit_ms;
        let got = config::parse_duration(&s);
        if ms <= YEAR_MS {
            let want = Duration::from_millis(ms as u64);
            let got = got.map_err(|e| TestCaseError::fail(format!("{s}: {e}")))?;
            prop_assert_eq!(got, want, "{}", s);
        } else {
            prop_assert!(got.is_err(), "{} parsed to {:?}", s, got);
        }
    }

    #[test]
    fn parse_duration_halves_are_exact(n in 0u64..1_000_000) {
        prop_assert_eq!(
            config::parse_duration(&format!("{n}.5s")),
            Ok(Duration::from_millis(n * 1000 + 500))
        );
    }

    #[test]
    fn parse_size_never_panics(
        s in prop_oneof![
            any::<String>(),
            "[ ]?[-+]?[0-9.]{0,25}[ ]?[a-zA-Z]{0,4}[ ]?",
            "[0-9]{15,400}(B|KiB|MiB|GiB|KB|MB|GB)?",
        ]
    ) {
        let _ = config::parse_size(&s);
    }

    /// Every unit multiplies exactly, and a product past `u64` is an error.
    #[test]
    fn parse_size_matches_checked_multiplication(
        n in prop_oneof![any::<u64>(), 0u64..1 << 20, (u64::MAX >> 30)..(u64::MAX >> 9)],
        unit in select(SIZE_UNITS),
        space in select(&["", " "][..]),
    ) {
        let mult: u64 = match unit {
            "" | "B" => 1,
            "KiB" | "K" | "k" => 1 << 10,
            "MiB" | "M" => 1 << 20,
            "GiB" | "G" => 1 << 30,
            "KB" | "kB" => 1000,
            "MB" => 1_000_000,
            "GB" => 1_000_000_000,
            _ => unreachable!(),
        };
        let s = format!("{n}{space}{unit}");
        prop_assert_eq!(config::parse_size(&s).ok(), n.checked_mul(mult), "{}", s);
    }

    /// Any case of a unit reads as that unit (the proxy refused `10mib`
    /// until its units were shared with the worker, which took it).
    #[test]
    fn size_units_are_case_insensitive(
        n in 0u64..1 << 30,
        unit in select(SIZE_UNITS),
        upper in vec(any::<bool>(), 3),
    ) {
        let cased: String = unit
            .chars()
            .zip(upper.iter().cycle())
            .map(|(c, &up)| if up { c.to_ascii_uppercase() } else { c.to_ascii_lowercase() })
            .collect();
        prop_assert_eq!(
            config::parse_size(&format!("{n}{cased}")),
            config::parse_size(&format!("{n}{unit}")),
            "{}", cased
        );
    }

    #[test]
    fn parse_size_refuses_other_spellings(
        n in any::<u32>(),
        unit in select(WRONG_SIZE_UNITS),
    ) {
        let (plain, negative) = (format!("{n}{unit}"), format!("-{n}{unit}"));
        prop_assert!(config::parse_size(&plain).is_err(), "{}", plain);
        prop_assert!(config::parse_size(&negative).is_err(), "{}", negative);
    }
}

/// Units are case-insensitive (`10mib` is `10MiB`, see
/// `size_units_are_case_insensitive`), but anything that is not a unit in
/// some case is refused, not read as something else.
#[rustfmt::skip]
const WRONG_SIZE_UNITS: &[&str] = &[
    "Ki", "KiBs", "i", "e3", "kibi", "Mbit", "TiB", "BB", "KiB!", ".5KiB", "KiB KiB",
];

// ---------------------------------------------------------------------------
// Headers.

const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "proxy-connection",
];

const NAMES: &[&str] = &[
    "connection",
    "keep-alive",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "proxy-connection",
    "x-a",
    "x-b",
    "x-c",
    "x-secret",
    "content-type",
    "content-length",
    "host",
];

/// Header values: visible ASCII and spaces.
fn plain_value() -> impl Strategy<Value = String> {
    "[ -~]{0,12}"
}

/// A token in random case.
fn token() -> impl Strategy<Value = String> {
    let pool = select(
        NAMES
            .iter()
            .copied()
            .chain(["close", "x-absent", "x y", "", "@", "x-a;q=1"])
            .collect::<Vec<_>>(),
    );
    (pool, any::<u64>()).prop_map(|(t, case)| {
        t.chars()
            .enumerate()
            .map(|(i, c)| {
                if (case >> (i % 64)) & 1 == 1 {
                    c.to_ascii_uppercase()
                } else {
                    c
                }
            })
            .collect()
    })
}

/// A `Connection` value: tokens with stray commas and whitespace.
fn connection_value() -> impl Strategy<Value = String> {
    let sep = select(&[",", ", ", " ,", ",,", " , ", ",\t", "\t,"][..]);
    let edge = || select(&["", " ", ",", " , ", "\t"][..]);
    (edge(), vec((token(), sep), 0..5), edge()).prop_map(|(lead, items, trail)| {
        let mut s = lead.to_string();
        for (t, sep) in items {
            s.push_str(&t);
            s.push_str(sep);
        }
        s.push_str(trail);
        s
    })
}

fn header_entries() -> impl Strategy<Value = Vec<(&'static str, String)>> {
    let entry = prop_oneof![
        connection_value().prop_map(|v| ("connection", v)),
        (select(NAMES), plain_value()),
        (select(NAMES), connection_value()),
    ];
    vec(entry, 0..14)
}

fn header_map(entries: &[(&'static str, String)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (name, value) in entries {
        h.append(
            *name,
            HeaderValue::from_str(value).expect("generated values are valid"),
        );
    }
    h
}

/// The names a `Connection` value lists (RFC 9110 §7.6.1), as valid header
/// names, written out independently of `headers.rs`.
fn connection_names(h: &HeaderMap) -> HashSet<HeaderName> {
    h.get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim_matches([' ', '\t']).to_ascii_lowercase())
        .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
        .collect()
}

/// Header values that are valid but not all text: bytes 0x80-0xFF among
/// visible ASCII, spaces and tabs.
fn opaque_value() -> impl Strategy<Value = Vec<u8>> {
    vec(prop_oneof![0x20u8..0x7f, 0x80u8..=0xff, Just(b'\t')], 0..30)
}

fn xff_value() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        select(
            &[
                "",
                " ",
                "\t",
                "10.0.0.1",
                "10.0.0.1, 10.0.0.2",
                "unknown",
                "  10.0.0.1  ",
                "::1"
            ][..]
        )
        .prop_map(|s| s.as_bytes().to_vec()),
        "[ -~\t]{0,40}".prop_map(String::into_bytes),
        opaque_value(),
    ]
}

fn framing_map(cl: &[&str], te: &[&str], others: &[(&'static str, String)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (name, value) in others {
        h.append(*name, HeaderValue::from_str(value).unwrap());
    }
    for v in cl {
        h.append(header::CONTENT_LENGTH, HeaderValue::from_str(v).unwrap());
    }
    for v in te {
        h.append(header::TRANSFER_ENCODING, HeaderValue::from_str(v).unwrap());
    }
    h
}

#[rustfmt::skip]
const CONTENT_LENGTHS: &[&str] = &[
    "5", "6", "05", " 5", "5 ", "0", "abc", "", "5, 5", "-1", "18446744073709551616",
];
#[rustfmt::skip]
const TRANSFER_ENCODINGS: &[&str] = &[
    "chunked", "Chunked", "CHUNKED", "gzip", "gzip, chunked", "chunked, chunked", " chunked",
    "chunked ", "identity", "", "xchunked", "chunked;q=1",
];

proptest! {
    #![proptest_config(cases(256))]

    #[test]
    fn strip_hop_by_hop_removes_exactly_the_connection_headers(entries in header_entries()) {
        let before = header_map(&entries);
        let named = connection_names(&before);
        let hop = |n: &HeaderName| HOP_BY_HOP.contains(&n.as_str()) || named.contains(n);

        let mut after = before.clone();
        headers::strip_hop_by_hop(&mut after);

        for name in after.keys() {
            prop_assert!(!hop(name), "{} survived; before: {:?}", name, before);
        }
        for name in before.keys().filter(|n| !hop(n)) {
            let want: Vec<_> = before.get_all(name).iter().collect();
            let got: Vec<_> = after.get_all(name).iter().collect();
            prop_assert_eq!(got, want, "values of {}", name);
        }
        let kept: usize = before
            .keys()
            .filter(|n| !hop(n))
            .map(|n| before.get_all(n).iter().count())
            .sum();
        prop_assert_eq!(after.len(), kept);
    }

    #[test]
    fn set_forwarded_appends_the_peer(
        prior in proptest::option::of(xff_value()),
        peer in any::<IpAddr>(),
        https in any::<bool>(),
        host in proptest::option::of(prop_oneof!["[a-z0-9.:-]{0,20}", any::<String>()]),
        others in vec((select(&["x-a", "host", "content-type"][..]), plain_value()), 0..4),
    ) {
        let mut h = header_map(&others);
        if let Some(p) = &prior {
            h.insert(&headers::X_FORWARDED_FOR, HeaderValue::from_bytes(p).unwrap());
        }
        let proto = if https { "https" } else { "http" };
        let before = h.clone();
        let peer = peer.to_string();

        let host_value = host.as_deref().and_then(|s| HeaderValue::from_str(s).ok());
        headers::set_forwarded(&mut h, &headers::ip_value(peer.parse().unwrap()), proto, host_value.as_ref());

        let prev = prior
            .as_deref()
            .and_then(|p| std::str::from_utf8(p).ok())
            .filter(|p| p.bytes().all(|b| b == b'\t' || (0x20..0x7f).contains(&b)))
            .filter(|p| !p.trim().is_empty());
        let want = match prev {
            Some(prev) => format!("{}, {peer}", prev.trim()),
            None => peer.clone(),
        };
        let xff: Vec<_> = h.get_all(&headers::X_FORWARDED_FOR).iter().collect();
        prop_assert_eq!(xff, vec![want.as_str()]);
        let protos: Vec<_> = h.get_all(&headers::X_FORWARDED_PROTO).iter().collect();
        prop_assert_eq!(protos, vec![proto]);
        if let Some(host) = host.as_deref().filter(|s| HeaderValue::from_str(s).is_ok()) {
            let hosts: Vec<_> = h.get_all(&headers::X_FORWARDED_HOST).iter().collect();
            prop_assert_eq!(hosts, vec![host]);
        } else {
            prop_assert!(!h.contains_key(&headers::X_FORWARDED_HOST));
        }
        for (name, _) in &others {
            let want: Vec<_> = before.get_all(*name).iter().collect();
            let got: Vec<_> = h.get_all(*name).iter().collect();
            prop_assert_eq!(got, want, "values of {}", name);
        }
    }

    /// Accepted exactly when the body's length is unambiguous: no
    /// Transfer-Encoding and every Content-Length alike, or one
    /// Transfer-Encoding that is `chunked` (in any case) and no Content-Length.
    #[test]
    fn check_framing_accepts_only_unambiguous_framing(
        cl in vec(select(CONTENT_LENGTHS), 0..4),
        te in vec(select(TRANSFER_ENCODINGS), 0..3),
        others in vec((select(&["x-a", "host", "connection"][..]), plain_value()), 0..4),
    ) {
        let h = framing_map(&cl, &te, &others);
        let lengths_agree = cl.windows(2).all(|w| w[0] == w[1]);
        let chunked = te.len() == 1 && te[0].eq_ignore_ascii_case("chunked");
        let want = (te.is_empty() && lengths_agree) || (chunked && cl.is_empty());
        let got = headers::check_framing(&h);
        prop_assert_eq!(got.is_ok(), want, "CL {:?} TE {:?}: {:?}", cl, te, got);
    }

    #[test]
    fn request_id_keeps_a_usable_client_id_else_makes_one(
        sent in proptest::option::of(prop_oneof![
            "[ -~]{0,12}".prop_map(String::into_bytes),
            "[!-~]{195,205}".prop_map(String::into_bytes),
            opaque_value(),
        ]),
    ) {
        let mut h = HeaderMap::new();
        if let Some(v) = &sent {
            h.insert(&headers::X_REQUEST_ID, HeaderValue::from_bytes(v).unwrap());
        }
        let id = headers::request_id(&h);
        let text = |v: &Vec<u8>| v.iter().all(|&b| b == b'\t' || (0x20..0x7f).contains(&b));
        let usable = sent.as_ref().filter(|v| !v.is_empty() && v.len() <= 200 && text(v));
        match usable {
            Some(v) => prop_assert_eq!(id.as_bytes(), v.as_slice()),
            None => {
                prop_assert_eq!(id.len(), 32);
                let hex = |b: &u8| b.is_ascii_digit() || (b'a'..=b'f').contains(b);
                prop_assert!(id.as_bytes().iter().all(hex), "{:?}", id);
            }
        }
    }
}
