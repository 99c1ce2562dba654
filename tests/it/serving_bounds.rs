//! Bounded serving on a real node (store + mesh on 127.0.0.1, mDNS off,
//! real HTTP, the demo model): every alias of one artifact reaches one
//! engine; loaded models are bounded (count and memory) with LRU unloading;
//! a served model is leased against eviction; an id nobody has fails fast
//! and a long pull of one model does not hold up another; model names are
//! length-checked at the edge.

use crate::util::demo_model_path;
use crate::util::http::{error_code, eventually, http, post};
use crate::util::serving::{connected, p2p_addr};
use serde_json::json;
use shoal::node::Node;
use shoal::serve::ServeConfig;
use shoal::store::{AddOptions, ArtifactId, StoreOptions};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// A real node in `dir` with store options `store` (mDNS off, loopback,
/// static `peers`) serving with `cfg`, and its HTTP API on 127.0.0.1:0.
async fn start(
    dir: &Path,
    peers: Vec<libp2p::Multiaddr>,
    store: StoreOptions,
    cfg: ServeConfig,
) -> (Node, SocketAddr) {
    crate::util::serving::start_node_with(dir, peers, store, cfg).await
}

fn cfg(dir: &Path) -> ServeConfig {
    ServeConfig {
        response_cache_budget: 0,
        ..ServeConfig::with_data_dir(dir)
    }
}

async fn add(node: &Node, file: &Path) -> ArtifactId {
    let store = node.store().clone();
    let file = file.to_path_buf();
    tokio::task::spawn_blocking(move || store.add_file(&file, &AddOptions::default()))
        .await
        .expect("join")
        .expect("add")
}

/// A second valid GGUF: the demo model with one letter of its
/// `general.name` changed (same tensors, another artifact id).
fn variant(demo: &Path, dir: &Path, letter: u8) -> PathBuf {
    let mut b = std::fs::read(demo).expect("read demo");
    let head = &b[..b.len().min(1 << 16)];
    let at = head
        .windows(7)
        .position(|w| w == b"Smollm2")
        .expect("general.name of the demo model");
    b[at + 6] = letter;
    let p = dir.join(format!("variant-{}.gguf", letter as char));
    std::fs::write(&p, b).expect("write variant");
    p
}

