//! WAL file names, as PostgreSQL builds them (`XLogFileName`, `TLHistoryFileName`,
//! `BackupHistoryFileName` and their `Is*` checks in `xlog_internal.h`).
//!
//! A segment name is `TTTTTTTTXXXXXXXXYYYYYYYY`: timeline, then the segment number split
//! into "log" and "seg" halves. How many segments one "log" holds depends on the segment
//! size, so [`SegmentId`] keeps the two halves as written and computes positions only when
//! given the size.

use std::fmt;
use std::str::FromStr;

use super::Lsn;

/// A timeline (`TimeLineID`). Timeline 0 does not exist.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TimelineId(pub u32);

impl fmt::Display for TimelineId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A segment's position, as the `XXXXXXXXYYYYYYYY` half of its name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SegmentId {
    /// The high 32 bits of the segment's start LSN.
    pub log: u32,
    /// The segment's index within that 4 GiB range.
    pub seg: u32,
}

impl SegmentId {
    /// The LSN at which this segment starts (`XLogSegNoOffsetToRecPtr` with offset 0).
    ///
    /// A name can say more than the LSN space holds (`seg` past the segments of one log, at
    /// the last log): the result then wraps, as it always did in release builds, and never
    /// panics; [`crate::wal::SegmentHeader::parse`] refuses such names.
    pub fn start_lsn(self, segment_size: u32) -> Lsn {
        Lsn(((self.log as u64) << 32).wrapping_add(self.seg as u64 * segment_size as u64))
    }

    /// The segment that holds `lsn` (`XLByteToSeg` followed by `XLogFileName`'s split).
    pub fn containing(lsn: Lsn, segment_size: u32) -> SegmentId {
        let per_log = segments_per_log(segment_size);
        let segno = lsn.0 / segment_size as u64;
        SegmentId { log: (segno / per_log) as u32, seg: (segno % per_log) as u32 }
    }

    /// The segment after this one (after the last segment of the LSN space: the first).
    pub fn next(self, segment_size: u32) -> SegmentId {
        if (self.seg as u64) + 1 >= segments_per_log(segment_size) {
            SegmentId { log: self.log.wrapping_add(1), seg: 0 }
        } else {
            SegmentId { log: self.log, seg: self.seg + 1 }
        }
    }
}

/// `XLogSegmentsPerXLogId`: how many segments one "log" (4 GiB of LSN space) holds.
fn segments_per_log(segment_size: u32) -> u64 {
    0x1_0000_0000 / segment_size as u64
}

/// A file name that PostgreSQL hands to `archive_command` or asks of `restore_command`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WalFileName {
    /// A WAL segment: `000000010000000000000003`.
    Segment(TimelineId, SegmentId),
    /// The unfinished last segment of a timeline, archived on promotion:
    /// `000000010000000000000003.partial`.
    Partial(TimelineId, SegmentId),
    /// A timeline history file: `00000002.history`.
    History(TimelineId),
    /// A backup history file: `000000010000000000000002.00000028.backup` (the number is the
    /// backup's start offset within the segment).
    BackupHistory(TimelineId, SegmentId, u32),
}

/// A file name that is none of the names PostgreSQL archives.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "{0:?} is not a WAL file name: expected a segment (24 hex digits), a .partial or .backup file, or a timeline .history file"
)]
pub struct WalNameError(pub String);

impl WalFileName {
    /// Parses a name as PostgreSQL's `Is*FileName` checks do: upper-case hex only.
    pub fn parse(name: &str) -> Result<WalFileName, WalNameError> {
        let err = || WalNameError(name.to_string());
        if let Some(tli) = name.strip_suffix(".history") {
            let tli = parse_timeline(tli).ok_or_else(err)?;
            return Ok(WalFileName::History(tli));
        }
        if let Some(base) = name.strip_suffix(".partial") {
            let (tli, seg) = parse_segment(base).ok_or_else(err)?;
            return Ok(WalFileName::Partial(tli, seg));
        }
        if let Some(rest) = name.strip_suffix(".backup") {
            let (base, offset) = rest.split_once('.').ok_or_else(err)?;
            let (tli, seg) = parse_segment(base).ok_or_else(err)?;
            let offset = parse_hex_u32(offset).ok_or_else(err)?;
            return Ok(WalFileName::BackupHistory(tli, seg, offset));
        }
        let (tli, seg) = parse_segment(name).ok_or_else(err)?;
        Ok(WalFileName::Segment(tli, seg))
    }

    /// The timeline this file belongs to.
    pub fn timeline(&self) -> TimelineId {
        match *self {
            WalFileName::Segment(t, _)
            | WalFileName::Partial(t, _)
            | WalFileName::History(t)
            | WalFileName::BackupHistory(t, _, _) => t,
        }
    }

