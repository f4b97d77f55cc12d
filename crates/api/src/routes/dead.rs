//! The dead-letter API: `GET /dead`, `GET /dead/{id}` (scope `read`); `POST /dead/{id}/retry`,
//! `POST /dead/retry`, `DELETE /dead/{id}`, `DELETE /dead` (scope `admin`).

use axum::{
    extract::{Path, State},
    middleware,
    response::{IntoResponse, Response},
};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::{router::OpenApiRouter, routes};
use uuid::Uuid;

use super::Query;
use crate::{
    AppState,
    auth::{self, Scope},
    dead_letters::{DeadTask, has_id, has_kind},
    error::{ApiError, ErrorBody, Result},
    openapi::{KeyErrors, Unavailable},
    publisher::PublishError,
};

/// How many dead tasks `GET /dead` lists unless told.
const DEFAULT_LIMIT: usize = 50;
/// How many times a request for one dead task scans before it answers 404: a task another
/// request has just released takes a moment to be back in the queue.
const ID_SCANS: usize = 3;

pub fn router(state: &AppState) -> OpenApiRouter<AppState> {
    let read = OpenApiRouter::new()
        .routes(routes!(list))
        .routes(routes!(show))
        .route_layer(middleware::from_fn_with_state(
            (state.access.clone(), Scope::Read),
            auth::require,
        ));
    let admin = OpenApiRouter::new()
        .routes(routes!(retry_one))
        .routes(routes!(retry_all))
        .routes(routes!(discard_one))
        .routes(routes!(discard_all))
        .route_layer(middleware::from_fn_with_state(
            (state.access.clone(), Scope::Admin),
            auth::require,
        ));
    read.merge(admin)
}

/// `?kind=&offset=&limit=`.
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct Filter {
    /// Only dead tasks of this kind.
    kind: Option<String>,
    /// Skip this many (newest first).
    #[serde(default)]
    #[param(minimum = 0)]
    offset: usize,
    /// At most this many (default 50, at most 10000).
    #[param(minimum = 0)]
    limit: Option<usize>,
}

/// Only `kind`: what a retry or discard of many applies to.
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct KindFilter {
    /// Only dead tasks of this kind; all of them without it.
    kind: Option<String>,
}

/// A page of the dead-letter queue, newest first.
#[derive(Serialize, ToSchema)]
struct DeadList {
    dead: Vec<DeadTask>,
    /// How many the scan found (with `kind`: of that kind).
    total: usize,
    /// As asked.
    offset: usize,
    /// The queue holds more than one scan reads (`DEAD_SCAN_MAX`); the oldest are listed.
    truncated: bool,
}

/// A dead task put back on the work queue.
#[derive(Serialize, ToSchema)]
struct Requeued {
    id: Uuid,
    /// `queued`.
    #[schema(example = "queued")]
    status: &'static str,
}

/// How many dead tasks a retry of many put back.
#[derive(Serialize, ToSchema)]
struct RetriedCount {
    retried: usize,
}

/// A dead task discarded for good.
#[derive(Serialize, ToSchema)]
struct Discarded {
    id: Uuid,
    /// Always true.
    discarded: bool,
}

/// How many dead tasks a discard of many removed.
#[derive(Serialize, ToSchema)]
struct DiscardedCount {
    discarded: u64,
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

/// Lists the dead-letter queue: each dead task's kind, reason, last error, attempts and time
/// of death, newest first.
#[utoipa::path(
    get,
    path = "/dead",
    tag = "dead",
    security((), ("bearer" = []), ("browser" = [])),
    params(Filter),
    responses(
        (status = 200, description = "The dead tasks", body = DeadList),
        (status = 400, description = "`invalid_query`", body = ErrorBody),
        KeyErrors,
        Unavailable,
    ),
)]
async fn list(State(state): State<AppState>, Query(filter): Query<Filter>) -> Result<Response> {
    let limit = filter
        .limit
        .unwrap_or(DEFAULT_LIMIT)
        .min(state.dead_letters.scan_max());
    let (dead, total, truncated) = state
        .dead_letters
        .clone()
        .list(filter.kind.as_deref(), filter.offset, limit)
        .await
        .map_err(unavailable(&state))?;
    Ok(axum::Json(DeadList {
        dead,
        total,
        offset: filter.offset,
        truncated,
    })
    .into_response())
}

