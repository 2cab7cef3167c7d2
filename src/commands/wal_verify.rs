//! `wal-rs wal-verify [--json] [--pg-url URL]`: is the archive complete enough to recover?
//!
//! Walks `wal_005/` from the oldest backup's start segment (the oldest segment when there is
//! no backup) to the newest segment, or to the newest backup's finish if that is later,
//! along the path of timelines that leads to the newest one (read from its `.history`
//! file): each segment number is looked for under the timeline a recovery following that
//! path would read it from. Every missing stretch is reported per timeline, with the gap
//! records under `walrs/gaps/`, and for each backup whether recovery from it to the newest
//! WAL is possible. Exit 12 when it is impossible from some backup (or, with no backup,
//! when any segment on the walk is missing).
//!
//! With `--pg-url` or libpq's environment (`PGHOST`, `PGPORT`...), it also asks the cluster
//! which timeline it is on: a store holding a newer timeline than the cluster's means
//! another primary (a promoted copy) archives into the same prefix. Exit 5 then. A server
//! that cannot be reached is an error with `--pg-url`, and only a warning when the
//! environment alone points at it (the archive is still worth checking).

use std::collections::HashSet;

use serde::Serialize;

use super::common::open_store;
use crate::backup::catalog::BackupInfo;
use crate::config::Config;
use crate::error::Error;
use crate::retention::inventory;
use crate::retention::plan::{backup_timeline, wal_name_of, Inventory};
use crate::retention::timelines::{segment_of, segno, TimelinePath};
use crate::wal::{Lsn, SegmentId, TimelineId, WalFileName};

/// A stretch of missing segments on one timeline.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(super) struct MissingRange {
    /// The timeline whose files are missing.
    pub timeline: u32,
    /// First missing WAL file.
    pub first: String,
    /// Last missing WAL file.
    pub last: String,
    /// How many segments.
    pub segments: u64,
}

