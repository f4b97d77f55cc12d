//! `POST /tasks`: accept a task, publish it, answer 202 once the broker has confirmed it.
//! `GET /tasks/{id}`: what happened to it, from the events stream, optionally waiting for
//! its end.

use std::time::{Duration, SystemTime};

use axum::{
    Router,
    extract::{Path, Query, State},
    http::{HeaderMap, HeaderValue, StatusCode, header},
    middleware,
    response::{IntoResponse, Response},
    routing::{get, post},
};
use offload_common::{
    Event, EventType, TaskEnvelope, TaskKind,
    topology::{MAX_DELAY, delay_in_levels},
};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::Json;
use crate::{
    AppState,
    auth::{self, Scope},
    error::{ApiError, Result},
    publisher::PublishError,
    status::{Claim, ClaimState, Tracker},
};

pub fn router(state: &AppState) -> Router<AppState> {
    let submit_routes =
        Router::new()
            .route("/tasks", post(submit))
            .route_layer(middleware::from_fn_with_state(
                (state.access.clone(), Scope::Submit),
                auth::require,
            ));
    let read_routes = Router::new().route("/tasks/{id}", get(status)).route_layer(
        middleware::from_fn_with_state((state.access.clone(), Scope::Read), auth::require),
    );
    submit_routes.merge(read_routes)
}

/// What a client sends: a JSON object, nothing else.
#[derive(Deserialize)]
#[serde(try_from = "serde_json::Map<String, serde_json::Value>")]
struct NewTask {
    kind: TaskKind,
    payload: serde_json::Value,
    delay: Option<String>,
    run_at: Option<String>,
}

/// The object's fields. Read through [`NewTask`] because serde's derived deserializer would
/// also take an array (`["sleep"]`) for a struct, and a task is only ever an object.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewTaskFields {
    kind: TaskKind,
    #[serde(default)]
    payload: serde_json::Value,
    /// Run it after this long: "90s", "2h".
    #[serde(default)]
    delay: Option<String>,
    /// Run it at this time (RFC 3339).
    #[serde(default)]
    run_at: Option<String>,
}

impl TryFrom<serde_json::Map<String, serde_json::Value>> for NewTask {
    type Error = serde_json::Error;

    fn try_from(object: serde_json::Map<String, serde_json::Value>) -> Result<Self, Self::Error> {
        let NewTaskFields {
            kind,
            payload,
            delay,
            run_at,
        } = serde_json::from_value(serde_json::Value::Object(object))?;
        Ok(Self {
            kind,
            payload,
            delay,
            run_at,
        })
    }
}

/// What a client gets back.
#[derive(Serialize)]
struct Accepted<'a> {
    id: Uuid,
    kind: &'a str,
    status: &'static str,
    /// When a scheduled task will run.
    #[serde(skip_serializing_if = "Option::is_none")]
    run_at: Option<String>,
}

/// How long a task asked to wait before it runs: `delay`, or the time until `run_at` (none if
/// that is past), as the delay levels will hold it (whole seconds). `None`: run now.
fn schedule(delay: Option<&str>, run_at: Option<&str>) -> Result<Option<Duration>> {
    let wait = match (delay, run_at) {
        (None, None) => return Ok(None),
        (Some(delay), None) => {
            humantime::parse_duration(delay).map_err(|_| ApiError::InvalidSchedule)?
        }
        (None, Some(run_at)) => {
            let at = humantime::parse_rfc3339_weak(run_at)
                .or_else(|_| humantime::parse_rfc3339(run_at))
                .map_err(|_| ApiError::InvalidSchedule)?;
            at.duration_since(SystemTime::now())
                .unwrap_or(Duration::ZERO)
        }
        (Some(_), Some(_)) => return Err(ApiError::InvalidSchedule),
    };
    if wait > MAX_DELAY {
        return Err(ApiError::DelayTooLong {
            asked: humantime::format_duration(wait).to_string(),
            max: humantime::format_duration(MAX_DELAY).to_string(),
        });
    }
    let wait = delay_in_levels(wait);
    Ok((!wait.is_zero()).then_some(wait))
}

