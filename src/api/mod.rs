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
pub mod chat;
pub mod client;
pub mod dashboard;
pub mod ops;
pub mod server;
pub mod store_cmd;

use crate::config::{ConfigError, Setting};
use crate::node::Node;
use auth::{AdminToken, ApiKeys, AuthError, Guard, PullGate};
use axum::Json;
use axum::Router;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

pub use server::{Timeouts, serve_with};

/// Settings of the HTTP API: the `[api]` section of the configuration file
/// ([`SETTINGS`]), plus `[metrics] enabled`, which the node copies in.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ApiOptions {
    /// Where the API listens (`api.listen`; also for the warning about an open API).
    pub listen: SocketAddr,
    /// On SIGTERM/SIGINT, how long open requests may run before the daemon
    /// exits anyway (non-zero, logging what was still running; `api.drain_timeout`).
    #[serde(with = "crate::config::duration")]
    pub drain_timeout: Duration,
    /// The admin token file (`api.admin_token_file`); `None`: `<data dir>/admin.token`.
    pub admin_token_file: Option<PathBuf>,
    /// The API keys of `/v1/*` (`api.keys_file`); `None`: no key needed.
    pub keys_file: Option<PathBuf>,
    /// Host names accepted besides IP addresses and localhost (`api.allowed_hosts`).
    pub allowed_hosts: Vec<String>,
    /// Browser origins allowed cross-origin (`api.allowed_origins`).
    pub allowed_origins: Vec<String>,
    /// Concurrent downloads started through `POST /admin/pull` (`api.max_pulls`).
    pub max_pulls: usize,
    /// Time a client has to send a request's headers (`api.header_timeout`).
    #[serde(with = "crate::config::duration")]
    pub header_timeout: Duration,
    /// Time a client may leave a request body without sending more of it
    /// (`api.body_timeout`).
    #[serde(with = "crate::config::duration")]
    pub body_timeout: Duration,
    /// Keep-alive connections with no request for this long are closed
    /// (`api.idle_timeout`).
    #[serde(with = "crate::config::duration")]
    pub idle_timeout: Duration,
    /// Serve Prometheus metrics at `GET /metrics` (`[metrics] enabled`, not
    /// part of `[api]`).
    #[serde(skip)]
    pub metrics: bool,
}

/// Port of the HTTP API by default.
pub const DEFAULT_API_PORT: u16 = 7070;

impl Default for ApiOptions {
    /// The configuration file's defaults (`[api]`, `[metrics]`).
    fn default() -> Self {
        ApiOptions {
            listen: SocketAddr::from(([127, 0, 0, 1], DEFAULT_API_PORT)),
            drain_timeout: Duration::from_secs(30),
            admin_token_file: None,
            keys_file: None,
            allowed_hosts: Vec::new(),
            allowed_origins: Vec::new(),
            max_pulls: 4,
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(30),
            metrics: true,
        }
    }
}

impl ApiOptions {
    /// The connection timeouts.
    pub fn timeouts(&self) -> Timeouts {
        Timeouts {
            header: self.header_timeout,
            body: self.body_timeout,
            idle: self.idle_timeout,
        }
    }

