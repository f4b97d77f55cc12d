//! `POST /tasks`: accept a task, publish it, answer 202 once the broker has confirmed it.
//! `GET /tasks/{id}`: what happened to it, from the events stream, optionally waiting for
//! its end.

use std::time::{Duration, SystemTime};

use axum::{
    extract::{Path, State},
    http::{HeaderMap, HeaderValue, StatusCode, header},
    middleware,
    response::{IntoResponse, Response},
};
use lapin::types::FieldTable;
use offload_common::{
    Event, EventType, TaskEnvelope, TaskKind,
    topology::{MAX_DELAY, delay_in_levels},
    trace,
};
use serde::{Deserialize, Serialize};
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::{router::OpenApiRouter, routes};
use uuid::Uuid;

use super::{Json, Query};
use crate::{
    AppState,
    auth::{self, Scope},
    error::{ApiError, ErrorBody, Result},
    openapi::{KeyErrors, Unavailable},
    publisher::PublishError,
    status::{Claim, ClaimState, TaskView, Tracker},
};

pub fn router(state: &AppState) -> OpenApiRouter<AppState> {
    let submit_routes =
        OpenApiRouter::new()
            .routes(routes!(submit))
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

/// What a client sends: a JSON object, nothing else.
#[derive(Deserialize)]
#[serde(try_from = "serde_json::Map<String, serde_json::Value>")]
struct NewTask {
    kind: TaskKind,
    payload: serde_json::Value,
    delay: Option<String>,
    run_at: Option<String>,
    expires_in: Option<String>,
    expires_at: Option<String>,
}

// The object's fields. Read through [`NewTask`] because serde's derived deserializer would
// also take an array (`["sleep"]`) for a struct, and a task is only ever an object.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(
    as = NewTask,
    description = "A task: its kind, and the JSON its handler reads. At most one of `delay` and `run_at`, and at most one of `expires_in` and `expires_at`."
)]
struct NewTaskFields {
    /// The kind of task: 1 to 64 characters of `a-z 0-9 _ . -`, handled by some worker.
    #[schema(value_type = String, pattern = "^[a-z0-9_.-]{1,64}$", example = "sleep")]
    kind: TaskKind,
    /// Anything JSON; the handler of `kind` reads it.
    #[schema(value_type = Object, example = json!({"message": "Hello..."}))]
    #[serde(default)]
    payload: serde_json::Value,
    /// Run it after this long: `90s`, `2h` (at most 48 days).
    #[serde(default)]
    #[schema(example = "90s")]
    delay: Option<String>,
    /// Run it at this time (RFC 3339).
    #[serde(default)]
    #[schema(format = DateTime)]
    run_at: Option<String>,
    /// Not started within this long (`10m`), it never starts: it ends `expired`, retries
    /// included.
    #[serde(default)]
    #[schema(example = "10m")]
    expires_in: Option<String>,
    /// Not started by this time (RFC 3339), it never starts: it ends `expired`.
    #[serde(default)]
    #[schema(format = DateTime)]
    expires_at: Option<String>,
}

impl TryFrom<serde_json::Map<String, serde_json::Value>> for NewTask {
    type Error = serde_json::Error;

