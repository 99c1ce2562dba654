//! `shoal import` layouts: a directory of GGUF files, a Hugging Face cache and
//! an Ollama store, each built here as a small fake tree of tiny GGUF files.

use shoal::import::{ImportOptions, Layout, import, scan};
use shoal::store::{ArtifactId, Store, StoreOptions, build_manifest};
use std::os::unix::fs::symlink;
use std::path::Path;

fn put(path: &Path, bytes: &[u8]) {
    std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
    std::fs::write(path, bytes).expect("write");
}

/// The id the store gives these bytes.
fn id_of(bytes: &[u8]) -> ArtifactId {
    build_manifest(Path::new("x.gguf"), bytes, None)
        .expect("manifest")
        .id()
}

fn open(dir: &Path) -> Store {
    Store::open(dir, StoreOptions::default()).expect("open store")
}

#[test]
fn plain_directory_recursive_with_links_and_junk() {
    let d = tempfile::tempdir().expect("tempdir");
    let src = d.path().join("models");
    let a = crate::util::synth::gguf_model(&[4096, 8192], 1);
    let b = crate::util::synth::gguf_model(&[4096], 2);
    put(&src.join("SmolLM2-135M-Instruct.Q4_1.gguf"), &a);
    put(&src.join("deep/er/TinyStories-f16.gguf"), &b);
    put(&src.join("notes.txt"), b"not a model");
    put(&src.join("broken.gguf"), b"this is not GGUF at all");
    // A link to a file is followed; a link to a directory is not (no loops).
    symlink(
        src.join("deep/er/TinyStories-f16.gguf"),
        src.join("alias.gguf"),
    )
    .expect("link");
    symlink(&src, src.join("deep/loop")).expect("link");

    let found = scan(&src).expect("scan");
    let names: Vec<&str> = found.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "smollm2-135m-instruct:q4_1",
            "alias:latest",
            "broken:latest",
            "tinystories:f16"
        ]
    );
    assert!(found.iter().all(|c| c.layout == Layout::File));

    let store = open(&d.path().join("store"));
    let done = import(&store, &src, &ImportOptions::default()).expect("import");
    let failed: Vec<_> = done.iter().filter(|r| r.error.is_some()).collect();
    assert_eq!(failed.len(), 1, "{done:?}");
    assert!(failed[0].candidate.origin.ends_with("broken.gguf"));
    assert_eq!(
        store.resolve("smollm2-135m-instruct:q4_1").ok(),
        Some(id_of(&a))
    );
    assert_eq!(store.resolve("tinystories:f16").ok(), Some(id_of(&b)));
    assert_eq!(store.resolve("alias:latest").ok(), Some(id_of(&b)));
    assert_eq!(
        store.list().expect("list").len(),
        2,
        "same bytes stored once"
    );
    // The stored copy is byte-identical to the source.
    let obj = store.artifact_path(&id_of(&a)).expect("path");
    assert_eq!(std::fs::read(&obj).expect("read"), a);
    // A plain file may be edited later: it is never hard-linked.
    use std::os::unix::fs::MetadataExt;
    let src_ino = std::fs::metadata(src.join("SmolLM2-135M-Instruct.Q4_1.gguf"))
        .expect("stat")
        .ino();
    assert_ne!(std::fs::metadata(&obj).expect("stat").ino(), src_ino);

    // Importing again adds nothing and re-signs nothing.
    let seq = |s: &Store| {
        s.release("tinystories:f16")
            .expect("release")
            .and_then(|r| r.verify().ok())
            .map(|r| r.seq)
    };
    let before = seq(&store);
    let again = import(&store, &src, &ImportOptions::default()).expect("import");
    assert!(
        again
            .iter()
            .filter(|r| r.error.is_none())
            .all(|r| r.already_present)
    );
    assert_eq!(seq(&store), before);
}

#[test]
fn hugging_face_cache_resolves_blobs_and_prefers_refs_main() {
    let d = tempfile::tempdir().expect("tempdir");
    let hub = d.path().join("hub");
    let repo = hub.join("models--bartowski--SmolLM2-135M-Instruct-GGUF");
    let old = crate::util::synth::gguf_model(&[4096], 10);
    let new = crate::util::synth::gguf_model(&[4096], 11);
    let other = crate::util::synth::gguf_model(&[2048], 12);
    put(&repo.join("blobs/1111"), &old);
    put(&repo.join("blobs/2222"), &new);
    put(&repo.join("blobs/3333"), &other);
    // rev "b" is older on disk order but refs/main points at it: it must win the name.
    let file = "SmolLM2-135M-Instruct-Q4_K_M.gguf";
    std::fs::create_dir_all(repo.join("snapshots/a")).expect("mkdir");
    std::fs::create_dir_all(repo.join("snapshots/b/sub")).expect("mkdir");
    symlink("../../blobs/2222", repo.join("snapshots/a").join(file)).expect("link");
    symlink("../../blobs/1111", repo.join("snapshots/b").join(file)).expect("link");
    symlink(
        "../../../blobs/3333",
        repo.join("snapshots/b/sub/SmolLM2-135M-Instruct-Q8_0.gguf"),
    )
    .expect("link");
    // A file whose blob was never downloaded (dangling link) is skipped.
    symlink(
        "../../blobs/4444",
        repo.join("snapshots/b/SmolLM2-135M-Instruct-f16.gguf"),
    )
    .expect("link");
    put(&repo.join("snapshots/b/README.md"), b"# readme");
    put(&repo.join("refs/main"), b"b\n");

    let found = scan(&hub).expect("scan");
    assert!(found.iter().all(|c| c.layout == Layout::HuggingFace));
    assert!(found.iter().all(|c| {
        c.path
            .starts_with(std::fs::canonicalize(repo.join("blobs")).expect("canon"))
    }));
    assert_eq!(found.len(), 3, "{found:?}");

    let store = open(&d.path().join("store"));
    let done = import(
        &store,
        &hub,
        &ImportOptions {
            pin: true,
            ..Default::default()
        },
    )
    .expect("import");
    assert!(done.iter().all(|r| r.error.is_none()), "{done:?}");
    assert_eq!(
        store.resolve("smollm2-135m-instruct:q4_k_m").ok(),
        Some(id_of(&old))
    );
    assert_eq!(
        store.resolve("smollm2-135m-instruct:q8_0").ok(),
        Some(id_of(&other))
    );
    let list = store.list().expect("list");
    assert_eq!(list.len(), 3);
    assert!(list.iter().all(|a| a.pinned));
    // Same filesystem: the store shares the blob's inode instead of copying it.
    use std::os::unix::fs::MetadataExt;
    let ino = |p: &Path| std::fs::metadata(p).expect("stat").ino();
    let obj = store.artifact_path(&id_of(&old)).expect("path");
    assert_eq!(ino(&obj), ino(&repo.join("blobs/1111")));
    assert_eq!(std::fs::read(&obj).expect("read"), old);
}

