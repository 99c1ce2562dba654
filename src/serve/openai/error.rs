//! [`OpenAiError`]: the OpenAI-style error body and status of a failed
//! request, and the errors of a model that cannot be served.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

/// An OpenAI-style error response.
#[derive(Debug)]
pub struct OpenAiError {
    pub(super) status: StatusCode,
    pub(super) message: String,
    pub(super) ty: &'static str,
    pub(super) param: Option<&'static str>,
    pub(super) code: Option<&'static str>,
    pub(super) retry_after: Option<u64>,
}

impl OpenAiError {
    /// An error of `status` with a message, an OpenAI error type
    /// (`invalid_request_error`, `server_error`, ...) and an optional code.
    pub fn new(
        status: StatusCode,
        message: impl Into<String>,
        ty: &'static str,
        code: Option<&'static str>,
    ) -> OpenAiError {
        OpenAiError {
            status,
            message: message.into(),
            ty,
            param: None,
            code,
            retry_after: None,
        }
    }

    pub(super) fn invalid(
        message: impl Into<String>,
        param: Option<&'static str>,
        code: Option<&'static str>,
    ) -> OpenAiError {
        OpenAiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            ty: "invalid_request_error",
            param,
            code,
            retry_after: None,
        }
    }

    pub(super) fn server(message: impl Into<String>) -> OpenAiError {
        OpenAiError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: message.into(),
            ty: "server_error",
            param: None,
            code: None,
            retry_after: None,
        }
    }

    /// The JSON body: `{"error": {"message", "type", "param", "code"}}`.
    pub fn body(&self) -> Value {
        json!({"error": {
            "message": self.message,
            "type": self.ty,
            "param": self.param,
            "code": self.code,
        }})
    }
}

impl IntoResponse for OpenAiError {
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

/// The error response of a model that cannot be served. Names in messages
/// are cut to [`crate::serve::MAX_MODEL_NAME`] bytes.
pub(super) fn locate_error(name: &str, e: crate::serve::LocateError) -> OpenAiError {
    use crate::serve::LocateError as L;
    let mut cut = name.len().min(crate::serve::MAX_MODEL_NAME);
    while !name.is_char_boundary(cut) {
        cut -= 1;
    }
    let name = &name[..cut];
    let unavailable = |message: String, code: &'static str, retry_after: Option<u64>| OpenAiError {
        status: StatusCode::SERVICE_UNAVAILABLE,
        message,
        ty: "server_error",
        param: Some("model"),
        code: Some(code),
        retry_after,
    };
    match e {
        L::Unknown(m) => OpenAiError {
            message: m,
            ..unknown_model(name)
        },
        L::Unavailable(m) => unavailable(
            format!("The model `{name}` is not available on this node: {m}"),
            "model_unavailable",
            None,
        ),
        L::Corrupt(m) => unavailable(m, "model_corrupt", Some(30)),
        L::Busy {
            message,
            retry_after,
        } => unavailable(
            format!("The model `{name}` cannot be loaded now: {message}"),
            "models_busy",
            Some(retry_after),
        ),
        L::Invalid(m) => OpenAiError::invalid(m, Some("model"), Some("string_above_max_length")),
        // The model exists, the request is well-formed, and no retry will
        // help: 422 (clients do not retry it, unlike a 503).
        L::Unservable(u) => OpenAiError {
            status: StatusCode::UNPROCESSABLE_ENTITY,
            message: format!("The model `{name}` cannot be served by this node: {u}."),
            ty: "invalid_request_error",
            param: Some("model"),
            code: Some("model_not_supported"),
            retry_after: None,
        },
    }
}

pub(super) fn unknown_model(name: &str) -> OpenAiError {
    OpenAiError {
        status: StatusCode::NOT_FOUND,
        message: format!("The model `{name}` does not exist or is not served by this node."),
        ty: "invalid_request_error",
        param: Some("model"),
        code: Some("model_not_found"),
        retry_after: None,
    }
}
