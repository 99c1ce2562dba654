//! The mesh tier of the KV cache between real nodes on 127.0.0.1 (mDNS
//! off): an honest neighbour's blocks are used (same greedy answer, fewer
//! tokens computed), a lying neighbour is caught by the spot check, banned
//! and its blocks dropped.

use crate::util::demo_model_path;
use crate::util::http::{eventually, post};
use crate::util::serving::{connected, model_node, p2p_addr};
use serde_json::json;
use shoal::node::Node;
use shoal::serve::ServeConfig;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::Ordering;

/// A node of the fixture ([`model_node`]) holding the demo model; `lie` makes
/// it serve wrong KV blocks. Returns it, its HTTP address and the model's name.
async fn start(dir: &Path, peers: Vec<libp2p::Multiaddr>, lie: bool) -> (Node, SocketAddr, String) {
    let cfg = ServeConfig {
        response_cache_budget: 0,
        test_lie_kv: lie,
        ..ServeConfig::with_data_dir(dir)
    };
    let m = model_node(dir, peers, cfg).await;
    (m.node, m.http, m.model.to_hex())
}

/// (text, cached_tokens)
async fn ask(addr: SocketAddr, model: &str, prompt: &str) -> (String, u64) {
    let r = post(
        addr,
        "/v1/completions",
        &json!({"model": model, "prompt": prompt,
        "max_tokens": 10, "temperature": 0}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    (
        v["choices"][0]["text"].as_str().expect("text").to_owned(),
        v["usage"]["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .expect("cached"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn neighbour_kv_is_used_and_a_liar_is_banned() {
    if demo_model_path().is_none() {
        return;
    }
    let tmp = tempfile::tempdir().expect("tmp");
    let prompt = format!(
        "{}\nIn short, the list says",
        crate::util::http::long_text(200)
    );

    // Honest pair: A computes the prompt, B takes A's blocks.
    let (a, a_http, id) = start(&tmp.path().join("a"), Vec::new(), false).await;
    let (reference, cached) = ask(a_http, &id, &prompt).await;
    assert_eq!(cached, 0);
    // A's own answer from its stored (f16) blocks: an unrelated request first
    // replaces the engine's exact f32 hot sequence.
    let _ = ask(a_http, &id, "Unrelated.").await;
    let (from_blocks, cached_a) = ask(a_http, &id, &prompt).await;
    assert!(cached_a >= 160);
    let (b, b_http, _) = start(&tmp.path().join("b"), vec![p2p_addr(&a).await], false).await;
    connected(&b, &a).await;
    let (text, cached) = ask(b_http, &id, &prompt).await;
    // Full blocks travel (tail records stay local to A).
    assert_eq!(
        cached,
        cached_a / 16 * 16,
        "the prefix came from the neighbour"
    );
    // The same blocks give the same answer whichever node holds them (and
    // the same as a cold computation: see tests/it/serving_kv.rs).
    assert_eq!(
        text, from_blocks,
        "same greedy answer with the neighbour's KV"
    );
    let kv_b = b.serving().expect("serving").kv().expect("kv").clone();
    assert!(kv_b.stats().mesh_hits.load(Ordering::Relaxed) >= 10);
    assert_eq!(
        kv_b.stats().mesh_checked.load(Ordering::Relaxed),
        1,
        "first run spot-checked"
    );
    assert_eq!(kv_b.stats().mesh_caught.load(Ordering::Relaxed), 0);
    // Fetched blocks are not served onwards: B never vouches for A's KV.
    let keys = kv_b
        .context(
            b.serving()
                .expect("s")
                .model(&id)
                .expect("m")
                .engine
                .model(),
        )
        .keys(
            &b.serving()
                .expect("s")
                .model(&id)
                .expect("m")
                .engine
                .model()
                .tokenizer()
                .encode(&prompt, false, true),
        );
    assert!(kv_b.is_foreign(&keys[0]));

    // Lying pair: L serves perturbed, validly signed KV; C catches it.
    let (l, l_http, _) = start(&tmp.path().join("l"), Vec::new(), true).await;
    let (l_text, _) = ask(l_http, &id, &prompt).await;
    assert_eq!(l_text, reference);
    let (c, c_http, _) = start(&tmp.path().join("c"), vec![p2p_addr(&l).await], false).await;
    connected(&c, &l).await;
    let (text, cached) = ask(c_http, &id, &prompt).await;
    assert_eq!(cached, 0, "no KV from a liar is used");
    assert_eq!(text, reference, "the answer is recomputed correctly");
    let kv_c = c.serving().expect("serving").kv().expect("kv").clone();
    assert_eq!(kv_c.stats().mesh_caught.load(Ordering::Relaxed), 1);
    assert_eq!(kv_c.stats().mesh_hits.load(Ordering::Relaxed), 0);
    assert!(!kv_c.ram().lock().contains(&keys[0]) || !kv_c.is_foreign(&keys[0]));
    let liar = l.mesh().peer_id();
    eventually("the liar is banned and disconnected", || {
        let m = kv_c.remote().expect("mesh tier");
        m.banned.lock().contains(&liar)
    })
    .await;
    for _ in 0..6000 {
        if !c.mesh().connected().await.expect("peers").contains(&liar) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert!(
        !c.mesh().connected().await.expect("peers").contains(&liar),
        "banned on the mesh"
    );
    // A second request does not take anything from the liar again.
    let other = format!("{}\nTo conclude,", crate::util::http::long_text(200));
    let _ = ask(c_http, &id, &other).await;
    assert_eq!(kv_c.stats().mesh_caught.load(Ordering::Relaxed), 1);
    assert_eq!(kv_c.stats().mesh_hits.load(Ordering::Relaxed), 0);
    for n in [a, b, l, c] {
        n.shutdown().await;
    }
}

/// One have round finds the member with the longest run: C, connected to B
/// (which computed only the first half of the prompt) and A (which computed
/// all of it), takes A's whole run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_longest_run_is_found_in_one_round() {
    if demo_model_path().is_none() {
        return;
    }
    let tmp = tempfile::tempdir().expect("tmp");
    let text = crate::util::http::long_text(200);
    let prompt = format!("{text}\nIn short, the list says");
    let half = format!("{}\nSo", crate::util::http::long_text(100));
    let (a, a_http, id) = start(&tmp.path().join("a"), Vec::new(), false).await;
    let (b, b_http, _) = start(&tmp.path().join("b"), Vec::new(), false).await;
    let _ = ask(a_http, &id, &prompt).await;
    let _ = ask(b_http, &id, &half).await;
    // A's own follow-up from its blocks, for the full-run length.
    let _ = ask(a_http, &id, "Unrelated.").await;
    let (_, cached_a) = ask(a_http, &id, &prompt).await;
    let full = cached_a / 16 * 16;
    // B holds a shorter run of the prompt's blocks than A.
    let sb = b.serving().expect("serving");
    let model = sb.model(&id).expect("model").engine.model().clone();
    let kv_b = sb.kv().expect("kv").clone();
    let keys = kv_b
        .context(&model)
        .keys(&model.tokenizer().encode(&prompt, false, true));
    assert!(kv_b.holds_own(&keys[0]) && !kv_b.holds_own(&keys[full as usize / 16 - 1]));
    let peers = vec![p2p_addr(&b).await, p2p_addr(&a).await];
    let (c, c_http, _) = start(&tmp.path().join("c"), peers, false).await;
    connected(&c, &b).await;
    connected(&c, &a).await;
    let (_, cached) = ask(c_http, &id, &prompt).await;
    assert_eq!(cached, full, "the whole run, from A");
    let kv_c = c.serving().expect("serving").kv().expect("kv").clone();
    assert_eq!(kv_c.stats().mesh_hits.load(Ordering::Relaxed), full / 16);
    for n in [a, b, c] {
        n.shutdown().await;
    }
}
