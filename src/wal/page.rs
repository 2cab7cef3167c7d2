//! The long page header that starts every WAL segment (`XLogLongPageHeaderData` in
//! `xlog_internal.h`), and the checks wal-push makes with it before archiving a segment.
//!
//! Layout (little-endian, as on every platform PostgreSQL runs on here; MAXALIGN 8):
//! `xlp_magic u16 @0, xlp_info u16 @2, xlp_tli u32 @4, xlp_pageaddr u64 @8,
//! xlp_rem_len u32 @16, padding @20, xlp_sysid u64 @24, xlp_seg_size u32 @32,
//! xlp_xlog_blcksz u32 @36`: 40 bytes.

use super::{Lsn, SegmentId, TimelineId};

/// Bytes of the long page header (`SizeOfXLogLongPHD`).
pub const LONG_HEADER_SIZE: usize = 40;

/// `XLP_LONG_HEADER`: set in `xlp_info` on the first page of every segment.
const XLP_LONG_HEADER: u16 = 0x0002;
/// `XLP_ALL_FLAGS`: every flag bit a valid page header may carry. `0x0008`
/// (`XLP_FIRST_IS_OVERWRITE_CONTRECORD`, PostgreSQL 14, and 10.19, 11.14, 12.9 and 13.5
/// onward) marks the page after a record cut off by a crash; when that page starts a
/// segment, the segment is valid WAL and must be archived like any other.
const XLP_ALL_FLAGS: u16 = 0x000F;

/// `XLOG_PAGE_MAGIC` of each PostgreSQL major version whose WAL wal-rs accepts.
const PAGE_MAGICS: &[(u16, u32)] = &[
    (0xD097, 10),
    (0xD098, 11),
    (0xD101, 12),
    (0xD106, 13),
    (0xD10D, 14),
    (0xD110, 15),
    (0xD113, 16),
    (0xD116, 17),
    (0xD118, 18),
];

/// What the first page of a segment says about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentHeader {
    /// PostgreSQL major version, from the page magic.
    pub pg_major: u32,
    /// The cluster's system identifier (`xlp_sysid`): unique per `initdb`.
    pub system_identifier: u64,
    /// The segment size the cluster was initialised with (`xlp_seg_size`).
    pub segment_size: u32,
    /// The WAL block size (`xlp_xlog_blcksz`).
    pub block_size: u32,
    /// The timeline of the first page (`xlp_tli`).
    pub page_timeline: TimelineId,
    /// The LSN of the first page (`xlp_pageaddr`).
    pub page_address: Lsn,
}

/// Why a file's first page is not the start of the segment its name promises.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PageHeaderError {
    /// Shorter than one long page header.
    #[error("file is {0} bytes, too short for a WAL page header")]
    TooShort(usize),
    /// The magic number belongs to no PostgreSQL version wal-rs knows.
    #[error("page magic {0:#06X} is not a PostgreSQL WAL page (versions 10 to 18)")]
    UnknownMagic(u16),
    /// The first page lacks the long-header flag, or carries unknown flags.
    #[error("first page flags {0:#06X} are not those of a segment's first page")]
    BadFlags(u16),
    /// The segment size field is not a power of two between 1 MiB and 1 GiB.
    #[error("segment size {0} in the page header is not a power of two from 1 MiB to 1 GiB")]
    BadSegmentSize(u32),
    /// The block size field is not a power of two between 1 KiB and 64 KiB.
    #[error("WAL block size {0} in the page header is not a power of two from 1 KiB to 64 KiB")]
    BadBlockSize(u32),
    /// The page address is not where the file name says the segment starts.
    #[error("page address {found} does not match the file name, which starts at {expected}")]
    WrongAddress {
        /// Where the name says the segment starts.
        expected: Lsn,
        /// What the header says.
        found: Lsn,
    },
    /// The page's timeline is newer than the file name's, or zero.
    #[error("page timeline {found} does not fit the file name's timeline {name}")]
    WrongTimeline {
        /// The timeline in the file name.
        name: TimelineId,
        /// The timeline in the page header.
        found: u32,
    },
}

