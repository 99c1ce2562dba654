//! Routing across the mesh between real daemons on 127.0.0.1 (mDNS off,
//! static peers): a node without the model forwards to the holder over
//! `/shoal/serve/1` (same answer, streamed or not, the holder named in the
//! headers) and pulls the model in the background; `X-Shoal-Route: local`
//! keeps a request on the node; a forwarded request keeps its API key scope
//! (a holder with other keys refuses it and the node serves it itself); a
//! holder that disappears mid-answer gives the client an error event, not a
//! hang.

use crate::util::demo_model_path;
use crate::util::http::{eventually, http, sse_data};
use serde_json::{Value, json};
use shoal::node::Node;
use shoal::serve::ServeConfig;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

struct Started {
    node: Node,
    http: SocketAddr,
}

/// A daemon in `dir` with routing on (`pull` its pull policy) and, when
/// `keys` is given, an API keys file with those keys.
async fn start(
    dir: &Path,
    peers: Vec<libp2p::Multiaddr>,
    keys: Option<&[&str]>,
    pull: shoal::route::PullPolicy,
) -> Started {
    start_with(dir, peers, keys, pull, |_| {}).await
}

/// [`start`] with `configure` adjusting the options last.
async fn start_with(
    dir: &Path,
    peers: Vec<libp2p::Multiaddr>,
    keys: Option<&[&str]>,
    pull: shoal::route::PullPolicy,
    configure: impl FnOnce(&mut shoal::daemon::DaemonOptions),
) -> Started {
    std::fs::create_dir_all(dir).expect("dir");
    let mut opts = shoal::daemon::DaemonOptions::loopback(dir, peers);
    opts.serve = ServeConfig {
        response_cache_budget: 0,
        ..ServeConfig::with_data_dir(dir)
    };
    opts.route.pull = pull;
    if let Some(keys) = keys {
        let p = dir.join("api-keys.txt");
        std::fs::write(&p, keys.join("\n")).expect("keys");
        opts.api.keys_file = Some(p);
    }
    configure(&mut opts);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let daemon = shoal::daemon::Daemon::start(opts, listener)
        .await
        .expect("daemon");
    let (node, http) = (daemon.node().clone(), daemon.addr());
    tokio::spawn(daemon.run_until(std::future::pending()));
    Started { node, http }
}

async fn add_model(node: &Node) -> String {
    let path = demo_model_path().expect("model");
    let store = node.store().clone();
    let id = tokio::task::spawn_blocking(move || {
        store.add_file(&path, &shoal::store::AddOptions::default())
    })
    .await
    .expect("join")
    .expect("add");
    id.to_hex()
}

/// The holder: a daemon in `dir` (routing on, `route.pull = never`, `keys`)
/// with the demo model in its store; its model id and mesh address.
async fn holder(dir: &Path, keys: Option<&[&str]>) -> (Started, String, libp2p::Multiaddr) {
    let a = start(dir, Vec::new(), keys, shoal::route::PullPolicy::Never).await;
    let model = add_model(&a.node).await;
    let addr = crate::util::serving::p2p_addr(&a.node).await;
    (a, model, addr)
}

/// `shoal_route_requests_total{outcome, reason}` of `node` is `n`.
fn assert_counted(node: &Node, outcome: &str, reason: &str, n: u64) {
    let metrics = node.metrics().render();
    let line =
        format!("shoal_route_requests_total{{outcome=\"{outcome}\",reason=\"{reason}\"}} {n}");
    assert!(
        metrics.lines().any(|l| l == line),
        "no `{line}` in:\n{metrics}"
    );
}

/// Waits until `node` holds a fresh card of `peer` listing `model`.
async fn card_of(node: &Node, peer: &Node, model: &str) {
    let want = peer.mesh().peer_id().to_string();
    let routing = node.routing().expect("routing on");
    eventually("the holder's serving card arrives", || {
        routing
            .snapshot()
            .cards
            .iter()
            .any(|c| c.peer == want && c.models.iter().any(|m| m.id == model))
    })
    .await;
}

async fn ask(addr: SocketAddr, body: &Value, extra: &[(&str, &str)]) -> crate::util::http::Resp {
    http(
        addr,
        "POST",
        "/v1/chat/completions",
        extra,
        body.to_string().as_bytes(),
    )
    .await
}

