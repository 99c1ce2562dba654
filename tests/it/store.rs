//! Content-store behaviour on real files and a real fjall database.

use crate::util::demo_model_path;
use crate::util::synth::{bytes, gguf_model};
use shoal::gguf::Gguf;
use shoal::store::release::{RELEASE_FORMAT, Release, SignedRelease};
use shoal::store::{
    AddError, AddOptions, ArtifactKind, ArtifactStatus, OpenError, ReadError, ReleaseOutcome,
    Store, StoreError, StoreOptions, build_manifest,
};
use std::fs;
use std::path::Path;
use std::time::Duration;

fn open(dir: &Path) -> Store {
    Store::open(dir, StoreOptions::default()).expect("open store")
}

fn write_file(dir: &Path, name: &str, data: &[u8]) -> std::path::PathBuf {
    let p = dir.join(name);
    fs::write(&p, data).expect("write");
    p
}

fn object_bytes(store: &Store, id: &shoal::store::ArtifactId) -> Vec<u8> {
    fs::read(store.artifact_path(id).expect("path")).expect("read object")
}

#[test]
fn round_trip_generated_gguf_and_plain_file() {
    let t = tempfile::tempdir().expect("tmp");
    let store = open(&t.path().join("s"));
    let model = gguf_model(&[100, 3_000_000, 5000, 1_500_000], 1);
    let p = write_file(t.path(), "m.gguf", &model);
    let id = store.add_file(&p, &AddOptions::default()).expect("add");
    assert_eq!(object_bytes(&store, &id), model);
    let m = store.manifest(&id).expect("manifest").expect("some");
    assert_eq!(m.kind, ArtifactKind::Gguf);
    assert_eq!(m.tensors.len(), 4);
    assert_eq!(&m.blake3, blake3::hash(&model).as_bytes());
    // Adding again gives the same id and changes nothing.
    assert_eq!(
        store.add_file(&p, &AddOptions::default()).expect("re-add"),
        id
    );
    assert_eq!(store.list().expect("list").len(), 1);

    let plain = bytes(7, 2_345_678);
    let p = write_file(t.path(), "blob.bin", &plain);
    let id2 = store
        .add_file(&p, &AddOptions::default())
        .expect("add plain");
    assert_eq!(object_bytes(&store, &id2), plain);
    assert_eq!(
        store.manifest(&id2).expect("m").expect("m").kind,
        ArtifactKind::Other
    );
    // Empty file.
    let p = write_file(t.path(), "empty", &[]);
    let id3 = store
        .add_file(&p, &AddOptions::default())
        .expect("add empty");
    assert!(object_bytes(&store, &id3).is_empty());
    assert!(store.verify(&id3).expect("verify").ok());
}

#[test]
fn round_trip_demo_model() {
    let Some(model) = demo_model_path() else {
        return;
    };
    let t = tempfile::tempdir().expect("tmp");
    let store = open(&t.path().join("s"));
    let id = store.add_file(&model, &AddOptions::default()).expect("add");
    let m = store.manifest(&id).expect("m").expect("m");
    assert_eq!(
        m.blake3_hex(),
        "5f4fa13bfc6dd4a91fd00e22974a9c4e9ed628fd7d7f307398ddf30260d6b2c3"
    );
    let a = fs::read(&model).expect("read");
    assert_eq!(object_bytes(&store, &id), a);
    // Tensor boundaries fall on chunk boundaries (tensors above the grouping threshold).
    let g = Gguf::parse(&a).expect("parse");
    let starts: std::collections::HashSet<u64> = m.chunks.iter().map(|c| c.offset).collect();
    for t in &g.tensors {
        if t.size >= shoal::store::chunker::SMALL_TENSOR {
            assert!(
                starts.contains(&g.tensor_range(t).start),
                "{} not at a chunk start",
                t.name
            );
        }
    }
    assert!(m.chunks.iter().all(|c| c.len <= 1 << 20));
}

#[test]
fn malformed_inputs_leave_the_store_unchanged() {
    let t = tempfile::tempdir().expect("tmp");
    let store = open(&t.path().join("s"));
    let model = gguf_model(&[4096, 200_000], 3);
    // Truncated in the tensor data, in the header, and a .gguf that is not GGUF.
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("trunc-data.gguf", model[..model.len() - 10].to_vec()),
        ("trunc-header.gguf", model[..40].to_vec()),
        ("fake.gguf", b"hello, not a model".to_vec()),
    ];
    for (name, data) in cases {
        let p = write_file(t.path(), name, &data);
        let e = store.add_file(&p, &AddOptions::default()).expect_err(name);
        let msg = e.to_string();
        assert!(
            matches!(e, AddError::Gguf { .. } | AddError::NotGguf(_)),
            "{name}: unexpected error {msg}"
        );
        assert!(msg.contains(name), "error should name the file: {msg}");
    }
    assert!(store.list().expect("list").is_empty());
    assert_eq!(
        fs::read_dir(t.path().join("s/tmp")).expect("tmp").count(),
        0
    );
    assert_eq!(
        fs::read_dir(t.path().join("s/objects"))
            .expect("objects")
            .count(),
        0
    );
    let missing = store.add_file(&t.path().join("nope.gguf"), &AddOptions::default());
    assert!(matches!(missing, Err(AddError::Io { .. })));
}

