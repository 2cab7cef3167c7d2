//! `wal-rs delete retain N | before NAME|TIME | everything [FORCE] | garbage [--confirm]
//! [--json]`: retention. A dry run by default: it prints what would go, by kind, with
//! counts and bytes; `--confirm` deletes it.
//!
//! The decision is [`crate::retention::plan`]'s. This module reads the store, prints, and
//! deletes in phases, each finished before the next starts (one S3 DeleteObjects batch has
//! no order): sentinels first, so an interrupted delete never leaves a half-deleted backup
//! listed as complete; then the rest of those backups and unfinished ones; then WAL; then
//! history files and gap records, which describe the WAL.

use std::time::SystemTime;

use serde_json::json;

use super::common::open_store;
use crate::config::Config;
use crate::error::Error;
use crate::layout;
use crate::retention::{self, inventory, Kind, Plan, PlanError, Policy, Request};

/// What a delete did, for the log line.
pub(super) struct Outcome {
    /// The request, as typed.
    pub mode: String,
    /// Objects deleted (or that would be, in a dry run).
    pub objects: usize,
    /// Their bytes.
    pub bytes: u64,
    /// Whether anything was deleted.
    pub confirmed: bool,
}

/// Parses the words after `delete`.
pub(super) fn parse_request(words: &[String]) -> Result<Request, Error> {
    let usage = |why: &str| {
        Error::Usage(format!(
            "delete {}: {why}: expected `retain N`, `before NAME`, `before TIME` (RFC 3339), `everything [FORCE]` or `garbage`",
            words.join(" ")
        ))
    };
    let w: Vec<&str> = words.iter().map(String::as_str).collect();
    match w.as_slice() {
        ["retain", n] => match n.parse::<usize>() {
            Ok(n) if n >= 1 => Ok(Request::Retain(n)),
            _ => Err(usage("N must be a whole number of at least 1 (`delete everything` deletes all)")),
        },
        ["before", target] if target.starts_with("base_") => Ok(Request::BeforeName(target.to_string())),
        ["before", target] => crate::backup::sentinel::parse_time(target)
            .map(Request::BeforeTime)
            .ok_or_else(|| usage("not a backup name (base_...) nor an RFC 3339 time such as 2026-11-26T10:00:00Z")),
        ["everything"] => Ok(Request::Everything { force: false }),
        ["everything", "FORCE"] => Ok(Request::Everything { force: true }),
        ["garbage"] => Ok(Request::Garbage),
        _ => Err(usage("unknown request")),
    }
}

pub(super) async fn run(config: &Config, words: &[String], confirm: bool, as_json: bool) -> Result<Outcome, Error> {
    let request = parse_request(words)?;
    let store = open_store(config).await?;
    let inv = inventory::read(&store).await?;
    let policy = Policy { now: SystemTime::now(), garbage_min_age: config.retention.garbage_min_age };
    let plan = retention::plan(&inv, &request, &policy).map_err(|e| match e {
        PlanError::NoSuchBackup(_) => Error::NotFound(e.to_string()),
        PlanError::UnknownSegmentSize => Error::Config(format!("nothing deleted in {}: {e}", store.url())),
    })?;
    let forced_note = matches!(request, Request::Everything { force: false }) && !plan.permanent_backups.is_empty();
    if as_json {
        print_json(&plan, confirm);
    } else {
        print_table(&plan, confirm, forced_note);
    }
    let totals = plan.totals();
    let outcome = Outcome {
        mode: words.join(" "),
        objects: plan.delete.len(),
        bytes: totals.values().map(|(_, b)| b).sum(),
        confirmed: confirm,
    };
    if confirm {
        for phase in phases(&plan) {
            store.delete_many(&phase).await?;
        }
    }
    if request == Request::Garbage {
        // Killed writers' temporary files are garbage too (never listed as objects).
        let (files, bytes) = store.sweep_abandoned(policy.garbage_min_age, confirm).await?;
        if files > 0 && !as_json {
            println!(
                "{} {files} abandoned temporary files ({bytes} bytes) of killed writers",
                if confirm { "deleted" } else { "would delete" }
            );
        }
    }
    Ok(outcome)
}

