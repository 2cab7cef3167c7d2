//! Connecting with the settings operators already use: `--pg-url`, or libpq's environment
//! (`PGHOST`, `PGPORT`, `PGUSER`, `PGDATABASE`, `PGPASSWORD`).

use std::time::Duration;

use tokio_postgres::{Client, Config as PgConfig, NoTls};

use crate::error::Error;

/// Connects and spawns the connection task on the current runtime.
pub async fn connect(url: Option<&str>) -> Result<Client, Error> {
    let mut config = match url {
        Some(u) => u
            .parse::<PgConfig>()
            .map_err(|e| Error::Config(format!("--pg-url is not a valid connection string: {e}")))?,
        None => from_env(),
    };
    shorten_keepalives(&mut config);
    let (client, connection) = config.connect(NoTls).await.map_err(|e| {
        Error::Config(format!(
            "cannot connect to PostgreSQL ({}): set PGHOST, PGPORT, PGUSER (and PGPASSWORD) or --pg-url",
            one_line(&e)
        ))
    })?;
    tokio::spawn(async move {
        // Errors surface on the next query; nothing to do here.
        let _ = connection.await;
    });
    Ok(client)
}

/// TCP keepalives well inside the idle timeouts of firewalls and NAT gateways (often 5 to
/// 15 minutes): backup-push leaves its session idle for the whole walk and upload, and the
/// kernel's default of a first probe after 2 hours lets such a box drop the connection,
/// which then shows only at pg_backup_stop, after the whole upload. A dead peer is also
/// noticed within about two minutes. Settings the connection string gives are kept; Unix
/// sockets ignore them.
fn shorten_keepalives(config: &mut PgConfig) {
    const KERNEL_DEFAULT_IDLE: Duration = Duration::from_secs(2 * 60 * 60);
    if config.get_keepalives_idle() >= KERNEL_DEFAULT_IDLE {
        config.keepalives_idle(Duration::from_secs(60));
    }
    if config.get_keepalives_interval().is_none() {
        config.keepalives_interval(Duration::from_secs(10));
    }
    if config.get_keepalives_retries().is_none() {
        config.keepalives_retries(6);
    }
}

/// libpq's defaults: a Unix socket in /var/run/postgresql, port 5432, the OS user.
fn from_env() -> PgConfig {
    let var = |n: &str| std::env::var(n).ok().filter(|v| !v.is_empty());
    let mut c = PgConfig::new();
    let host = var("PGHOST").unwrap_or_else(|| "/var/run/postgresql".into());
    for h in host.split(',') {
        c.host(h);
    }
    c.port(var("PGPORT").and_then(|p| p.parse().ok()).unwrap_or(5432));
    let user = var("PGUSER").or_else(|| var("USER")).unwrap_or_else(|| "postgres".into());
    c.dbname(var("PGDATABASE").unwrap_or_else(|| user.clone()));
    c.user(&user);
    if let Some(p) = var("PGPASSWORD") {
        c.password(p);
    }
    c.application_name("wal-rs");
    c
}

/// A tokio-postgres error with its cause, on one line (the bare Display hides the cause).
pub fn one_line(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return format!("{}: {}", db.severity(), db.message());
    }
    let mut out = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keepalives_are_shorter_than_firewall_idle_timeouts_unless_set() {
        let mut c: PgConfig = "host=db user=u".parse().unwrap();
        shorten_keepalives(&mut c);
        assert!(c.get_keepalives());
        assert_eq!(c.get_keepalives_idle(), Duration::from_secs(60));
        assert_eq!(c.get_keepalives_interval(), Some(Duration::from_secs(10)));
        assert_eq!(c.get_keepalives_retries(), Some(6));
        let mut set: PgConfig = "host=db user=u keepalives_idle=30 keepalives_interval=5".parse().unwrap();
        shorten_keepalives(&mut set);
        assert_eq!(set.get_keepalives_idle(), Duration::from_secs(30));
        assert_eq!(set.get_keepalives_interval(), Some(Duration::from_secs(5)));
    }
}
