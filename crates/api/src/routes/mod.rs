//! HTTP routes. Each module owns its routes; [`router`] merges them.

mod dashboard;
mod dead;
mod health;
mod metrics;
mod tasks;

use axum::{
    Router,
    extract::{DefaultBodyLimit, FromRequest, MatchedPath, Request, State},
    http::{Method, Uri, header},
    response::{IntoResponse, Response},
};
use serde::de::DeserializeOwned;
use tower_http::catch_panic::CatchPanicLayer;

use crate::{AppState, error::ApiError};

/// The whole HTTP surface; with `metrics`, `GET /metrics` and the counting of requests;
/// with `dashboard`, the page at `GET /`.
pub fn router(state: AppState, metrics: bool, dashboard: bool) -> Router {
    let mut routes = Router::new()
        .merge(tasks::router(&state))
        .merge(dead::router(&state))
        .merge(health::router());
    if dashboard {
        routes = routes.merge(dashboard::router(&state));
    }
    if metrics {
        routes = routes
            .merge(metrics::router(&state))
            // After every route is merged: it applies to the routes present.
            .route_layer(axum::middleware::from_fn_with_state(
                state.clone(),
                crate::metrics::track,
            ));
    }
    routes
        .method_not_allowed_fallback(method_not_allowed)
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(state.max_body_bytes))
        .with_state(state)
        // Outermost: a bug that panics in a handler answers this one request with a JSON 500
        // instead of dropping the connection without a word.
        .layer(CatchPanicLayer::custom(|_panic| {
            tracing::error!("a request handler panicked; answering 500");
            ApiError::Internal.into_response()
        }))
}

async fn not_found(State(state): State<AppState>, method: Method, uri: Uri) -> Response {
    let response = ApiError::NotFound {
        method: method.to_string(),
        path: uri.path().to_owned(),
    }
    .into_response();
    crate::metrics::count_route(&state, None, &method, &response);
    response
}

/// axum adds the `Allow` header to what this returns.
async fn method_not_allowed(
    State(state): State<AppState>,
    matched: Option<MatchedPath>,
    method: Method,
    uri: Uri,
) -> Response {
    let response = ApiError::MethodNotAllowed {
        method: method.to_string(),
        path: uri.path().to_owned(),
    }
    .into_response();
    // The route layer does not see this fallback: count it here, under its route.
    crate::metrics::count_route(&state, matched.as_ref(), &method, &response);
    response
}

/// `axum::Json`, bounded and with our errors: an announced body over `MAX_BODY_BYTES` is
/// refused before a byte of it is read (so `Expect: 100-continue` gets 413, not
/// `100 Continue`), and the whole body must arrive within `BODY_TIMEOUT`.
pub struct Json<T>(pub T);

impl<T: DeserializeOwned> FromRequest<AppState> for Json<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &AppState) -> Result<Self, ApiError> {
        let announced = request
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|value| value.to_str().ok()?.parse::<u64>().ok());
        if announced.is_some_and(|length| length > state.max_body_bytes as u64) {
            return Err(ApiError::BodyTooLarge {
                limit: state.max_body_bytes,
            });
        }
        let read = axum::Json::<T>::from_request(request, state);
        if state.body_timeout.is_zero() {
            return Ok(Self(read.await?.0));
        }
        match tokio::time::timeout(state.body_timeout, read).await {
            Ok(Ok(axum::Json(value))) => Ok(Self(value)),
            Ok(Err(rejection)) => Err(rejection.into()),
            Err(_) => Err(ApiError::BodyTimeout(state.body_timeout)),
        }
    }
}

impl<T: serde::Serialize> IntoResponse for Json<T> {
    fn into_response(self) -> Response {
        axum::Json(self.0).into_response()
    }
}
