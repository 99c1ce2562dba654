//! Operations routes and the prefetch client.
//!
//! | route | what |
//! | --- | --- |
//! | `GET /metrics` | Prometheus text format ([`crate::metrics`]); absent with `[metrics] enabled = false` |
//! | `POST /admin/pin` `{"artifact": ID or NAME, "pinned": true}` | pin or unpin an artifact |
//! | `GET /admin/route` | the router's state ([`crate::route::RouteSnapshot`]): this node's card, peers' fresh cards, paused peers, recent routing events; 404 when routing is off |
//!
//! [`prefetch`] drives a running node through its admin API: pull each
//! model, wait until it is complete, pin it (what `shoal prefetch` and the
//! `shoal-prefetch` systemd timer run).

use super::ApiError;
use super::admin::{PullRequest, PullStarted};
use super::client::AdminClient;
use crate::mesh::Progress;
use crate::mesh::download::Phase;
use crate::metrics;
use crate::node::Node;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// The operations routes; `/metrics` only when `metrics` is on.
pub fn routes(metrics: bool) -> Router<Node> {
    let r = Router::new()
        .route("/admin/pin", post(pin))
        .route("/admin/route", get(route_state));
    if metrics {
        r.route("/metrics", get(prometheus))
    } else {
        r
    }
}

/// This node's metrics (the mesh keeps its peer gauges current itself).
async fn prometheus(State(node): State<Node>) -> Response {
    (
        [(header::CONTENT_TYPE, metrics::CONTENT_TYPE)],
        node.metrics().render(),
    )
        .into_response()
}

/// `GET /admin/route`: what the router knows and did, or 404 when routing is off.
async fn route_state(
    State(node): State<Node>,
) -> Result<Json<crate::route::RouteSnapshot>, ApiError> {
    let routing = node
        .routing()
        .ok_or_else(|| ApiError(StatusCode::NOT_FOUND, "routing is off".into()))?;
    Ok(Json(routing.snapshot()))
}

fn yes() -> bool {
    true
}

/// Body of `POST /admin/pin`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PinRequest {
    /// Artifact id (or unique prefix) or trusted release name.
    pub artifact: String,
    /// Pin (true, the default) or unpin.
    #[serde(default = "yes")]
    pub pinned: bool,
}

/// Answer of `POST /admin/pin`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PinAnswer {
    /// Resolved id (hex).
    pub id: String,
    /// Pinned now.
    pub pinned: bool,
}

async fn pin(
    State(node): State<Node>,
    Json(req): Json<PinRequest>,
) -> Result<Json<PinAnswer>, ApiError> {
    super::admin::check_artifact(&req.artifact)?;
    let store = node.store().clone();
    let pinned = req.pinned;
    let id = tokio::task::spawn_blocking(move || {
        let id = store.resolve(&req.artifact)?;
        store.set_pinned(&id, pinned)?;
        Ok::<_, crate::store::StoreError>(id)
    })
    .await
    .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))??;
    Ok(Json(PinAnswer {
        id: id.to_hex(),
        pinned,
    }))
}

/// How one model of a [`prefetch`] ended.
#[derive(Debug, Clone, Serialize)]
pub struct Prefetched {
    /// The model as asked (name or id).
    pub model: String,
    /// Its id, once resolved.
    pub id: Option<String>,
    /// The final progress of its download.
    pub progress: Option<Progress>,
    /// Why it failed, if it did.
    pub error: Option<String>,
}

/// Pulls each model through the node's admin API, waits until it is complete
/// (or failed), and pins it. Models are done one after the other, so an
/// off-peak run does not flood the link. `poll` is the progress polling interval.
pub async fn prefetch(api: &AdminClient, models: &[String], poll: Duration) -> Vec<Prefetched> {
    let mut out = Vec::with_capacity(models.len());
    for model in models {
        let mut r = Prefetched {
            model: model.clone(),
            id: None,
            progress: None,
            error: None,
        };
        if let Err(e) = prefetch_one(api, model, poll, &mut r).await {
            tracing::warn!(%model, "prefetch failed: {e}");
            r.error = Some(e);
        }
        out.push(r);
    }
    out
}

async fn prefetch_one(
    api: &AdminClient,
    model: &str,
    poll: Duration,
    r: &mut Prefetched,
) -> Result<(), String> {
    let started: PullStarted = api
        .post(
            "/admin/pull",
            &PullRequest {
                artifact: model.to_owned(),
                wait_secs: None,
            },
        )
        .await?;
    r.id = Some(started.id.clone());
    let mut p = started.progress;
    while !matches!(p.phase, Phase::Done | Phase::Failed) {
        tokio::time::sleep(poll).await;
        p = api.get(&format!("/admin/pull/{}", started.id)).await?;
    }
    let failed = (p.phase == Phase::Failed).then(|| p.error.clone().unwrap_or_default());
    r.progress = Some(p);
    if let Some(e) = failed {
        return Err(format!("download failed: {e}"));
    }
    let _: PinAnswer = api
        .post(
            "/admin/pin",
            &PinRequest {
                artifact: started.id,
                pinned: true,
            },
        )
        .await?;
    Ok(())
}
