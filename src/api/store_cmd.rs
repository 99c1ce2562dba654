//! The store commands of the CLI (`ls`, `show`, `verify`, `pin`, `unpin`,
//! `rm`, `gc`, `add`, `import`) as functions on a [`Store`] that answer
//! JSON: the CLI calls them on the store it opened itself, and, while a
//! daemon holds the store, the daemon calls them for it behind
//! `/admin/store/*` ([`routes`]). Both print the same answer the same way.
//!
//! | route | body | answer |
//! | --- | --- | --- |
//! | `GET /admin/store/ls` | | [`ls`] |
//! | `POST /admin/store/show` | `{"artifact"}` | [`show`] |
//! | `POST /admin/store/verify` | `{"artifact"?}` | [`verify`] |
//! | `POST /admin/store/pin` | `{"artifact", "pinned"}` | [`set_pinned`] |
//! | `POST /admin/store/rm` | `{"artifact"}` | [`rm`] |
//! | `POST /admin/store/gc` | `{}` | [`gc`] |
//! | `POST /admin/store/add` | [`AddRequest`] | [`add`] |
//! | `POST /admin/store/import` | [`ImportRequest`] | [`import`] |

use super::ApiError;
use crate::node::Node;
use crate::store::{AddOptions, Store, StoreError};
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};

/// Errors of a store command.
#[derive(Debug, thiserror::Error)]
pub enum StoreCmdError {
    /// The store refused.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Adding a file failed.
    #[error(transparent)]
    Add(#[from] crate::store::AddError),
    /// Importing failed.
    #[error("{0}")]
    Import(String),
    /// The request itself is wrong (a missing file, say).
    #[error("{0}")]
    Invalid(String),
}

impl From<StoreCmdError> for ApiError {
    fn from(e: StoreCmdError) -> Self {
        match e {
            StoreCmdError::Store(s) => s.into(),
            StoreCmdError::Invalid(m) => ApiError(StatusCode::BAD_REQUEST, m),
            other => ApiError(StatusCode::UNPROCESSABLE_ENTITY, other.to_string()),
        }
    }
}

/// `ls`: every artifact ([`Store::list`]).
pub fn ls(store: &Store) -> Result<Value, StoreCmdError> {
    Ok(serde_json::to_value(store.list()?).unwrap_or_default())
}

/// `show`: an artifact's manifest (id, format, kind, status, size, blake3,
/// chunks, tensors).
pub fn show(store: &Store, artifact: &str) -> Result<Value, StoreCmdError> {
    let id = store.resolve(artifact)?;
    let m = store
        .manifest(&id)?
        .ok_or_else(|| StoreError::Unknown(artifact.to_owned()))?;
    let status = store.status(&id)?;
    Ok(json!({
        "id": id.to_hex(),
        "format": m.format,
        "kind": m.kind.name(),
        "status": status,
        "size": m.size,
        "blake3": m.blake3_hex(),
        "chunks": m.chunks.iter().map(|c| json!({"offset": c.offset, "len": c.len, "blake3": c.hash.to_hex()})).collect::<Vec<_>>(),
        "tensors": m.tensors.iter().map(|t| json!({"name": t.name, "ggml_type": t.ggml_type, "dims": t.dims, "offset": t.offset, "size": t.size, "first_chunk": t.first_chunk, "chunk_count": t.chunk_count})).collect::<Vec<_>>(),
    }))
}

/// What [`verify`] found.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct VerifyAnswer {
    /// One report per artifact ([`crate::store::VerifyReport`]).
    pub reports: Vec<Value>,
    /// `"<id>: ok (<n> chunks)"` per sound artifact.
    pub ok: Vec<String>,
    /// One line per problem (bad chunk, whole-file mismatch, lost+found file).
    pub bad: Vec<String>,
    /// Notes for people (KV blocks dropped).
    pub notes: Vec<String>,
}

