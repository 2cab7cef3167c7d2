//! Workers: take a job from the queue, run one step of its object's state machine, and
//! commit the object's new state together with the job's update, while holding the lease.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;

use crate::converge::{self, Bounded, Ctx, Fatal, Outcome};
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

/// Moves a server whose step failed from the state (and generation) it was loaded in to `to`,
/// keeping the error, and logs the transition; false when someone moved or re-pointed it
/// meanwhile (nothing is changed).
async fn fail_into(
    tx: &tokio_postgres::Transaction<'_>,
    server: &model::Server,
    to: &str,
    reason: &str,
    msg: &str,
) -> Result<bool> {
    let (id, from) = (&server.id, &server.state);
    let n = tx
        .execute(
            "UPDATE servers SET state = $4, error = $3, updated_at = now() WHERE id = $1 AND state = $2 AND generation = $5",
            &[&id, &from, &msg, &to, &server.generation],
        )
        .await?;
    if n == 0 {
        return Ok(false);
    }
    crate::warn!(
        "event" = "transition",
        "object" = "server",
        "id" = id,
        "from" = from,
        "to" = to,
        "reason" = reason,
        "error" = msg
    );
    Ok(true)
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
                     WHERE id = $1 AND state = $2 AND generation = $5",
                    &[&server.id, &from, &state, &handle, &server.generation],
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
                // Someone (the API, a rollback) moved or re-pointed the server meanwhile: look
                // again, at what it is now.
                queue::again(&tx, job, Duration::ZERO).await?;
            }
        }
        Ok(Outcome::Wait(after)) => queue::again(&tx, job, after).await?,
        Ok(Outcome::Done) => queue::complete(&tx, job).await?,
        Err(e) => {
            let msg = format!("{e:#}");
            let decision = on_error(&e, from, job.attempts);
            if decision == OnError::Fail {
                if fail_into(&tx, &server, "failed", "step_failed_for_good", &msg).await? {
                    queue::enqueue(&tx, "resource", &server.resource_id).await?;
                    queue::complete(&tx, job).await?;
                } else {
                    queue::again(&tx, job, Duration::ZERO).await?;
                }
            } else if decision == OnError::Restore {
                fail_into(&tx, &server, "restoring", "step_kept_failing", &msg).await?;
                queue::again(&tx, job, Duration::ZERO).await?;
            } else {
                tx.execute(
                    "UPDATE servers SET error = $2 WHERE id = $1 AND generation = $3",
                    &[&server.id, &msg, &server.generation],
                )
                .await?;
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

/// What a failed server step leads to.
#[derive(Debug, PartialEq, Eq)]
enum OnError {
    /// The server goes to `failed`.
    Fail,
    /// The server starts over from `restoring`.
    Restore,
    /// The job is retried after a backoff.
    Retry,
}

/// Decides what the error `e` of a step in state `from`, failing for the `attempts`th time in
/// a row, leads to. Every branch ends: a [`Bounded`] error fails the server once its attempts
/// are spent.
fn on_error(e: &anyhow::Error, from: &str, attempts: i32) -> OnError {
    if e.downcast_ref::<Fatal>().is_some() || e.downcast_ref::<Bounded>().is_some_and(|b| attempts >= b.attempts) {
        OnError::Fail
    } else if server_restartable(from) && attempts >= RESTART_AFTER_FAILURES {
        OnError::Restore
    } else {
        OnError::Retry
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_errors_are_retried_then_fail() {
        let bounded = || anyhow::Error::new(Bounded { msg: "wal-rs backup-push exited 3".into(), attempts: 10 });
        assert_eq!(on_error(&bounded(), "backing_up", 1), OnError::Retry);
        assert_eq!(on_error(&bounded(), "backing_up", 9), OnError::Retry);
        assert_eq!(on_error(&bounded(), "backing_up", 10), OnError::Fail);
        assert_eq!(on_error(&bounded().context("a step"), "backing_up", 10), OnError::Fail);
        assert_eq!(on_error(&anyhow::Error::new(Fatal("no backup".into())), "restoring", 1), OnError::Fail);
        assert_eq!(on_error(&anyhow::anyhow!("refused"), "starting", 3), OnError::Restore);
        assert_eq!(on_error(&anyhow::anyhow!("refused"), "backing_up", 50), OnError::Retry);
    }
}
