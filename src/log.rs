//! Logs: logfmt lines on stderr, one per operation, so PostgreSQL's log and any log
//! pipeline can parse them (`ts=... level=info op=wal-push file=... outcome=stored`).
//!
//! Hand-written rather than through a logging framework: wal-rs emits a handful of lines
//! per process with fixed keys, and each line goes out in a single `write` so lines from
//! concurrent archive_command processes never interleave.

use std::fmt::{self, Write as _};
use std::io::Write;
use std::str::FromStr;
use std::sync::atomic::{AtomicU8, Ordering};

/// Severity, in increasing verbosity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    /// The operation failed.
    Error = 0,
    /// Something an operator should look at.
    Warn = 1,
    /// One line per operation.
    Info = 2,
    /// Details of each step.
    Debug = 3,
}

impl FromStr for Level {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "error" => Ok(Level::Error),
            "warn" | "warning" => Ok(Level::Warn),
            "info" => Ok(Level::Info),
            "debug" => Ok(Level::Debug),
            _ => Err(format!("unknown log level {s:?}: use error, warn, info or debug")),
        }
    }
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Level::Error => "error",
            Level::Warn => "warn",
            Level::Info => "info",
            Level::Debug => "debug",
        })
    }
}

static MAX_LEVEL: AtomicU8 = AtomicU8::new(Level::Info as u8);

/// Sets the most verbose level that is written.
pub fn set_level(level: Level) {
    MAX_LEVEL.store(level as u8, Ordering::Relaxed);
}

/// Whether lines at `level` are written.
pub fn enabled(level: Level) -> bool {
    level as u8 <= MAX_LEVEL.load(Ordering::Relaxed)
}

/// Writes one logfmt line with a timestamp, the level, and `fields` in order.
pub fn emit(level: Level, fields: &[(&str, &dyn fmt::Display)]) {
    if !enabled(level) {
        return;
    }
    let line = format_line(level, fields);
    // Logging must never fail an operation.
    let _ = std::io::stderr().lock().write_all(line.as_bytes());
}

fn format_line(level: Level, fields: &[(&str, &dyn fmt::Display)]) -> String {
    let now = time::OffsetDateTime::now_utc();
    let ts =
        now.format(&time::format_description::well_known::Rfc3339).unwrap_or_else(|_| now.unix_timestamp().to_string());
    let mut line = format!("ts={ts} level={level}");
    for (key, value) in fields {
        let value = value.to_string();
        line.push(' ');
        line.push_str(key);
        line.push('=');
        push_value(&mut line, &value);
    }
    line.push('\n');
    line
}

/// Characters written as `\u{..}`: every control character (C0, DEL, C1 such as U+0085,
/// which some log readers take as a line break) and the Unicode line and paragraph
/// separators, so that text from a store or a file name can never start a forged line.
fn escaped(c: char) -> bool {
    c.is_control() || c == '\u{2028}' || c == '\u{2029}'
}

/// Quotes a value when logfmt needs it, escaping quotes, backslashes and line breaks.
fn push_value(line: &mut String, value: &str) {
    let needs_quotes =
        value.is_empty() || value.chars().any(|c| c == ' ' || c == '"' || c == '=' || c == '\\' || escaped(c));
    if !needs_quotes {
        line.push_str(value);
        return;
    }
    line.push('"');
    for c in value.chars() {
        match c {
            '"' => line.push_str("\\\""),
            '\\' => line.push_str("\\\\"),
            '\n' => line.push_str("\\n"),
            '\r' => line.push_str("\\r"),
            '\t' => line.push_str("\\t"),
            c if escaped(c) => {
                let _ = write!(line, "\\u{{{:x}}}", c as u32);
            }
            c => line.push(c),
        }
    }
    line.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_quoted_only_when_needed() {
        let line =
            format_line(Level::Info, &[("op", &"wal-push"), ("error", &"bad \"x\"=1\nnext"), ("n", &42), ("e", &"")]);
        assert!(line.starts_with("ts="));
        assert!(line.ends_with(" level=info op=wal-push error=\"bad \\\"x\\\"=1\\nnext\" n=42 e=\"\"\n"), "{line}");
        assert_eq!(line.matches('\n').count(), 1);
    }

    #[test]
    fn no_line_break_of_any_kind_gets_through_raw() {
        // DEL, C1 controls and the Unicode separators are not below ' ', and went out raw.
        for forged in ["a\u{85}level=error", "a\u{2028}level=error", "a\u{2029}x", "a\u{7f}b", "a\u{9b}b"] {
            let line = format_line(Level::Info, &[("e", &forged)]);
            let body = &line[..line.len() - 1];
            assert!(!body.chars().any(escaped), "{line:?}");
            assert!(body.ends_with("e=\"a\\u{") || body.contains("e=\"a\\u{"), "{line:?}");
        }
    }

    #[test]
    fn levels_parse_and_filter() {
        assert_eq!("WARN".parse::<Level>().unwrap(), Level::Warn);
        assert!("loud".parse::<Level>().is_err());
        assert!(Level::Error < Level::Debug);
    }
}
