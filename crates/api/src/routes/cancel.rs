//! Cancels: `POST /tasks/{id}/cancel` (scope `submit` or `admin`) takes one task back, wherever
//! it is; `POST /tasks/cancel?kind=` (scope `admin`) every waiting task of a kind.
//!
//! A cancel is a record on the control stream, which every worker reads (from its first
//! record, at start). The answer waits until each worker consuming the kind has said it read
//! the cancel (`cancel_seen`), then until this gateway's view has caught up to the present: so
//! a 200 saying the task had not started is never followed by a start (docs/EVENTS.md).

use std::time::{Duration, SystemTime};

use axum::{
    extract::{Path, State},
    http::StatusCode,
    middleware,
    response::{IntoResponse, Response},
};
use offload_common::{Event, EventSink, EventType, PublishError, TaskKind, control::Record};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::{router::OpenApiRouter, routes};
use uuid::Uuid;

use super::{Json, Query};
use crate::{
    AppState,
    auth::{self, Scope},
    error::{ApiError, ErrorBody, Result},
    openapi::KeyErrors,
    status::{Status, TaskView, Tracker},
};

/// Longest a cancel waits for the workers consuming the kind to say they read it.
const CONFIRM_WITHIN: Duration = Duration::from_secs(5);
/// Longest it waits for the view to catch up with the stream afterwards.
const SYNC_WITHIN: Duration = Duration::from_secs(5);
/// How long an id this gateway does not know is looked for on the stream before it is 404.
const UNKNOWN_SEEN_WITHIN: Duration = Duration::from_secs(1);
/// Longest it waits for the broker to count a kind's consumers.
const COUNT_WITHIN: Duration = Duration::from_secs(5);
/// Longest it waits for a running task's attempt to end once its handler is told.
const RUNNING_ENDS_WITHIN: Duration = Duration::from_secs(2);

pub fn router(state: &AppState) -> OpenApiRouter<AppState> {
    const SUBMIT_OR_ADMIN: &[Scope] = &[Scope::Submit, Scope::Admin];
    let one =
        OpenApiRouter::new()
            .routes(routes!(cancel))
            .route_layer(middleware::from_fn_with_state(
                (state.access.clone(), SUBMIT_OR_ADMIN),
                auth::require_any,
            ));
    let kind = OpenApiRouter::new()
        .routes(routes!(cancel_kind))
        .route_layer(middleware::from_fn_with_state(
            (state.access.clone(), Scope::Admin),
            auth::require,
        ));
    one.merge(kind)
}

