//! The objects the control plane keeps: resources (what a user calls a database), servers
//! (a PostgreSQL for a resource, leader or follower), timelines (a store prefix with its
//! parent and branch point), and their states. Loading and small pure rules only.
//!
//! Server states, in the order a server goes through them:
//! `provisioning` -> `restoring` -> `starting` -> [`recovering` (point-in-time restores)]
//! -> [`backing_up` (leaders)] -> `available`; `promoting` (unfollow) -> `backing_up`;
//! `destroying` -> `destroyed`; `failed` when a step can never succeed (no backup to restore).
//!
//! Resource states: `creating` -> `available`; `rolling_back` -> `available`;
//! `destroying` -> `destroyed`; `failed`.

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio_postgres::GenericClient;

use crate::provider::Handle;

/// Where a server's data comes from, fixed when it is created (or re-pointed on rollback).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "source", rename_all = "snake_case")]
pub enum Spec {
    /// A new, empty cluster (create database).
    Initdb,
    /// A standby of `leader`: its timeline's latest backup with `--standby`, then streaming.
    Standby {
        /// The server it follows.
        leader: String,
    },
    /// A point-in-time restore from another timeline's archive (fork, rollback).
    Pitr {
        /// The timeline restored from.
        from_timeline: String,
        /// recovery_target_time in UTC (`YYYY-MM-DD HH:MM:SS.ffffff+00`); none: the end of
        /// the archive.
        target_time: Option<String>,
    },
}

/// A server row.
#[derive(Debug, Clone)]
pub struct Server {
    /// Id.
    pub id: String,
    /// Resource it serves.
    pub resource_id: String,
    /// `leader` or `follower`.
    pub role: String,
    /// Current state.
    pub state: String,
    /// The timeline it writes (leader) or follows.
    pub timeline_id: String,
    /// The timeline's store.
    pub store: String,
    /// Where its data comes from.
    pub spec: Spec,
    /// The provider's handle, once created.
    pub handle: Option<Handle>,
    /// Bumped by every change made by someone other than the server's own step (re-pointing
    /// on rollback, unfollow, destroy); a step's result commits only if it is unchanged.
    pub generation: i64,
    /// Times it was sent back to `restoring` because it kept failing to start; reset once it
    /// is available.
    pub restore_restarts: i32,
}

/// States after which a server needs no work until something changes.
pub fn server_settled(state: &str) -> bool {
    matches!(state, "available" | "destroyed" | "failed")
}

/// States in which a server has no data a user wrote yet, so a step failing again and again
/// may start over from an empty folder.
pub fn server_restartable(state: &str) -> bool {
    matches!(state, "starting" | "recovering")
}

/// Loads server `id` (with its timeline's store).
pub async fn load_server(c: &impl GenericClient, id: &str) -> Result<Option<Server>> {
    let row = c
        .query_opt(
            "SELECT s.id, s.resource_id, s.role, s.state, s.timeline_id, t.store, s.spec, s.handle, s.generation,
                    s.restore_restarts
             FROM servers s JOIN timelines t ON t.id = s.timeline_id WHERE s.id = $1",
            &[&id],
        )
        .await?;
    let Some(r) = row else { return Ok(None) };
    let spec: Value = r.get(6);
    let handle: Option<Value> = r.get(7);
    Ok(Some(Server {
        id: r.get(0),
        resource_id: r.get(1),
        role: r.get(2),
        state: r.get(3),
        timeline_id: r.get(4),
        store: r.get(5),
        spec: serde_json::from_value(spec).context("server spec")?,
        handle: handle.map(serde_json::from_value).transpose().context("server handle")?,
        generation: r.get(8),
        restore_restarts: r.get(9),
    }))
}

/// The store of timeline `id`.
pub async fn timeline_store(c: &impl GenericClient, id: &str) -> Result<String> {
    let row = c.query_one("SELECT store FROM timelines WHERE id = $1", &[&id]).await?;
    Ok(row.get(0))
}

/// Inserts a timeline under the store root; returns its id.
pub async fn new_timeline(
    c: &impl GenericClient,
    store_root: &str,
    parent: Option<&str>,
    branch_time: Option<&str>,
    branch_lsn: Option<&str>,
) -> Result<String> {
    let id = crate::db::new_id("tl");
    let store = format!("{}/{id}", store_root.trim_end_matches('/'));
    c.execute(
        "INSERT INTO timelines (id, parent_id, store, branch_time, branch_lsn) VALUES ($1, $2, $3, $4::text::timestamptz, $5)",
        &[&id, &parent, &store, &branch_time, &branch_lsn],
    )
    .await?;
    Ok(id)
}

/// Inserts a server in `provisioning` and enqueues its first step.
pub async fn new_server(
    c: &impl GenericClient,
    resource: &str,
    role: &str,
    timeline: &str,
    spec: &Spec,
) -> Result<String> {
    let id = crate::db::new_id("srv");
    c.execute(
        "INSERT INTO servers (id, resource_id, role, state, timeline_id, spec) VALUES ($1, $2, $3, 'provisioning', $4, $5)",
        &[&id, &resource, &role, &timeline, &serde_json::to_value(spec)?],
    )
    .await?;
    crate::queue::enqueue(c, "server", &id).await?;
    crate::info!(
        "event" = "server_created",
        "server" = id,
        "resource" = resource,
        "role" = role,
        "timeline" = timeline
    );
    Ok(id)
}

/// Parses a PostgreSQL LSN (`X/Y`).
pub fn parse_lsn(s: &str) -> Option<u64> {
    let (hi, lo) = s.split_once('/')?;
    Some((u64::from_str_radix(hi, 16).ok()? << 32) | u64::from_str_radix(lo, 16).ok()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lsn_parses() {
        assert_eq!(parse_lsn("0/16B3748"), Some(0x16B3748));
        assert_eq!(parse_lsn("1/0"), Some(1 << 32));
        assert_eq!(parse_lsn("x"), None);
    }

    #[test]
    fn spec_round_trips_as_tagged_json() {
        let s = Spec::Pitr { from_timeline: "tl-1".into(), target_time: Some("2026-01-01 00:00:00+00".into()) };
        let v = serde_json::to_value(&s).unwrap();
        assert_eq!(v["source"], "pitr");
        assert_eq!(serde_json::from_value::<Spec>(v).unwrap(), s);
    }
}
