//! `wal-rs-control`: the control plane. Turns the wal-rs CLI into a database service:
//! provisions PostgreSQL servers and builds followers, forks and point-in-time rollbacks by
//! running wal-rs on them, with state machines that converge (docs/controlplane.md).
//!
//! It reaches storage only through the `wal-rs` CLI, never through the core library.

mod clock;
mod config;
mod converge;
mod db;
mod http;
mod logfmt;
mod model;
mod observer;
mod pgconn;
mod provider;
mod queue;
mod sys;
mod worker;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Parser;

use config::{Cli, Process};
use converge::Ctx;
use provider::Provider;

fn main() {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build();
    let result = runtime.context("starting the tokio runtime").and_then(|rt| rt.block_on(run(cli)));
    if let Err(e) = result {
        eprintln!("wal-rs-control: {e:#}");
        std::process::exit(1);
    }
}

async fn run(mut cli: Cli) -> Result<()> {
    std::fs::create_dir_all(&cli.config.data)
        .with_context(|| format!("creating the data folder {}", cli.config.data.display()))?;
    cli.config.data = cli.config.data.canonicalize()?;
    let data = cli.config.data.clone();
    sys::pg_dir(&data, 0o755)?;
    let walrs_path = install_walrs(&cli.config.walrs_bin, &data)?;
    let provider = provider::local::Local::new(&data, walrs_path.clone());
    if cli.process == Process::StopAll {
        provider.stop_all().await?;
        let pgdata = data.join("state").display().to_string();
        let argv =
            [sys::pg_tool("pg_ctl"), "-D".into(), pgdata, "-m".into(), "fast".into(), "-w".into(), "stop".into()];
        let _ = sys::run_as_postgres(&argv, &[]).await?;
        info!("event" = "stopped_all", "data" = data.display());
        return Ok(());
    }
    let conninfo = db::locate(&cli.config).await?;
    db::migrate(&conninfo).await?;
    let store_root = match &cli.config.store {
        Some(s) => s.clone(),
        None => {
            sys::pg_dir(&data.join("store"), 0o755)?;
            format!("file://{}", data.join("store").display())
        }
    };
    let mut walrs_env = walrs_settings(std::env::vars())?;
    let encryption_key_file = match walrs_env.iter_mut().find(|(k, _)| k == KEY_FILE_VAR) {
        Some((_, path)) => {
            *path = key_file_for_postgres(path).await?;
            Some(path.clone())
        }
        None => None,
    };
    let ctx = Arc::new(Ctx {
        cfg: cli.config.clone(),
        conninfo,
        provider,
        store_root,
        walrs_env,
        walrs_path: walrs_path.display().to_string(),
        encryption_key_file,
    });
    let mut tasks = tokio::task::JoinSet::new();
    let p = cli.process;
    if matches!(p, Process::All | Process::Web) {
        tasks.spawn(http::serve(ctx.clone()));
    }
    if matches!(p, Process::All | Process::Observer) {
        let ctx = ctx.clone();
        tasks.spawn(async move {
            observer::run(ctx).await;
            Ok(())
        });
    }
    if matches!(p, Process::All | Process::Clock) {
        let ctx = ctx.clone();
        tasks.spawn(async move {
            clock::run(ctx).await;
            Ok(())
        });
    }
    let workers = match p {
        Process::All => cli.config.workers,
        Process::Worker => 1,
        _ => 0,
    };
    for n in 0..workers {
        let ctx = ctx.clone();
        tasks.spawn(async move {
            worker::run(ctx, n).await;
            Ok(())
        });
    }
    tokio::select! {
        Some(r) = tasks.join_next() => r?,
        _ = tokio::signal::ctrl_c() => Ok(()),
    }
}

/// The wal-rs setting that names the encryption key file.
const KEY_FILE_VAR: &str = "WALRS_ENCRYPTION_KEY_FILE";

