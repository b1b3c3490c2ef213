//! The `usher-worker` command line, as a library module so that another binary (the
//! `usher worker ...` subcommand) can run the worker role through [`main_from`].

use std::ffi::OsString;
use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use tokio::net::TcpListener;
use tracing::{error, info};

use crate::gil::Gil;
use crate::{units, App, Error, Server};

/// `usher-worker`: a threaded HTTP worker with a demo and load-test app.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "usher-worker",
    version,
    about = "A threaded HTTP worker (the waitress model): an async front reads each \
             request whole and hands it to a fixed pool of threads through a bounded \
             queue.",
    after_help = "Routes: GET /sleep?ms=N, GET /cpu?ms=N (also /sleep/NAME, /cpu/NAME: the same view under a name), POST /echo, /status/{code}, \
                  GET /healthz, GET /metrics.\nSIGTERM or SIGINT: stop accepting, finish \
                  queued and in-flight requests (bounded by --grace), exit 0."
)]
pub struct Args {
    /// Address to listen on (host:port). With port 0 the OS picks a free port; the
    /// start log line says `listening on ADDR`.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:9001")]
    pub listen: String,

    /// Handler threads. Each runs one request at a time.
    #[arg(long, value_name = "N", default_value_t = crate::server::DEFAULT_THREADS, value_parser = parse_threads)]
    pub threads: usize,

    /// Requests that may wait for a free thread. Beyond that: 503 with Retry-After: 1
    /// and `X-Usher-Refused: busy`. `--queue 0` takes a request only when a thread is
    /// free: several Ushers sharing this worker can never over-fill it (a refused
    /// request is sent elsewhere, nothing of it ran).
    #[arg(long, value_name = "M", default_value_t = crate::server::DEFAULT_QUEUE)]
    pub queue: usize,

    /// Model CPython's GIL (the time-sliced "new GIL" of Python 3.2+): every request
    /// runs under one process-wide GIL. Concurrent /cpu requests take turns every
    /// --gil-switch-interval instead of running in parallel; /sleep releases the GIL
    /// while it sleeps and waits to take it back (the convoy effect).
    #[arg(long)]
    pub gil: bool,

    /// With --gil: how long a thread waiting for the GIL lets the holder run before
    /// asking it to hand over (CPython's sys.setswitchinterval), e.g. 5ms, 100us.
    #[arg(long, value_name = "DURATION", default_value = "5ms", requires = "gil", value_parser = parse_switch_interval)]
    pub gil_switch_interval: Duration,

    /// With --gil: CPU work each request other than /cpu does holding the GIL, as a
    /// Python view would (/sleep: half before and half after its sleep), e.g. 0.5ms, 0s.
    #[arg(long, value_name = "DURATION", default_value = "0.5ms", requires = "gil", value_parser = units::parse_duration)]
    pub gil_io_cpu: Duration,

    /// With --gil: CPU work the server's own I/O thread does holding the GIL for
    /// each request, once to read it and once to write its response, as waitress's
    /// main thread does in Python (so a finished response still waits for a
    /// CPU-bound view to hand the GIL over), e.g. 0.2ms; 0s: no I/O thread.
    #[arg(long, value_name = "DURATION", default_value = "0.2ms", requires = "gil", value_parser = units::parse_duration)]
    pub gil_server_cpu: Duration,

    /// Largest request body, e.g. 10MiB, 64KiB, 1024. Larger bodies get 413.
    #[arg(long, value_name = "SIZE", default_value = "10MiB", value_parser = parse_max_body)]
    pub max_body: usize,

    /// On SIGTERM/SIGINT, how long to wait for queued and in-flight requests, e.g.
    /// 30s, 250ms, 2m.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = units::parse_duration)]
    pub grace: Duration,

    /// How long a client may take to send the request headers; also how long an idle
    /// keep-alive connection stays open. The connection is closed after it.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = units::parse_duration)]
    pub header_timeout: Duration,

    /// Longest pause allowed between two chunks of a request body. Longer gets 408.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = units::parse_duration)]
    pub body_timeout: Duration,
}

/// Runs the worker as a program: parses `args` (the first item is the program name),
/// logs to stderr, serves on its own multi-thread tokio runtime until SIGTERM or
/// SIGINT, drains, and returns the exit code (0 after a drain, 2 for bad arguments,
/// 1 for other errors).
pub fn main_from<I, T>(args: I) -> ExitCode
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let args = match Args::try_parse_from(args) {
        Ok(args) => args,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS // --help, --version
            };
        }
    };
    init_tracing();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e}");
            ExitCode::FAILURE
        }
    }
}

/// Builds a runtime and serves `args` until signalled.
pub fn run(args: Args) -> Result<(), Error> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("usher-worker-io")
        .build()
        .map_err(Error::Runtime)?;
    let result = rt.block_on(serve(args));
    // Connection tasks still running after the grace period are dropped here.
    rt.shutdown_timeout(Duration::from_secs(1));
    result
}

