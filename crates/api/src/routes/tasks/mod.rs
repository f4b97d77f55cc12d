//! `POST /tasks`: accept a task, publish it, answer 202 once the broker has confirmed it
//! (the work itself is [`accept`]'s, which `POST /tasks/batch` shares: [`batch`]).
//! `GET /tasks/{id}`: what happened to it, from the events stream, optionally waiting for
//! its end.

mod accept;
mod batch;

use std::time::Duration;

use axum::{
    Extension,
    extract::{Path, State},
    http::{HeaderMap, HeaderValue, StatusCode, header},
    middleware,
    response::{IntoResponse, Response},
};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::{router::OpenApiRouter, routes};
use uuid::Uuid;

use super::{Json, Query};
use crate::{
    AppState,
    auth::{self, Caller, Scope},
    error::{ApiError, ErrorBody, Result},
    openapi::{KeyErrors, Unavailable},
    status::{Status, TaskView, Tracker},
};
use accept::{NewTask, NewTaskFields, Outcome, accept};

pub fn router(state: &AppState) -> OpenApiRouter<AppState> {
    let submit_routes = OpenApiRouter::new()
        .routes(routes!(submit))
        .routes(routes!(batch::batch))
        .route_layer(middleware::from_fn_with_state(
            (state.access.clone(), Scope::Submit),
            auth::require,
        ));
    let read_routes =
        OpenApiRouter::new()
            .routes(routes!(status))
            .route_layer(middleware::from_fn_with_state(
                (state.access.clone(), Scope::Read),
                auth::require,
            ));
    submit_routes.merge(read_routes)
}

/// The `Idempotency-Key` header, if any: 1 to 255 printable ASCII characters.
fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>> {
    let Some(value) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    let key = value
        .to_str()
        .map_err(|_| ApiError::InvalidIdempotencyKey)?;
    valid_key(key).map(Some)
}

/// `key`, if it is an idempotency key: 1 to 255 printable ASCII characters.
fn valid_key(key: &str) -> Result<String> {
    if (1..=255).contains(&key.len()) && key.bytes().all(|b| (0x20..=0x7e).contains(&b)) {
        Ok(key.to_owned())
    } else {
        Err(ApiError::InvalidIdempotencyKey)
    }
}

/// What a client gets back: the task's id and where it stands.
#[derive(Serialize, ToSchema)]
struct Accepted<'a> {
    /// The task's id; `GET /tasks/{id}` tells what became of it.
    id: Uuid,
    /// Its kind.
    kind: &'a str,
    /// `queued`, or `scheduled` with a delay.
    #[schema(example = "queued")]
    status: &'static str,
    /// When a scheduled task will run.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(format = DateTime)]
    run_at: Option<String>,
}

/// Queues a task. The 202 comes only once RabbitMQ has confirmed it: the task is on a
/// durable, replicated queue.
#[utoipa::path(
    post,
    path = "/tasks",
    tag = "tasks",
    security((), ("bearer" = []), ("browser" = [])),
    request_body = NewTaskFields,
    params(
        ("Idempotency-Key" = Option<String>, Header, description = "1 to 255 printable ASCII characters: within the events' retention window the same key returns the first task (200), never a second one"),
    ),
    responses(
        (status = 202, description = "Queued: the broker has confirmed the task", body = Accepted,
            headers(("Location" = String, description = "/tasks/{id}"))),
        (status = 200, description = "An Idempotency-Key already used: the first task's id and status", body = AlreadyAccepted,
            headers(("Location" = String, description = "/tasks/{id}"))),
        (status = 400, description = "`invalid_json`, `unreadable_body`", body = ErrorBody),
        (status = 408, description = "`body_timeout`: the body did not arrive within BODY_TIMEOUT", body = ErrorBody),
        (status = 413, description = "`body_too_large`", body = ErrorBody),
        (status = 415, description = "`unsupported_media_type`: send Content-Type: application/json", body = ErrorBody),
        (status = 422, description = "`invalid_task`, `unknown_kind` (no worker handles it), `invalid_idempotency_key`, `idempotency_key_reused` (the key was used by this API key for another request), `invalid_schedule`, `delay_too_long`, `invalid_expiry`, `tracking_off` (an Idempotency-Key with EVENTS=off)", body = ErrorBody),
        KeyErrors,
        Unavailable,
    ),
)]
async fn submit(
    State(state): State<AppState>,
    caller: Option<Extension<Caller>>,
    headers: HeaderMap,
    Json(new): Json<NewTask>,
) -> Result<Response> {
    let key = idempotency_key(&headers)?;
    let caller = caller.map(|Extension(caller)| caller).unwrap_or_default();
    let (id, kind, run_at) = match accept(&state, new, key, &caller, &headers).await? {
        Outcome::Existing(id) => {
            let tracker = state
                .tracker
                .as_ref()
                .expect("a key is only claimed where task statuses are read");
            return Ok(already_accepted(tracker, id));
        }
        Outcome::Queued { id, kind, run_at } => (id, kind, run_at),
    };
    let location =
        HeaderValue::try_from(format!("/tasks/{id}")).expect("a UUID path is a valid header value");
    let body = Json(Accepted {
        id,
        kind: kind.as_str(),
        status: if run_at.is_some() {
            "scheduled"
        } else {
            "queued"
        },
        run_at: run_at.map(|at| humantime::format_rfc3339_millis(at).to_string()),
    });
    Ok((StatusCode::ACCEPTED, [(header::LOCATION, location)], body).into_response())
}