/// The `WALRS_*` settings passed on to the wal-rs commands the workers run (not the control
/// plane's own, nor the binary, store and config file, which it sets itself).
///
/// Encryption keys reach the servers only as a key file: archive_command and the
/// restore_command that backup-fetch writes carry the file's path (`--set
/// encryption_key_file=...`), never a key, since both end up in the server's configuration
/// files and process list. A raw `WALRS_ENCRYPTION_KEY` is refused rather than copied into a
/// file of ours: backups would be encrypted while WAL, pushed by archive_command, could not
/// be, and where a key lives on disk is the operator's choice.
fn walrs_settings(vars: impl Iterator<Item = (String, String)>) -> Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    for (k, v) in vars {
        if !k.starts_with("WALRS_")
            || k.starts_with("WALRS_CONTROL_")
            || matches!(k.as_str(), "WALRS_BIN" | "WALRS_STORE" | "WALRS_CONFIG")
        {
            continue;
        }
        if k == "WALRS_ENCRYPTION_KEY" {
            if v.trim().is_empty() {
                continue;
            }
            anyhow::bail!(
                "WALRS_ENCRYPTION_KEY is set, but the control plane gives servers keys only as a file: write the key to a file the postgres user can read (mode 0600) and set {KEY_FILE_VAR} to its path instead"
            );
        }
        if k == KEY_FILE_VAR && v.trim().is_empty() {
            continue;
        }
        out.push((k, v));
    }
    Ok(out)
}

/// The absolute path of the key file `path`, checked readable by the postgres user (who runs
/// archive_command and restore_command, from PGDATA). Errors never show a value that may be a
/// key pasted where its path belongs.
async fn key_file_for_postgres(path: &str) -> Result<String> {
    let shown = if path.contains('/') { format!(" {path}") } else { String::new() };
    let abs = Path::new(path)
        .canonicalize()
        .with_context(|| format!("{KEY_FILE_VAR}{shown}: not an existing file; set it to the key file's path"))?;
    let abs = abs.display().to_string();
    let out = sys::run_as_postgres(&["test".into(), "-r".into(), abs.clone()], &[]).await?;
    if out.code != 0 {
        anyhow::bail!(
            "{KEY_FILE_VAR} {abs}: the postgres user cannot read it; give it to postgres (chown postgres, mode 0600)"
        );
    }
    Ok(abs)
}

/// Copies the wal-rs binary to `<data>/bin/wal-rs` (mode 755), so that archive_command,
/// running as postgres, can execute it whatever the permissions of the checkout it was built
/// in. Returns the copy's path.
fn install_walrs(bin: &Path, data: &Path) -> Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    if !bin.is_file() {
        anyhow::bail!(
            "wal-rs binary not found at {}: build it with `cargo build --release -p wal-rs` or set WALRS_BIN",
            bin.display()
        );
    }
    let dir = data.join("bin");
    std::fs::create_dir_all(&dir)?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))?;
    let dest = dir.join("wal-rs");
    let same = std::fs::metadata(&dest)
        .ok()
        .zip(std::fs::metadata(bin).ok())
        .is_some_and(|(a, b)| a.len() == b.len() && a.modified().ok() >= b.modified().ok());
    if !same {
        let tmp = dir.join(format!(".wal-rs.{}", std::process::id()));
        std::fs::copy(bin, &tmp).with_context(|| format!("copying {} to {}", bin.display(), tmp.display()))?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755))?;
        std::fs::rename(&tmp, &dest)?;
    }
    Ok(dest)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> impl Iterator<Item = (String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<Vec<_>>().into_iter()
    }

    #[test]
    fn walrs_settings_keep_walrs_variables_but_not_the_control_planes() {
        let env = walrs_settings(vars(&[
            ("WALRS_NETWORK_RATE_LIMIT", "300000"),
            ("WALRS_CONTROL_DATA", "/x"),
            ("WALRS_STORE", "file:///elsewhere"),
            ("WALRS_ENCRYPTION_KEY_FILE", "/etc/wal-rs/keys"),
            ("HOME", "/root"),
        ]))
        .unwrap();
        assert_eq!(
            env,
            vec![
                ("WALRS_NETWORK_RATE_LIMIT".to_string(), "300000".to_string()),
                ("WALRS_ENCRYPTION_KEY_FILE".to_string(), "/etc/wal-rs/keys".to_string())
            ]
        );
    }

    #[test]
    fn a_raw_encryption_key_is_refused_without_showing_it() {
        let key = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";
        let err = walrs_settings(vars(&[("WALRS_ENCRYPTION_KEY", key)])).unwrap_err().to_string();
        assert!(err.contains("WALRS_ENCRYPTION_KEY_FILE") && !err.contains(key), "{err}");
        assert!(!err.contains('\n'), "not one line: {err}");
        // Empty counts as unset.
        assert!(walrs_settings(vars(&[("WALRS_ENCRYPTION_KEY", "")])).unwrap().is_empty());
    }
}
