//! The prefix KV cache over real HTTP with the demo model: cached_tokens,
//! the same greedy answer from RAM and from disk after a restart, a corrupt
//! disk block dropped and recomputed, tail records reused token by token
//! (and dropped when corrupt), budgets never exceeded.

use crate::util::demo_model_path;
use crate::util::http::*;
use crate::util::serving::*;
use serde_json::{Value, json};
use shoal::kvcache::KvCacheConfig;
use shoal::serve::ServeConfig;
use std::sync::atomic::Ordering;

const BLOCK: usize = 16;

fn completion(prompt: &str) -> Value {
    json!({"model": NAME, "prompt": prompt, "max_tokens": 12, "temperature": 0})
}

/// (text, prompt_tokens, cached_tokens)
async fn ask(srv: &TestServer, prompt: &str) -> (String, usize, usize) {
    let r = post(srv.addr, "/v1/completions", &completion(prompt)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    (
        v["choices"][0]["text"].as_str().expect("text").to_owned(),
        v["usage"]["prompt_tokens"].as_u64().expect("pt") as usize,
        v["usage"]["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .expect("cached") as usize,
    )
}

fn with_disk(dir: &std::path::Path) -> ServeConfig {
    let mut c = ServeConfig::with_data_dir(dir);
    c.response_cache_budget = 0;
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ram_prefix_reuse_gives_the_same_answer() {
    let Some(srv) = TestServer::start(ram_only()).await else {
        return;
    };
    let prompt = format!("{}\nSummarize the list above in one word:", long_text(300));
    let (cold, pt, cached) = ask(&srv, &prompt).await;
    assert_eq!(cached, 0, "nothing cached yet");
    assert!(pt > 3 * BLOCK);
    let (warm, pt2, cached) = ask(&srv, &prompt).await;
    assert_eq!(pt2, pt);
    assert_eq!(
        cached,
        pt - 1,
        "the whole prompt but its last token is reused"
    );
    assert_eq!(warm, cold, "same greedy answer from the RAM prefix");
    let kv = srv.serving.kv().expect("kv").clone();
    let blocks_before = kv.stats().ram_hits.load(Ordering::Relaxed);
    // A follow-up sharing only the beginning reuses that beginning.
    let follow = format!("{}\nWhich word comes first?", long_text(300));
    let (_, fpt, fcached) = ask(&srv, &follow).await;
    assert!(
        fcached >= 3 * BLOCK && fcached < fpt,
        "shared prefix reused: {fcached}/{fpt}"
    );
    // Another prompt in between replaces the hot sequence: the RAM blocks serve.
    let _ = ask(&srv, "Something else entirely.").await;
    let (again, _, cached) = ask(&srv, &prompt).await;
    assert_eq!(
        cached,
        pt - 1,
        "every full block from the RAM tier, and the tail record"
    );
    assert_eq!(again, cold, "same greedy answer from the RAM blocks");
    assert!(kv.stats().ram_hits.load(Ordering::Relaxed) >= blocks_before + 4);
    // A chat conversation: the second turn reuses the first.
    let turn1 = json!({"model": NAME, "max_tokens": 8, "temperature": 0, "messages": [
        {"role": "system", "content": long_text(150)},
        {"role": "user", "content": "Pick one word from the text."}]});
    let r = post(srv.addr, "/v1/chat/completions", &turn1).await.json();
    let answer = r["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or("")
        .to_owned();
    let turn2 = json!({"model": NAME, "max_tokens": 8, "temperature": 0, "messages": [
        {"role": "system", "content": long_text(150)},
        {"role": "user", "content": "Pick one word from the text."},
        {"role": "assistant", "content": answer},
        {"role": "user", "content": "Why?"}]});
    let r = post(srv.addr, "/v1/chat/completions", &turn2).await.json();
    assert!(
        r["usage"]["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap_or(0)
            >= 2 * BLOCK as u64
    );
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_tier_survives_restart_and_drops_corrupt_blocks() {
    let dir = tempfile::tempdir().expect("tmp");
    let prompt = format!("{}\nThe most frequent word above is", long_text(260));
    // Cold run, without any cache: the reference answer.
    let mut nocache = ram_only();
    nocache.kv = None;
    let Some(srv) = TestServer::start(nocache).await else {
        return;
    };
    let (reference, pt, cached) = ask(&srv, &prompt).await;
    assert_eq!(cached, 0);
    srv.stop().await;

    let srv = restart(dir.path()).await;
    let (cold, _, cached) = ask(&srv, &prompt).await;
    assert_eq!(cached, 0);
    assert_eq!(cold, reference);
    srv.stop().await; // drains and flushes the disk writes

    // Restart: RAM is empty, the disk tier serves the prefix.
    let srv = restart(dir.path()).await;
    let kv = srv.serving.kv().expect("kv").clone();
    assert_eq!(kv.ram().lock().len(), 0);
    let (after, _, cached) = ask(&srv, &prompt).await;
    assert_eq!(cached, pt - 1, "full blocks and the tail record from disk");
    assert!(kv.stats().disk_hits.load(Ordering::Relaxed) >= 4);
    assert_eq!(
        after, reference,
        "same greedy answer from disk after a restart"
    );
    let model = model_of(&srv);
    let tokens = model.tokenizer().encode(&prompt, false, true);
    assert_eq!(tokens.len(), pt);
    let keys = kv.context(&model).keys(&tokens);
    let first = kv.disk().expect("disk").path_of(&keys[0]);
    srv.stop().await;
    drop(kv);

    // Corrupt the first block on disk: it is dropped, the prefix is
    // recomputed (no cached tokens) and the answer stays the same.
    let bytes = corrupt(&first);
    let srv = restart(dir.path()).await;
    let kv = srv.serving.kv().expect("kv").clone();
    let (again, _, cached) = ask(&srv, &prompt).await;
    assert_eq!(cached, 0, "a corrupt first block is never used");
    assert_eq!(kv.stats().corrupt_dropped.load(Ordering::Relaxed), 1);
    assert_eq!(again, reference);
    kv.flush();
    // Recomputed and rewritten intact.
    let fresh = std::fs::read(&first).expect("rewritten block");
    assert_ne!(fresh, bytes);
    assert!(shoal::kvcache::disk::decode(&keys[0], &fresh).is_ok());
    srv.stop().await;
}

/// Flips a byte near the end of a file; returns the corrupted bytes.
fn corrupt(path: &std::path::Path) -> Vec<u8> {
    let mut bytes = std::fs::read(path).expect("block file");
    let n = bytes.len();
    bytes[n - 100] ^= 0x5a;
    std::fs::write(path, &bytes).expect("write");
    bytes
}

/// A server on the data dir `dir` (a restart when one ran there before).
async fn restart(dir: &std::path::Path) -> TestServer {
    TestServer::start(with_disk(dir)).await.expect("server")
}

/// The served model.
fn model_of(srv: &TestServer) -> std::sync::Arc<shoal::inference::Model> {
    srv.serving
        .model(NAME)
        .expect("model")
        .engine
        .model()
        .clone()
}

/// Tokens two prompts share from the start.
fn common_prefix(srv: &TestServer, a: &str, b: &str) -> (usize, Vec<u32>) {
    let model = model_of(srv);
    let ta = model.tokenizer().encode(a, false, true);
    let tb = model.tokenizer().encode(b, false, true);
    let n = ta.iter().zip(&tb).take_while(|(x, y)| x == y).count();
    (n, tb)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tail_records_reuse_the_partial_last_block() {
    let dir = tempfile::tempdir().expect("tmp");
    let base = long_text(200);
    let q = |s: &str| format!("{base}\nQuestion: {s}");
    let (first, second, third, fourth) = (
        q("what is listed?"),
        q("how many words are there?"),
        q("which word is first?"),
        q("is any word repeated?"),
    );
    // Reference answers without any cache.
    let mut nocache = ram_only();
    nocache.kv = None;
    let Some(srv) = TestServer::start(nocache).await else {
        return;
    };
    let mut reference = Vec::new();
    for p in [&second, &third, &fourth] {
        reference.push(ask(&srv, p).await.0);
    }
    srv.stop().await;

    let srv = restart(dir.path()).await;
    let (shared, _) = common_prefix(&srv, &first, &second);
    assert!(shared % BLOCK != 0, "the shared prefix ends inside a block");
    let _ = ask(&srv, &first).await;
    // Replace the hot sequence: blocks and the tail record serve.
    let _ = ask(&srv, "Something else entirely.").await;
    let (a, _, cached) = ask(&srv, &second).await;
    assert_eq!(cached, shared, "full blocks and the tail's shared tokens");
    assert_eq!(a, reference[0], "same greedy answer with the tail record");
    srv.stop().await;

    // After a restart the tail record comes from disk.
    let srv = restart(dir.path()).await;
    let (shared, tokens) = common_prefix(&srv, &second, &third);
    let (b, _, cached) = ask(&srv, &third).await;
    assert_eq!(cached, shared);
    assert_eq!(b, reference[1], "same greedy answer from the disk tail");
    let kv = srv.serving.kv().expect("kv").clone();
    let model = model_of(&srv);
    let ctx = kv.context(&model);
    let keys = ctx.keys(&tokens);
    let f = shared / BLOCK;
    let tail = kv
        .disk()
        .expect("disk")
        .path_of(&ctx.tail_key(f.checked_sub(1).map(|i| &keys[i])));
    srv.stop().await;
    drop(kv);

    // A corrupt tail record is dropped and never used: only full blocks.
    corrupt(&tail);
    let srv = restart(dir.path()).await;
    let kv = srv.serving.kv().expect("kv").clone();
    let (shared, _) = common_prefix(&srv, &third, &fourth);
    let (c, _, cached) = ask(&srv, &fourth).await;
    assert_eq!(cached, shared / BLOCK * BLOCK, "full blocks only");
    assert_eq!(kv.stats().corrupt_dropped.load(Ordering::Relaxed), 1);
    assert_eq!(c, reference[2]);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn budgets_are_never_exceeded() {
    let dir = tempfile::tempdir().expect("tmp");
    // One block of the demo model in f16: 64 tokens × 30 layers × 2 × 3 heads × 64 × 2 bytes.
    let block = (BLOCK * 30 * 2 * 3 * 64 * 2) as u64;
    let mut cfg = with_disk(dir.path());
    cfg.kv = Some(KvCacheConfig {
        ram_budget: 3 * block + block / 2,
        disk_budget: 5 * block + block / 2,
        disk_dir: Some(dir.path().join("kv")),
        ..KvCacheConfig::default()
    });
    let Some(srv) = TestServer::start(cfg).await else {
        return;
    };
    let kv = srv.serving.kv().expect("kv").clone();
    let disk_dir = dir.path().join("kv");
    let on_disk = || -> u64 {
        std::fs::read_dir(&disk_dir)
            .expect("dir")
            .filter_map(Result::ok)
            .filter_map(|e| e.metadata().ok())
            .map(|m| m.len())
            .sum()
    };
    for i in 0..4 {
        let prompt = format!("Document {i}. {}\nTitle:", long_text(200 + 10 * i));
        let _ = ask(&srv, &prompt).await;
        kv.flush();
        let ram = kv.ram().lock().used();
        let disk = kv.disk().expect("disk").used();
        assert!(ram <= kv.config().ram_budget, "ram {ram}");
        assert!(disk <= kv.config().disk_budget, "disk {disk}");
        assert!(on_disk() <= kv.config().disk_budget, "files {}", on_disk());
        assert!(!kv.ram().lock().is_empty(), "the tier is in use");
    }
    assert!(kv.disk().expect("disk").len() >= 4);
    srv.stop().await;
}

/// With the disk tier's hourly write budget spent after two blocks, the
/// other blocks stay in RAM only: the same greedy answer cold, warm (all
/// from RAM) and after a restart (the two blocks on disk read back and
/// checked, the rest recomputed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spent_disk_write_budget_keeps_blocks_in_ram() {
    let dir = tempfile::tempdir().expect("tmp");
    let prompt = format!("{}\nThe word used most above is", long_text(240));
    let mut nocache = ram_only();
    nocache.kv = None;
    let Some(srv) = TestServer::start(nocache).await else {
        return;
    };
    let (reference, pt, _) = ask(&srv, &prompt).await;
    srv.stop().await;
    assert!(pt > 5 * BLOCK);

    // One block of the demo model in f16, plus its headers (< 1 KiB).
    let block = (BLOCK * 30 * 2 * 3 * 64 * 2) as u64;
    let budgeted = || {
        let mut cfg = with_disk(dir.path());
        cfg.kv = Some(KvCacheConfig {
            disk_write_budget_per_hour: 2 * (block + 1024),
            disk_dir: Some(dir.path().join("kv")),
            ..KvCacheConfig::default()
        });
        cfg
    };
    let srv = TestServer::start(budgeted()).await.expect("server");
    let kv = srv.serving.kv().expect("kv").clone();
    let (cold, _, cached) = ask(&srv, &prompt).await;
    assert_eq!((cold.as_str(), cached), (reference.as_str(), 0));
    kv.flush();
    let model = model_of(&srv);
    let keys = kv
        .context(&model)
        .keys(&model.tokenizer().encode(&prompt, false, true));
    let disk = kv.disk().expect("disk");
    let on_disk: Vec<bool> = keys.iter().map(|k| disk.contains(k)).collect();
    assert_eq!(&on_disk[..2], &[true, true], "the first two blocks fit");
    assert!(
        on_disk[2..].iter().all(|x| !x),
        "no block past the budget: {on_disk:?}"
    );
    assert!(disk.used() <= disk.write_budget().limit());
    // Warm: every block from RAM.
    let (warm, _, cached) = ask(&srv, &prompt).await;
    assert_eq!((warm.as_str(), cached), (reference.as_str(), pt - 1));
    srv.stop().await;
    drop(kv);

    // Restart: the two blocks on disk, checked, then the rest recomputed.
    let srv = TestServer::start(budgeted()).await.expect("server");
    let kv = srv.serving.kv().expect("kv").clone();
    let (after, _, cached) = ask(&srv, &prompt).await;
    assert_eq!(cached, 2 * BLOCK, "two blocks from disk");
    assert_eq!(kv.stats().disk_hits.load(Ordering::Relaxed), 2);
    assert_eq!(kv.stats().corrupt_dropped.load(Ordering::Relaxed), 0);
    assert_eq!(after, reference);
    srv.stop().await;
}

/// 20 chats: four system prompts, five messages each (the fifth a second
/// turn after the first answer, given by `first_answers`, one per system).
fn chats(first_answers: &[String]) -> Vec<Value> {
    let systems = [
        "You are a patient history teacher. Answer in one short sentence and name the key date or person.",
        "You are a careful geography tutor for twelve-year-old pupils. Use simple words, write one sentence only, and always name the country you are talking about.",
        "You are a science teacher. Explain things to a beginner in at most two sentences and give one example from everyday life that a child would know.",
        "You are the friendly assistant of a small bakery in Lyon. Be brief and warm, answer in English, and suggest one of our products (croissants, baguettes, fruit tarts, brioche) when it fits the question.",
    ];
    let questions = [
        [
            "What is the name of the national anthem of France?",
            "Who was the first president of the United States?",
            "When did the Berlin Wall fall?",
            "Who painted the Mona Lisa?",
        ],
        [
            "What is the longest river in Africa?",
            "Which city is the capital of Australia?",
            "Where is Mount Kilimanjaro?",
            "Which ocean lies between Europe and America?",
        ],
        [
            "Why is the sky blue?",
            "What makes ice float on water?",
            "How do plants make their food?",
            "Why do we see lightning before we hear thunder?",
        ],
        [
            "What should I bring to a birthday breakfast?",
            "Do you have anything without sugar?",
            "How long does a baguette stay fresh?",
            "What goes well with coffee in the afternoon?",
        ],
    ];
    let mut out = Vec::new();
    for (s, (system, qs)) in systems.iter().zip(questions).enumerate() {
        for q in qs {
            out.push(json!([
                {"role": "system", "content": system},
                {"role": "user", "content": q}]));
        }
        if let Some(a) = first_answers.get(s) {
            out.push(json!([
                {"role": "system", "content": system},
                {"role": "user", "content": qs[0]},
                {"role": "assistant", "content": a},
                {"role": "user", "content": "Can you say that again in other words?"}]));
        }
    }
    out
}

/// (text, completion_tokens, cached_tokens) of a greedy chat completion.
async fn chat(addr: std::net::SocketAddr, model: &str, messages: &Value) -> (String, u64, u64) {
    let body = json!({"model": model, "messages": messages, "max_tokens": 20, "temperature": 0});
    let r = post(addr, "/v1/chat/completions", &body).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    (
        v["choices"][0]["message"]["content"]
            .as_str()
            .expect("content")
            .to_owned(),
        v["usage"]["completion_tokens"].as_u64().expect("ct"),
        v["usage"]["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .expect("cached"),
    )
}

/// The 20 chats' greedy answers with no cache at all: the 4 first answers
/// make the second turns.
async fn cold_answers(addr: std::net::SocketAddr, model: &str) -> Vec<(String, u64)> {
    let mut firsts = Vec::new();
    for m in chats(&[]).iter().step_by(4) {
        firsts.push(chat(addr, model, m).await.0);
    }
    let mut out = Vec::new();
    for m in chats(&firsts) {
        let (t, n, cached) = chat(addr, model, &m).await;
        assert_eq!(cached, 0, "the cold run uses no cache");
        out.push((t, n));
    }
    out
}

/// Asks every chat and checks the answer equals the cold one; returns the
/// cached tokens in all.
async fn same_answers(
    addr: std::net::SocketAddr,
    model: &str,
    cold: &[(String, u64)],
    tier: &str,
) -> u64 {
    let firsts: Vec<String> = cold.iter().step_by(5).map(|c| c.0.clone()).collect();
    let mut cached_sum = 0;
    for (i, (m, want)) in chats(&firsts).iter().zip(cold).enumerate() {
        let (text, n, cached) = chat(addr, model, m).await;
        assert_eq!(
            (&text, n),
            (&want.0, want.1),
            "chat {i} ({tier}, {cached} cached tokens): the answer differs from the cold one"
        );
        cached_sum += cached;
    }
    cached_sum
}

/// Greedy answers are the same cold, with the prefix from the RAM tier and
/// from the disk tier after a restart (the neighbour tier: see
/// `greedy_answers_are_the_same_with_a_neighbours_kv`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn greedy_answers_do_not_depend_on_the_cache_tier() {
    let dir = tempfile::tempdir().expect("tmp");
    let mut nocache = ram_only();
    nocache.kv = None;
    let Some(srv) = TestServer::start(nocache).await else {
        return;
    };
    let cold = cold_answers(srv.addr, NAME).await;
    assert_eq!(cold.len(), 20);
    srv.stop().await;

    let srv = restart(dir.path()).await;
    // The first pass reuses the shared system prompts (hot sequence, RAM
    // blocks and tail records), the second whole prompts.
    let first = same_answers(srv.addr, NAME, &cold, "first pass").await;
    let again = same_answers(srv.addr, NAME, &cold, "RAM").await;
    assert!(first > 0 && again > first, "cached tokens {first}, {again}");
    let kv = srv.serving.kv().expect("kv").clone();
    assert!(kv.stats().ram_hits.load(Ordering::Relaxed) > 0);
    srv.stop().await;
    drop(kv);

    let srv = restart(dir.path()).await;
    let kv = srv.serving.kv().expect("kv").clone();
    let disk = same_answers(srv.addr, NAME, &cold, "disk").await;
    assert!(disk >= again / 2, "cached tokens {disk}");
    assert!(kv.stats().disk_hits.load(Ordering::Relaxed) >= 20);
    srv.stop().await;
}

/// A node of the fixture ([`model_node`]) in `dir` with the response cache
/// off; returns it, its HTTP address and the demo model's name.
async fn node(
    dir: &std::path::Path,
    peers: Vec<libp2p::Multiaddr>,
) -> (shoal::node::Node, std::net::SocketAddr, String) {
    let cfg = ServeConfig {
        response_cache_budget: 0,
        ..ServeConfig::with_data_dir(dir)
    };
    let m = model_node(dir, peers, cfg).await;
    (m.node, m.http, m.model.to_hex())
}

/// Greedy answers are the same cold and with the prefix taken from a
/// neighbour's KV blocks (two in-process nodes on 127.0.0.1, mDNS off).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn greedy_answers_are_the_same_with_a_neighbours_kv() {
    if demo_model_path().is_none() {
        return;
    }
    let tmp = tempfile::tempdir().expect("tmp");
    let mut nocache = ram_only();
    nocache.kv = None;
    let Some(srv) = TestServer::start(nocache).await else {
        return;
    };
    let cold = cold_answers(srv.addr, NAME).await;
    srv.stop().await;

    // A computes every chat; B takes the blocks from A.
    let (a, a_http, id) = node(&tmp.path().join("a"), Vec::new()).await;
    same_answers(a_http, &id, &cold, "node A").await;
    let (b, b_http, _) = node(&tmp.path().join("b"), vec![p2p_addr(&a).await]).await;
    let pb = a.mesh().peer_id();
    for _ in 0..6000 {
        if b.mesh().connected().await.expect("peers").contains(&pb) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    same_answers(b_http, &id, &cold, "neighbour").await;
    let kv_b = b.serving().expect("serving").kv().expect("kv").clone();
    assert!(
        kv_b.stats().mesh_hits.load(Ordering::Relaxed) > 0,
        "blocks came from the neighbour: {}",
        kv_b.stats().mesh_hits.load(Ordering::Relaxed)
    );
    assert_eq!(kv_b.stats().mesh_caught.load(Ordering::Relaxed), 0);
    for n in [a, b] {
        n.shutdown().await;
    }
}

/// KV blocks computed by a model can be dropped (issue 14: blocks computed
/// from a corrupt file must not outlive the repair): on a running server
/// with `PrefixCache::drop_model`, and with the server stopped with
/// `kvcache::purge_model_on_disk`; after a restart nothing of it is used.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_models_blocks_can_be_dropped_running_and_stopped() {
    let dir = tempfile::tempdir().expect("tmp");
    let Some(srv) = TestServer::start(with_disk(dir.path())).await else {
        return;
    };
    let prompt = format!("{}\nThe last word above is", long_text(120));
    let (reference, pt, _) = ask(&srv, &prompt).await;
    let _ = ask(&srv, "Unrelated.").await;
    let kv = srv.serving.kv().expect("kv").clone();
    let id = model_of(&srv).id();
    kv.flush();
    assert!(kv.disk().expect("disk").len() >= pt / BLOCK);
    let dropped = kv.drop_model(&id);
    assert!(dropped >= 2 * (pt / BLOCK), "dropped {dropped}");
    assert_eq!(kv.disk().expect("disk").len(), 0);
    let (again, _, cached) = ask(&srv, &prompt).await;
    assert_eq!(cached, 0, "nothing of the dropped model is used");
    assert_eq!(again, reference);
    srv.stop().await;
    drop(kv);

    // Stored again by the last request; purged with the server stopped.
    let kv_dir = dir.path().join("kv");
    let files = std::fs::read_dir(&kv_dir).expect("dir").count();
    assert!(files >= pt / BLOCK);
    let purged = shoal::kvcache::purge_model_on_disk(&kv_dir, &id).expect("purge");
    assert_eq!(purged, files);
    assert_eq!(std::fs::read_dir(&kv_dir).expect("dir").count(), 0);
    let srv = restart(dir.path()).await;
    let kv = srv.serving.kv().expect("kv").clone();
    let (after, _, cached) = ask(&srv, &prompt).await;
    assert_eq!(cached, 0, "nothing purged is used after a restart");
    assert_eq!(kv.stats().disk_hits.load(Ordering::Relaxed), 0);
    assert_eq!(after, reference);
    srv.stop().await;
}