#[test]
fn ollama_store_follows_manifests_to_model_blobs() {
    let d = tempfile::tempdir().expect("tempdir");
    let models = d.path().join(".ollama/models");
    let tiny = crate::util::synth::gguf_model(&[4096, 4096], 20);
    let bob = crate::util::synth::gguf_model(&[1024], 21);
    let hex = |b: &[u8]| {
        // Ollama names blobs by SHA-256; any 64 hex digits do for the layout.
        format!("{}", blake3::hash(b).to_hex())
    };
    let (tiny_hex, bob_hex) = (hex(&tiny), hex(&bob));
    put(&models.join(format!("blobs/sha256-{tiny_hex}")), &tiny);
    put(&models.join(format!("blobs/sha256-{bob_hex}")), &bob);
    put(&models.join("blobs/sha256-template"), b"{{ .Prompt }}");
    let manifest = |model_hex: &str| {
        format!(
            r#"{{"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.v2+json",
            "config":{{"mediaType":"application/vnd.docker.container.image.v1+json","digest":"sha256:{0}","size":10}},
            "layers":[{{"mediaType":"application/vnd.ollama.image.template","digest":"sha256:{0}","size":13}},
                      {{"mediaType":"application/vnd.ollama.image.model","digest":"sha256:{model_hex}","size":1}}]}}"#,
            "0".repeat(64)
        )
    };
    let reg = models.join("manifests/registry.ollama.ai");
    put(
        &reg.join("library/tiny/latest"),
        manifest(&tiny_hex).as_bytes(),
    );
    put(&reg.join("library/tiny/q4"), manifest(&tiny_hex).as_bytes());
    put(&reg.join("bob/Mini/v1"), manifest(&bob_hex).as_bytes());
    // A manifest without a model layer (e.g. an adapter) is skipped.
    put(
        &reg.join("library/adapter/latest"),
        br#"{"schemaVersion":2,"layers":[{"mediaType":"application/vnd.ollama.image.adapter","digest":"sha256:00","size":1}]}"#,
    );

    // Pointing at ~/.ollama finds the store below it.
    let found = scan(&d.path().join(".ollama")).expect("scan");
    let mut names: Vec<&str> = found.iter().map(|c| c.name.as_str()).collect();
    names.sort_unstable();
    assert_eq!(names, ["bob-mini:v1", "tiny:latest", "tiny:q4"]);
    assert!(found.iter().all(|c| c.layout == Layout::Ollama));

    let store = open(&d.path().join("store"));
    let done = import(&store, &models, &ImportOptions::default()).expect("import");
    assert!(done.iter().all(|r| r.error.is_none()), "{done:?}");
    assert_eq!(store.resolve("tiny:latest").ok(), Some(id_of(&tiny)));
    assert_eq!(store.resolve("tiny:q4").ok(), Some(id_of(&tiny)));
    assert_eq!(store.resolve("bob-mini:v1").ok(), Some(id_of(&bob)));
    assert_eq!(store.list().expect("list").len(), 2);
    use std::os::unix::fs::MetadataExt;
    let obj = store.artifact_path(&id_of(&bob)).expect("path");
    let blob = models.join(format!("blobs/sha256-{bob_hex}"));
    assert_eq!(
        std::fs::metadata(&obj).expect("stat").ino(),
        std::fs::metadata(&blob).expect("stat").ino(),
        "the Ollama blob is hard-linked, not copied"
    );

    // A corrupt manifest is an error naming the file.
    put(&reg.join("library/bad/latest"), b"{ not json");
    let err = scan(&models)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(err.contains("library/bad/latest"), "{err}");
}

#[test]
fn nothing_to_import_is_an_error() {
    let d = tempfile::tempdir().expect("tempdir");
    put(&d.path().join("src/readme.txt"), b"hi");
    let store = open(&d.path().join("store"));
    assert!(import(&store, &d.path().join("src"), &ImportOptions::default()).is_err());
}
