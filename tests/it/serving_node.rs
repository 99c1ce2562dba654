//! The OpenAI routes on a real node (store + mesh on 127.0.0.1, mDNS off):
//! a model is served by artifact id from the store, and a neighbour that
//! does not hold it pulls it from the mesh on first use.

use crate::util::demo_model_path;
use crate::util::http::{error_code, http, post};
use crate::util::serving::TwoNodes;
use serde_json::json;
use shoal::serve::ServeConfig;
use std::path::Path;

fn cfg(dir: &Path) -> ServeConfig {
    ServeConfig {
        response_cache_budget: 0,
        ..ServeConfig::with_data_dir(dir)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_serves_store_models_and_pulls_them_from_a_neighbour() {
    if demo_model_path().is_none() {
        return;
    }
    let tmp = tempfile::tempdir().expect("tmp");
    let pair = TwoNodes::start(tmp.path(), cfg).await;
    let (a, a_http, id) = (pair.first.node, pair.first.http, pair.first.model);
    let (b, b_http) = (pair.second, pair.second_http);
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
