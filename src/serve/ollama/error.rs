//! [`OllamaError`]: Ollama's error body (`{"error": "..."}`) with its status,
//! and the errors of a model that cannot be served.

use crate::serve::LocateError;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

/// An error answered as Ollama does: `{"error": "<message>"}` with a status
/// (and `Retry-After` when retrying later will help).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OllamaError {
    /// The HTTP status.
    pub status: StatusCode,
    /// What went wrong.
    pub message: String,
    /// Seconds to wait before retrying, if any.
    pub retry_after: Option<u64>,
}

impl OllamaError {
    pub(super) fn new(status: StatusCode, message: impl Into<String>) -> OllamaError {
        OllamaError {
            status,
            message: message.into(),
            retry_after: None,
        }
    }

    /// A bad request (400).
    pub(super) fn bad(message: impl Into<String>) -> OllamaError {
        OllamaError::new(StatusCode::BAD_REQUEST, message)
    }

    /// A server-side failure (500).
    pub(super) fn server(message: impl Into<String>) -> OllamaError {
        OllamaError::new(StatusCode::INTERNAL_SERVER_ERROR, message)
    }

    /// Ollama's "not found" for a model name (404).
    pub(super) fn not_found(name: &str) -> OllamaError {
        OllamaError::new(
            StatusCode::NOT_FOUND,
            format!("model '{}' not found", cut(name)),
        )
    }

    /// The body, as a stream line or a whole response.
    pub(super) fn body(&self) -> serde_json::Value {
        json!({ "error": self.message })
    }
}

impl IntoResponse for OllamaError {
    fn into_response(self) -> Response {
        let mut r = (self.status, axum::Json(self.body())).into_response();
        if let Some(s) = self.retry_after
            && let Ok(v) = HeaderValue::from_str(&s.to_string())
        {
            r.headers_mut().insert(header::RETRY_AFTER, v);
        }
        r
    }
}

/// `name` cut to [`crate::serve::MAX_MODEL_NAME`] bytes for messages.
fn cut(name: &str) -> &str {
    let mut n = name.len().min(crate::serve::MAX_MODEL_NAME);
    while !name.is_char_boundary(n) {
        n -= 1;
    }
    &name[..n]
}

/// The error of a model that cannot be served, with the statuses of the
/// OpenAI routes (404 unknown, 503 unavailable or busy, 422 unservable,
/// 400 invalid name).
pub(super) fn locate_error(name: &str, e: LocateError) -> OllamaError {
    let name = cut(name);
    match e {
        LocateError::Unknown(_) => OllamaError::not_found(name),
        LocateError::Unavailable(m) => OllamaError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("model '{name}' is not available on this node: {m}"),
        ),
        LocateError::Corrupt(m) => OllamaError {
            retry_after: Some(30),
            ..OllamaError::new(StatusCode::SERVICE_UNAVAILABLE, m)
        },
        LocateError::Busy {
            message,
            retry_after,
        } => OllamaError {
            retry_after: Some(retry_after),
            ..OllamaError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("model '{name}' cannot be loaded now: {message}"),
            )
        },
        LocateError::Invalid(m) => OllamaError::bad(m),
        LocateError::Unservable(u) => OllamaError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("model '{name}' cannot be served by this node: {u}"),
        ),
    }
}
