//! One step of a server's state machine (see `model` for the states).

use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use tokio_postgres::GenericClient;

use super::{Bounded, Ctx, Fatal, Outcome};
use crate::model::{Server, Spec};
use crate::pgconn;
use crate::provider::{Handle, Provider};

/// wal-rs exit codes after which retrying cannot help (docs/exit-codes.md): wrong command
/// line, configuration, input refused, cluster mismatch, not found.
const FATAL_WALRS_CODES: [i32; 5] = [2, 3, 4, 6, 12];

/// Failed attempts in a row of a step (whatever failed: the job's count) from which a
/// backup-push that exits 3 makes the server `failed`. wal-rs exits 3 for a bad setting, but also when it cannot connect to PostgreSQL or a query fails
/// ("the server is in recovery" while a promotion finishes, connections refused for a moment
/// after a crash), which a retry fixes. With the job's backoff (0.5 s doubling, at most
/// 15 s), 10 attempts span about 1.5 minutes.
pub const BACKUP_PUSH_CONFIG_ATTEMPTS: i32 = 10;

/// How long the `promoting` step waits for `pg_is_in_recovery()` to turn false after
/// `pg_promote()`, before it fails (and is retried).
const PROMOTE_DEADLINE: Duration = Duration::from_secs(60);

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
                // pg_promote waits at most 20 s here (less than a query's 30 s deadline) and
                // answers false when the promotion has not finished by then. Either way the
                // step goes on only once recovery has ended: a backup-push now would fail.
                pgconn::query(&h, "select pg_promote(true, 20)").await?;
                wait_promoted(&h, &s.id).await?;
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
            match &s.handle {
                Some(h) => ctx.provider.destroy(h).await?,
                // Destroyed while `provisioning`: `create` may have run without its handle
                // being recorded, and what it made would be left behind.
                None => ctx.provider.forget(&s.id).await?,
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
        let mut segment = None;
        for sql in parent_archive_queries(commit) {
            match pgconn::query(&h, sql).await {
                Ok(rows) => segment = rows.last().and_then(|r| r.first()).cloned().flatten(),
                Err(_) => {
                    segment = None;
                    break;
                }
            }
        }
        let Some(segment) = segment else { continue };
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

/// What `archive_parent` sends, each statement its own query and so its own transaction: the
/// commit first, then the switch. One multi-statement query would be one transaction, whose
/// commit record would land after the switch, in the segment that is not archived yet; a
/// recovery to a time after the parent's last write would then find no commit past its
/// target and stop with "recovery ended before configured recovery target was reached".
/// The last query answers the switched segment's name.
fn parent_archive_queries(commit: bool) -> &'static [&'static str] {
    if commit {
        &["select txid_current()", "select pg_walfile_name(pg_switch_wal())"]
    } else {
        &["select pg_walfile_name(pg_switch_wal())"]
    }
}

