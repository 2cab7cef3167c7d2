//! `wal-rs-control`: the control plane. A placeholder until its issue is taken:
//! it reaches storage only through the `wal-rs` CLI, never through the core library.

fn main() {
    eprintln!("wal-rs-control: not built yet; see the control-plane issue");
    std::process::exit(2);
}
