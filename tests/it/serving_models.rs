//! Issue 18, items 2 and 3, on real in-process nodes (loopback, mDNS off):
//! `/v1/models` lists every model a node can serve (loaded, local, remote;
//! each name once), and a newer trusted release switches a served name to
//! another artifact live, under load, with no failed request.

use crate::util::demo_model_path;
use crate::util::http::{eventually, http, post};
use crate::util::serving::{connected, p2p_addr, start_node};
use serde_json::{Value, json};
use shoal::node::Node;
use shoal::serve::{ModelState, ServeConfig};
use shoal::store::{AddOptions, ArtifactId};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// Serving without caches: answers depend on the model only.
fn no_caches(dir: &Path) -> ServeConfig {
    ServeConfig {
        response_cache_budget: 0,
        kv: None,
        ..ServeConfig::with_data_dir(dir)
    }
}

/// Adds `file` to the node's store and, for each of `names`, publishes it
/// under that name with the node's own (trusted) key.
async fn add_named(node: &Node, file: &Path, names: &[&str]) -> ArtifactId {
    let store = node.store().clone();
    let file = file.to_owned();
    let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let id = store.add_file(&file, &AddOptions::default()).expect("add");
        store.keygen(false).expect("keygen");
        for n in &names {
            store.publish(&id, n, None).expect("publish");
        }
        id
    })
    .await
    .expect("join")
}

async fn models(addr: SocketAddr) -> Vec<Value> {
    let r = http(addr, "GET", "/v1/models", &[], b"").await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["object"], "list");
    v["data"].as_array().expect("data").clone()
}

