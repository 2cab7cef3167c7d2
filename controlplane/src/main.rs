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
    let walrs_env = std::env::vars()
        .filter(|(k, _)| k.starts_with("WALRS_") && !k.starts_with("WALRS_CONTROL_"))
        .filter(|(k, _)| !matches!(k.as_str(), "WALRS_BIN" | "WALRS_STORE" | "WALRS_CONFIG"))
        .collect();
    let ctx = Arc::new(Ctx {
        cfg: cli.config.clone(),
        conninfo,
        provider,
        store_root,
        walrs_env,
        walrs_path: walrs_path.display().to_string(),
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
