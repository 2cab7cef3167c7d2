//! Retention: which objects `wal-rs delete` removes, and the timeline knowledge it and
//! `wal-rs wal-verify` share.
//!
//! - [`timelines`]: `.history` files, the path of timelines leading to the newest one, and
//!   which timeline's file a recovery reads for each segment.
//! - [`plan`]: the decision itself, pure and unit-tested against in-memory listings.
//! - [`inventory`]: reading what the store holds into a [`plan::Inventory`].

pub mod inventory;
pub mod plan;
pub mod timelines;

pub use plan::{plan, Inventory, Kind, Plan, PlanError, Policy, Request};