/// Cancels a task. Waiting (queued, scheduled, waiting for a retry): it never starts, on any
/// worker, and ends `cancelled` (200). Running: its handler is told, and the answer waits up
/// to 2 s for the attempt to end (200 once `cancelled`; 202 while it still runs). Cancelling
/// a cancelled task is not an error.
#[utoipa::path(
    post,
    path = "/tasks/{id}/cancel",
    tag = "tasks",
    security((), ("bearer" = []), ("browser" = [])),
    params(("id" = String, Path, description = "The id the 202 gave")),
    responses(
        (status = 200, description = "Cancelled: it will not start (again)", body = TaskView),
        (status = 202, description = "It was running: its handler has been told, and the attempt has not ended yet", body = TaskView),
        (status = 404, description = "`unknown_task`, `tracking_off` (EVENTS=off)", body = ErrorBody),
        (status = 409, description = "`task_finished`: it succeeded, died or expired already", body = ErrorBody),
        (status = 503, description = "`cancel_unconfirmed`: recorded, but not every worker of the kind confirmed it in time (repeat the request); `broker_unavailable`: not recorded; `events_replaying`", body = ErrorBody,
            headers(("Retry-After" = u32, description = "seconds"))),
        KeyErrors,
    ),
)]
async fn cancel(State(state): State<AppState>, Path(id): Path<String>) -> Result<Response> {
    let (tracker, events) = tracking(&state)?;
    let id: Uuid = id.parse().map_err(|_| ApiError::UnknownTask)?;
    let task = match tracker.get(id) {
        Some(task) => task,
        None => seen_soon(tracker, events, id)
            .await
            .ok_or(ApiError::UnknownTask)?,
    };
    match task.status {
        Status::Cancelled => return Ok(answer(StatusCode::OK, task)),
        status @ (Status::Succeeded | Status::Dead | Status::Expired) => {
            return Err(ApiError::TaskFinished {
                status: status.as_str(),
            });
        }
        Status::Queued | Status::Scheduled | Status::Running => {}
    }
    let now = SystemTime::now();
    let cancel = Uuid::new_v4();
    let record = Record::Cancel {
        id: cancel,
        task: id,
        kind: task.kind.to_string(),
        at: now,
    };
    let confirmed = confirm(&state, tracker, (cancel, &record), &task.kind).await?;
    let task = tracker.get(id).ok_or(ApiError::UnknownTask)?;
    if confirmed.running || task.status == Status::Running {
        // Its handler has been told; give the attempt a moment to end.
        let task = tracker
            .wait(id, RUNNING_ENDS_WITHIN)
            .await
            .ok_or(ApiError::UnknownTask)?;
        let status = if task.status.is_terminal() {
            StatusCode::OK
        } else {
            StatusCode::ACCEPTED
        };
        return Ok(answer(status, task));
    }
    match task.status {
        status @ (Status::Succeeded | Status::Dead | Status::Expired) => {
            Err(ApiError::TaskFinished {
                status: status.as_str(),
            })
        }
        Status::Cancelled => Ok(answer(StatusCode::OK, task)),
        Status::Queued | Status::Scheduled | Status::Running => {
            // No worker has it, and none will start it: it ends here.
            let mut cancelled = Event::task(EventType::Cancelled, id, &task.kind);
            cancelled.cancel = Some(cancel);
            cancelled.at = now;
            tracker.apply(&cancelled, None);
            // Should this not reach the stream, the status still ends `cancelled` on every
            // gateway once a worker meets the task and drops it.
            if !events.emit_confirmed(cancelled).await {
                tracing::warn!(task_id = %id, "the `cancelled` event was not confirmed; a worker will write it when it drops the task");
            }
            let task = tracker.get(id).ok_or(ApiError::UnknownTask)?;
            Ok(answer(StatusCode::OK, task))
        }
    }
}

/// A task this gateway does not know yet, as the stream tells of it within a moment: another
/// gateway that accepted it a moment ago writes its `queued` event just after its 202.
async fn seen_soon(tracker: &Tracker, events: &EventSink, id: Uuid) -> Option<TaskView> {
    let deadline = tokio::time::Instant::now() + UNKNOWN_SEEN_WITHIN;
    loop {
        tracker.sync(events, SYNC_WITHIN).await;
        if let Some(task) = tracker.get(id) {
            return Some(task);
        }
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
    }
}

/// `?kind=`.
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct KindQuery {
    /// The kind whose waiting tasks to cancel.
    #[param(example = "sleep")]
    kind: String,
}

/// What a cancel of a whole kind did.
#[derive(Serialize, ToSchema)]
struct KindCancelled {
    /// The kind.
    #[schema(example = "sleep")]
    kind: String,
    /// How many waiting tasks this gateway's view held that are now cancelled (tasks it has
    /// forgotten, past STATUS_CAPACITY, are cancelled too, and not counted).
    cancelled: u64,
    /// Every task of the kind submitted at or before this, and not started, is cancelled.
    #[schema(format = DateTime)]
    before: String,
}

