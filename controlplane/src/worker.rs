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

/// Restores from scratch a server gets (the first and the restarts after
/// [`RESTART_AFTER_FAILURES`]) before it goes to `failed`. Some restores can never start: a
/// recovery target the archive never reaches (a gap, a parent destroyed), a port taken by
/// another program. Without a bound such a server would download its backup again forever,
/// and a rollback waiting for it would never end.
const RESTORE_CYCLES: i32 = 3;

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
    // Taken before the query that sets the lease is sent: the database's `now()` in
    // `locked_until = now() + lease` is no earlier, so the lease is counted from no later than
    // it really started.
    let leased_at = tokio::time::Instant::now();
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
        "server" => run_server_job(ctx, &mut c, &job, leased_at).await?,
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
    // Going back to `restoring` is one more restore cycle (bounded by RESTORE_CYCLES).
    let restart = i32::from(to == "restoring");
    let n = tx
        .execute(
            "UPDATE servers SET state = $4, error = $3, restore_restarts = restore_restarts + $6, updated_at = now()
             WHERE id = $1 AND state = $2 AND generation = $5",
            &[&id, &from, &msg, &to, &server.generation, &restart],
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

/// Runs the step of the server `job` names; `leased_at` is no later than the job's lease began.
async fn run_server_job(
    ctx: &Arc<Ctx>,
    c: &mut tokio_postgres::Client,
    job: &queue::Job,
    leased_at: tokio::time::Instant,
) -> Result<()> {
    let Some(server) = model::load_server(&*c, &job.target).await? else {
        queue::complete(&*c, job).await?;
        return Ok(());
    };
    // The lease is kept on its own connection while the step runs; losing it, or failing to
    // renew it for nearly a lease, cancels the step (dropping it kills its subprocesses).
    let result = tokio::select! {
        r = converge::server::step(ctx, &*c, &server) => r,
        reason = keep_lease(&ctx.conninfo, job, ctx.cfg.lease(), leased_at) => {
            crate::warn!("event" = "lease_lost", "job" = job.id, "server" = server.id, "reason" = reason);
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
                    "UPDATE servers SET state = $3, handle = COALESCE($4, handle), error = NULL, updated_at = now(),
                            restore_restarts = CASE WHEN $3 = 'available' THEN 0 ELSE restore_restarts END
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
            let decision = on_error(&e, from, job.attempts, server.restore_restarts);
            let (reason, msg) = match decision {
                OnError::GiveUp => (
                    "restored_too_often",
                    format!("gave up after {RESTORE_CYCLES} restores from scratch, each failing to start: {msg}"),
                ),
                _ => ("step_failed_for_good", msg),
            };
            if matches!(decision, OnError::Fail | OnError::GiveUp) {
                if fail_into(&tx, &server, "failed", reason, &msg).await? {
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

/// Renews `job`'s lease of length `lease`, taken (or last renewed) no later than `leased_at`,
/// every third of it, on a connection of its own, and returns when the lease is no longer
/// certainly this worker's: another worker holds it, or no renewal has succeeded for `lease`
/// less a margin ([`lease_margin`]) since `leased_at` or the last renewal. Failed and
/// timed-out renewals count as not renewed, so a state database that is down or stuck
/// cannot let the step outlive its lease while another worker takes the job. Returns why:
/// `taken` or `unconfirmed`.
async fn keep_lease(
    conninfo: &str,
    job: &queue::Job,
    lease: Duration,
    leased_at: tokio::time::Instant,
) -> &'static str {
    use tokio::time::{sleep_until, timeout, Instant};
    // No later than the database set (or last renewed) the lease: the instant before the
    // query that set it was sent. Counting from when it answered (or from after the server
    // was loaded) would let the step outlive the lease by that long.
    let mut renewed_at = leased_at;
    let mut next_try = renewed_at + lease / 3;
    loop {
        let give_up_at = renewed_at + lease - lease_margin(lease);
        sleep_until(next_try.min(give_up_at)).await;
        let started = Instant::now();
        if started >= give_up_at {
            return "unconfirmed";
        }
        let attempt = async {
            let c = crate::db::connect(conninfo).await?;
            queue::renew(&c, job, lease).await
        };
        match timeout(give_up_at - started, attempt).await {
            Ok(Ok(true)) => {
                renewed_at = started;
                next_try = started + lease / 3;
            }
            Ok(Ok(false)) => return "taken",
            failed => {
                let error = match failed {
                    Ok(Err(e)) => format!("{e:#}"),
                    _ => "timed out".to_string(),
                };
                crate::warn!("event" = "lease_renewal_failed", "job" = job.id, "error" = error);
                next_try = Instant::now() + LEASE_RETRY;
            }
        }
    }
}

/// How soon after a failed renewal the next one is tried.
const LEASE_RETRY: Duration = Duration::from_secs(1);

/// How long before a lease can expire in the database a worker that could not renew it
/// cancels its step: a fifth of the lease, which leaves time to kill the step's commands
/// before another worker may take the job.
fn lease_margin(lease: Duration) -> Duration {
    lease / 5
}

/// What a failed server step leads to.
#[derive(Debug, PartialEq, Eq)]
enum OnError {
    /// The server goes to `failed`.
    Fail,
    /// The server starts over from `restoring`.
    Restore,
    /// The server would start over, but has used its [`RESTORE_CYCLES`]: it goes to `failed`.
    GiveUp,
    /// The job is retried after a backoff.
    Retry,
}

/// Decides what the error `e` of a step in state `from`, failing for the `attempts`th time in
/// a row, on a server already sent back to `restoring` `restarts` times, leads to. Every
/// branch ends: a [`Bounded`] error fails the server once its attempts are spent, and a
/// server that keeps failing to start once its restores are spent.
fn on_error(e: &anyhow::Error, from: &str, attempts: i32, restarts: i32) -> OnError {
    if e.downcast_ref::<Fatal>().is_some() || e.downcast_ref::<Bounded>().is_some_and(|b| attempts >= b.attempts) {
        OnError::Fail
    } else if server_restartable(from) && attempts >= RESTART_AFTER_FAILURES {
        // The first restore plus `restarts` more have been made.
        if 1 + restarts >= RESTORE_CYCLES {
            OnError::GiveUp
        } else {
            OnError::Restore
        }
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
        assert_eq!(on_error(&bounded(), "backing_up", 1, 0), OnError::Retry);
        assert_eq!(on_error(&bounded(), "backing_up", 9, 0), OnError::Retry);
        assert_eq!(on_error(&bounded(), "backing_up", 10, 0), OnError::Fail);
        assert_eq!(on_error(&bounded().context("a step"), "backing_up", 10, 0), OnError::Fail);
        assert_eq!(on_error(&anyhow::Error::new(Fatal("no backup".into())), "restoring", 1, 0), OnError::Fail);
        assert_eq!(on_error(&anyhow::anyhow!("refused"), "starting", 3, 0), OnError::Restore);
        assert_eq!(on_error(&anyhow::anyhow!("refused"), "backing_up", 50, 0), OnError::Retry);
    }

    /// A server whose restore can never start (a recovery target never reached) goes round
    /// restoring -> starting -> recovering, failing; the rounds end in `failed`.
    #[test]
    fn a_server_that_never_starts_fails_after_its_restore_cycles() {
        let never = || anyhow::anyhow!("server srv-x stopped during recovery: see its postgresql.log");
        let mut restores = 1;
        let mut restarts = 0;
        loop {
            assert!(restores <= 10, "still restoring after 10 restores");
            let mut attempts = 1;
            let decision = loop {
                match on_error(&never(), "recovering", attempts, restarts) {
                    OnError::Retry => attempts += 1,
                    other => break other,
                }
            };
            assert_eq!(attempts, RESTART_AFTER_FAILURES);
            if decision != OnError::Restore {
                assert_eq!(decision, OnError::GiveUp);
                break;
            }
            restarts += 1;
            restores += 1;
        }
        assert_eq!(restores, RESTORE_CYCLES);
        assert_eq!(RESTORE_CYCLES, 3, "docs/controlplane.md gives the number");
    }

    fn a_job() -> queue::Job {
        queue::Job { id: 1, kind: "server".into(), target: "srv-x".into(), attempts: 1, worker: "worker-test".into() }
    }

    /// Runs [`keep_lease`] with a 2 s lease against `conninfo`: why and after how long it gave up.
    async fn keep_a_2s_lease(conninfo: &str) -> (&'static str, Duration) {
        let started = std::time::Instant::now();
        let job = a_job();
        let keep = keep_lease(conninfo, &job, Duration::from_secs(2), tokio::time::Instant::now());
        let reason = tokio::time::timeout(Duration::from_secs(10), keep)
            .await
            .expect("the step was not cancelled within 10 s of a 2 s lease");
        (reason, started.elapsed())
    }

    /// The lease runs from when the worker asked for it, not from when the step started:
    /// taking the job and loading its server take time out of the lease.
    #[tokio::test]
    async fn a_lease_is_counted_from_when_it_was_taken() {
        let lease = Duration::from_secs(10);
        // Taken 9 s ago: the step may still run 1 s at most, and it is past the margin.
        let leased_at = tokio::time::Instant::now() - Duration::from_secs(9);
        let started = std::time::Instant::now();
        let job = a_job();
        let keep = keep_lease("host=/nonexistent/walrs-control port=5432 user=postgres", &job, lease, leased_at);
        let reason = tokio::time::timeout(Duration::from_secs(20), keep).await.expect("not cancelled within 20 s");
        let took = started.elapsed();
        assert_eq!(reason, "unconfirmed");
        assert!(took < Duration::from_secs(1), "cancelled after {took:?}, past the lease taken 9 s before (10 s)");
    }

    #[tokio::test]
    async fn a_lease_that_cannot_be_renewed_cancels_the_step_before_it_expires() {
        let (reason, took) = keep_a_2s_lease("host=/nonexistent/walrs-control port=5432 user=postgres").await;
        assert_eq!(reason, "unconfirmed");
        assert!(took < Duration::from_secs(2), "cancelled after {took:?}, past the 2 s lease");
    }

    #[tokio::test]
    async fn a_state_database_that_never_answers_cancels_the_step_before_the_lease_expires() {
        // Accepts connections and never says a word: connecting hangs until the timeout.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let held = tokio::spawn(async move {
            let mut open = Vec::new();
            while let Ok((sock, _)) = listener.accept().await {
                open.push(sock);
            }
        });
        let (reason, took) = keep_a_2s_lease(&format!("host=127.0.0.1 port={port} user=postgres")).await;
        held.abort();
        assert_eq!(reason, "unconfirmed");
        assert!(took < Duration::from_secs(2), "cancelled after {took:?}, past the 2 s lease");
    }
}