/// Whether recovery from one backup to the newest WAL is possible.
#[derive(Debug, Clone, Serialize)]
pub(super) struct BackupVerdict {
    /// The backup.
    pub name: String,
    /// Its timeline.
    pub timeline: Option<u32>,
    /// Whether it recovers to the newest WAL.
    pub recoverable: bool,
    /// Why not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// What wal-verify found.
#[derive(Debug, Clone, Serialize)]
pub(super) struct Report {
    /// The store.
    pub store: String,
    /// WAL segment size used.
    pub segment_size: u32,
    /// The newest timeline in the store.
    pub newest_timeline: Option<u32>,
    /// The timelines leading to it, oldest first.
    pub timeline_path: Vec<u32>,
    /// First WAL file of the walk.
    pub from: Option<String>,
    /// Last WAL file of the walk.
    pub to: Option<String>,
    /// Segments looked for.
    pub segments_checked: u64,
    /// Missing stretches, oldest first.
    pub missing: Vec<MissingRange>,
    /// History files the path needs that are not in the store.
    pub missing_history: Vec<String>,
    /// Gap records (WAL acknowledged without being archived).
    pub gaps: Vec<String>,
    /// Per backup, oldest first.
    pub backups: Vec<BackupVerdict>,
    /// The connected cluster's timeline, when one was asked.
    pub cluster_timeline: Option<u32>,
    /// The store holds a newer timeline than the connected cluster's.
    pub store_ahead_of_cluster: bool,
    /// Recovery from every backup (or along the whole walk) to the newest WAL is possible.
    pub recoverable: bool,
}

pub(super) async fn run(config: &Config, as_json: bool, pg_url: Option<&str>) -> Result<Report, Error> {
    let store = open_store(config).await?;
    let inv = inventory::read(&store).await?;
    let mut report = verify(&inv);
    report.store = store.url();
    let ask_cluster = pg_url.is_some()
        || ["PGHOST", "PGPORT", "PGDATABASE", "PGSERVICE"].iter().any(|v| std::env::var_os(v).is_some());
    if ask_cluster {
        match cluster_timeline(pg_url).await {
            Ok(tli) => {
                report.cluster_timeline = Some(tli);
                report.store_ahead_of_cluster = report.newest_timeline.is_some_and(|n| n > tli);
            }
            // Asked for explicitly: a failure is the answer.
            Err(e) if pg_url.is_some() => return Err(e),
            // Only libpq's environment: the archive is worth checking with the server down.
            Err(e) => crate::log::emit(
                crate::log::Level::Warn,
                &[("op", &"wal-verify"), ("cluster_check", &"skipped"), ("error", &e)],
            ),
        }
    }
    if as_json {
        println!("{}", serde_json::to_string_pretty(&report).expect("json"));
    } else {
        print_text(&report);
    }
    if !report.recoverable {
        let what = match (report.missing.first(), report.missing_history.first()) {
            (Some(m), _) => format!("{} segment(s) missing, first {}..{}", total_missing(&report), m.first, m.last),
            (None, Some(h)) => format!("{h} is missing"),
            (None, None) => "a backup is not on the newest timeline's path".to_string(),
        };
        let failing = report.backups.iter().filter(|b| !b.recoverable).count();
        let whom = if report.backups.is_empty() {
            "across the archive (there is no backup)".to_string()
        } else {
            format!("from {failing} of {} backups", report.backups.len())
        };
        return Err(Error::NotFound(format!(
            "recovery to the newest WAL in {} is impossible {whom}: {what}: take a new base backup (wal-rs backup-push)",
            report.store
        )));
    }
    if report.store_ahead_of_cluster {
        return Err(Error::AlreadyExists(format!(
            "{} holds timeline {} but the connected cluster is on timeline {}: another primary archives into this prefix; give each cluster its own",
            report.store,
            report.newest_timeline.unwrap_or(0),
            report.cluster_timeline.unwrap_or(0)
        )));
    }
    Ok(report)
}

/// The timeline the cluster is on, from its last checkpoint.
async fn cluster_timeline(pg_url: Option<&str>) -> Result<u32, Error> {
    let client = crate::pg::conn::connect(pg_url).await?;
    let row = client.query_one("SELECT timeline_id FROM pg_control_checkpoint()", &[]).await.map_err(|e| {
        Error::Config(format!("asking the cluster its timeline failed: {}", crate::pg::conn::one_line(&e)))
    })?;
    Ok(row.get::<_, i32>(0) as u32)
}

fn total_missing(r: &Report) -> u64 {
    r.missing.iter().map(|m| m.segments).sum()
}

fn name(tli: TimelineId, n: u64, seg_size: u32) -> String {
    WalFileName::Segment(tli, segment_of(n, seg_size)).to_string()
}

fn start_segno(b: &BackupInfo, seg_size: u32) -> u64 {
    segno(SegmentId::containing(Lsn(b.sentinel.start_lsn), seg_size), seg_size)
}

/// The walk, with no I/O.
pub(super) fn verify(inv: &Inventory) -> Report {
    let seg = inv.segment_size;
    let mut present: HashSet<(TimelineId, u64)> = HashSet::new();
    let mut timelines: Vec<TimelineId> = Vec::new();
    let mut history_files: HashSet<TimelineId> = HashSet::new();
    let mut gaps = Vec::new();
    for o in &inv.objects {
        if let Some(file) = o.key.as_str().strip_prefix(crate::layout::GAP_PREFIX) {
            gaps.push(file.trim_end_matches(".json").to_string());
            continue;
        }
        match wal_name_of(o.key.as_str()) {
            Some(WalFileName::Segment(t, s)) => {
                present.insert((t, segno(s, seg)));
                timelines.push(t);
            }
            Some(WalFileName::History(t)) => {
                history_files.insert(t);
                timelines.push(t);
            }
            _ => {}
        }
    }
    let mut report = Report {
        store: String::new(),
        segment_size: seg,
        newest_timeline: None,
        timeline_path: Vec::new(),
        from: None,
        to: None,
        segments_checked: 0,
        missing: Vec::new(),
        missing_history: Vec::new(),
        gaps,
        backups: Vec::new(),
        cluster_timeline: None,
        store_ahead_of_cluster: false,
        recoverable: true,
    };
    let Some(newest) = timelines.iter().max().copied() else {
        // No WAL at all: every backup lacks its WAL.
        for b in &inv.backups {
            report.backups.push(BackupVerdict {
                name: b.name.clone(),
                timeline: backup_timeline(b).map(|t| t.0),
                recoverable: false,
                reason: Some("the store holds no WAL".into()),
            });
        }
        report.recoverable = inv.backups.is_empty();
        return report;
    };
    report.newest_timeline = Some(newest.0);
    let history = match inv.histories.get(&newest) {
        Some(h) => h.clone(),
        None => {
            if newest.0 > 1 && !history_files.contains(&newest) {
                report.missing_history.push(WalFileName::History(newest).to_string());
            }
            Vec::new()
        }
    };
    let path = TimelinePath::new(newest, history);
    report.timeline_path = path.timelines().iter().map(|t| t.0).collect();
    let stretches = path.stretches(seg);
    let on_path = |&(t, n): &(TimelineId, u64)| path.timeline_of(n, seg) == t;

    let last_present = present.iter().filter(|p| on_path(p)).map(|&(_, n)| n).max();
    let last_needed = inv
        .backups
        .iter()
        .map(|b| segno(SegmentId::containing(Lsn(b.sentinel.finish_lsn.max(b.sentinel.start_lsn)), seg), seg))
        .max();
    let first = match inv.backups.iter().map(|b| start_segno(b, seg)).min() {
        Some(f) => Some(f),
        None => present.iter().filter(|p| on_path(p)).map(|&(_, n)| n).min(),
    };
    let end = last_present.max(last_needed);
    let mut missing_segnos: Vec<u64> = Vec::new();
    if let (Some(first), Some(end)) = (first, end) {
        report.from = Some(name(path.timeline_of(first, seg), first, seg));
        report.to = Some(name(path.timeline_of(end, seg), end, seg));
        for s in &stretches {
            let lo = s.first.max(first);
            let hi = s.last.unwrap_or(end).min(end);
            if lo > hi {
                continue;
            }
            let mut run: Option<(u64, u64)> = None;
            for n in lo..=hi {
                report.segments_checked += 1;
                if present.contains(&(s.tli, n)) {
                    if let Some((a, b)) = run.take() {
                        report.missing.push(range(s.tli, a, b, seg));
                    }
                } else {
                    missing_segnos.push(n);
                    run = Some(run.map_or((n, n), |(a, _)| (a, n)));
                }
            }
            if let Some((a, b)) = run {
                report.missing.push(range(s.tli, a, b, seg));
            }
        }
    }

    for b in &inv.backups {
        let tli = backup_timeline(b);
        let start = start_segno(b, seg);
        let reason = if let Some(h) = report.missing_history.first() {
            Some(format!("{h} is missing"))
        } else if !tli.is_some_and(|t| path.passes(t, Lsn(b.sentinel.start_lsn))) {
            Some(format!(
                "its timeline {} is not on the path to timeline {newest} at its start",
                tli.map(|t| t.to_string()).unwrap_or_else(|| "?".into())
            ))
        } else {
            missing_segnos
                .iter()
                .find(|&&n| n >= start)
                .map(|&n| format!("{} is missing", name(path.timeline_of(n, seg), n, seg)))
        };
        report.backups.push(BackupVerdict {
            name: b.name.clone(),
            timeline: tli.map(|t| t.0),
            recoverable: reason.is_none(),
            reason,
        });
    }
    // Every missing segment lies after the oldest backup's start, so it fails that backup.
    report.recoverable =
        report.missing.is_empty() && report.missing_history.is_empty() && report.backups.iter().all(|b| b.recoverable);
    report
}

fn range(tli: TimelineId, a: u64, b: u64, seg: u32) -> MissingRange {
    MissingRange { timeline: tli.0, first: name(tli, a, seg), last: name(tli, b, seg), segments: b - a + 1 }
}

fn print_text(r: &Report) {
    let path: Vec<String> = r.timeline_path.iter().map(u32::to_string).collect();
    println!(
        "store {}: timelines {} (newest {}), segment size {}",
        r.store,
        path.join(" -> "),
        r.newest_timeline.map(|t| t.to_string()).unwrap_or_else(|| "none".into()),
        r.segment_size
    );
    match (&r.from, &r.to) {
        (Some(f), Some(t)) => println!("walked {f} .. {t}: {} segments", r.segments_checked),
        _ => println!("no WAL to walk"),
    }
    for m in &r.missing {
        println!("missing on timeline {}: {} .. {} ({} segments)", m.timeline, m.first, m.last, m.segments);
    }
    for h in &r.missing_history {
        println!("missing history file: {h}");
    }
    for g in &r.gaps {
        println!("gap record: {g} was acknowledged without being archived");
    }
    for b in &r.backups {
        match &b.reason {
            None => println!("backup {}: recovers to the newest WAL", b.name),
            Some(why) => println!("backup {}: CANNOT recover to the newest WAL: {why}", b.name),
        }
    }
    if let Some(t) = r.cluster_timeline {
        let note = if r.store_ahead_of_cluster { ": the store is on a NEWER timeline" } else { "" };
        println!("connected cluster on timeline {t}{note}");
    }
    println!("{}", if r.recoverable { "ok" } else { "NOT recoverable" });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::retention::timelines::{parse_history, Histories};
    use crate::store::{ObjectKey, ObjectMeta};

    const SEG: u32 = 16 << 20;

    fn obj(key: &str) -> ObjectMeta {
        ObjectMeta { key: ObjectKey::new(key).unwrap(), size: 1, metadata: Default::default(), modified: None }
    }

    fn seg_key(tli: u32, n: u64) -> String {
        format!("wal_005/{}.lz4", name(TimelineId(tli), n, SEG))
    }

    fn backup(tli: u32, start: u64, finish: u64, when: &str) -> BackupInfo {
        let mut s: crate::backup::sentinel::Sentinel = serde_json::from_str(r#"{"LSN":1}"#).unwrap();
        s.start_lsn = start * SEG as u64 + 0x28;
        s.finish_lsn = finish * SEG as u64 + 0x100;
        s.finish_time = when.into();
        s.timeline = Some(tli);
        BackupInfo { name: format!("base_{}", name(TimelineId(tli), start, SEG)), sentinel: s }
    }

    /// Timeline 1 segments 2..=6 (6 written by the old primary after the switch), the
    /// switch to timeline 2 at 0/5000000, timeline 2 from 5 to 9.
    fn inv() -> Inventory {
        let mut objects: Vec<ObjectMeta> = (2..=6).map(|n| obj(&seg_key(1, n))).collect();
        objects.extend((5..=9).map(|n| obj(&seg_key(2, n))));
        objects.push(obj("wal_005/00000002.history.lz4"));
        objects.push(obj("wal_005/000000010000000000000005.partial.lz4"));
        let mut histories = Histories::new();
        histories.insert(TimelineId(2), parse_history("1\t0/5000000\tpromoted\n").unwrap());
        let backups = vec![backup(1, 2, 2, "2026-11-20T00:00:00Z"), backup(2, 7, 7, "2026-11-21T00:00:00Z")];
        Inventory { objects, backups, histories, segment_size: SEG }
    }

    #[test]
    fn a_complete_archive_across_a_switch_verifies() {
        let r = verify(&inv());
        assert_eq!(r.timeline_path, [1, 2]);
        assert_eq!(r.from.as_deref(), Some("000000010000000000000002"));
        assert_eq!(r.to.as_deref(), Some("000000020000000000000009"));
        assert_eq!(r.segments_checked, 8);
        assert!(r.missing.is_empty() && r.recoverable, "{r:#?}");
    }

    #[test]
    fn a_missing_segment_is_named_and_fails_the_backups_before_it() {
        let mut i = inv();
        i.objects.retain(|o| o.key.as_str() != seg_key(2, 6) && o.key.as_str() != seg_key(1, 3));
        let r = verify(&i);
        assert_eq!(
            r.missing,
            [
                MissingRange {
                    timeline: 1,
                    first: "000000010000000000000003".into(),
                    last: "000000010000000000000003".into(),
                    segments: 1
                },
                MissingRange {
                    timeline: 2,
                    first: "000000020000000000000006".into(),
                    last: "000000020000000000000006".into(),
                    segments: 1
                },
            ]
        );
        assert!(!r.recoverable);
        assert!(!r.backups[0].recoverable);
        assert!(r.backups[1].recoverable, "the timeline-2 backup starts after both holes");
    }

    #[test]
    fn a_missing_history_file_or_a_stray_branch_is_reported() {
        let mut i = inv();
        i.objects.retain(|o| !o.key.as_str().contains("history"));
        i.histories.clear();
        let r = verify(&i);
        assert_eq!(r.missing_history, ["00000002.history"]);
        assert!(!r.recoverable);
        // A backup on timeline 1 after the switch point is on another branch.
        let mut i = inv();
        i.backups.push(backup(1, 6, 6, "2026-11-22T00:00:00Z"));
        let r = verify(&i);
        assert!(!r.backups[2].recoverable, "{r:#?}");
        assert!(!r.recoverable);
    }

    #[test]
    fn wal_missing_at_the_end_of_the_newest_backup_counts() {
        let mut i = inv();
        i.backups[1].sentinel.finish_lsn = 11 * SEG as u64;
        let r = verify(&i);
        assert_eq!(r.missing.last().unwrap().first, "00000002000000000000000A");
        assert_eq!(r.missing.last().unwrap().segments, 2);
        assert!(!r.recoverable);
    }
}