/// Cancels every waiting task of a kind: queued, scheduled or waiting for a retry, submitted
/// before this request. None of them starts afterwards, on any worker; tasks running go on.
#[utoipa::path(
    post,
    path = "/tasks/cancel",
    tag = "tasks",
    security((), ("bearer" = []), ("browser" = [])),
    params(KindQuery),
    responses(
        (status = 200, description = "Cancelled", body = KindCancelled),
        (status = 400, description = "`invalid_query`: no `kind`", body = ErrorBody),
        (status = 404, description = "`unknown_kind`: no queue of that kind; `tracking_off` (EVENTS=off)", body = ErrorBody),
        (status = 503, description = "`cancel_unconfirmed` (repeat the request), `broker_unavailable`, `events_replaying`", body = ErrorBody,
            headers(("Retry-After" = u32, description = "seconds"))),
        KeyErrors,
    ),
)]
async fn cancel_kind(
    State(state): State<AppState>,
    Query(query): Query<KindQuery>,
) -> Result<Response> {
    let (tracker, events) = tracking(&state)?;
    let unknown = || ApiError::KindNotFound {
        kind: query.kind.chars().take(TaskKind::MAX_LEN + 1).collect(),
        known: state.kinds(),
    };
    let kind = TaskKind::try_from(query.kind.as_str()).map_err(|_| unknown())?;
    let not_asked = || ApiError::NotRecorded(PublishError::Disconnected, state.retry_after_secs);
    if consumers_of(&state, kind.as_str())
        .await
        .ok_or_else(not_asked)?
        .is_none()
    {
        return Err(unknown());
    }
    let now = SystemTime::now();
    let cancel = Uuid::new_v4();
    let record = Record::CancelKind {
        id: cancel,
        kind: kind.to_string(),
        before: now,
        at: now,
    };
    confirm(&state, tracker, (cancel, &record), kind.as_str()).await?;
    let cancelled = tracker.cancel_kind(kind.as_str(), now, now);
    let mut event = Event::new(EventType::Cancelled);
    event.kind = Some(kind.to_string());
    event.before = Some(now);
    event.cancel = Some(cancel);
    event.at = now;
    if !events.emit_confirmed(event).await {
        tracing::warn!(kind = %kind, "the kind's `cancelled` event was not confirmed; workers write one for each task they drop");
    }
    Ok((
        StatusCode::OK,
        Json(KindCancelled {
            kind: kind.to_string(),
            cancelled,
            before: humantime::format_rfc3339_millis(now).to_string(),
        }),
    )
        .into_response())
}

/// The view and the events sink; cancels need both (EVENTS=on), and a view read to the end.
fn tracking(state: &AppState) -> Result<(&Tracker, &EventSink)> {
    let (Some(tracker), Some(events)) = (&state.tracker, &state.events) else {
        return Err(ApiError::TrackingOff);
    };
    if !tracker.is_live() {
        return Err(ApiError::Replaying {
            retry_after: state.retry_after_secs,
        });
    }
    Ok((tracker, events))
}

/// Writes the cancel, waits until every worker consuming `kind` has said it read it, then
/// until the view has caught up with the stream.
async fn confirm(
    state: &AppState,
    tracker: &Tracker,
    (cancel, record): (Uuid, &Record),
    kind: &str,
) -> Result<crate::status::Confirmed> {
    let broker = state.publisher.broker();
    // Listening before writing, so no worker's answer is missed.
    let wait = tracker.await_cancel(cancel);
    let unconfirmed = || ApiError::CancelUnconfirmed {
        kind: kind.to_owned(),
        retry_after: state.retry_after_secs,
    };
    match broker.publish_control(record).await {
        Ok(()) => {}
        // The record may be on the stream all the same: promise nothing either way.
        Err(PublishError::Timeout(_) | PublishError::Channel(_)) => return Err(unconfirmed()),
        Err(error) => return Err(ApiError::NotRecorded(error, state.retry_after_secs)),
    }
    // Counted after the cancel is written: a worker subscribing later reads it before it
    // starts anything.
    let consumers = consumers_of(state, kind)
        .await
        .ok_or_else(unconfirmed)?
        .unwrap_or(0);
    let confirmed = wait
        .confirmed(consumers, CONFIRM_WITHIN)
        .await
        .ok_or_else(unconfirmed)?;
    let events = state.events.as_ref().ok_or(ApiError::TrackingOff)?;
    if !tracker.sync(events, SYNC_WITHIN).await {
        return Err(unconfirmed());
    }
    Ok(confirmed)
}

/// How many consumers `kind`'s queue has now (`Some(None)`: there is no such queue); `None`
/// if the broker could not be asked.
async fn consumers_of(state: &AppState, kind: &str) -> Option<Option<u32>> {
    let broker = state.publisher.broker();
    let link = broker.link()?;
    let topology = broker.topology();
    let queue = topology.kind_queue(kind);
    let counting = topology.count(link.connection(), &queue);
    let counted = tokio::time::timeout(COUNT_WITHIN, counting)
        .await
        .ok()?
        .ok()?;
    Some(counted.map(|(_, consumers)| consumers))
}

fn answer(status: StatusCode, task: TaskView) -> Response {
    (status, Json(task)).into_response()
}
