//! The job queue, a table in the state database. A job is "bring object X one step closer
//! to where it should be" (kind `server` or `resource`, target its id); at most one job per
//! object exists (UNIQUE (kind, target)), so enqueueing is idempotent.
//!
//! A worker takes a job by setting a lease (`locked_until`, `locked_by`) in one statement
//! that locks candidates `FOR UPDATE SKIP LOCKED`, chosen at random among the oldest few so
//! that workers do not all fight over the head of the queue. It renews the lease while the
//! step runs; a killed worker stops renewing and the job goes to another worker when the
//! lease expires. Every state change commits together with the job's own update, in one
//! transaction, and only while the lease is still this worker's.

use std::time::Duration;

use anyhow::Result;
use tokio_postgres::GenericClient;

/// A job taken by a worker.
#[derive(Debug, Clone)]
pub struct Job {
    /// Row id.
    pub id: i64,
    /// `server` or `resource`.
    pub kind: String,
    /// The object's id.
    pub target: String,
    /// Consecutive failed attempts, this one included.
    pub attempts: i32,
    /// The worker holding the lease.
    pub worker: String,
}

/// Makes sure a job exists for `kind`/`target`, runnable now. A job already waiting out a
/// backoff is brought forward; one being run is left alone (its worker requeues it).
pub async fn enqueue(c: &impl GenericClient, kind: &str, target: &str) -> Result<()> {
    c.execute(
        "INSERT INTO jobs (kind, target) VALUES ($1, $2)
         ON CONFLICT (kind, target) DO UPDATE SET run_after = LEAST(jobs.run_after, now())",
        &[&kind, &target],
    )
    .await?;
    Ok(())
}

/// Takes one runnable job, if any, with a lease of `lease`.
pub async fn dequeue(c: &impl GenericClient, worker: &str, lease: Duration) -> Result<Option<Job>> {
    let row = c
        .query_opt(
            "WITH candidates AS (
                 SELECT id FROM jobs
                 WHERE run_after <= now() AND (locked_until IS NULL OR locked_until < now())
                 ORDER BY run_after, id LIMIT 4
                 FOR UPDATE SKIP LOCKED),
             pick AS (SELECT id FROM candidates ORDER BY random() LIMIT 1)
             UPDATE jobs j SET locked_until = now() + make_interval(secs => $2::float8),
                               locked_by = $1, attempts = j.attempts + 1
             FROM pick WHERE j.id = pick.id
             RETURNING j.id, j.kind, j.target, j.attempts",
            &[&worker, &lease.as_secs_f64()],
        )
        .await?;
    Ok(row.map(|r| Job { id: r.get(0), kind: r.get(1), target: r.get(2), attempts: r.get(3), worker: worker.into() }))
}

/// Extends the lease; false when it is no longer this worker's (it expired and another
/// worker took the job).
pub async fn renew(c: &impl GenericClient, job: &Job, lease: Duration) -> Result<bool> {
    let n = c
        .execute(
            "UPDATE jobs SET locked_until = now() + make_interval(secs => $3::float8) WHERE id = $1 AND locked_by = $2",
            &[&job.id, &job.worker, &lease.as_secs_f64()],
        )
        .await?;
    Ok(n == 1)
}

/// Inside a transaction: locks the job row and checks the lease is still ours. A step's
/// state change must commit only then, or a worker that lost its lease could undo the work
/// of the one that took over.
pub async fn hold(c: &impl GenericClient, job: &Job) -> Result<bool> {
    let row =
        c.query_opt("SELECT 1 FROM jobs WHERE id = $1 AND locked_by = $2 FOR UPDATE", &[&job.id, &job.worker]).await?;
    Ok(row.is_some())
}

/// The object is where it should be: the job is done.
pub async fn complete(c: &impl GenericClient, job: &Job) -> Result<()> {
    c.execute("DELETE FROM jobs WHERE id = $1 AND locked_by = $2", &[&job.id, &job.worker]).await?;
    Ok(())
}

/// Progress was made (or the step waits for something): run again after `after`, with the
/// failure count reset.
pub async fn again(c: &impl GenericClient, job: &Job, after: Duration) -> Result<()> {
    c.execute(
        "UPDATE jobs SET run_after = now() + make_interval(secs => $3::float8), locked_until = NULL,
                         locked_by = NULL, attempts = 0, last_error = NULL
         WHERE id = $1 AND locked_by = $2",
        &[&job.id, &job.worker, &after.as_secs_f64()],
    )
    .await?;
    Ok(())
}

/// The step failed: run again after a backoff that grows with the attempts (capped).
pub async fn fail(c: &impl GenericClient, job: &Job, error: &str) -> Result<()> {
    let backoff = (0.5 * 2f64.powi(job.attempts.clamp(0, 6))).min(15.0);
    c.execute(
        "UPDATE jobs SET run_after = now() + make_interval(secs => $3::float8), locked_until = NULL,
                         locked_by = NULL, last_error = $4
         WHERE id = $1 AND locked_by = $2",
        &[&job.id, &job.worker, &backoff, &error],
    )
    .await?;
    Ok(())
}
