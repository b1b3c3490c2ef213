//! The `usher-worker` binary. Everything lives in [`usher_worker::cli`].

fn main() -> std::process::ExitCode {
    usher_worker::cli::main_from(std::env::args_os())
}
