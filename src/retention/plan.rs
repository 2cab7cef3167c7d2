//! The retention decision, with no I/O: given what the store holds (every object, the
//! complete backups, the timeline histories) and what the operator asked for, which objects
//! go. `wal-rs delete` lists the store, calls [`plan`], prints the result, and with
//! `--confirm` deletes exactly [`Plan::delete`], in its order.
//!
//! The rules (docs/storage-layout.md, "Retention", says the same for operators):
//! - Backups are ordered by finish time, then finish LSN ([`catalog::sort`]), never by
//!   name: after a timeline change or a major upgrade the newest names sort first.
//! - A permanent backup (`IsPermanent` in its sentinel) is never deleted, except by
//!   `delete everything FORCE`, and neither is the WAL from its start to its finish segment.
//! - The newest backup a recovery of the newest timeline (the highest in the store) can
//!   start from is never deleted, except by `everything`, and neither is the WAL along that
//!   timeline's path from its start. Finish order does not tell it: after a point-in-time
//!   recovery from an old backup opens a new timeline, the newer backups lie on the
//!   abandoned branch.
//! - A kept WAL-G delta backup keeps every backup it builds on, down to its full backup,
//!   and those count for WAL like ordinary backups, permanent or not.
//! - WAL is kept from the start segment of the oldest retained non-permanent backup (or of
//!   a backup-push still in progress) onward, on every timeline: the timelines leading to
//!   the newest one, and any other branch too, because whether a branch is dead is a
//!   human's call. With no such backup, WAL from the newest permanent backup's start is kept,
//!   and with no backup at all no WAL goes (except for `delete everything`).
//! - A `.history` file stays while any timeline it describes (its own or a descendant's)
//!   keeps a segment or a backup, and so does every one of a timeline above the lowest
//!   timeline of a kept backup (permanent ones and backup-pushes in progress included):
//!   recovering to 'latest' from a backup on timeline T, PostgreSQL (`findNewestTimeLine`)
//!   probes T+1, T+2... and stops at the first history file missing, then promotes to the
//!   next ID, which may already be taken. The newest timeline's stays always (unless
//!   everything goes), so a later promotion never reuses a timeline ID.
//! - The WAL segment size comes from wal-rs's sentinels or `walrs/cluster.json`, else from
//!   the backups' names and start LSNs ([`super::inventory`]); when none tells, no plan is
//!   made while any backup is there, rather than one on a guessed size.
//! - Objects of a backup that has no sentinel are garbage once nothing was written to them
//!   for the garbage age: until then they may be a backup-push in progress, whose objects
//!   and WAL are left alone.
//! - Gap records (`walrs/gaps/`) go with the WAL they describe.
//! - Anything wal-rs cannot name (unknown files) is never deleted.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, SystemTime};

use serde::Serialize;

use super::timelines::{descends_from, segno, Histories, TimelinePath};
use crate::backup::catalog::{BackupInfo, Deltas};
use crate::layout;
use crate::store::{ObjectKey, ObjectMeta};
use crate::wal::{Lsn, SegmentId, TimelineId, WalFileName};

/// What the operator asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// `retain N`: keep the N newest backups (N >= 1), and every permanent one.
    Retain(usize),
    /// `before NAME`: delete the backups older than NAME; NAME stays.
    BeforeName(String),
    /// `before TIME`: delete the backups older than the newest one that finished at or
    /// before TIME, so a recovery to TIME or later stays possible.
    BeforeTime(time::OffsetDateTime),
    /// `everything [FORCE]`: every backup but the permanent ones (all of them with FORCE),
    /// every WAL object the kept ones do not need, and unfinished backups past the age.
    Everything {
        /// Delete permanent backups too.
        force: bool,
    },
    /// `garbage`: unfinished backups past the age, and WAL older than anything kept needs.
    Garbage,
}

/// What the store holds, as listed.
#[derive(Debug, Clone)]
pub struct Inventory {
    /// Every object under `wal_005/`, `basebackups_005/` and `walrs/gaps/`.
    pub objects: Vec<ObjectMeta>,
    /// The complete backups, oldest first ([`crate::backup::catalog::list_with_deltas`]).
    pub backups: Vec<BackupInfo>,
    /// The WAL-G delta backups among them, by name, with the backup each builds on.
    pub deltas: Deltas,
    /// The history files read, by the timeline each describes.
    pub histories: Histories,
    /// WAL segment size in bytes; `None` when nothing in the store tells it.
    pub segment_size: Option<u32>,
}

/// Settings of the decision.
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    /// The time now.
    pub now: SystemTime,
    /// How long an unfinished backup's objects are left alone after their last write.
    pub garbage_min_age: Duration,
}

/// The kinds of objects, as the dry run counts them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// An object of a complete backup (its sentinel, metadata, manifest, partitions).
    Backup,
    /// An object of an unfinished backup (no sentinel) past the garbage age.
    Garbage,
    /// A WAL segment, `.partial` or `.backup` file.
    Wal,
    /// A timeline history file.
    History,
    /// A gap record under `walrs/gaps/`.
    Gap,
}

/// One object to delete.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Doomed {
    /// Its key.
    pub key: String,
    /// Stored bytes.
    pub size: u64,
    /// What it is.
    pub kind: Kind,
}

/// The decision.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Plan {
    /// What to delete, in order: sentinels first (a backup half deleted is never listed as
    /// complete), then the rest of those backups, unfinished backups, WAL oldest first,
    /// history files, gap records.
    pub delete: Vec<Doomed>,
    /// Complete backups deleted, oldest first.
    pub deleted_backups: Vec<String>,
    /// Complete backups kept, oldest first.
    pub kept_backups: Vec<String>,
    /// Permanent backups among the kept.
    pub permanent_backups: Vec<String>,
    /// Unfinished backups younger than the garbage age: left alone, WAL included.
    pub in_progress: Vec<String>,
    /// The LSN of the first segment kept on every timeline, when WAL is pruned from a
    /// backup's start (permanent backups' ranges are kept besides).
    pub wal_kept_from: Option<String>,
    /// Backups the request would have deleted that stay, each with why: the newest backup
    /// the newest timeline can recover from, and the backups kept delta backups build on.
    pub kept_against_request: Vec<KeptBackup>,
    /// Timelines of the newest timeline's path on which WAL is kept from earlier than
    /// `wal_kept_from`: from the start of the newest backup on that path.
    pub wal_kept_on_path: Vec<WalKeptFrom>,
}

/// A backup kept although the request would have deleted it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KeptBackup {
    /// The backup.
    pub name: String,
    /// Why it stays.
    pub reason: String,
}

