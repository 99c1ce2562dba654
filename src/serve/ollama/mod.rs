//! The Ollama-compatible routes, beside the OpenAI ones on the same port and
//! over the same [`Serving`] (engines, prefix KV cache, response cache):
//! `GET /api/version`, `GET /api/tags`, `POST /api/show`, `GET /api/ps`,
//! `POST /api/chat`, `POST /api/generate` (NDJSON streaming or one JSON) and
//! `POST /api/pull` (a store or mesh pull with progress lines).
//!
//! Layout: `schema` (request types), `prepare` (validation, prompt, sampler
//! settings), `run` (admission, the response cache, NDJSON or JSON
//! answers), `info` (model details from the GGUF header), `handlers`
//! (listing, show, ps, version), `pull`, and [`OllamaError`]. See the
//! "Ollama API" section of `docs/SERVING.md`.

mod error;
mod handlers;
mod info;
mod prepare;
mod pull;
mod run;
mod schema;

pub use error::OllamaError;

use crate::serve::Serving;
use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use std::collections::HashMap;
use std::sync::Arc;

/// The version `GET /api/version` reports: an Ollama version recent
/// enough for clients that check it (they gate features on it), followed
/// by this build's own.
pub const OLLAMA_VERSION: &str = "0.12.0";

/// State of the routes: the serving layer and model details read once per
/// artifact.
#[derive(Debug)]
pub(crate) struct Ollama {
    serving: Arc<Serving>,
    details: parking_lot::Mutex<HashMap<[u8; 32], Arc<info::Info>>>,
}

/// The routes, with `serving` as their state, ready to merge into a node's router.
pub fn router(serving: Arc<Serving>) -> Router {
    let limit = serving.config().body_limit;
    let st = Arc::new(Ollama {
        serving,
        details: parking_lot::Mutex::new(HashMap::new()),
    });
    Router::new()
        .route("/api/version", get(handlers::version))
        .route("/api/tags", get(handlers::tags))
        .route("/api/ps", get(handlers::ps))
        .route("/api/show", post(handlers::show))
        .route("/api/pull", post(pull::pull))
        .route("/api/chat", post(run::chat))
        .route("/api/generate", post(run::generate))
        .layer(DefaultBodyLimit::max(limit))
        .with_state(st)
}

/// `t` (Unix seconds and nanoseconds) as RFC 3339 in UTC, with
/// nanoseconds, as Ollama writes `created_at`.
pub(crate) fn rfc3339(t: std::time::SystemTime) -> String {
    let d = t.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:09}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_nanos()
    )
}

/// Now, as [`rfc3339`].
pub(crate) fn now() -> String {
    rfc3339(std::time::SystemTime::now())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    #[test]
    fn rfc3339_matches_known_dates() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000000000Z");
        // 2024-02-29T12:34:56.5Z (a leap day).
        let t = UNIX_EPOCH + Duration::new(1_709_210_096, 500_000_000);
        assert_eq!(rfc3339(t), "2024-02-29T12:34:56.500000000Z");
        let t = UNIX_EPOCH + Duration::from_secs(4_102_444_799);
        assert_eq!(rfc3339(t), "2099-12-31T23:59:59.000000000Z");
    }
}
