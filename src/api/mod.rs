//! The node's HTTP API: one axum router ([`try_router`]), served by
//! [`serve_with`] in the mini-redis shape (`serve(listener, router,
//! shutdown)`); [`crate::daemon`] starts and stops it with the node.
//!
//! Routes are grouped by module and merged into one `Router<Node>`:
//! [`admin`] (`/admin/*`, used by the CLI). Other layers add theirs in
//! [`routes`] (e.g. an OpenAI-compatible module). [`auth::guard`] runs in
//! front of every route (Host and Origin checks, the admin token, API keys,
//! JSON-only bodies), and [`server`] drives connections with header, body
//! and idle timeouts.

pub mod admin;
pub mod auth;
pub mod client;
pub mod dashboard;
pub mod ops;
pub mod server;

use crate::node::Node;
use auth::{AdminToken, ApiKeys, AuthError, Guard, PullGate};
use axum::Json;
use axum::Router;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use std::net::SocketAddr;
use std::path::PathBuf;

pub use server::{Timeouts, serve_with};

/// Settings of the HTTP API (from the config file's `[api]` and `[metrics]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiOptions {
    /// Serve Prometheus metrics at `GET /metrics` (`[metrics] enabled`).
    pub metrics: bool,
    /// The admin token file (`api.admin_token_file`); `None`: `<data dir>/admin.token`.
    pub admin_token_file: Option<PathBuf>,
    /// The API keys of `/v1/*` (`api.keys_file`); `None`: no key needed.
    pub keys_file: Option<PathBuf>,
    /// Where the API listens (for the warning about an open API), if known.
    pub listen: Option<SocketAddr>,
    /// Host names accepted besides IP addresses and localhost (`api.allowed_hosts`).
    pub allowed_hosts: Vec<String>,
    /// Browser origins allowed cross-origin (`api.allowed_origins`).
    pub allowed_origins: Vec<String>,
    /// Concurrent downloads started through `POST /admin/pull` (`api.max_pulls`).
    pub max_pulls: usize,
    /// Connection timeouts.
    pub timeouts: Timeouts,
}

impl Default for ApiOptions {
    /// The configuration's defaults.
    fn default() -> Self {
        Self::from_config(&crate::config::Config::default())
    }
}

impl ApiOptions {
    /// The options a config file asks for.
    pub fn from_config(cfg: &crate::config::Config) -> Self {
        let api = &cfg.api;
        Self {
            metrics: cfg.metrics.enabled,
            admin_token_file: api.admin_token_file.clone(),
            keys_file: api.keys_file.clone(),
            listen: Some(api.listen),
            allowed_hosts: api.allowed_hosts.clone(),
            allowed_origins: api.allowed_origins.clone(),
            max_pulls: api.max_pulls,
            timeouts: Timeouts::from_config(api),
        }
    }

    /// The admin token file for a node whose data directory is `data_dir`.
    pub fn admin_token_path(&self, data_dir: &std::path::Path) -> PathBuf {
        self.admin_token_file
            .clone()
            .unwrap_or_else(|| data_dir.join(auth::ADMIN_TOKEN_FILE))
    }
}

/// The warning logged when the API is reachable from other machines and any
/// of them may use the OpenAI routes; `None` when there is nothing to say.
pub fn exposure_warning(listen: SocketAddr, keys: bool) -> Option<String> {
    (!listen.ip().is_loopback() && !keys).then(|| {
        format!(
            "the API listens on {listen}, reachable from other machines, and api.keys_file is unset: \
             anyone who can reach it may run the models (/v1/*). Set api.keys_file, or listen on \
             127.0.0.1 behind a proxy (docs/OPERATIONS.md)"
        )
    })
}

/// Every route, before the node is attached. Add new route groups here.
pub fn routes(opts: &ApiOptions) -> Router<Node> {
    Router::new()
        .merge(admin::routes())
        .merge(dashboard::routes())
        .merge(ops::routes(opts.metrics))
        .layer(axum::Extension(PullGate::new(opts.max_pulls)))
}

/// The API router for `node` with `opts`, or why the admin token
/// (`<data dir>/admin.token` or `api.admin_token_file`, made if missing) or
/// the API keys file cannot be used. Logs a warning when the API listens on a
/// non-loopback address without API keys.
pub fn try_router(node: Node, opts: &ApiOptions) -> Result<Router, AuthError> {
    let path = opts.admin_token_path(node.store().dir());
    let admin = AdminToken::load_or_create(&path)?;
    let keys = opts.keys_file.as_deref().map(ApiKeys::read).transpose()?;
    if let Some(listen) = opts.listen
        && let Some(w) = exposure_warning(listen, keys.is_some())
    {
        tracing::warn!("{w}");
    }
    if let Some(k) = &keys {
        tracing::info!(keys = k.len(), "the OpenAI routes need an API key");
    }
    tracing::info!(token = %path.display(), "the admin API needs the token in this file");
    Ok(build(node, opts, Ok(admin), keys, path))
}

