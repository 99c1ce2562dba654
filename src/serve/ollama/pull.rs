//! `POST /api/pull`: resolves a name and makes its artifact local through
//! the node's [`ModelSource`](crate::serve::ModelSource) (the store, else a
//! pull from mesh peers), streaming Ollama's progress lines:
//! `{"status":"pulling manifest"}`, `{"status":"pulling <id>","digest",
//! "total","completed"}` ..., `{"status":"verifying blake3 digest"}`,
//! `{"status":"success"}`. The model is not loaded (the first request does
//! that). A name nobody has is 404 before any line.

use super::Ollama;
use super::error::{OllamaError, locate_error};
use super::prepare::{parse_body, typed};
use super::run::counted;
use super::schema::NameBody;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use serde_json::{Value, json};
use std::sync::Arc;
use tokio::sync::mpsc;

pub(super) async fn pull(
    State(o): State<Arc<Ollama>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let r = pull_inner(&o, body).await;
    counted(&o, r)
}

async fn pull_inner(
    o: &Ollama,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, OllamaError> {
    let v = parse_body(body)?;
    let b: NameBody = typed(&v)?;
    let Some(name) = b.model().map(str::to_owned) else {
        return Err(OllamaError::bad("model is required"));
    };
    crate::serve::check_model_name(&name).map_err(|e| locate_error(&name, e))?;
    let src = o
        .serving
        .source()
        .ok_or_else(|| OllamaError::not_found(&name))?;
    let id = src
        .resolve(&name)
        .await
        .map_err(|e| locate_error(&name, e))?;
    let digest = hex::encode(id);
    let (lines, rx) = mpsc::unbounded_channel::<Value>();
    let _ = lines.send(json!({"status": "pulling manifest"}));
    // A task of its own: a client that goes away does not stop the pull.
    let task = {
        let lines = lines.clone();
        let digest = digest.clone();
        tokio::spawn(async move {
            let (ptx, mut prx) = mpsc::unbounded_channel::<(u64, u64)>();
            let status = format!("pulling {}", &digest[..12]);
            let locate = src.locate_reporting(id, &name, ptx);
            tokio::pin!(locate);
            // One line per 1% of the file at most (and the last one).
            let mut shown = None;
            let located = loop {
                tokio::select! {
                    r = &mut locate => break r,
                    Some((completed, total)) = prx.recv() => {
                        let step = (total / 100).max(1);
                        if shown.is_none_or(|s: u64| completed >= s + step || completed == total && s != total) {
                            shown = Some(completed);
                            let _ = lines.send(json!({"status": status, "digest": digest,
                                "total": total, "completed": completed}));
                        }
                    }
                }
            };
            match located {
                Ok(l) => {
                    let size = tokio::fs::metadata(&l.path).await.map_or(0, |m| m.len());
                    let _ = lines.send(json!({"status": status, "digest": digest,
                        "total": size, "completed": size}));
                    let _ = lines.send(json!({"status": "verifying blake3 digest"}));
                    let _ = lines.send(json!({"status": "success"}));
                    Ok(())
                }
                Err(e) => {
                    let e = locate_error(&name, e);
                    let _ = lines.send(e.body());
                    Err(e)
                }
            }
        })
    };
    drop(lines);
    if b.stream == Some(false) {
        return match task.await {
            Ok(Ok(())) => Ok(axum::Json(json!({"status": "success"})).into_response()),
            Ok(Err(e)) => Err(e),
            Err(e) => Err(OllamaError::server(format!("the pull failed: {e}"))),
        };
    }
    let s = futures::stream::unfold(rx, |mut rx| async move {
        let v = rx.recv().await?;
        let mut b = v.to_string().into_bytes();
        b.push(b'\n');
        Some((Ok::<_, std::convert::Infallible>(Bytes::from(b)), rx))
    })
    .boxed();
    let mut r = Response::new(Body::from_stream(s));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-ndjson"),
    );
    Ok(r)
}