#[test]
fn corruption_is_detected() {
    let t = tempfile::tempdir().expect("tmp");
    let store = open(&t.path().join("s"));
    let model = gguf_model(&[2_000_000, 2_000_000], 5);
    let p = write_file(t.path(), "m.gguf", &model);
    let id = store.add_file(&p, &AddOptions::default()).expect("add");
    assert!(store.verify(&id).expect("verify").ok());
    let m = store.manifest(&id).expect("m").expect("m");
    let obj = store.artifact_path(&id).expect("path");
    let mut perm = fs::metadata(&obj).expect("meta").permissions();
    #[allow(clippy::permissions_set_readonly_false)]
    perm.set_readonly(false);
    fs::set_permissions(&obj, perm).expect("chmod");
    let mut data = fs::read(&obj).expect("read");
    let victim = m.chunks[3];
    data[(victim.offset + 17) as usize] ^= 0x40;
    fs::write(&obj, &data).expect("corrupt");
    let r = store.verify(&id).expect("verify");
    assert_eq!(r.bad_chunks, vec![(3, victim.offset)]);
    assert_eq!(r.file_ok, Some(false));
    assert!(matches!(
        store.read_chunk(&id, 3),
        Err(ReadError::ChunkMismatch { index: 3, .. })
    ));
    assert!(store.read_chunk(&id, 2).is_ok());
}

#[test]
fn partial_fill_resumes_after_reopen_and_refuses_bad_chunks() {
    let t = tempfile::tempdir().expect("tmp");
    let model = gguf_model(&[3_000_000, 10_000, 2_000_000], 9);
    let p = write_file(t.path(), "m.gguf", &model);
    let manifest = build_manifest(&p, &model, None).expect("manifest");
    let id = manifest.id();
    let dir = t.path().join("s");
    let n = manifest.chunk_count();
    {
        let store = open(&dir);
        let have = store.begin(&manifest).expect("begin");
        assert_eq!(have.count(), 0);
        for i in (0..n).step_by(2) {
            let c = manifest.chunks[i as usize];
            store
                .put_chunk(
                    &id,
                    i,
                    &model[c.offset as usize..(c.offset + u64::from(c.len)) as usize],
                )
                .expect("put");
        }
        // A lying peer's chunk: refused, nothing marked.
        let c = manifest.chunks[1];
        let mut bad = model[c.offset as usize..(c.offset + u64::from(c.len)) as usize].to_vec();
        bad[0] ^= 1;
        assert!(matches!(
            store.put_chunk(&id, 1, &bad),
            Err(StoreError::ChunkMismatch { index: 1, .. })
        ));
        store.flush(&id).expect("flush");
        assert!(matches!(
            store.finish(&id),
            Err(StoreError::Incomplete { .. })
        ));
        assert!(
            store.artifact_path(&id).is_err(),
            "a partial is not visible"
        );
    }
    let store = open(&dir);
    let have = store.begin(&manifest).expect("resume");
    assert_eq!(
        have.count(),
        n.div_ceil(2),
        "every flushed chunk survives a reopen"
    );
    assert!(!have.get(1));
    for i in have.missing().collect::<Vec<_>>() {
        let c = manifest.chunks[i as usize];
        store
            .put_chunk(
                &id,
                i,
                &model[c.offset as usize..(c.offset + u64::from(c.len)) as usize],
            )
            .expect("put");
    }
    store.finish(&id).expect("finish");
    assert_eq!(
        store.status(&id).expect("status"),
        Some(ArtifactStatus::Active)
    );
    assert_eq!(object_bytes(&store, &id), model);
}

#[test]
fn local_dedupe_shares_unchanged_tensors() {
    let t = tempfile::tempdir().expect("tmp");
    let store = open(&t.path().join("s"));
    let sizes = [3_000_000, 700_000, 1_200_000, 2_500_000, 900_000];
    let v1 = gguf_model(&sizes, 11);
    let p1 = write_file(t.path(), "v1.gguf", &v1);
    store.add_file(&p1, &AddOptions::default()).expect("add v1");
    // v2: the same layout, tensor 2's bytes changed.
    let mut v2 = v1.clone();
    let g = Gguf::parse(&v2).expect("parse");
    let r = g.tensor_range(&g.tensors[2]);
    for b in &mut v2[r.start as usize..r.start as usize + 1000] {
        *b = b.wrapping_add(1);
    }
    let p2 = write_file(t.path(), "v2.gguf", &v2);
    let m2 = build_manifest(&p2, &v2, None).expect("manifest v2");
    let have = store.begin(&m2).expect("begin v2");
    let shared: u64 = have
        .present()
        .map(|i| u64::from(m2.chunks[i as usize].len))
        .sum();
    let unchanged: u64 = g
        .tensors
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != 2)
        .map(|(_, t)| t.size)
        .sum();
    assert!(
        shared >= unchanged,
        "shared {shared} < unchanged tensor bytes {unchanged}"
    );
    // Only the changed tensor's chunks remain to fetch.
    for i in have.missing().collect::<Vec<_>>() {
        let c = m2.chunks[i as usize];
        assert!(
            c.offset < r.end && c.offset + u64::from(c.len) > r.start,
            "chunk {i} needlessly missing"
        );
        store
            .put_chunk(
                &m2.id(),
                i,
                &v2[c.offset as usize..(c.offset + u64::from(c.len)) as usize],
            )
            .expect("put");
    }
    store.finish(&m2.id()).expect("finish");
    assert_eq!(object_bytes(&store, &m2.id()), v2);
}

