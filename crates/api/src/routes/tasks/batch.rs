//! `POST /tasks/batch`: up to `MAX_BATCH` tasks in one request, each accepted as `POST /tasks`
//! accepts one ([`accept`]), their publishes pipelined on the gateway's channel; one answer,
//! once the broker has confirmed every task it queued, with a result per task, in order. A bad
//! task does not sink the others: each has its own result, an id or an error with a `code`.

use axum::{Extension, extract::State, http::HeaderMap};
use futures_util::{StreamExt, stream};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use super::{
    Json,
    accept::{NewTask, NewTaskFields, Outcome, accept},
    already_status, valid_key,
};
use crate::{
    AppState,
    auth::Caller,
    error::{ApiError, ErrorBody, Result},
    openapi::{KeyErrors, Unavailable},
};

/// The most tasks of one batch awaiting the broker's confirm at once: a batch's publishes are
/// pipelined, and also count in `MAX_IN_FLIGHT` like any others.
const IN_FLIGHT: usize = 256;

/// A batch: the tasks, in order.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct Batch {
    /// 1 to `MAX_BATCH` tasks (default 1,000), each with the fields of `POST /tasks` and an
    /// `idempotency_key` of its own if it likes.
    #[schema(value_type = Vec<BatchTask>)]
    tasks: Vec<serde_json::Value>,
}

/// A task of a batch: `POST /tasks`'s fields, and its own idempotency key. The schema's only:
/// each task is read from its JSON object by [`read`], so that a bad one has its own error.
#[derive(Deserialize, ToSchema)]
#[allow(dead_code)]
pub(super) struct BatchTask {
    #[serde(flatten)]
    task: NewTaskFields,
    /// As `POST /tasks`'s `Idempotency-Key` header: 1 to 255 printable ASCII characters.
    idempotency_key: Option<String>,
}

/// The answer: how many tasks were queued, found queued before (an idempotency key used
/// again) and refused, and a result per task, in the batch's order.
#[derive(Serialize, ToSchema)]
pub(super) struct BatchAnswer {
    /// Tasks queued by this request: the broker has confirmed each.
    queued: usize,
    /// Tasks whose idempotency key was used before: nothing new was queued for them.
    existing: usize,
    /// Tasks refused: see their `code`.
    refused: usize,
    /// One per task, in order.
    results: Vec<TaskResult>,
}

/// What became of one task of a batch: an `id` and a `status`, or an `error` and its `code`.
#[derive(Serialize, ToSchema, Default)]
pub(super) struct TaskResult {
    /// The task's id (for an idempotency key used before, the first task's).
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<Uuid>,
    /// `queued`, `scheduled`; for a key used before, the first task's status now.
    #[serde(skip_serializing_if = "Option::is_none")]
    status: Option<String>,
    /// When a scheduled task will run.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(format = DateTime)]
    run_at: Option<String>,
    /// True when the task's idempotency key was used before.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    existing: bool,
    /// Why the task was refused, and what to do.
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    /// The error's code, as `POST /tasks` would answer it: `invalid_task`, `unknown_kind`,
    /// `invalid_schedule`, `overloaded`, `broker_unavailable`, ... A task refused with a
    /// 503-kind code may be sent again.
    #[serde(skip_serializing_if = "Option::is_none")]
    code: Option<&'static str>,
}

/// Queues up to `MAX_BATCH` tasks in one request. The answer comes once the broker has
/// confirmed every task it queued, with a result per task, in order; one bad task does not
/// sink the others.
#[utoipa::path(
    post,
    path = "/tasks/batch",
    tag = "tasks",
    security((), ("bearer" = []), ("browser" = [])),
    request_body = Batch,
    responses(
        (status = 200, description = "A result per task, in order: queued (confirmed), existing (its idempotency key was used before), or refused with a `code`", body = BatchAnswer),
        (status = 400, description = "`invalid_json`, `unreadable_body`", body = ErrorBody),
        (status = 408, description = "`body_timeout`", body = ErrorBody),
        (status = 413, description = "`body_too_large`: the batch is larger than MAX_BODY_BYTES", body = ErrorBody),
        (status = 415, description = "`unsupported_media_type`: send Content-Type: application/json", body = ErrorBody),
        (status = 422, description = "`invalid_task` (not an object holding `tasks`), `batch_size` (no task, or more than MAX_BATCH)", body = ErrorBody),
        KeyErrors,
        Unavailable,
    ),
)]
pub(super) async fn batch(
    State(state): State<AppState>,
    caller: Option<Extension<Caller>>,
    headers: HeaderMap,
    Json(batch): Json<Batch>,
) -> Result<Json<BatchAnswer>> {
    let count = batch.tasks.len();
    if count == 0 || count > state.max_batch {
        return Err(ApiError::BatchSize {
            count,
            max: state.max_batch,
        });
    }
    let caller = caller.map(|Extension(caller)| caller).unwrap_or_default();
    let (state, headers, caller) = (&state, &headers, &caller);
    let results: Vec<TaskResult> = stream::iter(batch.tasks)
        .map(|task| async move {
            let outcome = async {
                let (new, key) = read(task)?;
                accept(state, new, key, caller, headers).await
            };
            result_of(state, outcome.await)
        })
        .buffered(IN_FLIGHT)
        .collect()
        .await;
    let refused = results
        .iter()
        .filter(|result| result.code.is_some())
        .count();
    let existing = results.iter().filter(|result| result.existing).count();
    Ok(Json(BatchAnswer {
        queued: count - refused - existing,
        existing,
        refused,
        results,
    }))
}

/// A batch's task as `POST /tasks` reads one, and its `idempotency_key`.
fn read(task: serde_json::Value) -> Result<(NewTask, Option<String>)> {
    let serde_json::Value::Object(mut fields) = task else {
        return Err(ApiError::InvalidBatchTask(
            "a task is a JSON object".to_owned(),
        ));
    };
    let key = match fields.remove("idempotency_key") {
        None | Some(serde_json::Value::Null) => None,
        Some(serde_json::Value::String(key)) => Some(valid_key(&key)?),
        Some(_) => return Err(ApiError::InvalidIdempotencyKey),
    };
    let new = serde_json::from_value::<NewTaskFields>(serde_json::Value::Object(fields))
        .map_err(|error| ApiError::InvalidBatchTask(error.to_string()))?;
    Ok((new.into(), key))
}

/// A task's result, from what accepting it came to.
fn result_of(state: &AppState, outcome: Result<Outcome>) -> TaskResult {
    match outcome {
        Ok(Outcome::Queued { id, run_at, .. }) => TaskResult {
            id: Some(id),
            status: Some(
                if run_at.is_some() {
                    "scheduled"
                } else {
                    "queued"
                }
                .to_owned(),
            ),
            run_at: run_at.map(|at| humantime::format_rfc3339_millis(at).to_string()),
            ..TaskResult::default()
        },
        Ok(Outcome::Existing(id)) => TaskResult {
            id: Some(id),
            status: Some(already_status(state, id).to_owned()),
            existing: true,
            ..TaskResult::default()
        },
        Err(error) => {
            if error.status_code().is_server_error() {
                tracing::warn!(
                    code = error.code(),
                    "a task of a batch was refused: {error}"
                );
            }
            TaskResult {
                error: Some(error.message()),
                code: Some(error.code()),
                ..TaskResult::default()
            }
        }
    }
}
