//! `wal-rs wal-verify [--json] [--pg-url URL]`: is the archive complete enough to recover?
//!
//! Walks `wal_005/` from the start segment of the oldest non-permanent backup (with none,
//! of the newest permanent one; with no backup, from the oldest segment) to the newest
//! segment, or to the newest backup's finish if that is later, along the path of timelines
//! that leads to the newest one (read from its `.history` file): each segment number is
//! looked for under the timeline a recovery following that path would read it from. A
//! permanent backup older than that start is checked only for its own WAL, start to finish
//! on its timeline: retention deletes the WAL after it by design. Only whole segments
//! count, not `.partial` or `.backup` files.
//!
//! Every history file from the lowest backup timeline + 1 to the newest timeline must be
//! in the store: PostgreSQL finds the newest timeline by probing those in turn and stops at
//! the first one missing. Every missing stretch is reported per timeline, with the missing
//! history files and the gap records under `walrs/gaps/`, and for each backup whether
//! recovery from it to the newest WAL is possible (for an older permanent one: to its
//! consistency point). A backup on a timeline the path left before it finished is not on
//! the path, and only backups on the path set where the walk ends. A WAL-G delta backup
//! whose chain (`DeltaFrom`... down to its full backup) is not all in the store cannot be
//! restored: it is reported so and takes no part in the walk. A segment stored only in a
//! compression wal-rs cannot read (`.br`, `.lzma`, `.lzo`, `.gz`) counts as missing. Exit 12
//! when recovery is impossible from some backup, or when there is WAL but no complete
//! backup; exit 7 when the store holds neither WAL nor a backup (an empty or wrong
//! location, or a file system not mounted), as wal-fetch does for a missing archive.
//!
//! With `--pg-url` or libpq's environment (`PGHOST`, `PGPORT`...), it also asks the cluster
//! which timeline it is on: a store holding a newer timeline than the cluster's means
//! another primary (a promoted copy) archives into the same prefix. Exit 5 then. A server
//! that cannot be reached is an error with `--pg-url`, and only a warning when the
//! environment alone points at it (the archive is still worth checking).

use std::collections::{HashMap, HashSet};

use serde::Serialize;

