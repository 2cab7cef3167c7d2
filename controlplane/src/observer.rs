//! The observer: every tick, for every server that should be running, record what is true
//! of it now (reachable, in recovery, replay lag, archiving, last backup, disk used) as one
//! jsonb row in `observations`. It never acts; the clock reads the facts and enqueues repairs.

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::Result;
use serde_json::{json, Value};

use crate::converge::Ctx;
use crate::model::parse_lsn;
use crate::provider::{Handle, Provider};
use crate::{db, pgconn};

/// Runs ticks until the process ends.
pub async fn run(ctx: Arc<Ctx>) {
    crate::info!("event" = "started", "process" = "observer");
    loop {
        if let Err(e) = tick(&ctx).await {
            crate::warn!("event" = "observer_error", "error" = format!("{e:#}"));
        }
        tokio::time::sleep(ctx.cfg.observe_every()).await;
    }
}

/// Observes every server once; leaders first, so followers' lag is measured against the
/// leader's position of this tick.
pub async fn tick(ctx: &Arc<Ctx>) -> Result<()> {
    let c = db::connect(&ctx.conninfo).await?;
    let rows = c
        .query(
            "SELECT s.id, s.role, s.handle, s.spec->>'leader',
                    (SELECT b.name || ' ' || coalesce(b.info->>'finish_time', '') FROM backups b
                      WHERE b.timeline_id = s.timeline_id ORDER BY b.name DESC LIMIT 1)
             FROM servers s
             WHERE s.handle IS NOT NULL AND s.state IN ('starting', 'recovering', 'promoting', 'backing_up', 'available')
             ORDER BY s.role = 'follower', s.id",
            &[],
        )
        .await?;
    let mut leader_lsn: HashMap<String, u64> = HashMap::new();
    let mut set = tokio::task::JoinSet::new();
    let mut followers = Vec::new();
    for r in rows {
        let (id, role): (String, String) = (r.get(0), r.get(1));
        let Ok(h) = serde_json::from_value::<Handle>(r.get(2)) else { continue };
        let leader: Option<String> = r.get(3);
        let backup: Option<String> = r.get(4);
        if role == "leader" {
            let ctx = ctx.clone();
            set.spawn(async move { (id.clone(), observe(&ctx, &h, backup).await) });
        } else {
            followers.push((id, h, leader, backup));
        }
    }
    let mut facts = Vec::new();
    while let Some(Ok((id, f))) = set.join_next().await {
        if let Some(lsn) = f["lsn"].as_str().and_then(parse_lsn) {
            leader_lsn.insert(id.clone(), lsn);
        }
        facts.push((id, f));
    }
    for (id, h, leader, backup) in followers {
        let ctx = ctx.clone();
        let leader_pos = leader.and_then(|l| leader_lsn.get(&l).copied());
        set.spawn(async move {
            let mut f = observe(&ctx, &h, backup).await;
            if let (Some(l), Some(me)) = (leader_pos, f["lsn"].as_str().and_then(parse_lsn)) {
                f["replay_lag_bytes"] = json!(l.saturating_sub(me));
            }
            (id, f)
        });
    }
    while let Some(Ok(item)) = set.join_next().await {
        facts.push(item);
    }
    for (id, f) in facts {
        c.execute("INSERT INTO observations (server_id, facts) VALUES ($1, $2)", &[&id, &f]).await?;
    }
    Ok(())
}

/// The facts of one server now.
async fn observe(ctx: &Ctx, h: &Handle, last_backup: Option<String>) -> Value {
    let running = ctx.provider.is_running(h).await.unwrap_or(false);
    let disk = ctx.provider.disk_used(h).await.ok();
    let mut f = json!({ "running": running, "reachable": false, "disk_used_bytes": disk });
    if let Some(b) = last_backup {
        let (name, finish) = b.split_once(' ').unwrap_or((&b, ""));
        f["last_backup"] = json!({ "name": name, "finish_time": finish });
    }
    let sql = "select pg_is_in_recovery(),
                      case when pg_is_in_recovery() then pg_last_wal_replay_lsn()::text else pg_current_wal_lsn()::text end,
                      case when pg_is_in_recovery() then extract(epoch from now() - pg_last_xact_replay_timestamp())::float8 end,
                      a.last_archived_wal, extract(epoch from now() - a.last_archived_time)::float8, a.failed_count,
                      (select count(*) from pg_stat_replication)
               from pg_stat_archiver a";
    match pgconn::query(h, sql).await {
        Ok(rows) => {
            let r = rows.into_iter().next().unwrap_or_default();
            let get = |i: usize| r.get(i).cloned().flatten();
            let num = |i: usize| get(i).and_then(|v| v.parse::<f64>().ok());
            f["reachable"] = json!(true);
            f["in_recovery"] = json!(get(0).as_deref() == Some("t"));
            f["lsn"] = json!(get(1));
            f["replay_lag_secs"] = json!(num(2));
            f["last_archived_wal"] = json!(get(3));
            f["last_archived_age_secs"] = json!(num(4));
            f["archive_failed_count"] = json!(num(5));
            f["streaming_replicas"] = json!(num(6));
        }
        Err(e) => f["error"] = json!(format!("{e:#}")),
    }
    f
}