fn chat(model: &str) -> serde_json::Value {
    json!({"model": model, "max_tokens": 2, "temperature": 0,
           "messages": [{"role": "user", "content": "Say hello."}]})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_alias_of_an_artifact_reaches_one_engine() {
    let Some(model) = demo_model_path() else {
        return;
    };
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("a");
    let (node, addr) = start(&dir, Vec::new(), StoreOptions::default(), cfg(&dir)).await;
    let id = add(&node, &model).await;
    let store = node.store().clone();
    tokio::task::spawn_blocking(move || {
        store.keygen(false).expect("keygen");
        store.publish(&id, "demo:v1", None).expect("publish");
    })
    .await
    .expect("join");
    let hex = id.to_hex();
    let up = hex.to_ascii_uppercase();
    let mixed: String = hex
        .chars()
        .enumerate()
        .map(|(i, c)| {
            if i % 2 == 0 {
                c.to_ascii_uppercase()
            } else {
                c
            }
        })
        .collect();
    let aliases = [
        hex.clone(),
        up.clone(),
        hex[..8].to_owned(),
        up[..8].to_owned(),
        hex[..12].to_owned(),
        up[..16].to_owned(),
        hex[..20].to_owned(),
        mixed[..24].to_owned(),
        hex[..32].to_owned(),
        up[..40].to_owned(),
        hex[..48].to_owned(),
        hex[..63].to_owned(),
        mixed.clone(),
        "demo:v1".to_owned(),
    ];
    assert_eq!(aliases.len(), 14);
    let serving = node.serving().expect("serving");
    // The first four at once, before anything is loaded: they share one load.
    let first = futures::future::join_all(
        aliases[..4]
            .iter()
            .map(|a| async move { post(addr, "/v1/chat/completions", &chat(a)).await }),
    )
    .await;
    for (a, r) in aliases.iter().zip(&first) {
        assert_eq!(r.status, 200, "{a}: {}", r.text());
    }
    assert_eq!(serving.models().len(), 1);
    for a in &aliases[4..] {
        let r = post(addr, "/v1/chat/completions", &chat(a)).await;
        assert_eq!(r.status, 200, "{a}: {}", r.text());
        assert_eq!(
            serving.models().len(),
            1,
            "after {a}: {:?}",
            serving
                .models()
                .iter()
                .map(|m| m.engine.name().to_owned())
                .collect::<Vec<_>>()
        );
    }
    let models = http(addr, "GET", "/v1/models", &[], b"").await.json();
    assert_eq!(models["data"].as_array().map(Vec::len), Some(1), "{models}");
    assert_eq!(models["data"][0]["shoal_model_id"], json!(hex));
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loaded_models_are_bounded_and_the_least_recently_used_idle_one_is_unloaded() {
    let Some(model) = demo_model_path() else {
        return;
    };
    let tmp = tempfile::tempdir().expect("tmp");
    let b_file = variant(&model, tmp.path(), b'3');
    // Bounded by count (max_loaded = 1), then by memory (room for one).
    for (label, max_loaded, memory_budget) in [("count", 1, u64::MAX), ("memory", 4, 1)] {
        let dir = tmp.path().join(label);
        let cfg = ServeConfig {
            max_loaded,
            memory_budget: Some(memory_budget),
            ..cfg(&dir)
        };
        let (node, addr) = start(&dir, Vec::new(), StoreOptions::default(), cfg).await;
        let a = add(&node, &model).await.to_hex();
        let b = add(&node, &b_file).await.to_hex();
        assert_ne!(a, b);
        let serving = node.serving().expect("serving");

        let r = post(addr, "/v1/chat/completions", &chat(&a)).await;
        assert_eq!(r.status, 200, "{label}: {}", r.text());
        let first = serving.model(&a).expect("a loaded");
        let weak = std::sync::Arc::downgrade(first.engine.model());
        drop(first);

        let r = post(addr, "/v1/chat/completions", &chat(&b)).await;
        assert_eq!(r.status, 200, "{label}: {}", r.text());
        let ids: Vec<String> = serving.models().iter().map(|m| m.id_hex.clone()).collect();
        assert_eq!(ids, vec![b.clone()], "{label}: only the new model stays");
        // The unloaded engine's thread stopped and its mapping was dropped.
        eventually("the unloaded model is freed", || weak.upgrade().is_none()).await;

        // Back to the first: loaded again, the other unloaded.
        let r = post(addr, "/v1/chat/completions", &chat(&a)).await;
        assert_eq!(r.status, 200, "{label}: {}", r.text());
        let ids: Vec<String> = serving.models().iter().map(|m| m.id_hex.clone()).collect();
        assert_eq!(ids, vec![a.clone()], "{label}");
        node.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_served_model_is_leased_against_eviction() {
    let Some(model) = demo_model_path() else {
        return;
    };
    let tmp = tempfile::tempdir().expect("tmp");
    let b_file = variant(&model, tmp.path(), b'4');
    let size = std::fs::metadata(&model).expect("size").len();
    // Room for one model and a half: adding the second needs the first evicted.
    let store_opts = StoreOptions {
        quota_bytes: size + size / 2,
        ..StoreOptions::default()
    };
    let dir = tmp.path().join("a");
    let (node, addr) = start(&dir, Vec::new(), store_opts, cfg(&dir)).await;
    let a = add(&node, &model).await;
    let r = post(addr, "/v1/chat/completions", &chat(&a.to_hex())).await;
    assert_eq!(r.status, 200, "{}", r.text());

    let store = node.store().clone();
    let (added, gc) = tokio::task::spawn_blocking(move || {
        let added = store.add_file(&b_file, &AddOptions::default());
        (added, store.gc())
    })
    .await
    .expect("join");
    assert!(
        matches!(added, Err(shoal::store::AddError::QuotaExceeded { .. })),
        "the served model must not make room: {added:?}"
    );
    let gc = gc.expect("gc");
    assert!(gc.evicted.is_empty(), "{gc:?}");
    let store = node.store().clone();
    let still = tokio::task::spawn_blocking(move || store.artifact_path(&a).is_ok())
        .await
        .expect("join");
    assert!(still, "the served model is still in the store");
    let r = post(addr, "/v1/chat/completions", &chat(&a.to_hex())).await;
    assert_eq!(r.status, 200, "{}", r.text());
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_id_nobody_has_fails_fast_and_a_long_pull_holds_up_no_other_model() {
    let Some(model) = demo_model_path() else {
        return;
    };
    let tmp = tempfile::tempdir().expect("tmp");
    // B holds only the manifest of a variant (a partial with no chunks):
    // A's pull of it finds the manifest and then waits for chunks nobody has.
    let dir_b = tmp.path().join("b");
    let (b, _) = start(&dir_b, Vec::new(), StoreOptions::default(), cfg(&dir_b)).await;
    let slow_file = variant(&model, tmp.path(), b'5');
    let bytes = std::fs::read(&slow_file).expect("read");
    let manifest = shoal::store::build_manifest(&slow_file, &bytes, None).expect("manifest");
    drop(bytes);
    let slow = manifest.id();
    let store_b = b.store().clone();
    tokio::task::spawn_blocking(move || store_b.begin(&manifest).expect("begin"))
        .await
        .expect("join");

    let dir_a = tmp.path().join("a");
    let (a, addr) = start(
        &dir_a,
        vec![p2p_addr(&b).await],
        StoreOptions::default(),
        cfg(&dir_a),
    )
    .await;
    connected(&a, &b).await;
    let demo = add(&a, &model).await.to_hex();

    // An id no peer has: a clear 404 after one manifest lookup, no pull.
    let bogus = "0123456789abcdef".repeat(4);
    let r = post(addr, "/v1/chat/completions", &chat(&bogus)).await;
    assert_eq!(r.status, 404, "{}", r.text());
    assert_eq!(error_code(&r), "model_not_found");
    assert!(r.text().contains("no peer has it"), "{}", r.text());
    let bogus_id: ArtifactId = bogus.parse().expect("id");
    assert!(
        a.downloads().get(&bogus_id).is_none(),
        "no pull was started"
    );

    // A model that only a long pull can bring does not hold up the demo model.
    let slow_req =
        tokio::spawn(
            async move { post(addr, "/v1/chat/completions", &chat(&slow.to_hex())).await },
        );
    eventually("the slow pull started", || {
        a.downloads().get(&slow).is_some()
    })
    .await;
    let r = post(addr, "/v1/chat/completions", &chat(&demo)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(
        !slow_req.is_finished(),
        "the slow pull (stall timeout 60 s) is still running"
    );
    // Ending the pull ends the waiting request with a 503.
    a.downloads().cancel(&slow);
    let r = slow_req.await.expect("join");
    assert_eq!(r.status, 503, "{}", r.text());
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_model_name_is_refused_at_the_edge() {
    let Some(model) = demo_model_path() else {
        return;
    };
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("a");
    let (node, addr) = start(&dir, Vec::new(), StoreOptions::default(), cfg(&dir)).await;
    let id = add(&node, &model).await.to_hex();
    let long = "m".repeat(70_000);
    for path in ["/v1/chat/completions", "/v1/completions"] {
        let body = json!({"model": long, "prompt": "Hi", "max_tokens": 2,
                          "messages": [{"role": "user", "content": "Hi"}]});
        let r = post(addr, path, &body).await;
        assert_eq!(r.status, 400, "{path}: {}", r.text());
        assert_eq!(error_code(&r), "string_above_max_length");
        assert!(r.text().len() < 4096, "the name is not echoed whole");
    }
    let r = http(
        addr,
        "GET",
        &format!("/v1/models/{}", "m".repeat(70_000)),
        &[],
        b"",
    )
    .await;
    assert!(
        r.status == 400 || r.status == 414 || r.status == 431,
        "{}",
        r.status
    );
    // The node still answers.
    let r = post(addr, "/v1/chat/completions", &chat(&id)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let r = http(addr, "GET", "/v1/models", &[], b"").await;
    assert_eq!(r.status, 200);
    node.shutdown().await;
}
