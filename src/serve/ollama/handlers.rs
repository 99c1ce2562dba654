//! `GET /api/version`, `GET /api/tags`, `POST /api/show`, `GET /api/ps`.

use super::error::{OllamaError, locate_error};
use super::info::{self, Info};
use super::prepare::{
    DEFAULT_REPEAT_LAST_N, DEFAULT_REPEAT_PENALTY, DEFAULT_TEMPERATURE, DEFAULT_TOP_K,
    DEFAULT_TOP_P, parse_body, typed,
};
use super::run::counted;
use super::schema::NameBody;
use super::{OLLAMA_VERSION, Ollama};
use crate::serve::{CHATML, Served};
use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use std::path::PathBuf;
use std::sync::Arc;

pub(super) async fn version() -> Response {
    Json(json!({"version": OLLAMA_VERSION, "shoal_version": env!("CARGO_PKG_VERSION")}))
        .into_response()
}

impl Ollama {
    /// The details of artifact `id`, whose file is `path` (read once).
    pub(super) async fn info(&self, id: [u8; 32], path: PathBuf) -> Result<Arc<Info>, OllamaError> {
        if let Some(i) = self.details.lock().get(&id) {
            return Ok(i.clone());
        }
        let i = tokio::task::spawn_blocking(move || info::read(&path))
            .await
            .map_err(|e| OllamaError::server(e.to_string()))?
            .map_err(OllamaError::server)?;
        let i = Arc::new(i);
        self.details.lock().insert(id, i.clone());
        Ok(i)
    }

    /// The details of a loaded model.
    async fn served_info(&self, s: &Served) -> Result<Arc<Info>, OllamaError> {
        let m = s.engine.model();
        self.info(m.id(), m.path().to_owned()).await
    }

    /// The file of a model the source holds locally, without fetching
    /// anything: `None` when it is not local.
    async fn local_path(&self, id: [u8; 32]) -> Option<PathBuf> {
        let src = self.serving.source()?;
        // The lease ends here: the header is read from the path at once.
        src.local_file(id).await.map(|l| l.path.clone())
    }
}

fn entry(name: &str, id_hex: &str, i: &Info) -> Value {
    json!({
        "name": name,
        "model": name,
        "modified_at": i.modified_at,
        "size": i.size,
        "digest": id_hex,
        "details": i.details(),
    })
}

/// Every model this node can serve now: the loaded ones, then those its
/// store holds that this build can serve (each name once).
pub(super) async fn tags(State(o): State<Arc<Ollama>>) -> Response {
    let mut models = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for s in o.serving.models() {
        let Ok(i) = o.served_info(&s).await else {
            continue;
        };
        seen.insert(s.engine.model().id());
        models.push(entry(s.engine.name(), &s.id_hex, &i));
    }
    if let Some(src) = o.serving.source() {
        for e in o.serving.catalog().await {
            if e.servable.is_err() || !seen.insert(e.id) {
                continue;
            }
            // Local files only: a model known on the mesh is not pulled here.
            let Some(l) = src.local_file(e.id).await else {
                continue;
            };
            if let Ok(i) = o.info(e.id, l.path.clone()).await {
                models.push(entry(&e.name, &hex::encode(e.id), &i));
            }
        }
    }
    Json(json!({ "models": models })).into_response()
}

/// The loaded models. A model stays loaded until room is needed for
/// another (`inference.max_loaded`, `inference.memory_budget`), so
/// `expires_at` is far away, as Ollama shows a model kept alive forever.
pub(super) async fn ps(State(o): State<Arc<Ollama>>) -> Response {
    let mut models = Vec::new();
    for s in o.serving.models() {
        let Ok(i) = o.served_info(&s).await else {
            continue;
        };
        let name = s.engine.name();
        models.push(json!({
            "name": name,
            "model": name,
            "size": s.mem_bytes,
            "digest": s.id_hex,
            "details": i.details(),
            "expires_at": "2318-01-01T00:00:00Z",
            "size_vram": 0,
            "context_length": s.engine.model().hparams().context_length,
        }));
    }
    Json(json!({ "models": models })).into_response()
}

/// A model's modelfile, parameters, template, details and metadata, from
/// its header; does not load it. A model that is not on this node is 404
/// (pull it first), as in Ollama.
pub(super) async fn show(
    State(o): State<Arc<Ollama>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let r = show_inner(&o, body).await;
    counted(&o, r)
}

async fn show_inner(
    o: &Ollama,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, OllamaError> {
    let v = parse_body(body)?;
    let b: NameBody = typed(&v)?;
    let Some(name) = b.model() else {
        return Err(OllamaError::bad("model is required"));
    };
    crate::serve::check_model_name(name).map_err(|e| locate_error(name, e))?;
    let (id, path, served) = match o.serving.model(name) {
        Some(s) => {
            let m = s.engine.model();
            (m.id(), m.path().to_owned(), Some(s))
        }
        None => {
            let src = o
                .serving
                .source()
                .ok_or_else(|| OllamaError::not_found(name))?;
            let id = src.resolve(name).await.map_err(|e| locate_error(name, e))?;
            match o
                .serving
                .models()
                .into_iter()
                .find(|s| s.engine.model().id() == id)
            {
                Some(s) => (id, s.engine.model().path().to_owned(), Some(s)),
                None => {
                    let p = o
                        .local_path(id)
                        .await
                        .ok_or_else(|| OllamaError::not_found(name))?;
                    (id, p, None)
                }
            }
        }
    };
    let i = o.info(id, path).await?;
    let template = served
        .as_ref()
        .and_then(|s| s.engine.model().chat_template().map(str::to_owned))
        .or_else(|| i.template.clone())
        .unwrap_or_else(|| CHATML.to_owned());
    let mut parameters = format!(
        "temperature {DEFAULT_TEMPERATURE}\ntop_k {DEFAULT_TOP_K}\ntop_p {DEFAULT_TOP_P}\n\
         repeat_penalty {DEFAULT_REPEAT_PENALTY}\nrepeat_last_n {DEFAULT_REPEAT_LAST_N}"
    );
    if let Some(stop) = served.as_ref().and_then(|s| s.template_stop) {
        parameters.push_str(&format!("\nstop \"{stop}\""));
    }
    let modelfile = format!(
        "# Modelfile of {name} (artifact {}), as served by shoal\nFROM {name}\n\
         TEMPLATE \"\"\"{template}\"\"\"\n{}\n",
        hex::encode(id),
        parameters
            .lines()
            .map(|l| format!("PARAMETER {l}"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    Ok(Json(json!({
        "modelfile": modelfile,
        "parameters": parameters,
        "template": template,
        "details": i.details(),
        "model_info": i.model_info,
        "capabilities": ["completion"],
        "modified_at": i.modified_at,
        "shoal_model_id": hex::encode(id),
        "loaded": served.is_some(),
    }))
    .into_response())
}
