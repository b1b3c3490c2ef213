//! Where in the text a configuration problem is: the line and column of a
//! YAML error, or a best-effort line for a problem found after parsing.

use super::ConfigError;

/// A serde_yaml error as a [`ConfigError`]: its position, and the key path
/// serde_yaml puts before the message (`upstreams.app.queue: ...`).
pub(super) fn yaml_error(e: serde_yaml::Error, file: &str) -> ConfigError {
    let loc = e.location();
    let mut message = e.to_string();
    // serde_yaml appends " at line L column C"; we print the location ourselves.
    if let Some(i) = message.rfind(" at line ") {
        message.truncate(i);
    }
    let (key, message) = match message.split_once(": ") {
        Some((k, m)) if !k.contains(' ') => (k.to_string(), m.to_string()),
        _ => (String::new(), message),
    };
    ConfigError {
        file: file.to_string(),
        line: loc.as_ref().map(|l| l.line()),
        column: loc.as_ref().map(|l| l.column()),
        key,
        message,
    }
}

/// Finds the first line (1-based) whose text, comments left out, contains
/// all of `needles`. Best effort, for errors found after parsing.
pub(super) fn find_line(text: &str, needles: &[&str]) -> Option<usize> {
    text.lines()
        .position(|l| {
            let l = l.split('#').next().unwrap_or("");
            needles.iter().all(|n| l.contains(n))
        })
        .map(|i| i + 1)
}
