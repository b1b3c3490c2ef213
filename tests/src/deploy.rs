//! Testing `deploy/` against real tools: finding the tools, reading PromQL
//! out of the Grafana dashboards and the Prometheus rules, pulling metric
//! names out of PromQL, and running a real Prometheus on loopback that
//! scrapes Usher and its workers.
//!
//! Any end-to-end test can use it:
//!
//! ```ignore
//! use usher_e2e::deploy;
//!
//! let prom = deploy::Prometheus::start(&[
//!     deploy::ScrapeJob::new("usher", [usher_admin]),
//!     deploy::ScrapeJob::new("usher-worker", [worker1, worker2]),
//! ]);
//! prom.wait_for_targets_up(Duration::from_secs(20));
//! deploy::assert_queries_return_data(&prom, &deploy::all_deploy_queries(), Duration::from_secs(30));
//! // or all of the above in one call:
//! deploy::check_live_deploy_queries(&usher_admin, &[worker1, worker2]);
//! ```
//!
//! Missing tools are failures, not skips: CI installs them (test.sh).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value as Json;
use serde_yaml::Value as Yaml;

use crate::usher::TempDir;
use crate::{blocking, free_port, wait_until};

// ------------------------------------------------------------------ paths, tools

/// The workspace root (the parent of the `tests` package).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

pub fn deploy_dir() -> PathBuf {
    repo_root().join("deploy")
}

/// The dashboards that `dashboard_queries` reads.
pub fn dashboard_paths() -> Vec<PathBuf> {
    let dir = deploy_dir().join("grafana");
    vec![dir.join("usher.json"), dir.join("usher-worker.json")]
}

pub fn rules_path() -> PathBuf {
    deploy_dir().join("prometheus").join("rules.yaml")
}

/// Finds an executable on PATH, or panics with how to install it. A missing
/// tool fails the test: CI must have it (test.sh installs it).
pub fn require_tool(name: &str, install_hint: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        let candidate = dir.join(name);
        if candidate.is_file() {
            return candidate;
        }
    }
    panic!("required tool `{name}` is not on PATH; install it with: {install_hint}");
}

pub fn promtool() -> PathBuf {
    require_tool("promtool", "apt-get install -y prometheus")
}

pub fn prometheus_bin() -> PathBuf {
    require_tool("prometheus", "apt-get install -y prometheus")
}

/// Runs a command to completion and panics with its output unless it succeeded.
pub fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// `GET http://{addr}{path_and_query}` within `timeout`.
fn get(addr: &str, path_and_query: &str, timeout: Duration) -> anyhow::Result<crate::Resp> {
    blocking::get_within(&format!("http://{addr}{path_and_query}"), timeout)
}

/// Percent-encodes everything but unreserved characters (for PromQL in a URL).
pub fn url_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

// ------------------------------------------------------------------ PromQL out of files

/// One PromQL expression and where it came from.
#[derive(Clone, Debug)]
pub struct Query {
    /// e.g. `usher.json: panel "Requests by status code" (A)`
    pub source: String,
    /// The expression as written in the file.
    pub raw: String,
    /// The expression with Grafana variables substituted: runnable as is.
    pub expr: String,
}

/// Replaces Grafana variables so that an expression runs against Prometheus:
/// interval variables become `1m`, every other variable (`$upstream`,
/// `${backend}`, `${instance:regex}`, ...) becomes the match-all regex `.*`.
/// Dashboards only use query variables inside `=~"..."`, which
/// `grafana_vars_outside_regex_matchers` checks.
pub fn substitute_grafana_vars(expr: &str) -> String {
    let mut out = String::with_capacity(expr.len());
    let mut rest = expr;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        let (name, len) = if let Some(inner) = after.strip_prefix('{') {
            let end = inner.find('}').map(|e| e + 1).unwrap_or(inner.len());
            let name = inner[..end.saturating_sub(1)]
                .split(':')
                .next()
                .unwrap_or("");
            (name, end + 1)
        } else {
            let end = after
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(after.len());
            (&after[..end], end)
        };
        let replacement = match name {
            "__rate_interval" | "__interval" | "__range" | "__range_s" | "interval"
            | "resolution" => "1m",
            "__interval_ms" | "__range_ms" => "60000",
            "" => "$",
            _ => ".*",
        };
        out.push_str(replacement);
        rest = &after[len.min(after.len())..];
    }
    out.push_str(rest);
    out
}

