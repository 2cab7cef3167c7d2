//! The `wal-rs` binary: parse the command line, run it, exit with its documented code.

use clap::Parser;

fn main() -> std::process::ExitCode {
    // glibc raises its mmap threshold after large buffers are freed, then serves the next
    // 8 MiB upload parts from the heap and keeps their pages: backup-push's memory grew with
    // the database size on S3 (57 MiB at pgbench scale 50, 73 MiB at 200). A fixed threshold
    // keeps large buffers in their own mappings, returned to the system when freed.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator tuning; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 2 << 20);
    }
    wal_rs::exit::install_panic_hook();
    let args: Vec<String> = std::env::args_os().map(|a| a.to_string_lossy().into_owned()).collect();
    let cli = match wal_rs::cli::Cli::try_parse_from(&args) {
        Ok(cli) => cli,
        Err(e) => return std::process::ExitCode::from(wal_rs::cli::usage_failure(e, &args)),
    };
    std::process::ExitCode::from(wal_rs::commands::run(cli))
}