/// Where WAL is kept from on one timeline.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct WalKeptFrom {
    /// The timeline.
    pub timeline: u32,
    /// The LSN of its first segment kept.
    pub from: String,
}

impl Plan {
    /// Count and bytes of the objects to delete, per kind.
    pub fn totals(&self) -> BTreeMap<Kind, (usize, u64)> {
        let mut out = BTreeMap::new();
        for d in &self.delete {
            let e = out.entry(d.kind).or_insert((0, 0));
            e.0 += 1;
            e.1 += d.size;
        }
        out
    }

    /// The keys to delete, in order.
    pub fn keys(&self) -> Vec<ObjectKey> {
        self.delete.iter().filter_map(|d| ObjectKey::new(&d.key).ok()).collect()
    }
}

/// Why a request cannot be planned.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PlanError {
    /// `before NAME` names no complete backup.
    #[error("no complete backup is named {0}: see `wal-rs backup-list`")]
    NoSuchBackup(String),
    /// Nothing in the store tells the WAL segment size, and the decision depends on it.
    #[error(
        "the WAL segment size is unknown: no wal-rs backup sentinel nor walrs/cluster.json records it and the backups' names and start LSNs do not settle it; archive one segment with `wal-rs wal-push`, which records it in walrs/cluster.json (docs/storage-layout.md, \"Cluster identity\")"
    )]
    UnknownSegmentSize,
}

/// A WAL segment range `[first, last]` (segment numbers) on one timeline, or on any when
/// the timeline is unknown.
#[derive(Debug, Clone, Copy)]
struct Range {
    tli: Option<TimelineId>,
    first: u64,
    last: u64,
}

/// Decides which objects go.
pub fn plan(inv: &Inventory, request: &Request, policy: &Policy) -> Result<Plan, PlanError> {
    let newest_timeline = newest_timeline(inv);
    let newest_path = newest_timeline.map(|t| TimelinePath::from_histories(&inv.histories, t));
    // `everything` asks for every backup to go: nothing is kept for the newest timeline.
    let path_backup = match request {
        Request::Everything { .. } => None,
        _ => newest_path.as_ref().and_then(|path| newest_backup_on(path, &inv.backups)),
    };
    let Chosen { doomed: doomed_backups, kept, kept_against_request } =
        choose_backups(inv, request, newest_timeline.zip(path_backup))?;
    let mut out = Plan {
        deleted_backups: doomed_backups.iter().map(|b| b.name.clone()).collect(),
        kept_backups: kept.iter().map(|b| b.name.clone()).collect(),
        permanent_backups: kept.iter().filter(|b| b.sentinel.is_permanent).map(|b| b.name.clone()).collect(),
        kept_against_request,
        ..Plan::default()
    };

    // Unfinished backups: folders with no sentinel.
    let complete: BTreeSet<&str> = inv.backups.iter().map(|b| b.name.as_str()).collect();
    let mut unfinished: BTreeMap<&str, Vec<&ObjectMeta>> = BTreeMap::new();
    for o in &inv.objects {
        if let Some(dir) = backup_folder_of(o.key.as_str()) {
            if !complete.contains(dir) {
                unfinished.entry(dir).or_default().push(o);
            }
        }
    }
    let mut garbage = Vec::new();
    for (dir, objects) in &unfinished {
        let young = objects.iter().any(|o| match o.modified {
            // Unknown write time: treat as in progress. Safe, never the other way round.
            None => true,
            Some(t) => policy.now.duration_since(t).unwrap_or_default() < policy.garbage_min_age,
        });
        if young {
            out.in_progress.push(dir.to_string());
        } else if matches!(request, Request::Garbage | Request::Everything { .. }) {
            garbage.extend(objects.iter().map(|o| Doomed {
                key: o.key.to_string(),
                size: o.size,
                kind: Kind::Garbage,
            }));
        }
    }

    // Where WAL retention starts, and the ranges permanent backups pin.
    let seg_size = segment_size_for(inv, &out.in_progress)?;
    let in_progress_starts: Vec<u64> =
        out.in_progress.iter().filter_map(|dir| start_segment_of_name(dir)).map(|s| segno(s, seg_size)).collect();
    let everything = matches!(request, Request::Everything { .. });
    let start_of = |b: &BackupInfo| segno(SegmentId::containing(Lsn(b.sentinel.start_lsn), seg_size), seg_size);
    // A permanent backup a kept delta builds on needs its WAL onward like an ordinary one:
    // the chain is restored as one.
    let chain_bases: BTreeSet<&str> = kept.iter().flat_map(|b| delta_bases(&inv.deltas, &b.name)).collect();
    let oldest_kept = kept
        .iter()
        .filter(|b| !b.sentinel.is_permanent || chain_bases.contains(b.name.as_str()))
        .map(|b| start_of(b))
        .min();
    let oldest_in_progress = in_progress_starts.iter().copied().min();
    let newest_permanent = kept.iter().rev().find(|b| b.sentinel.is_permanent).map(|b| start_of(b));
    // A backup-push in progress only ever moves the line earlier: alone, it is no reason to
    // delete the WAL before it (it may fail), except for `everything`, which deletes all.
    let earliest = |a: u64| Some(oldest_in_progress.map_or(a, |p| p.min(a)));
    let anchor: Option<u64> = match (oldest_kept, newest_permanent) {
        (Some(a), _) => earliest(a),
        (None, _) if everything => oldest_in_progress,
        (None, Some(p)) => earliest(p),
        (None, None) => None,
    };
    // No anchor and not `everything`: no backup at all, so nothing says which WAL is old.
    let prune_wal = anchor.is_some() || everything;
    let pinned: Vec<Range> = kept
        .iter()
        .filter(|b| b.sentinel.is_permanent)
        .map(|b| {
            let first = segno(SegmentId::containing(Lsn(b.sentinel.start_lsn), seg_size), seg_size);
            let finish = Lsn(b.sentinel.finish_lsn.max(b.sentinel.start_lsn));
            let last = segno(SegmentId::containing(finish, seg_size), seg_size);
            Range { tli: backup_timeline(b), first, last }
        })
        .collect();
    out.wal_kept_from = anchor.map(|a| Lsn(a * seg_size as u64).to_string());
    // The newest backup on the newest timeline's path recovers along that path, whatever
    // the WAL positions of other branches: its WAL is kept per timeline of the path.
    let path_floor: BTreeMap<TimelineId, u64> = match (&newest_path, path_backup) {
        (Some(path), Some(b)) => wal_floor_along(path, start_of(b), seg_size),
        _ => BTreeMap::new(),
    };
    out.wal_kept_on_path = path_floor
        .iter()
        .filter(|(_, &f)| anchor.is_none_or(|a| f < a))
        .map(|(t, &f)| WalKeptFrom { timeline: t.0, from: Lsn(f * seg_size as u64).to_string() })
        .collect();
    let keep_segment = |tli: TimelineId, n: u64| -> bool {
        !prune_wal
            || anchor.is_some_and(|a| n >= a)
            || path_floor.get(&tli).is_some_and(|&f| n >= f)
            || pinned.iter().any(|r| r.tli.is_none_or(|t| t == tli) && (r.first..=r.last).contains(&n))
    };

    // WAL objects.
    let mut wal = Vec::new();
    let mut backup_history = Vec::new();
    let mut history_files = Vec::new();
    let kept_backup_timelines: BTreeSet<TimelineId> = kept
        .iter()
        .filter_map(|b| backup_timeline(b))
        .chain(out.in_progress.iter().filter_map(|dir| start_segment_name(dir)).map(|n| n.timeline()))
        .collect();
    let mut kept_timelines = kept_backup_timelines.clone();
    for o in &inv.objects {
        let Some(name) = wal_name_of(o.key.as_str()) else { continue };
        match name {
            WalFileName::Segment(t, s) | WalFileName::Partial(t, s) => {
                if keep_segment(t, segno(s, seg_size)) {
                    kept_timelines.insert(t);
                } else {
                    wal.push((t, segno(s, seg_size), o));
                }
            }
            WalFileName::BackupHistory(t, s, _) => {
                if !keep_segment(t, segno(s, seg_size)) {
                    backup_history.push((t, segno(s, seg_size), o));
                }
            }
            WalFileName::History(t) => history_files.push((t, o)),
        }
    }
    // A kept timeline whose own history file is not in the store hides which ancestors it
    // has: then no history file goes.
    let ancestry_known = kept_timelines.iter().all(|k| k.0 == 1 || inv.histories.contains_key(k));
    // Recovery to 'latest' from a kept backup probes every timeline above its own.
    let probed_from = kept_backup_timelines.first().copied();
    let mut histories = Vec::new();
    for (t, o) in history_files {
        let describes_kept = kept_timelines.iter().any(|&k| descends_from(&inv.histories, k, t));
        let probed = probed_from.is_some_and(|lowest| t > lowest);
        let newest = !everything && Some(t) == newest_timeline;
        if prune_wal && ancestry_known && !describes_kept && !probed && !newest {
            histories.push(Doomed { key: o.key.to_string(), size: o.size, kind: Kind::History });
        }
    }

    // Gap records go with their WAL.
    let mut gaps = Vec::new();
    for o in &inv.objects {
        let Some(file) = o.key.as_str().strip_prefix(layout::GAP_PREFIX) else { continue };
        let Some(name) = file.strip_suffix(".json").and_then(|n| WalFileName::parse(n).ok()) else { continue };
        if let Some(s) = name.wal_segment() {
            if !keep_segment(name.timeline(), segno(s, seg_size)) {
                gaps.push(Doomed { key: o.key.to_string(), size: o.size, kind: Kind::Gap });
            }
        }
    }

    // Order: sentinels, backup objects, garbage, WAL oldest first, history, gaps.
    for b in &doomed_backups {
        let sentinel = layout::sentinel_key(&b.name);
        if let Some(o) = inv.objects.iter().find(|o| o.key == sentinel) {
            out.delete.push(Doomed { key: o.key.to_string(), size: o.size, kind: Kind::Backup });
        }
    }
    for b in &doomed_backups {
        let folder = format!("{}/{}/", layout::BACKUP_DIR, b.name);
        for o in inv.objects.iter().filter(|o| o.key.as_str().starts_with(&folder)) {
            out.delete.push(Doomed { key: o.key.to_string(), size: o.size, kind: Kind::Backup });
        }
    }
    out.delete.extend(garbage);
    wal.sort_by_key(|(t, n, _)| (*n, *t));
    backup_history.sort_by_key(|(t, n, _)| (*n, *t));
    for (_, _, o) in wal.into_iter().chain(backup_history) {
        out.delete.push(Doomed { key: o.key.to_string(), size: o.size, kind: Kind::Wal });
    }
    out.delete.extend(histories);
    out.delete.extend(gaps);
    Ok(out)
}

