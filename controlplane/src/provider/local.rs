//! The local provider: each server is a PostgreSQL cluster in its own folder
//! (`<data>/servers/<server-id>/pgdata`) on its own TCP port of 127.0.0.1, run as the postgres
//! user, and "running a command on the server" is a subprocess.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use super::{Handle, Provider};
use crate::sys::{self, pg_tool, run_as_postgres, Output};

/// Servers as folders of this machine.
#[derive(Debug, Clone)]
pub struct Local {
    root: PathBuf,
    walrs: PathBuf,
}

impl Local {
    /// Servers under `data/servers`, running the wal-rs installed at `walrs`.
    pub fn new(data: &Path, walrs: PathBuf) -> Local {
        Local { root: data.join("servers"), walrs }
    }

    fn dir(&self, h: &Handle) -> PathBuf {
        self.root.join(&h.provider_id)
    }

    async fn pg_ctl(&self, h: &Handle, args: &[&str]) -> Result<Output> {
        let mut argv = vec![pg_tool("pg_ctl"), "-D".into(), h.pgdata.clone()];
        argv.extend(args.iter().map(|s| s.to_string()));
        run_as_postgres(&argv, &[]).await
    }
}

/// Removes a server's folder; one already gone is fine.
fn remove_server_dir(dir: &Path) -> Result<()> {
    match std::fs::remove_dir_all(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("removing {}", dir.display()))
        }
        _ => Ok(()),
    }
}

/// A TCP port nobody listens on now.
fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(l.local_addr()?.port())
}

impl Provider for Local {
    async fn create(&self, server_id: &str) -> Result<Handle> {
        let dir = self.root.join(server_id);
        sys::pg_dir(&self.root, 0o755)?;
        sys::pg_dir(&dir, 0o755)?;
        // The port is chosen once and kept in the folder, so creating again is the same server.
        let port_file = dir.join("port");
        let port = match std::fs::read_to_string(&port_file).ok().and_then(|s| s.trim().parse().ok()) {
            Some(p) => p,
            None => {
                let p = free_port()?;
                std::fs::write(&port_file, p.to_string())
                    .with_context(|| format!("writing {}", port_file.display()))?;
                p
            }
        };
        Ok(Handle {
            provider_id: server_id.to_string(),
            host: "127.0.0.1".into(),
            port,
            pgdata: dir.join("pgdata").display().to_string(),
        })
    }

    async fn start(&self, h: &Handle) -> Result<()> {
        if self.is_running(h).await? {
            return Ok(());
        }
        let log = self.dir(h).join("postgresql.log").display().to_string();
        let out = self.pg_ctl(h, &["-l", &log, "-w", "-t", "120", "start"]).await?;
        if out.code != 0 && !self.is_running(h).await? {
            let tail = std::fs::read_to_string(&log).unwrap_or_default();
            let last =
                tail.lines().rev().find(|l| l.contains("FATAL") || l.contains("PANIC")).unwrap_or("").to_string();
            anyhow::bail!("pg_ctl start of {} exited {}: {last}", h.provider_id, out.code);
        }
        Ok(())
    }

    async fn stop(&self, h: &Handle, immediate: bool) -> Result<()> {
        if !self.is_running(h).await? {
            return Ok(());
        }
        let mode = if immediate { "immediate" } else { "fast" };
        let out = self.pg_ctl(h, &["-m", mode, "-w", "-t", "60", "stop"]).await?;
        if out.code != 0 && self.is_running(h).await? {
            out.ok(&format!("pg_ctl stop of {}", h.provider_id))?;
        }
        Ok(())
    }

    async fn is_running(&self, h: &Handle) -> Result<bool> {
        Ok(sys::postmaster_running(Path::new(&h.pgdata)))
    }

    async fn destroy(&self, h: &Handle) -> Result<()> {
        self.stop(h, true).await?;
        remove_server_dir(&self.dir(h))
    }

    async fn forget(&self, server_id: &str) -> Result<()> {
        // `create` makes the folder and its port file only; PostgreSQL never ran there.
        remove_server_dir(&self.root.join(server_id))
    }

    async fn run(&self, _h: &Handle, argv: &[String], env: &[(String, String)]) -> Result<Output> {
        let mut argv = argv.to_vec();
        if argv[0] == "wal-rs" {
            argv[0] = self.walrs.display().to_string();
        } else if !argv[0].contains('/') && sys::bindir().join(&argv[0]).exists() {
            argv[0] = pg_tool(&argv[0]);
        }
        run_as_postgres(&argv, env).await
    }

    async fn write_file(&self, h: &Handle, rel: &str, content: &str) -> Result<()> {
        let path = Path::new(&h.pgdata).join(rel);
        let tmp = path.with_extension("tmp-walrs-control");
        std::fs::write(&tmp, content).with_context(|| format!("writing {}", tmp.display()))?;
        if sys::is_root() {
            let (uid, gid) = sys::postgres_ids()?;
            std::os::unix::fs::chown(&tmp, Some(uid), Some(gid))?;
        }
        std::fs::rename(&tmp, &path).with_context(|| format!("renaming into {}", path.display()))
    }

    async fn disk_used(&self, h: &Handle) -> Result<u64> {
        let dir = PathBuf::from(&h.pgdata);
        Ok(tokio::task::spawn_blocking(move || du(&dir)).await?)
    }

    async fn stop_all(&self) -> Result<()> {
        let Ok(entries) = std::fs::read_dir(&self.root) else { return Ok(()) };
        for e in entries.flatten() {
            let id = e.file_name().to_string_lossy().into_owned();
            let h = Handle {
                provider_id: id.clone(),
                host: "127.0.0.1".into(),
                port: 0,
                pgdata: e.path().join("pgdata").display().to_string(),
            };
            if let Err(err) = self.stop(&h, true).await {
                crate::warn!("event" = "stop_failed", "server" = id, "error" = err);
            }
        }
        Ok(())
    }
}

/// Bytes of the regular files under `dir` (0 when it does not exist).
fn du(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else { continue };
        for e in entries.flatten() {
            match e.metadata() {
                Ok(m) if m.is_dir() => stack.push(e.path()),
                Ok(m) => total += m.len(),
                Err(_) => {}
            }
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A server destroyed while `provisioning` has no handle; what `create` made for it (its
    /// folder and port file) is still removed. Forgetting what was never made succeeds.
    #[tokio::test]
    async fn forgetting_a_server_removes_what_create_made() {
        let data = std::env::temp_dir().join(format!("walrs-control-forget-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&data);
        let local = Local::new(&data, PathBuf::from("wal-rs"));
        let h = local.create("s1").await.unwrap();
        let dir = data.join("servers/s1");
        assert!(dir.join("port").exists(), "create made no port file");
        assert_eq!(local.create("s1").await.unwrap(), h, "create again is the same server");
        local.forget("s1").await.unwrap();
        assert!(!dir.exists(), "{} left behind", dir.display());
        local.forget("s1").await.unwrap();
        local.forget("never-created").await.unwrap();
        std::fs::remove_dir_all(&data).unwrap();
    }
}