/// The plan's keys in deletion phases, each in the plan's order.
fn phases(plan: &Plan) -> Vec<Vec<crate::store::ObjectKey>> {
    let phase_of = |d: &retention::plan::Doomed| match d.kind {
        Kind::Backup if layout::backup_name_of_sentinel(&d.key).is_some() => 0,
        Kind::Backup | Kind::Garbage => 1,
        Kind::Wal => 2,
        Kind::History | Kind::Gap => 3,
    };
    let mut out = vec![Vec::new(); 4];
    for d in &plan.delete {
        if let Ok(k) = crate::store::ObjectKey::new(&d.key) {
            out[phase_of(d)].push(k);
        }
    }
    out.retain(|p| !p.is_empty());
    out
}

fn kind_name(k: Kind) -> &'static str {
    match k {
        Kind::Backup => "backup",
        Kind::Garbage => "garbage",
        Kind::Wal => "wal",
        Kind::History => "history",
        Kind::Gap => "gap",
    }
}

fn print_table(plan: &Plan, confirm: bool, forced_note: bool) {
    let totals = plan.totals();
    println!("{:<10} {:>10} {:>16}", "kind", "objects", "bytes");
    for (kind, (n, bytes)) in &totals {
        println!("{:<10} {:>10} {:>16}", kind_name(*kind), n, bytes);
    }
    let (n, bytes) = totals.values().fold((0, 0), |(a, b), (n, s)| (a + n, b + s));
    println!("{:<10} {:>10} {:>16}", "total", n, bytes);
    let list = |v: &[String]| if v.is_empty() { "none".to_string() } else { v.join(", ") };
    println!("backups deleted: {}", list(&plan.deleted_backups));
    println!("backups kept: {}", list(&plan.kept_backups));
    for k in &plan.kept_against_request {
        println!("kept although the request would delete it: {}: {}", k.name, k.reason);
    }
    if !plan.permanent_backups.is_empty() {
        println!("permanent (kept with their WAL): {}", list(&plan.permanent_backups));
    }
    if forced_note {
        println!("permanent backups stay: `delete everything FORCE` deletes them too");
    }
    if !plan.in_progress.is_empty() {
        println!("unfinished, written to recently (left alone with their WAL): {}", list(&plan.in_progress));
    }
    if let Some(lsn) = &plan.wal_kept_from {
        println!("WAL kept from {lsn} on every timeline");
    }
    for w in &plan.wal_kept_on_path {
        println!("WAL kept from {} on timeline {}, on the newest timeline's path", w.from, w.timeline);
    }
    if !confirm {
        println!("dry run: nothing was deleted; run again with --confirm to delete these {n} objects");
    }
}

fn print_json(plan: &Plan, confirm: bool) {
    let totals: serde_json::Map<String, serde_json::Value> = plan
        .totals()
        .iter()
        .map(|(k, (n, b))| (kind_name(*k).to_string(), json!({ "objects": n, "bytes": b })))
        .collect();
    let v = json!({
        "dry_run": !confirm,
        "totals": totals,
        "deleted_backups": plan.deleted_backups,
        "kept_backups": plan.kept_backups,
        "permanent_backups": plan.permanent_backups,
        "in_progress": plan.in_progress,
        "wal_kept_from": plan.wal_kept_from,
        "kept_against_request": plan.kept_against_request,
        "wal_kept_on_path": plan.wal_kept_on_path,
        "objects": plan.delete,
    });
    println!("{}", serde_json::to_string_pretty(&v).expect("json"));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(s: &str) -> Vec<String> {
        s.split(' ').map(str::to_string).collect()
    }

    #[test]
    fn requests_parse_as_walg_spells_them() {
        assert_eq!(parse_request(&words("retain 2")).unwrap(), Request::Retain(2));
        assert_eq!(parse_request(&words("everything FORCE")).unwrap(), Request::Everything { force: true });
        assert_eq!(parse_request(&words("everything")).unwrap(), Request::Everything { force: false });
        assert_eq!(parse_request(&words("garbage")).unwrap(), Request::Garbage);
        assert!(matches!(parse_request(&words("before base_000000010000000000000002")), Ok(Request::BeforeName(_))));
        assert!(matches!(parse_request(&words("before 2026-11-26T10:00:00Z")), Ok(Request::BeforeTime(_))));
        for bad in ["retain 0", "retain x", "before yesterday", "everything force", "all", "garbage now"] {
            let e = parse_request(&words(bad)).unwrap_err();
            assert!(matches!(e, Error::Usage(_)) && e.to_string().contains("expected `retain N`"), "{bad}: {e}");
        }
    }
}