fn build(
    node: Node,
    opts: &ApiOptions,
    admin: Result<AdminToken, String>,
    keys: Option<ApiKeys>,
    admin_path: PathBuf,
) -> Router {
    let r = routes(opts).with_state(node.clone());
    // The OpenAI-compatible routes of the serving layer (`crate::serve`),
    // when the node serves (`Node::init_serving`, done by `crate::daemon`).
    let r = match node.serving() {
        Some(s) => r.merge(crate::serve::router(s)),
        None => {
            tracing::warn!("the node does not serve models: no OpenAI routes");
            r
        }
    };
    let guard = Guard::new(
        admin,
        admin_path,
        keys,
        &opts.allowed_hosts,
        &opts.allowed_origins,
    );
    r.layer(axum::middleware::from_fn_with_state(guard, auth::guard))
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
            NodeError::Store(StoreError::Release(_)) => StatusCode::BAD_REQUEST,
            NodeError::Store(StoreError::TooLong { .. }) => StatusCode::BAD_REQUEST,
            NodeError::Store(StoreError::Corrupt { .. }) => StatusCode::SERVICE_UNAVAILABLE,
            NodeError::Store(StoreError::DamagedMetadata { .. }) => StatusCode::SERVICE_UNAVAILABLE,
            NodeError::Mesh(m) => return ApiError(mesh_status(m), e.to_string()),
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError(status, e.to_string())
    }
}

/// The HTTP status of a mesh failure: too many downloads is the caller's to
/// retry later (429), a full disk is 507, anything else 503.
fn mesh_status(e: &crate::mesh::MeshError) -> StatusCode {
    use crate::mesh::MeshError;
    match e {
        MeshError::TooManyDownloads { .. } => StatusCode::TOO_MANY_REQUESTS,
        MeshError::DiskFull { .. } => StatusCode::INSUFFICIENT_STORAGE,
        _ => StatusCode::SERVICE_UNAVAILABLE,
    }
}

impl From<crate::mesh::MeshError> for ApiError {
    fn from(e: crate::mesh::MeshError) -> Self {
        ApiError(mesh_status(&e), e.to_string())
    }
}

impl From<crate::store::StoreError> for ApiError {
    fn from(e: crate::store::StoreError) -> Self {
        crate::node::NodeError::Store(e).into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_open_api_on_the_network_is_warned_about() {
        let lan: SocketAddr = "0.0.0.0:7070".parse().expect("addr");
        let lo: SocketAddr = "127.0.0.1:7070".parse().expect("addr");
        let w = exposure_warning(lan, false).expect("a warning");
        assert!(
            w.contains("api.keys_file") && w.contains("0.0.0.0:7070"),
            "{w}"
        );
        assert_eq!(exposure_warning(lan, true), None);
        assert_eq!(exposure_warning(lo, false), None);
        assert_eq!(
            exposure_warning("[::1]:7070".parse().expect("addr"), false),
            None
        );
    }

    #[test]
    fn mesh_and_store_failures_get_the_status_a_client_can_act_on() {
        use crate::mesh::MeshError;
        use crate::node::NodeError;
        use crate::store::StoreError;
        let too_many = MeshError::TooManyDownloads { limit: 4 };
        assert_eq!(ApiError::from(too_many).0, StatusCode::TOO_MANY_REQUESTS);
        let via_node = NodeError::Mesh(MeshError::TooManyDownloads { limit: 4 });
        assert_eq!(ApiError::from(via_node).0, StatusCode::TOO_MANY_REQUESTS);
        let full = NodeError::Mesh(MeshError::DiskFull {
            id: "ab".into(),
            detail: "No space left on device".into(),
        });
        let e = ApiError::from(full);
        assert_eq!(e.0, StatusCode::INSUFFICIENT_STORAGE);
        assert!(e.1.contains("disk is full"), "{}", e.1);
        let long = NodeError::Store(StoreError::TooLong {
            what: "name",
            len: 70_000,
        });
        assert_eq!(ApiError::from(long).0, StatusCode::BAD_REQUEST);
    }
}
