//! Time to first token of a ~1,000-token prompt through the HTTP API, cold
//! and with its prefix from the KV cache in RAM and on disk after a restart.
//!
//! Run with `scripts/bench-serving.sh` (or `cargo bench --bench serving`).
//! Each case is measured on the client: from sending a streaming
//! `/v1/completions` request to receiving its first token. The cold case is
//! the anchor; the others are reported as ratios to it. Prints a Markdown
//! table and a JSON line (for the script).

// The integration tests' helpers (the bench uses a few of them).
#[allow(dead_code, unused_imports)]
#[path = "../tests/it/util/mod.rs"]
mod util;

use serde_json::json;
use shoal::serve::ServeConfig;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use util::demo_model_path;
use util::serving::{NAME, TestServer};

fn prose(seed: usize, words: usize) -> String {
    // Varied text whose tokenization is ~1.3 tokens per word.
    const W: &[&str] = &[
        "the",
        "engineer",
        "measured",
        "a",
        "river",
        "of",
        "copper",
        "wire",
        "beside",
        "quiet",
        "harbor",
        "while",
        "seven",
        "students",
        "asked",
        "why",
        "lanterns",
        "glow",
        "under",
        "violet",
        "clouds",
        "and",
        "every",
        "machine",
        "on",
        "line",
        "four",
        "reported",
        "its",
        "temperature",
        "to",
        "orchard",
        "server",
        "before",
        "noon",
    ];
    let mut s = format!("Report {seed}. ");
    let mut x = seed as u64 * 2_654_435_761 + 1;
    for i in 0..words {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        s.push_str(W[(x % W.len() as u64) as usize]);
        s.push(if i % 13 == 12 { '.' } else { ' ' });
        if i % 13 == 12 {
            s.push(' ');
        }
    }
    s
}

/// Seconds from sending the request to the first token chunk.
async fn ttft(addr: std::net::SocketAddr, prompt: &str) -> (f64, u64) {
    ttft_model(addr, NAME, prompt).await
}

