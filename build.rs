//! Links GCC's unwinder into wal-rs statically, as `gcc -static-libgcc` does, on Linux with
//! glibc, so that the binary no longer loads libgcc_s.so.1.
//!
//! Why: that library's constructor (`__cpu_indicator_init`) runs about fifteen CPUID
//! instructions in every process that loads it, and in a virtual machine each CPUID exits to
//! the hypervisor: 15 µs apiece on the benchmark machine, 0.2 ms of every wal-push and
//! wal-fetch, which PostgreSQL starts once per WAL file. The static unwinder is the same code
//! (`libgcc_eh.a` of the same compiler), so panics unwind and backtraces print as before.
//!
//! Whole-archive, so that the unwinder's symbols are defined before the linker meets the
//! `-lgcc_s` that Rust's standard library asks for; with `--as-needed` (rustc's default) the
//! shared library is then not recorded as needed at all.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    let var = |name: &str| std::env::var(name).unwrap_or_default();
    let static_crt = var("CARGO_CFG_TARGET_FEATURE").split(',').any(|f| f == "crt-static");
    if var("CARGO_CFG_TARGET_OS") != "linux" || var("CARGO_CFG_TARGET_ENV") != "gnu" || static_crt {
        return;
    }
    // The C compiler that links for rustc knows where its own libgcc_eh.a is.
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".to_string());
    let Ok(out) = Command::new(&cc).arg("-print-file-name=libgcc_eh.a").output() else { return };
    let archive = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    // An unexpected toolchain (the name printed back, no such file): the shared unwinder stays.
    let Some(dir) = archive.parent().filter(|_| archive.is_absolute() && archive.is_file()) else { return };
    println!("cargo:rustc-link-search=native={}", dir.display());
    println!("cargo:rustc-link-lib=static:+whole-archive,-bundle=gcc_eh");
}
