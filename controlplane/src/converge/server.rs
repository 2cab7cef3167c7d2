//! One step of a server's state machine (see `model` for the states).

use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use tokio_postgres::GenericClient;

use super::{Ctx, Fatal, Outcome};
use crate::model::{Server, Spec};
use crate::pgconn;
use crate::provider::{Handle, Provider};

/// wal-rs exit codes after which retrying cannot help (docs/exit-codes.md): wrong command
/// line, configuration, input refused, cluster mismatch, not found.
const FATAL_WALRS_CODES: [i32; 5] = [2, 3, 4, 6, 12];

/// The file the control plane owns in every PGDATA, included from postgresql.conf.
const CONF_FILE: &str = "walrs_control.conf";

/// Runs the step for `s`'s current state.
pub async fn step(ctx: &Ctx, db: &impl GenericClient, s: &Server) -> Result<Outcome> {
    let h = || s.handle.clone().ok_or_else(|| anyhow!("server {} has no handle in state {}", s.id, s.state));
    match s.state.as_str() {
        "provisioning" => {
            let handle = ctx.provider.create(&s.id).await?;
            Ok(Outcome::To { state: "restoring", handle: Some(handle), backup: None })
        }
        "restoring" => {
            let h = h()?;
            ensure_store(ctx, &h, &s.store).await?;
            restore(ctx, db, s, &h).await.map(|()| Outcome::to("starting"))
        }
        "starting" => {
            let h = h()?;
            write_conf(ctx, db, s, &h).await?;
            ctx.provider.start(&h).await?;
            crate::info!("event" = "action", "action" = "started", "server" = s.id, "port" = h.port);
            Ok(Outcome::to(match s.spec {
                Spec::Initdb => "backing_up",
                Spec::Standby { .. } => "available",
                Spec::Pitr { .. } => "recovering",
            }))
        }
        "recovering" => {
            let h = h()?;
            if !ctx.provider.is_running(&h).await? {
                bail!("server {} stopped during recovery: see its postgresql.log", s.id);
            }
            if pgconn::one(&h, "select pg_is_in_recovery()").await?.as_deref() == Some("t") {
                return Ok(Outcome::Wait(Duration::from_millis(500)));
            }
            forget_recovery_target(&h).await?;
            Ok(Outcome::to("backing_up"))
        }
        "promoting" => {
            let h = h()?;
            ensure_store(ctx, &h, &s.store).await?;
            // The new timeline's archive_command first, so the first file of the new
            // PostgreSQL timeline already goes to the new store.
            write_conf(ctx, db, s, &h).await?;
            ctx.provider.start(&h).await?;
            pgconn::query(&h, "select pg_reload_conf()").await?;
            if pgconn::one(&h, "select pg_is_in_recovery()").await?.as_deref() == Some("t") {
                pgconn::query(&h, "select pg_promote(true, 60)").await?;
                crate::info!("event" = "action", "action" = "promoted", "server" = s.id);
            }
            forget_recovery_target(&h).await?;
            Ok(Outcome::to("backing_up"))
        }
        "backing_up" => {
            let h = h()?;
            ctx.provider.start(&h).await?;
            let out =
                walrs(ctx, &h, &s.store, &["backup-push", &h.pgdata, "--fast", "--json", "--pg-url", &h.url()]).await?;
            let info: serde_json::Value = serde_json::from_str(out.stdout.trim()).unwrap_or(serde_json::Value::Null);
            crate::info!(
                "event" = "action",
                "action" = "backup_pushed",
                "server" = s.id,
                "timeline" = s.timeline_id,
                "backup" = info["name"].as_str().unwrap_or("?")
            );
            Ok(Outcome::To { state: "available", handle: None, backup: Some(info) })
        }
        "available" => {
            let h = h()?;
            if !ctx.provider.is_running(&h).await? {
                crate::warn!(
                    "event" = "action",
                    "action" = "restart",
                    "server" = s.id,
                    "reason" = "postgres_not_running"
                );
                write_conf(ctx, db, s, &h).await?;
                ctx.provider.start(&h).await?;
            }
            Ok(Outcome::Done)
        }
        "destroying" => {
            if let Some(h) = &s.handle {
                ctx.provider.destroy(h).await?;
            }
            Ok(Outcome::to("destroyed"))
        }
        _ => Ok(Outcome::Done),
    }
}

