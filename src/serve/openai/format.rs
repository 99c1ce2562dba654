//! Response formatting: ids and timestamps, OpenAI JSON bodies and SSE
//! chunks ([`Fmt`]), cache headers, and the collection (JSON) or streaming
//! (SSE) of a generation's events, live or replayed from the response cache.

use super::error::OpenAiError;
use super::prepare::{Prepared, unique};
use super::schema::Kind;
use crate::inference::StopReason;
use crate::respcache::{self, CachedAnswer};
use crate::serve::engine::{CancelOnDrop, JobEvent};
use axum::body::Body;
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use serde_json::{Value, json};
use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use tokio::sync::mpsc;

pub(super) fn new_id(kind: Kind) -> String {
    let h = blake3::hash(&unique().to_le_bytes());
    let prefix = match kind {
        Kind::Chat => "chatcmpl-",
        Kind::Completion => "cmpl-",
    };
    format!("{prefix}{}", &h.to_hex()[..24])
}

pub(super) fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

pub(super) fn finish_reason(stop: StopReason) -> &'static str {
    match stop {
        StopReason::MaxTokens | StopReason::ContextFull => "length",
        _ => "stop",
    }
}

/// Builds response objects of one answer.
#[derive(Debug, Clone)]
pub(super) struct Fmt {
    pub(super) kind: Kind,
    pub(super) id: String,
    pub(super) created: u64,
    pub(super) model: String,
    /// This node's peer id, put in the body's (or the stream's first
    /// chunk's) `served_by` ([`crate::serve::ServeConfig::node_id`]).
    pub(super) served_by: Option<String>,
}

pub(super) fn usage(prompt: usize, completion: usize, cached: usize) -> Value {
    json!({
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    })
}

impl Fmt {
    pub(super) fn full(&self, text: &str, finish: &str, usage: Value) -> Value {
        let mut v = match self.kind {
            Kind::Chat => json!({
                "id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                "system_fingerprint": null,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "logprobs": null, "finish_reason": finish}],
                "usage": usage,
            }),
            Kind::Completion => json!({
                "id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                "system_fingerprint": null,
                "choices": [{"index": 0, "text": text, "logprobs": null, "finish_reason": finish}],
                "usage": usage,
            }),
        };
        crate::serve::add_served_by(&mut v, self.served_by.as_deref());
        v
    }

    /// `v` as the first chunk of a stream: with `served_by`.
    pub(super) fn first(&self, mut v: Value) -> Value {
        crate::serve::add_served_by(&mut v, self.served_by.as_deref());
        v
    }

    pub(super) fn chunk(
        &self,
        text: Option<&str>,
        role: bool,
        finish: Option<&str>,
        with_usage_null: bool,
    ) -> Value {
        let mut v = match self.kind {
            Kind::Chat => {
                let mut delta = serde_json::Map::new();
                if role {
                    delta.insert("role".into(), json!("assistant"));
                }
                if let Some(t) = text {
                    delta.insert("content".into(), json!(t));
                }
                json!({
                    "id": self.id, "object": "chat.completion.chunk", "created": self.created,
                    "model": self.model, "system_fingerprint": null,
                    "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}],
                })
            }
            Kind::Completion => json!({
                "id": self.id, "object": "text_completion", "created": self.created,
                "model": self.model, "system_fingerprint": null,
                "choices": [{"index": 0, "text": text.unwrap_or(""), "logprobs": null, "finish_reason": finish}],
            }),
        };
        if with_usage_null && let Some(o) = v.as_object_mut() {
            o.insert("usage".into(), Value::Null);
        }
        v
    }

    pub(super) fn usage_chunk(&self, usage: Value) -> Value {
        let object = match self.kind {
            Kind::Chat => "chat.completion.chunk",
            Kind::Completion => "text_completion",
        };
        json!({"id": self.id, "object": object, "created": self.created, "model": self.model,
               "system_fingerprint": null, "choices": [], "usage": usage})
    }
}

/// Cache-related response headers.
pub(super) struct CacheHeaders {
    pub(super) etag: Option<String>,
    pub(super) hit: bool,
    pub(super) max_age: u64,
}

