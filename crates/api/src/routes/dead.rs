//! The dead-letter API: `GET /dead`, `GET /dead/{id}` (scope `read`); `POST /dead/{id}/retry`,
//! `POST /dead/retry`, `DELETE /dead/{id}`, `DELETE /dead` (scope `admin`).

use axum::{
    Router,
    extract::{Path, Query, State},
    middleware,
    response::{IntoResponse, Response},
    routing::{get, post},
};
use serde::Deserialize;
use serde_json::json;
use uuid::Uuid;

use crate::{
    AppState,
    auth::{self, Scope},
    dead::{DeadLetters, SCAN_MAX, has_id, has_kind},
    error::{ApiError, Result},
    publisher::PublishError,
};

/// How many dead tasks `GET /dead` lists unless told.
const DEFAULT_LIMIT: usize = 50;
/// How many times a request for one dead task scans before it answers 404: a task another
/// request has just released takes a moment to be back in the queue.
const ID_SCANS: usize = 3;

pub fn router(state: &AppState) -> Router<AppState> {
    let read = Router::new()
        .route("/dead", get(list))
        .route("/dead/{id}", get(show))
        .route_layer(middleware::from_fn_with_state(
            (state.access.clone(), Scope::Read),
            auth::require,
        ));
    let admin = Router::new()
        .route("/dead/{id}/retry", post(retry_one))
        .route("/dead/retry", post(retry_all))
        .route("/dead/{id}", axum::routing::delete(discard_one))
        .route("/dead", axum::routing::delete(discard_all))
        .route_layer(middleware::from_fn_with_state(
            (state.access.clone(), Scope::Admin),
            auth::require,
        ));
    read.merge(admin)
}

/// `?kind=&offset=&limit=`.
#[derive(Deserialize)]
struct Filter {
    kind: Option<String>,
    #[serde(default)]
    offset: usize,
    limit: Option<usize>,
}

fn unavailable(state: &AppState) -> impl Fn(PublishError) -> ApiError + '_ {
    |error| ApiError::Unavailable {
        error,
        retry_after: state.retry_after_secs,
    }
}

fn id_of(text: &str) -> Result<Uuid> {
    text.parse().map_err(|_| ApiError::DeadTaskNotFound)
}

async fn list(State(state): State<AppState>, Query(filter): Query<Filter>) -> Result<Response> {
    let limit = filter.limit.unwrap_or(DEFAULT_LIMIT).min(SCAN_MAX as usize);
    let (dead, total, truncated) = DeadLetters::new(state.publisher.broker().clone())
        .list(filter.kind.as_deref(), filter.offset, limit)
        .await
        .map_err(unavailable(&state))?;
    Ok(axum::Json(json!({
        "dead": dead,
        "total": total,
        "offset": filter.offset,
        "truncated": truncated,
    }))
    .into_response())
}

async fn show(State(state): State<AppState>, Path(id): Path<String>) -> Result<Response> {
    let id = id_of(&id)?;
    let dead = DeadLetters::new(state.publisher.broker().clone());
    for _ in 0..ID_SCANS {
        if let Some(task) = dead.get(id).await.map_err(unavailable(&state))? {
            return Ok(axum::Json(task).into_response());
        }
    }
    Err(ApiError::DeadTaskNotFound)
}

async fn retry_one(State(state): State<AppState>, Path(id): Path<String>) -> Result<Response> {
    let id = id_of(&id)?;
    let dead = DeadLetters::new(state.publisher.broker().clone());
    for _ in 0..ID_SCANS {
        let retried = dead
            .retry(|delivery| has_id(delivery, id), state.events.as_ref())
            .await
            .map_err(unavailable(&state))?;
        if retried > 0 {
            return Ok(axum::Json(json!({"id": id, "status": "queued"})).into_response());
        }
    }
    Err(ApiError::DeadTaskNotFound)
}

async fn retry_all(
    State(state): State<AppState>,
    Query(filter): Query<Filter>,
) -> Result<Response> {
    let kind = filter.kind.as_deref();
    let retried = DeadLetters::new(state.publisher.broker().clone())
        .retry(
            |delivery| kind.is_none_or(|kind| has_kind(delivery, kind)),
            state.events.as_ref(),
        )
        .await
        .map_err(unavailable(&state))?;
    Ok(axum::Json(json!({"retried": retried})).into_response())
}

async fn discard_one(State(state): State<AppState>, Path(id): Path<String>) -> Result<Response> {
    let id = id_of(&id)?;
    let dead = DeadLetters::new(state.publisher.broker().clone());
    for _ in 0..ID_SCANS {
        let discarded = dead
            .discard(|delivery| has_id(delivery, id))
            .await
            .map_err(unavailable(&state))?;
        if discarded > 0 {
            return Ok(axum::Json(json!({"id": id, "discarded": true})).into_response());
        }
    }
    Err(ApiError::DeadTaskNotFound)
}

async fn discard_all(
    State(state): State<AppState>,
    Query(filter): Query<Filter>,
) -> Result<Response> {
    let dead = DeadLetters::new(state.publisher.broker().clone());
    let discarded = match filter.kind.as_deref() {
        None => u64::from(dead.purge().await.map_err(unavailable(&state))?),
        Some(kind) => dead
            .discard(|delivery| has_kind(delivery, kind))
            .await
            .map_err(unavailable(&state))? as u64,
    };
    Ok(axum::Json(json!({"discarded": discarded})).into_response())
}
