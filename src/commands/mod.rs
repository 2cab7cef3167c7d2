//! The commands. [`run`] is the single place that turns a parsed command line into an exit
//! code: it resolves the configuration, runs one command, and logs its outcome.

mod background;
mod backup_fetch;
mod backup_list;
mod backup_mark;
mod backup_push;
mod backup_verify;
mod common;
mod config_cmd;
mod delete;
mod restore_drill;
mod wal_fetch;
mod wal_prefetch;
mod wal_push;
mod wal_verify;

use std::time::Instant;

use crate::cli::{Cli, Command};
use crate::config::{fetch_mode_without_config, redact_url, Config, ProcessEnv};
use crate::deadline;
use crate::error::Error;
use crate::exit;
use crate::log::{self, Level};

pub use common::open_store;

/// Runs the command line and returns the process exit code.
pub fn run(cli: Cli) -> u8 {
    if let Command::WalFetch { .. } = cli.command {
        // Until the configuration resolves, the settings that can be read say if this is a standby.
        exit::set_panic_code(exit::wal_fetch_internal_code(standby_without_config(&cli)));
    }
    let op = match &cli.command {
        Command::WalPush { .. } => "wal-push",
        Command::WalFetch { .. } => "wal-fetch",
        Command::Config { .. } => "config",
        Command::WalPrefetch { .. } => "wal-prefetch",
        Command::Daemon { .. } => "daemon",
        Command::BackupPush { .. } => "backup-push",
        Command::BackupFetch { .. } => "backup-fetch",
        Command::BackupList { .. } => "backup-list",
        Command::Delete { .. } => "delete",
        Command::BackupMark { .. } => "backup-mark",
        Command::WalVerify { .. } => "wal-verify",
        Command::BackupVerify { restore_drill: true, .. } => "restore-drill",
        Command::BackupVerify { .. } => "backup-verify",
    };
    exit::set_panic_op(op);
    let child_args = cli.overrides().map(|o| o.as_args()).unwrap_or_default();
    let config = match cli
        .overrides()
        .map_err(Error::Usage)
        .and_then(|o| Config::resolve(&o, &ProcessEnv).map_err(Error::Config))
    {
        Ok(c) => c,
        Err(e) => {
            // The log level may be what failed to parse: errors are always shown.
            let code = match &cli.command {
                Command::WalFetch { .. } => exit::wal_fetch_code(&e, standby_without_config(&cli)),
                _ => exit::code_of(&e),
            };
            log::emit(Level::Error, &[("op", &op), ("outcome", &"error"), ("exit", &code), ("error", &e)]);
            return code;
        }
    };
    log::set_level(config.log_level);
    crate::ratelimit::configure(config.rate.network, config.rate.disk);
    crate::crypto::configure(config.encryption.clone());
    let runtime =
        tokio::runtime::Builder::new_current_thread().enable_all().build().expect("starting the async runtime");
    let started = Instant::now();
    let code = match cli.command {
        Command::WalPush { path } => {
            let file = path.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default();
            let watchdog = watch(&config, op, &file, &path, started, exit::code_of);
            let result = runtime.block_on(within_deadline(
                &config,
                "wal-push",
                &path,
                wal_push::run(&config, &path, &child_args),
            ));
            settle(&watchdog, result.as_ref().map_or_else(exit::code_of, |_| exit::OK));
            match result {
                Ok(r) => {
                    log::emit(
                        Level::Info,
                        &[
                            ("op", &op),
                            ("file", &file),
                            ("bytes_in", &r.bytes_in),
                            ("bytes_stored", &r.bytes_stored),
                            ("ms", &started.elapsed().as_millis()),
                            ("outcome", &r.outcome),
                        ],
                    );
                    exit::OK
                }
                Err(e) => fail(op, &file, started, &e, exit::code_of(&e)),
            }
        }
        Command::WalFetch { name, dest } => {
            // Failures answer as a standby expects (exit 1, ask again later) or abort a recovery.
            let standby = config.fetch_mode.is_standby();
            exit::set_panic_code(exit::wal_fetch_internal_code(standby));
            let watchdog = watch(&config, op, &name, &dest, started, move |e| exit::wal_fetch_code(e, standby));
            let fetch = wal_fetch::run(&config, &name, &dest, standby, &child_args);
            let result = runtime.block_on(within_deadline(&config, "wal-fetch", &dest, fetch));
            settle(&watchdog, result.as_ref().map_or_else(|e| exit::wal_fetch_code(e, standby), |_| exit::OK));
            match result {
                Ok(r) => {
                    log::emit(
                        Level::Info,
                        &[
                            ("op", &op),
                            ("file", &name),
                            ("bytes_stored", &r.bytes_stored),
                            ("bytes_out", &r.bytes_out),
                            ("ms", &started.elapsed().as_millis()),
                            ("outcome", &if r.prefetched { "prefetched" } else { "restored" }),
                            ("verified", &r.verified),
                        ],
                    );
                    exit::OK
                }
                Err(e @ Error::WalNotFound { .. }) => {
                    // Expected all the time: PostgreSQL probes for the next file and the
                    // next timeline. Not an error.
                    log::emit(
                        Level::Info,
                        &[
                            ("op", &op),
                            ("file", &name),
                            ("ms", &started.elapsed().as_millis()),
                            ("outcome", &"not-found"),
                        ],
                    );
                    exit::wal_fetch_code(&e, standby)
                }
                Err(e) => fail(op, &name, started, &e, exit::wal_fetch_code(&e, standby)),
            }
        }
        Command::Config { json } => {
            config_cmd::run(&config, json);
            exit::OK
        }
        Command::BackupPush { pgdata, fast, pg_url, json } => {
            match runtime.block_on(backup_push::run(&config, &pgdata, fast, pg_url.as_deref())) {
                Ok(r) => {
                    log::emit(
                        Level::Info,
                        &[
                            ("op", &op),
                            ("backup", &r.name),
                            ("start_lsn", &r.start_lsn),
                            ("finish_lsn", &r.finish_lsn),
                            ("partitions", &r.partitions),
                            ("files", &r.files),
                            ("bytes_in", &r.uncompressed_bytes),
                            ("bytes_stored", &r.stored_bytes),
                            ("wal_wait_ms", &r.wal_wait_ms),
                            ("ms", &started.elapsed().as_millis()),
                            ("outcome", &"stored"),
                        ],
                    );
                    if json {
                        println!("{}", serde_json::to_string_pretty(&r).expect("json"));
                    }
                    exit::OK
                }
                Err(e) => fail(op, "", started, &e, exit::code_of(&e)),
            }
        }
        Command::BackupFetch {
            dest,
            name,
            target_time,
            target_lsn,
            target_xid,
            target_name,
            target_immediate,
            target_action,
            target_timeline,
            standby,
            tablespace_map,
            restore_command,
            json,
        } => {
            let mut map = Vec::new();
            for pair in &tablespace_map {
                match pair.split_once('=') {
                    Some((oid, path)) if !oid.is_empty() && path.starts_with('/') => {
                        map.push((oid.to_string(), std::path::PathBuf::from(path)))
                    }
                    _ => {
                        let e = Error::Usage(format!("--tablespace-map {pair:?}: expected OID=/absolute/path"));
                        return fail(op, "", started, &e, exit::code_of(&e));
                    }
                }
            }
            let args = backup_fetch::FetchArgs {
                dest,
                backup: name,
                targets: crate::pg::recovery_conf::RecoveryTargets {
                    time: target_time,
                    lsn: target_lsn,
                    xid: target_xid,
                    name: target_name,
                    immediate: target_immediate,
                    action: target_action,
                    timeline: target_timeline,
                },
                standby,
                tablespace_map: map,
                restore_command,
            };
            match runtime.block_on(backup_fetch::run(&config, &args)) {
                Ok(r) => {
                    log::emit(
                        Level::Info,
                        &[
                            ("op", &op),
                            ("backup", &r.name),
                            ("partitions", &r.partitions),
                            ("files", &r.files),
                            ("bytes_out", &r.bytes),
                            ("verified", &r.verified),
                            ("ms", &started.elapsed().as_millis()),
                            ("outcome", &"restored"),
                        ],
                    );
                    if json {
                        println!("{}", serde_json::to_string_pretty(&r).expect("json"));
                    }
                    exit::OK
                }
                Err(e) => fail(op, "", started, &e, exit::code_of(&e)),
            }
        }
        Command::Daemon { pg_wal } => match runtime.block_on(wal_push::run_daemon(&config, &pg_wal)) {
            Ok(n) => {
                log::emit(Level::Debug, &[("op", &op), ("stored", &n), ("ms", &started.elapsed().as_millis())]);
                exit::OK
            }
            Err(e) => fail(op, "", started, &e, exit::code_of(&e)),
        },
        Command::WalPrefetch { after, dir, segment_size } => {
            match runtime.block_on(wal_prefetch::run(&config, &after, &dir, segment_size)) {
                Ok(n) => {
                    log::emit(
                        Level::Debug,
                        &[("op", &op), ("after", &after), ("fetched", &n), ("ms", &started.elapsed().as_millis())],
                    );
                    exit::OK
                }
                Err(e) => fail(op, &after, started, &e, exit::code_of(&e)),
            }
        }
        Command::BackupList { json, detail } => match runtime.block_on(backup_list::run(&config, json, detail)) {
            Ok(_) => exit::OK,
            Err(e) => fail(op, "", started, &e, exit::code_of(&e)),
        },
        Command::Delete { what, confirm, json } => match runtime.block_on(delete::run(&config, &what, confirm, json)) {
            Ok(r) => {
                log::emit(
                    Level::Info,
                    &[
                        ("op", &op),
                        ("mode", &r.mode),
                        ("objects", &r.objects),
                        ("bytes", &r.bytes),
                        ("ms", &started.elapsed().as_millis()),
                        ("outcome", &if r.confirmed { "deleted" } else { "dry-run" }),
                    ],
                );
                exit::OK
            }
            Err(e) => fail(op, "", started, &e, exit::code_of(&e)),
        },
        Command::BackupMark { name, unmark } => match runtime.block_on(backup_mark::run(&config, &name, !unmark)) {
            Ok(changed) => {
                log::emit(
                    Level::Info,
                    &[
                        ("op", &op),
                        ("backup", &name),
                        ("permanent", &!unmark),
                        ("outcome", &if changed { "marked" } else { "unchanged" }),
                    ],
                );
                exit::OK
            }
            Err(e) => fail(op, &name, started, &e, exit::code_of(&e)),
        },
        Command::WalVerify { json, pg_url } => {
            match runtime.block_on(wal_verify::run(&config, json, pg_url.as_deref())) {
                Ok(r) => {
                    log::emit(
                        Level::Info,
                        &[
                            ("op", &op),
                            ("segments", &r.segments_checked),
                            ("ms", &started.elapsed().as_millis()),
                            ("outcome", &"complete"),
                        ],
                    );
                    exit::OK
                }
                Err(e) => fail(op, "", started, &e, exit::code_of(&e)),
            }
        }
        Command::BackupVerify { name, restore_drill: false, json, .. } => {
            match runtime.block_on(backup_verify::run(&config, &name)) {
                Ok(r) => report_verify(op, &r, json),
                Err(e) => fail(op, &name, started, &e, exit::code_of(&e)),
            }
        }
        Command::BackupVerify { name, restore_drill: true, drill_dir, pg_bindir, drill_timeout_secs, keep, json } => {
            let args = restore_drill::DrillArgs {
                backup: name.clone(),
                dir: drill_dir,
                bindir: pg_bindir,
                timeout: std::time::Duration::from_secs(drill_timeout_secs),
                keep,
            };
            match runtime.block_on(restore_drill::run(&config, &args)) {
                Ok(r) => report_drill(op, &r, json),
                Err(e) => fail(op, &name, started, &e, exit::code_of(&e)),
            }
        }
    };
    // Work abandoned at a deadline may still sit in blocking threads: do not wait for it.
    // Nothing half-done is ever visible (temporary files, unfinished multipart uploads).
    runtime.shutdown_background();
    code
}

