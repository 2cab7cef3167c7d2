//! Timeline history: PostgreSQL's `.history` files (`writeTimeLineHistory` in
//! `timeline.c`) and the questions retention and wal-verify ask of them: which timelines
//! lead to the newest one, and which timeline holds a given segment on that path.
//!
//! A history file of timeline N lists, one line per ancestor, `parentTLI <tab> switchpoint
//! <tab> reason`: the ancestor's WAL is valid up to the switchpoint LSN, where the next
//! timeline begins. Comment lines (`#`) and blank lines are skipped, as PostgreSQL's
//! `readTimeLineHistory` does.

use std::collections::BTreeMap;

use crate::wal::{Lsn, SegmentId, TimelineId};

/// One ancestor in a history file: `tli` ended at `switchpoint`, where its child began.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HistoryEntry {
    /// The ancestor timeline.
    pub tli: TimelineId,
    /// Where its WAL stops being valid on the path (the child's first LSN).
    pub switchpoint: Lsn,
}

/// A line of a `.history` file that is not `TLI <tab> X/X ...`.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("line {line} is not \"parentTLI<tab>switchpoint<tab>reason\": {text:?}")]
pub struct HistoryParseError {
    /// The 1-based line number.
    pub line: usize,
    /// The line.
    pub text: String,
}

/// Parses a history file's text, oldest ancestor first.
pub fn parse_history(text: &str) -> Result<Vec<HistoryEntry>, HistoryParseError> {
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let err = || HistoryParseError { line: i + 1, text: raw.to_string() };
        let mut fields = line.split_whitespace();
        let tli = fields.next().and_then(|t| t.parse::<u32>().ok()).filter(|&t| t > 0).ok_or_else(err)?;
        let switchpoint = fields.next().and_then(|l| l.parse::<Lsn>().ok()).ok_or_else(err)?;
        if out.last().is_some_and(|prev: &HistoryEntry| prev.tli.0 >= tli) {
            return Err(err());
        }
        out.push(HistoryEntry { tli: TimelineId(tli), switchpoint });
    }
    Ok(out)
}

/// The path of timelines that leads to one timeline: its ancestors with their switchpoints,
/// then itself (which has no end).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TimelinePath {
    /// Ancestors, oldest first, each with the LSN where it ends on this path.
    pub ancestors: Vec<HistoryEntry>,
    /// The timeline the path leads to.
    pub tip: TimelineId,
}

/// One stretch of a path: segments `first..=last` (`last` open for the tip) are read from
/// timeline `tli` by a recovery that follows the path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stretch {
    /// The timeline whose files hold these segments.
    pub tli: TimelineId,
    /// First segment number on this stretch.
    pub first: u64,
    /// Last segment number, `None` for the tip (up to the newest WAL).
    pub last: Option<u64>,
}

impl TimelinePath {
    /// The path to `tip` given its history (`parse_history` of `<tip>.history`; empty for
    /// timeline 1).
    pub fn new(tip: TimelineId, history: Vec<HistoryEntry>) -> TimelinePath {
        TimelinePath { ancestors: history, tip }
    }

    /// The path to `tip` from the store's history files (none for `tip`: the timeline alone).
    pub fn from_histories(histories: &Histories, tip: TimelineId) -> TimelinePath {
        TimelinePath::new(tip, histories.get(&tip).cloned().unwrap_or_default())
    }

    /// Whether `tli` is on the path.
    pub fn contains(&self, tli: TimelineId) -> bool {
        tli == self.tip || self.ancestors.iter().any(|e| e.tli == tli)
    }

    /// Every timeline on the path, oldest first.
    pub fn timelines(&self) -> Vec<TimelineId> {
        self.ancestors.iter().map(|e| e.tli).chain([self.tip]).collect()
    }

    /// Which timeline's file a recovery following the path reads for each segment number,
    /// as stretches, oldest first. At a switch the segment holding the switchpoint is read
    /// from the new timeline (PostgreSQL copies its first part into the new timeline's
    /// file), so an ancestor's stretch ends one segment before it.
    pub fn stretches(&self, segment_size: u32) -> Vec<Stretch> {
        let mut out = Vec::new();
        let mut first = 0u64;
        for e in &self.ancestors {
            let switch_seg = segno(SegmentId::containing(e.switchpoint, segment_size), segment_size);
            if switch_seg > first {
                out.push(Stretch { tli: e.tli, first, last: Some(switch_seg - 1) });
            }
            first = first.max(switch_seg);
        }
        out.push(Stretch { tli: self.tip, first, last: None });
        out
    }

    /// [`TimelinePath::stretches`] from segment `start` on: none begins before `start`, and
    /// those the path left before `start` are gone.
    pub fn stretches_from(&self, start: u64, segment_size: u32) -> Vec<Stretch> {
        self.stretches(segment_size)
            .into_iter()
            .map(|s| Stretch { first: s.first.max(start), ..s })
            .filter(|s| s.last.is_none_or(|last| s.first <= last))
            .collect()
    }