fn chat(model: &str, stream: bool) -> Value {
    json!({"model": model, "stream": stream, "temperature": 0, "max_tokens": 12,
        "messages": [{"role": "user", "content": "Name three colours."}]})
}

fn streamed_text(r: &crate::util::http::Resp) -> String {
    sse_data(&r.text())
        .iter()
        .filter(|d| d.as_str() != "[DONE]")
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .filter_map(|v| {
            v["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_owned)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_without_the_model_forwards_to_the_holder_and_pulls_it_meanwhile() {
    if demo_model_path().is_none() {
        return;
    }
    let tmp = tempfile::tempdir().expect("tmp");
    let (a, model, a_addr) = holder(&tmp.path().join("a"), None).await;
    let b = start(
        &tmp.path().join("b"),
        vec![a_addr],
        None,
        shoal::route::PullPolicy::FirstUse,
    )
    .await;
    let (a_id, b_id) = (
        a.node.mesh().peer_id().to_string().to_ascii_lowercase(),
        b.node.mesh().peer_id().to_string().to_ascii_lowercase(),
    );
    // The holder's own answer.
    let direct = ask(a.http, &chat(&model, false), &[]).await;
    assert_eq!(direct.status, 200, "{}", direct.text());
    let want = direct.json()["choices"][0]["message"]["content"]
        .as_str()
        .expect("content")
        .to_owned();
    card_of(&b.node, &a.node, &model).await;

    // Asked of B, answered by A: same text, the holder named.
    let r = ask(b.http, &chat(&model, false), &[]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["choices"][0]["message"]["content"], want.as_str());
    assert_eq!(
        r.header("x-shoal-node").map(str::to_ascii_lowercase),
        Some(a_id.clone())
    );
    assert_eq!(
        r.header("x-shoal-forwarded-by")
            .map(str::to_ascii_lowercase),
        Some(b_id.clone())
    );
    // Streamed: the same text, ending in [DONE].
    let r = ask(b.http, &chat(&model, true), &[]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        sse_data(&r.text()).last().map(String::as_str),
        Some("[DONE]")
    );
    assert_eq!(streamed_text(&r), want);
    assert_eq!(
        r.header("x-shoal-node").map(str::to_ascii_lowercase),
        Some(a_id.clone())
    );

    // The Ollama routes are routed too (NDJSON streamed back).
    let q = json!({"model": model, "stream": true, "options": {"temperature": 0, "num_predict": 12},
        "messages": [{"role": "user", "content": "Name three colours."}]});
    let r = http(b.http, "POST", "/api/chat", &[], q.to_string().as_bytes()).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.header("x-shoal-served-by").map(str::to_ascii_lowercase),
        Some(a_id.clone())
    );
    let lines: Vec<Value> = r
        .text()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).expect("NDJSON"))
        .collect();
    assert_eq!(
        lines.last().map(|l| l["done"].clone()),
        Some(json!(true)),
        "{lines:?}"
    );
    let text: String = lines
        .iter()
        .filter_map(|l| l["message"]["content"].as_str())
        .collect();
    // (Ollama's defaults, e.g. its repeat penalty, give another text.)
    assert!(!text.is_empty(), "{lines:?}");

    // B pulled the model in the background (route.pull = first-use) ...
    let id: shoal::store::ArtifactId = model.parse().expect("id");
    let store = b.node.store().clone();
    eventually("B holds the model after its background pull", || {
        matches!(
            store.status(&id),
            Ok(Some(shoal::store::ArtifactStatus::Active))
        )
    })
    .await;
    // ... and `X-Shoal-Route: local` keeps a request on B.
    let r = ask(b.http, &chat(&model, false), &[("x-shoal-route", "local")]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["choices"][0]["message"]["content"], want.as_str());
    assert_eq!(
        r.header("x-shoal-node").map(str::to_ascii_lowercase),
        Some(b_id.clone())
    );
    assert_eq!(r.header("x-shoal-forwarded-by"), None);

    // The decisions are counted and listed.
    let routing = b.node.routing().expect("routing");
    let snap = routing.snapshot();
    assert!(
        snap.recent
            .iter()
            .filter(|e| e.to.eq_ignore_ascii_case(&a_id))
            .count()
            >= 2,
        "{:?}",
        snap.recent
    );
    assert_counted(&b.node, "forwarded", "only_holder", 3);
    assert_counted(&a.node, "served_for_peer", "best", 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forwarded_request_keeps_its_key_scope() {
    if demo_model_path().is_none() {
        return;
    }
    let tmp = tempfile::tempdir().expect("tmp");
    let never = shoal::route::PullPolicy::Never;
    // A accepts key k1 only; B accepts k1 and k2.
    let (a, model, a_addr) = holder(&tmp.path().join("a"), Some(&["sk-class-one"])).await;
    let b = start(
        &tmp.path().join("b"),
        vec![a_addr],
        Some(&["sk-class-one", "sk-class-two"]),
        never,
    )
    .await;
    let a_id = a.node.mesh().peer_id().to_string().to_ascii_lowercase();
    let b_id = b.node.mesh().peer_id().to_string().to_ascii_lowercase();
    card_of(&b.node, &a.node, &model).await;
    // k1 is valid on both: A serves it.
    let r = ask(
        b.http,
        &chat(&model, false),
        &[("authorization", "Bearer sk-class-one")],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.header("x-shoal-node").map(str::to_ascii_lowercase),
        Some(a_id.clone())
    );
    // k2 is valid on B only: A refuses the forwarded scope, B serves it
    // itself (pulling the model, since it has none).
    let r = ask(
        b.http,
        &chat(&model, false),
        &[("authorization", "Bearer sk-class-two")],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.header("x-shoal-node").map(str::to_ascii_lowercase),
        Some(b_id)
    );
    assert_counted(&b.node, "retried", "refused", 1);
    // A refused key scope is the request's fault, not the peer's: A is
    // not paused for the requests it accepts.
    assert!(
        b.node
            .routing()
            .expect("routing")
            .snapshot()
            .paused
            .is_empty(),
        "a key refusal does not pause the peer"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_gone_mid_answer_ends_the_stream_with_an_error_event() {
    if demo_model_path().is_none() {
        return;
    }
    let tmp = tempfile::tempdir().expect("tmp");
    let never = shoal::route::PullPolicy::Never;
    let (a, model, a_addr) = holder(&tmp.path().join("a"), None).await;
    let b = start(&tmp.path().join("b"), vec![a_addr], None, never).await;
    card_of(&b.node, &a.node, &model).await;
    let body = json!({"model": model, "stream": true, "max_tokens": 400, "temperature": 0,
        "messages": [{"role": "user", "content": "Write a long story about a lighthouse."}]});
    let (s, got) =
        crate::util::http::open_until(b.http, "/v1/chat/completions", &body, "\"content\"").await;
    // The holder's mesh goes away after the first token.
    a.node.mesh().shutdown().await;
    let rest = tokio::time::timeout(
        Duration::from_secs(60),
        crate::util::http::read_rest(s, got),
    )
    .await
    .expect("the client is not left hanging");
    let data = sse_data(&rest);
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"), "{rest}");
    assert!(
        data.iter().any(|d| d.contains("serving_node_failed")),
        "an error event before [DONE]: {rest}"
    );
    assert_counted(&b.node, "failed", "died", 1);
}

/// A client that goes away mid-answer cancels the generation on the node
/// that serves it for it (the forwarding node closes the stream).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_gone_mid_answer_cancels_on_the_serving_node() {
    if demo_model_path().is_none() {
        return;
    }
    let tmp = tempfile::tempdir().expect("tmp");
    let (a, model, a_addr) = holder(&tmp.path().join("a"), None).await;
    let never = shoal::route::PullPolicy::Never;
    let b = start(&tmp.path().join("b"), vec![a_addr], None, never).await;
    card_of(&b.node, &a.node, &model).await;
    let body = json!({"model": model, "stream": true, "max_tokens": 2000, "temperature": 0,
        "messages": [{"role": "user", "content": "Write a very long story about a lighthouse."}]});
    let (s, _) =
        crate::util::http::open_until(b.http, "/v1/chat/completions", &body, "\"content\"").await;
    let engine = a
        .node
        .serving()
        .expect("serving")
        .models()
        .into_iter()
        .next()
        .expect("a loaded model")
        .engine
        .clone();
    assert_eq!(
        engine
            .stats()
            .cancelled
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
    drop(s);
    eventually("the holder cancels the generation", || {
        engine
            .stats()
            .cancelled
            .load(std::sync::atomic::Ordering::Relaxed)
            == 1
            && engine.load().running == 0
    })
    .await;
}

/// A peer that advertises the model loaded and the prompt warm (a lie) and
/// then never answers: the node gives up on it after `route.stall_timeout`,
/// pauses it, and the holder serves the request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_stalls_before_the_first_token_is_skipped() {
    use shoal::route::card::{CardModel, ServingCard};
    if demo_model_path().is_none() {
        return;
    }
    let tmp = tempfile::tempdir().expect("tmp");
    let never = shoal::route::PullPolicy::Never;
    let (a, model, a_addr) = holder(&tmp.path().join("a"), None).await;
    // C: a bare node (no serving layer) that takes forwarded streams and
    // holds them silent.
    let c = shoal::node::Node::start(shoal::node::NodeConfig {
        data_dir: tmp.path().join("c"),
        store: shoal::store::StoreOptions::default(),
        mesh: shoal::mesh::MeshConfig {
            listen: vec![shoal::mesh::loopback_listen()],
            peers: vec![a_addr.clone()],
            mdns: false,
            ..shoal::mesh::MeshConfig::default()
        },
    })
    .await
    .expect("node c");
    let mut incoming = c
        .mesh()
        .stream_control()
        .accept(shoal::route::forward::SERVE_PROTOCOL)
        .expect("accept");
    let held = std::sync::Arc::new(parking_lot::Mutex::new(Vec::new()));
    let h = held.clone();
    tokio::spawn(async move {
        use futures::StreamExt;
        while let Some((_, s)) = incoming.next().await {
            h.lock().push(s);
        }
    });
    let c_addr = crate::util::serving::p2p_addr(&c).await;
    let b = start_with(
        &tmp.path().join("b"),
        vec![a_addr, c_addr],
        None,
        never,
        |o| o.route.stall_timeout = Duration::from_secs(2),
    )
    .await;
    let body = json!({"model": model, "temperature": 0, "max_tokens": 8,
        "messages": [{"role": "system", "content": crate::util::http::long_text(120)},
                     {"role": "user", "content": "Say hi."}]});
    let heads = shoal::route::heads::of_request("/v1/chat/completions", &model, &body);
    assert!(!heads.is_empty(), "the prompt is long enough to have heads");
    let id = <[u8; 32]>::try_from(hex::decode(&model).expect("hex")).expect("id");
    let liar = c.mesh().clone();
    let card_task = tokio::spawn(async move {
        for seq in 0.. {
            let card = ServingCard {
                seq,
                unix_ms: 0,
                needs_key: false,
                models: vec![CardModel {
                    name: "liar".into(),
                    id,
                    loaded: true,
                    parallel: 16,
                    queue_depth: 16,
                    running: 0,
                    waiting: 0,
                    prompt_tps: 1e6,
                    decode_tps: 1e3,
                    warm: heads.iter().map(|h| h.1).collect(),
                }],
            };
            let _ = liar.publish_card(shoal::route::card::encode(&card)).await;
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    });
    card_of(&b.node, &a.node, &model).await;
    card_of(&b.node, &c, &model).await;
    let started = std::time::Instant::now();
    let r = ask(b.http, &body, &[]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let a_id = a.node.mesh().peer_id().to_string().to_ascii_lowercase();
    assert_eq!(
        r.header("x-shoal-node").map(str::to_ascii_lowercase),
        Some(a_id)
    );
    assert!(
        !held.lock().is_empty(),
        "the liar was asked first (its warm prefix)"
    );
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "after the stall timeout"
    );
    assert_counted(&b.node, "retried", "stalled", 1);
    let snap = b.node.routing().expect("routing").snapshot();
    assert!(
        snap.paused
            .iter()
            .any(|(p, _)| *p == c.mesh().peer_id().to_string()),
        "{:?}",
        snap.paused
    );
    // Paused: the next request goes straight to the holder.
    let started = std::time::Instant::now();
    let r = ask(b.http, &body, &[]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(held.lock().len(), 1, "the paused liar is not asked again");
    assert!(started.elapsed() < Duration::from_secs(2));
    card_task.abort();
}
