//! The fuzz targets' bodies: one function per target, each taking the fuzzer's bytes and
//! panicking only when wal-rs breaks a rule (a panic inside wal-rs is a finding too).
//!
//! The same file is compiled into `tests/fuzz_regressions.rs` (with `#[path]`), which replays
//! `fuzz/regressions/<target>/*` through these functions on stable Rust: a crash the fuzzer
//! found stays a test. Only `wal_rs`, `chacha20poly1305`, `serde_json`, `sha2`, `tokio` and
//! `xattr` are used, all of them dependencies of the root crate as well.

use std::collections::HashMap;
use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use chacha20poly1305::aead::stream::EncryptorBE32;
use chacha20poly1305::aead::{KeyInit, Payload};
use chacha20poly1305::XChaCha20Poly1305;
use sha2::{Digest, Sha256 as Sha256Hasher};
use wal_rs::backup::catalog::{self, BackupInfo};
use wal_rs::backup::extract::{self, ExtractPlan};
use wal_rs::backup::manifest::{FileEntry, Manifest};
use wal_rs::backup::sentinel::{BackupMetadata, Sentinel};
use wal_rs::codec::{self, trailer, Compression, Sha256, Trailer};
use wal_rs::crypto::{self, Header, Key, KeyRing, HEADER_LEN, MAGIC};
use wal_rs::identity::ClusterIdentity;
use wal_rs::layout;
use wal_rs::store::local::LocalStore;
use wal_rs::store::{ObjectKey, Store};
use wal_rs::wal::{Lsn, SegmentHeader, SegmentId, TimelineId, WalFileName};

/// A target's body.
pub type Target = fn(&[u8]);

/// Every target, by name, as `fuzz/regressions/<name>/` and `make fuzz` know them.
pub const TARGETS: &[(&str, Target)] = &[
    ("wal_name", wal_name),
    ("page_header", page_header),
    ("sentinel", sentinel),
    ("manifest", manifest),
    ("metadata", metadata),
    ("tar_partition", tar_partition),
    ("decode", decode),
    ("decrypt", decrypt),
];

/// WAL file names and LSNs: a name that parses prints back exactly (PostgreSQL's names are
/// upper-case hex only, so there is one spelling), and the segment arithmetic never panics.
pub fn wal_name(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(name) = WalFileName::parse(text) {
        assert_eq!(name.to_string(), text, "a WAL name does not print back as read");
        assert_eq!(WalFileName::parse(&name.to_string()), Ok(name));
        let _ = name.timeline();
        if let Some(seg) = name.wal_segment() {
            for size in [1u32 << 20, 16 << 20, 1 << 30] {
                let start = seg.start_lsn(size);
                let next = seg.next(size);
                let _ = next.start_lsn(size);
                let _ = SegmentId::containing(start, size);
            }
        }
    }
    if let Ok(lsn) = text.parse::<Lsn>() {
        assert_eq!(lsn.to_string().parse::<Lsn>().ok(), Some(lsn), "an LSN does not round-trip");
    }
}

/// The long page header against the name it is checked with: the first 12 bytes are the
/// name's timeline, log and seg (little-endian), the rest is the page.
pub fn page_header(data: &[u8]) {
    if data.len() < 12 {
        return;
    }
    let u32_at = |o: usize| u32::from_le_bytes(data[o..o + 4].try_into().unwrap());
    let timeline = TimelineId(u32_at(0));
    let segment = SegmentId { log: u32_at(4), seg: u32_at(8) };
    let page = &data[12..];
    if let Ok(h) = SegmentHeader::parse(page, timeline, segment) {
        assert!(h.segment_size.is_power_of_two() && (1 << 20..=1 << 30).contains(&h.segment_size));
        assert!(h.block_size.is_power_of_two() && (1 << 10..=1 << 16).contains(&h.block_size));
        assert!(h.page_timeline.0 != 0 && h.page_timeline <= timeline, "page timeline newer than the name's");
        assert_eq!(h.page_address, segment.start_lsn(h.segment_size), "page address is not the name's");
        // The segment the header's address lies in is the one the name says.
        assert_eq!(SegmentId::containing(h.page_address, h.segment_size), segment);
    }
}

