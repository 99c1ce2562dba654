//! A full disk gives a clear error and loses nothing. Needs root (it mounts a
//! small tmpfs); without root it says so loudly and skips, in CI it must run.

use crate::util::synth::{bytes, gguf_model};
use shoal::store::{AddOptions, Store, StoreError, StoreOptions, build_manifest};
use std::path::{Path, PathBuf};
use std::process::Command;

struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(size: &str) -> Option<Tmpfs> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            assert!(
                std::env::var("CI").map_or(true, |v| v != "true"),
                "full-disk tests need root in CI"
            );
            eprintln!("SKIPPING full-disk test: needs root to mount a tmpfs");
            return None;
        }
        let dir = tempfile::tempdir().expect("tmp").keep();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&dir)
            .status()
            .expect("mount")
            .success();
        assert!(ok, "mount tmpfs failed");
        Some(Tmpfs(dir))
    }
    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
        let _ = std::fs::remove_dir(&self.0);
    }
}

fn is_no_space(e: &StoreError) -> bool {
    match e {
        StoreError::Io { source, .. } => source.raw_os_error() == Some(libc::ENOSPC),
        StoreError::Db(_) => e.to_string().to_lowercase().contains("space"),
        _ => false,
    }
}

#[test]
fn add_on_a_full_disk_fails_clearly_and_keeps_the_store() {
    let Some(fs) = Tmpfs::mount("24m") else {
        return;
    };
    let src = tempfile::tempdir().expect("src");
    let store = Store::open(&fs.path().join("s"), StoreOptions::default()).expect("open");
    let small = src.path().join("small.gguf");
    std::fs::write(&small, gguf_model(&[1_000_000], 1)).expect("w");
    let small_id = store
        .add_file(&small, &AddOptions::default())
        .expect("small fits");
    let big = src.path().join("big.gguf");
    std::fs::write(&big, gguf_model(&[16_000_000, 16_000_000], 2)).expect("w");
    let e = store
        .add_file(&big, &AddOptions::default())
        .map_err(StoreError::from)
        .expect_err("must not fit");
    assert!(is_no_space(&e), "unexpected error: {e}");
    assert!(
        e.to_string().contains("No space left"),
        "not a clear message: {e}"
    );
    // Nothing half-added; the earlier artifact intact; the temp file gone.
    let list = store.list().expect("list");
    assert_eq!(list.len(), 1);
    assert!(store.verify(&small_id).expect("verify").ok());
    assert_eq!(
        std::fs::read_dir(fs.path().join("s/tmp"))
            .expect("tmp")
            .count(),
        0
    );
    // Once there is room again, the same add works.
    store.remove(&small_id).expect("rm");
    let e2 = store.add_file(&big, &AddOptions::default());
    assert!(e2.is_err(), "32 MB cannot fit in 24 MB");
    let mid = src.path().join("mid.gguf");
    std::fs::write(&mid, gguf_model(&[8_000_000], 3)).expect("w");
    store
        .add_file(&mid, &AddOptions::default())
        .expect("fits after rm");
}

#[test]
fn chunk_writes_on_a_full_disk_fail_clearly_and_keep_verified_chunks() {
    let Some(fs) = Tmpfs::mount("12m") else {
        return;
    };
    let data = bytes(5, 20_000_000);
    let src = tempfile::tempdir().expect("src");
    let p = src.path().join("x.bin");
    std::fs::write(&p, &data).expect("w");
    let m = build_manifest(&p, &data, None).expect("manifest");
    let id = m.id();
    let dir = fs.path().join("s");
    let mut written = 0u32;
    {
        let store = Store::open(&dir, StoreOptions::default()).expect("open");
        store.begin(&m).expect("begin (the file is sparse)");
        let mut failed = None;
        for i in 0..m.chunk_count() {
            let c = m.chunks[i as usize];
            let r = store
                .put_chunk(
                    &id,
                    i,
                    &data[c.offset as usize..(c.offset + u64::from(c.len)) as usize],
                )
                .and_then(|()| store.flush(&id));
            match r {
                Ok(()) => written += 1,
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        let e = failed.expect("the disk must fill up");
        assert!(is_no_space(&e), "unexpected error: {e}");
        assert!(written > 0);
    }
    // Reopen: every chunk that was flushed before the failure is still present and verifies.
    let store = Store::open(&dir, StoreOptions::default()).expect("reopen");
    let have = store.have_map(&id).expect("have").expect("some");
    assert!(
        have.count() >= written,
        "lost verified chunks: {} < {written}",
        have.count()
    );
    let r = store.verify(&id).expect("verify");
    assert!(
        r.bad_chunks.is_empty(),
        "bad chunks after ENOSPC: {:?}",
        r.bad_chunks
    );
}

/// Fills the filesystem holding `dir` until a write fails with ENOSPC.
fn fill_up(dir: &Path) {
    use std::io::Write;
    let mut f = std::fs::File::create(dir.join("filler")).expect("filler");
    for size in [1 << 20, 4096, 1] {
        let block = vec![0x5a_u8; size];
        while f.write_all(&block).is_ok() {}
    }
    let _ = f.sync_all();
}

#[test]
fn keygen_on_a_full_disk_fails_clearly_and_leaves_no_temp_file() {
    let Some(fs) = Tmpfs::mount("8m") else {
        return;
    };
    let dir = fs.path().join("s");
    let store = Store::open(&dir, StoreOptions::default()).expect("open");
    let first = store.keygen(false).expect("keygen with room");
    let key_file = dir.join("keys/publisher.key");
    let before = std::fs::read(&key_file).expect("key");
    fill_up(fs.path());
    let e = store.keygen(true).expect_err("no room for a new key");
    assert!(is_no_space(&e), "unexpected error: {e}");
    let leftovers: Vec<_> = std::fs::read_dir(dir.join("keys"))
        .expect("keys")
        .flatten()
        .map(|e| e.file_name())
        .filter(|n| n.to_string_lossy().ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "temp files left: {leftovers:?}");
    // The old key is intact and still this node's key.
    assert_eq!(std::fs::read(&key_file).expect("key"), before);
    let k = store.publisher_key().expect("read").expect("some");
    assert_eq!(k.verifying_key().to_bytes(), first);
}
