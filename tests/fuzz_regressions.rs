//! Replays every input under `fuzz/regressions/<target>/` through the fuzz targets' own
//! bodies (`fuzz/src/lib.rs`), on stable Rust: a crash or a broken rule the fuzzer found
//! (see `make fuzz`) stays fixed. Inputs under `fuzz/regressions/<target>/known_failing/`
//! are findings not fixed yet: they run only with `--ignored`.
//!
//! Plus the path rules of the tar reader, stated directly: `..` is refused, an absolute
//! path lands inside the destination, and nothing is written through a symbolic link.

#[path = "../fuzz/src/lib.rs"]
#[allow(dead_code)]
mod harness;

use std::collections::HashMap;
use std::fs;
use std::panic;
use std::path::{Path, PathBuf};

use wal_rs::backup::extract::{self, ExtractPlan};

fn regressions() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/regressions")
}

/// Runs every file directly in `regressions/<target>/<sub>`; returns the failures.
fn replay(sub: &str) -> (usize, Vec<String>) {
    let mut count = 0;
    let mut failures = Vec::new();
    for (target, run) in harness::TARGETS {
        let dir = regressions().join(target).join(sub);
        let Ok(entries) = fs::read_dir(&dir) else { continue };
        let mut files: Vec<PathBuf> = entries.map(|e| e.unwrap().path()).filter(|p| p.is_file()).collect();
        files.sort();
        for file in files {
            let data = fs::read(&file).unwrap();
            count += 1;
            if let Err(e) = panic::catch_unwind(|| run(&data)) {
                let msg = e
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                failures.push(format!("{}: {msg}", file.strip_prefix(regressions()).unwrap().display()));
            }
        }
    }
    (count, failures)
}

#[test]
fn every_regression_input_replays_cleanly() {
    let (count, failures) = replay("");
    assert!(count > 0, "no regression inputs under {}", regressions().display());
    assert!(failures.is_empty(), "{} of {count} inputs fail:\n{}", failures.len(), failures.join("\n"));
}

/// Findings reported and not fixed yet: `cargo test --release --test fuzz_regressions --
/// --ignored` shows whether a fix landed (then move the input out of `known_failing/`).
#[test]
#[ignore]
fn known_failing_inputs_replay_cleanly() {
    let (count, failures) = replay("known_failing");
    assert!(failures.is_empty(), "{} of {count} inputs fail:\n{}", failures.len(), failures.join("\n"));
}

/// One tar entry: a file with `data`, or a symbolic link to `link`, or a directory.
enum Entry<'a> {
    File(&'a str, &'a [u8]),
    Link(&'a str, &'a str),
    Dir(&'a str),
}

fn tar_of(entries: &[Entry]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o600);
        let (path, data): (&str, &[u8]) = match e {
            Entry::File(p, d) => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_size(d.len() as u64);
                (p, d)
            }
            Entry::Link(p, to) => {
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_size(0);
                h.set_link_name(to).unwrap();
                (p, &[])
            }
            Entry::Dir(p) => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_size(0);
                (p, &[])
            }
        };
        // Raw names: the tar crate's own setters refuse `..`, which is the point here.
        let name = &mut h.as_old_mut().name;
        name.fill(0);
        name[..path.len()].copy_from_slice(path.as_bytes());
        h.set_cksum();
        b.append(&h, data).unwrap();
    }
    b.into_inner().unwrap()
}

