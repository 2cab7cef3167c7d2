//! The recovery settings a restored data directory needs (PostgreSQL 12+):
//! `restore_command` and the targets in `postgresql.auto.conf`, and `recovery.signal` or
//! `standby.signal`.

use std::fmt::Write as _;

/// Where a recovery should stop, and what then.
#[derive(Debug, Clone, Default)]
pub struct RecoveryTargets {
    /// `recovery_target_time`.
    pub time: Option<String>,
    /// `recovery_target_lsn`.
    pub lsn: Option<String>,
    /// `recovery_target_xid`.
    pub xid: Option<String>,
    /// `recovery_target_name`.
    pub name: Option<String>,
    /// `recovery_target = 'immediate'`.
    pub immediate: bool,
    /// `recovery_target_action`.
    pub action: Option<String>,
    /// `recovery_target_timeline`.
    pub timeline: Option<String>,
}

/// Quotes a value for postgresql.conf.
pub fn quote(value: &str) -> String {
    format!("'{}'", value.replace('\\', "\\\\").replace('\'', "''"))
}

/// The lines to append to `postgresql.auto.conf`.
pub fn settings(restore_command: &str, targets: &RecoveryTargets) -> String {
    let mut out = String::from("\n# Added by wal-rs backup-fetch\n");
    let _ = writeln!(out, "restore_command = {}", quote(restore_command));
    let pairs = [
        ("recovery_target_time", &targets.time),
        ("recovery_target_lsn", &targets.lsn),
        ("recovery_target_xid", &targets.xid),
        ("recovery_target_name", &targets.name),
        ("recovery_target_action", &targets.action),
        ("recovery_target_timeline", &targets.timeline),
    ];
    if targets.immediate {
        let _ = writeln!(out, "recovery_target = 'immediate'");
    }
    for (key, value) in pairs {
        if let Some(v) = value {
            let _ = writeln!(out, "{key} = {}", quote(v));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_are_quoted() {
        let t = RecoveryTargets {
            time: Some("2026-11-26 10:00:00+00".into()),
            action: Some("promote".into()),
            ..Default::default()
        };
        let s = settings("/usr/bin/wal-rs --set store='x' wal-fetch %f %p", &t);
        assert!(s.contains("restore_command = '/usr/bin/wal-rs --set store=''x'' wal-fetch %f %p'"), "{s}");
        assert!(s.contains("recovery_target_time = '2026-11-26 10:00:00+00'"));
        assert!(s.contains("recovery_target_action = 'promote'"));
        assert!(!s.contains("recovery_target_lsn"));
    }
}
