//! The OpenAI-compatible API over real HTTP on 127.0.0.1 with the demo
//! model: chat and completions, streamed and not, every error, the response
//! cache and its HTTP caching headers, overload (429), client disconnects
//! and graceful drain.

use crate::util::http::*;
use crate::util::serving::*;
use serde_json::{Value, json};
use shoal::serve::ServeConfig;
use std::sync::atomic::Ordering;

fn chat_body(content: &str, extra: Value) -> Value {
    let mut b = json!({
        "model": NAME,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 12,
        "temperature": 0,
    });
    if let (Some(o), Some(e)) = (b.as_object_mut(), extra.as_object()) {
        for (k, v) in e {
            o.insert(k.clone(), v.clone());
        }
    }
    b
}

/// Content of a streamed chat answer, and the final usage if any.
fn stream_text(chunks: &[String], chat: bool) -> (String, Option<Value>, Option<String>) {
    assert_eq!(
        chunks.last().map(String::as_str),
        Some("[DONE]"),
        "{chunks:?}"
    );
    let mut text = String::new();
    let mut usage = None;
    let mut finish = None;
    for c in &chunks[..chunks.len() - 1] {
        let v: Value = serde_json::from_str(c).expect("chunk json");
        if let Some(u) = v.get("usage").filter(|u| !u.is_null()) {
            assert_eq!(v["choices"], json!([]), "usage chunk has no choices");
            usage = Some(u.clone());
            continue;
        }
        let ch = &v["choices"][0];
        if chat {
            assert_eq!(v["object"], "chat.completion.chunk");
            if let Some(t) = ch["delta"]["content"].as_str() {
                text.push_str(t);
            }
        } else {
            assert_eq!(v["object"], "text_completion");
            text.push_str(ch["text"].as_str().unwrap_or(""));
        }
        if let Some(f) = ch["finish_reason"].as_str() {
            finish = Some(f.to_owned());
        }
    }
    (text, usage, finish)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_and_completion_streamed_and_not() {
    let Some(srv) = TestServer::start(ram_only()).await else {
        return;
    };
    let a = srv.addr;
    // Models.
    let r = http(a, "GET", "/v1/models", &[], b"").await;
    assert_eq!(r.status, 200);
    let m = r.json();
    assert_eq!(m["object"], "list");
    assert_eq!(m["data"][0]["id"], NAME);
    assert_eq!(
        http(a, "GET", &format!("/v1/models/{NAME}"), &[], b"")
            .await
            .status,
        200
    );

    // Chat, not streamed.
    let body = chat_body("What is the capital of France?", json!({}));
    let r = post(a, "/v1/chat/completions", &body).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(
        r.header("content-type")
            .is_some_and(|c| c.contains("application/json"))
    );
    let v = r.json();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["model"], NAME);
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    let text = v["choices"][0]["message"]["content"]
        .as_str()
        .expect("content")
        .to_owned();
    assert!(!text.is_empty());
    let u = &v["usage"];
    let pt = u["prompt_tokens"].as_u64().expect("prompt_tokens");
    assert!(pt > 10);
    assert!(
        u["completion_tokens"]
            .as_u64()
            .is_some_and(|c| (1..=12).contains(&c))
    );
    assert_eq!(
        u["total_tokens"].as_u64(),
        Some(pt + u["completion_tokens"].as_u64().unwrap_or(0))
    );
    assert!(u["prompt_tokens_details"]["cached_tokens"].is_u64());

    // Chat, streamed, with usage: same greedy text.
    let r = post(
        a,
        "/v1/chat/completions",
        &chat_body(
            "What is the capital of France?",
            json!({"stream": true, "stream_options": {"include_usage": true}}),
        ),
    )
    .await;
    assert_eq!(r.status, 200);
    assert!(
        r.header("content-type")
            .is_some_and(|c| c.starts_with("text/event-stream"))
    );
    let chunks = r.sse();
    let first: Value = serde_json::from_str(&chunks[0]).expect("json");
    assert_eq!(first["choices"][0]["delta"]["role"], "assistant");
    let (stext, usage, finish) = stream_text(&chunks, true);
    assert_eq!(stext, text);
    let usage = usage.expect("include_usage sends usage");
    assert_eq!(usage["prompt_tokens"].as_u64(), Some(pt));
    assert!(usage["prompt_tokens_details"]["cached_tokens"].is_u64());
    assert!(matches!(finish.as_deref(), Some("stop" | "length")));

    // Streamed without include_usage: no usage chunk.
    let r = post(
        a,
        "/v1/chat/completions",
        &chat_body("Say hi.", json!({"stream": true})),
    )
    .await;
    let (_, usage, _) = stream_text(&r.sse(), true);
    assert!(usage.is_none());

    // Completions, not streamed and streamed: same text.
    let cb = json!({"model": NAME, "prompt": "The three primary colors are", "max_tokens": 10, "temperature": 0});
    let r = post(a, "/v1/completions", &cb).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["object"], "text_completion");
    let ctext = v["choices"][0]["text"].as_str().expect("text").to_owned();
    assert!(!ctext.is_empty());
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(v["usage"]["completion_tokens"], 10);
    let mut sb = cb.clone();
    sb["stream"] = json!(true);
    let r = post(a, "/v1/completions", &sb).await;
    let (stext, _, finish) = stream_text(&r.sse(), false);
    assert_eq!(stext, ctext);
    assert_eq!(finish.as_deref(), Some("length"));

    // Token-id prompts and stop sequences.
    let mut tb = cb.clone();
    tb["prompt"] = json!([504, 1929, 3371]);
    assert_eq!(post(a, "/v1/completions", &tb).await.status, 200);
    let mut stop = cb.clone();
    stop["stop"] = json!([ctext.trim_start().chars().take(3).collect::<String>()]);
    let v = post(a, "/v1/completions", &stop).await.json();
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_error() {
    let mut cfg = ram_only();
    cfg.body_limit = 256 * 1024;
    let Some(srv) = TestServer::start(cfg).await else {
        return;
    };
    let a = srv.addr;
    // Malformed JSON.
    let r = http(a, "POST", "/v1/chat/completions", &[], b"{\"model\": ").await;
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"]["type"], "invalid_request_error");
    error_code(&r);
    let r = http(a, "POST", "/v1/completions", &[], b"[1,2]").await;
    assert_eq!(r.status, 400);
    // Missing fields / wrong types.
    let r = post(a, "/v1/chat/completions", &json!({"messages": []})).await;
    assert_eq!(r.status, 400);
    error_code(&r);
    let r = post(
        a,
        "/v1/chat/completions",
        &json!({"model": NAME, "messages": "hi"}),
    )
    .await;
    assert_eq!(r.status, 400);
    // Unknown model.
    let r = post(
        a,
        "/v1/chat/completions",
        &chat_body("hi", json!({"model": "no-such-model"})),
    )
    .await;
    assert_eq!(r.status, 404);
    assert_eq!(error_code(&r), "model_not_found");
    assert_eq!(r.json()["error"]["param"], "model");
    assert_eq!(
        http(a, "GET", "/v1/models/no-such-model", &[], b"")
            .await
            .status,
        404
    );
    // Prompt beyond the context (8192 tokens for the demo model).
    let big = json!({"model": NAME, "prompt": long_text(9000), "max_tokens": 4});
    let r = post(a, "/v1/completions", &big).await;
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(error_code(&r), "context_length_exceeded");
    // Prompt + max_tokens beyond the context.
    let r = post(
        a,
        "/v1/completions",
        &json!({"model": NAME, "prompt": long_text(8000), "max_tokens": 1000}),
    )
    .await;
    assert_eq!(r.status, 400);
    assert_eq!(error_code(&r), "context_length_exceeded");
    // max_tokens out of range.
    for m in [json!(0), json!(-3), json!(100_000)] {
        let r = post(
            a,
            "/v1/chat/completions",
            &chat_body("hi", json!({"max_tokens": m})),
        )
        .await;
        assert_eq!(r.status, 400, "max_tokens {m}");
        assert_eq!(r.json()["error"]["param"], "max_tokens");
    }
    let r = post(
        a,
        "/v1/chat/completions",
        &chat_body("hi", json!({"max_tokens": "many"})),
    )
    .await;
    assert_eq!(r.status, 400);
    // Other parameters.
    for extra in [
        json!({"temperature": 3}),
        json!({"n": 2}),
        json!({"top_p": 0}),
        json!({"stop": [""]}),
    ] {
        let r = post(a, "/v1/chat/completions", &chat_body("hi", extra.clone())).await;
        assert_eq!(r.status, 400, "{extra}");
        error_code(&r);
    }
    // Body too large.
    let huge = json!({"model": NAME, "prompt": "x".repeat(300 * 1024)});
    let r = post(a, "/v1/completions", &huge).await;
    assert_eq!(r.status, 413);
    assert_eq!(error_code(&r), "request_too_large");
    // Nothing above reached the engine.
    assert_eq!(srv.engine().stats().submitted.load(Ordering::Relaxed), 0);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_cache_and_http_caching() {
    let cfg = ServeConfig {
        kv: None,
        response_cache_budget: 64 * 1024,
        ..ServeConfig::default()
    };
    let Some(srv) = TestServer::start(cfg).await else {
        return;
    };
    let a = srv.addr;
    let body = chat_body("Name a color.", json!({"max_tokens": 8}));
    let r1 = post(a, "/v1/chat/completions", &body).await;
    assert_eq!(r1.status, 200);
    assert_eq!(r1.header("x-shoal-cache"), Some("miss"));
    let etag = r1.header("etag").expect("etag").to_owned();
    assert!(
        r1.header("cache-control")
            .is_some_and(|c| c.starts_with("public, max-age="))
    );
    let r2 = post(a, "/v1/chat/completions", &body).await;
    assert_eq!(r2.header("x-shoal-cache"), Some("hit"));
    assert_eq!(r2.header("etag"), Some(etag.as_str()));
    assert_eq!(r2.body, r1.body, "a hit is byte-identical");
    let submitted = srv.engine().stats().submitted.load(Ordering::Relaxed);
    assert_eq!(submitted, 1, "the hit did not run the model");
    // Normalization: key order, `user` and `stream` do not matter.
    let reordered = json!({"temperature": 0, "max_tokens": 8, "user": "alice",
        "messages": [{"content": "Name a color.", "role": "user"}], "model": NAME});
    assert_eq!(
        post(a, "/v1/chat/completions", &reordered)
            .await
            .header("x-shoal-cache"),
        Some("hit")
    );
    // Conditional request.
    let r = http(
        a,
        "POST",
        "/v1/chat/completions",
        &[("If-None-Match", etag.as_str())],
        body.to_string().as_bytes(),
    )
    .await;
    assert_eq!(r.status, 304);
    assert!(r.body.is_empty());
    let r = http(
        a,
        "POST",
        "/v1/chat/completions",
        &[("If-None-Match", "\"other\"")],
        body.to_string().as_bytes(),
    )
    .await;
    assert_eq!(r.status, 200);
    // Streaming request served from the cache as a stream.
    let mut sb = body.clone();
    sb["stream"] = json!(true);
    sb["stream_options"] = json!({"include_usage": true});
    let r = post(a, "/v1/chat/completions", &sb).await;
    assert_eq!(r.header("x-shoal-cache"), Some("hit"));
    assert!(
        r.header("content-type")
            .is_some_and(|c| c.starts_with("text/event-stream"))
    );
    let (text, usage, _) = stream_text(&r.sse(), true);
    assert_eq!(
        text,
        r1.json()["choices"][0]["message"]["content"]
            .as_str()
            .unwrap_or("?")
    );
    assert!(usage.is_some());
    assert_eq!(srv.engine().stats().submitted.load(Ordering::Relaxed), 1);
    // A fixed seed is deterministic too; a random temperature without seed is not cached.
    let seeded = chat_body(
        "Name a fruit.",
        json!({"temperature": 0.9, "seed": 7, "max_tokens": 6}),
    );
    assert_eq!(
        post(a, "/v1/chat/completions", &seeded)
            .await
            .header("x-shoal-cache"),
        Some("miss")
    );
    assert_eq!(
        post(a, "/v1/chat/completions", &seeded)
            .await
            .header("x-shoal-cache"),
        Some("hit")
    );
    let random = chat_body(
        "Name a fruit.",
        json!({"temperature": 0.9, "max_tokens": 4}),
    );
    for _ in 0..2 {
        let r = post(a, "/v1/chat/completions", &random).await;
        assert_eq!(r.header("x-shoal-cache"), Some("miss"));
        assert_eq!(r.header("cache-control"), Some("no-store"));
        assert!(r.header("etag").is_none());
    }
    // A stream miss fills the cache for a later non-stream request.
    let mut s2 = chat_body("Name an animal.", json!({"max_tokens": 6}));
    s2["stream"] = json!(true);
    let (stext, _, _) = stream_text(&post(a, "/v1/chat/completions", &s2).await.sse(), true);
    s2["stream"] = json!(false);
    let r = post(a, "/v1/chat/completions", &s2).await;
    assert_eq!(r.header("x-shoal-cache"), Some("hit"));
    assert_eq!(r.json()["choices"][0]["message"]["content"], json!(stext));
    // The budget holds under many distinct answers.
    let rc = srv.serving.response_cache().expect("rc").clone();
    for i in 0..6 {
        let b = json!({"model": NAME, "prompt": format!("Count to {i}:"), "max_tokens": 3, "temperature": 0});
        assert_eq!(post(a, "/v1/completions", &b).await.status, 200);
        assert!(rc.used() <= rc.budget());
    }
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_429_and_disconnect_cancels() {
    let mut cfg = ram_only();
    cfg.queue_depth = 0;
    cfg.parallel = 1;
    let Some(srv) = TestServer::start(cfg).await else {
        return;
    };
    let a = srv.addr;
    let long = json!({"model": NAME, "prompt": "Once upon a time", "max_tokens": 2000,
                      "temperature": 0, "ignore_eos": true, "stream": true});
    // The first request runs; wait for its first token.
    let (conn, _) = open_until(a, "/v1/completions", &long, "\"text\":\"").await;
    let engine = srv.engine();
    assert_eq!(engine.pending(), 1);
    // The queue (depth 0) is full: 429 with Retry-After.
    let r = post(
        a,
        "/v1/completions",
        &json!({"model": NAME, "prompt": "Hi", "max_tokens": 2}),
    )
    .await;
    assert_eq!(r.status, 429);
    assert!(
        r.header("retry-after")
            .and_then(|s| s.parse::<u64>().ok())
            .is_some_and(|s| s >= 1)
    );
    assert_eq!(r.json()["error"]["type"], "rate_limit_error");
    assert_eq!(error_code(&r), "queue_full");
    // The client goes away: its generation is cancelled (2000 tokens with
    // ignore_eos would otherwise end by length, not cancellation).
    drop(conn);
    eventually("the generation is cancelled", || {
        engine.stats().cancelled.load(Ordering::Relaxed) == 1 && engine.pending() == 0
    })
    .await;
    // A non-streaming client that disconnects is cancelled too.
    let mut nb = long.clone();
    nb["stream"] = json!(false);
    let mut s = tokio::net::TcpStream::connect(a).await.expect("connect");
    let body = nb.to_string();
    let req = format!(
        "POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    tokio::io::AsyncWriteExt::write_all(&mut s, req.as_bytes())
        .await
        .expect("write");
    eventually("the request runs", || engine.pending() == 1).await;
    drop(s);
    eventually("the non-streaming generation is cancelled", || {
        engine.stats().cancelled.load(Ordering::Relaxed) == 2 && engine.pending() == 0
    })
    .await;
    // Now there is room again.
    let r = post(
        a,
        "/v1/completions",
        &json!({"model": NAME, "prompt": "Hi", "max_tokens": 2}),
    )
    .await;
    assert_eq!(r.status, 200);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_drains_in_flight() {
    let Some(mut srv) = TestServer::start(ram_only()).await else {
        return;
    };
    let a = srv.addr;
    let body = json!({"model": NAME, "prompt": "Once upon a time", "max_tokens": 16,
                      "temperature": 0, "ignore_eos": true, "stream": true});
    let (conn, got) = open_until(a, "/v1/completions", &body, "\"text\":\"").await;
    srv.begin_shutdown();
    let all = read_rest(conn, got).await;
    let data = sse_data(&all);
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"), "{all}");
    let finishes = data
        .iter()
        .filter(|d| d.contains("\"finish_reason\":\"length\""))
        .count();
    assert_eq!(finishes, 1, "the in-flight request ran to its end");
    srv.stop().await;
    assert!(
        tokio::net::TcpStream::connect(a).await.is_err(),
        "no longer listening"
    );
}
