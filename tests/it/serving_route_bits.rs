//! What the serving layer gives the mesh router (issue 19): an engine's
//! load snapshot ([`Engine::load`]) on a real engine, the role chunk of a
//! streamed chat sent with the first token, and who served a request
//! (`X-Shoal-Served-By`, the `served_by` field).

use crate::util::http::{Resp, eventually, post};
use crate::util::serving::{NAME, TestServer, ram_only};
use serde_json::{Value, json};
use shoal::inference::{GenerateConfig, SamplerConfig};
use shoal::metrics::Metrics;
use shoal::serve::{Engine, EngineConfig, EngineLoad, Job, JobEvent, ServeConfig};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use tokio::sync::mpsc;

fn submit(
    engine: &Engine,
    prompt: Vec<u32>,
    max_tokens: usize,
) -> mpsc::UnboundedReceiver<JobEvent> {
    let (tx, rx) = mpsc::unbounded_channel();
    let permit = engine.try_admit().expect("a queue slot");
    engine.submit(
        permit,
        Job {
            prompt,
            cfg: GenerateConfig {
                max_tokens,
                sampler: SamplerConfig {
                    temperature: 0.0,
                    ..SamplerConfig::default()
                },
                // Every job runs its whole length.
                stop_at_eos: false,
                ..GenerateConfig::default()
            },
            cancel: Arc::new(AtomicBool::new(false)),
            events: tx,
        },
    );
    rx
}

/// Waits for a job's end; returns the tokens it generated.
async fn finish(mut rx: mpsc::UnboundedReceiver<JobEvent>) -> usize {
    while let Some(ev) = rx.recv().await {
        match ev {
            JobEvent::Done {
                completion_tokens, ..
            } => return completion_tokens,
            JobEvent::Failed(e) => panic!("job failed: {e}"),
            _ => {}
        }
    }
    panic!("job ended without Done");
}

/// The load of a real engine: bounds as configured, nothing running
/// before, two running and one waiting while three jobs share two slots,
/// nothing after, and both rates measured (> 0) once a request ran.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engine_load_follows_running_and_waiting_jobs() {
    let Some(m) = crate::util::demo_model_2_threads() else {
        return;
    };
    let e = Engine::start(
        "demo",
        m.clone(),
        None,
        EngineConfig {
            parallel: 2,
            queue_depth: 5,
            kv_budget: 1 << 30,
        },
        Arc::new(Metrics::new()),
    )
    .expect("engine");
    assert_eq!(
        e.load(),
        EngineLoad {
            parallel: 2,
            queue_depth: 5,
            ..EngineLoad::default()
        },
        "an idle engine: its bounds, nothing running, no rate yet"
    );
    let prompt = m.tokenizer().encode(
        "<|im_start|>user\nTell me about the sea.<|im_end|>\n<|im_start|>assistant\n",
        false,
        true,
    );
    let rxs: Vec<_> = (0..3).map(|_| submit(&e, prompt.clone(), 96)).collect();
    // The third job cannot start before one of the first two ends.
    eventually("two running and one waiting", || {
        let l = e.load();
        l.running == 2 && l.waiting == 1
    })
    .await;
    let done = futures::future::join_all(rxs.into_iter().map(finish)).await;
    assert_eq!(done, vec![96, 96, 96]);
    eventually("nothing running or waiting after the jobs", || {
        let l = e.load();
        l.running == 0 && l.waiting == 0
    })
    .await;
    let l = e.load();
    assert!(l.prompt_tps > 0.0, "prompt rate measured: {l:?}");
    assert!(l.decode_tps > 0.0, "decode rate measured: {l:?}");
    // Rates, not garbage: a 135M model on this machine is far below these.
    assert!(
        l.decode_tps < 1.0e5 && l.prompt_tps < 1.0e7,
        "plausible rates: {l:?}"
    );
    eprintln!("engine load after 3 x 96 tokens: {l:?}");
}

/// The node id the tests give the serving layer (a real node sets its
/// peer id; this one differs from it, so the tests see which one names
/// the server).
const NODE_ID: &str = "12D3KooWServedByTestNode";

fn served_by(r: &Resp) -> Option<&str> {
    r.header("x-shoal-served-by")
}

fn ndjson(r: &Resp) -> Vec<Value> {
    r.text()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).expect("an NDJSON line"))
        .collect()
}

