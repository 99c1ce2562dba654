//! `/admin/*`: what the CLI uses to drive a running daemon.
//!
//! Every route needs `Authorization: Bearer <admin token>` ([`super::auth`]);
//! `POST` bodies must be `application/json`. At most `api.max_pulls`
//! downloads started here run at once; one more gets 429 with `Retry-After`.
//!
//! | route | what |
//! | --- | --- |
//! | `POST /admin/pull` `{"artifact": ID or NAME}` | start (or join) a download; answers `{"id", "progress"}` |
//! | `GET /admin/pull/{id}[?wait_ms=N]` | progress of that download; with `wait_ms` (≤ 10 000) it answers when the download ends or after N ms, whichever is first |
//! | `GET /admin/peers` | connected and banned peers |
//! | `GET /admin/status` | identity, addresses, artifacts, downloads, serving counters |
//! | `GET /admin/manifest/{id}` | the canonical manifest bytes (to publish next to an origin file as `<file>.manifest`) |
//! | `GET /admin/releases` | known releases |
//! | `POST /admin/releases` `{"signed": HEX}` | apply a signed release locally and announce it |
//! | `/admin/store/*` | the CLI's store commands run on the node's store ([`super::store_cmd`]) |

use super::ApiError;
use super::auth::PullGate;
use crate::mesh::{PeerInfo, Progress, provider::ServeSnapshot};
use crate::node::Node;
use crate::store::{ArtifactId, SignedRelease};
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// The admin routes.
pub fn routes() -> Router<Node> {
    Router::new()
        .route("/admin/pull", post(pull))
        .route("/admin/pull/{id}", get(pull_progress))
        .route("/admin/peers", get(peers))
        .route("/admin/status", get(status))
        .route("/admin/manifest/{id}", get(manifest))
        .route("/admin/releases", get(releases).post(add_release))
}

/// Body of `POST /admin/pull`.
#[derive(Debug, Serialize, Deserialize)]
pub struct PullRequest {
    /// Artifact id (hex) or trusted release name.
    pub artifact: String,
    /// Seconds to wait for a peer holding the manifest (default: the mesh's
    /// find timeout, at most an hour); see docs/PROTOCOL.md.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wait_secs: Option<u64>,
}

/// Answer of `POST /admin/pull`.
#[derive(Debug, Serialize, Deserialize)]
pub struct PullStarted {
    /// Resolved artifact id.
    pub id: String,
    /// Progress so far.
    pub progress: Progress,
}

/// Longest artifact id or release name accepted (ids are 64 hex digits;
/// names are short): longer ones are refused before they reach the store.
pub const MAX_ARTIFACT_LEN: usize = 1024;

/// Refuses an empty or over-long artifact argument.
pub(crate) fn check_artifact(a: &str) -> Result<(), ApiError> {
    if a.is_empty() || a.len() > MAX_ARTIFACT_LEN {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            format!(
                "artifact must be an id or a release name of 1 to {MAX_ARTIFACT_LEN} bytes (got {})",
                a.len()
            ),
        ));
    }
    Ok(())
}

/// Seconds a client refused for too many pulls is asked to wait.
const PULL_RETRY_AFTER_SECS: u64 = 5;

async fn pull(
    State(node): State<Node>,
    Extension(gate): Extension<PullGate>,
    Json(req): Json<PullRequest>,
) -> Result<Json<PullStarted>, Response> {
    check_artifact(&req.artifact).map_err(IntoResponse::into_response)?;
    let permit = match gate.try_acquire() {
        Some(p) => Some(p),
        None => {
            // Joining a download that is already running takes no new slot.
            let (id, _) = node
                .resolve(&req.artifact)
                .await
                .map_err(|e| ApiError::from(e).into_response())?;
            let running = node
                .downloads()
                .watch(&id)
                .is_some_and(|rx| !rx.borrow().phase.is_final());
            if !running {
                return Err((
                    StatusCode::TOO_MANY_REQUESTS,
                    [(header::RETRY_AFTER, PULL_RETRY_AFTER_SECS.to_string())],
                    Json(serde_json::json!({
                        "error": format!(
                            "{} downloads started through the admin API are running (api.max_pulls); \
                             try again when one ends",
                            gate.max()
                        )
                    })),
                )
                    .into_response());
            }
            None
        }
    };
    let wait = req.wait_secs.map(Duration::from_secs);
    let (id, mut rx) = node
        .pull_with(&req.artifact, wait)
        .await
        .map_err(|e| ApiError::from(e).into_response())?;
    let progress = rx.borrow().clone();
    if let Some(permit) = permit
        && !progress.phase.is_final()
    {
        // The slot is held until the download ends (or its registry drops it).
        tokio::spawn(async move {
            let _ = rx.wait_for(|p| p.phase.is_final()).await;
            drop(permit);
        });
    }
    Ok(Json(PullStarted {
        id: id.to_hex(),
        progress,
    }))
}

/// Query of `GET /admin/pull/{id}`.
#[derive(Debug, Deserialize)]
struct ProgressQuery {
    /// Wait up to this long for the download to end (a long poll), at most [`MAX_WAIT_MS`].
    wait_ms: Option<u64>,
}

/// Longest long poll of `GET /admin/pull/{id}`.
const MAX_WAIT_MS: u64 = 10_000;