use super::common::open_store;
use crate::backup::catalog::BackupInfo;
use crate::codec::Compression;
use crate::config::Config;
use crate::error::Error;
use crate::retention::inventory;
use crate::retention::plan::{backup_timeline, delta_bases, is_on_path, wal_name_of, Inventory, PlanError};
use crate::retention::timelines::{segment_of, segno, TimelinePath};
use crate::store::StoreError;
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
    /// Whether it recovers to the newest WAL (with `own_wal_only`: to its consistency point).
    pub recoverable: bool,
    /// Why not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// A permanent backup older than the WAL retention keeps: only the WAL from its start to
    /// its finish was checked (it recovers to its consistency point, not to the newest WAL).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub own_wal_only: bool,
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
    /// Gap records (WAL acknowledged without being archived) of segments not in the store
    /// in a form wal-fetch reads.
    pub gaps: Vec<String>,
    /// Objects of segments counted as missing because they are stored only in a
    /// compression wal-rs cannot read (wal-fetch exits 10 on them).
    pub unreadable: Vec<String>,
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
    if holds_nothing(&inv) {
        return Err(nothing_archived(&store.url()));
    }
    let mut report = verify(&inv, segment_size(&inv, &store.url())?);
    report.store = store.url();
    let ask_cluster = pg_url.is_some()
        || ["PGHOST", "PGPORT", "PGDATABASE", "PGSERVICE"].iter().any(|v| std::env::var_os(v).is_some());
    if ask_cluster {
        match cluster_timeline(pg_url).await {
            Ok(Some(tli)) => {
                report.cluster_timeline = Some(tli);
                report.store_ahead_of_cluster = report.newest_timeline.is_some_and(|n| n > tli);
            }
            // A standby, or a copy still recovering, may trail the archive's newest timeline
            // by design: it follows it.
            Ok(None) => crate::log::emit(
                crate::log::Level::Info,
                &[("op", &"wal-verify"), ("cluster_check", &"skipped"), ("reason", &"the cluster is in recovery")],
            ),
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
        return Err(Error::NotFound(why_not_recoverable(&report)));
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

/// Whether the store holds no WAL file and no complete backup: then it is not an archive
/// at all (an empty or wrong location, a file system not mounted), not a whole one.
fn holds_nothing(inv: &Inventory) -> bool {
    inv.backups.is_empty() && !inv.objects.iter().any(|o| wal_name_of(o.key.as_str()).is_some())
}

/// The error for a location with nothing archived: a storage failure, as wal-fetch's
/// [`crate::store::Store::confirm_absent`] reports it, since a recovery cannot use it.
fn nothing_archived(store: &str) -> Error {
    Error::Store(StoreError::Unavailable {
        op: "list",
        key: format!("{store}/{}/", crate::layout::WAL_DIR),
        detail: format!(
            "{store} holds no WAL file and no complete backup: nothing was ever archived there, or it is not the archive (a wrong bucket or prefix, a file system not mounted); check WALRS_STORE and the mount"
        ),
    })
}

/// The one-line error of a report that is not recoverable.
fn why_not_recoverable(report: &Report) -> String {
    if report.backups.is_empty() {
        return format!(
            "{} holds WAL but no complete backup: there is nothing to recover from; take a base backup (wal-rs backup-push)",
            report.store
        );
    }
    let failing: Vec<&BackupVerdict> = report.backups.iter().filter(|b| !b.recoverable).collect();
    let what = match (report.missing.first(), report.missing_history.first(), failing.first()) {
        (Some(m), _, _) => format!("{} segment(s) missing, first {}..{}", total_missing(report), m.first, m.last),
        (None, Some(h), _) => format!("{h} is missing"),
        (None, None, Some(b)) => format!("{}: {}", b.name, b.reason.as_deref().unwrap_or("not recoverable")),
        (None, None, None) => "the archive is incomplete".to_string(),
    };
    format!(
        "recovery to the newest WAL in {} is impossible from {} of {} backups: {what}: take a new base backup (wal-rs backup-push)",
        report.store,
        failing.len(),
        report.backups.len()
    )
}

/// The segment size to walk with. Unknown, it is an error (the store holds something to
/// walk, see [`holds_nothing`]): segment numbers, hence which segments are missing, depend on
/// it.
fn segment_size(inv: &Inventory, store: &str) -> Result<u32, Error> {
    inv.segment_size.ok_or_else(|| Error::Config(format!("{store}: {}", PlanError::UnknownSegmentSize)))
}

/// The timeline a primary writes WAL on, from the name of the file it writes into; `None`
/// for a server in recovery. Not `pg_control_checkpoint()`: after a promotion that keeps
/// the old timeline until the next checkpoint, which PostgreSQL spreads out, while the new
/// timeline's history file is archived at once; the check would blame a second primary.
async fn cluster_timeline(pg_url: Option<&str>) -> Result<Option<u32>, Error> {
    let client = crate::pg::conn::connect(pg_url).await?;
    let failed = |detail: String| Error::Config(format!("asking the cluster its timeline failed: {detail}"));
    let row = client
        .query_one(
            "SELECT CASE WHEN pg_is_in_recovery() THEN NULL \
             ELSE substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8) END",
            &[],
        )
        .await
        .map_err(|e| failed(crate::pg::conn::one_line(&e)))?;
    let Some(hex) = row.get::<_, Option<String>>(0) else { return Ok(None) };
    u32::from_str_radix(&hex, 16).map(Some).map_err(|_| failed(format!("unexpected WAL file name prefix {hex:?}")))
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

/// The segment holding a backup's finish LSN (its start's when the sentinel has none).
fn finish_segno(b: &BackupInfo, seg_size: u32) -> u64 {
    segno(SegmentId::containing(Lsn(b.sentinel.finish_lsn.max(b.sentinel.start_lsn)), seg_size), seg_size)
}

/// Segments `lo..=hi` of one timeline, looked for as one stretch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Span {
    tli: TimelineId,
    lo: u64,
    hi: u64,
}

/// What the listing holds, by name.
struct Listing {
    /// Segments present in a form wal-fetch restores, by timeline and segment number.
    present: HashSet<(TimelineId, u64)>,
    /// Segments stored only in a compression wal-rs cannot read: their keys.
    unreadable: HashMap<(TimelineId, u64), String>,
    /// Timelines whose `.history` file is present.
    history_files: HashSet<TimelineId>,
    /// The newest timeline of any WAL file.
    newest: Option<TimelineId>,
    /// Gap records, by WAL file name, of segments not in the store.
    gaps: Vec<String>,
}

impl Listing {
    fn of(inv: &Inventory, seg: u32) -> Listing {
        let mut out = Listing {
            present: HashSet::new(),
            unreadable: HashMap::new(),
            history_files: HashSet::new(),
            newest: None,
            gaps: Vec::new(),
        };
        for o in &inv.objects {
            if let Some(file) = o.key.as_str().strip_prefix(crate::layout::GAP_PREFIX) {
                out.gaps.push(file.trim_end_matches(".json").to_string());
                continue;
            }
            // Only whole segments count: a `.partial` or `.backup` file is not the segment.
            let tli = match wal_name_of(o.key.as_str()) {
                Some(WalFileName::Segment(t, s)) => {
                    if restorable_by_walrs(o.key.file_name()) {
                        out.present.insert((t, segno(s, seg)));
                    } else {
                        out.unreadable.insert((t, segno(s, seg)), o.key.to_string());
                    }
                    t
                }
                Some(WalFileName::History(t)) => {
                    out.history_files.insert(t);
                    t
                }
                _ => continue,
            };
            out.newest = out.newest.max(Some(tli));
        }
        // A history file read but listed under another compression counts as present.
        out.history_files.extend(inv.histories.keys().copied());
        // The same segment also stored in a form wal-fetch reads is not unreadable.
        out.unreadable.retain(|k, _| !out.present.contains(k));
        // A gap record whose segment is in the store is no gap: the valve dropped a segment
        // an archive daemon was uploading at that moment, and the upload completed.
        out.gaps.retain(|g| match WalFileName::parse(g) {
            Ok(WalFileName::Segment(t, s)) => !out.present.contains(&(t, segno(s, seg))),
            _ => true,
        });
        out
    }

    /// Why segment `n` of `tli`, not present, fails a recovery.
    fn missing_reason(&self, tli: TimelineId, n: u64, seg: u32) -> String {
        match self.unreadable.get(&(tli, n)) {
            Some(key) => format!("{} is stored only as {key}, in a compression wal-rs cannot read", name(tli, n, seg)),
            None => format!("{} is missing", name(tli, n, seg)),
        }
    }
}

/// Whether wal-fetch can restore a WAL object of this file name: no extension (stored as
/// is) or one of wal-rs's compressions.
fn restorable_by_walrs(file_name: &str) -> bool {
    file_name.split_once('.').is_none_or(|(_, ext)| Compression::from_extension(ext).is_some())
}

/// Why a WAL-G delta backup cannot be restored, if it is one that cannot: a backup of its
/// chain is not in the store (or its sentinel names none).
fn broken_delta(inv: &Inventory, b: &BackupInfo) -> Option<String> {
    if !inv.deltas.contains_key(&b.name) {
        return None;
    }
    let bases = delta_bases(&inv.deltas, &b.name);
    if bases.is_empty() {
        return Some("it is a WAL-G delta backup whose sentinel names no base backup".into());
    }
    bases.into_iter().find(|base| !inv.backups.iter().any(|o| o.name == *base)).map(|base| {
        format!("it is a WAL-G delta backup and {base}, which it builds on, is not in the store: it cannot be restored")
    })
}

/// The walk, with no I/O.
///
/// WAL is walked continuously from the oldest non-permanent backup's start (with none, the
/// newest permanent one's; with no backup, the oldest segment), which is where retention
/// keeps it from. A permanent backup older than that is checked only for the WAL from its
/// start to its finish: retention deletes the WAL after it by design, so a gap there is
/// no problem and a walk from it would report years of deleted segments.
pub(super) fn verify(inv: &Inventory, seg: u32) -> Report {
    let listing = Listing::of(inv, seg);
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
        gaps: listing.gaps.clone(),
        unreadable: Vec::new(),
        backups: Vec::new(),
        cluster_timeline: None,
        store_ahead_of_cluster: false,
        recoverable: true,
    };
    let Some(newest) = listing.newest else {
        // No WAL at all: every backup lacks its WAL.
        for b in &inv.backups {
            report.backups.push(BackupVerdict {
                name: b.name.clone(),
                timeline: backup_timeline(b).map(|t| t.0),
                recoverable: false,
                reason: Some("the store holds no WAL".into()),
                own_wal_only: false,
            });
        }
        report.recoverable = false;
        return report;
    };
    report.newest_timeline = Some(newest.0);
    // A delta backup whose chain is not all there restores nothing: it takes no part in
    // the walk, and fails on its own.
    let broken: HashMap<&str, String> =
        inv.backups.iter().filter_map(|b| broken_delta(inv, b).map(|why| (b.name.as_str(), why))).collect();
    let counted: Vec<&BackupInfo> = inv.backups.iter().filter(|b| !broken.contains_key(b.name.as_str())).collect();
    let missing_history = missing_history_files(&counted, &listing.history_files, newest);
    report.missing_history = missing_history.iter().map(|&t| WalFileName::History(t).to_string()).collect();
    let path = TimelinePath::from_histories(&inv.histories, newest);
    report.timeline_path = path.timelines().iter().map(|t| t.0).collect();
    let on_path = |&&(t, n): &&(TimelineId, u64)| path.timeline_of(n, seg) == t;

    let walk_from = match walk_start(&counted, seg) {
        Some(f) => Some(f),
        None => listing.present.iter().filter(on_path).map(|&(_, n)| n).min(),
    };
    let walked = |b: &BackupInfo| walk_from.is_some_and(|f| start_segno(b, seg) >= f);
    let last_present = listing.present.iter().filter(on_path).map(|&(_, n)| n).max();
    // Only a backup the path replays says where the walk must reach: another branch's
    // finish is a position on that branch, not on this path.
    let last_needed = counted.iter().filter(|b| walked(b) && is_on_path(&path, b)).map(|b| finish_segno(b, seg)).max();
    let end = last_present.max(last_needed);

    let mut spans = Vec::new();
    let mut walk = Vec::new();
    if let (Some(first), Some(end)) = (walk_from, end) {
        report.from = Some(name(path.timeline_of(first, seg), first, seg));
        report.to = Some(name(path.timeline_of(end, seg), end, seg));
        walk = walk_spans(&path, seg, first, end);
        spans.extend(walk.iter().copied());
    }
    spans.extend(counted.iter().filter(|b| !walked(b)).filter_map(|b| own_span(b, seg)));
    let mut missing = Vec::new();
    for span in merge(spans) {
        report.segments_checked += span.hi - span.lo + 1;
        missing.extend(missing_in(&listing.present, span));
    }
    missing.sort_by_key(|m| (m.lo, m.tli));
    report.missing = missing.iter().map(|m| range(m.tli, m.lo, m.hi, seg)).collect();
    report.unreadable = missing
        .iter()
        .flat_map(|m| (m.lo..=m.hi).filter_map(|n| listing.unreadable.get(&(m.tli, n)).cloned()))
        .collect();

    for b in &inv.backups {
        let tli = backup_timeline(b);
        let history_reason = missing_history
            .iter()
            .find(|&&t| t == newest || tli.is_none_or(|b_tli| t > b_tli))
            .map(|&t| format!("{} is missing", WalFileName::History(t)));
        let own_wal_only = !walked(b);
        let reason = broken.get(b.name.as_str()).cloned().or(history_reason).or_else(|| {
            if own_wal_only {
                own_wal_problem(b, tli, &listing, &missing, seg)
            } else {
                walk_problem(b, &path, &listing, &walk, &missing, seg)
            }
        });
        report.backups.push(BackupVerdict {
            name: b.name.clone(),
            timeline: tli.map(|t| t.0),
            recoverable: reason.is_none(),
            reason,
            own_wal_only,
        });
    }
    // Every missing segment lies on some backup's WAL (or, with no backup, on the walk);
    // WAL with no complete backup recovers nothing.
    report.recoverable = !report.backups.is_empty()
        && report.missing.is_empty()
        && report.missing_history.is_empty()
        && report.backups.iter().all(|b| b.recoverable);
    report
}

/// The history files a recovery to the newest timeline needs that are not in the store.
///
/// Restored from a backup on timeline T, PostgreSQL looks for the newest timeline
/// (`findNewestTimeLine`) by probing T+1, T+2... and stops at the first history file
/// missing: every one from the lowest backup timeline + 1 up to the newest must be there,
/// or recovery stops on an older timeline and a promotion reuses a timeline ID. The newest
/// timeline's is needed besides to know the path the walk follows.
fn missing_history_files(
    backups: &[&BackupInfo],
    present: &HashSet<TimelineId>,
    newest: TimelineId,
) -> Vec<TimelineId> {
    let lowest_backup = backups.iter().filter_map(|b| backup_timeline(b)).min().unwrap_or(newest);
    let from = lowest_backup.0.min(newest.0.saturating_sub(1)) + 1;
    // Timeline 1 has no history file.
    (from.max(2)..=newest.0).map(TimelineId).filter(|t| !present.contains(t)).collect()
}

/// Where the continuous walk starts: the oldest non-permanent backup's start segment, or
/// with none the newest permanent one's (retention's rule, `retention::plan`).
fn walk_start(backups: &[&BackupInfo], seg: u32) -> Option<u64> {
    let oldest_ordinary = backups.iter().filter(|b| !b.sentinel.is_permanent).map(|b| start_segno(b, seg)).min();
    oldest_ordinary.or_else(|| backups.iter().rev().find(|b| b.sentinel.is_permanent).map(|b| start_segno(b, seg)))
}

/// The walk from `first` to `end` along `path`, one span per timeline stretch.
fn walk_spans(path: &TimelinePath, seg: u32, first: u64, end: u64) -> Vec<Span> {
    path.stretches_from(first, seg)
        .iter()
        .map(|s| Span { tli: s.tli, lo: s.first, hi: s.last.unwrap_or(end).min(end) })
        .filter(|s| s.lo <= s.hi)
        .collect()
}

/// A backup's own WAL, from its start segment to its finish segment on its timeline.
fn own_span(b: &BackupInfo, seg: u32) -> Option<Span> {
    Some(Span { tli: backup_timeline(b)?, lo: start_segno(b, seg), hi: finish_segno(b, seg) })
}

/// The spans, overlapping ones of a timeline merged, so no segment is looked for twice.
fn merge(mut spans: Vec<Span>) -> Vec<Span> {
    spans.sort_by_key(|s| (s.tli, s.lo));
    let mut out: Vec<Span> = Vec::new();
    for s in spans {
        match out.last_mut() {
            Some(last) if last.tli == s.tli && s.lo <= last.hi.saturating_add(1) => last.hi = last.hi.max(s.hi),
            _ => out.push(s),
        }
    }
    out
}

/// The missing stretches of `span`, oldest first.
fn missing_in(present: &HashSet<(TimelineId, u64)>, span: Span) -> Vec<Span> {
    let mut out = Vec::new();
    let mut run: Option<Span> = None;
    for n in span.lo..=span.hi {
        if present.contains(&(span.tli, n)) {
            out.extend(run.take());
        } else {
            run = Some(run.map_or(Span { tli: span.tli, lo: n, hi: n }, |r| Span { hi: n, ..r }));
        }
    }
    out.extend(run);
    out
}

/// The oldest missing segment of `tli` in `lo..=hi`, if any.
fn first_missing(missing: &[Span], tli: TimelineId, lo: u64, hi: u64) -> Option<u64> {
    missing.iter().filter(|m| m.tli == tli && m.lo <= hi && m.hi >= lo).map(|m| m.lo.max(lo)).min()
}

/// Why recovery from `b` to the newest WAL is impossible, if it is.
fn walk_problem(
    b: &BackupInfo,
    path: &TimelinePath,
    listing: &Listing,
    walk: &[Span],
    missing: &[Span],
    seg: u32,
) -> Option<String> {
    if !is_on_path(path, b) {
        return Some(format!(
            "its timeline {} is not on the path to timeline {} from its start to its finish",
            backup_timeline(b).map(|t| t.to_string()).unwrap_or_else(|| "?".into()),
            path.tip
        ));
    }
    let start = start_segno(b, seg);
    walk.iter()
        .find_map(|s| first_missing(missing, s.tli, s.lo.max(start), s.hi).map(|n| (s.tli, n)))
        .map(|(t, n)| listing.missing_reason(t, n, seg))
}

/// Why a permanent backup older than the walk cannot be made consistent, if it cannot.
fn own_wal_problem(
    b: &BackupInfo,
    tli: Option<TimelineId>,
    listing: &Listing,
    missing: &[Span],
    seg: u32,
) -> Option<String> {
    let Some(tli) = tli else {
        return Some("its timeline is unknown: its name is not base_<WAL file>".into());
    };
    first_missing(missing, tli, start_segno(b, seg), finish_segno(b, seg))
        .map(|n| format!("{}: the backup cannot be made consistent", listing.missing_reason(tli, n, seg)))
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
    for key in &r.unreadable {
        println!("unreadable: {key} is in a compression wal-rs cannot read (wal-fetch exits 10): counted as missing");
    }
    if r.backups.is_empty() && r.newest_timeline.is_some() {
        println!("no complete backup: there is nothing to recover from");
    }
    for b in &r.backups {
        match (&b.reason, b.own_wal_only) {
            (None, false) => println!("backup {}: recovers to the newest WAL", b.name),
            (None, true) => {
                println!("backup {}: permanent, its WAL to its finish is whole (the WAL after it is not kept)", b.name)
            }
            (Some(why), false) => println!("backup {}: CANNOT recover to the newest WAL: {why}", b.name),
            (Some(why), true) => println!("backup {}: permanent, CANNOT be made consistent: {why}", b.name),
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
        Inventory { objects, backups, deltas: Default::default(), histories, segment_size: Some(SEG) }
    }

    #[test]
    fn a_gap_record_of_a_stored_segment_is_not_reported() {
        let mut i = inv();
        for g in [name(TimelineId(2), 8, SEG), name(TimelineId(2), 10, SEG)] {
            i.objects.push(obj(&format!("{}{g}.json", crate::layout::GAP_PREFIX)));
        }
        let r = verify(&i, SEG);
        assert_eq!(r.gaps, [name(TimelineId(2), 10, SEG)], "{r:#?}");
    }

    #[test]
    fn a_complete_archive_across_a_switch_verifies() {
        let r = verify(&inv(), SEG);
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
        let r = verify(&i, SEG);
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
        let r = verify(&i, SEG);
        assert_eq!(r.missing_history, ["00000002.history"]);
        assert!(!r.recoverable);
        // A backup on timeline 1 after the switch point is on another branch.
        let mut i = inv();
        i.backups.push(backup(1, 6, 6, "2026-11-22T00:00:00Z"));
        let r = verify(&i, SEG);
        assert!(!r.backups[2].recoverable, "{r:#?}");
        assert!(!r.recoverable);
    }

    #[test]
    fn every_history_file_recovery_probes_is_needed() {
        // Timeline 3 forked from 1 and is gone; timeline 4 forked from 2 at 0/A000000 and is
        // the newest. Restored from the timeline-2 backup, PostgreSQL probes 00000003.history
        // before 00000004.history: without it recovery stays on timeline 2.
        let mut i = inv();
        i.objects.extend((10..=11).map(|n| obj(&seg_key(4, n))));
        i.objects.push(obj("wal_005/00000004.history.lz4"));
        i.histories.insert(TimelineId(4), parse_history("1\t0/5000000\ta\n2\t0/A000000\tb\n").unwrap());
        let r = verify(&i, SEG);
        assert_eq!(r.timeline_path, [1, 2, 4]);
        assert!(r.missing.is_empty(), "{r:#?}");
        assert_eq!(r.missing_history, ["00000003.history"]);
        assert_eq!(r.backups[1].reason.as_deref(), Some("00000003.history is missing"));
        assert!(!r.recoverable);
        // With it, both backups recover to timeline 4.
        i.objects.push(obj("wal_005/00000003.history.lz4"));
        let r = verify(&i, SEG);
        assert!(r.missing_history.is_empty() && r.recoverable, "{r:#?}");
        // A backup on timeline 4 alone does not probe timeline 3.
        let mut only_newest = i.clone();
        only_newest.objects.retain(|o| !o.key.as_str().contains("00000003.history"));
        only_newest.backups = vec![backup(4, 10, 10, "2026-11-22T00:00:00Z")];
        let r = verify(&only_newest, SEG);
        assert!(r.missing_history.is_empty() && r.recoverable, "{r:#?}");
    }

    #[test]
    fn an_old_permanent_backup_needs_only_its_own_wal() {
        // Retention kept segment 2 for the permanent backup and 10.. for the newest one.
        let mut objects: Vec<ObjectMeta> = [2, 10, 11, 12].iter().map(|&n| obj(&seg_key(1, n))).collect();
        objects.push(obj("wal_005/000000010000000000000003.00000028.backup.lz4"));
        let mut permanent = backup(1, 2, 2, "2026-11-20T00:00:00Z");
        permanent.sentinel.is_permanent = true;
        let backups = vec![permanent, backup(1, 10, 10, "2026-11-21T00:00:00Z")];
        let mut i = Inventory {
            objects,
            backups,
            deltas: Default::default(),
            histories: Histories::new(),
            segment_size: Some(SEG),
        };
        let r = verify(&i, SEG);
        assert!(r.recoverable && r.missing.is_empty(), "{r:#?}");
        assert_eq!(r.from.as_deref(), Some("00000001000000000000000A"));
        assert_eq!(r.segments_checked, 4, "segment 2, then 10..=12");
        assert!(r.backups[0].own_wal_only && !r.backups[1].own_wal_only);
        // Its own segment lost: that backup cannot be made consistent.
        i.objects.retain(|o| o.key.as_str() != seg_key(1, 2));
        let r = verify(&i, SEG);
        assert_eq!(r.missing.len(), 1, "{r:#?}");
        assert_eq!(r.missing[0].first, "000000010000000000000002");
        assert!(!r.backups[0].recoverable && r.backups[1].recoverable);
        assert!(!r.recoverable);
        // With only permanent backups the walk starts at the newest one's start.
        i.backups[1].sentinel.is_permanent = true;
        let r = verify(&i, SEG);
        assert_eq!(r.from.as_deref(), Some("00000001000000000000000A"));
        assert!(!r.backups[1].own_wal_only && r.backups[1].recoverable, "{r:#?}");
    }

    #[test]
    fn a_backup_that_finished_after_the_switch_is_not_on_the_path() {
        // Started on timeline 1 at segment 3, before the switch at 0/5000000, finished at
        // segment 6: its backup-end record is on the abandoned part of timeline 1.
        let mut i = inv();
        i.backups.push(backup(1, 3, 6, "2026-11-22T00:00:00Z"));
        let r = verify(&i, SEG);
        assert!(r.missing.is_empty(), "{r:#?}");
        assert!(!r.backups[2].recoverable, "{r:#?}");
        assert!(r.backups[2].reason.as_deref().unwrap().contains("not on the path"));
        assert!(!r.recoverable);
    }

    #[test]
    fn wal_missing_at_the_end_of_the_newest_backup_counts() {
        let mut i = inv();
        i.backups[1].sentinel.finish_lsn = 11 * SEG as u64;
        let r = verify(&i, SEG);
        assert_eq!(r.missing.last().unwrap().first, "00000002000000000000000A");
        assert_eq!(r.missing.last().unwrap().segments, 2);
        assert!(!r.recoverable);
    }

    /// Store s1 of the review: backups on timeline 2 at 0x28, 0x50 and 0x60; timeline 3
    /// branched from timeline 2 at 0/30800000 (a recovery of the first backup) and archived
    /// 0x30..=0x3F. Timeline 2 went on to 0x6F before the branch was made.
    fn pitr_inv() -> Inventory {
        let mut objects: Vec<ObjectMeta> = (0x10..=0x1F).map(|n| obj(&seg_key(1, n))).collect();
        objects.extend((0x20..=0x6F).map(|n| obj(&seg_key(2, n))));
        objects.extend((0x30..=0x3F).map(|n| obj(&seg_key(3, n))));
        objects.push(obj("wal_005/00000002.history"));
        objects.push(obj("wal_005/00000003.history"));
        let mut histories = Histories::new();
        histories.insert(TimelineId(2), parse_history("1\t0/20000000\tpromoted\n").unwrap());
        histories.insert(TimelineId(3), parse_history("1\t0/20000000\tpromoted\n2\t0/30800000\tpitr\n").unwrap());
        let backups = vec![
            backup(2, 0x28, 0x29, "2026-11-20T10:00:00Z"),
            backup(2, 0x50, 0x51, "2026-11-22T10:00:00Z"),
            backup(2, 0x60, 0x61, "2026-11-23T10:00:00Z"),
        ];
        Inventory { objects, backups, deltas: Default::default(), histories, segment_size: Some(SEG) }
    }

    #[test]
    fn backups_off_the_path_do_not_stretch_the_walk() {
        let r = verify(&pitr_inv(), SEG);
        assert_eq!(r.timeline_path, [1, 2, 3]);
        assert!(r.missing.is_empty(), "segments that never existed reported missing: {:#?}", r.missing);
        assert_eq!(r.to.as_deref(), Some("00000003000000000000003F"));
        assert!(r.backups[0].recoverable, "{:#?}", r.backups[0]);
        // The other two are on the abandoned part of timeline 2: not recoverable, exit 12.
        assert!(!r.backups[1].recoverable && !r.backups[2].recoverable);
        assert!(!r.recoverable);
        let why = why_not_recoverable(&r);
        assert!(why.contains("from 2 of 3 backups") && why.contains("not on the path"), "{why}");
    }

    #[test]
    fn a_delta_backup_whose_base_is_gone_is_not_recoverable() {
        use crate::backup::sentinel::DeltaOrigin;
        let full = backup(1, 2, 2, "2026-11-20T00:00:00Z");
        let d1 = backup(1, 3, 3, "2026-11-20T01:00:00Z");
        let d2 = backup(1, 4, 4, "2026-11-20T02:00:00Z");
        let origin = |from: &BackupInfo| DeltaOrigin {
            from: Some(from.name.clone()),
            full_name: Some(full.name.clone()),
            from_lsn: Some(from.sentinel.start_lsn),
            count: None,
        };
        let objects: Vec<ObjectMeta> = (2..=6).map(|n| obj(&seg_key(1, n))).collect();
        let mut i = Inventory {
            objects,
            backups: vec![full.clone(), d1.clone(), d2.clone()],
            deltas: [(d1.name.clone(), origin(&full)), (d2.name.clone(), origin(&d1))].into(),
            histories: Histories::new(),
            segment_size: Some(SEG),
        };
        let r = verify(&i, SEG);
        assert!(r.recoverable, "the whole chain is there: {r:#?}");
        // Retention before the fix deleted the full backup and the first delta, and the WAL
        // before the second delta.
        i.backups = vec![d2.clone()];
        i.objects.retain(|o| o.key.as_str() >= seg_key(1, 4).as_str());
        let r = verify(&i, SEG);
        assert!(!r.recoverable);
        assert!(!r.backups[0].recoverable);
        assert!(r.backups[0].reason.as_deref().unwrap().contains(&d1.name), "{:#?}", r.backups[0]);
        // It does not count: the walk does not start from it.
        assert_eq!(r.from.as_deref(), Some("000000010000000000000004"));
        assert!(r.missing.is_empty(), "{r:#?}");
        // Its full backup back but not the delta between: still broken.
        i.backups = vec![full, d2];
        let r = verify(&i, SEG);
        assert!(!r.backups[1].recoverable, "{:#?}", r.backups[1]);
    }

    #[test]
    fn wal_with_no_complete_backup_is_not_recoverable() {
        let mut i = inv();
        i.backups.clear();
        let r = verify(&i, SEG);
        assert!(r.missing.is_empty());
        assert!(!r.recoverable, "{r:#?}");
        assert!(why_not_recoverable(&r).contains("no complete backup"), "{}", why_not_recoverable(&r));
        assert!(!holds_nothing(&i));
    }

    #[test]
    fn an_empty_store_is_a_storage_failure() {
        use crate::config::Overrides;
        let dir = tempfile::tempdir().unwrap();
        let mut o = Overrides::default();
        o.values.insert("store".into(), format!("file://{}", dir.path().display()));
        let config = Config::resolve(&o, &crate::test_support::NoEnv).unwrap();
        let err = crate::test_support::block_on(run(&config, true, None)).unwrap_err();
        assert_eq!(crate::exit::code_of(&err), crate::exit::STORAGE, "{err}");
        let text = err.to_string();
        assert!(text.contains(&dir.path().display().to_string()) && text.contains("WALRS_STORE"), "{text}");
    }

    #[test]
    fn segments_wal_fetch_cannot_decode_count_as_missing() {
        let mut i = inv();
        i.objects.retain(|o| o.key.as_str() != seg_key(2, 8));
        i.objects.push(obj("wal_005/000000020000000000000008.br"));
        let r = verify(&i, SEG);
        assert_eq!(r.missing.len(), 1, "{r:#?}");
        assert_eq!(r.missing[0].first, "000000020000000000000008");
        assert_eq!(r.unreadable, ["wal_005/000000020000000000000008.br"]);
        assert!(r.backups[1].reason.as_deref().unwrap().contains("cannot read"), "{:#?}", r.backups[1]);
        // Stored as lz4 besides, it is there.
        i.objects.push(obj(&seg_key(2, 8)));
        let r = verify(&i, SEG);
        assert!(r.recoverable && r.unreadable.is_empty(), "{r:#?}");
        assert!(restorable_by_walrs("000000020000000000000008") && restorable_by_walrs("000000020000000000000008.zst"));
    }
}
