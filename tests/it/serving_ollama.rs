//! The Ollama routes between real nodes on 127.0.0.1 (mDNS off): `/api/pull`
//! of a model only a neighbour holds streams the download's progress and
//! makes it local (listed, then served); a client that goes away cancels its
//! generation; a deterministic answer comes back from the response cache; a
//! full queue is 429 with `Retry-After`.
//! The official `ollama` client is driven in node/tests/it/ollama_client.rs.

use crate::util::demo_model_path;
use crate::util::http::{eventually, http, open_until, post};
use crate::util::serving::{TwoNodes, connected, model_node};
use serde_json::{Value, json};
use shoal::serve::ServeConfig;
use std::sync::atomic::Ordering;

fn ndjson(text: &str) -> Vec<Value> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pull_from_a_neighbour_streams_progress_and_the_model_then_serves() {
    let Some(model) = demo_model_path() else {
        return;
    };
    let size = std::fs::metadata(&model).expect("model").len();
    let tmp = tempfile::tempdir().expect("tmp");
    let pair = TwoNodes::start(tmp.path(), |d| ServeConfig {
        response_cache_budget: 0,
        ..ServeConfig::with_data_dir(d)
    })
    .await;
    connected(&pair.second, &pair.first.node).await;
    let id = pair.first.model.to_hex();
    let b = pair.second_http;
    // Not on the second node yet: not listed.
    let tags = http(b, "GET", "/api/tags", &[], b"").await.json();
    assert!(
        !tags["models"].to_string().contains(&id),
        "listed before the pull: {tags}"
    );
    let r = post(b, "/api/pull", &json!({"model": id})).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("content-type"), Some("application/x-ndjson"));
    let lines = ndjson(&r.text());
    assert_eq!(lines[0]["status"], "pulling manifest", "{lines:?}");
    assert_eq!(
        lines.last().expect("lines")["status"],
        "success",
        "{lines:?}"
    );
    let prog: Vec<&Value> = lines.iter().filter(|l| l.get("digest").is_some()).collect();
    assert!(!prog.is_empty(), "{lines:?}");
    for p in &prog {
        assert_eq!(p["digest"], id.as_str());
        assert_eq!(p["total"], size, "{p}");
        assert!(p["completed"].as_u64().expect("completed") <= size, "{p}");
    }
    assert_eq!(prog.last().expect("progress")["completed"], size);
    eprintln!("pull: {} lines, {} with progress", lines.len(), prog.len());
    // Now local: listed, and served.
    let tags = http(b, "GET", "/api/tags", &[], b"").await.json();
    assert!(tags["models"].to_string().contains(&id), "{tags}");
    let r = post(
        b,
        "/api/chat",
        &json!({"model": id, "stream": false, "options": {"temperature": 0, "num_predict": 4},
                "messages": [{"role": "user", "content": "Hi"}]}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.json()["eval_count"].as_u64().is_some_and(|n| n > 0));
    // A pull again is immediate: the model is local.
    let lines = ndjson(
        &post(b, "/api/pull", &json!({"model": id, "stream": true}))
            .await
            .text(),
    );
    assert_eq!(lines.last().expect("lines")["status"], "success");
    // A name nobody has: 404 before any line.
    let r = post(b, "/api/pull", &json!({"model": "nobody-has:this"})).await;
    assert_eq!(r.status, 404, "{}", r.text());
    assert!(
        r.json()["error"]
            .as_str()
            .is_some_and(|e| e.contains("not found"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_goes_away_cancels_and_deterministic_answers_are_cached() {
    if demo_model_path().is_none() {
        return;
    }
    let tmp = tempfile::tempdir().expect("tmp");
    let m = model_node(
        tmp.path(),
        Vec::new(),
        ServeConfig::with_data_dir(tmp.path()),
    )
    .await;
    let id = m.model.to_hex();
    let long = json!({"model": id, "prompt": "Count from one to one thousand:",
                      "options": {"num_predict": 2000, "temperature": 0.7}});
    let (conn, got) = open_until(m.http, "/api/generate", &long, "\"response\"").await;
    assert!(got.contains("application/x-ndjson"), "{got}");
    drop(conn);
    let engine = m
        .node
        .serving()
        .expect("serving")
        .model(&id)
        .expect("loaded")
        .engine
        .clone();
    eventually("the generation is cancelled", || {
        engine.stats().cancelled.load(Ordering::Relaxed) == 1
    })
    .await;
    // Greedy twice: the second answer is the first, from the response cache.
    let ask = json!({"model": id, "stream": false, "prompt": "The sky is",
                     "options": {"temperature": 0, "num_predict": 6}});
    let first = post(m.http, "/api/generate", &ask).await;
    assert_eq!(first.header("x-shoal-cache"), Some("miss"));
    let second = post(m.http, "/api/generate", &ask).await;
    assert_eq!(second.status, 200, "{}", second.text());
    assert_eq!(second.header("x-shoal-cache"), Some("hit"));
    let (a, b) = (first.json(), second.json());
    assert_eq!(a["response"], b["response"]);
    assert_eq!(a["context"], b["context"]);
    assert_eq!(a["eval_count"], b["eval_count"]);
    // Streamed, the same text from the cache.
    let mut s = ask.clone();
    s["stream"] = json!(true);
    let r = post(m.http, "/api/generate", &s).await;
    assert_eq!(r.header("x-shoal-cache"), Some("hit"));
    let lines = ndjson(&r.text());
    let text: String = lines
        .iter()
        .filter_map(|l| l["response"].as_str())
        .collect();
    assert_eq!(text, a["response"].as_str().expect("text"));
    assert_eq!(lines.last().expect("lines")["done"], true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_is_429_with_retry_after_in_ollamas_shape() {
    if demo_model_path().is_none() {
        return;
    }
    let tmp = tempfile::tempdir().expect("tmp");
    let cfg = ServeConfig {
        queue_depth: 1,
        parallel: 1,
        response_cache_budget: 0,
        ..ServeConfig::with_data_dir(tmp.path())
    };
    let m = model_node(tmp.path(), Vec::new(), cfg).await;
    let id = m.model.to_hex();
    let long = json!({"model": id, "messages": [{"role": "user", "content": "Tell a long story."}],
                      "options": {"num_predict": 2000, "temperature": 0.7}});
    // One running, one waiting: the queue is full (headers come at once).
    let (a, _) = open_until(m.http, "/api/chat", &long, "200 OK").await;
    let (b, _) = open_until(m.http, "/api/chat", &long, "200 OK").await;
    let r = post(m.http, "/api/chat", &long).await;
    assert_eq!(r.status, 429, "{}", r.text());
    assert!(
        r.header("retry-after")
            .is_some_and(|s| s.parse::<u64>().is_ok())
    );
    assert!(
        r.json()["error"]
            .as_str()
            .is_some_and(|e| e.contains("queue")),
        "{}",
        r.text()
    );
    drop((a, b));
}