impl CacheHeaders {
    pub(super) fn apply(&self, h: &mut HeaderMap) {
        h.insert(
            "x-shoal-cache",
            HeaderValue::from_static(if self.hit { "hit" } else { "miss" }),
        );
        match &self.etag {
            Some(e) => {
                if let Ok(v) = HeaderValue::from_str(e) {
                    h.insert(header::ETAG, v);
                }
                if let Ok(v) = HeaderValue::from_str(&format!("public, max-age={}", self.max_age)) {
                    h.insert(header::CACHE_CONTROL, v);
                }
            }
            None => {
                h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            }
        }
    }
}

pub(super) fn etag_matches(headers: &HeaderMap, etag: &str) -> bool {
    headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().trim_start_matches("W/"))
        .any(|t| t == "*" || t == etag)
}

pub(super) fn sse_event(v: &Value) -> Result<Event, Infallible> {
    Ok(Event::default().data(v.to_string()))
}

/// What a finished generation produced.
pub(super) struct Generated {
    pub(super) pieces: Vec<String>,
    pub(super) prompt_tokens: usize,
    pub(super) cached_tokens: usize,
    pub(super) completion_tokens: usize,
    pub(super) finish: &'static str,
}

pub(super) fn full_body(fmt: &Fmt, o: &Generated) -> Vec<u8> {
    let text: String = o.pieces.concat();
    fmt.full(
        &text,
        o.finish,
        usage(o.prompt_tokens, o.completion_tokens, o.cached_tokens),
    )
    .to_string()
    .into_bytes()
}

pub(super) fn remember(
    store: &Option<(Arc<respcache::ResponseCache>, [u8; 32])>,
    fmt: &Fmt,
    o: &Generated,
    body: Vec<u8>,
) {
    if let Some((c, k)) = store {
        c.insert(
            *k,
            CachedAnswer {
                body,
                pieces: o.pieces.clone(),
                finish_reason: o.finish.to_owned(),
                prompt_tokens: o.prompt_tokens,
                completion_tokens: o.completion_tokens,
                id: fmt.id.clone(),
                created: fmt.created,
            },
        );
    }
}

pub(super) async fn collect(
    mut rx: mpsc::UnboundedReceiver<JobEvent>,
    guard: CancelOnDrop,
    fmt: Fmt,
    store: Option<(Arc<respcache::ResponseCache>, [u8; 32])>,
) -> Result<Response, OpenAiError> {
    let mut o = Generated {
        pieces: Vec::new(),
        prompt_tokens: 0,
        cached_tokens: 0,
        completion_tokens: 0,
        finish: "stop",
    };
    while let Some(ev) = rx.recv().await {
        match ev {
            JobEvent::Started {
                prompt_tokens,
                cached_tokens,
            } => {
                o.prompt_tokens = prompt_tokens;
                o.cached_tokens = cached_tokens;
            }
            JobEvent::Token(t) => {
                if !t.is_empty() {
                    o.pieces.push(t);
                }
            }
            JobEvent::Done {
                stop,
                completion_tokens,
                tail,
                ..
            } => {
                drop(guard);
                if !tail.is_empty() {
                    o.pieces.push(tail);
                }
                o.completion_tokens = completion_tokens;
                o.finish = finish_reason(stop);
                if stop == StopReason::Cancelled {
                    return Err(OpenAiError::server("generation was cancelled"));
                }
                let body = full_body(&fmt, &o);
                remember(&store, &fmt, &o, body.clone());
                let mut r = Response::new(Body::from(body));
                r.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                );
                return Ok(r);
            }
            JobEvent::Failed(e) => {
                return Err(OpenAiError::server(format!("generation failed: {e}")));
            }
        }
    }
    Err(OpenAiError::server("generation ended without a result"))
}

/// Without its own keep-alive: a live stream sends its comments itself,
/// only once its first chunk went out ([`KEEP_ALIVE`]).
pub(super) fn sse_response<S>(stream: S) -> Response
where
    S: futures::Stream<Item = Result<Event, Infallible>> + Send + 'static,
{
    Sse::new(stream).into_response()
}