    /// Checks ranges that the types alone do not.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.max_pulls == 0 {
            return Err(ConfigError::Invalid(
                "api.max_pulls must be at least 1".into(),
            ));
        }
        for (key, d) in [
            ("api.header_timeout", self.header_timeout),
            ("api.body_timeout", self.body_timeout),
            ("api.idle_timeout", self.idle_timeout),
        ] {
            if d < Duration::from_millis(100) || d > Duration::from_secs(24 * 3600) {
                return Err(ConfigError::Invalid(format!(
                    "{key} = {} is outside 100ms..24h",
                    crate::config::HumanDuration(d)
                )));
            }
        }
        if let Some(h) = self
            .allowed_hosts
            .iter()
            .find(|h| h.is_empty() || h.contains(|c: char| c.is_whitespace() || c == '/'))
        {
            return Err(ConfigError::Invalid(format!(
                "api.allowed_hosts: {h:?} is not a host name (no scheme, path or spaces)"
            )));
        }
        if let Some(o) = self.allowed_origins.iter().find(|o| {
            let rest = o
                .strip_prefix("http://")
                .or_else(|| o.strip_prefix("https://"));
            o.as_str() != "*"
                && rest.is_none_or(|r| {
                    r.is_empty() || r.contains(|c: char| c.is_whitespace() || c == '/')
                })
        }) {
            return Err(ConfigError::Invalid(format!(
                "api.allowed_origins: {o:?} is not an origin (scheme://host[:port], no path, or \"*\")"
            )));
        }
        Ok(())
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
        .merge(store_cmd::routes())
        .merge(dashboard::routes())
        .merge(chat::routes())
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
    if let Some(w) = exposure_warning(opts.listen, keys.is_some()) {
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
        Some(s) => {
            let generation = crate::serve::openai::with_node_header(
                crate::serve::router(s.clone()).merge(crate::serve::ollama::router(s)),
                &node.mesh().peer_id().to_string(),
            );
            match node.routing() {
                // Requests go through the router (`crate::route`); peers'
                // forwarded requests reach the generation routes directly.
                Some(routing) => {
                    let keys = keys.clone();
                    let authorize: crate::route::forward::Authorize =
                        std::sync::Arc::new(move |h: Option<&[u8; 32]>| match &keys {
                            None => true,
                            Some(k) => h.is_some_and(|h| k.matches_hash(h)),
                        });
                    if tokio::runtime::Handle::try_current().is_ok() {
                        tokio::spawn(crate::route::proxy::serve_forwarded(
                            routing.clone(),
                            generation.clone(),
                            authorize,
                        ));
                    }
                    r.merge(generation.layer(axum::middleware::from_fn_with_state(
                        routing,
                        crate::route::proxy::route,
                    )))
                }
                None => r.merge(generation),
            }
        }
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
            NodeError::Store(StoreError::Open(crate::store::OpenError::DamagedMetadata {
                ..
            })) => StatusCode::SERVICE_UNAVAILABLE,
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

/// The `[api]` section's settings, in file order.
pub const SETTINGS: &[Setting] = {
    use crate::config::Kind::{Int, List, Str};
    use crate::config::Setting as S;
    &[
        S::new(
            "api.listen",
            Some("SHOAL_API"),
            Str,
            "Address of the HTTP API. Loopback by default; use \"0.0.0.0:7070\" to serve the LAN\n(or put NGINX in front, see docs/OPERATIONS.md). On a non-loopback address, set\napi.keys_file too (the node warns at start when it is unset).",
            "\"127.0.0.1:7070\"",
        ),
        S::new(
            "api.drain_timeout",
            Some("SHOAL_DRAIN_TIMEOUT"),
            Str,
            "On SIGTERM or Ctrl-C, how long running requests may finish before the daemon exits\nanyway (with a non-zero status, logging what was still running). A second signal\nexits at once.",
            "\"30s\"",
        ),
        S::new(
            "api.admin_token_file",
            Some("SHOAL_ADMIN_TOKEN_FILE"),
            Str,
            "Bearer token of the admin API (/admin/*: pull, pin, releases, status), required from\nevery caller. Unset: <data_dir>/admin.token, a random 256-bit token (hex) written\nat first start with mode 0600; the shoal CLI on the same machine reads it. A file\nyou write yourself must hold one token of at least 32 characters.",
            "\"/var/lib/shoal/admin.token\"",
        ),
        S::new(
            "api.keys_file",
            Some("SHOAL_KEYS_FILE"),
            Str,
            "API keys of the OpenAI-compatible routes (/v1/*): one key per line, # comments.\nClients send \"Authorization: Bearer <key>\" (the openai client's api_key). Unset:\n/v1/* needs no key (fine on loopback; read at start).",
            "\"/etc/shoal/api-keys\"",
        ),
        S::new(
            "api.allowed_hosts",
            Some("SHOAL_ALLOWED_HOSTS"),
            List,
            "Host names accepted in requests' Host header, besides IP addresses, \"localhost\"\nand *.localhost (a leading \"*.\" matches subdomains; \"*\" accepts any). Other\nnames get 403: this stops DNS-rebinding pages from reaching the node.",
            "[\"pi-07.local\", \"ai.example.lan\"]",
        ),
        S::new(
            "api.allowed_origins",
            Some("SHOAL_ALLOWED_ORIGINS"),
            List,
            "Web origins allowed to call the API from a browser (CORS), e.g.\n\"http://notebook.example.lan:8888\"; \"*\" allows any. The node's own pages (same\norigin) always may; requests from other origins get 403.",
            "[\"http://notebook.example.lan:8888\"]",
        ),
        S::new(
            "api.max_pulls",
            Some("SHOAL_MAX_PULLS"),
            Int,
            "Downloads started through POST /admin/pull that may run at once; more get HTTP 429\nwith Retry-After (joining a running download is always allowed).",
            "4",
        ),
        S::new(
            "api.header_timeout",
            Some("SHOAL_HEADER_TIMEOUT"),
            Str,
            "A client must send a request's headers within this time from its first byte; a\nslower one is disconnected.",
            "\"10s\"",
        ),
        S::new(
            "api.body_timeout",
            Some("SHOAL_BODY_TIMEOUT"),
            Str,
            "A request body that receives no bytes for this long fails (the connection closes).",
            "\"30s\"",
        ),
        S::new(
            "api.idle_timeout",
            Some("SHOAL_IDLE_TIMEOUT"),
            Str,
            "A keep-alive connection with no request in progress for this long is closed (a\nlong generation or event stream is a request in progress, not idle).",
            "\"30s\"",
        ),
    ]
};

/// A bundled page's files as routes: `(path, content type, body)` each,
/// served by [`static_file`].
pub(crate) fn static_files<S: Clone + Send + Sync + 'static>(
    files: &'static [(&'static str, &'static str, &'static str)],
) -> Router<S> {
    let mut r = Router::new();
    for &(path, content_type, body) in files {
        r = r.route(
            path,
            axum::routing::get(move || async move { static_file(content_type, body) }),
        );
    }
    r
}

