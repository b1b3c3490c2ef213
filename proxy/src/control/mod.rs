//! The control plane: the hot state and how it is rebuilt (two-phase:
//! build without touching anything live, swap, then commit), reloads, and
//! the admin API.

pub mod admin;
pub mod reload;
pub mod state;
pub mod status_page;
pub mod summary;

use std::path::Path;

use crate::config::{self, Config, ConfigError, Source};

/// Loads and checks a configuration the way `usher check`, startup and
/// reload all do: the schema, then what it names outside itself.
pub fn load(source: &Source) -> Result<Config, Vec<ConfigError>> {
    source.load_checked(check)
}

/// [`load`] for the text of the file at `path` (already read).
pub fn load_text(text: &str, path: &Path) -> Result<Config, Vec<ConfigError>> {
    config::parse_checked(text, &path.display().to_string(), check)
}

/// [`load`] for a file path.
pub fn load_file(path: &Path) -> Result<Config, Vec<ConfigError>> {
    config::load_file_checked(path, check)
}

/// The checks beyond the schema: the certificate files load, and every
/// fleet command's program exists and is executable.
fn check(c: &Config) -> Vec<config::Problem> {
    let mut problems = crate::tls::check_config(c);
    problems.extend(crate::discovery::fleet::check_commands(c));
    problems
}