/// Every `$variable` that is used outside a `=~"..."` / `!~"..."` matcher
/// value (other than the interval variables), which `.*` substitution would
/// turn into invalid PromQL.
pub fn grafana_vars_outside_regex_matchers(expr: &str) -> Vec<String> {
    let mut bad = Vec::new();
    let bytes = expr.as_bytes();
    let mut i = 0;
    let mut in_string = false;
    let mut string_is_regex = false;
    while i < bytes.len() {
        let c = bytes[i] as char;
        if in_string {
            if c == '\\' {
                i += 2;
                continue;
            }
            if c == '"' {
                in_string = false;
            } else if c == '$' && !string_is_regex {
                bad.push(expr[i..].chars().take(20).collect());
            }
        } else if c == '"' {
            in_string = true;
            let before = expr[..i].trim_end();
            string_is_regex = before.ends_with("=~") || before.ends_with("!~");
        } else if c == '$' {
            let var: String = expr[i..].chars().take(20).collect();
            if !(var.starts_with("$__rate_interval")
                || var.starts_with("$__interval")
                || var.starts_with("$__range"))
            {
                bad.push(var);
            }
        }
        i += 1;
    }
    bad
}

/// Turns a Grafana Prometheus variable query into PromQL that returns data
/// exactly when the variable would have options:
/// `label_values(m{sel}, l)` → `count by (l) (m{sel})`,
/// `label_values(l)` → `count by (l) ({l!=""})`, `query_result(q)` → `q`.
pub fn variable_query_to_promql(query: &str) -> Option<String> {
    let q = query.trim();
    if let Some(args) = q
        .strip_prefix("label_values(")
        .and_then(|r| r.strip_suffix(')'))
    {
        return Some(match args.rsplit_once(',') {
            Some((metric, label)) => format!("count by ({}) ({})", label.trim(), metric.trim()),
            None => format!("count by ({0}) ({{{0}!=\"\"}})", args.trim()),
        });
    }
    if let Some(inner) = q
        .strip_prefix("query_result(")
        .and_then(|r| r.strip_suffix(')'))
    {
        return Some(inner.to_string());
    }
    None
}

fn read_json(path: &Path) -> Json {
    let text =
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{} is not valid JSON: {e}", path.display()))
}

pub fn read_yaml(path: &Path) -> Yaml {
    let text =
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    serde_yaml::from_str(&text)
        .unwrap_or_else(|e| panic!("{} is not valid YAML: {e}", path.display()))
}

/// All panels of a dashboard, including panels nested in collapsed rows.
pub fn dashboard_panels(dashboard: &Json) -> Vec<&Json> {
    fn walk<'a>(panels: &'a Json, out: &mut Vec<&'a Json>) {
        for p in panels.as_array().into_iter().flatten() {
            out.push(p);
            walk(&p["panels"], out);
        }
    }
    let mut out = Vec::new();
    walk(&dashboard["panels"], &mut out);
    out
}

