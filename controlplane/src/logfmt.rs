//! One logfmt line per event on stdout: every transition and every action the control plane
//! takes, so `grep event=transition` reconstructs what happened to any object.

use std::fmt::Write as _;
use std::io::Write as _;

/// The current time in RFC 3339, UTC.
pub fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc().format(&time::format_description::well_known::Rfc3339).unwrap_or_default()
}

/// Writes `ts=... level=LEVEL k=v ...` on stdout. Values with spaces, quotes or `=` are quoted.
pub fn emit(level: &str, fields: &[(&str, &dyn std::fmt::Display)]) {
    let mut line = format!("ts={} level={level}", now_rfc3339());
    for (k, v) in fields {
        let v = v.to_string();
        let needs_quotes = v.is_empty() || v.chars().any(|c| c.is_whitespace() || c == '"' || c == '=');
        if needs_quotes {
            let _ = write!(line, " {k}={v:?}");
        } else {
            let _ = write!(line, " {k}={v}");
        }
    }
    line.push('\n');
    // One write per line, so lines of concurrent tasks do not interleave.
    let _ = std::io::stdout().lock().write_all(line.as_bytes());
}

/// An info-level event.
#[macro_export]
macro_rules! info {
    ($($k:literal = $v:expr),* $(,)?) => {
        $crate::logfmt::emit("info", &[$(($k, &$v as &dyn std::fmt::Display)),*])
    };
}

/// A warn-level event.
#[macro_export]
macro_rules! warn {
    ($($k:literal = $v:expr),* $(,)?) => {
        $crate::logfmt::emit("warn", &[$(($k, &$v as &dyn std::fmt::Display)),*])
    };
}

#[cfg(test)]
mod tests {
    #[test]
    fn quotes_only_when_needed() {
        // Smoke test: must not panic on odd values.
        super::emit("info", &[("a", &"plain"), ("b", &"two words"), ("c", &"")]);
    }
}