fn release(
    store_key: &ed25519_dalek::SigningKey,
    name: &str,
    id: shoal::store::ArtifactId,
    seq: u64,
) -> SignedRelease {
    SignedRelease::sign(
        &Release {
            format: RELEASE_FORMAT,
            name: name.into(),
            id,
            seq,
            origin: None,
            created: 0,
        },
        store_key,
    )
    .expect("sign")
}

#[test]
fn releases_need_a_trusted_valid_signature_and_higher_seq_wins() {
    let t = tempfile::tempdir().expect("tmp");
    let store = open(&t.path().join("s"));
    let a = store
        .add_file(
            &write_file(t.path(), "a.bin", &bytes(1, 1000)),
            &AddOptions::default(),
        )
        .expect("a");
    let b = store
        .add_file(
            &write_file(t.path(), "b.bin", &bytes(2, 1000)),
            &AddOptions::default(),
        )
        .expect("b");
    let publisher = ed25519_dalek::SigningKey::from_bytes(&[42; 32]);
    let r1 = release(&publisher, "m:v", a, 1);
    // Untrusted publisher.
    assert!(matches!(
        store.apply_release(&r1),
        Err(StoreError::Untrusted { .. })
    ));
    assert!(matches!(store.resolve("m:v"), Err(StoreError::Unknown(_))));
    store
        .trust_add(publisher.verifying_key().to_bytes(), "test")
        .expect("trust");
    assert_eq!(
        store.apply_release(&r1).expect("apply"),
        ReleaseOutcome::Applied
    );
    assert_eq!(store.resolve("m:v").expect("resolve"), a);
    assert_eq!(
        store.apply_release(&r1).expect("again"),
        ReleaseOutcome::AlreadyKnown
    );
    // Forged: body swapped to point at b with a higher seq, signature kept.
    let mut forged = r1.clone();
    forged.body = release(&publisher, "m:v", b, 9).body;
    forged.signature = serde_bytes::ByteArray::new([0; 64]);
    assert!(
        store.apply_release(&forged).is_err(),
        "unsigned release accepted"
    );
    let mut forged = r1.clone();
    forged.body = release(&publisher, "m:v", b, 9).body;
    assert!(matches!(
        store.apply_release(&forged),
        Err(StoreError::Release(
            shoal::store::ReleaseError::BadSignature
        ))
    ));
    assert_eq!(
        store.resolve("m:v").expect("resolve"),
        a,
        "a refused release changed nothing"
    );
    // Higher seq wins; lower seq is stale.
    assert_eq!(
        store
            .apply_release(&release(&publisher, "m:v", b, 2))
            .expect("v2"),
        ReleaseOutcome::Applied
    );
    assert_eq!(store.resolve("m:v").expect("resolve"), b);
    assert_eq!(
        store
            .apply_release(&release(&publisher, "m:v", a, 1))
            .expect("old"),
        ReleaseOutcome::Stale
    );
    assert_eq!(store.resolve("m:v").expect("resolve"), b);
    // Untrusting the key makes the name unresolvable.
    store
        .trust_remove(&publisher.verifying_key().to_bytes())
        .expect("untrust");
    assert!(matches!(
        store.resolve("m:v"),
        Err(StoreError::Untrusted { .. })
    ));
    // Our own key, via publish.
    assert!(matches!(
        store.publish(&a, "mine", None),
        Err(StoreError::NoKey)
    ));
    store.keygen(false).expect("keygen");
    let s = store.publish(&a, "mine", None).expect("publish");
    assert_eq!(s.verify().expect("verify").seq, 1);
    assert_eq!(
        store
            .publish(&b, "mine", None)
            .expect("publish 2")
            .verify()
            .expect("v")
            .seq,
        2
    );
    assert_eq!(store.resolve("mine").expect("resolve"), b);
}

#[test]
fn eviction_respects_quota_pins_and_leases() {
    let t = tempfile::tempdir().expect("tmp");
    let opts = StoreOptions {
        quota_bytes: 3_500_000,
        partial_ttl: Duration::from_secs(3600),
        ..StoreOptions::default()
    };
    let store = Store::open(&t.path().join("s"), opts).expect("open");
    let add = |name: &str, seed: u64, pin: bool| {
        let p = write_file(t.path(), name, &bytes(seed, 1_000_000));
        store
            .add_file(
                &p,
                &AddOptions {
                    pin,
                    ..Default::default()
                },
            )
            .expect(name)
    };
    let a = add("a", 1, false);
    std::thread::sleep(Duration::from_millis(1100)); // last-use times have 1 s resolution
    let b = add("b", 2, true);
    let c = add("c", 3, false);
    let _lease_c = store.lease(&c).expect("lease");
    std::thread::sleep(Duration::from_millis(1100));
    // d needs room: a (LRU, unpinned, unleased) goes; b is pinned, c is leased.
    let d = add("d", 4, false);
    let ids: Vec<_> = store.list().expect("list").iter().map(|x| x.id).collect();
    assert!(!ids.contains(&a), "LRU artifact kept");
    assert!(ids.contains(&b) && ids.contains(&c) && ids.contains(&d));
    assert!(store.used_bytes().expect("used") <= 3_500_000);
    // Nothing else can go: b pinned, c leased, d... unpinned: e evicts d.
    let e = add("e", 5, false);
    let ids: Vec<_> = store.list().expect("list").iter().map(|x| x.id).collect();
    assert!(!ids.contains(&d) && ids.contains(&e));
    // Pin e too: now a new artifact cannot fit at all.
    store.set_pinned(&e, true).expect("pin");
    let p = write_file(t.path(), "f", &bytes(6, 1_000_000));
    assert!(matches!(
        store.add_file(&p, &AddOptions::default()),
        Err(AddError::QuotaExceeded { .. })
    ));
    assert!(store.used_bytes().expect("used") <= 3_500_000);
}