/// A live stream that sent its first chunk and then nothing for this long
/// sends an SSE comment line (`:`), so idle connections stay open through
/// proxies. None is sent before the first chunk: the first body bytes mean
/// that generation has begun.
pub(super) const KEEP_ALIVE: std::time::Duration = std::time::Duration::from_secs(15);

pub(super) fn replay_stream(
    ans: &CachedAnswer,
    kind: Kind,
    p: &Prepared,
    served_by: Option<&str>,
) -> Response {
    let fmt = Fmt {
        kind,
        id: ans.id.clone(),
        created: ans.created,
        model: p.model_name.clone(),
        served_by: served_by.map(str::to_owned),
    };
    let iu = p.include_usage;
    let mut evs = Vec::new();
    if kind == Kind::Chat {
        evs.push(fmt.chunk(Some(""), true, None, iu));
    }
    for piece in &ans.pieces {
        evs.push(fmt.chunk(Some(piece), false, None, iu));
    }
    evs.push(fmt.chunk(
        if kind == Kind::Chat { None } else { Some("") },
        false,
        Some(&ans.finish_reason),
        iu,
    ));
    if iu {
        evs.push(fmt.usage_chunk(usage(
            ans.prompt_tokens,
            ans.completion_tokens,
            ans.prompt_tokens,
        )));
    }
    if let Some(v) = evs.first_mut() {
        *v = fmt.first(std::mem::take(v));
    }
    let mut events: Vec<Result<Event, Infallible>> = evs.iter().map(sse_event).collect();
    events.push(Ok(Event::default().data("[DONE]")));
    sse_response(futures::stream::iter(events))
}

pub(super) struct LiveState {
    pub(super) rx: mpsc::UnboundedReceiver<JobEvent>,
    pub(super) _guard: CancelOnDrop,
    pub(super) fmt: Fmt,
    pub(super) include_usage: bool,
    pub(super) out: VecDeque<Event>,
    pub(super) done: bool,
    /// A chat stream's role chunk went out (with the first token, or at
    /// the end of an empty answer).
    pub(super) role_sent: bool,
    /// A chunk went out (the first carries `served_by`); keep-alive
    /// comments follow only then.
    pub(super) sent: bool,
    /// See [`KEEP_ALIVE`].
    pub(super) keep_alive: std::time::Duration,
    pub(super) outcome: Generated,
    pub(super) store: Option<(Arc<respcache::ResponseCache>, [u8; 32])>,
}

impl LiveState {
    /// Queues a chat stream's role chunk (`delta: {role, content: ""}`)
    /// once, just before the first text or the end: nothing is sent before
    /// the first token, so the first bytes of the body arrive with it (a
    /// router may still retry elsewhere a node that fails before then).
    fn role_chunk(&mut self) {
        if self.fmt.kind == Kind::Chat && !self.role_sent {
            self.role_sent = true;
            let v = self.fmt.chunk(Some(""), true, None, self.include_usage);
            self.push(v);
        }
    }

    /// Queues a JSON chunk; the first one gets `served_by`.
    fn push(&mut self, v: Value) {
        let v = if self.sent { v } else { self.fmt.first(v) };
        self.sent = true;
        self.out.push_back(Event::default().data(v.to_string()));
    }
}

pub(super) fn live_stream(
    rx: mpsc::UnboundedReceiver<JobEvent>,
    guard: CancelOnDrop,
    fmt: Fmt,
    include_usage: bool,
    store: Option<(Arc<respcache::ResponseCache>, [u8; 32])>,
) -> Response {
    live_stream_with(rx, guard, fmt, include_usage, store, KEEP_ALIVE)
}