async fn ttft_model(addr: std::net::SocketAddr, model: &str, prompt: &str) -> (f64, u64) {
    let body = json!({"model": model, "prompt": prompt, "max_tokens": 2, "temperature": 0,
                      "stream": true, "stream_options": {"include_usage": true}})
    .to_string();
    let req = format!(
        "POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let t0 = Instant::now();
    s.write_all(req.as_bytes()).await.expect("write");
    let mut got = Vec::new();
    let mut buf = [0u8; 8192];
    let mut first = None;
    loop {
        let n = s.read(&mut buf).await.expect("read");
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
        if first.is_none() && String::from_utf8_lossy(&got).contains("data: {") {
            first = Some(t0.elapsed());
        }
    }
    let text = String::from_utf8_lossy(&got);
    // A refused or failed request is a broken benchmark, not a NaN figure.
    assert!(
        first.is_some(),
        "no token from {addr}: {}",
        text.chars().take(300).collect::<String>()
    );
    let cached = util::http::sse_data(&text)
        .iter()
        .filter_map(|d| serde_json::from_str::<serde_json::Value>(d).ok())
        .filter_map(|v| v["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64())
        .next_back()
        .unwrap_or(0);
    (first.map_or(f64::NAN, |d| d.as_secs_f64()), cached)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        println!("serving_ttft: benchmark");
        return;
    }
    if demo_model_path().is_none() {
        eprintln!("demo model missing: run scripts/fetch-model.sh");
        std::process::exit(1);
    }
    let runs: usize = std::env::var("RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let block: usize = std::env::var("BLOCK")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(16);
    let words: usize = std::env::var("WORDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(925);
    // The exact prompts of this benchmark, for other servers measured beside
    // shoal (llama.cpp's server, the testnet's neighbour run): a JSON list of
    // {base, cold, followup} written to the path, then exit.
    if let Ok(path) = std::env::var("DUMP_PROMPTS") {
        let cases: Vec<_> = (0..runs)
            .map(|r| {
                let base = prose(r, words);
                json!({"base": base,
                       "cold": format!("{base}\nQuestion: what was measured?"),
                       "followup": format!("{base}\nQuestion: who asked?")})
            })
            .collect();
        let text = serde_json::to_string_pretty(&cases).expect("json");
        if let Err(e) = std::fs::write(&path, text) {
            eprintln!("{path}: {e}");
            std::process::exit(1);
        }
        eprintln!("wrote {runs} prompts of {words} words to {path}");
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let dir = tempfile::tempdir().expect("tmp");
        let cfg = || {
            let mut c = ServeConfig::with_data_dir(dir.path());
            c.response_cache_budget = 0;
            if let Some(k) = &mut c.kv {
                k.block_tokens = block;
            }
            c
        };
        let (mut cold, mut ram, mut disk) = (Vec::new(), Vec::new(), Vec::new());
        let (mut blocks, mut cached_blocks) = (Vec::new(), 0);
        let (mut cached_ram, mut cached_disk, mut prompt_tokens) = (0, 0, 0);
        let srv = TestServer::start(cfg()).await.expect("server");
        // Warm-up (page cache, thread pools).
        let _ = ttft(srv.addr, "Hello there").await;
        let model = srv.serving.model(NAME).expect("served").engine.model().clone();
        for r in 0..runs {
            let base = prose(r, words);
            prompt_tokens = model.tokenizer().encode(&base, false, true).len();
            let (t, _) = ttft(srv.addr, &format!("{base}\nQuestion: what was measured?")).await;
            cold.push(t);
            let (t, c) = ttft(srv.addr, &format!("{base}\nQuestion: who asked?")).await;
            ram.push(t);
            cached_ram = c;
            // An unrelated request replaces the engine's hot sequence: the
            // next follow-up takes its prefix from the RAM blocks.
            let _ = ttft(srv.addr, "Unrelated short request.").await;
            let (t, c) = ttft(srv.addr, &format!("{base}\nQuestion: how many?")).await;
            blocks.push(t);
            cached_blocks = c;
        }
        srv.stop().await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        let srv = TestServer::start(cfg()).await.expect("server");
        let _ = ttft(srv.addr, "Hello there").await;
        for r in 0..runs {
            let base = prose(r, words);
            let (t, c) = ttft(srv.addr, &format!("{base}\nQuestion: when was it?")).await;
            disk.push(t);
            cached_disk = c;
        }
        srv.stop().await;
        let (nb, cached_nb) = neighbour(runs, words, block).await;
        let (c, m, d) = (median(cold), median(ram), median(disk));
        let (rb, n) = (median(blocks), median(nb));
        println!("prompt: {prompt_tokens} tokens (+ a question of ~6), block {block}, f16, runs {runs} (median)");
        println!();
        println!("| case | TTFT s | cached tokens | ratio to cold |");
        println!("|---|---|---|---|");
        println!("| cold (anchor) | {c:.3} | 0 | 1 |");
        println!("| follow-up, engine's hot sequence (RAM) | {m:.4} | {cached_ram} | **{:.4}x** |", m / c);
        println!("| follow-up, RAM blocks | {rb:.4} | {cached_blocks} | **{:.4}x** |", rb / c);
        println!("| follow-up, disk blocks after restart | {d:.4} | {cached_disk} | **{:.4}x** |", d / c);
        println!("| follow-up, neighbour's blocks (loopback mesh) | {n:.4} | {cached_nb} | **{:.4}x** |", n / c);
        println!(
            "{}",
            json!({"block": block, "prompt_tokens": prompt_tokens, "cold": c, "ram": m, "disk": d,
                   "ram_blocks": rb, "neighbour": n,
                   "cached_ram": cached_ram, "cached_disk": cached_disk})
        );
    });
}

/// Two nodes on a loopback mesh: A answers each prompt (cold), then B,
/// which has never seen it, answers a follow-up with A's blocks.
async fn neighbour(runs: usize, words: usize, block: usize) -> (Vec<f64>, u64) {
    let tmp = tempfile::tempdir().expect("tmp");
    let model = demo_model_path().expect("model");
    let mut nodes = Vec::new();
    let mut peers = Vec::new();
    for name in ["a", "b"] {
        let dir = tmp.path().join(name);
        let mut cfg = ServeConfig::with_data_dir(&dir);
        cfg.response_cache_budget = 0;
        if let Some(k) = &mut cfg.kv {
            k.block_tokens = block;
        }
        let (node, addr) = util::serving::start_node(&dir, peers.clone(), cfg).await;
        let store = node.store().clone();
        let m = model.clone();
        let id = tokio::task::spawn_blocking(move || {
            store.add_file(&m, &shoal::store::AddOptions::default())
        })
        .await
        .expect("join")
        .expect("add");
        peers.push(util::serving::p2p_addr(&node).await);
        nodes.push((node, addr, id.to_hex()));
    }
    while nodes[1]
        .0
        .mesh()
        .connected()
        .await
        .expect("peers")
        .is_empty()
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (a, b) = (nodes[0].1, nodes[1].1);
    let name = nodes[0].2.clone();
    let ask = |addr, prompt: String| {
        let name = name.clone();
        async move { ttft_model(addr, &name, &prompt).await }
    };
    let _ = ask(a, "Hello there".into()).await;
    let _ = ask(b, "Hi".into()).await;
    let mut out = Vec::new();
    let mut cached = 0;
    for r in 0..runs {
        let base = prose(100 + r, words);
        let _ = ask(a, format!("{base}\nQuestion: what was measured?")).await;
        let (t, c) = ask(b, format!("{base}\nQuestion: who asked?")).await;
        out.push(t);
        cached = c;
    }
    for (n, _, _) in nodes {
        n.shutdown().await;
    }
    (out, cached)
}
