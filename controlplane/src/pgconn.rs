//! Talking to a managed server's PostgreSQL: one short connection per question, every value
//! as text, with a deadline so a hung server cannot stall an observer or a worker.

use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use tokio_postgres::{NoTls, SimpleQueryMessage};

use crate::provider::Handle;

/// Rows of `sql` (one or more statements), NULL as None.
pub async fn query(h: &Handle, sql: &str) -> Result<Vec<Vec<Option<String>>>> {
    let work = async {
        let (client, conn) = tokio_postgres::connect(&h.conninfo(), NoTls).await?;
        let driver = tokio::spawn(conn);
        let result = client.simple_query(sql).await;
        drop(client);
        let _ = driver.await;
        result
    };
    let messages = tokio::time::timeout(Duration::from_secs(30), work)
        .await
        .map_err(|_| anyhow!("query on {}:{} timed out", h.host, h.port))?
        .with_context(|| format!("query on {}:{}", h.host, h.port))?;
    Ok(messages
        .into_iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => Some((0..r.len()).map(|i| r.get(i).map(str::to_string)).collect()),
            _ => None,
        })
        .collect())
}

/// The single value of `sql`.
pub async fn one(h: &Handle, sql: &str) -> Result<Option<String>> {
    let rows = query(h, sql).await?;
    Ok(rows.into_iter().next().and_then(|r| r.into_iter().next()).flatten())
}