/// Binds `args.listen` and serves the built-in [`App`] until SIGTERM or SIGINT.
pub async fn serve(args: Args) -> Result<(), Error> {
    let listener = TcpListener::bind(&args.listen)
        .await
        .map_err(|source| Error::Bind {
            addr: args.listen.clone(),
            source,
        })?;
    let addr = listener.local_addr().map_err(Error::LocalAddr)?;
    info!(
        threads = args.threads,
        queue = args.queue,
        gil = args.gil,
        gil_switch_interval = ?args.gil_switch_interval,
        gil_io_cpu = ?args.gil_io_cpu,
        gil_server_cpu = ?args.gil_server_cpu,
        max_body = args.max_body,
        grace = ?args.grace,
        header_timeout = ?args.header_timeout,
        body_timeout = ?args.body_timeout,
        "usher-worker {} listening on {addr}",
        crate::version()
    );
    let app = if args.gil {
        App::under_gil(
            Arc::new(Gil::new(args.gil_switch_interval)),
            args.gil_io_cpu,
        )
        .with_server_cpu(args.gil_server_cpu)
    } else {
        App::new()
    };
    Server::builder()
        .threads(args.threads)
        .queue(args.queue)
        .max_body(args.max_body)
        .grace(args.grace)
        .header_read_timeout(args.header_timeout)
        .body_read_timeout(args.body_timeout)
        .serve_with_shutdown(listener, app, crate::shutdown_signal())
        .await
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // try_init: a host binary may already have installed a subscriber.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
}

fn parse_threads(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(format!(
            "expected a whole number of threads, at least 1, got {s:?}"
        )),
    }
}

/// `--gil-switch-interval`: a duration, more than zero.
fn parse_switch_interval(s: &str) -> Result<Duration, String> {
    match units::parse_duration(s)? {
        Duration::ZERO => Err("the switch interval must be more than zero".to_owned()),
        d => Ok(d),
    }
}

/// `--max-body`: a size as [`units::parse_size`] reads it, that fits in memory.
fn parse_max_body(s: &str) -> Result<usize, String> {
    let n = units::parse_size(s)?;
    usize::try_from(n).map_err(|_| format!("size `{s}` is out of range"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The units are `units.rs`'s; here only that the flags use them.
    #[test]
    fn sizes_and_durations_use_the_shared_units() {
        let a = Args::try_parse_from([
            "usher-worker",
            "--max-body",
            "2mib",
            "--grace",
            "1.5s",
            "--header-timeout",
            "250 MS",
        ])
        .unwrap();
        assert_eq!(a.max_body, 2 << 20);
        assert_eq!(a.grace, Duration::from_millis(1500));
        assert_eq!(a.header_timeout, Duration::from_millis(250));
        for bad in [["--max-body", "1.5MiB"], ["--grace", "5"]] {
            assert!(Args::try_parse_from(["usher-worker", bad[0], bad[1]]).is_err());
        }
    }

    #[test]
    fn defaults() {
        let a = Args::try_parse_from(["usher-worker"]).unwrap();
        assert_eq!((a.threads, a.queue, a.gil), (4, 64, false));
        assert_eq!(a.max_body, 10 << 20);
        assert_eq!(a.grace, Duration::from_secs(30));
        assert!(Args::try_parse_from(["usher-worker", "--threads", "0"]).is_err());
    }

    #[test]
    fn help_shows_defaults() {
        use clap::CommandFactory;
        let help = Args::command().render_long_help().to_string();
        for needle in [
            "[default: 4]",
            "[default: 64]",
            "[default: 10MiB]",
            "[default: 30s]",
            "[default: 5ms]",
            "[default: 0.5ms]",
        ] {
            assert!(help.contains(needle), "{needle} missing from:\n{help}");
        }
    }

    #[test]
    fn gil_flags() {
        let a = Args::try_parse_from(["usher-worker", "--gil"]).unwrap();
        assert_eq!(a.gil_switch_interval, Duration::from_millis(5));
        assert_eq!(a.gil_io_cpu, Duration::from_micros(500));
        let a = Args::try_parse_from([
            "usher-worker",
            "--gil",
            "--gil-switch-interval",
            "100us",
            "--gil-io-cpu",
            "0s",
        ])
        .unwrap();
        assert_eq!(a.gil_switch_interval, Duration::from_micros(100));
        assert_eq!(a.gil_io_cpu, Duration::ZERO);
        for bad in [
            &["--gil", "--gil-switch-interval", "0ms"][..],
            &["--gil", "--gil-switch-interval", "5"],
            // Meaningless without the GIL: refused rather than ignored.
            &["--gil-switch-interval", "5ms"],
            &["--gil-io-cpu", "1ms"],
        ] {
            let args = ["usher-worker"].iter().chain(bad);
            assert!(Args::try_parse_from(args).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn bad_args_exit_2() {
        assert_eq!(
            main_from(["usher-worker", "--max-body", "lots"]),
            ExitCode::from(2)
        );
    }
}