/// Whether wal-fetch answers as a standby while the configuration is not resolved: a bad
/// key file must not turn `WALRS_FETCH_MODE=standby` into a recovery abort.
fn standby_without_config(cli: &Cli) -> bool {
    fetch_mode_without_config(cli.overrides().ok().as_ref(), &ProcessEnv).is_standby()
}

/// Ends a WAL command that made no progress for `retry_deadline_secs`: nothing moved to or
/// from the store and it answered no request (see [`crate::deadline`]). A transfer whose
/// bytes keep moving runs on, however long it takes; PostgreSQL still gets an answer in
/// time from a store that stopped answering.
async fn within_deadline<T>(
    config: &Config,
    op: &'static str,
    path: &std::path::Path,
    work: impl std::future::Future<Output = Result<T, Error>>,
) -> Result<T, Error> {
    tokio::select! {
        biased;
        result = work => result,
        _ = deadline::stalled(deadline::clock(), config.retry.deadline) => {
            Err(stalled(op, path, deadline_detail(config)))
        }
    }
}

fn stalled(op: &'static str, path: &std::path::Path, detail: String) -> Error {
    Error::Store(crate::store::StoreError::Unavailable { op, key: path.display().to_string(), detail })
}

/// Starts the clock of a WAL command and the watchdog that ends it if it gets stuck where
/// the ordinary deadline cannot fire (a blocking call on the async runtime's thread that
/// never returns): one error line, as [`fail`] writes it, then exit with the command's code
/// for an unavailable store (`code_of`).
fn watch(
    config: &Config,
    op: &'static str,
    file: &str,
    path: &std::path::Path,
    started: Instant,
    code_of: impl Fn(&Error) -> u8,
) -> Option<deadline::Watchdog> {
    deadline::progress();
    let limit = config.retry.deadline + deadline::WATCHDOG_MARGIN;
    let detail = format!(
        "stuck for {} s (retry_deadline_secs plus {} s) in a call to {} that does not return (a hung network mount?)",
        limit.as_secs(),
        deadline::WATCHDOG_MARGIN.as_secs(),
        store_description(config)
    );
    let err = stalled(op, path, detail);
    let code = code_of(&err);
    let file = file.to_string();
    deadline::Watchdog::start(deadline::clock(), limit, code, move || {
        fail(op, &file, started, &err, code);
    })
}

