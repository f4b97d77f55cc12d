//! HTTP routes. Each module owns its routes; [`router`] merges them.

mod cancel;
mod dashboard;
mod dead;
mod health;
mod kinds;
pub(crate) mod metrics;
mod schedules;
mod tasks;

use std::sync::Arc;

use axum::{
    Extension, Router,
    extract::{DefaultBodyLimit, FromRequest, FromRequestParts, MatchedPath, Request, State},
    http::{Method, Uri, header, request::Parts},
    response::{IntoResponse, Response},
};
use serde::de::DeserializeOwned;
use tower_http::catch_panic::CatchPanicLayer;
use utoipa::OpenApi;
use utoipa_axum::{router::OpenApiRouter, routes};

use crate::{AppState, error::ApiError, openapi::ApiDoc};

/// The whole HTTP surface, and its OpenAPI document: with `metrics`, `GET /metrics` and
/// the counting of requests; with `dashboard`, the page at `GET /`. Every route is added
/// with `routes!`, never `route`, so none is served without being documented.
pub fn router(state: AppState, metrics: bool, dashboard: bool) -> Router {
    let mut api = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .merge(tasks::router(&state))
        .merge(cancel::router(&state))
        .merge(dead::router(&state))
        .merge(kinds::router(&state))
        .merge(schedules::router(&state))
        .merge(health::router())
        .routes(routes!(openapi_json));
    if dashboard {
        api = api.merge(dashboard::router(&state));
    }
    if metrics {
        api = api.merge(metrics::router(&state));
    }
    let (mut routes, document) = api.split_for_parts();
    let document = Document(Arc::from(
        document
            .to_json()
            .expect("an OpenAPI document of plain data always serialises"),
    ));
    if metrics {
        // After every route is merged: it applies to the routes present.
        routes = routes.route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            crate::routes::metrics::track,
        ));
    }
    routes
        .layer(Extension(document))
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

/// The OpenAPI document, rendered once.
#[derive(Clone)]
struct Document(Arc<str>);

/// This document: every route, its parameters, bodies, answers and error codes (OpenAPI 3.1).
#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "operations",
    responses((status = 200, description = "The OpenAPI document", body = Object)),
)]
async fn openapi_json(Extension(Document(document)): Extension<Document>) -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        document.to_string(),
    )
        .into_response()
}

/// `axum::extract::Query`, with our error: 400 `invalid_query` in JSON, not axum's text.
pub struct Query<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for Query<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Query(value)| Self(value))
            .map_err(|rejection| ApiError::InvalidQuery(rejection.body_text()))
    }
}

async fn not_found(State(state): State<AppState>, method: Method, uri: Uri) -> Response {
    let response = ApiError::NotFound {
        method: method.to_string(),
        path: uri.path().to_owned(),
    }
    .into_response();
    crate::routes::metrics::count_route(&state, None, &method, &response);
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
    crate::routes::metrics::count_route(&state, matched.as_ref(), &method, &response);
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

#[cfg(test)]
mod tests {
    /// `OpenApiRouter::route` would serve a path without documenting it; `routes!` cannot.
    /// (The integration tests check the other way: every documented operation is served.)
    #[test]
    fn every_route_is_added_with_its_documentation() {
        let undocumented = concat!(".route", "(");
        for (file, source) in [
            ("mod.rs", include_str!("mod.rs")),
            ("tasks/mod.rs", include_str!("tasks/mod.rs")),
            ("tasks/accept.rs", include_str!("tasks/accept.rs")),
            ("tasks/batch.rs", include_str!("tasks/batch.rs")),
            ("cancel.rs", include_str!("cancel.rs")),
            ("dead.rs", include_str!("dead.rs")),
            ("health.rs", include_str!("health.rs")),
            ("kinds.rs", include_str!("kinds.rs")),
            ("schedules.rs", include_str!("schedules.rs")),
            ("metrics.rs", include_str!("metrics.rs")),
            ("dashboard.rs", include_str!("dashboard.rs")),
        ] {
            assert!(
                !source.contains(undocumented),
                "routes/{file} adds a route with `route`; add it with `routes!` and a #[utoipa::path]"
            );
        }
        let modules = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/src/routes"))
            .expect("the routes folder")
            .count();
        assert_eq!(modules, 9, "a new routes module: add it to the list above");
    }
}