#[test]
fn stale_partials_are_collected_and_orphans_cleaned_on_open() {
    let t = tempfile::tempdir().expect("tmp");
    let dir = t.path().join("s");
    let data = bytes(8, 500_000);
    let p = write_file(t.path(), "x.bin", &data);
    let m = build_manifest(&p, &data, None).expect("manifest");
    {
        let store = Store::open(
            &dir,
            StoreOptions {
                partial_ttl: Duration::ZERO,
                ..Default::default()
            },
        )
        .expect("open");
        store.begin(&m).expect("begin");
        let r = store.gc().expect("gc");
        assert_eq!(r.partials_removed, vec![m.id()]);
        assert!(store.list().expect("list").is_empty());
    }
    // Leftovers of a crashed add and an unknown object file: the add's temp
    // file goes, the object that is not what its name says is kept aside.
    fs::write(dir.join("tmp/add-123-456"), b"junk").expect("tmp junk");
    fs::write(dir.join("objects").join("ab".repeat(32)), b"junk").expect("orphan");
    let store = open(&dir);
    assert_eq!(fs::read_dir(dir.join("tmp")).expect("tmp").count(), 0);
    assert_eq!(
        fs::read_dir(dir.join("objects")).expect("objects").count(),
        0
    );
    assert_eq!(store.lost_and_found().expect("lf").len(), 1);
}

#[test]
fn a_second_process_gets_a_clear_lock_error() {
    let t = tempfile::tempdir().expect("tmp");
    let dir = t.path().join("s");
    let _a = open(&dir);
    match Store::open(&dir, StoreOptions::default()) {
        Err(OpenError::Locked(_)) => {}
        Err(e) => panic!("unexpected error: {e}"),
        Ok(_) => panic!("opened a locked store twice"),
    }
}

/// Flips one byte of chunk `index` in the artifact's file.
fn corrupt_chunk(store: &Store, id: &shoal::store::ArtifactId, index: usize) {
    let m = store.manifest(id).expect("m").expect("m");
    // Not `artifact_path`: that refuses an artifact already marked corrupt.
    let obj = store.dir().join("objects").join(id.to_hex());
    let mut perm = fs::metadata(&obj).expect("meta").permissions();
    #[allow(clippy::permissions_set_readonly_false)]
    perm.set_readonly(false);
    fs::set_permissions(&obj, perm).expect("chmod");
    let mut data = fs::read(&obj).expect("read");
    data[(m.chunks[index].offset + 5) as usize] ^= 0x01;
    fs::write(&obj, &data).expect("corrupt");
}

#[test]
fn a_served_chunk_is_hashed_again_unless_hashed_within_the_window() {
    let t = tempfile::tempdir().expect("tmp");
    let model = gguf_model(&[2_000_000, 2_000_000], 7);
    let p = write_file(t.path(), "m.gguf", &model);
    // Window zero: every read hashes, so a chunk corrupted after a good read
    // is refused at the next one.
    let every = Store::open(
        &t.path().join("a"),
        StoreOptions {
            reverify_after: Duration::ZERO,
            ..StoreOptions::default()
        },
    )
    .expect("open");
    let id = every.add_file(&p, &AddOptions::default()).expect("add");
    assert!(every.read_chunk(&id, 2).is_ok());
    corrupt_chunk(&every, &id, 2);
    assert!(matches!(
        every.read_chunk(&id, 2),
        Err(ReadError::ChunkMismatch { index: 2, .. })
    ));
    // The default window: a chunk hashed a moment ago is not hashed again,
    // until `verify` finds it bad; from then on every read refuses it.
    let windowed = open(&t.path().join("b"));
    let id = windowed.add_file(&p, &AddOptions::default()).expect("add");
    let good = windowed.read_chunk(&id, 2).expect("first read hashes");
    corrupt_chunk(&windowed, &id, 2);
    let served = windowed.read_chunk(&id, 2).expect("within the window");
    assert_ne!(served, good, "read again from disk, not from a cache");
    let r = windowed.verify(&id).expect("verify");
    assert_eq!(r.bad_chunks.len(), 1);
    assert!(matches!(
        windowed.read_chunk(&id, 2),
        Err(ReadError::ChunkMismatch { index: 2, .. })
    ));
    // A chunk never read is hashed at its first read.
    corrupt_chunk(&windowed, &id, 3);
    assert!(matches!(
        windowed.read_chunk(&id, 3),
        Err(ReadError::ChunkMismatch { index: 3, .. })
    ));
}

