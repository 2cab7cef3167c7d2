//! One step of a resource's state machine. Resources change only the state database (their
//! servers do the work), so a step runs inside the worker's transaction: it reads its
//! servers, moves the resource, and enqueues the servers it changed, all or nothing.

use anyhow::Result;
use tokio_postgres::Transaction;

use crate::queue;

/// Runs the step for resource `id`; returns whether the resource is settled (the job is done).
pub async fn step(tx: &Transaction<'_>, id: &str) -> Result<bool> {
    let Some(r) = tx
        .query_opt("SELECT state, leader_id, attrs->>'pending_leader' FROM resources WHERE id = $1 FOR UPDATE", &[&id])
        .await?
    else {
        return Ok(true);
    };
    let (state, leader, pending): (String, Option<String>, Option<String>) = (r.get(0), r.get(1), r.get(2));
    let server_state = |sid: Option<String>| async move {
        match sid {
            Some(sid) => tx
                .query_opt("SELECT state FROM servers WHERE id = $1", &[&sid])
                .await
                .map(|r| r.map(|r| r.get::<_, String>(0))),
            None => Ok(None),
        }
    };
    match state.as_str() {
        "creating" => match server_state(leader).await?.as_deref() {
            Some("available") => transition(tx, id, &state, "available").await.map(|()| true),
            Some("failed") => transition(tx, id, &state, "failed").await.map(|()| true),
            _ => Ok(false),
        },
        "rolling_back" => {
            let new_leader = pending.clone();
            match server_state(new_leader).await?.as_deref() {
                Some("available") => {
                    let new = pending.unwrap_or_default();
                    swap_leader(tx, id, leader.as_deref(), &new).await?;
                    transition(tx, id, &state, "available").await.map(|()| true)
                }
                // The old leader stays; the failed restore is reported on its server.
                Some("failed") => {
                    tx.execute("UPDATE resources SET attrs = attrs - 'pending_leader' WHERE id = $1", &[&id]).await?;
                    transition(tx, id, &state, "available").await.map(|()| true)
                }
                _ => Ok(false),
            }
        }
        "destroying" => {
            let left: i64 = tx
                .query_one("SELECT count(*) FROM servers WHERE resource_id = $1 AND state <> 'destroyed'", &[&id])
                .await?
                .get(0);
            if left == 0 {
                transition(tx, id, &state, "destroyed").await.map(|()| true)
            } else {
                Ok(false)
            }
        }
        _ => Ok(true),
    }
}

/// Rollback's last step: the resource points at the new leader and its timeline; the old
/// leader is destroyed; followers are restored again as standbys of the new leader. That is
/// a new start (also for a `failed` follower), so a follower's count of restores from scratch
/// starts again at 0: restores it used against the old leader say nothing about the new one.
async fn swap_leader(tx: &Transaction<'_>, id: &str, old: Option<&str>, new: &str) -> Result<()> {
    tx.execute(
        "UPDATE resources SET leader_id = $2, timeline_id = (SELECT timeline_id FROM servers WHERE id = $2),
                              attrs = attrs - 'pending_leader', updated_at = now() WHERE id = $1",
        &[&id, &new],
    )
    .await?;
    if let Some(old) = old {
        tx.execute(
            "UPDATE servers SET state = 'destroying', desired = 'destroyed', generation = generation + 1,
                                updated_at = now() WHERE id = $1",
            &[&old],
        )
        .await?;
        queue::enqueue(tx, "server", old).await?;
        crate::info!(
            "event" = "transition",
            "object" = "server",
            "id" = old,
            "to" = "destroying",
            "reason" = "replaced_by_rollback"
        );
    }
    let followers = tx
        .query(
            "UPDATE servers SET state = 'restoring', spec = jsonb_build_object('source', 'standby', 'leader', $2::text),
                                timeline_id = (SELECT timeline_id FROM servers WHERE id = $2),
                                generation = generation + 1, restore_restarts = 0, updated_at = now()
             WHERE resource_id = $1 AND role = 'follower' AND state NOT IN ('destroying', 'destroyed') RETURNING id",
            &[&id, &new],
        )
        .await?;
    for f in followers {
        let fid: String = f.get(0);
        queue::enqueue(tx, "server", &fid).await?;
        crate::info!(
            "event" = "transition",
            "object" = "server",
            "id" = fid,
            "to" = "restoring",
            "reason" = "leader_rolled_back"
        );
    }
    Ok(())
}

async fn transition(tx: &Transaction<'_>, id: &str, from: &str, to: &str) -> Result<()> {
    tx.execute("UPDATE resources SET state = $2, updated_at = now() WHERE id = $1", &[&id, &to]).await?;
    crate::info!("event" = "transition", "object" = "resource", "id" = id, "from" = from, "to" = to);
    Ok(())
}
