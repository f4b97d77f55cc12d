//! HTTP routes. Each module owns its routes; [`router`] merges them.

mod health;
mod tasks;

use axum::{
    Router,
    extract::{FromRequest, Request},
    http::{HeaderValue, Method, StatusCode, Uri, header},
    middleware::{self, Next},
    response::{IntoResponse, Response},
};

use tower_http::catch_panic::CatchPanicLayer;

use crate::{AppState, error::ApiError};

/// The whole HTTP surface.
pub fn router(state: AppState) -> Router {
    Router::new()
        .merge(tasks::router())
        .merge(health::router())
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(
            state.clone(),
            set_retry_after,
        ))
        .with_state(state)
        // Runs first: turn axum's bodyless 405 into our JSON error, keeping its Allow header.
        .layer(middleware::from_fn(json_method_not_allowed))
        // Outermost: a bug that panics in a handler answers this one request with a JSON 500
        // instead of dropping the connection without a word.
        .layer(CatchPanicLayer::custom(internal_error))
}

fn internal_error(_panic: Box<dyn std::any::Any + Send + 'static>) -> Response {
    tracing::error!("a request handler panicked; answering 500");
    (
        StatusCode::INTERNAL_SERVER_ERROR,
        axum::Json(serde_json::json!({
            "error": "internal error in the gateway; the task may not have been queued, retry it"
        })),
    )
        .into_response()
}

async fn not_found(method: Method, uri: Uri) -> ApiError {
    ApiError::NotFound {
        method: method.to_string(),
        path: uri.path().to_owned(),
    }
}

async fn json_method_not_allowed(request: Request, next: Next) -> Response {
    // Cheap handles (an enum, a shared buffer); text is made only for an actual 405.
    let method = request.method().clone();
    let uri = request.uri().clone();
    let response = next.run(request).await;
    if response.status() != StatusCode::METHOD_NOT_ALLOWED {
        return response;
    }
    let allow = response.headers().get(header::ALLOW).cloned();
    let mut json = ApiError::MethodNotAllowed {
        method: method.to_string(),
        path: uri.path().to_owned(),
    }
    .into_response();
    if let Some(allow) = allow {
        json.headers_mut().insert(header::ALLOW, allow);
    }
    json
}

/// Every 503 carries the configured `Retry-After`.
async fn set_retry_after(
    axum::extract::State(state): axum::extract::State<AppState>,
    request: Request,
    next: Next,
) -> Response {
    let mut response = next.run(request).await;
    if response.status() == StatusCode::SERVICE_UNAVAILABLE {
        response.headers_mut().insert(
            header::RETRY_AFTER,
            HeaderValue::from(state.retry_after_secs),
        );
    }
    response
}

/// `axum::Json`, but its rejections come back as our JSON errors.
#[derive(FromRequest)]
#[from_request(via(axum::Json), rejection(ApiError))]
pub struct Json<T>(pub T);

impl<T: serde::Serialize> IntoResponse for Json<T> {
    fn into_response(self) -> Response {
        axum::Json(self.0).into_response()
    }
}