/// Puts a fresh copy of the server's data in its PGDATA: first stops a server a half-done
/// run may have left running and wipes whatever a killed restore left in the folder.
async fn restore(ctx: &Ctx, db: &impl GenericClient, s: &Server, h: &Handle) -> Result<()> {
    ctx.provider.stop(h, true).await?;
    let listing = ctx.provider.run(h, &["ls".into(), "-A".into(), h.pgdata.clone()], &[]).await?;
    if listing.code == 0 && !listing.stdout.trim().is_empty() {
        let files = listing.stdout.lines().count();
        crate::warn!(
            "event" = "action",
            "action" = "wipe",
            "server" = s.id,
            "reason" = "folder_not_empty",
            "entries" = files
        );
    }
    ctx.provider.run(h, &["rm".into(), "-rf".into(), h.pgdata.clone()], &[]).await?.ok("removing PGDATA")?;
    match &s.spec {
        Spec::Initdb => {
            let mut argv: Vec<String> =
                ["initdb", "-D", &h.pgdata, "-U", "postgres", "--auth=trust", "--encoding=UTF8", "--locale=C"]
                    .map(String::from)
                    .to_vec();
            if ctx.cfg.unsafe_no_fsync {
                argv.push("--no-sync".into());
            }
            ctx.provider.run(h, &argv, &[]).await?.ok(&format!("initdb of server {}", s.id))?;
        }
        Spec::Standby { .. } => {
            walrs(ctx, h, &s.store, &["backup-fetch", &h.pgdata, "LATEST", "--standby", "--json"]).await?;
        }
        Spec::Pitr { from_timeline, target_time } => {
            let parent_store = crate::model::timeline_store(db, from_timeline).await?;
            archive_parent(ctx, db, from_timeline, target_time.is_some()).await;
            let mut args = vec!["backup-fetch", &h.pgdata];
            match target_time {
                Some(t) => args.extend(["--target-time", t, "--target-action", "promote"]),
                None => args.push("LATEST"),
            }
            args.extend(["--target-timeline", "latest", "--json"]);
            walrs(ctx, h, &parent_store, &args).await?;
        }
    }
    crate::info!(
        "event" = "action",
        "action" = "restored",
        "server" = s.id,
        "source" = serde_json::to_value(&s.spec)?["source"].as_str().unwrap_or("?")
    );
    Ok(())
}

