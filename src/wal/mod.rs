//! PostgreSQL's WAL formats, as typed Rust: file names, LSNs and page headers.
//!
//! This module knows PostgreSQL's on-disk formats and nothing else: no I/O, no storage,
//! no configuration. Every item cites the PostgreSQL source it mirrors, so a reader can
//! check it against `src/include/access/xlog_internal.h` of the version in question.

pub mod lsn;
pub mod name;
pub mod page;

pub use lsn::Lsn;
pub use name::{SegmentId, TimelineId, WalFileName, WalNameError};
pub use page::{PageHeaderError, SegmentHeader};
