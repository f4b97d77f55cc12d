//! `GET /health`: 200 while the gateway can publish, 503 otherwise. Always open: no key.
//! It also says whether the task-status view has read the events stream to its end.

use axum::{Router, extract::State, http::StatusCode, response::IntoResponse, routing::get};
use offload_common::BrokerState;
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
    /// `live`, `replaying` (statuses may still be unknown) or `off`.
    events: &'static str,
}

async fn health(State(state): State<AppState>) -> impl IntoResponse {
    let broker = state.publisher.state();
    let healthy = broker == BrokerState::Connected;
    let body = Json(Health {
        status: if healthy { "ok" } else { "unavailable" },
        broker: broker.as_str(),
        events: match &state.tracker {
            None => "off",
            Some(tracker) if tracker.is_live() => "live",
            Some(_) => "replaying",
        },
    });
    if healthy {
        (StatusCode::OK, None, body)
    } else {
        let retry_after = [(axum::http::header::RETRY_AFTER, state.retry_after_secs)];
        (StatusCode::SERVICE_UNAVAILABLE, Some(retry_after), body)
    }
}