/// Waits until the server has left recovery after `pg_promote()`, for at most
/// [`PROMOTE_DEADLINE`]; an error after that (the step is retried and promotes again).
async fn wait_promoted(h: &Handle, id: &str) -> Result<()> {
    let deadline = tokio::time::Instant::now() + PROMOTE_DEADLINE;
    loop {
        if pgconn::one(h, "select pg_is_in_recovery()").await.ok().flatten().as_deref() == Some("f") {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            bail!("server {id} is still in recovery {} s after pg_promote()", PROMOTE_DEADLINE.as_secs());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
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
         archive_mode = on\narchive_command = {archive}\n",
        id = s.id,
        port = h.port,
        host = h.host,
        archive = archive_command(&ctx.walrs_path, &s.store, ctx.encryption_key_file.as_deref()),
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

/// archive_command as a postgresql.conf string: `wal-rs --store STORE wal-push %p`, with
/// `--set encryption_key_file=FILE` when the control plane has keys, so WAL is encrypted like
/// the backups (and as the restore_command that backup-fetch writes expects). The key file's
/// path, never a key: this line is in PGDATA and in the archiver's process list.
fn archive_command(walrs: &str, store: &str, key_file: Option<&str>) -> String {
    let mut words = vec![shell_quote(walrs), "--store".into(), shell_quote(store)];
    if let Some(file) = key_file {
        words.push("--set".into());
        words.push(shell_quote(&format!("encryption_key_file={file}")));
    }
    // PostgreSQL replaces %p, %f and %r anywhere in the command: a literal % is %%.
    let command = format!("{} wal-push %p", words.join(" ").replace('%', "%%"));
    // postgresql.conf strings take '' for a quote and \ as an escape.
    format!("'{}'", command.replace('\\', "\\\\").replace('\'', "''"))
}

/// `s` as one shell word.
fn shell_quote(s: &str) -> String {
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"/._-=:+,@".contains(&b)) {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
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

/// Failed attempts in a row of a restore from which a backup-fetch that exits 10 (the backup
/// is damaged: a partition corrupt or missing) makes the server `failed`. wal-rs retries a
/// download that breaks off itself, so a 10 is seldom cured by another try; the few allow
/// for a backup selected as `LATEST` being replaced by a newer one meanwhile.
pub const BACKUP_FETCH_DAMAGED_ATTEMPTS: i32 = 3;

/// Runs `wal-rs --store STORE ARGS...` on the server; an exit code retrying cannot fix
/// becomes `Fatal`.
async fn walrs(ctx: &Ctx, h: &Handle, store: &str, args: &[&str]) -> Result<crate::sys::Output> {
    let mut argv = vec!["wal-rs".to_string(), "--store".into(), store.into()];
    argv.extend(args.iter().map(|a| a.to_string()));
    let out = ctx.provider.run(h, &argv, &ctx.walrs_env).await?;
    if out.code != 0 {
        let last = out.stderr.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("").to_string();
        let msg = format!("wal-rs {} exited {}: {last}", args[0], out.code);
        return Err(match exit_kind(args[0], out.code) {
            ExitKind::Fatal => Fatal(msg).into(),
            ExitKind::Bounded(attempts) => Bounded { msg, attempts }.into(),
            ExitKind::Retry => anyhow!(msg),
        });
    }
    Ok(out)
}

/// What a failed wal-rs command's exit code means for its step.
#[derive(Debug, PartialEq, Eq)]
enum ExitKind {
    /// Retrying cannot help: the server fails.
    Fatal,
    /// Retrying may help: at most this many attempts in a row.
    Bounded(i32),
    /// Retry (storage down, a timeout).
    Retry,
}

fn exit_kind(command: &str, code: i32) -> ExitKind {
    match (command, code) {
        // Also "cannot connect to PostgreSQL" and "the server is in recovery".
        ("backup-push", 3) => ExitKind::Bounded(BACKUP_PUSH_CONFIG_ATTEMPTS),
        ("backup-fetch", 10) => ExitKind::Bounded(BACKUP_FETCH_DAMAGED_ATTEMPTS),
        (_, c) if FATAL_WALRS_CODES.contains(&c) => ExitKind::Fatal,
        _ => ExitKind::Retry,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backup_push_exit_3_is_retried_a_bounded_number_of_times() {
        assert_eq!(exit_kind("backup-push", 3), ExitKind::Bounded(BACKUP_PUSH_CONFIG_ATTEMPTS));
        assert_eq!(exit_kind("backup-fetch", 3), ExitKind::Fatal);
        assert_eq!(exit_kind("backup-push", 12), ExitKind::Fatal);
        assert_eq!(exit_kind("backup-push", 7), ExitKind::Retry);
        assert_eq!(exit_kind("backup-fetch", 13), ExitKind::Retry);
        // A damaged backup (a partition corrupt or missing) is not retried for ever.
        assert_eq!(exit_kind("backup-fetch", 10), ExitKind::Bounded(BACKUP_FETCH_DAMAGED_ATTEMPTS));
    }

    #[test]
    fn parent_commit_and_switch_are_separate_transactions() {
        let with_commit = parent_archive_queries(true);
        assert_eq!(with_commit.len(), 2);
        assert!(with_commit[0].contains("txid_current()") && with_commit[1].contains("pg_switch_wal()"));
        for q in with_commit.iter().chain(parent_archive_queries(false)) {
            assert!(!q.contains(';'), "one statement per query: {q}");
        }
        assert_eq!(parent_archive_queries(false), ["select pg_walfile_name(pg_switch_wal())"]);
    }

    #[test]
    fn archive_command_carries_the_key_file_never_a_key() {
        let plain = archive_command("/d/bin/wal-rs", "file:///d/store/tl-1", None);
        assert_eq!(plain, "'/d/bin/wal-rs --store file:///d/store/tl-1 wal-push %p'");
        let sealed = archive_command("/d/bin/wal-rs", "file:///d/store/tl-1", Some("/etc/wal-rs/keys"));
        assert_eq!(
            sealed,
            "'/d/bin/wal-rs --store file:///d/store/tl-1 --set encryption_key_file=/etc/wal-rs/keys wal-push %p'"
        );
    }

    #[test]
    fn archive_command_quotes_for_the_shell_postgresql_and_its_conf_file() {
        let c = archive_command("/my dir/wal-rs", "s3://b/p%20q", Some(r"/k/it's\x"));
        // Shell: '/my dir/wal-rs' --store 's3://b/p%%20q' --set 'encryption_key_file=/k/it'\''s\x'
        assert_eq!(
            c,
            r"'''/my dir/wal-rs'' --store ''s3://b/p%%20q'' --set ''encryption_key_file=/k/it''\\''''s\\x'' wal-push %p'"
        );
    }
}
