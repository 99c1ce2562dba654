//! The OpenAI-compatible routes: `POST /v1/chat/completions`,
//! `POST /v1/completions`, `GET /v1/models`, `GET /v1/models/{model}`.

use super::engine::{CancelOnDrop, Job, JobEvent};
use super::{Served, Serving};
use crate::inference::{ChatMessage, GenerateConfig, SamplerConfig, StopReason};
use crate::respcache::{self, CachedAnswer};
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures::StreamExt;
use serde::Deserialize;
use serde_json::{Value, json};
use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use tokio::sync::mpsc;

/// The routes, with `serving` as their state, ready to merge into a node's router.
pub fn router(serving: Arc<Serving>) -> Router {
    let limit = serving.config().body_limit;
    Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(list_models))
        .route("/v1/models/{model}", get(get_model))
        .layer(DefaultBodyLimit::max(limit))
        .with_state(serving)
}

/// An OpenAI-style error response.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
    ty: &'static str,
    param: Option<&'static str>,
    code: Option<&'static str>,
    retry_after: Option<u64>,
}

impl ApiError {
    fn invalid(
        message: impl Into<String>,
        param: Option<&'static str>,
        code: Option<&'static str>,
    ) -> ApiError {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            ty: "invalid_request_error",
            param,
            code,
            retry_after: None,
        }
    }

    fn server(message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: message.into(),
            ty: "server_error",
            param: None,
            code: None,
            retry_after: None,
        }
    }

    fn body(&self) -> Value {
        json!({"error": {
            "message": self.message,
            "type": self.ty,
            "param": self.param,
            "code": self.code,
        }})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status, axum::Json(self.body())).into_response();
        if let Some(s) = self.retry_after
            && let Ok(v) = HeaderValue::from_str(&s.to_string())
        {
            r.headers_mut().insert(header::RETRY_AFTER, v);
        }
        r
    }
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum StopParam {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize, Default)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

/// Parameters shared by both endpoints.
#[derive(Debug, Deserialize)]
struct Params {
    /// Required (its absence is reported from here); `run` reads it first.
    #[allow(dead_code)]
    model: String,
    #[serde(default)]
    max_tokens: Option<i64>,
    #[serde(default)]
    max_completion_tokens: Option<i64>,
    #[serde(default)]
    temperature: Option<f32>,
    #[serde(default)]
    top_p: Option<f32>,
    #[serde(default)]
    top_k: Option<usize>,
    #[serde(default)]
    min_p: Option<f32>,
    #[serde(default)]
    repeat_penalty: Option<f32>,
    #[serde(default)]
    seed: Option<u64>,
    #[serde(default)]
    stop: Option<StopParam>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    #[serde(default)]
    n: Option<u32>,
    #[serde(default)]
    ignore_eos: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Debug, Deserialize)]
struct Part {
    #[serde(rename = "type")]
    ty: String,
    #[serde(default)]
    text: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Message {
    role: String,
    #[serde(default)]
    content: Option<Content>,
}

#[derive(Debug, Deserialize)]
struct ChatBody {
    messages: Vec<Message>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum PromptParam {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<u32>),
}

#[derive(Debug, Deserialize)]
struct CompletionBody {
    prompt: PromptParam,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Chat,
    Completion,
}

impl Kind {
    fn endpoint(self) -> &'static str {
        match self {
            Kind::Chat => "chat.completions",
            Kind::Completion => "completions",
        }
    }
}

fn parse_body(body: Result<Bytes, BytesRejection>) -> Result<Value, ApiError> {
    let bytes = body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError {
                status: StatusCode::PAYLOAD_TOO_LARGE,
                message: "The request body is too large.".into(),
                ty: "invalid_request_error",
                param: None,
                code: Some("request_too_large"),
                retry_after: None,
            }
        } else {
            ApiError::invalid(format!("Could not read the request body: {e}"), None, None)
        }
    })?;
    let v: Value = serde_json::from_slice(&bytes).map_err(|e| {
        ApiError::invalid(
            format!("We could not parse the JSON body of your request ({e})."),
            None,
            None,
        )
    })?;
    if !v.is_object() {
        return Err(ApiError::invalid(
            "The request body must be a JSON object.",
            None,
            None,
        ));
    }
    Ok(v)
}

