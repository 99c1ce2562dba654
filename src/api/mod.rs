//! The node's HTTP API: one axum router, served in the mini-redis shape
//! (`serve(listener, router, shutdown)`).
//!
//! Routes are grouped by module and merged into one `Router<Node>`:
//! [`admin`] (`/admin/*`, used by the CLI). Other layers add theirs in
//! [`routes`] (e.g. an OpenAI-compatible module).

pub mod admin;
pub mod client;
pub mod dashboard;
pub mod ops;

use crate::node::Node;
use axum::Json;
use axum::Router;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use std::future::Future;

/// Switches of the HTTP API (from the config file's `[metrics]`, ...).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApiOptions {
    /// Serve Prometheus metrics at `GET /metrics` (`[metrics] enabled`).
    pub metrics: bool,
}

impl Default for ApiOptions {
    fn default() -> Self {
        Self { metrics: true }
    }
}

impl ApiOptions {
    /// The options a config file asks for.
    pub fn from_config(cfg: &crate::config::Config) -> Self {
        Self {
            metrics: cfg.metrics.enabled,
        }
    }
}

/// Every route, before the node is attached. Add new route groups here.
pub fn routes(opts: ApiOptions) -> Router<Node> {
    Router::new()
        .merge(admin::routes())
        .merge(dashboard::routes())
        .merge(ops::routes(opts.metrics))
}

/// The API router for `node`, every route on.
pub fn router(node: Node) -> Router {
    router_with(node, ApiOptions::default())
}

/// The API router for `node` with `opts`.
pub fn router_with(node: Node, opts: ApiOptions) -> Router {
    let r = routes(opts).with_state(node.clone());
    // The OpenAI-compatible routes of the serving layer (`crate::serve`).
    match node.serving() {
        Ok(s) => r.merge(crate::serve::router(s)),
        Err(e) => {
            tracing::error!(error = %e, "serving layer unavailable; OpenAI routes disabled");
            r
        }
    }
}

/// Serves `router` on `listener` until `shutdown` resolves, then drains open requests.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "HTTP API listening");
    }
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await
}

/// An error answered as `{"error": "..."}` with a status code.
#[derive(Debug)]
pub struct ApiError(pub StatusCode, pub String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(serde_json::json!({ "error": self.1 }))).into_response()
    }
}

impl From<crate::node::NodeError> for ApiError {
    fn from(e: crate::node::NodeError) -> Self {
        use crate::node::NodeError;
        use crate::store::StoreError;
        let status = match &e {
            NodeError::Store(StoreError::Unknown(_)) => StatusCode::NOT_FOUND,
            NodeError::Store(StoreError::Untrusted { .. }) => StatusCode::FORBIDDEN,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError(status, e.to_string())
    }
}

impl From<crate::mesh::MeshError> for ApiError {
    fn from(e: crate::mesh::MeshError) -> Self {
        ApiError(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
    }
}

impl From<crate::store::StoreError> for ApiError {
    fn from(e: crate::store::StoreError) -> Self {
        crate::node::NodeError::Store(e).into()
    }
}