impl SegmentHeader {
    /// Decodes and checks the long page header at the start of `bytes`, for the segment
    /// named `(timeline, segment)`.
    ///
    /// The page timeline may be older than the name's: when a timeline switch happens in
    /// the middle of a segment, PostgreSQL starts the new timeline's file with a copy of
    /// the old one (`XLogInitNewTimeline`), first page header included.
    pub fn parse(bytes: &[u8], timeline: TimelineId, segment: SegmentId) -> Result<SegmentHeader, PageHeaderError> {
        if bytes.len() < LONG_HEADER_SIZE {
            return Err(PageHeaderError::TooShort(bytes.len()));
        }
        let u16_at = |o: usize| u16::from_le_bytes([bytes[o], bytes[o + 1]]);
        let u32_at = |o: usize| u32::from_le_bytes(bytes[o..o + 4].try_into().unwrap());
        let u64_at = |o: usize| u64::from_le_bytes(bytes[o..o + 8].try_into().unwrap());

        let magic = u16_at(0);
        let pg_major = PAGE_MAGICS
            .iter()
            .find(|(m, _)| *m == magic)
            .map(|(_, v)| *v)
            .ok_or(PageHeaderError::UnknownMagic(magic))?;
        let info = u16_at(2);
        if info & XLP_LONG_HEADER == 0 || info & !XLP_ALL_FLAGS != 0 {
            return Err(PageHeaderError::BadFlags(info));
        }
        let segment_size = u32_at(32);
        if !segment_size.is_power_of_two() || !(1 << 20..=1 << 30).contains(&segment_size) {
            return Err(PageHeaderError::BadSegmentSize(segment_size));
        }
        let block_size = u32_at(36);
        if !block_size.is_power_of_two() || !(1 << 10..=1 << 16).contains(&block_size) {
            return Err(PageHeaderError::BadBlockSize(block_size));
        }
        let page_tli = u32_at(4);
        if page_tli == 0 || page_tli > timeline.0 {
            return Err(PageHeaderError::WrongTimeline { name: timeline, found: page_tli });
        }
        let page_address = Lsn(u64_at(8));
        let expected = segment.start_lsn(segment_size);
        if page_address != expected || (segment.seg as u64) * segment_size as u64 >= 1 << 32 {
            return Err(PageHeaderError::WrongAddress { expected, found: page_address });
        }
        Ok(SegmentHeader {
            pg_major,
            system_identifier: u64_at(24),
            segment_size,
            block_size,
            page_timeline: TimelineId(page_tli),
            page_address,
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A first page as PostgreSQL 15 writes it, for tests across the crate.
    pub(crate) fn pg15_first_page(tli: u32, address: u64, sysid: u64, seg_size: u32) -> Vec<u8> {
        let mut page = vec![0u8; 8192];
        page[0..2].copy_from_slice(&0xD110u16.to_le_bytes());
        page[2..4].copy_from_slice(&XLP_LONG_HEADER.to_le_bytes());
        page[4..8].copy_from_slice(&tli.to_le_bytes());
        page[8..16].copy_from_slice(&address.to_le_bytes());
        page[24..32].copy_from_slice(&sysid.to_le_bytes());
        page[32..36].copy_from_slice(&seg_size.to_le_bytes());
        page[36..40].copy_from_slice(&8192u32.to_le_bytes());
        page
    }

    const SEG: u32 = 16 << 20;

    #[test]
    fn a_valid_header_is_decoded() {
        let page = pg15_first_page(1, 0x3000000, 7712412929493074945, SEG);
        let h = SegmentHeader::parse(&page, TimelineId(1), SegmentId { log: 0, seg: 3 }).unwrap();
        assert_eq!(h.pg_major, 15);
        assert_eq!(h.system_identifier, 7712412929493074945);
        assert_eq!(h.segment_size, SEG);
        assert_eq!(h.page_address, Lsn(0x3000000));
    }

    #[test]
    fn a_new_timeline_may_start_with_the_old_timelines_page() {
        let page = pg15_first_page(1, 0x3000000, 1, SEG);
        assert!(SegmentHeader::parse(&page, TimelineId(2), SegmentId { log: 0, seg: 3 }).is_ok());
        assert!(matches!(
            SegmentHeader::parse(&pg15_first_page(3, 0x3000000, 1, SEG), TimelineId(2), SegmentId { log: 0, seg: 3 }),
            Err(PageHeaderError::WrongTimeline { .. })
        ));
    }

    /// After a crash that cut a record spanning a segment boundary, PostgreSQL starts the
    /// next segment with `XLP_FIRST_IS_OVERWRITE_CONTRECORD` (0x0008) beside the long-header
    /// flag (0x000A), alone or with the other flags: such segments are archived.
    #[test]
    fn a_segment_that_overwrites_a_cut_record_is_accepted() {
        for info in [0x000Au16, 0x000B, 0x000E, 0x000F] {
            let mut page = pg15_first_page(1, 0x3000000, 1, SEG);
            page[2..4].copy_from_slice(&info.to_le_bytes());
            let parsed = SegmentHeader::parse(&page, TimelineId(1), SegmentId { log: 0, seg: 3 });
            assert!(parsed.is_ok(), "xlp_info {info:#06x}: {parsed:?}");
        }
    }

    #[test]
    fn headers_that_disagree_with_the_name_are_refused() {
        let id = SegmentId { log: 0, seg: 3 };
        let t = TimelineId(1);
        let wrong_addr = pg15_first_page(1, 0x4000000, 1, SEG);
        assert!(matches!(SegmentHeader::parse(&wrong_addr, t, id), Err(PageHeaderError::WrongAddress { .. })));
        let mut bad_magic = pg15_first_page(1, 0x3000000, 1, SEG);
        bad_magic[0] = 0;
        assert!(matches!(SegmentHeader::parse(&bad_magic, t, id), Err(PageHeaderError::UnknownMagic(_))));
        let mut short_header = pg15_first_page(1, 0x3000000, 1, SEG);
        short_header[2] = 0;
        assert!(matches!(SegmentHeader::parse(&short_header, t, id), Err(PageHeaderError::BadFlags(_))));
        let mut unknown_flag = pg15_first_page(1, 0x3000000, 1, SEG);
        unknown_flag[2] |= 0x10;
        assert!(matches!(SegmentHeader::parse(&unknown_flag, t, id), Err(PageHeaderError::BadFlags(_))));
        let odd_size = pg15_first_page(1, 0x3000000, 1, 3 << 20);
        assert!(matches!(SegmentHeader::parse(&odd_size, t, id), Err(PageHeaderError::BadSegmentSize(_))));
        assert_eq!(SegmentHeader::parse(&[0; 10], t, id), Err(PageHeaderError::TooShort(10)));
        // seg 0x100 does not exist with 16 MiB segments: 256 per log.
        let past_end = pg15_first_page(1, 0x1_0000_0000, 1, SEG);
        assert!(SegmentHeader::parse(&past_end, t, SegmentId { log: 0, seg: 0x100 }).is_err());
        // Nor past the end of the LSN space (this overflowed before it was refused).
        let page = pg15_first_page(1, 0, 1, SEG);
        assert!(SegmentHeader::parse(&page, t, SegmentId { log: u32::MAX, seg: u32::MAX }).is_err());
    }
}