fn typed<T: serde::de::DeserializeOwned>(v: &Value) -> Result<T, ApiError> {
    T::deserialize(v).map_err(|e| ApiError::invalid(format!("Invalid request: {e}"), None, None))
}

async fn chat(
    State(s): State<Arc<Serving>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    counted(run(s, headers, body, Kind::Chat).await)
}

async fn completions(
    State(s): State<Arc<Serving>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    counted(run(s, headers, body, Kind::Completion).await)
}

fn counted(r: Result<Response, ApiError>) -> Response {
    let r = r.unwrap_or_else(IntoResponse::into_response);
    crate::metrics::global().request(r.status().as_u16());
    r
}

fn model_json(s: &Served) -> Value {
    json!({"id": s.engine.name(), "object": "model", "created": 0, "owned_by": "shoal",
           "shoal_model_id": s.id_hex,
           "context_length": s.engine.model().hparams().context_length})
}

async fn list_models(State(s): State<Arc<Serving>>) -> Response {
    let data: Vec<Value> = s.models().iter().map(|m| model_json(m)).collect();
    axum::Json(json!({"object": "list", "data": data})).into_response()
}

async fn get_model(State(s): State<Arc<Serving>>, Path(name): Path<String>) -> Response {
    if let Err(e) = super::check_model_name(&name) {
        return locate_error(&name, e).into_response();
    }
    match s.model(&name) {
        Some(m) => axum::Json(model_json(&m)).into_response(),
        None => unknown_model(&name).into_response(),
    }
}

/// The error response of a model that cannot be served. Names in messages
/// are cut to [`super::MAX_MODEL_NAME`] bytes.
fn locate_error(name: &str, e: super::LocateError) -> ApiError {
    use super::LocateError as L;
    let mut cut = name.len().min(super::MAX_MODEL_NAME);
    while !name.is_char_boundary(cut) {
        cut -= 1;
    }
    let name = &name[..cut];
    let unavailable = |message: String, code: &'static str, retry_after: Option<u64>| ApiError {
        status: StatusCode::SERVICE_UNAVAILABLE,
        message,
        ty: "server_error",
        param: Some("model"),
        code: Some(code),
        retry_after,
    };
    match e {
        L::Unknown(m) => ApiError {
            message: m,
            ..unknown_model(name)
        },
        L::Unavailable(m) => unavailable(
            format!("The model `{name}` is not available on this node: {m}"),
            "model_unavailable",
            None,
        ),
        L::Corrupt(m) => unavailable(m, "model_corrupt", Some(30)),
        L::Busy {
            message,
            retry_after,
        } => unavailable(
            format!("The model `{name}` cannot be loaded now: {message}"),
            "models_busy",
            Some(retry_after),
        ),
        L::Invalid(m) => ApiError::invalid(m, Some("model"), Some("string_above_max_length")),
    }
}

fn unknown_model(name: &str) -> ApiError {
    ApiError {
        status: StatusCode::NOT_FOUND,
        message: format!("The model `{name}` does not exist or is not served by this node."),
        ty: "invalid_request_error",
        param: Some("model"),
        code: Some("model_not_found"),
        retry_after: None,
    }
}

/// Everything a request needs once validated.
struct Prepared {
    served: Arc<Served>,
    prompt: Vec<u32>,
    gen_cfg: GenerateConfig,
    stream: bool,
    include_usage: bool,
    model_name: String,
}