/// Every generation answer names the node that ran the model: the
/// `X-Shoal-Served-By` header (errors too), and `served_by` at the top of
/// the JSON body or of the first chunk or line of a stream, only there
/// (OpenAI and Ollama routes, live and replayed from the response cache).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_generation_answer_names_its_server() {
    let cfg = ServeConfig {
        node_id: Some(NODE_ID.into()),
        ..ServeConfig::default()
    };
    let Some(srv) = TestServer::start(cfg).await else {
        return;
    };
    let msgs = json!([{"role": "user", "content": "Say hello."}]);
    // OpenAI chat, not streamed (temperature 0: remembered by the response cache).
    let q = json!({"model": NAME, "messages": msgs, "max_tokens": 8, "temperature": 0});
    let r = post(srv.addr, "/v1/chat/completions", &q).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(served_by(&r), Some(NODE_ID));
    assert!(r.header("x-shoal-node").is_some(), "x-shoal-node stays");
    assert_eq!(r.header("x-shoal-cache"), Some("miss"));
    let v = r.json();
    assert_eq!(v["served_by"], NODE_ID, "{v}");
    assert_eq!(v["object"], "chat.completion");
    // The same request again: the response cache's answer names it too.
    let r = post(srv.addr, "/v1/chat/completions", &q).await;
    assert_eq!(r.header("x-shoal-cache"), Some("hit"));
    assert_eq!(served_by(&r), Some(NODE_ID));
    assert_eq!(r.json()["served_by"], NODE_ID);
    // Streamed, replayed from the response cache.
    let mut qs = q.clone();
    qs["stream"] = json!(true);
    let r = post(srv.addr, "/v1/chat/completions", &qs).await;
    assert_eq!(r.header("x-shoal-cache"), Some("hit"));
    check_openai_stream(&r, true);
    // Streamed, live (another seed: not cached yet).
    let q = json!({"model": NAME, "messages": msgs, "max_tokens": 8, "stream": true, "seed": 7,
                   "stream_options": {"include_usage": true}});
    let r = post(srv.addr, "/v1/chat/completions", &q).await;
    assert_eq!(r.header("x-shoal-cache"), Some("miss"));
    check_openai_stream(&r, true);
    // Completions, streamed live.
    let q = json!({"model": NAME, "prompt": "Once upon a time", "max_tokens": 6, "stream": true});
    let r = post(srv.addr, "/v1/completions", &q).await;
    check_openai_stream(&r, false);
    // An error names the node too.
    let q = json!({"model": "no-such-model", "messages": msgs});
    let r = post(srv.addr, "/v1/chat/completions", &q).await;
    assert_eq!(r.status, 404, "{}", r.text());
    assert_eq!(served_by(&r), Some(NODE_ID));
    // Ollama chat, streamed: the first line only.
    let q = json!({"model": NAME, "messages": msgs,
                   "options": {"num_predict": 6, "temperature": 0}});
    let r = post(srv.addr, "/api/chat", &q).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(served_by(&r), Some(NODE_ID));
    let lines = ndjson(&r);
    assert!(lines.len() >= 2, "{}", r.text());
    assert_eq!(lines[0]["served_by"], NODE_ID, "{}", r.text());
    assert!(
        lines[0]["message"]["content"]
            .as_str()
            .is_some_and(|t| !t.is_empty()),
        "the first line carries the first text: {}",
        lines[0]
    );
    for l in &lines[1..] {
        assert!(l.get("served_by").is_none(), "only the first line: {l}");
    }
    assert_eq!(lines.last().map(|l| l["done"].clone()), Some(json!(true)));
    // Ollama generate, one JSON answer.
    let q =
        json!({"model": NAME, "prompt": "Hello", "stream": false, "options": {"num_predict": 4}});
    let r = post(srv.addr, "/api/generate", &q).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(served_by(&r), Some(NODE_ID));
    let v = r.json();
    assert_eq!(v["served_by"], NODE_ID, "{v}");
    assert_eq!(v["done"], true);
    // Ollama error.
    let q = json!({"model": "no-such-model", "prompt": "Hello"});
    let r = post(srv.addr, "/api/generate", &q).await;
    assert_eq!(r.status, 404, "{}", r.text());
    assert_eq!(served_by(&r), Some(NODE_ID));
    srv.stop().await;
}

/// An OpenAI stream: `served_by` in the first chunk only; a chat's first
/// chunk is the role chunk, a completion's has the first text.
fn check_openai_stream(r: &Resp, chat: bool) {
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(served_by(r), Some(NODE_ID));
    let data = r.sse();
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).expect("a JSON chunk"))
        .collect();
    assert!(chunks.len() >= 2, "{}", r.text());
    assert_eq!(chunks[0]["served_by"], NODE_ID, "{}", chunks[0]);
    if chat {
        assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
        assert!(
            chunks[1]["choices"][0]["delta"]["content"].is_string(),
            "the token's chunk follows: {}",
            chunks[1]
        );
    } else {
        assert!(chunks[0]["choices"][0]["text"].is_string());
    }
    for c in &chunks[1..] {
        assert!(c.get("served_by").is_none(), "only the first chunk: {c}");
    }
}