/// One file of a bundled page (the dashboard, the chat page): no caching
/// without revalidation, and the strict Content-Security-Policy of
/// [`chat::CSP`] with its companions (no sniffing, no referrer, no framing).
pub(crate) fn static_file(content_type: &'static str, body: &'static str) -> Response {
    use axum::http::header;
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
            (header::CONTENT_SECURITY_POLICY, chat::CSP),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
            (header::X_FRAME_OPTIONS, "DENY"),
        ],
        body,
    )
        .into_response()
}

/// Checks a bundled page for the tests of its module: its HTML has no inline
/// script or style (the CSP forbids them), its scripts use no HTML sink
/// (text from peers and models is written as text), and every module a
/// script imports is one of the page's served `assets` under `prefix`.
#[cfg(test)]
pub(crate) fn check_static_page(
    index_html: &str,
    scripts: &[(&str, &str)],
    assets: &[(&str, &str, &str)],
    prefix: &str,
) {
    assert!(!index_html.contains("<script>") && !index_html.contains("style="));
    assert!(!index_html.contains("<style"));
    for (name, js) in scripts {
        for bad in [
            "innerHTML",
            "outerHTML",
            "insertAdjacentHTML",
            "document.write",
            "eval(",
            "setAttribute(\"style\"",
        ] {
            assert!(!js.contains(bad), "{name} uses {bad}");
        }
        for imp in js.lines().filter(|l| l.starts_with("import ")) {
            let file = imp.rsplit('"').nth(1).unwrap_or("");
            let path = format!("{prefix}{}", file.trim_start_matches("./"));
            assert!(
                assets.iter().any(|a| a.0 == path),
                "{name} imports {file}, which is not served"
            );
        }
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