/// Sentinels and `metadata.json` as `backup-list` and `backup-fetch` read them: no panic,
/// tablespaces that are safe to link (`pg_tblspc/<oid>` with a decimal oid, an absolute
/// location), a value that serialises back to itself.
pub fn sentinel(data: &[u8]) {
    if let Ok(s) = serde_json::from_slice::<Sentinel>(data) {
        for ts in s.tablespaces() {
            assert!(
                !ts.oid.is_empty() && ts.oid.bytes().all(|b| b.is_ascii_digit()),
                "tablespace oid {:?} would be linked outside pg_tblspc",
                ts.oid
            );
            assert!(ts.location.starts_with('/'), "tablespace location {:?} is not absolute", ts.location);
        }
        let _ = (s.finish_timestamp(), s.start_timestamp());
        let json = serde_json::to_vec(&s).expect("a sentinel serialises");
        let back: Sentinel = serde_json::from_slice(&json).expect("a written sentinel reads back");
        assert_eq!(back.start_lsn, s.start_lsn);
        assert_eq!(back.finish_lsn, s.finish_lsn);
        assert_eq!(back.tablespaces(), s.tablespaces());
        let other: Sentinel = serde_json::from_str(r#"{"LSN":1,"FinishTime":"2026-11-26T09:41:07Z"}"#).unwrap();
        let mut list = vec![
            BackupInfo { name: "base_b".into(), sentinel: s.clone() },
            BackupInfo { name: "base_a".into(), sentinel: other },
            BackupInfo { name: "base_c".into(), sentinel: s },
        ];
        catalog::sort(&mut list);
    }
    if let Ok(m) = serde_json::from_slice::<BackupMetadata>(data) {
        let json = serde_json::to_vec(&m).expect("metadata serialises");
        let _: BackupMetadata = serde_json::from_slice(&json).expect("written metadata reads back");
    }
}

/// `walrs_manifest.json` as `backup-fetch` uses it: every partition name makes a key in the
/// backup's `tar_partitions/` folder, every file a lookup entry.
pub fn manifest(data: &[u8]) {
    let Ok(m) = serde_json::from_slice::<Manifest>(data) else { return };
    for p in &m.partitions {
        let _ = layout::partition_compression(&p.name);
        let key = layout::partition_key("base_000000010000000000000002", &p.name);
        assert!(
            key.as_str().starts_with("basebackups_005/base_000000010000000000000002/tar_partitions/"),
            "partition {:?} is stored outside its backup: {key}",
            p.name
        );
        let expected: HashMap<String, FileEntry> = p.files.iter().map(|f| (f.path.clone(), f.clone())).collect();
        for f in &p.files {
            assert!(expected.contains_key(&f.path));
        }
    }
    let json = serde_json::to_vec(&m).expect("a manifest serialises");
    let back: Manifest = serde_json::from_slice(&json).expect("a written manifest reads back");
    assert_eq!(back, m);
}

/// What wal-rs reads of an object besides its body: the trailer at its end, the sha256 in its
/// metadata (extended attributes in a local store), and the cluster identity record.
pub fn metadata(data: &[u8]) {
    // The trailer, from the exact bytes and from the object's tail as `get_tail` returns it.
    if let Some(t) = Trailer::decode(data) {
        assert_eq!(&t.encode()[..], data, "a trailer does not encode back to its bytes");
    }
    if data.len() >= trailer::LEN {
        if let Some(t) = Trailer::decode(&data[data.len() - trailer::LEN..]) {
            assert_eq!(Trailer::decode(&t.encode()), Some(t));
        }
    }
    let text = String::from_utf8_lossy(data);
    if let Ok(sha) = text.parse::<Sha256>() {
        assert_eq!(sha.to_string(), text.to_ascii_lowercase(), "a sha256 does not print back");
    }
    if let Ok(id) = serde_json::from_slice::<ClusterIdentity>(data) {
        let _ = id.system_identifier.parse::<u64>();
        let json = serde_json::to_vec(&id).expect("an identity serialises");
        assert_eq!(serde_json::from_slice::<ClusterIdentity>(&json).ok(), Some(id));
    }
    local_metadata(data);
}

/// An extended attribute `user.walrs.<name>` = `<value>` (the input split at its first NUL)
/// on an object of a local store, read back through the store as wal-fetch reads it.
fn local_metadata(data: &[u8]) {
    let Some(split) = data.iter().position(|&b| b == 0) else { return };
    let (name, value) = (&data[..split], &data[split + 1..]);
    let sandbox = Sandbox::new("metadata");
    let root = sandbox.path().to_path_buf();
    fs::create_dir_all(root.join("wal_005")).unwrap();
    let object = root.join("wal_005/000000010000000000000001");
    fs::write(&object, b"x").unwrap();
    let mut attr = b"user.walrs.".to_vec();
    attr.extend_from_slice(name);
    use std::os::unix::ffi::OsStrExt;
    if xattr::set(&object, std::ffi::OsStr::from_bytes(&attr), value).is_err() {
        return; // names the kernel refuses (empty, too long) cannot be stored at all
    }
    let store = Store::Local(LocalStore::new(root));
    let key = ObjectKey::new("wal_005/000000010000000000000001").unwrap();
    let meta = runtime().block_on(store.head(&key)).expect("head of a local object").expect("the object exists");
    if let Ok(name) = std::str::from_utf8(name) {
        assert_eq!(meta.metadata.get(name).map(String::as_str), Some(&*String::from_utf8_lossy(value)));
    }
    let _: Option<Sha256> = meta.metadata.get("sha256").and_then(|s| s.parse().ok());
}

/// A tar partition (raw, or lz4/zstd compressed as stored) restored as `backup-fetch` does it,
/// into `dest/` with tablespace 16385 remapped to `ts/`: nothing may appear or change outside
/// those two folders, whatever the paths, links and types of the entries.
pub fn tar_partition(data: &[u8]) {
    let sandbox = Sandbox::new("tar");
    let top = sandbox.path();
    let (dest, ts, outside) = (top.join("dest"), top.join("ts"), top.join("outside"));
    for d in [&dest, &ts, &outside] {
        fs::create_dir(d).unwrap();
    }
    fs::set_permissions(&outside, fs::Permissions::from_mode(0o755)).unwrap();
    fs::write(outside.join("canary"), b"canary").unwrap();
    fs::set_permissions(outside.join("canary"), fs::Permissions::from_mode(0o644)).unwrap();

    let plan = ExtractPlan { dest, tablespaces: HashMap::from([("16385".to_string(), ts)]) };
    // Odd lengths restore with a manifest (an empty one: every file is then refused).
    let empty = HashMap::new();
    let expected = (data.len() % 2 == 1).then_some(&empty);
    if let Ok(mut stream) = codec::decompressor(Compression::None, &decrypt_object(), io::Cursor::new(data.to_vec())) {
        if extract::extract(Limit::new(&mut stream), &plan, expected).is_ok() {
            let _ = io::copy(&mut Limit::new(&mut stream), &mut io::sink());
        }
    }

    let mut top_entries: Vec<String> =
        fs::read_dir(top).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    top_entries.sort();
    assert_eq!(top_entries, ["dest", "outside", "ts"], "the restore wrote beside its destination");
    let outside_entries: Vec<_> = fs::read_dir(&outside).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(outside_entries, ["canary"], "the restore wrote outside its destination");
    assert_eq!(fs::read(outside.join("canary")).unwrap(), b"canary", "the restore overwrote a file outside");
    let mode = |p: &Path| fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode(&outside), 0o755, "the restore changed a folder outside its destination");
    assert_eq!(mode(&outside.join("canary")), 0o644, "the restore changed a file outside its destination");
}