/// Tells the watchdog the command's answer, before it is logged.
fn settle(watchdog: &Option<deadline::Watchdog>, code: u8) {
    if let Some(w) = watchdog {
        w.settle(code);
    }
}

/// Why a command ran out of time, for PostgreSQL's log: the store, and its endpoint without
/// its user-info, as `wal-rs config` shows it.
fn deadline_detail(config: &Config) -> String {
    format!(
        "no progress for {} s (retry_deadline_secs) with {}",
        config.retry.deadline.as_secs(),
        store_description(config)
    )
}

/// "the store URL at ENDPOINT", with no user-info in either.
fn store_description(config: &Config) -> String {
    format!(
        "the store {}{}",
        config.store.as_ref().map(|s| redact_url(&s.to_string())).unwrap_or_default(),
        config.s3.endpoint.as_deref().map(|e| format!(" at {}", redact_url(e))).unwrap_or_default()
    )
}

/// backup-verify's result: a log line per problem and a summary; exit 10 when any.
fn report_verify(op: &str, r: &backup_verify::VerifyReport, json: bool) -> u8 {
    for p in &r.problems {
        log::emit(Level::Error, &[("op", &op), ("backup", &r.backup), ("object", &p.object), ("problem", &p.detail)]);
    }
    log::emit(
        if r.ok { Level::Info } else { Level::Error },
        &[
            ("op", &op),
            ("backup", &r.backup),
            ("partitions", &r.partitions),
            ("files", &r.files),
            ("bytes_stored", &r.bytes_stored),
            ("bytes_out", &r.bytes_original),
            ("wal_segments", &r.wal_segments),
            ("problems", &r.problems.len()),
            ("ms", &r.ms),
            ("outcome", &if r.ok { "verified" } else { "damaged" }),
        ],
    );
    if json {
        println!("{}", serde_json::to_string_pretty(r).expect("json"));
    } else if r.ok {
        println!(
            "backup {} verified: {} partitions, {} files, {} bytes read, {} WAL segments present{}",
            r.backup,
            r.partitions,
            r.files,
            r.bytes_stored,
            r.wal_segments,
            if r.manifest { "" } else { " (no manifest: files not checked one by one)" }
        );
    } else {
        println!("backup {} is damaged: {} problems:", r.backup, r.problems.len());
        for p in &r.problems {
            println!("  {}: {}", p.object, p.detail);
        }
    }
    if r.ok {
        exit::OK
    } else {
        exit::CORRUPT
    }
}