#[test]
fn chunk_reads_reuse_a_buffer_and_removal_forgets_the_cached_manifest() {
    let t = tempfile::tempdir().expect("tmp");
    let store = open(&t.path().join("s"));
    // Chunks of different sizes: the reused buffer grows, and each chunk is buf[..n].
    let model = gguf_model(&[2_000_000, 100, 1_500_000], 9);
    let p = write_file(t.path(), "m.gguf", &model);
    let id = store.add_file(&p, &AddOptions::default()).expect("add");
    let m = store.manifest_shared(&id).expect("m").expect("m");
    assert_eq!(*m, store.manifest(&id).expect("m").expect("m"));
    let mut buf = Vec::new();
    for (i, c) in m.chunks.iter().enumerate().rev() {
        let n = store
            .read_chunk_into(&id, i as u32, &mut buf)
            .expect("read chunk");
        assert_eq!(n, c.len as usize, "chunk {i}");
        let range = c.offset as usize..(c.offset + u64::from(c.len)) as usize;
        assert_eq!(&buf[..n], &model[range], "chunk {i}");
    }
    store.remove(&id).expect("remove");
    assert!(store.manifest_shared(&id).expect("lookup").is_none());
    assert!(matches!(
        store.read_chunk_into(&id, 0, &mut buf),
        Err(ReadError::Unknown(_))
    ));
}

#[test]
fn verify_marks_corrupt_and_repair_refetches_only_the_bad_chunks() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let t = tempfile::tempdir().expect("tmp");
    let dir = t.path().join("s");
    let model = gguf_model(&[2_000_000, 2_000_000], 11);
    let p = write_file(t.path(), "m.gguf", &model);
    let told = Arc::new(AtomicUsize::new(0));
    let hook_told = told.clone();
    let opts = StoreOptions {
        on_corrupt: Some(Arc::new(move |_id: &shoal::store::ArtifactId| {
            hook_told.fetch_add(1, Ordering::SeqCst);
        })),
        ..StoreOptions::default()
    };
    assert!(format!("{opts:?}").contains("on_corrupt"));
    let id = {
        let store = Store::open(&dir, opts.clone()).expect("open");
        let id = store.add_file(&p, &AddOptions::default()).expect("add");
        assert!(store.corrupt_artifacts().expect("marks").is_empty());
        corrupt_chunk(&store, &id, 3);
        assert!(!store.verify(&id).expect("verify").ok());
        assert_eq!(told.load(Ordering::SeqCst), 1, "the hook heard of the mark");
        // The same finding again is no new mark.
        store.verify(&id).expect("verify again");
        assert_eq!(told.load(Ordering::SeqCst), 1);
        id
    };
    // The mark is durable.
    let store = Store::open(&dir, opts).expect("reopen");
    assert_eq!(
        store.corrupt_artifacts().expect("marks"),
        vec![(id, vec![3])]
    );
    for r in [
        store.artifact_path(&id).map(|_| ()),
        store.lease(&id).map(|_| ()),
    ] {
        match r {
            Err(ReadError::Corrupt {
                id: got,
                bad_chunks,
            }) => {
                assert_eq!((got, bad_chunks), (id, vec![3]));
            }
            other => panic!("a corrupt artifact was handed out: {other:?}"),
        }
    }
    let info = store.list().expect("list");
    assert_eq!(info[0].corrupt, Some(vec![3]));
    assert!(!store.have_map(&id).expect("have").expect("have").get(3));
    // Repair: the file moves to partial/, every chunk but the bad one present.
    let have = store.repair(&id).expect("repair");
    let m = store.manifest(&id).expect("m").expect("m");
    assert_eq!(have.missing().collect::<Vec<_>>(), vec![3]);
    assert_eq!(
        store.status(&id).expect("status"),
        Some(ArtifactStatus::Partial)
    );
    assert!(!dir.join("objects").join(id.to_hex()).exists());
    assert!(dir.join("partial").join(id.to_hex()).exists());
    assert!(store.corrupt_artifacts().expect("marks").is_empty());
    // A download resumes it through `begin` and needs only chunk 3.
    drop(store);
    let store = open(&dir);
    let have = store.begin(&m).expect("begin resumes");
    assert_eq!(have.missing().collect::<Vec<_>>(), vec![3]);
    let c = m.chunks[3];
    let good = &model[c.offset as usize..(c.offset + u64::from(c.len)) as usize];
    store.put_chunk(&id, 3, good).expect("put the good chunk");
    store.finish(&id).expect("activate");
    assert_eq!(
        store.status(&id).expect("status"),
        Some(ArtifactStatus::Active)
    );
    assert!(store.corrupt_artifacts().expect("marks").is_empty());
    assert!(store.verify(&id).expect("verify").ok());
    assert_eq!(object_bytes(&store, &id), model);
    assert!(store.lease(&id).is_ok());
}