fn entry<'a>(list: &'a [Value], id: &str) -> &'a Value {
    let hits: Vec<&Value> = list.iter().filter(|m| m["id"] == id).collect();
    assert_eq!(hits.len(), 1, "{id} listed once in {list:?}");
    hits[0]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_lists_local_loaded_and_remote_names_once() {
    let Some(model) = demo_model_path() else {
        return;
    };
    let tmp = tempfile::tempdir().expect("tmp");
    let (dir_a, dir_b) = (tmp.path().join("a"), tmp.path().join("b"));
    let (a, a_http) = start_node(&dir_a, Vec::new(), no_caches(&dir_a)).await;
    // Two trusted names for one artifact, and a second artifact with no name
    // that this build cannot serve (an I8 tensor, no tokenizer).
    let id = add_named(&a, &model, &["smol:q4", "smol:latest"]).await;
    let junk = tmp.path().join("junk.gguf");
    std::fs::write(&junk, crate::util::synth::gguf_model(&[4096], 3)).expect("write");
    let store = a.store().clone();
    let junk_id = tokio::task::spawn_blocking(move || {
        store
            .add_file(&junk, &AddOptions::default())
            .expect("add junk")
    })
    .await
    .expect("join");

    // Fresh: nothing loaded, every name listed as local, once; the named id
    // is not repeated in hex, the unnamed one is listed in hex.
    let list = models(a_http).await;
    assert_eq!(list.len(), 3, "{list:?}");
    for n in ["smol:q4", "smol:latest"] {
        let m = entry(&list, n);
        assert_eq!(m["object"], "model");
        assert_eq!(m["owned_by"], "shoal");
        assert_eq!(m["shoal"]["state"], "local");
        assert_eq!(m["shoal"]["artifact"], id.to_hex());
        assert_eq!(m["shoal"]["servable"], true);
        assert_eq!(m["loaded"], false);
    }
    let j = entry(&list, &junk_id.to_hex());
    assert_eq!(j["shoal"]["servable"], false);
    assert!(j["unservable_kind"].is_string(), "{j}");

    // Used once under one name: both names are loaded, still once each.
    let r = post(
        a_http,
        "/v1/completions",
        &json!({"model": "smol:q4", "prompt": "Hi", "max_tokens": 2, "temperature": 0}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let list = models(a_http).await;
    assert_eq!(list.len(), 3, "{list:?}");
    for n in ["smol:q4", "smol:latest"] {
        let m = entry(&list, n);
        assert_eq!(m["shoal"]["state"], "loaded", "{m}");
        assert!(m["context_length"].as_u64().is_some_and(|c| c > 0), "{m}");
    }
    let one = http(a_http, "GET", "/v1/models/smol:latest", &[], b"").await;
    assert_eq!(one.status, 200);
    assert_eq!(one.json()["shoal"]["state"], "loaded");

    // A node that trusts A's key and only knows the names from the mesh.
    let key = {
        let store = a.store().clone();
        tokio::task::spawn_blocking(move || store.keygen(false).expect("key"))
            .await
            .expect("join")
    };
    let (b, b_http) = start_node(&dir_b, vec![p2p_addr(&a).await], no_caches(&dir_b)).await;
    let store = b.store().clone();
    tokio::task::spawn_blocking(move || store.trust_add(key, "a").expect("trust"))
        .await
        .expect("join");
    connected(&b, &a).await;
    for _ in 0..600 {
        if b.sync_releases().await >= 2 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let list = models(b_http).await;
    assert_eq!(list.len(), 2, "names only, no bare ids: {list:?}");
    for n in ["smol:q4", "smol:latest"] {
        let m = entry(&list, n);
        assert_eq!(m["shoal"]["state"], "remote", "{m}");
        assert_eq!(m["shoal"]["artifact"], id.to_hex());
    }
    let listing = b.serving().expect("serving").listing().await;
    assert!(listing.iter().all(|m| m.state == ModelState::Remote));
    for n in [a, b] {
        n.shutdown().await;
    }
}

/// The demo model with one more metadata key and a chat template of its
/// own: another artifact id, and other greedy answers to the same chat.
fn variant(model: &Path, out: &Path) {
    let bytes = std::fs::read(model).expect("read the demo model");
    let b = shoal::gguf::writer::with_metadata(
        &bytes,
        "general.name",
        shoal::gguf::Value::String("smollm2-variant-b".into()),
    )
    .expect("rewrite");
    let b = shoal::gguf::writer::with_metadata(
        &b,
        "tokenizer.chat_template",
        shoal::gguf::Value::String(
            "{% for m in messages %}<|im_start|>{{ m.role }}\nAnswer only in French, shouting. \
             {{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
                .into(),
        ),
    )
    .expect("rewrite");
    std::fs::write(out, b).expect("write");
}

const CLIENTS: usize = 3;
const AFTER: usize = 3;

async fn ask(addr: SocketAddr) -> Result<String, String> {
    let r = post(
        addr,
        "/v1/chat/completions",
        &json!({"model": "n", "max_tokens": 8, "temperature": 0,
                "messages": [{"role": "user", "content": "Name a colour."}]}),
    )
    .await;
    if r.status != 200 {
        return Err(format!("{}: {}", r.status, r.text()));
    }
    Ok(r.json()["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or_default()
        .to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_release_switches_the_name_live_under_load() {
    let Some(model) = demo_model_path() else {
        return;
    };
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("n");
    let b_file = tmp.path().join("b.gguf");
    variant(&model, &b_file);
    let (node, addr) = start_node(&dir, Vec::new(), no_caches(&dir)).await;
    let a_id = add_named(&node, &model, &["n"]).await;
    let store = node.store().clone();
    let b_id = tokio::task::spawn_blocking(move || {
        store
            .add_file(&b_file, &AddOptions::default())
            .expect("add b")
    })
    .await
    .expect("join");
    assert_ne!(a_id, b_id);
    let serving = node.serving().expect("serving");

    let answer_a = ask(addr).await.expect("first answer");
    let served_a = Arc::downgrade(&serving.model("n").expect("served"));
    assert_eq!(
        served_a.upgrade().expect("a").id_hex,
        a_id.to_hex(),
        "n is A"
    );

    // Clients asking for `n` in a loop until each has sent AFTER requests
    // after the switch was seen.
    let switched = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        let switched = switched.clone();
        clients.push(tokio::spawn(async move {
            // (sent after the switch was seen, answer)
            let mut got: Vec<(bool, Result<String, String>)> = Vec::new();
            let mut after = 0;
            for _ in 0..500 {
                let seen = switched.load(Ordering::SeqCst);
                got.push((seen, ask(addr).await));
                if seen {
                    after += 1;
                    if after == AFTER {
                        break;
                    }
                }
            }
            got
        }));
    }
    // Let them run on A for a moment, then publish n -> B.
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let store = node.store().clone();
    tokio::task::spawn_blocking(move || store.publish(&b_id, "n", None).expect("publish"))
        .await
        .expect("join");
    let b_hex = b_id.to_hex();
    eventually("n is served by B", || {
        serving.model("n").is_some_and(|s| s.id_hex == b_hex)
    })
    .await;
    switched.store(true, Ordering::SeqCst);

    let mut all = Vec::new();
    for c in clients {
        all.extend(c.await.expect("client"));
    }
    let failed: Vec<&String> = all.iter().filter_map(|(_, r)| r.as_ref().err()).collect();
    assert!(failed.is_empty(), "failed requests: {failed:?}");
    let answer_b = all
        .iter()
        .rev()
        .find_map(|(_, r)| r.as_ref().ok())
        .expect("an answer")
        .clone();
    assert_ne!(answer_a, answer_b, "A and B answer differently");
    for (after, r) in &all {
        let text = r.as_ref().expect("ok");
        assert!(
            *text == answer_a || *text == answer_b,
            "an answer of neither model: {text:?}"
        );
        if *after {
            assert_eq!(*text, answer_b, "a request after the switch reached A");
        }
    }
    let on_a = all
        .iter()
        .filter(|(_, r)| matches!(r, Ok(t) if *t == answer_a))
        .count();
    assert!(on_a >= 1, "some requests ran on A before the switch");
    assert!(all.iter().filter(|(a, _)| *a).count() == CLIENTS * AFTER);
    // A drained and was unloaded: only B is served.
    eventually("A is unloaded", || served_a.upgrade().is_none()).await;
    let loaded: Vec<String> = serving.models().iter().map(|s| s.id_hex.clone()).collect();
    assert_eq!(loaded, vec![b_id.to_hex()]);
    let list = models(addr).await;
    assert_eq!(entry(&list, "n")["shoal"]["artifact"], b_id.to_hex());
    assert_eq!(entry(&list, "n")["shoal"]["state"], "loaded");
    // A is still in the store, now without a name: listed by its id.
    assert_eq!(entry(&list, &a_id.to_hex())["shoal"]["state"], "local");
    eprintln!(
        "switch under load: {} requests ({on_a} on A, {} on B), 0 failed",
        all.len(),
        all.len() - on_a
    );
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gossiped_release_switches_to_a_model_pulled_from_a_peer() {
    let Some(model) = demo_model_path() else {
        return;
    };
    let tmp = tempfile::tempdir().expect("tmp");
    let (dir_s, dir_p) = (tmp.path().join("s"), tmp.path().join("p"));
    let b_file = tmp.path().join("b.gguf");
    variant(&model, &b_file);
    // S serves `n` = A (named with its own key); P holds B, which S lacks.
    let (s, s_http) = start_node(&dir_s, Vec::new(), no_caches(&dir_s)).await;
    let a_id = add_named(&s, &model, &["n"]).await;
    let (p, _) = start_node(&dir_p, vec![p2p_addr(&s).await], no_caches(&dir_p)).await;
    let store = p.store().clone();
    let b_id = tokio::task::spawn_blocking(move || {
        store
            .add_file(&b_file, &AddOptions::default())
            .expect("add b")
    })
    .await
    .expect("join");
    connected(&s, &p).await;
    connected(&p, &s).await;
    let answer_a = ask(s_http).await.expect("answer of A");
    let serving = s.serving().expect("serving");
    assert_eq!(serving.model("n").expect("n").id_hex, a_id.to_hex());

    // A newer release of `n` (signed with the key S trusts), announced on
    // the mesh by P: S applies it, pulls B from P and switches.
    let key = s.store().publisher_key().expect("key").expect("a key");
    let signed = shoal::store::SignedRelease::sign(
        &shoal::store::release::Release {
            format: shoal::store::release::RELEASE_FORMAT,
            name: "n".into(),
            id: b_id,
            seq: 2,
            origin: None,
            created: 0,
        },
        &key,
    )
    .expect("sign");
    let b_hex = b_id.to_hex();
    let mut switched = false;
    for _ in 0..120 {
        // Gossip needs the topic mesh formed: announce until it lands.
        let _ = p.mesh().publish_release(&signed).await;
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        if serving.model("n").is_some_and(|m| m.id_hex == b_hex) {
            switched = true;
            break;
        }
    }
    assert!(switched, "n never switched to B");
    let answer_b = ask(s_http).await.expect("answer of B");
    assert_ne!(answer_a, answer_b, "answered by B");
    let list = models(s_http).await;
    assert_eq!(entry(&list, "n")["shoal"]["artifact"], b_hex);
    assert_eq!(entry(&list, "n")["shoal"]["state"], "loaded");
    for n in [s, p] {
        n.shutdown().await;
    }
}
