//! `POST /api/chat` and `POST /api/generate`: resolve the model, prepare,
//! answer from the response cache or queue a generation on the model's
//! engine, and answer as NDJSON lines (`stream` true, the default) or one
//! JSON object. A client that goes away cancels its generation.

use super::Ollama;
use super::error::{OllamaError, locate_error};
use super::prepare::{Plan, Prepared, options, parse_body, prepare, refuse_unsupported, typed};
use super::schema::{Common, Kind};
use crate::inference::StopReason;
use crate::metrics::CacheOutcome;
use crate::respcache::{self, CachedAnswer, ResponseCache};
use crate::serve::engine::{CancelOnDrop, Job, JobEvent};
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use serde_json::{Value, json};
use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

pub(super) async fn chat(
    State(o): State<Arc<Ollama>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    served(&o, run(o.clone(), body, Kind::Chat).await)
}

pub(super) async fn generate(
    State(o): State<Arc<Ollama>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    served(&o, run(o.clone(), body, Kind::Generate).await)
}

pub(super) fn counted(o: &Ollama, r: Result<Response, OllamaError>) -> Response {
    let r = r.unwrap_or_else(IntoResponse::into_response);
    o.serving.metrics().request(r.status().as_u16());
    r
}

/// [`counted`], naming this node as the server of a generation response
/// ([`crate::serve::name_server`]), errors as well.
fn served(o: &Ollama, r: Result<Response, OllamaError>) -> Response {
    let mut r = counted(o, r);
    crate::serve::name_server(&mut r, o.serving.config().node_id.as_deref());
    r
}

/// Builds the response objects of one answer.
#[derive(Debug, Clone)]
struct Fmt {
    kind: Kind,
    /// The model as the request named it (Ollama echoes it).
    model: String,
    /// This node's peer id, put in the first line's (or the JSON answer's)
    /// `served_by` ([`crate::serve::ServeConfig::node_id`]).
    served_by: Option<String>,
}

/// When the phases of a request began and ended, for Ollama's durations.
#[derive(Debug, Clone, Copy)]
struct Timing {
    start: Instant,
    load: Duration,
    submitted: Instant,
    /// When the first token came (the prompt was evaluated).
    started: Option<Instant>,
}

fn ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

impl Fmt {
    /// A line with generated text (`done` false), or the whole text of a
    /// non-streamed answer before [`Fmt::finish`] adds the rest.
    fn piece(&self, text: &str) -> Value {
        let mut v = json!({"model": self.model, "created_at": super::now()});
        match self.kind {
            Kind::Chat => v["message"] = json!({"role": "assistant", "content": text}),
            Kind::Generate => v["response"] = json!(text),
        }
        v["done"] = json!(false);
        v
    }

    /// The last line: `done`, `done_reason`, counts and durations (ns),
    /// and for `/api/generate` the `context` to continue from.
    fn finish(
        &self,
        mut v: Value,
        done_reason: &str,
        o: &Outcome,
        t: &Timing,
        context: Option<Vec<u32>>,
    ) -> Value {
        let end = Instant::now();
        let started = t.started.unwrap_or(end);
        v["done"] = json!(true);
        v["done_reason"] = json!(done_reason);
        v["total_duration"] = json!(ns(end - t.start));
        v["load_duration"] = json!(ns(t.load));
        v["prompt_eval_count"] = json!(o.prompt_tokens);
        v["prompt_eval_duration"] = json!(ns(started.saturating_duration_since(t.submitted)));
        v["eval_count"] = json!(o.completion_tokens);
        v["eval_duration"] = json!(ns(end - started).max(1));
        // Ours: prompt tokens that came from the prefix cache.
        v["prompt_cached_count"] = json!(o.cached_tokens);
        if let Some(c) = context {
            v["context"] = json!(c);
        }
        v
    }

    /// `v` as the first line of a stream, or as the JSON answer: with `served_by`.
    fn first(&self, mut v: Value) -> Value {
        crate::serve::add_served_by(&mut v, self.served_by.as_deref());
        v
    }
}

/// What a finished generation produced.
#[derive(Debug, Default)]
struct Outcome {
    text: String,
    pieces: Vec<String>,
    prompt_tokens: usize,
    cached_tokens: usize,
    completion_tokens: usize,
}

fn done_reason(stop: StopReason) -> &'static str {
    match stop {
        StopReason::MaxTokens | StopReason::ContextFull => "length",
        _ => "stop",
    }
}

/// The response cache entry of this request, when its answer is deterministic.
type Store = Option<(Arc<ResponseCache>, [u8; 32])>;