/// Before restoring from timeline `tl`'s archive, makes the archive reach "now" when the
/// timeline's leader is up: a commit (so a recovery to a time before now finds a commit past
/// its target and stops there) and a segment switch, then waits until that segment is
/// archived. Best effort: a leader that is gone has archived all it ever will.
async fn archive_parent(ctx: &Ctx, db: &impl GenericClient, tl: &str, commit: bool) {
    let Ok(rows) = db
        .query(
            "SELECT handle FROM servers WHERE timeline_id = $1 AND role = 'leader' AND state = 'available' AND handle IS NOT NULL",
            &[&tl],
        )
        .await
    else {
        return;
    };
    for row in rows {
        let Ok(h) = serde_json::from_value::<Handle>(row.get(0)) else { continue };
        if !ctx.provider.is_running(&h).await.unwrap_or(false) {
            continue;
        }
        let sql = if commit {
            "select txid_current(); select pg_walfile_name(pg_switch_wal())"
        } else {
            "select pg_walfile_name(pg_switch_wal())"
        };
        let Ok(rows) = pgconn::query(&h, sql).await else { continue };
        let Some(Some(segment)) = rows.last().and_then(|r| r.first()).cloned() else { continue };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while tokio::time::Instant::now() < deadline {
            let last = pgconn::one(&h, "select last_archived_wal from pg_stat_archiver").await.ok().flatten();
            if last.is_some_and(|l| l.len() >= 24 && l[..24] >= segment[..]) {
                crate::info!("event" = "action", "action" = "parent_archived", "timeline" = tl, "segment" = segment);
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// After a promotion, removes the recovery target backup-fetch wrote into
/// postgresql.auto.conf: a backup of this server would otherwise carry it to its followers
/// and forks, which would stop replaying at this server's old target.
async fn forget_recovery_target(h: &Handle) -> Result<()> {
    // One statement per query: ALTER SYSTEM refuses to run in the implicit transaction of a
    // multi-statement query.
    for setting in ["recovery_target_time", "recovery_target_action", "recovery_target_timeline"] {
        pgconn::query(h, &format!("alter system reset {setting}")).await.context("resetting the recovery target")?;
    }
    pgconn::query(h, "select pg_reload_conf()").await?;
    Ok(())
}

/// Writes the control plane's settings file into PGDATA and makes postgresql.conf include it.
async fn write_conf(ctx: &Ctx, db: &impl GenericClient, s: &Server, h: &Handle) -> Result<()> {
    let sockets = std::path::Path::new(&h.pgdata).parent().map(|p| p.display().to_string()).unwrap_or_default();
    let mut conf = format!(
        "# Written by wal-rs-control for server {id}; rewritten on every start, restore and promotion.\n\
         port = {port}\nlisten_addresses = '{host}'\nunix_socket_directories = '{sockets}'\n\
         wal_level = replica\nmax_wal_senders = 10\nhot_standby = on\nshared_buffers = 32MB\nmax_connections = 50\n\
         archive_mode = on\narchive_command = '{walrs} --store {store} wal-push %p'\n",
        id = s.id,
        port = h.port,
        host = h.host,
        walrs = ctx.walrs_path,
        store = s.store,
    );
    if ctx.cfg.unsafe_no_fsync {
        conf.push_str("fsync = off\n");
    }
    if let (Spec::Standby { leader }, "follower") = (&s.spec, s.role.as_str()) {
        let row = db.query_opt("SELECT handle FROM servers WHERE id = $1", &[leader]).await?;
        let leader_handle: Option<Handle> =
            row.and_then(|r| r.get::<_, Option<serde_json::Value>>(0)).and_then(|v| serde_json::from_value(v).ok());
        if let Some(l) = leader_handle {
            conf.push_str(&format!(
                "primary_conninfo = 'host={} port={} user=postgres application_name={}'\n",
                l.host, l.port, s.id
            ));
        }
    }
    ctx.provider.write_file(h, CONF_FILE, &conf).await?;
    let include = format!(
        "grep -q \"^include_if_exists = '{CONF_FILE}'\" '{p}/postgresql.conf' || printf \"\\ninclude_if_exists = '{CONF_FILE}'\\n\" >> '{p}/postgresql.conf'",
        p = h.pgdata
    );
    ctx.provider.run(h, &["sh".into(), "-c".into(), include], &[]).await?.ok("including walrs_control.conf")?;
    Ok(())
}

/// Creates a local directory store (wal-rs refuses a store that does not exist); S3
/// prefixes need nothing.
async fn ensure_store(ctx: &Ctx, h: &Handle, store: &str) -> Result<()> {
    if let Some(dir) = store.strip_prefix("file://") {
        ctx.provider
            .run(h, &["mkdir".into(), "-p".into(), dir.into()], &[])
            .await?
            .ok("creating the timeline's store")?;
    }
    Ok(())
}

/// Runs `wal-rs --store STORE ARGS...` on the server; an exit code retrying cannot fix
/// becomes `Fatal`.
async fn walrs(ctx: &Ctx, h: &Handle, store: &str, args: &[&str]) -> Result<crate::sys::Output> {
    let mut argv = vec!["wal-rs".to_string(), "--store".into(), store.into()];
    argv.extend(args.iter().map(|a| a.to_string()));
    let out = ctx.provider.run(h, &argv, &ctx.walrs_env).await?;
    if out.code != 0 {
        let last = out.stderr.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("").to_string();
        let msg = format!("wal-rs {} exited {}: {last}", args[0], out.code);
        if FATAL_WALRS_CODES.contains(&out.code) {
            return Err(Fatal(msg).into());
        }
        bail!(msg);
    }
    Ok(out)
}