/// Every PromQL expression in a dashboard: panel targets, query variables
/// (as PromQL, see `variable_query_to_promql`) and annotation queries.
pub fn dashboard_queries(path: &Path) -> Vec<Query> {
    let file = path
        .file_name()
        .unwrap_or_default()
        .to_string_lossy()
        .to_string();
    let dashboard = read_json(path);
    let mut out = Vec::new();
    for panel in dashboard_panels(&dashboard) {
        for target in panel["targets"].as_array().into_iter().flatten() {
            if let Some(raw) = target["expr"].as_str() {
                out.push(Query {
                    source: format!(
                        "{file}: panel {:?} ({})",
                        panel["title"].as_str().unwrap_or(""),
                        target["refId"].as_str().unwrap_or("?")
                    ),
                    raw: raw.to_string(),
                    expr: substitute_grafana_vars(raw),
                });
            }
        }
    }
    for var in dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
    {
        if var["type"] != "query" {
            continue;
        }
        let raw = var["query"]["query"]
            .as_str()
            .or_else(|| var["query"].as_str())
            .unwrap_or("");
        let promql = variable_query_to_promql(raw).unwrap_or_else(|| {
            panic!(
                "{file}: variable {} has an unsupported query {raw:?}",
                var["name"]
            )
        });
        out.push(Query {
            source: format!("{file}: variable ${}", var["name"].as_str().unwrap_or("?")),
            raw: raw.to_string(),
            expr: substitute_grafana_vars(&promql),
        });
    }
    for ann in dashboard["annotations"]["list"]
        .as_array()
        .into_iter()
        .flatten()
    {
        if let Some(raw) = ann["expr"].as_str() {
            out.push(Query {
                source: format!(
                    "{file}: annotation {:?}",
                    ann["name"].as_str().unwrap_or("")
                ),
                raw: raw.to_string(),
                expr: substitute_grafana_vars(raw),
            });
        }
    }
    out
}

/// One rule of a Prometheus rule file.
#[derive(Clone, Debug)]
pub struct Rule {
    pub group: String,
    /// `record` name, or `None` for an alert.
    pub record: Option<String>,
    pub alert: Option<String>,
    pub expr: String,
}

pub fn rules(path: &Path) -> Vec<Rule> {
    let doc = read_yaml(path);
    let mut out = Vec::new();
    for group in doc["groups"].as_sequence().into_iter().flatten() {
        let name = group["name"].as_str().unwrap_or("").to_string();
        for rule in group["rules"].as_sequence().into_iter().flatten() {
            out.push(Rule {
                group: name.clone(),
                record: rule["record"].as_str().map(str::to_string),
                alert: rule["alert"].as_str().map(str::to_string),
                expr: rule["expr"]
                    .as_str()
                    .unwrap_or_else(|| panic!("rule without expr in group {name}"))
                    .to_string(),
            });
        }
    }
    out
}

/// The recording rules as queries: each rule's expression, and the recorded
/// series itself (so a query returns data only once Prometheus evaluated it).
pub fn recording_rule_queries(path: &Path) -> Vec<Query> {
    let mut out = Vec::new();
    for rule in rules(path) {
        if let Some(record) = rule.record {
            out.push(Query {
                source: format!("rules.yaml: expr of {record}"),
                raw: rule.expr.clone(),
                expr: rule.expr.clone(),
            });
            out.push(Query {
                source: format!("rules.yaml: recorded series {record}"),
                raw: record.clone(),
                expr: record,
            });
        }
    }
    out
}

/// Everything that should return data from a healthy, busy Usher setup: both
/// dashboards and every recording rule.
pub fn all_deploy_queries() -> Vec<Query> {
    let mut out: Vec<Query> = dashboard_paths()
        .iter()
        .flat_map(|p| dashboard_queries(p))
        .collect();
    out.extend(recording_rule_queries(&rules_path()));
    out
}

// ------------------------------------------------------------------ PromQL lexing

/// What an expression references: metric names, and the label names each
/// selector matches on.
#[derive(Debug, Default)]
pub struct PromqlRefs {
    pub metrics: BTreeSet<String>,
    /// metric name → label names used in its `{...}` matchers.
    pub selector_labels: BTreeMap<String, BTreeSet<String>>,
    /// label names in `by`/`without`/`on`/`ignoring`/`group_*` lists.
    pub grouping_labels: BTreeSet<String>,
}

