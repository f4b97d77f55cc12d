//! `GET /metrics`: the Prometheus text format. Needs the `read` scope once keys exist. And the
//! layer that counts every request by route, method and status.

use axum::{
    extract::{MatchedPath, Request, State},
    http::{Method, StatusCode, header},
    middleware::{self, Next},
    response::{IntoResponse, Response},
};
use utoipa_axum::{router::OpenApiRouter, routes};

use crate::{
    AppState,
    auth::{self, Scope},
    error::ApiError,
    metrics_registry::{Refusal, Snapshot},
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
    let depth = state.depth().await;
    let now = Snapshot {
        broker: state.publisher.state(),
        in_flight: state.publisher.in_flight(),
        not_confirming: state.publisher.not_confirming(),
        depth,
    };
    match state.metrics.encode(&now) {
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

/// A standard method's name, or `other`: a label never takes what a client made up.
fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::PATCH => "PATCH",
        _ => "other",
    }
}

/// Counts each request routed to a route (by its template) and each refusal.
pub(crate) async fn track(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let route = route_label(request.extensions().get::<MatchedPath>());
    let method = method_label(request.method());
    let response = next.run(request).await;
    count(&state, route, method, &response);
    response
}

/// Counts `response` to a request for `route`.
fn count(state: &AppState, route: String, method: &'static str, response: &Response) {
    state
        .metrics
        .request(route, method, response.status().as_u16());
    if let Some(Refusal(code)) = response.extensions().get::<Refusal>() {
        state.metrics.refused(code);
    }
}

/// Counts a request answered by one of the router's fallbacks, which run outside `track`:
/// under its route's template when a route matched the path, else as `unmatched`.
pub(crate) fn count_route(
    state: &AppState,
    route: Option<&MatchedPath>,
    method: &Method,
    response: &Response,
) {
    count(state, route_label(route), method_label(method), response);
}

fn route_label(route: Option<&MatchedPath>) -> String {
    route.map_or_else(|| "unmatched".to_owned(), |path| path.as_str().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn made_up_methods_are_labelled_other() {
        assert_eq!(method_label(&Method::POST), "POST");
        let made_up = Method::from_bytes(b"BREW").expect("a valid extension method");
        assert_eq!(method_label(&made_up), "other");
    }
}