    /// The segment a segment or `.partial` file holds; `None` for history and backup files,
    /// which carry no WAL pages.
    pub fn wal_segment(&self) -> Option<SegmentId> {
        match *self {
            WalFileName::Segment(_, s) | WalFileName::Partial(_, s) => Some(s),
            _ => None,
        }
    }
}

impl fmt::Display for WalFileName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            WalFileName::Segment(t, s) => write!(f, "{:08X}{:08X}{:08X}", t.0, s.log, s.seg),
            WalFileName::Partial(t, s) => {
                write!(f, "{:08X}{:08X}{:08X}.partial", t.0, s.log, s.seg)
            }
            WalFileName::History(t) => write!(f, "{:08X}.history", t.0),
            WalFileName::BackupHistory(t, s, o) => {
                write!(f, "{:08X}{:08X}{:08X}.{:08X}.backup", t.0, s.log, s.seg, o)
            }
        }
    }
}

impl FromStr for WalFileName {
    type Err = WalNameError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        WalFileName::parse(s)
    }
}

fn parse_hex_u32(s: &str) -> Option<u32> {
    // PostgreSQL writes and accepts only upper-case digits (`strspn(fname, "0123456789ABCDEF")`).
    if s.len() != 8 || !s.bytes().all(|b| b.is_ascii_digit() || (b'A'..=b'F').contains(&b)) {
        return None;
    }
    u32::from_str_radix(s, 16).ok()
}

fn parse_timeline(s: &str) -> Option<TimelineId> {
    parse_hex_u32(s).filter(|&t| t != 0).map(TimelineId)
}

fn parse_segment(s: &str) -> Option<(TimelineId, SegmentId)> {
    if s.len() != 24 || !s.is_ascii() {
        return None;
    }
    let tli = parse_timeline(&s[0..8])?;
    let log = parse_hex_u32(&s[8..16])?;
    let seg = parse_hex_u32(&s[16..24])?;
    Some((tli, SegmentId { log, seg }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for name in [
            "000000010000000000000003",
            "0000000A00000001000000FF",
            "000000010000000000000003.partial",
            "00000002.history",
            "000000010000000000000002.00000028.backup",
        ] {
            assert_eq!(WalFileName::parse(name).unwrap().to_string(), name);
        }
    }

    #[test]
    fn names_keep_their_parts() {
        let n = WalFileName::parse("0000000200000001000000FE").unwrap();
        assert_eq!(n, WalFileName::Segment(TimelineId(2), SegmentId { log: 1, seg: 0xFE }));
        assert_eq!(n.timeline(), TimelineId(2));
        assert_eq!(
            WalFileName::parse("000000010000000000000002.00000028.backup").unwrap(),
            WalFileName::BackupHistory(TimelineId(1), SegmentId { log: 0, seg: 2 }, 0x28)
        );
        assert_eq!(WalFileName::parse("00000002.history").unwrap().wal_segment(), None);
    }

    #[test]
    fn names_postgres_would_not_write_are_refused() {
        for name in [
            "",
            "00000001000000000000003",
            "0000000100000000000000030",
            "00000001000000000000000a",
            "000000000000000000000003",
            "00000000.history",
            "0000000g.history",
            "000000010000000000000003.part",
            "000000010000000000000002.0028.backup",
            "RECOVERYXLOG",
            "../00000001000000000000003",
            "postgresql.conf",
            "00000001000000000000000３",
        ] {
            assert!(WalFileName::parse(name).is_err(), "{name:?} was accepted");
        }
    }

    #[test]
    fn segment_positions_follow_the_segment_size() {
        let s = SegmentId { log: 1, seg: 0xFF };
        assert_eq!(s.start_lsn(16 << 20), Lsn(0x1_FF00_0000));
        assert_eq!(s.next(16 << 20), SegmentId { log: 2, seg: 0 });
        assert_eq!(SegmentId { log: 0, seg: 3 }.next(1 << 30), SegmentId { log: 1, seg: 0 });
        assert_eq!(SegmentId::containing(Lsn(0x2000028), 16 << 20), SegmentId { log: 0, seg: 2 });
        assert_eq!(SegmentId::containing(Lsn(0x1_FF00_0000), 16 << 20), s);
    }

    #[test]
    fn names_past_the_lsn_space_do_not_overflow() {
        let last = SegmentId { log: u32::MAX, seg: u32::MAX };
        let _ = last.start_lsn(1 << 30);
        assert_eq!(SegmentId { log: u32::MAX, seg: 0xFF }.next(16 << 20), SegmentId { log: 0, seg: 0 });
    }
}