/// `verify`: re-hashes `artifact` (all when `None`). A corrupt artifact is
/// marked (the store's `on_corrupt` hook tells a running node, which drops
/// its KV blocks); with `kv_dir` (the CLI without a daemon) its KV blocks on
/// disk are dropped here.
pub fn verify(
    store: &Store,
    artifact: Option<&str>,
    kv_dir: Option<&Path>,
) -> Result<VerifyAnswer, StoreCmdError> {
    let ids = match artifact {
        Some(a) => vec![store.resolve(a)?],
        None => store.list()?.into_iter().map(|a| a.id).collect(),
    };
    let mut out = VerifyAnswer::default();
    for id in ids {
        let r = store.verify(&id)?;
        if !r.ok() {
            if let Some(kv_dir) = kv_dir {
                match crate::kvcache::purge_model_on_disk(kv_dir, id.as_bytes()) {
                    Ok(0) => {}
                    Ok(n) => out.notes.push(format!(
                        "{id}: dropped {n} KV cache blocks computed from it"
                    )),
                    Err(e) => out
                        .notes
                        .push(format!("{id}: could not drop its KV cache blocks: {e}")),
                }
            }
            for (i, off) in &r.bad_chunks {
                out.bad
                    .push(format!("{id}: chunk {i} at offset {off} is corrupt"));
            }
            if r.file_ok == Some(false) && r.bad_chunks.is_empty() {
                out.bad
                    .push(format!("{id}: whole-file BLAKE3 does not match"));
            }
        } else {
            out.ok.push(format!("{id}: ok ({} chunks)", r.checked));
        }
        out.reports
            .push(serde_json::to_value(&r).unwrap_or_default());
    }
    for p in store.lost_and_found()? {
        out.bad.push(format!(
            "{}: bytes the store could not account for (moved there, not deleted; see `shoal fsck`)",
            p.display()
        ));
    }
    Ok(out)
}

/// `pin` / `unpin`: `{"id", "pinned"}`.
pub fn set_pinned(store: &Store, artifact: &str, pinned: bool) -> Result<Value, StoreCmdError> {
    let id = store.resolve(artifact)?;
    store.set_pinned(&id, pinned)?;
    Ok(json!({"id": id.to_hex(), "pinned": pinned}))
}

/// `rm`: `{"id", "freed"}` (bytes).
pub fn rm(store: &Store, artifact: &str) -> Result<Value, StoreCmdError> {
    let id = store.resolve(artifact)?;
    let freed = store.remove(&id)?;
    Ok(json!({"id": id.to_hex(), "freed": freed}))
}

/// `gc`: the [`crate::store::GcReport`].
pub fn gc(store: &Store) -> Result<Value, StoreCmdError> {
    Ok(serde_json::to_value(store.gc()?).unwrap_or_default())
}

/// Body of `POST /admin/store/add`: a file on the node's machine.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AddRequest {
    /// The file (absolute: the daemon's working directory is not the caller's).
    pub path: PathBuf,
    /// Bind this name to it with a release signed by the node's key.
    #[serde(default)]
    pub name: Option<String>,
    /// Pin it.
    #[serde(default)]
    pub pin: bool,
    /// Share the file's blocks (reflink) where the filesystem can.
    #[serde(default)]
    pub reflink: bool,
}

/// `add`: `{"id", "name", "seq"}` (name and seq null without a name).
pub fn add(store: &Store, req: &AddRequest) -> Result<Value, StoreCmdError> {
    if !req.path.exists() {
        return Err(StoreCmdError::Invalid(format!(
            "{}: no such file",
            req.path.display()
        )));
    }
    let id = store.add_file(
        &req.path,
        &AddOptions {
            pin: req.pin,
            reflink: req.reflink,
            ..Default::default()
        },
    )?;
    let release = match &req.name {
        Some(n) => {
            store.keygen(false)?;
            Some(
                store
                    .publish(&id, n, None)?
                    .verify()
                    .map_err(StoreError::from)?,
            )
        }
        None => None,
    };
    Ok(
        json!({"id": id.to_hex(), "name": release.as_ref().map(|r| &r.name), "seq": release.as_ref().map(|r| r.seq)}),
    )
}