/// The highest timeline of any WAL file or backup in the store.
fn newest_timeline(inv: &Inventory) -> Option<TimelineId> {
    inv.objects
        .iter()
        .filter_map(|o| wal_name_of(o.key.as_str()))
        .map(|n| n.timeline())
        .chain(inv.backups.iter().filter_map(backup_timeline))
        .max()
}

/// The newest backup (by finish, `backups` oldest first) from which a recovery following
/// `path` becomes consistent.
pub fn newest_backup_on<'a>(path: &TimelinePath, backups: &'a [BackupInfo]) -> Option<&'a BackupInfo> {
    backups.iter().rev().find(|b| is_on_path(path, b))
}

/// Whether a recovery following `path` from `b` replays its WAL start to finish.
pub fn is_on_path(path: &TimelinePath, b: &BackupInfo) -> bool {
    let finish = (b.sentinel.finish_lsn != 0 && b.sentinel.finish_lsn >= b.sentinel.start_lsn)
        .then_some(Lsn(b.sentinel.finish_lsn));
    backup_timeline(b).is_some_and(|t| path.passes(t, Lsn(b.sentinel.start_lsn), finish))
}

/// For each timeline of `path`, the first segment a recovery along it from segment `start`
/// reads from that timeline (timelines the path leaves before `start` are not listed).
fn wal_floor_along(path: &TimelinePath, start: u64, seg_size: u32) -> BTreeMap<TimelineId, u64> {
    path.stretches_from(start, seg_size).into_iter().map(|s| (s.tli, s.first)).collect()
}

/// The backups a WAL-G delta backup builds on, nearest first (`DeltaFrom`, its own base...),
/// with the chain's full backup (`DeltaFullName`) last; empty for a full backup. Restoring
/// a delta needs every one of them. A chain that loops (damaged sentinels) stops there.
pub fn delta_bases<'d>(deltas: &'d Deltas, name: &str) -> Vec<&'d str> {
    let mut out: Vec<&'d str> = Vec::new();
    let mut roots: Vec<&'d str> = Vec::new();
    let mut current = name;
    while let Some(origin) = deltas.get(current) {
        roots.extend(origin.full_name.as_deref());
        let Some(next) = origin.base_name() else { break };
        if next == name || out.contains(&next) {
            break;
        }
        out.push(next);
        current = next;
    }
    for root in roots {
        if !out.contains(&root) {
            out.push(root);
        }
    }
    out
}

/// The complete backups that go and those that stay, both oldest first.
struct Chosen<'a> {
    doomed: Vec<&'a BackupInfo>,
    kept: Vec<&'a BackupInfo>,
    /// Among the kept, those the request alone would have deleted.
    kept_against_request: Vec<KeptBackup>,
}