/// One dead task, with its payload.
#[utoipa::path(
    get,
    path = "/dead/{id}",
    tag = "dead",
    security((), ("bearer" = []), ("browser" = [])),
    params(("id" = String, Path, description = "The task's id")),
    responses(
        (status = 200, description = "The dead task", body = DeadTask),
        (status = 404, description = "`dead_task_not_found`", body = ErrorBody),
        KeyErrors,
        Unavailable,
    ),
)]
async fn show(State(state): State<AppState>, Path(id): Path<String>) -> Result<Response> {
    let id = id_of(&id)?;
    let dead = state.dead_letters.clone();
    for _ in 0..ID_SCANS {
        if let Some(task) = dead.get(id).await.map_err(unavailable(&state))? {
            return Ok(axum::Json(task).into_response());
        }
    }
    Err(ApiError::DeadTaskNotFound)
}

/// Puts a dead task back on the work queue with fresh attempts (confirmed there before it
/// leaves the dead-letter queue).
#[utoipa::path(
    post,
    path = "/dead/{id}/retry",
    tag = "dead",
    security((), ("bearer" = []), ("browser" = [])),
    params(("id" = String, Path, description = "The task's id")),
    responses(
        (status = 200, description = "Queued again", body = Requeued),
        (status = 404, description = "`dead_task_not_found`", body = ErrorBody),
        KeyErrors,
        Unavailable,
    ),
)]
async fn retry_one(State(state): State<AppState>, Path(id): Path<String>) -> Result<Response> {
    let id = id_of(&id)?;
    let dead = state.dead_letters.clone();
    for _ in 0..ID_SCANS {
        let retried = dead
            .retry(|delivery| has_id(delivery, id), state.events.as_ref())
            .await
            .map_err(unavailable(&state))?;
        if retried > 0 {
            return Ok(axum::Json(Requeued {
                id,
                status: "queued",
            })
            .into_response());
        }
    }
    Err(ApiError::DeadTaskNotFound)
}

/// Puts every dead task (of `kind`) back on the work queue.
#[utoipa::path(
    post,
    path = "/dead/retry",
    tag = "dead",
    security((), ("bearer" = []), ("browser" = [])),
    params(KindFilter),
    responses(
        (status = 200, description = "How many were queued again", body = RetriedCount),
        (status = 400, description = "`invalid_query`", body = ErrorBody),
        KeyErrors,
        Unavailable,
    ),
)]
async fn retry_all(
    State(state): State<AppState>,
    Query(filter): Query<KindFilter>,
) -> Result<Response> {
    let kind = filter.kind.as_deref();
    let retried = state
        .dead_letters
        .clone()
        .retry(
            |delivery| kind.is_none_or(|kind| has_kind(delivery, kind)),
            state.events.as_ref(),
        )
        .await
        .map_err(unavailable(&state))?;
    Ok(axum::Json(RetriedCount { retried }).into_response())
}

/// Removes a dead task for good.
#[utoipa::path(
    delete,
    path = "/dead/{id}",
    tag = "dead",
    security((), ("bearer" = []), ("browser" = [])),
    params(("id" = String, Path, description = "The task's id")),
    responses(
        (status = 200, description = "Discarded", body = Discarded),
        (status = 404, description = "`dead_task_not_found`", body = ErrorBody),
        KeyErrors,
        Unavailable,
    ),
)]
async fn discard_one(State(state): State<AppState>, Path(id): Path<String>) -> Result<Response> {
    let id = id_of(&id)?;
    let dead = state.dead_letters.clone();
    for _ in 0..ID_SCANS {
        let discarded = dead
            .discard(|delivery| has_id(delivery, id))
            .await
            .map_err(unavailable(&state))?;
        if discarded > 0 {
            return Ok(axum::Json(Discarded {
                id,
                discarded: true,
            })
            .into_response());
        }
    }
    Err(ApiError::DeadTaskNotFound)
}

/// Removes every dead task (of `kind`) for good.
#[utoipa::path(
    delete,
    path = "/dead",
    tag = "dead",
    security((), ("bearer" = []), ("browser" = [])),
    params(KindFilter),
    responses(
        (status = 200, description = "How many were discarded", body = DiscardedCount),
        (status = 400, description = "`invalid_query`", body = ErrorBody),
        KeyErrors,
        Unavailable,
    ),
)]
async fn discard_all(
    State(state): State<AppState>,
    Query(filter): Query<KindFilter>,
) -> Result<Response> {
    let dead = state.dead_letters.clone();
    let discarded = match filter.kind.as_deref() {
        None => u64::from(dead.purge().await.map_err(unavailable(&state))?),
        Some(kind) => dead
            .discard(|delivery| has_kind(delivery, kind))
            .await
            .map_err(unavailable(&state))? as u64,
    };
    Ok(axum::Json(DiscardedCount { discarded }).into_response())
}
