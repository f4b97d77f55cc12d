//! `GET /health`: 200 while the gateway can publish, 503 otherwise.

use axum::{Router, extract::State, http::StatusCode, response::IntoResponse, routing::get};
use serde::Serialize;

use super::Json;
use crate::AppState;

pub fn router() -> Router<AppState> {
    Router::new().route("/health", get(health))
}

#[derive(Serialize)]
struct Health {
    status: &'static str,
    broker: &'static str,
}

async fn health(State(state): State<AppState>) -> impl IntoResponse {
    if state.publisher.is_connected() {
        (
            StatusCode::OK,
            Json(Health {
                status: "ok",
                broker: "connected",
            }),
        )
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(Health {
                status: "unavailable",
                broker: "disconnected",
            }),
        )
    }
}