// long: (~105 lines), kept whole: the request's steps in order (parse,
// refuse, resolve, prepare, cache, admit, submit, answer), each an early return.
async fn run(
    o: Arc<Ollama>,
    body: Result<Bytes, BytesRejection>,
    kind: Kind,
) -> Result<Response, OllamaError> {
    let start = Instant::now();
    let v = tokio::task::spawn_blocking(move || parse_body(body))
        .await
        .map_err(|e| OllamaError::server(format!("parsing the request failed: {e}")))??;
    if v.get("model")
        .and_then(Value::as_str)
        .is_none_or(str::is_empty)
    {
        return Err(OllamaError::bad("model is required"));
    }
    let c: Common = typed(&v)?;
    refuse_unsupported(&c, &v)?;
    let opts = options(c.options.as_ref())?;
    let served = o
        .serving
        .resolve(&c.model)
        .await
        .map_err(|e| locate_error(&c.model, e))?;
    let load = start.elapsed();
    let fmt = Fmt {
        kind,
        model: c.model.clone(),
        served_by: o.serving.config().node_id.clone(),
    };
    let stream = c.stream.unwrap_or(true);
    let plan = {
        let v = Arc::new(v);
        crate::serve::prepare_off_runtime(move || prepare(served, &v, kind, &opts))
            .await
            .map_err(OllamaError::server)??
    };
    let mut t = Timing {
        start,
        load,
        submitted: Instant::now(),
        started: None,
    };
    let p = match plan {
        Plan::Generate(p) => p,
        Plan::Load => {
            // Ollama's answer to an empty prompt: the model is loaded.
            let line = fmt.finish(fmt.piece(""), "load", &Outcome::default(), &t, None);
            let mut line = line;
            if let Some(o) = line.as_object_mut() {
                for k in [
                    "total_duration",
                    "load_duration",
                    "prompt_eval_count",
                    "prompt_eval_duration",
                    "eval_count",
                    "eval_duration",
                    "prompt_cached_count",
                ] {
                    o.remove(k);
                }
            }
            return Ok(one(&fmt.first(line), stream));
        }
    };
    let engine = p.served.engine.clone();
    let rc = o.serving.response_cache().cloned();
    let store: Store = match (rc, &p.cache_material) {
        (Some(c), Some(m)) => respcache::key(&engine.model().id(), kind.endpoint(), m)
            .ok()
            .map(|k| (c, k)),
        _ => None,
    };
    if let Some((c, k)) = &store
        && let Some(ans) = c.get(k)
    {
        o.serving.metrics().ttft(CacheOutcome::Response, 0.0);
        t.started = Some(Instant::now());
        return Ok(with_cache_header(replay(&fmt, &ans, &p, &t, stream), true));
    }
    let Some(permit) = engine.try_admit() else {
        return Err(OllamaError {
            retry_after: Some(engine.retry_after_secs()),
            ..OllamaError::new(
                StatusCode::TOO_MANY_REQUESTS,
                format!(
                    "server busy: the queue of model '{}' is full; retry later",
                    fmt.model
                ),
            )
        });
    };
    let (tx, rx) = mpsc::unbounded_channel();
    let cancel = Arc::new(AtomicBool::new(false));
    let guard = CancelOnDrop(cancel.clone());
    engine.submit(
        permit,
        Job {
            prompt: p.prompt.clone(),
            cfg: p.gen_cfg.clone(),
            cancel,
            events: tx,
        },
    );
    t.submitted = Instant::now();
    let live = Live {
        rx,
        _guard: guard,
        fmt,
        t,
        p,
        store,
        outcome: Outcome::default(),
        sent: false,
    };
    let r = if stream {
        live_stream(live)
    } else {
        collect(live).await?
    };
    Ok(with_cache_header(r, false))
}

fn with_cache_header(mut r: Response, hit: bool) -> Response {
    r.headers_mut().insert(
        "x-shoal-cache",
        HeaderValue::from_static(if hit { "hit" } else { "miss" }),
    );
    r
}

/// One JSON object: as a one-line NDJSON stream or as a JSON body.
fn one(v: &Value, stream: bool) -> Response {
    if stream {
        ndjson(futures::stream::iter([Ok(line(v))]).boxed())
    } else {
        axum::Json(v).into_response()
    }
}

fn line(v: &Value) -> Bytes {
    let mut b = v.to_string().into_bytes();
    b.push(b'\n');
    Bytes::from(b)
}

fn ndjson(s: futures::stream::BoxStream<'static, Result<Bytes, Infallible>>) -> Response {
    let mut r = Response::new(Body::from_stream(s));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-ndjson"),
    );
    r
}

/// The `context` of a `/api/generate` answer: its prompt and its output's
/// tokens (the output re-encoded from its text).
fn context(fmt: &Fmt, p: &Prepared, text: &str) -> Option<Vec<u32>> {
    (fmt.kind == Kind::Generate).then(|| {
        let tok = p.served.engine.model().tokenizer();
        let mut c = p.prompt.clone();
        c.extend(tok.encode(text, false, false));
        c
    })
}