/// The `Idempotency-Key` header, if any: 1 to 255 printable ASCII characters.
fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>> {
    let Some(value) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    let key = value
        .to_str()
        .ok()
        .filter(|key| (1..=255).contains(&key.len()))
        .filter(|key| key.bytes().all(|b| (0x20..=0x7e).contains(&b)))
        .ok_or(ApiError::InvalidIdempotencyKey)?;
    Ok(Some(key.to_owned()))
}

async fn submit(
    State(state): State<AppState>,
    headers: HeaderMap,
    Json(new): Json<NewTask>,
) -> Result<Response> {
    let key = idempotency_key(&headers)?;
    let wait = schedule(new.delay.as_deref(), new.run_at.as_deref())?;
    let _claim = match (&key, &state.tracker) {
        (None, _) => None,
        (Some(_), None) => return Err(ApiError::IdempotencyOff),
        // Keys the view has not read back yet would be taken as new: make the client retry.
        (Some(_), Some(tracker)) if !tracker.is_live() => {
            return Err(ApiError::Replaying {
                retry_after: state.retry_after_secs,
            });
        }
        (Some(key), Some(tracker)) => loop {
            match tracker.claim(key) {
                Claim::Done(id) => return Ok(already_accepted(tracker, id)),
                Claim::Wait(notify) => {
                    let notified = notify.notified();
                    tokio::pin!(notified);
                    notified.as_mut().enable();
                    if matches!(tracker.claim_state(key), ClaimState::Pending) {
                        notified.await;
                    }
                }
                Claim::Mine(guard) => break Some(guard),
            }
        },
    };
    let task = TaskEnvelope::new(new.kind, new.payload);
    let run_at = wait.map(|wait| task.submitted_at + wait);
    state
        .publisher
        .publish(&task, wait)
        .await
        .map_err(|error| match error {
            PublishError::UnknownKind => ApiError::UnknownKind {
                kind: task.kind.to_string(),
                known: state
                    .tracker
                    .as_ref()
                    .map(Tracker::kinds)
                    .unwrap_or_default(),
            },
            error => ApiError::Unavailable {
                error,
                retry_after: state.retry_after_secs,
            },
        })?;
    tracing::debug!(task_id = %task.id, kind = %task.kind, "task queued");
    state.metrics.submitted(task.kind.as_str());
    if let (Some(tracker), Some(events)) = (&state.tracker, &state.events) {
        let mut queued = Event::task(EventType::Queued, task.id, task.kind.as_str());
        queued.submitted_at = Some(task.submitted_at);
        queued.idempotency_key = key;
        queued.run_at = run_at;
        // Visible on this gateway at once, before the stream has it.
        tracker.apply(&queued, None);
        events.emit(queued);
    }
    let location = HeaderValue::try_from(format!("/tasks/{}", task.id))
        .expect("a UUID path is a valid header value");
    let body = Json(Accepted {
        id: task.id,
        kind: task.kind.as_str(),
        status: if run_at.is_some() {
            "scheduled"
        } else {
            "queued"
        },
        run_at: run_at.map(|at| humantime::format_rfc3339_millis(at).to_string()),
    });
    Ok((StatusCode::ACCEPTED, [(header::LOCATION, location)], body).into_response())
}

/// The answer to a repeated Idempotency-Key: 200 with the first task's id and status.
fn already_accepted(tracker: &Tracker, id: Uuid) -> Response {
    let body = tracker.get(id).map_or_else(
        || serde_json::json!({"id": id, "status": "queued"}),
        |task| serde_json::json!({"id": id, "kind": task.kind, "status": task.status}),
    );
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
#[derive(Deserialize)]
struct StatusQuery {
    wait: Option<String>,
}

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
    let mut task = tracker.wait(id, wait).await.ok_or_else(unknown)?;
    // While replaying, the view holds the start of a task's story, not yet its end: only
    // a terminal state is sure to be no older than the stream.
    if !task.status.is_terminal() && !tracker.is_live() {
        return Err(unknown());
    }
    if let Some(offset) = task.result_offset {
        task.result = Tracker::read_result(state.publisher.broker(), id, offset).await;
    }
    Ok((StatusCode::OK, Json(task)).into_response())
}