/// The answer to a repeated Idempotency-Key.
#[derive(Serialize, ToSchema)]
struct AlreadyAccepted {
    /// The first task's id.
    id: Uuid,
    /// Its kind, if this gateway still knows it.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    kind: Option<std::sync::Arc<str>>,
    /// Where it stands now.
    status: crate::status::Status,
}

/// Where the task of a repeated idempotency key stands: `queued` if this gateway no longer
/// remembers it.
fn already_status(state: &AppState, id: Uuid) -> &'static str {
    state
        .tracker
        .as_ref()
        .and_then(|tracker| tracker.get(id))
        .map_or(Status::Queued, |task| task.status)
        .as_str()
}

/// The answer to a repeated Idempotency-Key: 200 with the first task's id and status.
fn already_accepted(tracker: &Tracker, id: Uuid) -> Response {
    let task = tracker.get(id);
    let body = AlreadyAccepted {
        id,
        status: task.as_ref().map_or(Status::Queued, |task| task.status),
        kind: task.map(|task| task.kind),
    };
    let location =
        HeaderValue::try_from(format!("/tasks/{id}")).expect("a UUID path is a valid header value");
    (
        StatusCode::OK,
        [(header::LOCATION, location)],
        axum::Json(body),
    )
        .into_response()
}

/// `?wait=30s`.
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct StatusQuery {
    /// Wait until the task ends, at most this long (`30s`; bounded by MAX_WAIT).
    #[param(example = "30s")]
    wait: Option<String>,
}

/// What happened to a task: its status, attempts, times, last error and result, read from
/// the events stream. Never a made-up status for an id it does not know.
#[utoipa::path(
    get,
    path = "/tasks/{id}",
    tag = "tasks",
    security((), ("bearer" = []), ("browser" = [])),
    params(("id" = String, Path, description = "The id the 202 gave"), StatusQuery),
    responses(
        (status = 200, description = "The task as it stands (or as it ended, with `wait`)", body = TaskView),
        (status = 404, description = "`unknown_task` (never accepted, or older than the stream or the view keeps), `tracking_off` (EVENTS=off)", body = ErrorBody),
        (status = 422, description = "`invalid_wait`", body = ErrorBody),
        (status = 503, description = "`events_replaying`: this gateway has not read the stream to its end yet; retry after Retry-After", body = ErrorBody,
            headers(("Retry-After" = u32, description = "seconds"))),
        KeyErrors,
    ),
)]
async fn status(
    State(state): State<AppState>,
    Path(id): Path<String>,
    Query(query): Query<StatusQuery>,
) -> Result<Response> {
    let Some(tracker) = &state.tracker else {
        return Err(ApiError::TrackingOff);
    };
    let wait = match query.wait.as_deref() {
        None => Duration::ZERO,
        Some(text) => humantime::parse_duration(text)
            .map_err(|_| ApiError::InvalidWait)?
            .min(state.max_wait),
    };
    let unknown = || {
        if tracker.is_live() {
            ApiError::UnknownTask
        } else {
            ApiError::Replaying {
                retry_after: state.retry_after_secs,
            }
        }
    };
    let id: Uuid = id.parse().map_err(|_| ApiError::UnknownTask)?;
    // Past MAX_WAITING waiting requests, this one answers at once: long-polls must not hold
    // every connection the gateway serves.
    let permit = if wait.is_zero() {
        None
    } else {
        state.waiting.clone().try_acquire_owned().ok()
    };
    let wait = if permit.is_some() {
        wait
    } else {
        Duration::ZERO
    };
    let mut task = tracker.wait(id, wait).await.ok_or_else(unknown)?;
    drop(permit);
    // While replaying, the view holds the start of a task's story, not yet its end: only
    // a terminal state is sure to be no older than the stream, and, for a task this gateway
    // accepted, `queued` (at least) is what its client was promised at once.
    if !task.status.is_terminal() && !tracker.is_live() && !tracker.accepted_here(id) {
        return Err(unknown());
    }
    if let Some(offset) = task.result_offset {
        task.result = Tracker::read_result(state.publisher.broker(), id, offset).await;
    }
    Ok((StatusCode::OK, Json(task)).into_response())
}