/// The complete backups that go and those that stay (both oldest first) for `request`, and
/// those kept against it: `for_newest` (the newest timeline and the newest backup it
/// recovers from), and every backup a kept delta backup builds on, since a delta restores only on
/// top of its whole chain.
fn choose_backups<'a>(
    inv: &'a Inventory,
    request: &Request,
    for_newest: Option<(TimelineId, &'a BackupInfo)>,
) -> Result<Chosen<'a>, PlanError> {
    let (_, kept) = split_backups(&inv.backups, request)?;
    let mut keep: BTreeSet<&str> = kept.iter().map(|b| b.name.as_str()).collect();
    let mut rescued = Vec::new();
    if let Some((tli, b)) = for_newest {
        if keep.insert(&b.name) {
            rescued.push(KeptBackup {
                name: b.name.clone(),
                reason: format!(
                    "the newest backup from which timeline {tli}, the newest, can be recovered; it can go once a newer backup on that timeline's path exists"
                ),
            });
        }
    }
    let kept_deltas: Vec<&str> = keep.iter().copied().filter(|n| inv.deltas.contains_key(*n)).collect();
    for delta in kept_deltas {
        for base in delta_bases(&inv.deltas, delta) {
            let Some(b) = inv.backups.iter().find(|b| b.name == base) else { continue };
            if keep.insert(&b.name) {
                rescued.push(KeptBackup {
                    name: b.name.clone(),
                    reason: format!("delta backup {delta}, which stays, builds on it"),
                });
            }
        }
    }
    let (kept, doomed) = inv.backups.iter().partition(|b| keep.contains(b.name.as_str()));
    Ok(Chosen { doomed, kept, kept_against_request: rescued })
}

/// The segment size the decision uses. Unknown, it matters as soon as there is a backup
/// (complete or in progress): which segments come before a backup's start depends on it.
/// With none, no WAL goes but for `everything`, which takes all of it whatever the size.
fn segment_size_for(inv: &Inventory, in_progress: &[String]) -> Result<u32, PlanError> {
    match inv.segment_size {
        Some(s) => Ok(s),
        None if inv.backups.is_empty() && in_progress.is_empty() => Ok(super::inventory::DEFAULT_SEGMENT_SIZE),
        None => Err(PlanError::UnknownSegmentSize),
    }
}

/// Splits the complete backups (oldest first) into (deleted, kept) for `request`.
fn split_backups<'a>(
    backups: &'a [BackupInfo],
    request: &Request,
) -> Result<(Vec<&'a BackupInfo>, Vec<&'a BackupInfo>), PlanError> {
    // Index of the first backup of the newest ones that stay; permanent ones stay anyway.
    let cut = match request {
        Request::Retain(n) => backups.len().saturating_sub(*n),
        Request::BeforeName(name) => {
            backups.iter().position(|b| &b.name == name).ok_or_else(|| PlanError::NoSuchBackup(name.clone()))?
        }
        Request::BeforeTime(t) => {
            backups.iter().rposition(|b| b.sentinel.finish_timestamp().is_some_and(|f| f <= *t)).unwrap_or(0)
        }
        Request::Everything { .. } => backups.len(),
        Request::Garbage => 0,
    };
    let force = matches!(request, Request::Everything { force: true });
    let mut doomed = Vec::new();
    let mut kept = Vec::new();
    for (i, b) in backups.iter().enumerate() {
        if i < cut && (force || !b.sentinel.is_permanent) {
            doomed.push(b);
        } else {
            kept.push(b);
        }
    }
    Ok((doomed, kept))
}

/// The backup folder name of a key inside `basebackups_005/<name>/`.
fn backup_folder_of(key: &str) -> Option<&str> {
    let rest = key.strip_prefix(layout::BACKUP_DIR)?.strip_prefix('/')?;
    let (dir, inner) = rest.split_once('/')?;
    (!dir.is_empty() && !inner.is_empty()).then_some(dir)
}

/// The WAL file a `base_<WAL file>[_<offset>]` backup name starts in.
pub fn start_segment_name(name: &str) -> Option<WalFileName> {
    WalFileName::parse(name.strip_prefix("base_")?.get(..24)?).ok()
}

fn start_segment_of_name(name: &str) -> Option<SegmentId> {
    start_segment_name(name).and_then(|n| n.wal_segment())
}

/// A backup's timeline: recorded in the sentinel by wal-rs, else from its name.
pub fn backup_timeline(b: &BackupInfo) -> Option<TimelineId> {
    b.sentinel.timeline.map(TimelineId).or_else(|| start_segment_name(&b.name).map(|n| n.timeline()))
}

/// The WAL file a key under `wal_005/` holds, whatever its compression extension.
pub fn wal_name_of(key: &str) -> Option<WalFileName> {
    let file = key.strip_prefix(layout::WAL_DIR)?.strip_prefix('/')?;
    if let Ok(n) = WalFileName::parse(file) {
        return Some(n);
    }
    let (stem, ext) = file.rsplit_once('.')?;
    ["lz4", "zst", "br", "lzma", "lzo", "gz"].contains(&ext).then(|| WalFileName::parse(stem).ok()).flatten()
}

#[cfg(test)]
mod tests {
    use super::super::timelines::parse_history;
    use super::*;
    use crate::backup::sentinel::Sentinel;

    const SEG: u32 = 16 << 20;
    const DAY: Duration = Duration::from_secs(86400);

    fn seg_lsn(n: u64) -> u64 {
        n * SEG as u64 + 0x28
    }

