//! The OpenAI routes on a real node (store + mesh on 127.0.0.1, mDNS off):
//! a model is served by artifact id from the store, and a neighbour that
//! does not hold it pulls it from the mesh on first use.

mod serving_common;

use serde_json::json;
use serving_common::{demo_model_path, error_code, http, p2p_addr, post};
use shoal::node::Node;
use shoal::serve::ServeConfig;
use shoal::store::AddOptions;
use std::net::SocketAddr;
use std::path::Path;

async fn start(dir: &Path, peers: Vec<libp2p::Multiaddr>) -> (Node, SocketAddr) {
    let cfg = ServeConfig {
        response_cache_budget: 0,
        ..ServeConfig::with_data_dir(dir)
    };
    serving_common::start_node(dir, peers, cfg).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_serves_store_models_and_pulls_them_from_a_neighbour() {
    let Some(model) = demo_model_path() else {
        return;
    };
    let tmp = tempfile::tempdir().expect("tmp");
    let (a, a_http) = start(&tmp.path().join("a"), Vec::new()).await;
    let store = a.store().clone();
    let id = tokio::task::spawn_blocking(move || store.add_file(&model, &AddOptions::default()))
        .await
        .expect("join")
        .expect("add");
    a.mesh().provide(id).await.expect("provide");
    let name = id.to_hex();
    let body = json!({"model": name, "max_tokens": 8, "temperature": 0,
                      "messages": [{"role": "user", "content": "Say hello."}]});

    // Unknown names are a clear 404.
    let r = post(
        a_http,
        "/v1/chat/completions",
        &json!({"model": "no-such-model", "messages": []}),
    )
    .await;
    assert_eq!(r.status, 404, "{}", r.text());
    assert_eq!(error_code(&r), "model_not_found");

    // Served by artifact id, loaded from the store on first use.
    let r = post(a_http, "/v1/chat/completions", &body).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let text_a = r.json()["choices"][0]["message"]["content"].clone();
    let models = http(a_http, "GET", "/v1/models", &[], b"").await.json();
    assert_eq!(models["data"][0]["id"], json!(name));
    // The admin routes are still there beside the OpenAI ones.
    assert_ne!(
        http(a_http, "GET", "/v1/models/nope", &[], b"")
            .await
            .status,
        405
    );

    // A neighbour without the model pulls it from the mesh on first use.
    let (b, b_http) = start(&tmp.path().join("b"), vec![p2p_addr(&a).await]).await;
    let r = post(b_http, "/v1/chat/completions", &body).await;
    assert_eq!(r.status, 200, "{}", r.text());
    // Greedy answers do not depend on where the weights or the KV came from.
    assert!(text_a.as_str().is_some_and(|t| !t.is_empty()));
    assert_eq!(r.json()["choices"][0]["message"]["content"], text_a);

    let store_b = b.store().clone();
    let have = tokio::task::spawn_blocking(move || store_b.artifact_path(&id).is_ok())
        .await
        .expect("join");
    assert!(have, "the neighbour now holds the model");
    b.shutdown().await;
    a.shutdown().await;
}
