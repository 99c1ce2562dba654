//! The route handlers: models listing, and the two completion endpoints
//! (`run`: resolve the model, prepare, answer from the response cache or
//! queue a generation).

use super::error::{OpenAiError, locate_error, unknown_model};
use super::format::{
    CacheHeaders, Fmt, collect, etag_matches, live_stream, new_id, now_secs, replay_stream,
};
use super::prepare::{Prepared, parse_body, prepare, typed};
use super::schema::{Kind, Params};
use crate::metrics::CacheOutcome;
use crate::respcache::{self, CachedAnswer};
use crate::serve::engine::{CancelOnDrop, Job};
use crate::serve::{ListedModel, ModelState, Served, Serving};
use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use tokio::sync::mpsc;

pub(super) async fn chat(
    State(s): State<Arc<Serving>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    counted(&s.clone(), run(s, headers, body, Kind::Chat).await)
}

pub(super) async fn completions(
    State(s): State<Arc<Serving>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    counted(&s.clone(), run(s, headers, body, Kind::Completion).await)
}

/// Counts a generation response and names this node as its server
/// ([`crate::serve::name_server`]), errors as well.
pub(super) fn counted(s: &Serving, r: Result<Response, OpenAiError>) -> Response {
    let mut r = r.unwrap_or_else(IntoResponse::into_response);
    s.metrics().request(r.status().as_u16());
    crate::serve::name_server(&mut r, s.config().node_id.as_deref());
    r
}

/// A loaded model in `/v1/models`: OpenAI's fields, plus ours (`servable`
/// is always true for a loaded model).
pub(super) fn model_json(s: &Served) -> Value {
    json!({"id": s.engine.name(), "object": "model", "created": 0, "owned_by": "shoal",
           "shoal_model_id": s.id_hex,
           "context_length": s.engine.model().hparams().context_length,
           "loaded": true, "servable": true})
}

/// An entry of `/v1/models`: OpenAI's fields (`id` is the name to ask
/// for), our flat fields (`shoal_model_id`, `loaded`, `servable`, and
/// `unservable_reason` / `unservable_kind` when this build cannot serve it:
/// `architecture`, `tensor_type`, `tokenizer`, `model_metadata`, `header`),
/// and `shoal`: `state` (`loaded`, `local` or `remote`), `artifact` (the
/// id), `servable`, and `context_length` when loaded.
fn listed_json(m: &ListedModel) -> Value {
    let id_hex = hex::encode(m.id);
    let mut v = json!({"id": m.name, "object": "model", "created": 0, "owned_by": "shoal",
           "shoal_model_id": id_hex, "loaded": m.state == ModelState::Loaded,
           "servable": m.servable.is_ok(),
           "shoal": {"state": m.state, "artifact": id_hex, "servable": m.servable.is_ok()}});
    if let Some(c) = m.context_length {
        v["context_length"] = json!(c);
        v["shoal"]["context_length"] = json!(c);
    }
    if let Err(u) = &m.servable {
        v["unservable_reason"] = json!(u.to_string());
        v["unservable_kind"] = json!(u.kind());
    }
    v
}

pub(super) async fn list_models(State(s): State<Arc<Serving>>) -> Response {
    let data: Vec<Value> = s.listing().await.iter().map(listed_json).collect();
    axum::Json(json!({"object": "list", "data": data})).into_response()
}

pub(super) async fn get_model(State(s): State<Arc<Serving>>, Path(name): Path<String>) -> Response {
    if let Err(e) = crate::serve::check_model_name(&name) {
        return locate_error(&name, e).into_response();
    }
    let lower = name.to_ascii_lowercase();
    let listing = s.listing().await;
    let hit = listing
        .iter()
        .find(|m| m.name == name)
        .or_else(|| listing.iter().find(|m| hex::encode(m.id) == lower));
    if let Some(m) = hit {
        return axum::Json(listed_json(m)).into_response();
    }
    match s.model(&name) {
        Some(m) => axum::Json(model_json(&m)).into_response(),
        None => unknown_model(&name).into_response(),
    }
}

pub(super) async fn run(
    s: Arc<Serving>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
    kind: Kind,
) -> Result<Response, OpenAiError> {
    // Parsing a large body, rendering the model's chat template (which comes
    // with the model file, so may be anyone's) and tokenizing a long prompt
    // are CPU work: they run on a blocking thread, never on the async
    // runtime. The render is bounded (`TemplateLimits`); this timeout bounds
    // the request even if one step of a hostile template is slow.
    let v = tokio::task::spawn_blocking(move || parse_body(body))
        .await
        .map_err(|e| OpenAiError::server(format!("parsing the request failed: {e}")))??;
    let v = Arc::new(v);
    let Some(name) = v.get("model").and_then(Value::as_str) else {
        // Missing or not a string: say so as the typed parse words it.
        typed::<Params>(&v)?;
        return Err(OpenAiError::invalid(
            "model must be a string.",
            Some("model"),
            None,
        ));
    };
    let served = s.resolve(name).await.map_err(|e| locate_error(name, e))?;
    let p = {
        let v = v.clone();
        crate::serve::prepare_off_runtime(move || prepare(served, &v, kind))
            .await
            .map_err(OpenAiError::server)??
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
        (Some(c), Some(k)) => c.get(k),
        _ => None,
    };
    if let (Some(ans), Some(tag)) = (cached, &etag) {
        // An answer from the response cache: its first token took no time.
        s.metrics().ttft(CacheOutcome::Response, 0.0);
        let by = s.config().node_id.as_deref();
        return Ok(cached_response(&ans, tag, max_age, &headers, kind, &p, by));
    }
    let Some(permit) = engine.try_admit() else {
        return Err(OpenAiError {
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
        served_by: s.config().node_id.clone(),
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

/// The answer from the response cache: `304 Not Modified` when the client
/// holds it (`If-None-Match`), else the stored body (JSON) or its replay (SSE).
fn cached_response(
    ans: &CachedAnswer,
    tag: &str,
    max_age: u64,
    headers: &HeaderMap,
    kind: Kind,
    p: &Prepared,
    served_by: Option<&str>,
) -> Response {
    let ch = CacheHeaders {
        etag: Some(tag.to_owned()),
        hit: true,
        max_age,
    };
    if etag_matches(headers, tag) {
        let mut r = StatusCode::NOT_MODIFIED.into_response();
        ch.apply(r.headers_mut());
        return r;
    }
    let mut r = if p.stream {
        replay_stream(ans, kind, p, served_by)
    } else {
        let mut r = Response::new(Body::from(ans.body.clone()));
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        r
    };
    ch.apply(r.headers_mut());
    r
}