    fn try_from(object: serde_json::Map<String, serde_json::Value>) -> Result<Self, Self::Error> {
        let NewTaskFields {
            kind,
            payload,
            delay,
            run_at,
            expires_in,
            expires_at,
        } = serde_json::from_value(serde_json::Value::Object(object))?;
        Ok(Self {
            kind,
            payload,
            delay,
            run_at,
            expires_in,
            expires_at,
        })
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

/// How long a task asked to wait before it runs: `delay`, or the time until `run_at` (none if
/// that is past), as the delay levels will hold it (whole seconds). `None`: run now.
fn schedule(delay: Option<&str>, run_at: Option<&str>) -> Result<Option<Duration>> {
    let (wait, exact) = match (delay, run_at) {
        (None, None) => return Ok(None),
        (Some(delay), None) => (
            humantime::parse_duration(delay).map_err(|_| {
                ApiError::InvalidSchedule(
                    "delay must be a duration with its unit, such as \"90s\", \"15m\" or \"2h\"",
                )
            })?,
            false,
        ),
        (None, Some(run_at)) => {
            let at = humantime::parse_rfc3339_weak(run_at)
                .or_else(|_| humantime::parse_rfc3339(run_at))
                .map_err(|_| {
                    ApiError::InvalidSchedule(
                        "run_at must be an RFC 3339 time such as \"2026-11-30T09:00:00Z\"",
                    )
                })?;
            (
                at.duration_since(SystemTime::now())
                    .unwrap_or(Duration::ZERO),
                true,
            )
        }
        (Some(_), Some(_)) => {
            return Err(ApiError::InvalidSchedule(
                "give at most one of delay and run_at",
            ));
        }
    };
    if wait > MAX_DELAY {
        return Err(ApiError::DelayTooLong {
            asked: humantime::format_duration(wait).to_string(),
            max: humantime::format_duration(MAX_DELAY).to_string(),
        });
    }
    // The levels hold whole seconds, to the nearest; a task asked to run at a time is held
    // to the next whole second instead, so that it never runs before that time.
    let wait = if exact {
        delay_in_levels(Duration::from_secs(
            wait.as_secs() + u64::from(wait.subsec_nanos() > 0),
        ))
    } else {
        delay_in_levels(wait)
    };
    Ok((!wait.is_zero()).then_some(wait))
}

/// When a task submitted at `now` expires: `expires_in` after it, or at `expires_at`; never
/// before it could start (at `run_at`, for a task to run later). `None`: it does not expire.
fn expiry(
    expires_in: Option<&str>,
    expires_at: Option<&str>,
    now: SystemTime,
    run_at: Option<SystemTime>,
) -> Result<Option<SystemTime>> {
    let at = match (expires_in, expires_at) {
        (None, None) => return Ok(None),
        (Some(within), None) => {
            let within = humantime::parse_duration(within).map_err(|_| {
                ApiError::InvalidExpiry("expires_in must be a duration such as \"10m\" or \"2h\"")
            })?;
            now.checked_add(within)
                .ok_or(ApiError::InvalidExpiry("expires_in is too long"))?
        }
        (None, Some(at)) => humantime::parse_rfc3339_weak(at)
            .or_else(|_| humantime::parse_rfc3339(at))
            .map_err(|_| {
                ApiError::InvalidExpiry(
                    "expires_at must be an RFC 3339 time such as \"2026-11-30T09:00:00Z\"",
                )
            })?,
        (Some(_), Some(_)) => {
            return Err(ApiError::InvalidExpiry(
                "give at most one of expires_in and expires_at",
            ));
        }
    };
    if at <= now {
        return Err(ApiError::InvalidExpiry(
            "the task would expire before it is queued: give an expiry in the future",
        ));
    }
    if run_at.is_some_and(|run_at| at <= run_at) {
        return Err(ApiError::InvalidExpiry(
            "the task would expire before it is due to run: expire it after its run_at or delay",
        ));
    }
    Ok(Some(at))
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
        (status = 422, description = "`invalid_task`, `unknown_kind` (no worker handles it), `invalid_idempotency_key`, `invalid_schedule`, `delay_too_long`, `invalid_expiry`, `tracking_off` (an Idempotency-Key with EVENTS=off)", body = ErrorBody),
        KeyErrors,
        Unavailable,
    ),
)]
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
    let mut task = TaskEnvelope::new(new.kind, new.payload);
    let run_at = wait.map(|wait| task.submitted_at + wait);
    task.expires_at = expiry(
        new.expires_in.as_deref(),
        new.expires_at.as_deref(),
        task.submitted_at,
        run_at,
    )?;
    let (span, message_headers) = trace_of(&headers, &task);
    state
        .publisher
        .publish(&task, wait, message_headers)
        .instrument(span)
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
        queued.expires_at = task.expires_at;
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

/// The request's span and the headers that carry its trace with the task: with spans
/// exported, a span continuing the client's `traceparent` (or a new trace); without, no span,
/// and the client's `traceparent`, if any, passed on unchanged.
fn trace_of(headers: &HeaderMap, task: &TaskEnvelope) -> (tracing::Span, FieldTable) {
    let mut message_headers = FieldTable::default();
    if !trace::exporting() && !headers.contains_key(trace::TRACEPARENT) {
        return (tracing::Span::none(), message_headers);
    }
    let header = |name| headers.get(name).and_then(|value| value.to_str().ok());
    let incoming = trace::from_w3c(header(trace::TRACEPARENT), header(trace::TRACESTATE));
    let span = if trace::exporting() {
        let span = tracing::info_span!(
            "submit",
            otel.name = "POST /tasks",
            otel.kind = "server",
            task_id = %task.id,
            kind = %task.kind,
        );
        let _ = span.set_parent(incoming.clone());
        span
    } else {
        tracing::Span::none()
    };
    trace::into_message(&trace::context_of(&span, incoming), &mut message_headers);
    (span, message_headers)
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

/// The answer to a repeated Idempotency-Key: 200 with the first task's id and status.
fn already_accepted(tracker: &Tracker, id: Uuid) -> Response {
    let task = tracker.get(id);
    let body = AlreadyAccepted {
        id,
        status: task
            .as_ref()
            .map_or(crate::status::Status::Queued, |task| task.status),
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
    let mut task = tracker.wait(id, wait).await.ok_or_else(unknown)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_task_asked_to_run_at_a_time_never_runs_before_it() {
        for extra_ms in [1, 300, 499, 500, 501, 999] {
            let asked =
                SystemTime::now() + Duration::from_secs(20) + Duration::from_millis(extra_ms);
            let rfc3339 = humantime::format_rfc3339_millis(asked).to_string();
            let wait = schedule(None, Some(&rfc3339))
                .expect("a valid run_at")
                .expect("a wait");
            // As `submit` does: the task is stamped after its wait is known.
            let submitted = SystemTime::now();
            assert!(submitted + wait >= asked, "{rfc3339}: held {wait:?}, early");
            assert!(
                submitted + wait < asked + Duration::from_secs(1),
                "{rfc3339}: held {wait:?}"
            );
        }
        // A delay is held to the nearest second, as retries are.
        assert_eq!(
            schedule(Some("1400ms"), None).expect("a valid delay"),
            Some(Duration::from_secs(1))
        );
    }
}