/// Without a node id the serving layer adds no `served_by` field; the
/// node's router still names it in the header (its peer id, the same as
/// `x-shoal-node`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_node_id_the_router_names_the_node() {
    let Some(srv) = TestServer::start(ram_only()).await else {
        return;
    };
    let q = json!({"model": NAME, "messages": [{"role": "user", "content": "Hi"}],
                   "max_tokens": 4, "stream": true});
    let r = post(srv.addr, "/v1/chat/completions", &q).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let node = r.header("x-shoal-node").expect("x-shoal-node");
    assert_eq!(served_by(&r), Some(node));
    let first: Value = serde_json::from_str(&r.sse()[0]).expect("a chunk");
    assert!(first.get("served_by").is_none(), "{first}");
    srv.stop().await;
}

/// The official Python clients, unchanged, read answers that carry
/// `served_by` (the field is extra to both APIs): `openai` (chat not
/// streamed and streamed; the field is readable as an extra) and `ollama`
/// (chat and generate, streamed and not).
const CLIENTS: &str = r#"
import sys
import ollama
from openai import OpenAI

base, model, node = sys.argv[1], sys.argv[2], sys.argv[3]
msgs = [{"role": "user", "content": "Name one colour."}]

c = OpenAI(base_url=base + "/v1", api_key="sk-local", max_retries=0, timeout=120)
raw = c.chat.completions.with_raw_response.create(model=model, messages=msgs, max_tokens=8, temperature=0)
assert raw.headers["x-shoal-served-by"] == node, raw.headers
r = raw.parse()
text = r.choices[0].message.content
assert isinstance(text, str) and r.choices[0].finish_reason in ("stop", "length"), r
assert (r.model_extra or {}).get("served_by") == node, r
chunks = list(c.chat.completions.create(model=model, messages=msgs, max_tokens=8, temperature=0, stream=True))
assert (chunks[0].model_extra or {}).get("served_by") == node, chunks[0]
assert chunks[0].choices[0].delta.role == "assistant", chunks[0]
assert all("served_by" not in (ch.model_extra or {}) for ch in chunks[1:]), chunks
assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == text, chunks
print("openai: ok", repr(text))

o = ollama.Client(host=base, timeout=120)
greedy = {"temperature": 0, "num_predict": 8}
r = o.chat(model=model, messages=msgs, options=greedy, stream=False)
assert r.done and r.message.role == "assistant" and r.message.content, r
lines = list(o.chat(model=model, messages=msgs, options=greedy, stream=True))
assert lines[-1].done and "".join(l.message.content or "" for l in lines) == r.message.content, lines
g = o.generate(model=model, prompt="The capital of France is", options=greedy, stream=False)
assert g.done and g.response, g
parts = list(o.generate(model=model, prompt="The capital of France is", options=greedy, stream=True))
assert parts[-1].done and "".join(p.response for p in parts) == g.response, parts
print("ollama: ok", repr(r.message.content))
print("ALL OK")
"#;

/// Whether `python3` can import the official clients; a loud skip when it
/// cannot (a failure under `CI=true`).
fn clients_available() -> bool {
    let ok = std::process::Command::new("python3")
        .args(["-c", "import openai, ollama"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "the Python openai and ollama packages are missing (python3 -m pip install openai ollama)"
        );
        eprintln!(
            "SKIPPING serving_route_bits: the Python `openai` or `ollama` package is missing \
             (python3 -m pip install openai ollama)"
        );
    }
    ok
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_clients_read_answers_naming_their_server() {
    if !clients_available() {
        return;
    }
    let cfg = ServeConfig {
        node_id: Some(NODE_ID.into()),
        ..ram_only()
    };
    let Some(srv) = TestServer::start(cfg).await else {
        return;
    };
    let base = format!("http://{}", srv.addr);
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("python3")
            .args(["-c", CLIENTS, &base, NAME, NODE_ID])
            // Nothing may leave loopback: no proxy for the local node.
            .env("NO_PROXY", "127.0.0.1")
            .env_remove("OPENAI_BASE_URL")
            .env_remove("OLLAMA_HOST")
            .output()
    })
    .await
    .expect("join")
    .expect("run python3");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{stdout}");
    assert!(
        out.status.success() && stdout.contains("ALL OK"),
        "the official clients failed:\n{stdout}\n{stderr}"
    );
    srv.stop().await;
}