fn prepare(served: Arc<Served>, v: &Value, kind: Kind) -> Result<Prepared, ApiError> {
    let p: Params = typed(v)?;
    if p.n.unwrap_or(1) != 1 {
        return Err(ApiError::invalid(
            "Only n = 1 is supported.",
            Some("n"),
            Some("invalid_value"),
        ));
    }
    let temperature = p.temperature.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::invalid(
            format!("{temperature} is not valid for temperature: expected a number in [0, 2]."),
            Some("temperature"),
            Some("invalid_value"),
        ));
    }
    let top_p = p.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::invalid(
            "top_p must be in (0, 1].",
            Some("top_p"),
            Some("invalid_value"),
        ));
    }
    let model = served.engine.model();
    let tok = model.tokenizer();
    let ctx = model.hparams().context_length;
    let prompt: Vec<u32> = match kind {
        Kind::Chat => {
            let body: ChatBody = typed(v)?;
            if body.messages.is_empty() {
                return Err(ApiError::invalid(
                    "messages must not be empty.",
                    Some("messages"),
                    None,
                ));
            }
            let msgs: Vec<ChatMessage> = body
                .messages
                .iter()
                .map(|m| {
                    let text = match &m.content {
                        None => String::new(),
                        Some(Content::Text(t)) => t.clone(),
                        Some(Content::Parts(ps)) => ps
                            .iter()
                            .filter(|p| p.ty == "text")
                            .filter_map(|p| p.text.as_deref())
                            .collect::<Vec<_>>()
                            .join(""),
                    };
                    ChatMessage::new(&m.role, &text)
                })
                .collect();
            let text = served
                .template
                .render(&msgs, true)
                .map_err(|e| ApiError::invalid(e.to_string(), Some("messages"), None))?;
            let bos_text = tok
                .bos()
                .map(|b| String::from_utf8_lossy(tok.token_bytes(b)).into_owned());
            let has_bos = bos_text.is_some_and(|b| !b.is_empty() && text.starts_with(&b));
            tok.encode(&text, true, !has_bos)
        }
        Kind::Completion => {
            let body: CompletionBody = typed(v)?;
            match body.prompt {
                PromptParam::Text(t) => tok.encode(&t, false, true),
                PromptParam::Texts(ts) if ts.len() == 1 => tok.encode(&ts[0], false, true),
                PromptParam::Texts(_) => {
                    return Err(ApiError::invalid(
                        "Only one prompt per request is supported.",
                        Some("prompt"),
                        Some("invalid_value"),
                    ));
                }
                PromptParam::Tokens(ids) => {
                    if let Some(bad) = ids.iter().find(|&&i| i as usize >= tok.vocab_size()) {
                        return Err(ApiError::invalid(
                            format!("Token id {bad} is outside the vocabulary."),
                            Some("prompt"),
                            Some("invalid_value"),
                        ));
                    }
                    ids
                }
            }
        }
    };
    let prompt = if prompt.is_empty() {
        tok.bos()
            .map(|b| vec![b])
            .ok_or_else(|| ApiError::invalid("The prompt is empty.", Some("prompt"), None))?
    } else {
        prompt
    };
    let context_err = |need: usize| {
        ApiError::invalid(
            format!(
                "This model's maximum context length is {ctx} tokens. However, you requested {need} tokens ({} in the prompt). Please reduce the length of the prompt or max_tokens.",
                prompt.len()
            ),
            Some("messages"),
            Some("context_length_exceeded"),
        )
    };
    if prompt.len() >= ctx {
        return Err(context_err(prompt.len()));
    }
    let max_tokens = match p.max_completion_tokens.or(p.max_tokens) {
        None => ctx - prompt.len(),
        Some(m) if m < 1 || m as u64 > ctx as u64 => {
            return Err(ApiError::invalid(
                format!("max_tokens is {m}, but it must be between 1 and {ctx}."),
                Some("max_tokens"),
                Some("invalid_value"),
            ));
        }
        Some(m) => {
            let m = m as usize;
            if prompt.len() + m > ctx {
                return Err(context_err(prompt.len() + m));
            }
            m
        }
    };
    let stop = match p.stop {
        None => Vec::new(),
        Some(StopParam::One(s)) => vec![s],
        Some(StopParam::Many(v)) => v,
    };
    if stop.len() > 4 || stop.iter().any(String::is_empty) {
        return Err(ApiError::invalid(
            "stop must hold at most 4 non-empty strings.",
            Some("stop"),
            Some("invalid_value"),
        ));
    }
    let sampler = SamplerConfig {
        temperature,
        top_k: p.top_k.unwrap_or(0),
        top_p,
        min_p: p.min_p.unwrap_or(0.0),
        repeat_penalty: p.repeat_penalty.unwrap_or(1.0),
        repeat_last_n: 64,
        seed: p.seed.unwrap_or_else(random_seed),
    };
    sampler
        .validate()
        .map_err(|e| ApiError::invalid(e.to_string(), None, Some("invalid_value")))?;
    let stream = p.stream.unwrap_or(false);
    Ok(Prepared {
        model_name: served.engine.name().to_owned(),
        served,
        prompt,
        gen_cfg: GenerateConfig {
            max_tokens,
            sampler,
            stop,
            stop_at_eos: !p.ignore_eos.unwrap_or(false),
        },
        stream,
        include_usage: stream && p.stream_options.is_some_and(|o| o.include_usage),
    })
}