    /// The timeline whose file holds segment `seg` on this path.
    pub fn timeline_of(&self, seg: u64, segment_size: u32) -> TimelineId {
        self.stretches(segment_size)
            .into_iter()
            .find(|s| seg >= s.first && s.last.is_none_or(|l| seg <= l))
            .map(|s| s.tli)
            .unwrap_or(self.tip)
    }

    /// Whether a backup that ran from `start` to `finish` (when known) on `tli` lies on this
    /// path: its timeline is on the path and the path had not left that timeline yet, at
    /// its start nor at its finish. A backup that finished after the switch is not: its
    /// backup-end record is on the abandoned part of `tli`, which a recovery following the
    /// path never replays, so it never becomes consistent.
    pub fn passes(&self, tli: TimelineId, start: Lsn, finish: Option<Lsn>) -> bool {
        if tli == self.tip {
            return true;
        }
        self.ancestors
            .iter()
            .any(|e| e.tli == tli && start < e.switchpoint && finish.is_none_or(|f| f <= e.switchpoint))
    }
}

/// A segment's number counted from the start of the WAL (`XLogSegNo`).
pub fn segno(seg: SegmentId, segment_size: u32) -> u64 {
    seg.start_lsn(segment_size).0 / segment_size as u64
}

/// The segment with number `n`.
pub fn segment_of(n: u64, segment_size: u32) -> SegmentId {
    SegmentId::containing(Lsn(n * segment_size as u64), segment_size)
}

/// Timeline -> its ancestors, for every history file read.
pub type Histories = BTreeMap<TimelineId, Vec<HistoryEntry>>;

/// Whether `ancestor` is `tli` itself or one of its ancestors according to `histories`
/// (a timeline with no history file known has no ancestors but itself).
pub fn descends_from(histories: &Histories, tli: TimelineId, ancestor: TimelineId) -> bool {
    tli == ancestor || histories.get(&tli).is_some_and(|h| h.iter().any(|e| e.tli == ancestor))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEG: u32 = 16 << 20;

    #[test]
    fn parses_what_postgres_writes() {
        let text = "1\t0/5000000\tno recovery target specified\n\n2\t0/9000A28\tbefore 2026-11-26 10:00:00+00\n";
        let h = parse_history(text).unwrap();
        assert_eq!(
            h,
            vec![
                HistoryEntry { tli: TimelineId(1), switchpoint: Lsn(0x500_0000) },
                HistoryEntry { tli: TimelineId(2), switchpoint: Lsn(0x900_0A28) },
            ]
        );
        assert!(parse_history("# comment only\n").unwrap().is_empty());
        assert_eq!(parse_history("1\tnot-an-lsn\tx\n").unwrap_err().line, 1);
        assert!(parse_history("2\t0/1\tx\n1\t0/2\ty\n").is_err(), "ancestors must come oldest first");
    }

    #[test]
    fn stretches_switch_at_the_segment_holding_the_switchpoint() {
        let path = TimelinePath::new(TimelineId(3), parse_history("1\t0/5000000\ta\n2\t0/90000A8\tb\n").unwrap());
        let s = path.stretches(SEG);
        assert_eq!(
            s,
            vec![
                Stretch { tli: TimelineId(1), first: 0, last: Some(4) },
                Stretch { tli: TimelineId(2), first: 5, last: Some(8) },
                Stretch { tli: TimelineId(3), first: 9, last: None },
            ]
        );
        assert_eq!(path.timeline_of(4, SEG), TimelineId(1));
        assert_eq!(path.timeline_of(9, SEG), TimelineId(3));
        assert_eq!(path.timeline_of(900, SEG), TimelineId(3));
        assert!(path.passes(TimelineId(1), Lsn(0x300_0028), None));
        assert!(!path.passes(TimelineId(1), Lsn(0x600_0028), None), "timeline 1 after the switch is another branch");
        assert!(path.passes(TimelineId(3), Lsn(0x100), None));
        assert!(!path.contains(TimelineId(4)));
    }

    #[test]
    fn a_backup_that_finished_after_the_switch_is_off_the_path() {
        let path = TimelinePath::new(TimelineId(2), parse_history("1\t0/5000000\tpromoted\n").unwrap());
        let start = Lsn(0x300_0028);
        assert!(path.passes(TimelineId(1), start, Some(Lsn(0x480_0000))));
        assert!(path.passes(TimelineId(1), start, Some(Lsn(0x500_0000))), "the end record ends at the switch");
        assert!(
            !path.passes(TimelineId(1), start, Some(Lsn(0x600_0100))),
            "its backup-end record is on timeline 1 past the switch, which the path never replays"
        );
        assert!(path.passes(TimelineId(2), start, Some(Lsn(0x600_0100))), "the tip has no end");
    }

    #[test]
    fn segment_numbers_round_trip() {
        let s = SegmentId { log: 1, seg: 3 };
        assert_eq!(segno(s, SEG), 256 + 3);
        assert_eq!(segment_of(259, SEG), s);
        let mut h = Histories::new();
        h.insert(TimelineId(3), parse_history("1\t0/5000000\ta\n2\t0/9000000\tb\n").unwrap());
        assert!(descends_from(&h, TimelineId(3), TimelineId(1)));
        assert!(!descends_from(&h, TimelineId(2), TimelineId(1)), "no history file for 2 is known");
    }
}
