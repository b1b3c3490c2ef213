//! Where in the text a configuration problem is: the line and column of a
//! YAML error, or, for a problem found after parsing, of the offending value
//! found by its key path (`upstreams.app.queue.timeout`,
//! `listeners[0].address`) in the parsed document — never by a text search,
//! which names the first line that merely mentions the same key.

use std::collections::HashMap;

use saphyr_parser::{Event, Parser};

use super::ConfigError;

/// Where each key path's value starts (line 1-based, column 1-based), and
/// where its key is.
#[derive(Debug, Default)]
pub(crate) struct Locations {
    values: HashMap<String, (usize, usize)>,
}

/// One open collection while walking the events.
enum Frame {
    /// A mapping, with the key whose value comes next (if a key was read).
    Map { path: String, key: Option<String> },
    /// A sequence and the index of its next item.
    Seq { path: String, next: usize },
}

impl Locations {
    /// Walks the YAML events of `text`. A document that does not parse gives
    /// what was found before the error (serde reports the error itself).
    pub(crate) fn new(text: &str) -> Locations {
        let mut values = HashMap::new();
        let mut stack: Vec<Frame> = Vec::new();
        // The path the next node is at, and records it.
        fn here(stack: &mut [Frame]) -> Option<String> {
            match stack.last_mut()? {
                Frame::Map { path, key } => {
                    let k = key.take()?;
                    Some(if path.is_empty() {
                        k
                    } else {
                        format!("{path}.{k}")
                    })
                }
                Frame::Seq { path, next } => {
                    let p = format!("{path}[{next}]");
                    *next += 1;
                    Some(p)
                }
            }
        }
        let mut parser = Parser::new_from_str(text);
        while let Some(Ok((event, span))) = parser.next_event() {
            let at = (span.start.line(), span.start.col() + 1);
            match event {
                Event::Scalar(value, ..) => {
                    let awaiting_key = matches!(stack.last(), Some(Frame::Map { key: None, .. }));
                    if awaiting_key {
                        if let Some(Frame::Map { key, .. }) = stack.last_mut() {
                            *key = Some(value.to_string());
                        }
                    } else if let Some(p) = here(&mut stack) {
                        values.insert(p, at);
                    }
                }
                Event::MappingStart(..) => {
                    let path = here(&mut stack).unwrap_or_default();
                    if !path.is_empty() {
                        values.insert(path.clone(), at);
                    }
                    stack.push(Frame::Map { path, key: None });
                }
                Event::SequenceStart(..) => {
                    let path = here(&mut stack).unwrap_or_default();
                    if !path.is_empty() {
                        values.insert(path.clone(), at);
                    }
                    stack.push(Frame::Seq { path, next: 0 });
                }
                Event::MappingEnd | Event::SequenceEnd => {
                    stack.pop();
                }
                Event::Alias(_) => {
                    if let Some(p) = here(&mut stack) {
                        values.insert(p, at);
                    }
                }
                _ => {}
            }
        }
        Locations { values }
    }

    /// The position of the value at `path`, or of the nearest enclosing
    /// value that is in the text (a key left to its default is not).
    pub(crate) fn find(&self, path: &str) -> Option<(usize, usize)> {
        let mut p = path;
        loop {
            if let Some(at) = self.values.get(p) {
                return Some(*at);
            }
            let cut = p.rfind(['.', '['])?;
            p = &p[..cut];
        }
    }

    /// Only `path` itself, not an enclosing value.
    pub(crate) fn exact(&self, path: &str) -> Option<(usize, usize)> {
        self.values.get(path).copied()
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;

    /// The same key names appear several times; each error points at its
    /// own value, and every error in the file is reported at once.
    const REPEATED: &str = r#"listeners:
  - { name: public, address: "127.0.0.1:0" }
routes:
  - { host: "*", path_prefix: /, upstream: app }
upstreams:
  other:
    backends: [{ address: "127.0.0.1:9001" }]
    health_check:
      interval: 2s
      timeout: 1s
    queue: { timeout: 5s }
  app:
    backends: [{ address: "127.0.0.1:9002" }]
    health_check:
      interval: 1ms
      timeout: 1s
    queue: { max_depth: 10, timeout: 0s }
"#;

    #[test]
    fn errors_name_the_line_and_column_of_their_own_value() {
        let errs = crate::config::parse(REPEATED, "t.yaml").unwrap_err();
        let find = |key: &str| {
            errs.iter()
                .find(|e| e.key == key)
                .unwrap_or_else(|| panic!("no error for {key}: {errs:?}"))
        };
        let interval = find("upstreams.app.health_check.interval");
        assert_eq!((interval.line, interval.column), (Some(15), Some(17)));
        let timeout = find("upstreams.app.queue.timeout");
        assert_eq!((timeout.line, timeout.column), (Some(17), Some(38)));
        assert_eq!(errs.len(), 2, "{errs:?}");
    }

    #[test]
    fn paths_cover_flow_and_block_styles_and_sequences() {
        let at = Locations::new(REPEATED);
        assert_eq!(at.exact("listeners[0].address"), Some((2, 30)));
        assert_eq!(at.exact("upstreams.other.queue.timeout"), Some((11, 23)));
        assert_eq!(
            at.exact("upstreams.app.backends[0].address"),
            Some((13, 27))
        );
        // A key left to its default: the enclosing section.
        assert_eq!(
            at.find("upstreams.app.outlier.base_ejection"),
            at.exact("upstreams.app")
        );
        assert_eq!(at.exact("nope"), None);
    }
}