    fn backup(tli: u32, start_seg: u64, finish_seg: u64, finish: &str, permanent: bool) -> BackupInfo {
        let mut s: Sentinel = serde_json::from_str(r#"{"LSN":1}"#).unwrap();
        s.start_lsn = seg_lsn(start_seg);
        s.finish_lsn = seg_lsn(finish_seg);
        s.finish_time = finish.to_string();
        s.is_permanent = permanent;
        s.timeline = Some(tli);
        let name = format!(
            "base_{}",
            WalFileName::Segment(TimelineId(tli), super::super::timelines::segment_of(start_seg, SEG))
        );
        BackupInfo { name, sentinel: s }
    }

    fn obj(key: &str, size: u64, modified: SystemTime) -> ObjectMeta {
        ObjectMeta { key: ObjectKey::new(key).unwrap(), size, metadata: Default::default(), modified: Some(modified) }
    }

    fn seg_key(tli: u32, n: u64) -> String {
        format!("wal_005/{}.lz4", WalFileName::Segment(TimelineId(tli), super::super::timelines::segment_of(n, SEG)))
    }

    fn backup_objects(b: &BackupInfo, at: SystemTime) -> Vec<ObjectMeta> {
        vec![
            obj(layout::sentinel_key(&b.name).as_str(), 500, at),
            obj(&format!("basebackups_005/{}/metadata.json", b.name), 300, at),
            obj(&format!("basebackups_005/{}/tar_partitions/part_001.tar.lz4", b.name), 1000, at),
            obj(&format!("basebackups_005/{}/tar_partitions/pg_control.tar.lz4", b.name), 100, at),
        ]
    }

    /// Four backups, a promotion to timeline 2 at segment 6 (between the second and the
    /// third), WAL 1..=5 on timeline 1 plus a stray 6 and 7 the old primary archived,
    /// 6..=12 on timeline 2, backup history files, an unknown file and two gap records.
    fn store(now: SystemTime) -> Inventory {
        let old = now - 10 * DAY;
        let mut backups = vec![
            backup(1, 2, 2, "2026-11-20T10:00:00Z", false),
            backup(1, 4, 4, "2026-11-21T10:00:00Z", false),
            backup(2, 8, 8, "2026-11-22T10:00:00Z", false),
            backup(2, 10, 11, "2026-11-23T10:00:00Z", false),
        ];
        crate::backup::catalog::sort(&mut backups);
        let mut objects = Vec::new();
        for b in &backups {
            objects.extend(backup_objects(b, old));
        }
        for n in 1..=7 {
            objects.push(obj(&seg_key(1, n), 16, old));
        }
        for n in 6..=12 {
            objects.push(obj(&seg_key(2, n), 16, old));
        }
        objects.push(obj("wal_005/00000002.history.lz4", 40, old));
        objects.push(obj("wal_005/000000010000000000000002.00000028.backup.lz4", 20, old));
        objects.push(obj("wal_005/000000010000000000000004.00000028.backup.lz4", 20, old));
        objects.push(obj("wal_005/README", 3, old));
        objects.push(obj("walrs/gaps/000000010000000000000003.json", 60, old));
        objects.push(obj("walrs/gaps/00000002000000000000000B.json", 60, old));
        let mut histories = Histories::new();
        histories.insert(TimelineId(2), parse_history("1\t0/6000000\tpromoted\n").unwrap());
        Inventory { objects, backups, deltas: Default::default(), histories, segment_size: Some(SEG) }
    }

    fn keys(p: &Plan) -> Vec<&str> {
        p.delete.iter().map(|d| d.key.as_str()).collect()
    }

    fn policy(now: SystemTime) -> Policy {
        Policy { now, garbage_min_age: DAY }
    }

    #[test]
    fn retain_two_across_a_timeline_switch() {
        let now = SystemTime::now();
        let inv = store(now);
        let p = plan(&inv, &Request::Retain(2), &policy(now)).unwrap();
        assert_eq!(p.deleted_backups, ["base_000000010000000000000002", "base_000000010000000000000004"]);
        assert_eq!(p.kept_backups, ["base_000000020000000000000008", "base_00000002000000000000000A"]);
        assert_eq!(
            keys(&p),
            [
                "basebackups_005/base_000000010000000000000002_backup_stop_sentinel.json",
                "basebackups_005/base_000000010000000000000004_backup_stop_sentinel.json",
                "basebackups_005/base_000000010000000000000002/metadata.json",
                "basebackups_005/base_000000010000000000000002/tar_partitions/part_001.tar.lz4",
                "basebackups_005/base_000000010000000000000002/tar_partitions/pg_control.tar.lz4",
                "basebackups_005/base_000000010000000000000004/metadata.json",
                "basebackups_005/base_000000010000000000000004/tar_partitions/part_001.tar.lz4",
                "basebackups_005/base_000000010000000000000004/tar_partitions/pg_control.tar.lz4",
                "wal_005/000000010000000000000001.lz4",
                "wal_005/000000010000000000000002.lz4",
                "wal_005/000000010000000000000003.lz4",
                "wal_005/000000010000000000000004.lz4",
                "wal_005/000000010000000000000005.lz4",
                "wal_005/000000010000000000000006.lz4",
                "wal_005/000000020000000000000006.lz4",
                "wal_005/000000010000000000000007.lz4",
                "wal_005/000000020000000000000007.lz4",
                "wal_005/000000010000000000000002.00000028.backup.lz4",
                "wal_005/000000010000000000000004.00000028.backup.lz4",
                "walrs/gaps/000000010000000000000003.json",
            ]
        );
        assert_eq!(p.wal_kept_from.as_deref(), Some("0/8000000"));
        let totals = p.totals();
        assert_eq!(totals[&Kind::Backup], (8, 2 * 1900));
        assert_eq!(totals[&Kind::Wal], (11, 9 * 16 + 2 * 20));
        assert!(!totals.contains_key(&Kind::History), "00000002.history describes kept WAL");
    }

    #[test]
    fn order_is_by_finish_not_by_name() {
        // The oldest backup by finish time has the name that sorts last.
        let now = SystemTime::now();
        let mut inv = store(now);
        // (Its sentinel keeps timeline 1: a backup on timeline 9 would make 9 the newest
        // timeline, and that backup the one kept for it.)
        inv.backups[0].name = "base_00000009000000000000000F".into();
        crate::backup::catalog::sort(&mut inv.backups);
        let p = plan(&inv, &Request::Retain(3), &policy(now)).unwrap();
        assert_eq!(p.deleted_backups, ["base_00000009000000000000000F"]);
    }

    #[test]
    fn permanent_backups_and_their_wal_survive_everything_without_force() {
        let now = SystemTime::now();
        let mut inv = store(now);
        inv.backups[1].sentinel.is_permanent = true; // base ...04 on timeline 1
        let p = plan(&inv, &Request::Everything { force: false }, &policy(now)).unwrap();
        assert_eq!(p.kept_backups, ["base_000000010000000000000004"]);
        assert_eq!(p.permanent_backups, ["base_000000010000000000000004"]);
        let k = keys(&p);
        assert!(!k.iter().any(|k| k.contains("base_000000010000000000000004")), "{k:?}");
        assert!(!k.contains(&"wal_005/000000010000000000000004.lz4"), "the permanent backup's WAL went");
        assert!(!k.contains(&"wal_005/000000010000000000000004.00000028.backup.lz4"));
        assert!(k.contains(&"wal_005/000000010000000000000005.lz4"));
        assert!(k.contains(&"wal_005/00000002000000000000000C.lz4"));
        assert!(
            !k.contains(&"wal_005/00000002.history.lz4"),
            "recovery to 'latest' from the permanent backup on timeline 1 probes timeline 2"
        );
        assert!(!k.contains(&"wal_005/README"), "unknown objects are never deleted");

        let forced = plan(&inv, &Request::Everything { force: true }, &policy(now)).unwrap();
        assert!(forced.kept_backups.is_empty());
        assert!(keys(&forced).contains(&"wal_005/000000010000000000000004.lz4"));
        assert_eq!(forced.delete.len(), inv.objects.len() - 1, "all but README");
    }

    #[test]
    fn a_permanent_backup_is_kept_by_retain_too() {
        let now = SystemTime::now();
        let mut inv = store(now);
        inv.backups[0].sentinel.is_permanent = true;
        let p = plan(&inv, &Request::Retain(1), &policy(now)).unwrap();
        assert_eq!(p.deleted_backups, ["base_000000010000000000000004", "base_000000020000000000000008"]);
        let k = keys(&p);
        assert!(!k.contains(&"wal_005/000000010000000000000002.lz4"), "pinned by the permanent backup");
        assert!(k.contains(&"wal_005/000000010000000000000001.lz4"));
        assert!(k.contains(&"wal_005/000000010000000000000003.lz4"));
        assert!(!k.contains(&"wal_005/00000002000000000000000A.lz4"));
    }

    #[test]
    fn before_name_and_before_time() {
        let now = SystemTime::now();
        let inv = store(now);
        let p = plan(&inv, &Request::BeforeName("base_000000020000000000000008".into()), &policy(now)).unwrap();
        assert_eq!(p.deleted_backups.len(), 2);
        assert_eq!(
            plan(&inv, &Request::BeforeName("base_nope".into()), &policy(now)).unwrap_err(),
            PlanError::NoSuchBackup("base_nope".into())
        );
        // The newest backup finished by the time stays, so recovery to that time works.
        let t = crate::backup::sentinel::parse_time("2026-11-22T12:00:00Z").unwrap();
        let p = plan(&inv, &Request::BeforeTime(t), &policy(now)).unwrap();
        assert_eq!(p.kept_backups[0], "base_000000020000000000000008");
        let t = crate::backup::sentinel::parse_time("2026-01-01T00:00:00Z").unwrap();
        assert!(plan(&inv, &Request::BeforeTime(t), &policy(now)).unwrap().deleted_backups.is_empty());
    }

    #[test]
    fn garbage_spares_a_backup_push_in_progress() {
        let now = SystemTime::now();
        let mut inv = store(now);
        // A dead backup-push from last week, and one writing right now that started at
        // segment 9 of timeline 2.
        inv.objects.push(obj(
            "basebackups_005/base_000000010000000000000003/tar_partitions/part_001.tar.lz4",
            700,
            now - 7 * DAY,
        ));
        inv.objects.push(obj(
            "basebackups_005/base_000000020000000000000009/tar_partitions/part_001.tar.lz4",
            900,
            now - 5 * DAY,
        ));
        inv.objects.push(obj(
            "basebackups_005/base_000000020000000000000009/tar_partitions/part_002.tar.lz4",
            900,
            now,
        ));
        let p = plan(&inv, &Request::Garbage, &policy(now)).unwrap();
        assert!(p.deleted_backups.is_empty());
        assert_eq!(p.in_progress, ["base_000000020000000000000009"]);
        let k = keys(&p);
        assert_eq!(k[0], "basebackups_005/base_000000010000000000000003/tar_partitions/part_001.tar.lz4");
        assert_eq!(p.delete[0].kind, Kind::Garbage);
        assert!(!k.iter().any(|k| k.contains("base_000000020000000000000009")));
        // WAL before the oldest backup goes; the rest stays.
        assert!(k.contains(&"wal_005/000000010000000000000001.lz4"));
        assert!(!k.contains(&"wal_005/000000010000000000000002.lz4"));
        // Even `everything` leaves the push in progress and its WAL alone.
        let p = plan(&inv, &Request::Everything { force: true }, &policy(now)).unwrap();
        let k = keys(&p);
        assert!(!k.iter().any(|k| k.contains("base_000000020000000000000009")));
        assert!(!k.contains(&"wal_005/000000020000000000000009.lz4"));
        assert!(k.contains(&"wal_005/000000020000000000000008.lz4"));
        assert!(!k.contains(&"wal_005/00000002.history.lz4"), "the push in progress is on timeline 2");
        // Unknown write times count as young.
        for o in inv.objects.iter_mut().filter(|o| o.key.as_str().contains("base_000000010000000000000003/")) {
            o.modified = None;
        }
        let p = plan(&inv, &Request::Garbage, &policy(now)).unwrap();
        assert_eq!(p.in_progress, ["base_000000010000000000000003", "base_000000020000000000000009"]);
        assert!(!p.delete.iter().any(|d| d.kind == Kind::Garbage));
    }

    #[test]
    fn no_backup_means_no_wal_goes_except_for_everything() {
        let now = SystemTime::now();
        let mut inv = store(now);
        inv.backups.clear();
        inv.objects.retain(|o| !o.key.as_str().starts_with("basebackups_005"));
        assert!(plan(&inv, &Request::Garbage, &policy(now)).unwrap().delete.is_empty());
        assert!(plan(&inv, &Request::Retain(3), &policy(now)).unwrap().delete.is_empty());
        // A backup-push in progress is no reason to delete the WAL before it.
        let mut with_push = inv.clone();
        with_push.objects.push(obj("basebackups_005/base_000000020000000000000009/metadata.json", 9, now));
        let p = plan(&with_push, &Request::Garbage, &policy(now)).unwrap();
        assert_eq!(p.in_progress, ["base_000000020000000000000009"]);
        assert!(p.delete.is_empty(), "{:?}", keys(&p));
        let p = plan(&inv, &Request::Everything { force: false }, &policy(now)).unwrap();
        assert_eq!(p.delete.len(), inv.objects.len() - 1);
    }

    #[test]
    fn the_newest_timelines_history_stays() {
        let now = SystemTime::now();
        let mut inv = store(now);
        // A branch, timeline 3 from timeline 1 at segment 3, all of it old. Abandoned or
        // not is an operator's call: as the newest timeline, the newest backup it recovers
        // from (the first, on timeline 1 before the fork) stays, and its WAL.
        inv.objects.push(obj(&seg_key(3, 3), 16, now - 9 * DAY));
        inv.objects.push(obj("wal_005/00000003.history.lz4", 40, now - 9 * DAY));
        inv.histories.insert(TimelineId(3), parse_history("1\t0/3000000\tfork\n").unwrap());
        let p = plan(&inv, &Request::Retain(2), &policy(now)).unwrap();
        let k = keys(&p);
        assert_eq!(p.deleted_backups, ["base_000000010000000000000004"]);
        assert_eq!(p.kept_against_request[0].name, "base_000000010000000000000002");
        assert!(!k.contains(&"wal_005/000000030000000000000003.lz4"));
        assert!(!k.contains(&"wal_005/000000010000000000000002.lz4"));
        assert!(k.contains(&"wal_005/000000010000000000000001.lz4"));
        assert!(!k.contains(&"wal_005/00000003.history.lz4"), "timeline 3 is the newest ID: its history stays");

        // Timeline 4 (from 2) comes. Timeline 3's history describes nothing kept, but
        // restoring a kept timeline-2 backup to 'latest', PostgreSQL probes 00000003.history
        // before 00000004.history: without it, recovery would stop on timeline 2 and
        // promote to timeline 3, an ID already used.
        inv.objects.push(obj(&seg_key(4, 12), 16, now));
        inv.objects.push(obj("wal_005/00000004.history.lz4", 40, now));
        inv.histories.insert(TimelineId(4), parse_history("1\t0/6000000\ta\n2\t0/C000000\tb\n").unwrap());
        let p = plan(&inv, &Request::Retain(2), &policy(now)).unwrap();
        assert!(!p.delete.iter().any(|d| d.kind == Kind::History), "{:?}", keys(&p));

        // Without timeline 4's history its ancestors are unknown: no history file goes.
        let mut unknown = inv.clone();
        unknown.objects.retain(|o| o.key.as_str() != "wal_005/00000004.history.lz4");
        unknown.histories.remove(&TimelineId(4));
        let p = plan(&unknown, &Request::Retain(2), &policy(now)).unwrap();
        assert!(!p.delete.iter().any(|d| d.kind == Kind::History), "{:?}", keys(&p));

        // Once the only backup kept is on timeline 4, recovery probes from 5 on: timeline
        // 3's history goes, timeline 2's stays (an ancestor of 4).
        let on_4 = backup(4, 12, 12, "2026-11-24T10:00:00Z", false);
        inv.objects.extend(backup_objects(&on_4, now));
        inv.backups.push(on_4);
        let p = plan(&inv, &Request::Retain(1), &policy(now)).unwrap();
        let histories: Vec<&str> =
            p.delete.iter().filter(|d| d.kind == Kind::History).map(|d| d.key.as_str()).collect();
        assert_eq!(histories, ["wal_005/00000003.history.lz4"]);
    }

    #[test]
    fn an_unknown_segment_size_plans_nothing_while_backups_exist() {
        let now = SystemTime::now();
        let mut inv = store(now);
        inv.segment_size = None;
        assert_eq!(plan(&inv, &Request::Retain(2), &policy(now)).unwrap_err(), PlanError::UnknownSegmentSize);
        // With no backup, no WAL goes (or all of it, for `everything`): the size is moot.
        inv.backups.clear();
        inv.objects.retain(|o| !o.key.as_str().starts_with("basebackups_005"));
        assert!(plan(&inv, &Request::Garbage, &policy(now)).unwrap().delete.is_empty());
        // A backup-push in progress gives WAL a line again.
        inv.objects.push(obj("basebackups_005/base_000000020000000000000009/metadata.json", 9, now));
        let everything = Request::Everything { force: false };
        assert_eq!(plan(&inv, &everything, &policy(now)).unwrap_err(), PlanError::UnknownSegmentSize);
    }

    #[test]
    fn wal_names_with_any_extension() {
        assert_eq!(
            wal_name_of("wal_005/000000010000000000000003.zst"),
            WalFileName::parse("000000010000000000000003").ok()
        );
        assert_eq!(
            wal_name_of("wal_005/000000010000000000000003"),
            WalFileName::parse("000000010000000000000003").ok()
        );
        assert!(wal_name_of("wal_005/00000002.history.br").is_some());
        assert!(wal_name_of("wal_005/notes.txt").is_none());
        assert!(wal_name_of("basebackups_005/000000010000000000000003.lz4").is_none());
    }

    /// Backups B1, B2, B3 on timeline 2 at segments 0x28, 0x50, 0x60; B1 restored to a
    /// point in segment 0x30 and promoted: timeline 3 branches from timeline 2 at
    /// 0/30800000 and archives 0x30..=0x3F into the same prefix. B2 and B3 lie on timeline
    /// 2 past the branch: timeline 3 cannot recover from them.
    fn pitr_store(now: SystemTime) -> Inventory {
        let old = now - 10 * DAY;
        let backups = vec![
            backup(2, 0x28, 0x29, "2026-11-20T10:00:00Z", false),
            backup(2, 0x50, 0x51, "2026-11-22T10:00:00Z", false),
            backup(2, 0x60, 0x61, "2026-11-23T10:00:00Z", false),
        ];
        let mut objects = Vec::new();
        for b in &backups {
            objects.extend(backup_objects(b, old));
        }
        objects.extend((0x10..=0x1F).map(|n| obj(&seg_key(1, n), 16, old)));
        objects.extend((0x20..=0x6F).map(|n| obj(&seg_key(2, n), 16, old)));
        objects.extend((0x30..=0x3F).map(|n| obj(&seg_key(3, n), 16, now)));
        objects.push(obj("wal_005/00000002.history.lz4", 40, old));
        objects.push(obj("wal_005/00000003.history.lz4", 80, now));
        let mut histories = Histories::new();
        histories.insert(TimelineId(2), parse_history("1\t0/20000000\tpromoted\n").unwrap());
        histories.insert(TimelineId(3), parse_history("1\t0/20000000\tpromoted\n2\t0/30800000\tpitr\n").unwrap());
        Inventory { objects, backups, deltas: Default::default(), histories, segment_size: Some(SEG) }
    }

    #[test]
    fn after_a_pitr_the_new_timelines_only_backup_and_its_wal_stay() {
        let now = SystemTime::now();
        let inv = pitr_store(now);
        let b1 = "base_000000020000000000000028";
        let t = crate::backup::sentinel::parse_time("2026-11-23T12:00:00Z").unwrap();
        for request in [
            Request::Retain(2),
            Request::Retain(1),
            Request::BeforeName("base_000000020000000000000050".into()),
            Request::BeforeTime(t),
        ] {
            let p = plan(&inv, &request, &policy(now)).unwrap();
            let k = keys(&p);
            assert!(p.kept_backups.iter().any(|b| b == b1), "{request:?}: {p:#?}");
            assert!(!k.iter().any(|k| k.contains(b1)), "{request:?}: {k:?}");
            assert_eq!(p.kept_against_request.len(), 1, "{request:?}");
            assert_eq!(p.kept_against_request[0].name, b1);
            assert!(p.kept_against_request[0].reason.contains("timeline 3"), "{:?}", p.kept_against_request);
            for n in 0x28..=0x2F {
                assert!(!k.contains(&seg_key(2, n).as_str()), "{request:?}: timeline 2 before the branch went");
            }
            for n in 0x30..=0x3F {
                assert!(!k.contains(&seg_key(3, n).as_str()), "{request:?}: timeline 3 went: {k:?}");
            }
            assert!(k.contains(&seg_key(1, 0x1F).as_str()), "{request:?}: WAL before B1 stays deletable");
            assert!(!p.delete.iter().any(|d| d.kind == Kind::History), "{request:?}");
        }
        let p = plan(&inv, &Request::Retain(2), &policy(now)).unwrap();
        assert!(p.deleted_backups.is_empty(), "{:?}", p.deleted_backups);
        // `everything` asks for every backup: none is kept for the newest timeline.
        let p = plan(&inv, &Request::Everything { force: false }, &policy(now)).unwrap();
        assert!(p.kept_backups.is_empty() && p.kept_against_request.is_empty());

        // B1 permanent, so it pins only its own WAL by the rules for permanent backups: as
        // the newest backup on timeline 3's path, the WAL along that path stays too.
        let mut inv = inv;
        inv.backups[0].sentinel.is_permanent = true;
        let p = plan(&inv, &Request::Retain(2), &policy(now)).unwrap();
        assert!(p.kept_against_request.is_empty(), "a permanent backup is kept by the request");
        assert_eq!(p.wal_kept_from.as_deref(), Some("0/50000000"));
        assert_eq!(
            p.wal_kept_on_path,
            [
                WalKeptFrom { timeline: 2, from: "0/28000000".into() },
                WalKeptFrom { timeline: 3, from: "0/30000000".into() }
            ]
        );
        let k = keys(&p);
        for n in 0x30..=0x3F {
            assert!(!k.contains(&seg_key(3, n).as_str()), "timeline 3 went: {k:?}");
        }
        assert!(!k.contains(&seg_key(2, 0x2F).as_str()));
        assert!(k.contains(&seg_key(1, 0x1F).as_str()));
    }

    /// WAL-G's sentinel of a full backup F at segment 0x10 and of deltas D1 (from F, at
    /// 0x20) and D2 (from D1, at 0x30), as /tmp/review-retention/mk2.sh wrote them.
    fn delta_chain_store(now: SystemTime) -> Inventory {
        let old = now - 10 * DAY;
        let full = "base_000000010000000000000010";
        let d1 = "base_000000010000000000000020_D_000000010000000000000010";
        let d2 = "base_000000010000000000000030_D_000000010000000000000020";
        let sentinel = |start: u64, finish: &str, delta: &str| {
            format!(
                r#"{{"LSN":{},"FinishLSN":{},"FinishTime":"{finish}","StartTime":"{finish}","Version":2,"IsPermanent":false{delta}}}"#,
                seg_lsn(start),
                seg_lsn(start + 1),
            )
        };
        let sentinels = [
            (full, sentinel(0x10, "2026-11-20T10:00:00Z", "")),
            (
                d1,
                sentinel(
                    0x20,
                    "2026-11-21T10:00:00Z",
                    &format!(
                        r#","DeltaFrom":"{full}","DeltaFullName":"{full}","DeltaFromLSN":{},"DeltaCount":1"#,
                        seg_lsn(0x10)
                    ),
                ),
            ),
            (
                d2,
                sentinel(
                    0x30,
                    "2026-11-22T10:00:00Z",
                    &format!(
                        r#","DeltaFrom":"{d1}","DeltaFullName":"{full}","DeltaFromLSN":{},"DeltaCount":2"#,
                        seg_lsn(0x20)
                    ),
                ),
            ),
        ];
        let mut backups = Vec::new();
        let mut deltas = Deltas::new();
        for (name, json) in &sentinels {
            let sentinel: Sentinel = serde_json::from_str(json).unwrap();
            backups.push(BackupInfo { name: name.to_string(), sentinel });
            if let Some(d) = crate::backup::sentinel::DeltaOrigin::of_sentinel(json.as_bytes()) {
                deltas.insert(name.to_string(), d);
            }
        }
        let mut objects = Vec::new();
        for b in &backups {
            objects.extend(backup_objects(b, old));
        }
        objects.extend((0x10..=0x40).map(|n| obj(&seg_key(1, n), 16, old)));
        Inventory { objects, backups, deltas, histories: Histories::new(), segment_size: Some(SEG) }
    }

    #[test]
    fn a_kept_delta_backup_keeps_its_chain_and_its_wal() {
        let now = SystemTime::now();
        let inv = delta_chain_store(now);
        let (full, d1, d2) = (&inv.backups[0].name, &inv.backups[1].name, &inv.backups[2].name);
        assert_eq!(delta_bases(&inv.deltas, d2), [d1.as_str(), full.as_str()]);
        assert!(delta_bases(&inv.deltas, full).is_empty());
        for request in [Request::Retain(1), Request::BeforeName(d2.clone())] {
            let p = plan(&inv, &request, &policy(now)).unwrap();
            assert!(p.deleted_backups.is_empty(), "{request:?}: {:?}", p.deleted_backups);
            let rescued: Vec<&str> = p.kept_against_request.iter().map(|k| k.name.as_str()).collect();
            assert_eq!(rescued, [d1.as_str(), full.as_str()], "{request:?}");
            assert!(p.kept_against_request[0].reason.contains(d2.as_str()));
            assert!(p.delete.is_empty(), "{request:?}: {:?}", keys(&p));
            assert_eq!(p.wal_kept_from.as_deref(), Some("0/10000000"), "WAL from the chain's full backup");
        }
        // Retaining two keeps D1, which builds on F.
        let p = plan(&inv, &Request::Retain(2), &policy(now)).unwrap();
        assert!(p.deleted_backups.is_empty());
        // Only the last delta permanent: `everything` keeps its chain and the WAL from F on.
        let mut marked = inv.clone();
        marked.backups[2].sentinel.is_permanent = true;
        let p = plan(&marked, &Request::Everything { force: false }, &policy(now)).unwrap();
        assert!(p.deleted_backups.is_empty(), "{:?}", p.deleted_backups);
        assert!(p.delete.is_empty(), "{:?}", keys(&p));
        // The full backup permanent: the chain still needs the WAL from its start on.
        let mut marked = inv.clone();
        marked.backups[0].sentinel.is_permanent = true;
        let p = plan(&marked, &Request::Retain(1), &policy(now)).unwrap();
        assert!(p.delete.is_empty(), "{:?}", keys(&p));
        // FORCE takes the whole chain.
        let p = plan(&inv, &Request::Everything { force: true }, &policy(now)).unwrap();
        assert_eq!(p.deleted_backups.len(), 3);
    }
}
