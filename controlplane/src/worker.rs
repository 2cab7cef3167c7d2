//! Workers: take a job from the queue, run one step of its object's state machine, and
//! commit the object's new state together with the job's update, while holding the lease.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;

use crate::converge::{self, Ctx, Fatal, Outcome};
use crate::model::{self, server_restartable, server_settled};
use crate::{db, queue};

/// Consecutive failures of a `starting` or `recovering` step after which the server is
/// restored again from scratch (a restore that cannot start, say).
const RESTART_AFTER_FAILURES: i32 = 3;

/// Runs jobs until the process ends.
pub async fn run(ctx: Arc<Ctx>, n: usize) {
    let worker = format!("worker-{}-{n}", std::process::id());
    crate::info!("event" = "started", "process" = "worker", "worker" = worker);
    loop {
        match tick(&ctx, &worker).await {
            Ok(true) => {}
            Ok(false) => tokio::time::sleep(ctx.cfg.poll()).await,
            Err(e) => {
                crate::warn!("event" = "worker_error", "worker" = worker, "error" = format!("{e:#}"));
                tokio::time::sleep(ctx.cfg.poll()).await;
            }
        }
    }
}

/// Takes and runs one job; false when the queue had none.
pub async fn tick(ctx: &Arc<Ctx>, worker: &str) -> Result<bool> {
    let mut c = db::connect(&ctx.conninfo).await?;
    let Some(job) = queue::dequeue(&c, worker, ctx.cfg.lease()).await? else { return Ok(false) };
    if job.kind == "server" {
        crate::info!(
            "event" = "job_started",
            "worker" = worker,
            "job" = job.id,
            "kind" = job.kind,
            "target" = job.target,
            "attempt" = job.attempts
        );
    }
    match job.kind.as_str() {
        "server" => run_server_job(ctx, &mut c, &job).await?,
        "resource" => {
            let tx = c.transaction().await?;
            if queue::hold(&tx, &job).await? {
                if converge::resource::step(&tx, &job.target).await? {
                    queue::complete(&tx, &job).await?;
                } else {
                    queue::again(&tx, &job, ctx.cfg.clock_every()).await?;
                }
            }
            tx.commit().await?;
        }
        other => {
            crate::warn!("event" = "unknown_job", "kind" = other);
            queue::complete(&c, &job).await?;
        }
    }
    Ok(true)
}

/// Moves a server whose step failed from `from` to `to`, keeping the error, and logs the
/// transition.
async fn fail_into(
    tx: &tokio_postgres::Transaction<'_>,
    id: &str,
    from: &str,
    to: &str,
    reason: &str,
    msg: &str,
) -> Result<()> {
    tx.execute(
        "UPDATE servers SET state = $4, error = $3, updated_at = now() WHERE id = $1 AND state = $2",
        &[&id, &from, &msg, &to],
    )
    .await?;
    crate::warn!(
        "event" = "transition",
        "object" = "server",
        "id" = id,
        "from" = from,
        "to" = to,
        "reason" = reason,
        "error" = msg
    );
    Ok(())
}

async fn run_server_job(ctx: &Arc<Ctx>, c: &mut tokio_postgres::Client, job: &queue::Job) -> Result<()> {
    let Some(server) = model::load_server(&*c, &job.target).await? else {
        queue::complete(&*c, job).await?;
        return Ok(());
    };
    // The lease is renewed on its own connection while the step runs; losing it cancels the
    // step (dropping it kills its subprocesses).
    let renewer = {
        let (ctx, job) = (ctx.clone(), job.clone());
        async move {
            let lease = ctx.cfg.lease();
            loop {
                tokio::time::sleep(lease / 3).await;
                let ok = match db::connect(&ctx.conninfo).await {
                    Ok(rc) => queue::renew(&rc, &job, lease).await.unwrap_or(true),
                    Err(_) => true,
                };
                if !ok {
                    return;
                }
            }
        }
    };
    let result = tokio::select! {
        r = converge::server::step(ctx, &*c, &server) => r,
        () = renewer => {
            crate::warn!("event" = "lease_lost", "job" = job.id, "server" = server.id);
            return Ok(());
        }
    };
    let tx = c.transaction().await?;
    if !queue::hold(&tx, job).await? {
        crate::warn!("event" = "lease_lost", "job" = job.id, "server" = server.id);
        return Ok(());
    }
    let from = server.state.as_str();
    match result {
        Ok(Outcome::To { state, handle, backup }) => {
            let handle = handle.map(serde_json::to_value).transpose()?;
            let n = tx
                .execute(
                    "UPDATE servers SET state = $3, handle = COALESCE($4, handle), error = NULL, updated_at = now()
                     WHERE id = $1 AND state = $2",
                    &[&server.id, &from, &state, &handle],
                )
                .await?;
            if n == 1 {
                crate::info!(
                    "event" = "transition",
                    "object" = "server",
                    "id" = server.id,
                    "from" = from,
                    "to" = state,
                    "job" = job.id
                );
                if let Some(b) = backup.filter(|b| b["name"].is_string()) {
                    let name = b["name"].as_str().unwrap_or_default().to_string();
                    tx.execute(
                        "INSERT INTO backups (timeline_id, name, info) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
                        &[&server.timeline_id, &name, &b],
                    )
                    .await?;
                }
                queue::enqueue(&tx, "resource", &server.resource_id).await?;
                if server_settled(state) {
                    queue::complete(&tx, job).await?;
                } else {
                    queue::again(&tx, job, Duration::ZERO).await?;
                }
            } else {
                // Someone (the API) moved the server meanwhile: look again.
                queue::again(&tx, job, Duration::ZERO).await?;
            }
        }
        Ok(Outcome::Wait(after)) => queue::again(&tx, job, after).await?,
        Ok(Outcome::Done) => queue::complete(&tx, job).await?,
        Err(e) => {
            let msg = format!("{e:#}");
            if e.downcast_ref::<Fatal>().is_some() {
                fail_into(&tx, &server.id, from, "failed", "step_failed_for_good", &msg).await?;
                queue::enqueue(&tx, "resource", &server.resource_id).await?;
                queue::complete(&tx, job).await?;
            } else if server_restartable(from) && job.attempts >= RESTART_AFTER_FAILURES {
                fail_into(&tx, &server.id, from, "restoring", "step_kept_failing", &msg).await?;
                queue::again(&tx, job, Duration::ZERO).await?;
            } else {
                tx.execute("UPDATE servers SET error = $2 WHERE id = $1", &[&server.id, &msg]).await?;
                crate::warn!(
                    "event" = "step_failed",
                    "object" = "server",
                    "id" = server.id,
                    "state" = from,
                    "attempt" = job.attempts,
                    "error" = msg
                );
                queue::fail(&tx, job, &msg).await?;
            }
        }
    }
    tx.commit().await?;
    Ok(())
}
