//! The `wal-rs` binary: parse the command line, run it, exit with its documented code.

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = wal_rs::cli::Cli::parse();
    std::process::ExitCode::from(wal_rs::commands::run(cli))
}