const PROMQL_KEYWORDS: &[&str] = &[
    "and",
    "or",
    "unless",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "offset",
    "bool",
    "inf",
    "nan",
    "atan2",
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
    "limitk",
    "limit_ratio",
];

const GROUPING_KEYWORDS: &[&str] = &[
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];

/// A small PromQL lexer: enough to list metric names and label names. It
/// skips strings, durations, numbers, functions and keywords.
pub fn promql_refs(expr: &str) -> PromqlRefs {
    let chars: Vec<char> = expr.chars().collect();
    let mut refs = PromqlRefs::default();
    let mut i = 0;
    let mut last_metric: Option<String> = None;
    let skip_ws = |mut j: usize| {
        while j < chars.len() && chars[j].is_whitespace() {
            j += 1;
        }
        j
    };
    while i < chars.len() {
        let c = chars[i];
        if c == '"' || c == '\'' || c == '`' {
            i = skip_string(&chars, i);
        } else if c == '[' {
            while i < chars.len() && chars[i] != ']' {
                i += 1;
            }
            i += 1;
        } else if c == '{' {
            let end = chars[i..]
                .iter()
                .position(|&ch| ch == '}')
                .map(|p| p + i)
                .unwrap_or(chars.len());
            let labels = matcher_labels(&chars[i + 1..end]);
            let key = last_metric.take().unwrap_or_default();
            if key.is_empty() {
                // `{__name__="x"}` style selectors
                refs.selector_labels
                    .entry(String::new())
                    .or_default()
                    .extend(labels);
            } else {
                refs.selector_labels.entry(key).or_default().extend(labels);
            }
            i = end + 1;
        } else if c.is_ascii_digit()
            || (c == '.' && chars.get(i + 1).is_some_and(|d| d.is_ascii_digit()))
        {
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                i += 1;
            }
            last_metric = None;
        } else if c.is_ascii_alphabetic() || c == '_' || c == ':' {
            let start = i;
            while i < chars.len()
                && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == ':')
            {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let next = skip_ws(i);
            let next_char = chars.get(next).copied();
            if GROUPING_KEYWORDS.contains(&word.as_str()) {
                if next_char == Some('(') {
                    let end = chars[next..]
                        .iter()
                        .position(|&ch| ch == ')')
                        .map(|p| p + next)
                        .unwrap_or(chars.len());
                    let list: String = chars[next + 1..end].iter().collect();
                    refs.grouping_labels.extend(
                        list.split(',')
                            .map(str::trim)
                            .filter(|s| !s.is_empty())
                            .map(str::to_string),
                    );
                    i = end + 1;
                }
                last_metric = None;
            } else if PROMQL_KEYWORDS.contains(&word.to_ascii_lowercase().as_str())
                || next_char == Some('(')
            {
                last_metric = None;
            } else {
                refs.metrics.insert(word.clone());
                refs.selector_labels.entry(word.clone()).or_default();
                last_metric = Some(word);
            }
        } else {
            if !c.is_whitespace() {
                last_metric = None;
            }
            i += 1;
        }
    }
    refs.selector_labels.remove("");
    refs
}

fn skip_string(chars: &[char], start: usize) -> usize {
    let quote = chars[start];
    let mut i = start + 1;
    while i < chars.len() {
        if chars[i] == '\\' && quote != '`' {
            i += 2;
            continue;
        }
        if chars[i] == quote {
            return i + 1;
        }
        i += 1;
    }
    i
}

fn matcher_labels(inner: &[char]) -> BTreeSet<String> {
    let mut labels = BTreeSet::new();
    let mut i = 0;
    while i < inner.len() {
        let c = inner[i];
        if c == '"' || c == '\'' || c == '`' {
            i = skip_string(inner, i);
        } else if c.is_ascii_alphabetic() || c == '_' {
            let start = i;
            while i < inner.len() && (inner[i].is_ascii_alphanumeric() || inner[i] == '_') {
                i += 1;
            }
            labels.insert(inner[start..i].iter().collect());
        } else {
            i += 1;
        }
    }
    labels
}