/// [`live_stream`] with keep-alive comments every `keep_alive` (after the
/// first chunk).
fn live_stream_with(
    rx: mpsc::UnboundedReceiver<JobEvent>,
    guard: CancelOnDrop,
    fmt: Fmt,
    include_usage: bool,
    store: Option<(Arc<respcache::ResponseCache>, [u8; 32])>,
    keep_alive: std::time::Duration,
) -> Response {
    let st = LiveState {
        rx,
        _guard: guard,
        fmt,
        include_usage,
        out: VecDeque::new(),
        done: false,
        role_sent: false,
        sent: false,
        keep_alive,
        outcome: Generated {
            pieces: Vec::new(),
            prompt_tokens: 0,
            cached_tokens: 0,
            completion_tokens: 0,
            finish: "stop",
        },
        store,
    };
    let s = futures::stream::unfold(st, |mut st| async move {
        loop {
            if let Some(e) = st.out.pop_front() {
                return Some((Ok::<_, Infallible>(e), st));
            }
            if st.done {
                return None;
            }
            let iu = st.include_usage;
            let next = if st.sent {
                match tokio::time::timeout(st.keep_alive, st.rx.recv()).await {
                    Ok(next) => next,
                    Err(_) => {
                        st.out.push_back(Event::default().comment(""));
                        continue;
                    }
                }
            } else {
                st.rx.recv().await
            };
            match next {
                Some(JobEvent::Started {
                    prompt_tokens,
                    cached_tokens,
                }) => {
                    st.outcome.prompt_tokens = prompt_tokens;
                    st.outcome.cached_tokens = cached_tokens;
                }
                Some(JobEvent::Token(t)) => {
                    if !t.is_empty() {
                        st.role_chunk();
                        st.push(st.fmt.chunk(Some(&t), false, None, iu));
                        st.outcome.pieces.push(t);
                    }
                }
                Some(JobEvent::Done {
                    stop,
                    completion_tokens,
                    tail,
                    ..
                }) => {
                    st.role_chunk();
                    if !tail.is_empty() {
                        st.push(st.fmt.chunk(Some(&tail), false, None, iu));
                        st.outcome.pieces.push(tail);
                    }
                    st.outcome.completion_tokens = completion_tokens;
                    st.outcome.finish = finish_reason(stop);
                    let fin = st.outcome.finish;
                    let text = if st.fmt.kind == Kind::Chat {
                        None
                    } else {
                        Some("")
                    };
                    st.push(st.fmt.chunk(text, false, Some(fin), iu));
                    if iu {
                        let o = &st.outcome;
                        let u = usage(o.prompt_tokens, o.completion_tokens, o.cached_tokens);
                        st.push(st.fmt.usage_chunk(u));
                    }
                    st.out.push_back(Event::default().data("[DONE]"));
                    if stop != StopReason::Cancelled {
                        let body = full_body(&st.fmt, &st.outcome);
                        remember(&st.store, &st.fmt, &st.outcome, body);
                    }
                    st.done = true;
                }
                Some(JobEvent::Failed(e)) => {
                    let err = OpenAiError::server(format!("generation failed: {e}"));
                    st.push(err.body());
                    st.out.push_back(Event::default().data("[DONE]"));
                    st.done = true;
                }
                None => st.done = true,
            }
        }
    });
    sse_response(s.boxed())
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::BodyDataStream;
    use futures::FutureExt;
    use std::sync::atomic::AtomicBool;

    fn chat_fmt() -> Fmt {
        Fmt {
            kind: Kind::Chat,
            id: "chatcmpl-test".into(),
            created: 0,
            model: "m".into(),
            served_by: None,
        }
    }

    fn stream_of(rx: mpsc::UnboundedReceiver<JobEvent>) -> BodyDataStream {
        stream_with(rx, KEEP_ALIVE)
    }

    fn stream_with(
        rx: mpsc::UnboundedReceiver<JobEvent>,
        keep_alive: std::time::Duration,
    ) -> BodyDataStream {
        let guard = CancelOnDrop(Arc::new(AtomicBool::new(false)));
        live_stream_with(rx, guard, chat_fmt(), false, None, keep_alive)
            .into_body()
            .into_data_stream()
    }

    /// Every body byte ready now, without waiting.
    fn ready_text(body: &mut BodyDataStream) -> String {
        let mut s = String::new();
        while let Some(Some(Ok(b))) = body.next().now_or_never() {
            s.push_str(&String::from_utf8_lossy(&b));
        }
        s
    }

    /// The `data:` payloads of every body byte ready now, without waiting.
    fn ready(body: &mut BodyDataStream) -> Vec<String> {
        sse_data(&ready_text(body))
    }

    fn sse_data(text: &str) -> Vec<String> {
        text.lines()
            .filter_map(|l| l.strip_prefix("data:"))
            .map(|d| d.trim_start().to_owned())
            .collect()
    }

    fn delta(data: &str) -> Value {
        let v: Value = serde_json::from_str(data).unwrap_or_default();
        v["choices"][0]["delta"].clone()
    }

    fn started() -> JobEvent {
        JobEvent::Started {
            prompt_tokens: 5,
            cached_tokens: 0,
        }
    }

    /// A streamed chat sends nothing while its prompt is computed (after
    /// `Started`); the role chunk comes with the first token, just before it.
    #[tokio::test]
    async fn the_role_chunk_comes_with_the_first_token() {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut body = stream_of(rx);
        tx.send(started()).ok();
        assert_eq!(
            ready(&mut body),
            Vec::<String>::new(),
            "no byte before the first token"
        );
        tx.send(JobEvent::Token(String::new())).ok();
        assert_eq!(
            ready(&mut body),
            Vec::<String>::new(),
            "no byte for held-back text"
        );
        tx.send(JobEvent::Token("Hi".into())).ok();
        let got = ready(&mut body);
        assert_eq!(got.len(), 2, "role chunk then the token's: {got:?}");
        assert_eq!(delta(&got[0]), json!({"role": "assistant", "content": ""}));
        assert_eq!(delta(&got[1]), json!({"content": "Hi"}));
        tx.send(JobEvent::Token(" there".into())).ok();
        let got = ready(&mut body);
        assert_eq!(got.len(), 1, "one role chunk only: {got:?}");
        assert_eq!(delta(&got[0]), json!({"content": " there"}));
    }

    /// An empty answer still starts with the role chunk (sent at the end).
    #[tokio::test]
    async fn an_empty_answer_sends_the_role_chunk_at_the_end() {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut body = stream_of(rx);
        tx.send(started()).ok();
        tx.send(JobEvent::Done {
            stop: StopReason::EndOfSequence,
            completion_tokens: 1,
            tail: String::new(),
            ttft: std::time::Duration::ZERO,
        })
        .ok();
        let got = ready(&mut body);
        assert_eq!(got.len(), 3, "role, finish, [DONE]: {got:?}");
        assert_eq!(delta(&got[0]), json!({"role": "assistant", "content": ""}));
        let fin: Value = serde_json::from_str(&got[1]).unwrap_or_default();
        assert_eq!(fin["choices"][0]["finish_reason"], "stop");
        assert_eq!(got[2], "[DONE]");
    }

    /// No keep-alive comment before the first chunk, however long the
    /// prompt takes; after it, a comment when no token comes for a while.
    #[tokio::test]
    async fn keep_alive_comments_start_after_the_first_chunk() {
        let tick = std::time::Duration::from_millis(20);
        let (tx, rx) = mpsc::unbounded_channel();
        let mut body = stream_with(rx, tick);
        tx.send(started()).ok();
        // Ten keep-alive periods with nothing to say.
        let quiet = tokio::time::timeout(tick * 10, body.next()).await;
        assert!(quiet.is_err(), "no byte before the first token: {quiet:?}");
        tx.send(JobEvent::Token("Hi".into())).ok();
        let mut text = String::new();
        while !text.contains("\"Hi\"") {
            match tokio::time::timeout(tick * 10, body.next()).await {
                Ok(Some(Ok(b))) => text.push_str(&String::from_utf8_lossy(&b)),
                other => panic!("the token's chunk did not come: {other:?}"),
            }
        }
        assert!(!text.lines().any(|l| l.starts_with(':')), "{text:?}");
        // Now idle: a comment comes within a few periods.
        let next = tokio::time::timeout(tick * 50, body.next()).await;
        let b = match next {
            Ok(Some(Ok(b))) => b,
            other => panic!("no keep-alive after the first chunk: {other:?}"),
        };
        assert!(String::from_utf8_lossy(&b).starts_with(':'), "{b:?}");
    }
}
