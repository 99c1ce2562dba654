//! The OpenAI-compatible routes: `POST /v1/chat/completions`,
//! `POST /v1/completions`, `GET /v1/models`, `GET /v1/models/{model}`.
//!
//! Layout: `schema` (request types), `prepare` (request preparation),
//! `format` (JSON and SSE responses), the handlers, and [`OpenAiError`].

mod error;
mod format;
mod handlers;
mod prepare;
mod schema;

pub use error::OpenAiError;

use crate::serve::Serving;
use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::HeaderValue;
use axum::response::Response;
use axum::routing::{get, post};
use handlers::{chat, completions, get_model, list_models};
use std::sync::Arc;

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

/// The response header naming the node that answered (its peer id), so a
/// client behind a proxy or on a mesh of nodes sees which one served it.
pub const NODE_HEADER: &str = "x-shoal-node";

/// The response header naming the node that ran the model of a generation
/// request (its peer id): this node's, or a peer's when the request was
/// forwarded to it. The same id is in the `served_by` field of the body
/// (see `docs/SERVING.md`, "Who served a request").
pub const SERVED_BY_HEADER: &str = "x-shoal-served-by";

/// `router` with every response naming `node` in [`NODE_HEADER`], and in
/// [`SERVED_BY_HEADER`] unless the response names its server already (a
/// forwarded answer keeps the peer's); unchanged if `node` cannot be a
/// header value.
pub fn with_node_header(router: Router, node: &str) -> Router {
    let Ok(v) = HeaderValue::from_str(node) else {
        return router;
    };
    router.layer(axum::middleware::map_response(move |mut r: Response| {
        let v = v.clone();
        async move {
            r.headers_mut().entry(SERVED_BY_HEADER).or_insert(v.clone());
            r.headers_mut().insert(NODE_HEADER, v);
            r
        }
    }))
}