fn scratch(what: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("wal-rs-fuzz-regressions-{what}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(dir.join("dest")).unwrap();
    fs::create_dir_all(dir.join("outside")).unwrap();
    dir
}

fn restore(top: &Path, tar: &[u8]) -> Result<extract::ExtractSummary, extract::ExtractError> {
    let plan = ExtractPlan { dest: top.join("dest"), tablespaces: HashMap::new() };
    extract::extract(tar, &plan, None)
}

#[test]
fn tar_paths_with_dotdot_are_refused() {
    let top = scratch("dotdot");
    for path in ["../outside/x", "base/../../outside/x", "./../outside/x", "/../outside/x"] {
        let r = restore(&top, &tar_of(&[Entry::File(path, b"x")]));
        assert!(r.is_err(), "{path} was accepted");
    }
    assert_eq!(fs::read_dir(top.join("outside")).unwrap().count(), 0);
    fs::remove_dir_all(&top).unwrap();
}

#[test]
fn absolute_tar_paths_land_inside_the_destination() {
    // WAL-G writes `/global/pg_control`: the leading '/' is relative to the data directory.
    let top = scratch("absolute");
    let out = top.join("outside/abs");
    let tar = tar_of(&[Entry::File(&format!("{}", out.display()), b"x")]);
    restore(&top, &tar).unwrap();
    assert!(!out.exists(), "an absolute path was written where it points");
    assert_eq!(fs::read(top.join("dest").join(out.strip_prefix("/").unwrap())).unwrap(), b"x");
    fs::remove_dir_all(&top).unwrap();
}

#[test]
fn nothing_is_written_through_a_symbolic_link() {
    let top = scratch("symlink");
    fs::write(top.join("outside/canary"), b"canary").unwrap();
    let outside = top.join("outside");
    let outside = outside.to_str().unwrap();
    let canary = format!("{outside}/canary");
    let cases: Vec<Vec<Entry>> = vec![
        // A file under a link to a folder outside.
        vec![Entry::Link("a", outside), Entry::File("a/pwned", b"x")],
        vec![Entry::Link("a", "../outside"), Entry::File("a/pwned", b"x")],
        // A file whose own name is a link to a file outside.
        vec![Entry::Link("c", &canary), Entry::File("c", b"pwned")],
        // A folder whose name is a link to a folder outside (would be chmod'ed and filled).
        vec![Entry::Link("d", outside), Entry::Dir("d"), Entry::File("d/pwned", b"x")],
        // A link deeper down, and a link inside pg_tblspc that is no tablespace of the plan.
        vec![Entry::Dir("base"), Entry::Link("base/l", "../../outside"), Entry::Link("base/l/m", "x")],
        vec![Entry::Link("pg_tblspc/16386", outside), Entry::File("pg_tblspc/16386/PG_15/f", b"x")],
    ];
    for (i, case) in cases.iter().enumerate() {
        let _ = fs::remove_dir_all(top.join("dest"));
        fs::create_dir(top.join("dest")).unwrap();
        let _ = restore(&top, &tar_of(case));
        let names: Vec<_> = fs::read_dir(top.join("outside")).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, ["canary"], "case {i} wrote outside the destination");
        assert_eq!(fs::read(top.join("outside/canary")).unwrap(), b"canary", "case {i} overwrote a file outside");
    }
    fs::remove_dir_all(&top).unwrap();
}

#[test]
fn ordinary_links_and_files_are_still_restored() {
    // A data directory may hold links (kept as links) and a file may replace an earlier link.
    let top = scratch("ordinary");
    let tar = tar_of(&[
        Entry::Dir("base"),
        Entry::File("base/1", b"one"),
        Entry::Link("pg_log", "/var/log/postgresql"),
        Entry::Link("tmp_link", "base/1"),
        Entry::File("tmp_link", b"replaced"),
    ]);
    let s = restore(&top, &tar).unwrap();
    assert_eq!(s.files, 2);
    let dest = top.join("dest");
    assert_eq!(fs::read_link(dest.join("pg_log")).unwrap(), Path::new("/var/log/postgresql"));
    assert_eq!(fs::read(dest.join("tmp_link")).unwrap(), b"replaced");
    assert!(!fs::symlink_metadata(dest.join("tmp_link")).unwrap().file_type().is_symlink());
    assert_eq!(fs::read(dest.join("base/1")).unwrap(), b"one");
    fs::remove_dir_all(&top).unwrap();
}

/// Writes the `decrypt` target's seeds (sealed objects, 1 KiB chunks so that a few hundred
/// bytes span several): `cargo test --release --test fuzz_regressions -- --ignored
/// write_decrypt_seeds`.
#[test]
#[ignore]
fn write_decrypt_seeds() {
    use wal_rs::crypto::{self, Header, Key};
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/decrypt");
    fs::create_dir_all(&dir).unwrap();
    let key = Key::from_bytes(harness::DECRYPT_KEY);
    let header = Header { version: crypto::format::VERSION, key_id: key.id(), chunk_log2: 10, nonce_prefix: [3; 19] };
    for len in [0usize, 100, 1024, 1500, 2048, 3000] {
        let plain: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
        let body = (len.div_ceil(1024).max(1)) * 16 + len;
        let sealed = harness::seal_with(&harness::DECRYPT_KEY, &header, &plain, body).unwrap();
        assert_eq!(
            crypto::open_bytes(
                Some(&crypto::KeyRing::new(vec![key.clone()]).unwrap()),
                harness::DECRYPT_BINDING,
                &sealed
            )
            .unwrap(),
            plain
        );
        fs::write(dir.join(format!("seed-chunk1k-{len}")), sealed).unwrap();
    }
    // As wal-rs seals (64 KiB chunks, random nonce).
    let sealer = crypto::seal_bytes(Some(&key), harness::DECRYPT_BINDING, &[9u8; 300]).unwrap();
    fs::write(dir.join("seed-sealer-300"), sealer).unwrap();
    fs::write(dir.join("seed-plain"), b"{\"version\":1}").unwrap();
}