/// Decompression and the integrity trailer: `decode` never returns success with bytes whose
/// sha256 or length differ from the trailer's, and a trailer at the end of a compressed object
/// that was read whole is always the one checked. The streaming reader of partitions must not
/// panic either.
pub fn decode(data: &[u8]) {
    let hint = [Compression::None, Compression::Lz4, Compression::Zstd][data.len() % 3];
    let mut sink = HashingSink::default();
    if let Ok(s) = codec::decode(data, hint, &decrypt_object(), &mut sink) {
        let (sha, len) = (Sha256(sink.hasher.clone().finalize().into()), sink.len);
        assert_eq!(s.sha256, sha, "decode reports a sha256 that is not that of its output");
        assert_eq!(s.bytes_out, len);
        assert!(s.bytes_in <= data.len() as u64);
        if let Some(t) = s.trailer {
            assert_eq!(t.sha256, sha, "decode succeeded with bytes that differ from the trailer's sha256");
            assert_eq!(t.original_len, len, "decode succeeded with a length that differs from the trailer's");
        }
        let magic = data.get(..4).unwrap_or_default();
        let compressed =
            hint != Compression::None || magic == 0x184D_2204u32.to_le_bytes() || magic == 0xFD2F_B528u32.to_le_bytes();
        if compressed && s.bytes_in == data.len() as u64 && data.len() >= trailer::LEN {
            let tail = Trailer::decode(&data[data.len() - trailer::LEN..]);
            if tail.is_some() {
                assert_eq!(s.trailer, tail, "a compressed object's trailer was not checked");
            }
        }
    }
    if let Ok(mut r) = codec::decompressor(hint, &decrypt_object(), io::Cursor::new(data.to_vec())) {
        let _ = io::copy(&mut Limit::new(&mut r), &mut io::sink());
    }
}

/// The key the `decrypt` target's seeds are sealed with.
pub const DECRYPT_KEY: [u8; 32] = [0x5a; 32];

/// The store key the targets read objects from: the binding of sealed objects (format
/// version 2).
pub const DECRYPT_BINDING: &str = "wal_005/000000010000000000000003.lz4";