/// The restore drill's result; exit 10 when it failed.
fn report_drill(op: &str, r: &restore_drill::DrillReport, json: bool) -> u8 {
    let failure = r.failure.clone().unwrap_or_default();
    log::emit(
        if r.passed { Level::Info } else { Level::Error },
        &[
            ("op", &op),
            ("backup", &r.backup),
            ("restore_ms", &r.restore_ms),
            ("recovery_ms", &r.recovery_ms),
            ("amcheck", &r.amcheck),
            ("amcheck_ms", &r.amcheck_ms),
            ("databases", &r.databases),
            ("prepared_rolled_back", &r.prepared_rolled_back),
            ("tables", &r.tables),
            ("ms", &r.total_ms),
            ("outcome", &if r.passed { "passed" } else { "failed" }),
            ("error", &failure),
        ],
    );
    if json {
        println!("{}", serde_json::to_string_pretty(r).expect("json"));
    } else if r.passed {
        println!(
            "restore drill of {} passed in {:.1} s: restore {:.1} s, recovery {:.1} s, {} databases, {} tables, pg_amcheck {}",
            r.backup,
            r.total_ms as f64 / 1000.0,
            r.restore_ms as f64 / 1000.0,
            r.recovery_ms as f64 / 1000.0,
            r.databases,
            r.tables,
            r.amcheck
        );
    } else {
        println!("restore drill of {} FAILED: {failure}", r.backup);
    }
    if r.passed {
        exit::OK
    } else {
        exit::CORRUPT
    }
}

fn fail(op: &str, file: &str, started: Instant, err: &Error, code: u8) -> u8 {
    log::emit(
        Level::Error,
        &[
            ("op", &op),
            ("file", &file),
            ("ms", &started.elapsed().as_millis()),
            ("outcome", &"error"),
            ("exit", &code),
            ("error", err),
        ],
    );
    code
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Overrides;
    use crate::test_support::NoEnv;

    #[test]
    fn the_deadline_error_redacts_the_endpoint() {
        let mut o = Overrides::default();
        o.values.insert("store".into(), "s3://bucket/p".into());
        o.values.insert("s3_endpoint".into(), "http://ak:se/cret@minio:9000".into());
        let config = Config::resolve(&o, &NoEnv).unwrap();
        let detail = deadline_detail(&config);
        assert!(!detail.contains("se/cret") && !detail.contains("ak:"), "{detail}");
        assert!(detail.contains("s3://bucket/p at http://<redacted>@minio:9000"), "{detail}");
    }
}
