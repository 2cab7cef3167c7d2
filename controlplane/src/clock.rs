//! The clock: on every tick, enqueue a job for every object that is not where it should be
//! (a server or resource between states, a server observed down), refresh the backup
//! catalogue from `wal-rs backup-list`, and trim old observations. It decides nothing
//! itself; the jobs do.

use std::sync::Arc;

use anyhow::Result;

use crate::converge::Ctx;
use crate::db;

/// Runs ticks until the process ends.
pub async fn run(ctx: Arc<Ctx>) {
    crate::info!("event" = "started", "process" = "clock");
    let mut n: u64 = 0;
    loop {
        if let Err(e) = tick(&ctx, n).await {
            crate::warn!("event" = "clock_error", "error" = format!("{e:#}"));
        }
        n += 1;
        tokio::time::sleep(ctx.cfg.clock_every()).await;
    }
}

/// One tick. Every tenth also lists each live timeline's backups.
pub async fn tick(ctx: &Ctx, n: u64) -> Result<()> {
    let c = db::connect(&ctx.conninfo).await?;
    c.execute(
        "INSERT INTO jobs (kind, target) SELECT 'server', id FROM servers
         WHERE state NOT IN ('available', 'destroyed', 'failed') ON CONFLICT DO NOTHING",
        &[],
    )
    .await?;
    c.execute(
        "INSERT INTO jobs (kind, target) SELECT 'resource', id FROM resources
         WHERE state NOT IN ('available', 'destroyed', 'failed') ON CONFLICT DO NOTHING",
        &[],
    )
    .await?;
    // Available servers whose latest (recent) observation says PostgreSQL does not answer.
    let repairs = c
        .query(
            "INSERT INTO jobs (kind, target)
             SELECT 'server', s.id FROM servers s
             JOIN LATERAL (SELECT facts FROM observations o WHERE o.server_id = s.id ORDER BY at DESC LIMIT 1) o ON true
             WHERE s.state = 'available' AND (o.facts->>'reachable')::boolean IS NOT TRUE
             ON CONFLICT DO NOTHING RETURNING target",
            &[],
        )
        .await?;
    for r in repairs {
        crate::warn!(
            "event" = "enqueue",
            "object" = "server",
            "id" = r.get::<_, String>(0),
            "reason" = "observed_unreachable"
        );
    }
    c.execute("DELETE FROM observations WHERE at < now() - interval '10 minutes'", &[]).await?;
    if n.is_multiple_of(10) {
        refresh_backups(ctx, &c).await?;
    }
    Ok(())
}

async fn refresh_backups(ctx: &Ctx, c: &tokio_postgres::Client) -> Result<()> {
    let rows = c
        .query(
            "SELECT DISTINCT t.id, t.store FROM timelines t JOIN servers s ON s.timeline_id = t.id
             WHERE s.role = 'leader' AND s.state = 'available'",
            &[],
        )
        .await?;
    for r in rows {
        let (tl, store): (String, String) = (r.get(0), r.get(1));
        let argv = vec![ctx.walrs_path.clone(), "--store".into(), store, "backup-list".into(), "--json".into()];
        let out = crate::sys::run_as_postgres(&argv, &ctx.walrs_env).await?;
        let Ok(list) = serde_json::from_str::<serde_json::Value>(out.stdout.trim()) else { continue };
        for b in list.as_array().into_iter().flatten() {
            let Some(name) = b["name"].as_str() else { continue };
            c.execute(
                "INSERT INTO backups (timeline_id, name, info) VALUES ($1, $2, $3)
                 ON CONFLICT (timeline_id, name) DO UPDATE SET info = EXCLUDED.info, seen_at = now()",
                &[&tl, &name, b],
            )
            .await?;
        }
    }
    Ok(())
}