/// A cached answer, replayed.
fn replay(fmt: &Fmt, ans: &CachedAnswer, p: &Prepared, t: &Timing, stream: bool) -> Response {
    let o = Outcome {
        text: ans.pieces.concat(),
        pieces: Vec::new(),
        prompt_tokens: ans.prompt_tokens,
        cached_tokens: ans.prompt_tokens,
        completion_tokens: ans.completion_tokens,
    };
    let ctx = context(fmt, p, &o.text);
    if !stream {
        let v = fmt.finish(fmt.piece(&o.text), &ans.finish_reason, &o, t, ctx);
        return axum::Json(fmt.first(v)).into_response();
    }
    let mut lines: Vec<Value> = ans.pieces.iter().map(|s| fmt.piece(s)).collect();
    lines.push(fmt.finish(fmt.piece(""), &ans.finish_reason, &o, t, ctx));
    if let Some(v) = lines.first_mut() {
        *v = fmt.first(std::mem::take(v));
    }
    let lines: Vec<Result<Bytes, Infallible>> = lines.iter().map(|v| Ok(line(v))).collect();
    ndjson(futures::stream::iter(lines).boxed())
}

/// A running generation and what the answer needs.
struct Live {
    rx: mpsc::UnboundedReceiver<JobEvent>,
    _guard: CancelOnDrop,
    fmt: Fmt,
    t: Timing,
    p: Box<Prepared>,
    store: Store,
    outcome: Outcome,
    /// A line went out (the first carries `served_by`).
    sent: bool,
}

impl Live {
    /// Records a finished answer in the response cache.
    fn remember(&self, reason: &str) {
        if let Some((c, k)) = &self.store {
            let o = &self.outcome;
            c.insert(
                *k,
                CachedAnswer {
                    body: o.text.clone().into_bytes(),
                    pieces: o.pieces.clone(),
                    finish_reason: reason.to_owned(),
                    prompt_tokens: o.prompt_tokens,
                    completion_tokens: o.completion_tokens,
                    id: String::new(),
                    created: 0,
                },
            );
        }
    }

    /// Takes one event in; returns the text it adds, or at the end the
    /// done reason (`Err` when the generation failed or was cancelled).
    fn take(&mut self, ev: JobEvent) -> Step {
        match ev {
            JobEvent::Started {
                prompt_tokens,
                cached_tokens,
            } => {
                self.outcome.prompt_tokens = prompt_tokens;
                self.outcome.cached_tokens = cached_tokens;
                Step::Text(String::new())
            }
            JobEvent::Token(s) => {
                self.t.started.get_or_insert_with(Instant::now);
                self.push(&s);
                Step::Text(s)
            }
            JobEvent::Done {
                stop,
                completion_tokens,
                tail,
                ..
            } => {
                self.push(&tail);
                self.outcome.completion_tokens = completion_tokens;
                if stop == StopReason::Cancelled {
                    return Step::Failed("generation was cancelled".into());
                }
                let reason = done_reason(stop);
                self.remember(reason);
                Step::Done(tail, reason)
            }
            JobEvent::Failed(e) => Step::Failed(format!("generation failed: {e}")),
        }
    }

    /// `v` as the next NDJSON line of the stream (the first with `served_by`).
    fn line(&mut self, v: Value) -> Bytes {
        let v = if self.sent { v } else { self.fmt.first(v) };
        self.sent = true;
        line(&v)
    }

    fn push(&mut self, s: &str) {
        if !s.is_empty() {
            self.outcome.text.push_str(s);
            self.outcome.pieces.push(s.to_owned());
        }
    }

    fn last(&self, reason: &str, with_text: bool) -> Value {
        let text = if with_text {
            self.outcome.text.as_str()
        } else {
            ""
        };
        let ctx = context(&self.fmt, &self.p, &self.outcome.text);
        self.fmt
            .finish(self.fmt.piece(text), reason, &self.outcome, &self.t, ctx)
    }
}

enum Step {
    Text(String),
    Done(String, &'static str),
    Failed(String),
}

async fn collect(mut l: Live) -> Result<Response, OllamaError> {
    while let Some(ev) = l.rx.recv().await {
        match l.take(ev) {
            Step::Text(_) => {}
            Step::Done(_, reason) => {
                let v = l.fmt.first(l.last(reason, true));
                return Ok(axum::Json(v).into_response());
            }
            Step::Failed(m) => return Err(OllamaError::server(m)),
        }
    }
    Err(OllamaError::server("generation ended without a result"))
}

fn live_stream(l: Live) -> Response {
    let s = futures::stream::unfold(Some(l), |st| async move {
        let mut l = st?;
        loop {
            let ev = l.rx.recv().await?;
            match l.take(ev) {
                Step::Text(s) if s.is_empty() => {}
                Step::Text(s) => {
                    let b = l.line(l.fmt.piece(&s));
                    return Some((Ok(b), Some(l)));
                }
                Step::Done(tail, reason) => {
                    let mut out = Vec::new();
                    if !tail.is_empty() {
                        let b = l.line(l.fmt.piece(&tail));
                        out.extend_from_slice(&b);
                    }
                    let b = l.line(l.last(reason, false));
                    out.extend_from_slice(&b);
                    return Some((Ok(Bytes::from(out)), None));
                }
                Step::Failed(m) => {
                    let b = l.line(OllamaError::server(m).body());
                    return Some((Ok(b), None));
                }
            }
        }
    });
    ndjson(s.boxed())
}
