//! Metrics: store and dedupe events move the process-wide counters, and the
//! rendered text passes a real Prometheus parser (`promtool check metrics`).

use shoal::metrics::{self, CacheOutcome, Outcome, Source, Tier};
use shoal::store::{AddOptions, Store, StoreOptions, build_manifest};
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

/// The value of the sample `series` (name with its labels) in Prometheus text.
fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no sample {series} in:\n{text}"))
}

/// Runs `promtool check metrics` on the text; `None` when promtool is missing
/// (outside CI only: in CI that is a failure).
fn promtool_check(text: &str) -> Option<(bool, String)> {
    let child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => {
            if std::env::var("CI").is_ok_and(|v| v == "true") {
                panic!("promtool is missing ({e}): apt-get install prometheus");
            }
            eprintln!(
                "SKIPPING promtool check: promtool not found ({e}); apt-get install prometheus"
            );
            return None;
        }
    };
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("write to promtool");
    let out = child.wait_with_output().expect("promtool");
    let msg = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Some((out.status.success(), msg))
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).expect("write");
    p
}

#[test]
fn store_events_move_counters_and_promtool_accepts_the_text() {
    let m = std::sync::Arc::new(metrics::Metrics::new());
    let before = m.render();
    let d = tempfile::tempdir().expect("tempdir");

    // Local add: bytes stored and artifacts move.
    let store = Store::open(
        &d.path().join("a"),
        StoreOptions {
            metrics: m.clone(),
            ..Default::default()
        },
    )
    .expect("open");
    let a = crate::util::synth::gguf_model(&[96_000, 96_000], 1);
    let a_path = write(d.path(), "a.gguf", &a);
    store
        .add_file(&a_path, &AddOptions::default())
        .expect("add");
    let t = m.render();
    let delta = |t: &str, s: &str| sample(t, s) - sample(&before, s);
    assert_eq!(delta(&t, "shoal_store_added_bytes_total"), a.len() as f64);
    assert_eq!(delta(&t, "shoal_store_bytes"), a.len() as f64);
    assert_eq!(delta(&t, "shoal_store_artifacts{status=\"active\"}"), 1.0);

    // A model sharing two tensors with `a`: beginning it copies them locally (dedupe).
    let c = crate::util::synth::gguf_model(&[96_000, 96_000, 96_000], 1);
    let manifest = build_manifest(Path::new("c.gguf"), &c, None).expect("manifest");
    store.begin(&manifest).expect("begin");
    let t = m.render();
    assert_eq!(
        delta(&t, "shoal_chunk_fetch_bytes_total{source=\"local\"}"),
        192_000.0
    );
    assert_eq!(
        delta(
            &t,
            "shoal_chunk_fetches_total{source=\"local\",outcome=\"ok\"}"
        ),
        2.0
    );
    assert_eq!(delta(&t, "shoal_store_artifacts{status=\"partial\"}"), 1.0);
    drop(store);

    // Eviction: a second store whose quota holds one model only.
    let quota = (a.len() + 1000) as u64;
    let small = Store::open(
        &d.path().join("b"),
        StoreOptions {
            quota_bytes: quota,
            metrics: m.clone(),
            ..Default::default()
        },
    )
    .expect("open");
    let b = crate::util::synth::gguf_model(&[96_000, 96_000], 7);
    let b_path = write(d.path(), "b.gguf", &b);
    small
        .add_file(&a_path, &AddOptions::default())
        .expect("add a");
    small
        .add_file(&b_path, &AddOptions::default())
        .expect("add b");
    let t = m.render();
    assert_eq!(delta(&t, "shoal_store_evictions_total"), 1.0);
    assert_eq!(delta(&t, "shoal_store_evicted_bytes_total"), a.len() as f64);
    assert_eq!(sample(&t, "shoal_store_quota_bytes"), quota as f64);

    // Events of the other layers, so every family has samples for the parser.
    m.chunk_fetch(Source::Peer, Outcome::Ok, 4096, 0.003);
    m.chunk_fetch(Source::Peer, Outcome::BadHash, 0, 0.004);
    m.chunk_fetch(Source::Origin, Outcome::Timeout, 0, 30.0);
    m.peer_banned(1);
    m.peers_connected(2);
    m.kv_usage(Tier::Ram, 4, 4 << 20);
    m.kv_lookup(Tier::Disk, false, 3);
    m.response_cache_lookup(false);
    m.response_cache_bytes(1234);
    m.ttft(CacheOutcome::Miss, 0.8);
    m.ttft(CacheOutcome::Kv, 0.1);
    m.ttft(CacheOutcome::Response, 0.002);
    m.generation(32, 1.6);
    m.request(200);
    m.request(503);
    m.queue_depth("smollm2-135m-instruct:q4_1", 1);
    let t = m.render();
    assert_eq!(delta(&t, "shoal_bad_chunks_total{source=\"peer\"}"), 1.0);
    assert_eq!(
        delta(&t, "shoal_chunk_fetch_bytes_total{source=\"peer\"}"),
        4096.0
    );

    if let Some((ok, msg)) = promtool_check(&t) {
        assert!(
            ok,
            "promtool check metrics failed:\n{msg}\n--- text ---\n{t}"
        );
        assert!(msg.trim().is_empty(), "promtool lint problems:\n{msg}");
    }
    // A broken exposition is rejected by the same check (the check can fail).
    if let Some((ok, _)) = promtool_check("# TYPE x counter\nx{a=\"1\" 1\n") {
        assert!(!ok, "promtool accepted a malformed exposition");
    }
}
