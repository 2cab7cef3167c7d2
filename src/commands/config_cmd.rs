//! `wal-rs config`: the effective configuration, each value with its source, secrets
//! redacted. Credentials are never resolved here (that may need the network); the command
//! says where the SDK's chain will find them.

use serde_json::json;

use crate::config::{printable, Config};
use crate::crypto::Key;

/// Environment variables holding credentials: shown as set or not, never by value.
const SECRET_ENV: &[&str] = &["AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"];

pub(super) fn run(config: &Config, as_json: bool) {
    let rows: Vec<(&str, String, String)> = config
        .report
        .iter()
        .map(|(setting, value, source)| {
            let shown = match value {
                // The key itself is never shown: its id tells keys apart. Its own id, not the
                // ring's: a key file from a stronger source may be the one in use.
                Some(v) if setting.key == "encryption_key" => match Key::parse(v) {
                    Ok(key) => format!("(set, key id {})", key.id()),
                    Err(_) => "(set)".to_string(),
                },
                Some(v) => printable(setting.key, v),
                None => "(not set)".to_string(),
            };
            (setting.key, shown, source.to_string())
        })
        .collect();
    let credentials = credential_source();
    if as_json {
        let settings: serde_json::Map<String, serde_json::Value> =
            rows.iter().map(|(k, v, s)| (k.to_string(), json!({ "value": v, "source": s }))).collect();
        let out = json!({
            "config_file": config.file.as_ref().map(|p| p.display().to_string()),
            "encryption_key_ids": config.encryption.as_ref().map(|r| r.ids().iter().map(|i| i.to_string()).collect::<Vec<_>>()),
            "settings": settings,
            "s3_credentials": credentials,
        });
        println!("{}", serde_json::to_string_pretty(&out).expect("json"));
        return;
    }
    let width = rows.iter().map(|(k, _, _)| k.len()).max().unwrap_or(0);
    let vwidth = rows.iter().map(|(_, v, _)| v.len()).max().unwrap_or(0).min(48);
    if let Some(f) = &config.file {
        println!("config file: {}", f.display());
    }
    for (k, v, s) in &rows {
        println!("{k:width$}  {v:vwidth$}  ({s})");
    }
    println!("{:width$}  {credentials}", "s3_credentials");
    if let Some(ring) = &config.encryption {
        let ids: Vec<String> = ring.ids().iter().map(|i| i.to_string()).collect();
        println!("{:width$}  {} (the first seals new objects)", "encryption_key_ids", ids.join(", "));
    }
}

/// Where aws-config's chain will find credentials, with the key id shortened and secrets
/// reduced to "set".
fn credential_source() -> String {
    let var = |n: &str| std::env::var(n).ok().filter(|v| !v.is_empty());
    if let Some(id) = var("AWS_ACCESS_KEY_ID") {
        // Key ids are not secret, but show only enough to tell keys apart.
        let tail: String = if id.len() >= 16 { id[id.len() - 4..].to_string() } else { String::new() };
        let secrets: Vec<String> =
            SECRET_ENV.iter().map(|n| format!("{n} {}", if var(n).is_some() { "set" } else { "not set" })).collect();
        return format!("env AWS_ACCESS_KEY_ID=...{tail}, {}", secrets.join(", "));
    }
    if let Some(profile) = var("AWS_PROFILE") {
        return format!("profile {profile:?} from the shared AWS config files");
    }
    "default chain: profile files, web identity, container or instance metadata".to_string()
}