fn decrypt_object() -> ObjectKey {
    ObjectKey::new(DECRYPT_BINDING).expect("a valid key")
}

/// The decryption reader (`crypto::open_bytes` and the streaming `unseal`), with a ring whose
/// second key is [`DECRYPT_KEY`]: an object opens only if it is exactly what sealing its
/// output with that key and its header's nonce gives (every chunk authentic, in order, the
/// last one sealed as the last), and reads the same in small reads. With plaintext allowed,
/// an object that is not sealed passes through unchanged.
pub fn decrypt(data: &[u8]) {
    let key = Key::from_bytes(DECRYPT_KEY);
    let ring = KeyRing::new(vec![Key::from_bytes([0xa5; 32]), key.clone()]).unwrap();
    if let Ok(out) = crypto::open_bytes(Some(&ring), DECRYPT_BINDING, data) {
        let header = Header::decode(data).expect("an object opened without a valid header");
        assert_eq!(header.key_id, key.id());
        let resealed = seal_with(&DECRYPT_KEY, &header, &out, data.len() - HEADER_LEN);
        assert!(resealed.as_deref() == Some(data), "an object opened that is not its output sealed whole and in order");
        let mut r = crypto::stream::unseal(data, Some(&ring), DECRYPT_BINDING).expect("opened once");
        let (mut small, mut buf) = (Vec::new(), [0u8; 7]);
        loop {
            let n = r.read(&mut buf[..1 + small.len() % 7]).expect("opened once");
            if n == 0 {
                break;
            }
            small.extend_from_slice(&buf[..n]);
        }
        assert_eq!(small, out, "small reads open differently");
    }
    let lenient = ring.allow_plaintext(true);
    if let Ok(out) = crypto::open_bytes(Some(&lenient), DECRYPT_BINDING, data) {
        if data.get(..MAGIC.len()) != Some(&MAGIC[..]) {
            assert_eq!(out, data, "an object that is not sealed was changed");
        }
    }
}

/// `plaintext` sealed with `key` under `header` (bound to [`DECRYPT_BINDING`] from version 2),
/// cut into the chunks a sealed body of
/// `body_len` bytes has (the last may be full): the one ciphertext that may open to it.
/// `None` when `plaintext` cannot fill those chunks.
pub fn seal_with(key: &[u8; 32], header: &Header, plaintext: &[u8], body_len: usize) -> Option<Vec<u8>> {
    let (chunk, tag) = (header.chunk_size(), 16);
    let pieces = body_len.div_ceil(chunk + tag).max(1);
    if plaintext.len() < (pieces - 1) * chunk {
        return None;
    }
    let aad = header.aad(DECRYPT_BINDING);
    let mut enc = EncryptorBE32::from_aead(XChaCha20Poly1305::new(key.into()), (&header.nonce_prefix).into());
    let mut out = header.encode().to_vec();
    for i in 0..pieces - 1 {
        let msg = &plaintext[i * chunk..(i + 1) * chunk];
        out.extend(enc.encrypt_next(Payload { msg, aad: &aad }).ok()?);
    }
    let msg = &plaintext[(pieces - 1) * chunk..];
    out.extend(enc.encrypt_last(Payload { msg, aad: &aad }).ok()?);
    Some(out)
}

/// Hashes and counts what is written, and refuses more than [`MAX_OUTPUT`] (a small input
/// can decompress to gigabytes: that is allowed, but not worth the fuzzer's time).
#[derive(Default)]
struct HashingSink {
    hasher: Sha256Hasher,
    len: u64,
}

const MAX_OUTPUT: u64 = 256 << 20;

impl Write for HashingSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.len + buf.len() as u64 > MAX_OUTPUT {
            return Err(io::Error::other("output limit"));
        }
        self.hasher.update(buf);
        self.len += buf.len() as u64;
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A reader that ends with an error after [`MAX_OUTPUT`] bytes.
struct Limit<R> {
    inner: R,
    left: u64,
}

impl<R> Limit<R> {
    fn new(inner: R) -> Self {
        Limit { inner, left: MAX_OUTPUT }
    }
}

impl<R: Read> Read for Limit<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.left == 0 {
            return Err(io::Error::other("output limit"));
        }
        let max = buf.len().min(self.left.min(usize::MAX as u64) as usize);
        let n = self.inner.read(&mut buf[..max])?;
        self.left -= n as u64;
        Ok(n)
    }
}

/// A fresh folder under the temporary directory, removed (without following links) on drop.
struct Sandbox(PathBuf);

impl Sandbox {
    fn new(what: &str) -> Sandbox {
        static N: AtomicU64 = AtomicU64::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("wal-rs-fuzz-{what}-{}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).unwrap();
        Sandbox(path)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap())
}
