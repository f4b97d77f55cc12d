//! `GET /metrics`: the Prometheus text format. Needs the `read` scope once keys exist.

use axum::{
    extract::State,
    http::{StatusCode, header},
    middleware,
    response::{IntoResponse, Response},
};
use utoipa_axum::{router::OpenApiRouter, routes};

use crate::{
    AppState,
    auth::{self, Scope},
    error::ApiError,
    openapi::KeyErrors,
};

pub fn router(state: &AppState) -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(metrics))
        .route_layer(middleware::from_fn_with_state(
            (state.access.clone(), Scope::Read),
            auth::require,
        ))
}

/// Prometheus metrics in the OpenMetrics text format: requests, refusals, confirm latency,
/// tasks submitted by kind, the broker's state and the queues' depth.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "operations",
    security((), ("bearer" = []), ("browser" = [])),
    responses(
        (status = 200, description = "The metrics", body = String,
            content_type = "application/openmetrics-text; version=1.0.0; charset=utf-8"),
        KeyErrors,
    ),
)]
async fn metrics(State(state): State<AppState>) -> Response {
    // The queues' depth, asked of the broker now; left out when it cannot answer in time.
    let depth = state.publisher.broker().depth().await;
    match state.metrics.encode(&state.publisher, depth) {
        Ok(text) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Err(_) => ApiError::Internal.into_response(),
    }
}