#[test]
fn a_corrupt_chunk_read_marks_the_artifact() {
    let t = tempfile::tempdir().expect("tmp");
    let store = Store::open(
        &t.path().join("s"),
        StoreOptions {
            reverify_after: Duration::ZERO,
            ..StoreOptions::default()
        },
    )
    .expect("open");
    let model = gguf_model(&[2_000_000, 2_000_000], 12);
    let p = write_file(t.path(), "m.gguf", &model);
    let id = store.add_file(&p, &AddOptions::default()).expect("add");
    corrupt_chunk(&store, &id, 2);
    assert!(store.read_chunk(&id, 1).is_ok());
    assert!(matches!(
        store.read_chunk(&id, 2),
        Err(ReadError::ChunkMismatch { index: 2, .. })
    ));
    assert_eq!(
        store.corrupt_artifacts().expect("marks"),
        vec![(id, vec![2])]
    );
    assert!(matches!(
        store.artifact_path(&id),
        Err(ReadError::Corrupt { .. })
    ));
    // Marks add up; a chunk index outside the manifest is refused.
    store.mark_corrupt(&id, &[0]).expect("mark");
    assert_eq!(
        store.corrupt_artifacts().expect("marks"),
        vec![(id, vec![0, 2])]
    );
    assert!(matches!(
        store.mark_corrupt(&id, &[10_000]),
        Err(StoreError::NoChunk { .. })
    ));
}

#[test]
fn a_wrong_length_is_marked_and_repaired_in_place() {
    let t = tempfile::tempdir().expect("tmp");
    let store = open(&t.path().join("s"));
    let model = gguf_model(&[500_000], 13);
    let p = write_file(t.path(), "m.gguf", &model);
    let id = store.add_file(&p, &AddOptions::default()).expect("add");
    let obj = store.dir().join("objects").join(id.to_hex());
    fs::set_permissions(&obj, std::os::unix::fs::PermissionsExt::from_mode(0o644)).expect("chmod");
    let mut f = fs::OpenOptions::new()
        .append(true)
        .open(&obj)
        .expect("open");
    std::io::Write::write_all(&mut f, b"trailing junk").expect("append");
    drop(f);
    assert!(!store.verify(&id).expect("verify").ok());
    assert_eq!(
        store.corrupt_artifacts().expect("marks"),
        vec![(id, vec![])]
    );
    let have = store.repair(&id).expect("repair");
    assert!(have.is_complete());
    assert_eq!(
        store.status(&id).expect("status"),
        Some(ArtifactStatus::Active)
    );
    assert!(store.corrupt_artifacts().expect("marks").is_empty());
    assert_eq!(object_bytes(&store, &id), model);
}

// ---- damaged metadata never loses model bytes ----

/// Every regular file under `dir` (recursively) with its bytes.
fn files_under(dir: &Path) -> Vec<(std::path::PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let Ok(rd) = fs::read_dir(dir) else {
        return out;
    };
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(files_under(&p));
        } else if let Ok(b) = fs::read(&p) {
            out.push((p, b));
        }
    }
    out
}

/// Asserts every artifact file of `before` is still in the store
/// (`objects/`, `partial/`) or in `lost+found/`, byte for byte.
fn nothing_lost(dir: &Path, before: &[(std::path::PathBuf, Vec<u8>)], when: &str) {
    let now: Vec<_> = ["objects", "partial", "lost+found"]
        .iter()
        .flat_map(|s| files_under(&dir.join(s)))
        .collect();
    for (p, b) in before {
        assert!(
            now.iter().any(|(_, nb)| nb == b),
            "{when}: the bytes of {} are gone (files now: {:?})",
            p.display(),
            now.iter().map(|(p, _)| p).collect::<Vec<_>>()
        );
    }
}

/// Length of the journal's written part (it is preallocated with zeros).
fn journal_used(j: &[u8]) -> usize {
    j.iter().rposition(|b| *b != 0).map_or(0, |i| i + 1)
}