fn random_seed() -> u64 {
    let mut b = [0u8; 8];
    if getrandom::fill(&mut b).is_err() {
        return unique() as u64;
    }
    u64::from_le_bytes(b)
}

fn unique() -> u128 {
    static N: AtomicU64 = AtomicU64::new(0);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    t ^ (u128::from(N.fetch_add(1, Ordering::Relaxed)) << 64)
}

fn new_id(kind: Kind) -> String {
    let h = blake3::hash(&unique().to_le_bytes());
    let prefix = match kind {
        Kind::Chat => "chatcmpl-",
        Kind::Completion => "cmpl-",
    };
    format!("{prefix}{}", &h.to_hex()[..24])
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn finish_reason(stop: StopReason) -> &'static str {
    match stop {
        StopReason::MaxTokens | StopReason::ContextFull => "length",
        _ => "stop",
    }
}

/// Builds response objects of one answer.
#[derive(Debug, Clone)]
struct Fmt {
    kind: Kind,
    id: String,
    created: u64,
    model: String,
}

fn usage(prompt: usize, completion: usize, cached: usize) -> Value {
    json!({
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    })
}

impl Fmt {
    fn full(&self, text: &str, finish: &str, usage: Value) -> Value {
        match self.kind {
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
        }
    }

    fn chunk(
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

    fn usage_chunk(&self, usage: Value) -> Value {
        let object = match self.kind {
            Kind::Chat => "chat.completion.chunk",
            Kind::Completion => "text_completion",
        };
        json!({"id": self.id, "object": object, "created": self.created, "model": self.model,
               "system_fingerprint": null, "choices": [], "usage": usage})
    }
}

/// Cache-related response headers.
struct CacheHeaders {
    etag: Option<String>,
    hit: bool,
    max_age: u64,
}

impl CacheHeaders {
    fn apply(&self, h: &mut HeaderMap) {
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

fn etag_matches(headers: &HeaderMap, etag: &str) -> bool {
    headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().trim_start_matches("W/"))
        .any(|t| t == "*" || t == etag)
}

fn sse_event(v: &Value) -> Result<Event, Infallible> {
    Ok(Event::default().data(v.to_string()))
}

/// Longest a request may spend validating, rendering its chat template and
/// tokenizing its prompt (on a blocking thread) before it fails.
const PREPARE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

async fn run(
    s: Arc<Serving>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
    kind: Kind,
) -> Result<Response, ApiError> {
    // Parsing a large body, rendering the model's chat template (which comes
    // with the model file, so may be anyone's) and tokenizing a long prompt
    // are CPU work: they run on a blocking thread, never on the async
    // runtime. The render is bounded (`TemplateLimits`); this timeout bounds
    // the request even if one step of a hostile template is slow.
    let v = tokio::task::spawn_blocking(move || parse_body(body))
        .await
        .map_err(|e| ApiError::server(format!("parsing the request failed: {e}")))??;
    let v = Arc::new(v);
    let Some(name) = v.get("model").and_then(Value::as_str) else {
        // Missing or not a string: say so as the typed parse words it.
        typed::<Params>(&v)?;
        return Err(ApiError::invalid(
            "model must be a string.",
            Some("model"),
            None,
        ));
    };
    let served = s.resolve(name).await.map_err(|e| locate_error(name, e))?;
    let p = {
        let limit = PREPARE_TIMEOUT;
        let v = v.clone();
        let job = tokio::task::spawn_blocking(move || prepare(served, &v, kind));
        match tokio::time::timeout(limit, job).await {
            Ok(Ok(p)) => p?,
            Ok(Err(e)) => {
                return Err(ApiError::server(format!(
                    "preparing the prompt failed: {e}"
                )));
            }
            Err(_) => {
                return Err(ApiError::server(format!(
                    "template limit: rendering the chat template and tokenizing the prompt took longer than {limit:?}"
                )));
            }
        }
    };
    let engine = p.served.engine.clone();
    // Response cache.
    let rc = s
        .response_cache()
        .filter(|_| respcache::is_deterministic(&v))
        .cloned();
    let key = match &rc {
        Some(_) => respcache::key(&engine.model().id(), kind.endpoint(), &v).ok(),
        None => None,
    };
    let max_age = rc.as_ref().map_or(0, |c| c.ttl().as_secs());
    let etag = key.map(|k| format!("\"{}\"", hex::encode(k)));
    let cached = match (&rc, &key) {
        (Some(c), Some(k)) => {
            let a = c.get(k);
            crate::metrics::global().response_cache_lookup(a.is_some());
            a
        }
        _ => None,
    };
    if let (Some(ans), Some(tag)) = (cached, &etag) {
        crate::metrics::global().ttft(crate::metrics::CacheOutcome::Response, 0.0);
        let ch = CacheHeaders {
            etag: Some(tag.clone()),
            hit: true,
            max_age,
        };
        if etag_matches(&headers, tag) {
            let mut r = StatusCode::NOT_MODIFIED.into_response();
            ch.apply(r.headers_mut());
            return Ok(r);
        }
        let mut r = if p.stream {
            replay_stream(&ans, kind, &p)
        } else {
            let mut r = Response::new(Body::from(ans.body.clone()));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            r
        };
        ch.apply(r.headers_mut());
        return Ok(r);
    }
    let Some(permit) = engine.try_admit() else {
        return Err(ApiError {
            status: StatusCode::TOO_MANY_REQUESTS,
            message: format!(
                "The queue of model `{}` is full; retry later.",
                engine.name()
            ),
            ty: "rate_limit_error",
            param: None,
            code: Some("queue_full"),
            retry_after: Some(engine.retry_after_secs()),
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
    let fmt = Fmt {
        kind,
        id: new_id(kind),
        created: now_secs(),
        model: p.model_name.clone(),
    };
    let ch = CacheHeaders {
        etag: etag.clone(),
        hit: false,
        max_age,
    };
    let store = match (rc, key) {
        (Some(c), Some(k)) => Some((c, k)),
        _ => None,
    };
    let mut r = if p.stream {
        live_stream(rx, guard, fmt, p.include_usage, store)
    } else {
        collect(rx, guard, fmt, store).await?
    };
    ch.apply(r.headers_mut());
    Ok(r)
}

/// What a finished generation produced.
struct Outcome {
    pieces: Vec<String>,
    prompt_tokens: usize,
    cached_tokens: usize,
    completion_tokens: usize,
    finish: &'static str,
}

fn full_body(fmt: &Fmt, o: &Outcome) -> Vec<u8> {
    let text: String = o.pieces.concat();
    fmt.full(
        &text,
        o.finish,
        usage(o.prompt_tokens, o.completion_tokens, o.cached_tokens),
    )
    .to_string()
    .into_bytes()
}

fn remember(
    store: &Option<(Arc<respcache::ResponseCache>, [u8; 32])>,
    fmt: &Fmt,
    o: &Outcome,
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
        crate::metrics::global().response_cache_bytes(c.used());
    }
}

async fn collect(
    mut rx: mpsc::UnboundedReceiver<JobEvent>,
    guard: CancelOnDrop,
    fmt: Fmt,
    store: Option<(Arc<respcache::ResponseCache>, [u8; 32])>,
) -> Result<Response, ApiError> {
    let mut o = Outcome {
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
                    return Err(ApiError::server("generation was cancelled"));
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
            JobEvent::Failed(e) => return Err(ApiError::server(format!("generation failed: {e}"))),
        }
    }
    Err(ApiError::server("generation ended without a result"))
}

fn sse_response<S>(stream: S) -> Response
where
    S: futures::Stream<Item = Result<Event, Infallible>> + Send + 'static,
{
    Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response()
}

fn replay_stream(ans: &CachedAnswer, kind: Kind, p: &Prepared) -> Response {
    let fmt = Fmt {
        kind,
        id: ans.id.clone(),
        created: ans.created,
        model: p.model_name.clone(),
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
    let mut events: Vec<Result<Event, Infallible>> = evs.iter().map(sse_event).collect();
    events.push(Ok(Event::default().data("[DONE]")));
    sse_response(futures::stream::iter(events))
}

struct LiveState {
    rx: mpsc::UnboundedReceiver<JobEvent>,
    _guard: CancelOnDrop,
    fmt: Fmt,
    include_usage: bool,
    out: VecDeque<Event>,
    done: bool,
    outcome: Outcome,
    store: Option<(Arc<respcache::ResponseCache>, [u8; 32])>,
}

fn live_stream(
    rx: mpsc::UnboundedReceiver<JobEvent>,
    guard: CancelOnDrop,
    fmt: Fmt,
    include_usage: bool,
    store: Option<(Arc<respcache::ResponseCache>, [u8; 32])>,
) -> Response {
    let st = LiveState {
        rx,
        _guard: guard,
        fmt,
        include_usage,
        out: VecDeque::new(),
        done: false,
        outcome: Outcome {
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
            let ev = |v: Value| Event::default().data(v.to_string());
            match st.rx.recv().await {
                Some(JobEvent::Started {
                    prompt_tokens,
                    cached_tokens,
                }) => {
                    st.outcome.prompt_tokens = prompt_tokens;
                    st.outcome.cached_tokens = cached_tokens;
                    if st.fmt.kind == Kind::Chat {
                        st.out.push_back(ev(st.fmt.chunk(Some(""), true, None, iu)));
                    }
                }
                Some(JobEvent::Token(t)) => {
                    if !t.is_empty() {
                        st.out
                            .push_back(ev(st.fmt.chunk(Some(&t), false, None, iu)));
                        st.outcome.pieces.push(t);
                    }
                }
                Some(JobEvent::Done {
                    stop,
                    completion_tokens,
                    tail,
                    ..
                }) => {
                    if !tail.is_empty() {
                        st.out
                            .push_back(ev(st.fmt.chunk(Some(&tail), false, None, iu)));
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
                    st.out
                        .push_back(ev(st.fmt.chunk(text, false, Some(fin), iu)));
                    if iu {
                        let o = &st.outcome;
                        st.out.push_back(ev(st.fmt.usage_chunk(usage(
                            o.prompt_tokens,
                            o.completion_tokens,
                            o.cached_tokens,
                        ))));
                    }
                    st.out.push_back(Event::default().data("[DONE]"));
                    if stop != StopReason::Cancelled {
                        let body = full_body(&st.fmt, &st.outcome);
                        remember(&st.store, &st.fmt, &st.outcome, body);
                    }
                    st.done = true;
                }
                Some(JobEvent::Failed(e)) => {
                    let err = ApiError::server(format!("generation failed: {e}"));
                    st.out.push_back(ev(err.body()));
                    st.out.push_back(Event::default().data("[DONE]"));
                    st.done = true;
                }
                None => st.done = true,
            }
        }
    });
    sse_response(s.boxed())
}
