//! The gateway's one error type, and its one mapping to HTTP.

use axum::{
    Json,
    extract::rejection::JsonRejection,
    http::StatusCode,
    response::{IntoResponse, Response},
};
use serde::Serialize;

use crate::publisher::PublishError;

/// Everything a request can fail with. Each variant's message tells the client what to do.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The request body could not be read as the JSON we expect.
    #[error(transparent)]
    Json(#[from] JsonRejection),
    /// No route at that path.
    #[error("no route for {method} {path}; offload serves POST /tasks and GET /health")]
    NotFound {
        /// Request method.
        method: String,
        /// Request path.
        path: String,
    },
    /// The route exists but not with this method.
    #[error("{method} is not allowed on {path}; see the Allow header for the methods that are")]
    MethodNotAllowed {
        /// Request method.
        method: String,
        /// Request path.
        path: String,
    },
    /// The broker did not take the task.
    #[error("the task was not queued: {0}. Retry after the Retry-After delay")]
    Unavailable(#[from] PublishError),
}

#[derive(Serialize)]
struct ErrorBody {
    error: String,
}

impl ApiError {
    fn status_code(&self) -> StatusCode {
        match self {
            Self::Json(rejection) => rejection.status(),
            Self::NotFound { .. } => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            Self::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// The message the client sees.
    fn message(&self) -> String {
        match self {
            Self::Json(rejection) => json_advice(rejection),
            // Without a confirm nobody knows whether the broker kept the task; say so, since a
            // retry may then run it twice (delivery is at least once anyway).
            Self::Unavailable(error @ PublishError::Timeout(_)) => format!(
                "the task may not have been queued: {error}. Retry after the Retry-After delay; \
                 if it was queued after all it runs twice, so handlers should be idempotent"
            ),
            other => other.to_string(),
        }
    }
}

/// Rewords axum's JSON rejections so each says what to send instead.
fn json_advice(rejection: &JsonRejection) -> String {
    match rejection {
        JsonRejection::MissingJsonContentType(_) => {
            "send the task as JSON with the header Content-Type: application/json".into()
        }
        JsonRejection::JsonSyntaxError(_) => format!(
            "the body is not valid JSON ({}); send an object like {{\"kind\": \"sleep\", \"payload\": {{\"message\": \"...\"}}}}",
            inner_most(rejection)
        ),
        JsonRejection::JsonDataError(error) => format!(
            "the body does not describe a task: {}. Expected {{\"kind\": \"<1-64 chars of a-z 0-9 _ . ->\", \"payload\": <any JSON, optional>}} and no other fields",
            inner_most(error)
        ),
        JsonRejection::BytesRejection(_) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            "the body is larger than this gateway accepts (MAX_BODY_BYTES); send a smaller payload, or store large inputs elsewhere and send a reference".into()
        }
        _ => format!("the request body could not be read: {}", rejection.body_text()),
    }
}

/// serde's message, without axum's "Failed to deserialize..." prefix.
fn inner_most(error: &dyn std::error::Error) -> String {
    let mut current = error;
    while let Some(source) = current.source() {
        current = source;
    }
    current.to_string()
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status_code();
        let message = self.message();
        if status.is_server_error() {
            tracing::warn!(status = status.as_u16(), "{message}");
        } else {
            tracing::debug!(status = status.as_u16(), "{message}");
        }
        // Retry-After on 503s is added by the router, from the configured value.
        (status, Json(ErrorBody { error: message })).into_response()
    }
}

/// `Result` with [`ApiError`] as the default error.
pub type Result<T, E = ApiError> = std::result::Result<T, E>;