type Mutation = (&'static str, fn(&Path));

fn journal(meta: &Path) -> std::path::PathBuf {
    meta.join("0.jnl")
}

fn edit_journal(meta: &Path, f: impl FnOnce(&mut Vec<u8>)) {
    let p = journal(meta);
    let mut j = fs::read(&p).expect("read journal");
    f(&mut j);
    fs::write(&p, &j).expect("write journal");
}

const MUTATIONS: &[Mutation] = &[
    ("flip the first byte of the journal", |m| {
        edit_journal(m, |j| j[0] ^= 0xff)
    }),
    ("flip a middle byte of the journal", |m| {
        edit_journal(m, |j| {
            let u = journal_used(j);
            j[u / 2] ^= 0x01;
        })
    }),
    ("flip the last written byte of the journal", |m| {
        edit_journal(m, |j| {
            let u = journal_used(j);
            j[u - 1] ^= 0x80;
        })
    }),
    ("truncate the journal to 0", |m| {
        edit_journal(m, |j| j.clear())
    }),
    ("truncate the journal mid-record", |m| {
        edit_journal(m, |j| {
            let u = journal_used(j);
            j.truncate(u / 2 + 3);
        })
    }),
    ("append garbage to the journal", |m| {
        edit_journal(m, |j| {
            let u = journal_used(j);
            j.truncate(u);
            j.extend((0..5000u32).map(|i| (i * 7 + 13) as u8));
        })
    }),
    ("zero a 4 KiB page of the journal", |m| {
        edit_journal(m, |j| {
            let u = journal_used(j);
            let start = (u / 2) & !4095;
            j[start..(start + 4096).min(u)].fill(0);
        })
    }),
    ("duplicate the journal's records", |m| {
        edit_journal(m, |j| {
            let u = journal_used(j);
            let copy = j[..u].to_vec();
            j.truncate(u);
            j.extend(copy);
        })
    }),
    ("delete the journal", |m| {
        fs::remove_file(journal(m)).expect("rm journal")
    }),
    ("delete meta/", |m| fs::remove_dir_all(m).expect("rm meta")),
    ("replace meta/ with a file", |m| {
        fs::remove_dir_all(m).expect("rm meta");
        fs::write(m, b"not a database").expect("file");
    }),
    ("make the journal unreadable (a directory)", |m| {
        fs::remove_file(journal(m)).expect("rm journal");
        fs::create_dir(journal(m)).expect("dir");
    }),
    ("flip a byte in every keyspace file", |m| {
        for (p, mut b) in files_under(&m.join("keyspaces")) {
            let mid = b.len() / 2;
            if let Some(x) = b.get_mut(mid) {
                *x ^= 0x10;
                fs::write(&p, &b).expect("write");
            }
        }
    }),
    ("delete fjall's version file", |m| {
        fs::remove_file(m.join("version")).expect("rm version")
    }),
];

#[test]
fn damaged_metadata_never_loses_model_bytes_and_fsck_rebuilds_it() {
    let src = tempfile::tempdir().expect("src");
    let model = gguf_model(&[1_500_000, 700_000], 21);
    let model_p = write_file(src.path(), "m.gguf", &model);
    let tok: Vec<u8> = bytes(22, 700_000);
    let tok_p = write_file(src.path(), "tokenizer.json", &tok);
    let part = gguf_model(&[1_200_000, 1_200_000], 23);
    let part_p = write_file(src.path(), "p.gguf", &part);
    let part_m = build_manifest(&part_p, &part, None).expect("manifest");
    for (what, mutate) in MUTATIONS {
        let t = tempfile::tempdir().expect("tmp");
        let dir = t.path().join("s");
        let (model_id, tok_id) = {
            let store = open(&dir);
            store.keygen(false).expect("keygen");
            let model_id = store
                .add_file(
                    &model_p,
                    &AddOptions {
                        pin: true,
                        ..AddOptions::default()
                    },
                )
                .expect("add model");
            store.publish(&model_id, "tiny:v1", None).expect("publish");
            let tok_id = store
                .add_file(&tok_p, &AddOptions::default())
                .expect("add tokenizer");
            assert_eq!(
                store.manifest(&tok_id).expect("m").expect("m").kind,
                ArtifactKind::Tokenizer
            );
            // A partial download, half there.
            store.begin(&part_m).expect("begin");
            for (i, c) in part_m.chunks.iter().enumerate().step_by(2) {
                let r = c.offset as usize..(c.offset + u64::from(c.len)) as usize;
                store
                    .put_chunk(&part_m.id(), i as u32, &part[r])
                    .expect("put");
            }
            store.flush(&part_m.id()).expect("flush");
            (model_id, tok_id)
        };
        let before: Vec<_> = ["objects", "partial"]
            .iter()
            .flat_map(|s| files_under(&dir.join(s)))
            .collect();
        assert_eq!(before.len(), 3);
        mutate(&dir.join("meta"));
        // Opening either works (and lists the models) or explains itself.
        match Store::open(&dir, StoreOptions::default()) {
            Ok(store) => {
                let ids: Vec<_> = store.list().expect("list").iter().map(|a| a.id).collect();
                assert!(
                    ids.contains(&model_id) && ids.contains(&tok_id),
                    "{what}: opened, but the models are not listed"
                );
            }
            Err(e) => {
                assert!(
                    matches!(e, OpenError::DamagedMetadata { .. }),
                    "{what}: unexpected error {e}"
                );
                assert!(e.to_string().contains("shoal fsck"), "{what}: {e}");
            }
        }
        nothing_lost(&dir, &before, &format!("{what}, after open"));
        let (store, reports) = Store::fsck(&dir, StoreOptions::default())
            .unwrap_or_else(|e| panic!("{what}: fsck: {e}"));
        nothing_lost(&dir, &before, &format!("{what}, after fsck"));
        assert!(reports.iter().all(|r| r.ok()), "{what}: {reports:?}");
        for id in [model_id, tok_id] {
            assert_eq!(
                store.status(&id).expect("status"),
                Some(ArtifactStatus::Active),
                "{what}: {id} not active after fsck"
            );
            assert!(store.verify(&id).expect("verify").ok(), "{what}");
        }
        assert_eq!(
            store.manifest(&tok_id).expect("m").expect("m").kind,
            ArtifactKind::Tokenizer,
            "{what}"
        );
        assert_eq!(
            store
                .resolve("tiny:v1")
                .unwrap_or_else(|e| panic!("{what}: name: {e}")),
            model_id,
            "{what}"
        );
        assert_eq!(object_bytes(&store, &model_id), model, "{what}");
        // The partial is kept if its manifest survived, else it is in lost+found.
        let kept = store.status(&part_m.id()).expect("status").is_some();
        let in_lf = !store.lost_and_found().expect("lf").is_empty();
        assert!(kept || in_lf, "{what}: the partial vanished");
        // A second fsck finds nothing more to do.
        drop(store);
        let (again, _) = Store::fsck(&dir, StoreOptions::default()).expect("fsck again");
        let rec = again.recovery_report();
        assert!(
            rec.is_clean(),
            "{what}: second fsck still repaired: {rec:?}"
        );
    }
}

#[test]
fn unknown_files_go_to_lost_and_found_and_verified_orphans_come_back() {
    let t = tempfile::tempdir().expect("tmp");
    let dir = t.path().join("s");
    let model = gguf_model(&[900_000], 31);
    let p = write_file(t.path(), "m.gguf", &model);
    let id = {
        let store = open(&dir);
        store.add_file(&p, &AddOptions::default()).expect("add")
    };
    // An object whose record is gone (removed through a second store
    // handle's metadata only), a junk object named like an id, a file with
    // a foreign name, an unknown partial.
    let obj = dir.join("objects").join(id.to_hex());
    let keep = fs::read(&obj).expect("read");
    fs::remove_dir_all(dir.join("meta")).expect("rm meta");
    let junk_id = "ab".repeat(32);
    fs::write(dir.join("objects").join(&junk_id), b"junk").expect("junk");
    fs::write(dir.join("objects").join("notes.txt"), b"mine").expect("notes");
    fs::write(dir.join("partial").join("cd".repeat(32)), b"part").expect("part");
    let store = open(&dir);
    let rec = store.recovery_report();
    assert_eq!(rec.reregistered, vec![id]);
    assert_eq!(rec.lost.len(), 3, "{rec:?}");
    assert_eq!(store.status(&id).expect("s"), Some(ArtifactStatus::Active));
    assert_eq!(fs::read(&obj).expect("read"), keep);
    let lf = store.lost_and_found().expect("lf");
    let mut contents: Vec<Vec<u8>> = lf.iter().map(|p| fs::read(p).expect("r")).collect();
    contents.sort();
    assert_eq!(
        contents,
        vec![b"junk".to_vec(), b"mine".to_vec(), b"part".to_vec()]
    );
}

#[test]
fn trust_and_release_files_fixture() {
    let t = tempfile::tempdir().expect("tmp");
    let dir = t.path().join("s");
    let key = ed25519_dalek::SigningKey::from_bytes(&[7; 32]);
    let pk = key.verifying_key().to_bytes();
    let id = shoal::store::ArtifactId([1; 32]);
    let s = release(&key, "tiny:v1", id, 1);
    {
        let store = open(&dir);
        store.trust_add(pk, "teacher").expect("trust");
        assert_eq!(
            store.apply_release(&s).expect("apply"),
            ReleaseOutcome::Applied
        );
    }
    // keys/trusted, format 1.
    assert_eq!(
        fs::read_to_string(dir.join("keys/trusted")).expect("trusted"),
        format!("shoal-trust 1\n{} teacher\n", hex::encode(pk))
    );
    // releases/<name>.release: the SignedRelease encoding, format 1.
    let file = fs::read(dir.join("releases/tiny:v1.release")).expect("release file");
    assert_eq!(file, s.encode());
    assert_eq!(&file[..1], &[1], "format 1 first");
    // With the metadata gone, both come back at open.
    fs::remove_dir_all(dir.join("meta")).expect("rm meta");
    let store = open(&dir);
    let rec = store.recovery_report();
    assert_eq!(rec.keys_restored, 1);
    assert_eq!(rec.names_restored, vec!["tiny:v1".to_string()]);
    assert!(store.is_trusted(&pk).expect("trusted"));
    assert_eq!(store.resolve("tiny:v1").expect("name"), id);
    // A store made before these files gets them at its next open.
    fs::remove_file(dir.join("keys/trusted")).expect("rm trusted");
    fs::remove_dir_all(dir.join("releases")).expect("rm releases");
    drop(store);
    let store = open(&dir);
    assert!(store.recovery_report().is_clean());
    assert_eq!(
        fs::read(dir.join("releases/tiny:v1.release")).expect("written again"),
        s.encode()
    );
    assert!(
        fs::read_to_string(dir.join("keys/trusted"))
            .expect("written again")
            .contains(&hex::encode(pk))
    );
    // Un-trusting survives the metadata being lost again.
    store.trust_remove(&pk).expect("untrust");
    drop(store);
    fs::remove_dir_all(dir.join("meta")).expect("rm meta");
    let store = open(&dir);
    assert!(!store.is_trusted(&pk).expect("trusted"));
    assert!(
        store.resolve("tiny:v1").is_err(),
        "an untrusted release is not restored"
    );
}

#[test]
fn names_and_ids_longer_than_any_name_are_refused_clearly() {
    let t = tempfile::tempdir().expect("tmp");
    let store = open(&t.path().join("s"));
    let huge = "a".repeat(70_000);
    for r in [
        store.resolve(&huge).map(|_| ()),
        store.release(&huge).map(|_| ()),
    ] {
        match r {
            Err(StoreError::TooLong { len: 70_000, .. }) => {}
            other => panic!("{other:?}"),
        }
    }
    // At the limit it is just unknown.
    assert!(matches!(
        store.resolve(&"a".repeat(128)),
        Err(StoreError::Unknown(_))
    ));
}
