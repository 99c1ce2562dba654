//! Corrupt models are not served (real nodes on 127.0.0.1, mDNS off, real
//! HTTP, the demo model): after `verify` marks a model corrupt the node
//! answers 503 naming it, re-fetches the bad chunks from a peer by itself
//! and then serves it again with the peer's answer; an engine already
//! loaded for a model that gets marked is unloaded.

use crate::util::demo_model_path;
use crate::util::http::{error_code, eventually, post};
use crate::util::serving::p2p_addr;
use serde_json::json;
use shoal::node::Node;
use shoal::serve::ServeConfig;
use shoal::store::{AddOptions, ArtifactId, Store, StoreOptions};
use std::io::{Seek, SeekFrom, Write};
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

async fn start(dir: &Path, peers: Vec<libp2p::Multiaddr>) -> (Node, SocketAddr) {
    // No response or KV cache: both nodes compute every answer from their
    // own weights, so equal answers mean equal weights.
    let cfg = ServeConfig {
        response_cache_budget: 0,
        kv: None,
        ..ServeConfig::with_data_dir(dir)
    };
    crate::util::serving::start_node(dir, peers, cfg).await
}

fn chat(model: &str) -> serde_json::Value {
    json!({"model": model, "max_tokens": 8, "temperature": 0,
           "messages": [{"role": "user", "content": "Name a colour."}]})
}

/// Overwrites 4 KiB in the middle of the file (as root, or after chmod).
fn damage(file: &Path) {
    let len = std::fs::metadata(file).expect("meta").len();
    std::fs::set_permissions(file, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(file)
        .expect("open");
    f.seek(SeekFrom::Start(len / 2)).expect("seek");
    f.write_all(&[0x55; 4096]).expect("write");
    f.sync_all().expect("sync");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_model_answers_503_and_is_repaired_from_a_peer_by_itself() {
    let Some(model) = demo_model_path() else {
        return;
    };
    let tmp = tempfile::tempdir().expect("tmp");
    // B holds a good copy.
    let dir_b = tmp.path().join("b");
    let (b, b_http) = start(&dir_b, Vec::new()).await;
    let store_b = b.store().clone();
    let m = model.clone();
    let id = tokio::task::spawn_blocking(move || store_b.add_file(&m, &AddOptions::default()))
        .await
        .expect("join")
        .expect("add");
    let name = id.to_hex();
    let good = post(b_http, "/v1/chat/completions", &chat(&name)).await;
    assert_eq!(good.status, 200, "{}", good.text());
    let good_text = good.json()["choices"][0]["message"]["content"].clone();

    // A's copy is damaged while A is stopped, and `verify` marks it.
    let dir_a = tmp.path().join("a");
    let (m, d) = (model.clone(), dir_a.clone());
    tokio::task::spawn_blocking(move || {
        let store = Store::open(&d, StoreOptions::default()).expect("open");
        let id = store.add_file(&m, &AddOptions::default()).expect("add");
        damage(&store.artifact_path(&id).expect("path"));
        let report = store.verify(&id).expect("verify");
        assert!(!report.ok(), "{report:?}");
        assert_eq!(store.corrupt_artifacts().expect("marks").len(), 1);
    })
    .await
    .expect("join");

    // Started without peers: the model is not served, and the answer says why.
    let (a, a_http) = start(&dir_a, Vec::new()).await;
    let r = post(a_http, "/v1/chat/completions", &chat(&name)).await;
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(error_code(&r), "model_corrupt");
    let msg = r.json()["error"]["message"]
        .as_str()
        .unwrap_or("")
        .to_owned();
    assert!(
        msg.contains(&name)
            && msg.contains("is corrupt (")
            && msg.contains("re-fetching from peers"),
        "{msg}"
    );
    assert!(r.header("retry-after").is_some());

    // Once B is reachable the node repairs the model by itself.
    a.mesh().dial(p2p_addr(&b).await).await.expect("dial");
    let mut answer = None;
    for _ in 0..1200 {
        let r = post(a_http, "/v1/chat/completions", &chat(&name)).await;
        if r.status == 200 {
            answer = Some(r.json()["choices"][0]["message"]["content"].clone());
            break;
        }
        assert_eq!(r.status, 503, "{}", r.text());
        assert_eq!(error_code(&r), "model_corrupt");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let answer = answer.expect("never served again after the repair");
    assert_eq!(
        answer, good_text,
        "the repaired model answers as the good copy"
    );
    let store_a = a.store().clone();
    let (marks, report) = tokio::task::spawn_blocking(move || {
        (
            store_a.corrupt_artifacts().expect("marks"),
            store_a.verify(&id).expect("verify"),
        )
    })
    .await
    .expect("join");
    assert!(marks.is_empty(), "{marks:?}");
    assert!(report.ok(), "{report:?}");
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_loaded_model_that_gets_marked_corrupt_is_unloaded() {
    let Some(model) = demo_model_path() else {
        return;
    };
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("a");
    let (a, addr) = start(&dir, Vec::new()).await;
    let store = a.store().clone();
    let id: ArtifactId =
        tokio::task::spawn_blocking(move || store.add_file(&model, &AddOptions::default()))
            .await
            .expect("join")
            .expect("add");
    let name = id.to_hex();
    let r = post(addr, "/v1/chat/completions", &chat(&name)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let serving = a.serving().expect("serving");
    assert_eq!(serving.models().len(), 1);

    let store = a.store().clone();
    tokio::task::spawn_blocking(move || {
        damage(&store.artifact_path(&id).expect("path"));
        assert!(!store.verify(&id).expect("verify").ok());
    })
    .await
    .expect("join");
    eventually("the engine is unloaded", || serving.models().is_empty()).await;
    let r = post(addr, "/v1/chat/completions", &chat(&name)).await;
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(error_code(&r), "model_corrupt");
    a.shutdown().await;
}
