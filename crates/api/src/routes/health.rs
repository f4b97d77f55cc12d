//! `GET /health`: 200 while the gateway can publish, 503 otherwise.

use axum::{Router, extract::State, http::StatusCode, response::IntoResponse, routing::get};
use serde::Serialize;

use super::Json;
use crate::{AppState, publisher::BrokerState};

pub fn router() -> Router<AppState> {
    Router::new().route("/health", get(health))
}

#[derive(Serialize)]
struct Health {
    status: &'static str,
    broker: &'static str,
}

async fn health(State(state): State<AppState>) -> impl IntoResponse {
    let (status, broker) = match state.publisher.state() {
        BrokerState::Connected => (StatusCode::OK, "connected"),
        BrokerState::Blocked => (StatusCode::SERVICE_UNAVAILABLE, "blocked"),
        BrokerState::Disconnected => (StatusCode::SERVICE_UNAVAILABLE, "disconnected"),
    };
    let body = Health {
        status: if status == StatusCode::OK {
            "ok"
        } else {
            "unavailable"
        },
        broker,
    };
    (status, Json(body))
}