async fn pull_progress(
    State(node): State<Node>,
    Path(id): Path<String>,
    Query(q): Query<ProgressQuery>,
) -> Result<Json<Progress>, ApiError> {
    let id: ArtifactId = id.parse().map_err(|e: crate::store::ParseIdError| {
        ApiError(StatusCode::BAD_REQUEST, e.to_string())
    })?;
    let mut rx = node
        .downloads()
        .watch(&id)
        .ok_or_else(|| ApiError(StatusCode::NOT_FOUND, format!("no download of {id}")))?;
    if let Some(ms) = q.wait_ms {
        let wait = Duration::from_millis(ms.min(MAX_WAIT_MS));
        // Ends early when the download does; a closed channel also ends the wait.
        let _ = tokio::time::timeout(wait, rx.wait_for(|p| p.phase.is_final())).await;
    }
    let p = rx.borrow().clone();
    Ok(Json(p))
}

async fn manifest(State(node): State<Node>, Path(id): Path<String>) -> Result<Vec<u8>, ApiError> {
    let id: ArtifactId = id.parse().map_err(|e: crate::store::ParseIdError| {
        ApiError(StatusCode::BAD_REQUEST, e.to_string())
    })?;
    let store = node.store().clone();
    tokio::task::spawn_blocking(move || store.manifest_bytes(&id))
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))??
        .ok_or_else(|| ApiError(StatusCode::NOT_FOUND, format!("no manifest for {id}")))
}

/// Answer of `GET /admin/peers`.
#[derive(Debug, Serialize, Deserialize)]
pub struct PeersReport {
    /// This node.
    pub peer_id: String,
    /// Connected and banned peers.
    pub peers: Vec<PeerInfo>,
}

async fn peers(State(node): State<Node>) -> Result<Json<PeersReport>, ApiError> {
    Ok(Json(PeersReport {
        peer_id: node.mesh().peer_id().to_string(),
        peers: node.mesh().peers().await?,
    }))
}

/// Answer of `GET /admin/status`.
#[derive(Debug, Serialize, Deserialize)]
pub struct StatusReport {
    /// This node.
    pub peer_id: String,
    /// Listen addresses.
    pub listen: Vec<String>,
    /// Seconds since start.
    pub uptime_secs: u64,
    /// Offline mode (no origin fetches).
    pub offline: bool,
    /// mDNS discovery on.
    pub mdns: bool,
    /// Connected peers.
    pub connected: usize,
    /// Store contents (as `Store::list`).
    pub artifacts: serde_json::Value,
    /// Downloads started since start.
    pub downloads: Vec<Progress>,
    /// What this node served.
    pub served: ServeSnapshot,
}

async fn status(State(node): State<Node>) -> Result<Json<StatusReport>, ApiError> {
    let store = node.store().clone();
    let list = tokio::task::spawn_blocking(move || store.list())
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))??;
    let mesh = node.mesh();
    Ok(Json(StatusReport {
        peer_id: mesh.peer_id().to_string(),
        listen: mesh
            .listen_addrs()
            .await?
            .iter()
            .map(|a| a.to_string())
            .collect(),
        uptime_secs: node.uptime_secs(),
        offline: mesh.config().offline,
        mdns: mesh.config().mdns,
        connected: mesh.connected().await?.len(),
        artifacts: serde_json::to_value(list)
            .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?,
        downloads: node.downloads().all(),
        served: mesh.serve_stats(),
    }))
}

/// One line of `GET /admin/releases`.
#[derive(Debug, Serialize, Deserialize)]
pub struct ReleaseLine {
    /// Name.
    pub name: String,
    /// Artifact id.
    pub id: String,
    /// Sequence number.
    pub seq: u64,
    /// Origin URL, if any.
    pub origin: Option<String>,
    /// Publisher key (hex).
    pub publisher: String,
    /// The signed release, encoded (hex), for re-announcing elsewhere.
    pub signed: String,
}

async fn releases(State(node): State<Node>) -> Result<Json<Vec<ReleaseLine>>, ApiError> {
    let store = node.store().clone();
    let all = tokio::task::spawn_blocking(move || store.releases())
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))??;
    Ok(Json(
        all.into_iter()
            .filter_map(|s| {
                let r = s.verify().ok()?;
                Some(ReleaseLine {
                    name: r.name,
                    id: r.id.to_hex(),
                    seq: r.seq,
                    origin: r.origin,
                    publisher: s.publisher_hex(),
                    signed: hex::encode(s.encode()),
                })
            })
            .collect(),
    ))
}

/// Body of `POST /admin/releases`.
#[derive(Debug, Serialize, Deserialize)]
pub struct AddRelease {
    /// `SignedRelease::encode`, hex.
    pub signed: String,
}

async fn add_release(
    State(node): State<Node>,
    Json(req): Json<AddRelease>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let bad = |e: String| ApiError(StatusCode::BAD_REQUEST, e);
    let bytes = hex::decode(req.signed.trim()).map_err(|e| bad(e.to_string()))?;
    let signed = SignedRelease::decode(&bytes).map_err(|e| bad(e.to_string()))?;
    // A tampered or malformed release is the caller's fault: 400, not 500.
    signed
        .verify()
        .map_err(|e| bad(format!("release does not verify: {e}")))?;
    let store = node.store().clone();
    let s2 = signed.clone();
    let outcome = tokio::task::spawn_blocking(move || store.apply_release(&s2))
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))??;
    node.mesh().publish_release(&signed).await?;
    Ok(Json(
        serde_json::json!({ "outcome": format!("{outcome:?}") }),
    ))
}