/// Body of `POST /admin/store/import`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImportRequest {
    /// A file or directory on the node's machine (absolute).
    pub path: PathBuf,
    /// Pin the imported models.
    #[serde(default)]
    pub pin: bool,
    /// Do not name them.
    #[serde(default)]
    pub no_names: bool,
}

/// `import`: one [`crate::import`] result per candidate, as JSON.
pub fn import(store: &Store, req: &ImportRequest) -> Result<Value, StoreCmdError> {
    let done = crate::import::import(
        store,
        &req.path,
        &crate::import::ImportOptions {
            pin: req.pin,
            no_names: req.no_names,
        },
    )
    .map_err(|e| StoreCmdError::Import(e.to_string()))?;
    Ok(serde_json::to_value(done).unwrap_or_default())
}

/// Body naming one artifact.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ArtifactRequest {
    /// Id (or unique prefix) or trusted name; `None` (verify): all.
    #[serde(default)]
    pub artifact: Option<String>,
    /// `pin`: pin (true) or unpin.
    #[serde(default)]
    pub pinned: bool,
}

/// The `/admin/store/*` routes (behind the admin token like every `/admin` route).
pub fn routes() -> Router<Node> {
    Router::new()
        .route("/admin/store/ls", get(ls_route))
        .route("/admin/store/show", post(show_route))
        .route("/admin/store/verify", post(verify_route))
        .route("/admin/store/pin", post(pin_route))
        .route("/admin/store/rm", post(rm_route))
        .route("/admin/store/gc", post(gc_route))
        .route("/admin/store/add", post(add_route))
        .route("/admin/store/import", post(import_route))
}

/// Runs `f` on the node's store off the async runtime.
async fn on_store<T: Send + 'static>(
    node: &Node,
    f: impl FnOnce(&Store) -> Result<T, StoreCmdError> + Send + 'static,
) -> Result<Json<T>, ApiError> {
    let store = node.store().clone();
    let r = tokio::task::spawn_blocking(move || f(&store))
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))??;
    Ok(Json(r))
}

fn artifact(req: &ArtifactRequest) -> Result<String, ApiError> {
    let a = req.artifact.clone().unwrap_or_default();
    super::admin::check_artifact(&a)?;
    Ok(a)
}

async fn ls_route(State(node): State<Node>) -> Result<Json<Value>, ApiError> {
    on_store(&node, ls).await
}

async fn show_route(
    State(node): State<Node>,
    Json(req): Json<ArtifactRequest>,
) -> Result<Json<Value>, ApiError> {
    let a = artifact(&req)?;
    on_store(&node, move |s| show(s, &a)).await
}

async fn verify_route(
    State(node): State<Node>,
    Json(req): Json<ArtifactRequest>,
) -> Result<Json<VerifyAnswer>, ApiError> {
    let a = match &req.artifact {
        Some(_) => Some(artifact(&req)?),
        None => None,
    };
    on_store(&node, move |s| verify(s, a.as_deref(), None)).await
}

async fn pin_route(
    State(node): State<Node>,
    Json(req): Json<ArtifactRequest>,
) -> Result<Json<Value>, ApiError> {
    let a = artifact(&req)?;
    let pinned = req.pinned;
    on_store(&node, move |s| set_pinned(s, &a, pinned)).await
}

async fn rm_route(
    State(node): State<Node>,
    Json(req): Json<ArtifactRequest>,
) -> Result<Json<Value>, ApiError> {
    let a = artifact(&req)?;
    on_store(&node, move |s| rm(s, &a)).await
}

async fn gc_route(State(node): State<Node>) -> Result<Json<Value>, ApiError> {
    on_store(&node, gc).await
}

async fn add_route(
    State(node): State<Node>,
    Json(req): Json<AddRequest>,
) -> Result<Json<Value>, ApiError> {
    on_store(&node, move |s| add(s, &req)).await
}

async fn import_route(
    State(node): State<Node>,
    Json(req): Json<ImportRequest>,
) -> Result<Json<Value>, ApiError> {
    on_store(&node, move |s| import(s, &req)).await
}
