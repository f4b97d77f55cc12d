//! `GET /health`: 200 while the gateway can publish, 503 otherwise. Always open: no key.
//! It also says whether the task-status view has read the events stream to its end.

use axum::{extract::State, http::StatusCode, response::IntoResponse};
use offload_common::BrokerState;
use serde::Serialize;
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};

use super::Json;
use crate::AppState;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(health))
}

/// Whether the gateway can take tasks.
#[derive(Serialize, ToSchema)]
struct Health {
    /// `ok` or `unavailable`.
    #[schema(example = "ok")]
    status: &'static str,
    /// `connected`, `blocked` (a broker alarm), `unroutable` (the queue is gone) or
    /// `disconnected`.
    #[schema(example = "connected")]
    broker: &'static str,
    /// `live`, `replaying` (statuses may still be unknown) or `off`.
    events: &'static str,
    /// `ok`, or `timing_out`: the last publishes got no confirm within CONFIRM_TIMEOUT
    /// although the connection is up.
    #[schema(example = "ok")]
    confirms: &'static str,
    /// What is wrong and what to look at, when something is.
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<&'static str>,
}

/// Why a gateway whose connection is up may take no tasks.
const NOT_CONFIRMING: &str = "RabbitMQ has not confirmed the last publishes within CONFIRM_TIMEOUT although the connection is up: the work queue may have no leader (after a node was killed), or this gateway's node may be cut off in a minority partition; see docs/OPERATIONS.md";

/// For load balancers and compose: 200 while the gateway can publish. Never needs a key.
#[utoipa::path(
    get,
    path = "/health",
    tag = "operations",
    responses(
        (status = 200, description = "Connected: tasks can be accepted", body = Health),
        (status = 503, description = "Tasks cannot be accepted now", body = Health,
            headers(("Retry-After" = u32, description = "seconds"))),
    ),
)]
async fn health(State(state): State<AppState>) -> impl IntoResponse {
    let broker = state.publisher.state();
    let not_confirming = state.publisher.not_confirming();
    let healthy = broker == BrokerState::Connected && !not_confirming;
    let body = Json(Health {
        status: if healthy { "ok" } else { "unavailable" },
        broker: broker.as_str(),
        confirms: state.publisher.confirms(),
        reason: not_confirming.then_some(NOT_CONFIRMING),
        events: state.events_state(),
    });
    if healthy {
        (StatusCode::OK, None, body)
    } else {
        let retry_after = [(axum::http::header::RETRY_AFTER, state.retry_after_secs)];
        (StatusCode::SERVICE_UNAVAILABLE, Some(retry_after), body)
    }
}