// ------------------------------------------------------------------ Prometheus

/// A scrape job for `Prometheus::start`.
#[derive(Clone, Debug)]
pub struct ScrapeJob {
    pub name: String,
    pub targets: Vec<String>,
}

impl ScrapeJob {
    pub fn new<I, S>(name: &str, targets: I) -> ScrapeJob
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        ScrapeJob {
            name: name.to_string(),
            targets: targets.into_iter().map(Into::into).collect(),
        }
    }
}

/// A real Prometheus server on 127.0.0.1, scraping every second and
/// evaluating deploy/prometheus/rules.yaml every second, with its TSDB in a
/// temp dir. Killed on drop.
pub struct Prometheus {
    child: Child,
    /// `127.0.0.1:PORT`
    pub addr: String,
    dir: TempDir,
}

impl Prometheus {
    /// Starts Prometheus with the given jobs and waits until it is ready.
    pub fn start(jobs: &[ScrapeJob]) -> Prometheus {
        let bin = prometheus_bin();
        let dir = TempDir::new("prometheus");
        let config = dir.path().join("prometheus.yml");
        std::fs::write(&config, prometheus_config(jobs, &rules_path()))
            .expect("write prometheus.yml");
        run_ok(
            Command::new(promtool())
                .arg("check")
                .arg("config")
                .arg(&config),
        );
        let log = dir.path().join("prometheus.log");

        // The port is picked before Prometheus binds it: retry if it was taken.
        for _attempt in 0..3 {
            let addr = format!("127.0.0.1:{}", free_port());
            let log_file = std::fs::File::create(&log).expect("create prometheus.log");
            let mut child = Command::new(&bin)
                .arg(format!("--config.file={}", config.display()))
                .arg(format!("--web.listen-address={addr}"))
                .arg(format!(
                    "--storage.tsdb.path={}",
                    dir.path().join("data").display()
                ))
                .arg("--storage.tsdb.retention.time=1h")
                .arg("--log.level=warn")
                .stdin(Stdio::null())
                .stdout(log_file.try_clone().expect("dup log"))
                .stderr(log_file)
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
            if wait_ready(&mut child, &addr, Duration::from_secs(30)) {
                return Prometheus { child, addr, dir };
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!(
            "Prometheus did not become ready; its log:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }

    /// The server's own log so far (for failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }

    /// Runs an instant query; returns the result vector (or the error text).
    pub fn query(&self, expr: &str) -> Result<Vec<Json>, String> {
        let path = format!("/api/v1/query?query={}", url_encode(expr));
        let resp = get(&self.addr, &path, Duration::from_secs(10)).map_err(|e| format!("{e:#}"))?;
        let (status, body) = (resp.status, resp.text());
        let json: Json =
            serde_json::from_str(&body).map_err(|e| format!("HTTP {status}: {e}: {body}"))?;
        if json["status"] != "success" {
            return Err(format!(
                "HTTP {status}: {}: {}",
                json["errorType"], json["error"]
            ));
        }
        match &json["data"]["result"] {
            Json::Array(v) => Ok(v.clone()),
            // scalar / string results count as one value
            other if !other.is_null() => Ok(vec![other.clone()]),
            _ => Ok(Vec::new()),
        }
    }

    /// Waits until every target of every job is up; panics with the target
    /// states otherwise.
    pub fn wait_for_targets_up(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let mut last = String::new();
        while Instant::now() < deadline {
            let targets = get(
                &self.addr,
                "/api/v1/targets?state=active",
                Duration::from_secs(5),
            );
            if let Some(resp) = targets.ok().filter(|r| r.status == 200) {
                let json: Json = serde_json::from_slice(&resp.body).unwrap_or_default();
                let targets = json["data"]["activeTargets"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default();
                if !targets.is_empty() && targets.iter().all(|t| t["health"] == "up") {
                    return;
                }
                last = targets
                    .iter()
                    .map(|t| {
                        format!(
                            "{} {} {} {}",
                            t["labels"]["job"], t["scrapeUrl"], t["health"], t["lastError"]
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("\n");
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        panic!(
            "targets not up after {timeout:?}:\n{last}\n--- prometheus log\n{}",
            self.log()
        );
    }
}

/// Waits until Prometheus answers `/-/ready`; false if it exits first or
/// `timeout` passes.
fn wait_ready(child: &mut Child, addr: &str, timeout: Duration) -> bool {
    let mut exited = false;
    wait_until(timeout, || {
        exited = matches!(child.try_wait(), Ok(Some(_)));
        exited || get(addr, "/-/ready", Duration::from_secs(1)).is_ok_and(|r| r.status == 200)
    }) && !exited
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The config `Prometheus::start` runs: 1s scrapes and rule evaluation.
pub fn prometheus_config(jobs: &[ScrapeJob], rules: &Path) -> String {
    let mut cfg = String::from(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n",
    );
    let _ = writeln!(cfg, "rule_files:\n  - {:?}", rules.display().to_string());
    cfg.push_str("scrape_configs:\n");
    for job in jobs {
        let targets: Vec<String> = job.targets.iter().map(|t| format!("{t:?}")).collect();
        let _ = writeln!(
            cfg,
            "  - job_name: {:?}\n    metrics_path: /metrics\n    static_configs:\n      - targets: [{}]",
            job.name,
            targets.join(", ")
        );
    }
    cfg
}

/// Polls until every query returns a non-empty result, or panics after
/// `timeout` listing each query that is still empty or failing.
pub fn assert_queries_return_data(prom: &Prometheus, queries: &[Query], timeout: Duration) {
    let deadline = Instant::now() + timeout;
    let mut pending: Vec<&Query> = queries.iter().collect();
    let mut errors: BTreeMap<String, String> = BTreeMap::new();
    loop {
        errors.clear();
        pending.retain(|q| match prom.query(&q.expr) {
            Ok(result) if !result.is_empty() => false,
            Ok(_) => true,
            Err(e) => {
                errors.insert(q.source.clone(), e);
                true
            }
        });
        if pending.is_empty() {
            return;
        }
        if Instant::now() >= deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let mut msg = format!(
        "{} of {} queries returned no data after {timeout:?}:\n",
        pending.len(),
        queries.len()
    );
    for q in &pending {
        let why = errors
            .get(&q.source)
            .map(|e| format!("ERROR {e}"))
            .unwrap_or_else(|| "empty".into());
        let _ = writeln!(
            msg,
            "- {}: {why}\n    {}",
            q.source,
            q.expr.replace('\n', " ")
        );
    }
    panic!("{msg}");
}

/// Starts Prometheus against a running Usher (its admin address) and its
/// workers, and asserts that every query of both dashboards and every
/// recording rule returns data. Call it from any test with a busy Usher:
/// `check_live_deploy_queries("127.0.0.1:9901", &["127.0.0.1:9001".into()])`.
/// Some series only exist after their first event, so drive traffic that
/// causes 5xx and a failed reload meanwhile, and give Usher a `dns:` upstream
/// for `usher_dns_resolutions_total` (see
/// `live_usher_feeds_every_dashboard_panel_and_rule` in tests/tests/deploy.rs).
pub fn check_live_deploy_queries(usher_admin: &str, workers: &[String]) {
    let prom = Prometheus::start(&[
        ScrapeJob::new("usher", [usher_admin.to_string()]),
        ScrapeJob::new("usher-worker", workers.to_vec()),
    ]);
    prom.wait_for_targets_up(Duration::from_secs(30));
    assert_queries_return_data(&prom, &all_deploy_queries(), Duration::from_secs(60));
}
