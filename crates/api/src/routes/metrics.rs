//! `GET /metrics`: the Prometheus text format. Needs the `read` scope once keys exist.

use axum::{
    Router,
    extract::State,
    http::{StatusCode, header},
    middleware,
    response::{IntoResponse, Response},
    routing::get,
};

use crate::{
    AppState,
    auth::{self, Scope},
    error::ApiError,
};

pub fn router(state: &AppState) -> Router<AppState> {
    Router::new()
        .route("/metrics", get(metrics))
        .route_layer(middleware::from_fn_with_state(
            (state.access.clone(), Scope::Read),
            auth::require,
        ))
}

async fn metrics(State(state): State<AppState>) -> Response {
    // The queues' depth, asked of the broker now; left out when it cannot answer in time.
    let depth = match state.publisher.broker().link() {
        Some(link) => state
            .publisher
            .broker()
            .within(
                "counting the queues",
                state.publisher.broker().topology().depth(link.connection()),
            )
            .await
            .ok(),
        None => None,
    };
    match state
        .metrics
        .encode(state.publisher.in_flight(), state.publisher.state(), depth)
    {
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
