//! `usher-load`: an HTTP/1.1 load generator for loopback benchmarks.
//!
//! Open loop (`--rate R`): requests are scheduled at fixed intended send times
//! (`t0 + i/R`, or Poisson arrivals with `--arrivals poisson`). Latency is measured
//! from the *intended* send time, so a request that waits for a free connection, or
//! whose send is late because the target is slow, is charged for that wait
//! (coordinated-omission correction). At most `--connections` requests are in
//! flight, each over a pooled keep-alive connection.
//!
//! Closed loop (`--closed C`): `C` loops, each sending its next request as soon as
//! the previous one is answered. Latency is measured from the actual send. This is
//! for proxy-overhead tests, not for latency under load.
//!
//! Only loopback targets are accepted: 127.0.0.0/8, ::1 and `localhost`.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use clap::{Parser, ValueEnum};
use http::{header, HeaderValue, Method, Request, Uri};
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;

/// Open-loop (fixed-rate, coordinated-omission corrected) or closed-loop HTTP/1.1
/// load generator. Loopback targets only.
#[derive(Parser, Debug)]
#[command(name = "usher-load", version)]
struct Args {
    /// Open loop: requests per second, sent on a fixed schedule.
    #[arg(long, conflicts_with = "closed", required_unless_present = "closed")]
    rate: Option<f64>,
    /// Closed loop: number of concurrent loops, each as fast as possible.
    #[arg(long, value_name = "C")]
    closed: Option<usize>,
    /// Measured run time (e.g. 10s, 500ms, 2m).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    duration: Duration,
    /// Run this long first without recording anything.
    #[arg(long, default_value = "0s", value_parser = parse_duration)]
    warmup: Duration,
    /// Open loop: maximum connections, i.e. requests in flight. A request that is
    /// due while all are busy waits, and its latency still counts from its due time.
    #[arg(long, default_value_t = 256)]
    connections: usize,
    /// Target URL (repeatable), e.g. http://127.0.0.1:8080/sleep?ms=10, or a path
    /// when --target is given. Pair each with a --weight (default 1).
    #[arg(long = "url", value_name = "URL")]
    urls: Vec<String>,
    /// Weight of the --url at the same position.
    #[arg(long = "weight", value_name = "W")]
    weights: Vec<u32>,
    /// Weighted paths against --target, e.g. "90:/sleep?ms=10,10:/sleep?ms=200".
    #[arg(long, conflicts_with = "urls")]
    mix: Option<String>,
    /// Base address for --mix or path-only --url: 127.0.0.1:8080 or http://localhost:8080.
    #[arg(long)]
    target: Option<String>,
    /// Per-request timeout, from the moment the request gets a connection.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    timeout: Duration,
    /// Open loop: arrival process.
    #[arg(long, value_enum, default_value_t = Arrivals::Uniform)]
    arrivals: Arrivals,
    /// Hard cap on the number of requests sent (both modes).
    #[arg(long, default_value_t = 10_000_000)]
    max_requests: u64,
    /// Runtime worker threads (1 = a single-threaded runtime).
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Seed for the class choice (and Poisson arrivals).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Arrivals {
    /// Exactly 1/rate apart.
    Uniform,
    /// Exponential inter-arrival times with mean 1/rate.
    Poisson,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("bad duration {s:?} (use e.g. 10s, 250ms, 2m)"))?;
    let secs = match unit {
        "" | "s" => n,
        "ms" => n / 1e3,
        "us" => n / 1e6,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("bad duration unit in {s:?} (use ms, s, m, h)")),
    };
    if !secs.is_finite() || secs < 0.0 {
        return Err(format!("bad duration {s:?}"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// One kind of request: a path with a weight.
#[derive(Debug, Clone)]
struct Class {
    name: String,
    weight: u32,
    uri: Uri,
}

/// Where requests go, after the loopback check.
#[derive(Debug)]
struct Target {
    addr: SocketAddr,
    host_header: HeaderValue,
    classes: Vec<Class>,
}

/// Splits "http://host:port/path" or "host:port/path" into (authority, path-and-query).
fn split_url(s: &str) -> Result<(String, String)> {
    let rest = if let Some(r) = s.strip_prefix("http://") {
        r
    } else if s.starts_with("https://") {
        bail!("{s}: https is not supported, use http://");
    } else if s.contains("://") {
        bail!("{s}: only http:// URLs are supported");
    } else {
        s
    };
    let (auth, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    Ok((auth.to_string(), path.to_string()))
}

/// Parses host:port and refuses anything that is not loopback.
async fn resolve_loopback(authority: &str) -> Result<SocketAddr> {
    let (host, port) = if let Some(rest) = authority.strip_prefix('[') {
        let (h, p) = rest
            .split_once("]:")
            .with_context(|| format!("{authority}: expected [::1]:PORT"))?;
        (h, p)
    } else {
        authority
            .rsplit_once(':')
            .with_context(|| format!("{authority}: expected HOST:PORT"))?
    };
    let port: u16 = port
        .parse()
        .with_context(|| format!("{authority}: bad port {port:?}"))?;
    let refuse = || {
        anyhow::anyhow!(
            "refusing non-loopback target {authority:?}: usher-load only sends to \
             127.0.0.0/8, ::1 or localhost"
        )
    };
    if host.eq_ignore_ascii_case("localhost") {
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host(("localhost", port))
            .await
            .context("resolving localhost")?
            .collect();
        if addrs.iter().any(|a| !a.ip().is_loopback()) {
            return Err(refuse());
        }
        return addrs
            .iter()
            .find(|a| a.is_ipv4())
            .or(addrs.first())
            .copied()
            .ok_or_else(refuse);
    }
    let ip: IpAddr = host.parse().map_err(|_| refuse())?;
    if !ip.is_loopback() {
        return Err(refuse());
    }
    Ok(SocketAddr::new(ip, port))
}

async fn build_target(args: &Args) -> Result<Target> {
    let base = match &args.target {
        Some(t) => {
            let (auth, path) = split_url(t)?;
            if path != "/" {
                bail!("--target {t}: give only host:port; put paths in --mix or --url");
            }
            Some(auth)
        }
        None => None,
    };
    let mut authority = base.clone();
    let mut specs: Vec<(u32, String)> = Vec::new();
    if let Some(mix) = &args.mix {
        if base.is_none() {
            bail!("--mix needs --target HOST:PORT");
        }
        for item in mix.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let (w, path) = match item.split_once(':') {
                Some((w, p)) if w.trim().parse::<u32>().is_ok() => {
                    (w.trim().parse::<u32>()?, p.trim().to_string())
                }
                _ => (1, item.to_string()),
            };
            if !path.starts_with('/') {
                bail!("--mix item {item:?}: path must start with '/'");
            }
            specs.push((w, path));
        }
    } else {
        if !args.weights.is_empty() && args.weights.len() != args.urls.len() {
            bail!(
                "{} --url but {} --weight: give one weight per URL, or none",
                args.urls.len(),
                args.weights.len()
            );
        }
        for (i, u) in args.urls.iter().enumerate() {
            let w = args.weights.get(i).copied().unwrap_or(1);
            if u.starts_with('/') {
                if base.is_none() {
                    bail!("--url {u}: a path-only URL needs --target HOST:PORT");
                }
                specs.push((w, u.clone()));
                continue;
            }
            let (auth, path) = split_url(u)?;
            match &authority {
                Some(a) if *a != auth => {
                    bail!("--url {u}: all URLs must share one host:port (have {a})")
                }
                _ => authority = Some(auth),
            }
            specs.push((w, path));
        }
    }
    if specs.is_empty() {
        match &base {
            Some(_) => specs.push((1, "/".to_string())),
            None => bail!("nothing to request: give --url URL, or --target with --mix"),
        }
    }
    if specs.iter().all(|(w, _)| *w == 0) {
        bail!("all weights are 0");
    }
    let authority = authority.context("no host:port given")?;
    let addr = resolve_loopback(&authority).await?;
    let host_header = HeaderValue::from_str(&authority)?;
    let classes = specs
        .into_iter()
        .map(|(weight, path)| {
            let uri: Uri = path.parse().with_context(|| format!("bad path {path:?}"))?;
            Ok(Class {
                name: path,
                weight,
                uri,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Target {
        addr,
        host_header,
        classes,
    })
}

/// Weighted class choice.
struct Picker {
    cumulative: Vec<u64>,
}

impl Picker {
    fn new(classes: &[Class]) -> Self {
        let mut acc = 0;
        let cumulative = classes
            .iter()
            .map(|c| {
                acc += u64::from(c.weight);
                acc
            })
            .collect();
        Picker { cumulative }
    }

    fn pick(&self, rng: &mut fastrand::Rng) -> usize {
        let total = *self.cumulative.last().expect("at least one class");
        let x = rng.u64(0..total);
        self.cumulative.partition_point(|&c| c <= x)
    }
}

fn is_ok(outcome: Outcome) -> bool {
    matches!(outcome, Outcome::Status(200..=299))
}

/// What happened to one request.
#[derive(Debug, Clone, Copy)]
enum Outcome {
    Status(u16),
    Connect,
    Timeout,
    Io,
}

#[derive(Debug, Default, Clone)]
struct ClassStats {
    sent: u64,
    ok: u64,
    status: BTreeMap<u16, u64>,
    connect_errors: u64,
    timeouts: u64,
    io_errors: u64,
    /// 2xx responses that completed inside the measured window, whenever they
    /// were sent: the basis of the throughput figure.
    ok_in_window: u64,
    /// Latencies of 2xx responses, microseconds.
    lat_us: Vec<u32>,
}

impl ClassStats {
    fn record(&mut self, outcome: Outcome, latency: Duration) {
        match outcome {
            Outcome::Status(s) => {
                *self.status.entry(s).or_default() += 1;
                if (200..300).contains(&s) {
                    self.ok += 1;
                    let us = latency.as_micros().min(u128::from(u32::MAX)) as u32;
                    self.lat_us.push(us);
                }
            }
            Outcome::Connect => self.connect_errors += 1,
            Outcome::Timeout => self.timeouts += 1,
            Outcome::Io => self.io_errors += 1,
        }
    }

    fn completed(&self) -> u64 {
        self.status.values().sum::<u64>() + self.connect_errors + self.timeouts + self.io_errors
    }

    fn merge(&mut self, other: &ClassStats) {
        self.sent += other.sent;
        self.ok += other.ok;
        for (s, n) in &other.status {
            *self.status.entry(*s).or_default() += n;
        }
        self.connect_errors += other.connect_errors;
        self.timeouts += other.timeouts;
        self.io_errors += other.io_errors;
        self.ok_in_window += other.ok_in_window;
        self.lat_us.extend_from_slice(&other.lat_us);
    }
}

type Sender = SendRequest<Empty<Bytes>>;

/// Keep-alive HTTP/1.1 connections to the target, reused most-recently-idle first so
/// that only as many connections are open as the load needs.
struct Pool {
    addr: SocketAddr,
    host_header: HeaderValue,
    idle: Mutex<Vec<Sender>>,
    opened: AtomicU64,
}

impl Pool {
    fn new(target: &Target) -> Self {
        Pool {
            addr: target.addr,
            host_header: target.host_header.clone(),
            idle: Mutex::new(Vec::new()),
            opened: AtomicU64::new(0),
        }
    }

    async fn checkout(&self) -> Result<Sender, Outcome> {
        loop {
            let next = self.idle.lock().expect("pool lock").pop();
            let Some(mut sender) = next else { break };
            if sender.is_closed() {
                continue;
            }
            if sender.ready().await.is_ok() {
                return Ok(sender);
            }
        }
        self.connect().await
    }

    async fn connect(&self) -> Result<Sender, Outcome> {
        let stream = TcpStream::connect(self.addr)
            .await
            .map_err(|_| Outcome::Connect)?;
        let _ = stream.set_nodelay(true);
        let (sender, conn) = http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|_| Outcome::Connect)?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        self.opened.fetch_add(1, Ordering::Relaxed);
        Ok(sender)
    }

    fn checkin(&self, sender: Sender) {
        if !sender.is_closed() {
            self.idle.lock().expect("pool lock").push(sender);
        }
    }

    fn request(&self, uri: &Uri) -> Request<Empty<Bytes>> {
        let mut req = Request::new(Empty::new());
        *req.method_mut() = Method::GET;
        *req.uri_mut() = uri.clone();
        req.headers_mut()
            .insert(header::HOST, self.host_header.clone());
        req
    }

    /// Sends one GET and reads the whole response.
    async fn exchange(&self, uri: &Uri) -> Result<u16, Outcome> {
        let mut sender = self.checkout().await?;
        let resp = match sender.send_request(self.request(uri)).await {
            Ok(r) => r,
            // The connection closed before the request went out (a keep-alive
            // race): safe to send again, once, on a fresh connection.
            Err(e) if e.is_canceled() => {
                sender = self.connect().await?;
                sender
                    .send_request(self.request(uri))
                    .await
                    .map_err(|_| Outcome::Io)?
            }
            Err(_) => return Err(Outcome::Io),
        };
        let status = resp.status().as_u16();
        let mut body = resp.into_body();
        while let Some(frame) = body.frame().await {
            frame.map_err(|_| Outcome::Io)?;
        }
        self.checkin(sender);
        Ok(status)
    }

    async fn send(&self, uri: &Uri, timeout: Duration) -> Outcome {
        match tokio::time::timeout(timeout, self.exchange(uri)).await {
            Err(_) => Outcome::Timeout,
            Ok(Err(o)) => o,
            Ok(Ok(s)) => Outcome::Status(s),
        }
    }
}

/// Everything the report needs.
struct RunResult {
    mode: &'static str,
    classes: Vec<ClassStats>,
    /// Seconds over which throughput is computed (the measured duration).
    window: f64,
    /// Seconds from the end of the window to the last measured completion.
    drain: f64,
    connections_opened: u64,
    /// Open loop: the most requests waiting for a free connection at once.
    backlog_max: usize,
    /// Open loop: how late the scheduler itself was, at worst.
    scheduler_lag_max: Duration,
}

/// One scheduled request, handed from the scheduler thread to the runtime.
struct Job {
    class: usize,
    intended: Instant,
    measured: bool,
}

/// What the scheduler thread reports when it is done.
struct Schedule {
    sent: Vec<u64>,
    last_intended: Instant,
    lag_max: Duration,
}

/// Produces the send schedule on its own OS thread. `std::thread::sleep` is a
/// nanosleep, accurate to tens of microseconds, where tokio's timer wheel has 1 ms
/// ticks and would both bunch requests into bursts and add ~0.5 ms of artificial
/// latency to every request.
#[allow(clippy::too_many_arguments)]
fn schedule(
    tx: tokio::sync::mpsc::UnboundedSender<Job>,
    picker: Picker,
    mut rng: fastrand::Rng,
    arrivals: Arrivals,
    rate: f64,
    n: u64,
    t0: Instant,
    measure_from: Instant,
    end: Instant,
) -> Schedule {
    const SPIN_BELOW: Duration = Duration::from_micros(20);
    let mut sent = vec![0u64; picker.cumulative.len()];
    let mut lag_max = Duration::ZERO;
    let mut last_intended = t0;
    let mut offset = 0.0f64;
    let mut now = Instant::now();
    for i in 0..n {
        offset = match arrivals {
            Arrivals::Uniform => i as f64 / rate,
            Arrivals::Poisson => offset - (1.0 - rng.f64()).ln() / rate,
        };
        let intended = t0 + Duration::from_secs_f64(offset);
        if intended >= end {
            break;
        }
        if intended > now {
            let ahead = intended - now;
            if ahead > SPIN_BELOW {
                std::thread::sleep(ahead);
            }
            now = Instant::now();
        }
        lag_max = lag_max.max(now.saturating_duration_since(intended));
        last_intended = intended;
        let class = picker.pick(&mut rng);
        let measured = intended >= measure_from;
        if measured {
            sent[class] += 1;
        }
        if tx
            .send(Job {
                class,
                intended,
                measured,
            })
            .is_err()
        {
            break;
        }
    }
    Schedule {
        sent,
        last_intended,
        lag_max,
    }
}

async fn run_open(args: &Args, target: Arc<Target>, rate: f64) -> Result<RunResult> {
    if !(rate.is_finite() && rate > 0.0) {
        bail!("--rate must be > 0");
    }
    if args.connections == 0 {
        bail!("--connections must be > 0");
    }
    let pool = Arc::new(Pool::new(&target));
    let nclass = target.classes.len();
    let stats = Arc::new(Mutex::new(vec![ClassStats::default(); nclass]));
    let sem = Arc::new(Semaphore::new(args.connections));
    // Requests waiting for a connection, and requests not yet finished.
    let waiting = Arc::new(AtomicUsize::new(0));
    let outstanding = Arc::new(AtomicUsize::new(0));
    let all_done = Arc::new(tokio::sync::Notify::new());

    let total_time = args.warmup + args.duration;
    let n = ((rate * total_time.as_secs_f64()).ceil() as u64).min(args.max_requests);
    let t0 = Instant::now() + Duration::from_millis(5);
    let measure_from = t0 + args.warmup;
    // Nanoseconds after t0 of the last measured completion.
    let last_done = Arc::new(AtomicU64::new(0));
    let window_end = measure_from + args.duration;

    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Job>();
    let picker = Picker::new(&target.classes);
    let rng = fastrand::Rng::with_seed(args.seed);
    let arrivals = args.arrivals;
    let scheduler = std::thread::Builder::new()
        .name("usher-load-schedule".into())
        .spawn(move || {
            schedule(
                tx,
                picker,
                rng,
                arrivals,
                rate,
                n,
                t0,
                measure_from,
                t0 + total_time,
            )
        })?;

    let mut backlog_max = 0usize;
    while let Some(job) = rx.recv().await {
        let (pool, stats, sem, waiting, outstanding, all_done, target, last_done) = (
            pool.clone(),
            stats.clone(),
            sem.clone(),
            waiting.clone(),
            outstanding.clone(),
            all_done.clone(),
            target.clone(),
            last_done.clone(),
        );
        let timeout = args.timeout;
        let w = waiting.fetch_add(1, Ordering::Relaxed) + 1;
        backlog_max = backlog_max.max(w);
        outstanding.fetch_add(1, Ordering::AcqRel);
        tokio::spawn(async move {
            let permit = sem.acquire().await;
            waiting.fetch_sub(1, Ordering::Relaxed);
            if permit.is_ok() {
                let outcome = pool.send(&target.classes[job.class].uri, timeout).await;
                let done = Instant::now();
                let in_window = done >= measure_from && done < window_end;
                if job.measured || in_window {
                    let mut stats = stats.lock().expect("stats lock");
                    let s = &mut stats[job.class];
                    if in_window && is_ok(outcome) {
                        s.ok_in_window += 1;
                    }
                    if job.measured {
                        last_done.fetch_max(
                            done.saturating_duration_since(t0).as_nanos() as u64,
                            Ordering::Relaxed,
                        );
                        s.record(outcome, done.saturating_duration_since(job.intended));
                    }
                }
            }
            drop(permit);
            if outstanding.fetch_sub(1, Ordering::AcqRel) == 1 {
                all_done.notify_one();
            }
        });
    }
    let sched = scheduler
        .join()
        .map_err(|_| anyhow::anyhow!("scheduler thread panicked"))?;

    // Drain: wait for every request to finish, but no longer than the timeout
    // after the last send (plus the time to get a connection).
    let deadline = sched.last_intended.max(Instant::now()) + args.timeout + Duration::from_secs(1);
    while outstanding.load(Ordering::Acquire) > 0 {
        if tokio::time::timeout_at(deadline.into(), all_done.notified())
            .await
            .is_err()
        {
            break;
        }
    }

    let mut classes = stats.lock().expect("stats lock").clone();
    for (c, s) in classes.iter_mut().zip(sched.sent) {
        c.sent = s;
    }
    let done_at = t0 + Duration::from_nanos(last_done.load(Ordering::Relaxed));
    Ok(RunResult {
        mode: "open",
        classes,
        window: args.duration.as_secs_f64(),
        drain: done_at.saturating_duration_since(window_end).as_secs_f64(),
        connections_opened: pool.opened.load(Ordering::Relaxed),
        backlog_max,
        scheduler_lag_max: sched.lag_max,
    })
}

async fn run_closed(args: &Args, target: Arc<Target>, loops: usize) -> Result<RunResult> {
    if loops == 0 {
        bail!("--closed must be > 0");
    }
    let pool = Arc::new(Pool::new(&target));
    let picker = Arc::new(Picker::new(&target.classes));
    let budget = Arc::new(AtomicU64::new(args.max_requests));
    let start = Instant::now();
    let measure_from = start + args.warmup;
    let end = measure_from + args.duration;
    let mut tasks = Vec::with_capacity(loops);
    for i in 0..loops {
        let (pool, picker, budget, target) =
            (pool.clone(), picker.clone(), budget.clone(), target.clone());
        let timeout = args.timeout;
        let seed = args.seed.wrapping_add(i as u64);
        tasks.push(tokio::spawn(async move {
            let mut rng = fastrand::Rng::with_seed(seed);
            let mut stats = vec![ClassStats::default(); target.classes.len()];
            loop {
                let now = Instant::now();
                if now >= end {
                    break;
                }
                let taken =
                    budget.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| b.checked_sub(1));
                if taken.is_err() {
                    break;
                }
                let class = picker.pick(&mut rng);
                let outcome = pool.send(&target.classes[class].uri, timeout).await;
                let done = Instant::now();
                if now >= measure_from {
                    let s = &mut stats[class];
                    s.sent += 1;
                    s.record(outcome, done - now);
                    if done < end && is_ok(outcome) {
                        s.ok_in_window += 1;
                    }
                }
                if matches!(outcome, Outcome::Connect) {
                    // Don't spin on a dead target.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
            (stats, Instant::now())
        }));
    }
    let mut classes = vec![ClassStats::default(); target.classes.len()];
    let mut finished = measure_from;
    for t in tasks {
        let (s, at) = t.await.context("load loop panicked")?;
        finished = finished.max(at);
        for (acc, one) in classes.iter_mut().zip(&s) {
            acc.merge(one);
        }
    }
    Ok(RunResult {
        mode: "closed",
        classes,
        window: args.duration.as_secs_f64(),
        drain: finished.saturating_duration_since(end).as_secs_f64(),
        connections_opened: pool.opened.load(Ordering::Relaxed),
        backlog_max: 0,
        scheduler_lag_max: Duration::ZERO,
    })
}

/// Nearest-rank percentile of sorted microseconds, in milliseconds.
fn pct_ms(sorted: &[u32], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    let idx = rank.clamp(1, sorted.len()) - 1;
    Some(f64::from(sorted[idx]) / 1e3)
}

fn class_json(name: &str, weight: Option<u32>, s: &mut ClassStats, window: f64) -> Value {
    s.lat_us.sort_unstable();
    let lat = &s.lat_us;
    let mean = if lat.is_empty() {
        None
    } else {
        Some(lat.iter().map(|&x| f64::from(x)).sum::<f64>() / lat.len() as f64 / 1e3)
    };
    let status: serde_json::Map<String, Value> = s
        .status
        .iter()
        .map(|(k, v)| (k.to_string(), json!(v)))
        .collect();
    let non_2xx: u64 = s
        .status
        .iter()
        .filter(|(k, _)| !(200..300).contains(*k))
        .map(|(_, v)| v)
        .sum();
    let unfinished = s.sent.saturating_sub(s.completed());
    json!({
        "name": name,
        "weight": weight,
        "sent": s.sent,
        "ok": s.ok,
        "non_2xx": non_2xx,
        "status": status,
        "s502": s.status.get(&502).copied().unwrap_or(0),
        "s503": s.status.get(&503).copied().unwrap_or(0),
        "s504": s.status.get(&504).copied().unwrap_or(0),
        "errors": {
            "connect": s.connect_errors,
            "timeout": s.timeouts,
            "io": s.io_errors,
            "unfinished": unfinished,
            "total": s.connect_errors + s.timeouts + s.io_errors + unfinished,
        },
        "throughput_ok": s.ok_in_window as f64 / window,
        "latency_ms": {
            "p50": pct_ms(lat, 50.0),
            "p90": pct_ms(lat, 90.0),
            "p99": pct_ms(lat, 99.0),
            "p999": pct_ms(lat, 99.9),
            "max": lat.last().map(|&x| f64::from(x) / 1e3),
            "mean": mean,
        },
    })
}

fn report(args: &Args, target: &Target, mut r: RunResult) -> Value {
    let mut overall = ClassStats::default();
    for c in &r.classes {
        overall.merge(c);
    }
    let classes: Vec<Value> = target
        .classes
        .iter()
        .zip(r.classes.iter_mut())
        .map(|(c, s)| class_json(&c.name, Some(c.weight), s, r.window))
        .collect();
    let overall = class_json("overall", None, &mut overall, r.window);
    json!({
        "mode": r.mode,
        "target": target.addr.to_string(),
        "rate": args.rate,
        "closed": args.closed,
        "connections": if r.mode == "open" { Some(args.connections) } else { args.closed },
        "duration_s": args.duration.as_secs_f64(),
        "warmup_s": args.warmup.as_secs_f64(),
        "window_s": r.window,
        "drain_s": r.drain,
        "arrivals": if r.mode == "open" { Some(format!("{:?}", args.arrivals).to_lowercase()) } else { None },
        "connections_opened": r.connections_opened,
        "backlog_max": r.backlog_max,
        "scheduler_lag_max_ms": r.scheduler_lag_max.as_secs_f64() * 1e3,
        "overall": overall,
        "classes": classes,
    })
}

fn fmt_ms(v: &Value) -> String {
    v.as_f64()
        .map_or_else(|| "-".to_string(), |x| format!("{x:.2}"))
}

fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or(0)
}

fn render_human(rep: &Value) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let mode = rep["mode"].as_str().unwrap_or("?");
    if mode == "open" {
        let _ = writeln!(
            out,
            "usher-load: open loop, {} req/s ({}), {}s measured, <= {} connections, target {}",
            rep["rate"],
            rep["arrivals"].as_str().unwrap_or("?"),
            rep["duration_s"],
            rep["connections"],
            rep["target"].as_str().unwrap_or("?")
        );
    } else {
        let _ = writeln!(
            out,
            "usher-load: closed loop, {} loops, {}s measured, target {}",
            rep["closed"],
            rep["duration_s"],
            rep["target"].as_str().unwrap_or("?")
        );
    }
    let _ = writeln!(
        out,
        "{:<24} {:>8} {:>8} {:>6} {:>6} {:>6} {:>6} {:>6} {:>9} {:>8} {:>8} {:>8} {:>8}",
        "class",
        "sent",
        "ok",
        "502",
        "503",
        "504",
        "o_st",
        "errs",
        "ok/s",
        "p50ms",
        "p90ms",
        "p99ms",
        "maxms"
    );
    let rows = rep["classes"]
        .as_array()
        .into_iter()
        .flatten()
        .chain(std::iter::once(&rep["overall"]));
    for c in rows {
        let other = c["non_2xx"].as_u64().unwrap_or(0)
            - c["s502"].as_u64().unwrap_or(0)
            - c["s503"].as_u64().unwrap_or(0)
            - c["s504"].as_u64().unwrap_or(0);
        let mut name = c["name"].as_str().unwrap_or("?").to_string();
        if name.len() > 24 {
            name.truncate(24);
        }
        let l = &c["latency_ms"];
        let _ = writeln!(
            out,
            "{:<24} {:>8} {:>8} {:>6} {:>6} {:>6} {:>6} {:>6} {:>9.1} {:>8} {:>8} {:>8} {:>8}",
            name,
            u(&c["sent"]),
            u(&c["ok"]),
            u(&c["s502"]),
            u(&c["s503"]),
            u(&c["s504"]),
            other,
            u(&c["errors"]["total"]),
            c["throughput_ok"].as_f64().unwrap_or(0.0),
            fmt_ms(&l["p50"]),
            fmt_ms(&l["p90"]),
            fmt_ms(&l["p99"]),
            fmt_ms(&l["max"]),
        );
    }
    let e = &rep["overall"]["errors"];
    let _ = writeln!(
        out,
        "errors: connect {} timeout {} io {} unfinished {}; connections opened {}; \
         window {:.2}s (+{:.2}s drain); ok/s counts 2xx completed inside the window",
        e["connect"],
        e["timeout"],
        e["io"],
        e["unfinished"],
        rep["connections_opened"],
        rep["window_s"].as_f64().unwrap_or(0.0),
        rep["drain_s"].as_f64().unwrap_or(0.0)
    );
    if mode == "open" {
        let _ = writeln!(
 out,
            "generator: backlog max {} (requests waiting for a connection), scheduler lag max {:.2} ms",
            rep["backlog_max"],
            rep["scheduler_lag_max_ms"].as_f64().unwrap_or(0.0)
        );
    }
    out
}

async fn run(args: Args) -> Result<()> {
    let target = Arc::new(build_target(&args).await?);
    let result = match (args.rate, args.closed) {
        (Some(rate), None) => run_open(&args, target.clone(), rate).await?,
        (None, Some(c)) => run_closed(&args, target.clone(), c).await?,
        _ => bail!("give exactly one of --rate R or --closed C"),
    };
    let rep = report(&args, &target, result);
    let text = if args.json {
        serde_json::to_string_pretty(&rep)? + "\n"
    } else {
        render_human(&rep)
    };
    use std::io::Write as _;
    let mut stdout = std::io::stdout().lock();
    match stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
}

fn main() -> std::process::ExitCode {
    match real_main() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("usher-load: error: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}

fn real_main() -> Result<()> {
    let args = Args::parse();
    let rt = if args.threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(args.threads)
            .enable_all()
            .build()?
    };
    let r = rt.block_on(run(args));
    // Don't wait for requests that are still outstanding after the drain deadline.
    rt.shutdown_background();
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10s").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("1.5").unwrap(), Duration::from_millis(1500));
        assert!(parse_duration("5x").is_err());
        assert!(parse_duration("").is_err());
    }

    #[test]
    fn percentiles() {
        let v: Vec<u32> = (1..=100).map(|x| x * 1000).collect();
        assert_eq!(pct_ms(&v, 50.0), Some(50.0));
        assert_eq!(pct_ms(&v, 99.0), Some(99.0));
        assert_eq!(pct_ms(&v, 100.0), Some(100.0));
        assert_eq!(pct_ms(&[], 50.0), None);
    }

    #[test]
    fn picker_follows_weights() {
        let uri: Uri = "/".parse().unwrap();
        let classes = vec![
            Class {
                name: "a".into(),
                weight: 90,
                uri: uri.clone(),
            },
            Class {
                name: "b".into(),
                weight: 10,
                uri: uri.clone(),
            },
            Class {
                name: "c".into(),
                weight: 0,
                uri,
            },
        ];
        let p = Picker::new(&classes);
        let mut rng = fastrand::Rng::with_seed(7);
        let mut n = [0u32; 3];
        for _ in 0..10_000 {
            n[p.pick(&mut rng)] += 1;
        }
        assert_eq!(n[2], 0);
        assert!((8700..9300).contains(&n[0]), "{n:?}");
    }

    #[tokio::test]
    async fn loopback_only() {
        assert!(resolve_loopback("127.0.0.1:80").await.is_ok());
        assert!(resolve_loopback("127.1.2.3:80").await.is_ok());
        assert!(resolve_loopback("[::1]:80").await.is_ok());
        assert!(resolve_loopback("localhost:80").await.is_ok());
        for bad in [
            "10.0.0.1:80",
            "192.168.1.1:80",
            "8.8.8.8:53",
            "example.com:80",
            "[::2]:80",
        ] {
            let e = resolve_loopback(bad).await.unwrap_err().to_string();
            assert!(e.contains("refusing non-loopback"), "{bad}: {e}");
        }
    }

    #[test]
    fn urls() {
        assert_eq!(
            split_url("http://127.0.0.1:8080/sleep?ms=1").unwrap(),
            ("127.0.0.1:8080".into(), "/sleep?ms=1".into())
        );
        assert_eq!(
            split_url("localhost:9").unwrap(),
            ("localhost:9".into(), "/".into())
        );
        assert!(split_url("https://127.0.0.1/").is_err());
    }

    /// A loopback HTTP/1.1 server that answers after `delay`; `/busy` gets 503.
    async fn slow_server(delay: Duration) -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(
                        move |req: Request<hyper::body::Incoming>| async move {
                            tokio::time::sleep(delay).await;
                            let status = if req.uri().path() == "/busy" {
                                503
                            } else {
                                200
                            };
                            let body = http_body_util::Full::new(Bytes::from_static(b"ok\n"));
                            let resp = hyper::Response::builder().status(status).body(body);
                            Ok::<_, std::convert::Infallible>(resp.unwrap())
                        },
                    );
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        addr
    }

    #[tokio::test]
    async fn open_loop_charges_the_wait_for_a_connection() {
        let addr = slow_server(Duration::from_millis(20)).await;
        let url = format!("http://{addr}/x");
        let args = Args::parse_from([
            "usher-load",
            "--rate",
            "100",
            "--duration",
            "1s",
            "--connections",
            "1",
            "--timeout",
            "5s",
            "--url",
            &url,
        ]);
        let target = Arc::new(build_target(&args).await.unwrap());
        let r = run_open(&args, target, 100.0).await.unwrap();
        let c = &r.classes[0];
        assert_eq!((c.sent, c.ok, c.completed()), (100, 100, 100));
        assert_eq!(r.connections_opened, 1);
        // One connection at 20 ms per request serves 50/s of a 100/s schedule, so
        // the last request is due at 0.99 s and answered at about 2 s.
        let (min, max) = (
            *c.lat_us.iter().min().unwrap(),
            *c.lat_us.iter().max().unwrap(),
        );
        assert!(min >= 20_000, "min {min} us");
        assert!(max >= 800_000, "max {max} us: waiting time was not charged");
        // Throughput counts what completed inside the 1 s window: about 50.
        assert!((25..=55).contains(&c.ok_in_window), "{}", c.ok_in_window);
    }

    #[tokio::test]
    async fn closed_loop_counts_statuses_per_class() {
        let addr = slow_server(Duration::from_millis(2)).await;
        let args = Args::parse_from([
            "usher-load",
            "--closed",
            "4",
            "--duration",
            "500ms",
            "--target",
            &addr.to_string(),
            "--mix",
            "3:/x,1:/busy",
        ]);
        let target = Arc::new(build_target(&args).await.unwrap());
        let r = run_closed(&args, target, 4).await.unwrap();
        let (x, busy) = (&r.classes[0], &r.classes[1]);
        assert!(x.ok > 20 && x.ok == x.sent, "{x:?}");
        assert_eq!(busy.ok, 0);
        assert_eq!(busy.status.get(&503).copied(), Some(busy.sent));
        assert!(busy.sent > 5);
        assert!(r.connections_opened <= 4);
    }
}
