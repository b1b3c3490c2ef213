//! `usher`: run the proxy, check a config, or run as a fleet worker.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// mimalloc: the request path allocates many small, short-lived buffers
/// (header maps, bodies); glibc malloc spent ~8% of the proxy's CPU on them.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
use usher::Source;

#[derive(Parser)]
#[command(
    name = "usher",
    version,
    about = "A buffered edge proxy with capacity-aware dispatch for threaded worker backends"
)]
struct Cli {
    /// Configuration file. Default: the embedded config/usher.yaml.
    #[arg(short = 'c', long = "config", global = true)]
    config: Option<PathBuf>,
    /// Log filter for stderr logs (tracing env-filter syntax); RUST_LOG also works.
    #[arg(long, default_value = "info", global = true)]
    log_level: String,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Validate a configuration and exit (non-zero on errors), like `nginx -t`.
    /// With no file, checks `-c FILE` or the embedded default.
    Check {
        /// The file to check (same as `-c FILE`).
        file: Option<PathBuf>,
    },
    /// Ask the running Usher (through its admin listener, read from the
    /// config) to reload its configuration; prints the result and exits
    /// non-zero when the new file is rejected, like `nginx -s reload`.
    Reload {
        /// The running Usher's config file (same as `-c FILE`).
        file: Option<PathBuf>,
    },
    /// Run the built-in threaded worker (what `fleet: command: [usher-worker, ...]` starts).
    #[command(hide = true, disable_help_flag = true)]
    Worker {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Run a fleet command so that it dies with Usher (set by the fleet:
    /// the parent-death signal, then exec).
    #[command(hide = true, disable_help_flag = true)]
    Spawn {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let source = |file: Option<PathBuf>| match file.or_else(|| cli.config.clone()) {
        Some(p) => Source::File(p),
        None => Source::Embedded,
    };
    match cli.command {
        Some(Command::Worker { args }) => {
            usher::watch_parent();
            let argv = std::iter::once("usher-worker".to_string()).chain(args);
            usher_worker::cli::main_from(argv)
        }
        Some(Command::Spawn { args }) => usher::exec_child(args),
        Some(Command::Check { file }) => check(&source(file)),
        Some(Command::Reload { file }) => reload(&source(file)),
        None => run(source(None), &cli.log_level),
    }
}

fn print_errors(source: &Source, errors: &[usher::ConfigError]) {
    for e in errors {
        eprintln!("usher: error: {e}");
    }
    eprintln!(
        "usher: configuration {} has {} error(s)",
        source.name(),
        errors.len()
    );
}

fn check(source: &Source) -> ExitCode {
    match usher::load(source) {
        Ok(_) => {
            match source {
                Source::Embedded => println!(
                    "usher: no file given (`usher check FILE` or `-c FILE`); the embedded default configuration is valid"
                ),
                Source::File(_) => println!("usher: configuration {} is valid", source.name()),
            }
            ExitCode::SUCCESS
        }
        Err(errors) => {
            print_errors(source, &errors);
            ExitCode::from(1)
        }
    }
}

/// `usher reload`: POST /reload to the admin listener named by the config.
fn reload(source: &Source) -> ExitCode {
    let config = match usher::load(source) {
        Ok(c) => c,
        Err(errors) => {
            print_errors(source, &errors);
            return ExitCode::from(1);
        }
    };
    let Some(admin) = config.admin.as_ref() else {
        eprintln!(
            "usher: {} has no `admin:` listener, so there is nothing to send the reload to; use `kill -HUP <pid>`",
            source.name()
        );
        return ExitCode::from(1);
    };
    match usher::request_reload(&admin.address) {
        Ok((true, text)) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Ok((false, text)) => {
            eprint!("{text}");
            ExitCode::from(1)
        }
        Err(e) => {
            eprintln!(
                "usher: cannot reach the admin listener at {}: {e}",
                admin.address
            );
            ExitCode::from(1)
        }
    }
}

fn run(source: Source, log_level: &str) -> ExitCode {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(log_level));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let config = match usher::load(&source) {
        Ok(c) => c,
        Err(errors) => {
            for e in &errors {
                eprintln!("usher: error: {e}");
            }
            return ExitCode::from(1);
        }
    };
    let path = match &source {
        Source::File(p) => Some(p.clone()),
        Source::Embedded => None,
    };
    let threads = usher::Threads::of(&config);
    let mut builder = if threads.per_core {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(threads.workers);
        b
    };
    let result = builder
        .enable_all()
        .thread_name("usher")
        .build()
        .map_err(anyhow::Error::from)
        .and_then(|rt| {
            rt.block_on(usher::run(config, path))
                .map_err(anyhow::Error::from)
        });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("usher: {e:#}");
            ExitCode::from(1)
        }
    }
}
