//! The commands. [`run`] is the single place that turns a parsed command line into an exit
//! code: it resolves the configuration, runs one command, and logs its outcome.

mod common;
mod config_cmd;
mod wal_fetch;
mod wal_push;

use std::time::Instant;

use crate::cli::{Cli, Command};
use crate::config::{Config, ProcessEnv};
use crate::error::Error;
use crate::exit;
use crate::log::{self, Level};

pub use common::open_store;

/// Runs the command line and returns the process exit code.
pub fn run(cli: Cli) -> u8 {
    let op = match &cli.command {
        Command::WalPush { .. } => "wal-push",
        Command::WalFetch { .. } => "wal-fetch",
        Command::Config { .. } => "config",
    };
    let config = match cli
        .overrides()
        .map_err(Error::Usage)
        .and_then(|o| Config::resolve(&o, &ProcessEnv).map_err(Error::Config))
    {
        Ok(c) => c,
        Err(e) => {
            // The log level may be what failed to parse: errors are always shown.
            log::emit(
                Level::Error,
                &[("op", &op), ("outcome", &"error"), ("error", &e)],
            );
            return match &cli.command {
                Command::WalFetch { .. } => exit::wal_fetch_code(&e, standby_signal_present()),
                _ => exit::code_of(&e),
            };
        }
    };
    log::set_level(config.log_level);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("starting the async runtime");
    let started = Instant::now();
    match cli.command {
        Command::WalPush { path } => {
            let result = runtime.block_on(wal_push::run(&config, &path));
            let file = path
                .file_name()
                .map(|f| f.to_string_lossy().into_owned())
                .unwrap_or_default();
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
            let standby = wal_fetch::is_standby(&config);
            match runtime.block_on(wal_fetch::run(&config, &name, &dest)) {
                Ok(r) => {
                    log::emit(
                        Level::Info,
                        &[
                            ("op", &op),
                            ("file", &name),
                            ("bytes_stored", &r.bytes_stored),
                            ("bytes_out", &r.bytes_out),
                            ("ms", &started.elapsed().as_millis()),
                            ("outcome", &"restored"),
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

/// Whether the current directory (the data directory, when PostgreSQL runs us) holds
/// `standby.signal`.
fn standby_signal_present() -> bool {
    std::path::Path::new("standby.signal").exists()
}
