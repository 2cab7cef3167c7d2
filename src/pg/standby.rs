//! Whether the server running restore_command is a standby: then a failed wal-fetch answers
//! "not now, ask again" (exit 1), otherwise it aborts the recovery (exit above 125).
//!
//! Timeline history files included, though a standby being promoted asks for them (with
//! `standby.signal` still in place) to number its new timeline: exiting above 125 there
//! would stop every standby that looks for a newer timeline while the store is down, and
//! standbys serve reads. A timeline numbered without the archive's history files shows when
//! the new primary pushes a name already archived with other content: wal-push refuses to
//! overwrite it (see docs/exit-codes.md).

use std::path::Path;

/// Whether the current directory (the data directory, when PostgreSQL runs
/// restore_command) says this server is a standby: `standby.signal` (PostgreSQL 12 and
/// later), or `recovery.conf` with `standby_mode = on` (10 and 11, which have no signal
/// file: without this their standbys would stop at the first store outage).
pub fn signalled() -> bool {
    Path::new("standby.signal").exists()
        || std::fs::read_to_string("recovery.conf").is_ok_and(|text| recovery_conf_says_standby(&text))
}

/// The last `standby_mode` setting in a recovery.conf's text, as PostgreSQL's boolean
/// parser reads it (on, true, yes, 1, and their prefixes it accepts).
fn recovery_conf_says_standby(text: &str) -> bool {
    let mut standby = false;
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("");
        let Some((key, value)) = line.split_once('=') else { continue };
        if key.trim() != "standby_mode" {
            continue;
        }
        let value = value.trim().trim_matches('\'').trim().to_ascii_lowercase();
        standby = matches!(value.as_str(), "on" | "true" | "yes" | "1" | "t" | "y" | "tr" | "tru" | "ye");
    }
    standby
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_recovery_conf_standby_is_read_as_postgresql_reads_it() {
        assert!(recovery_conf_says_standby("standby_mode = 'on'\nrestore_command = 'x'\n"));
        assert!(recovery_conf_says_standby("standby_mode=true # a standby\n"));
        assert!(!recovery_conf_says_standby("# standby_mode = on\nrestore_command = 'x'\n"));
        assert!(!recovery_conf_says_standby("standby_mode = on\nstandby_mode = 'off'\n"));
        assert!(!recovery_conf_says_standby("restore_command = 'wal-rs wal-fetch %f %p'\n"));
    }
}
