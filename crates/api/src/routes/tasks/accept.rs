//! Accepting one task, as `POST /tasks` and each task of `POST /tasks/batch` do: read its
//! fields, claim its idempotency key, publish it, answer once the broker has confirmed it, and
//! record its `queued` event.

use std::time::{Duration, SystemTime};

use axum::http::HeaderMap;
use lapin::types::FieldTable;
use offload_common::{
    Event, EventType, TaskEnvelope, TaskKind,
    topology::{MAX_DELAY, delay_in_levels},
    trace,
};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use utoipa::ToSchema;
use uuid::Uuid;

use crate::{
    AppState,
    auth::Caller,
    error::{ApiError, Result},
    publisher::PublishError,
    status::{Claim, ClaimState, Tracker, idempotency_index},
};

/// What a client sends: a JSON object, nothing else.
pub(super) struct NewTask {
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
pub(super) struct NewTaskFields {
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

impl NewTask {
    /// What tells one request from another under one Idempotency-Key: the first 16 bytes of
    /// SHA-256 over its fields as JSON (object keys sorted, numbers as written).
    fn digest(&self) -> [u8; 16] {
        let fields = (
            self.kind.as_str(),
            &self.payload,
            &self.delay,
            &self.run_at,
            &self.expires_in,
            &self.expires_at,
        );
        let json = serde_json::to_vec(&fields).expect("JSON values and strings serialize");
        let hash = Sha256::digest(&json);
        let mut digest = [0; 16];
        digest.copy_from_slice(&hash[..16]);
        digest
    }
}

impl From<NewTaskFields> for NewTask {
    fn from(fields: NewTaskFields) -> Self {
        let NewTaskFields {
            kind,
            payload,
            delay,
            run_at,
            expires_in,
            expires_at,
        } = fields;
        Self {
            kind,
            payload,
            delay,
            run_at,
            expires_in,
            expires_at,
        }
    }
}

impl<'de> Deserialize<'de> for NewTask {
    /// An object's fields read straight from the body, in one pass: asked for as a map, so an
    /// array is refused, where serde's derive would take one for a struct.
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Object;
        impl<'de> serde::de::Visitor<'de> for Object {
            type Value = NewTaskFields;

            fn expecting(&self, formatter: &mut std::fmt::Formatter) -> std::fmt::Result {
                formatter.write_str("a task, a JSON object")
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<NewTaskFields, A::Error> {
                NewTaskFields::deserialize(serde::de::value::MapAccessDeserializer::new(map))
            }
        }
        deserializer.deserialize_map(Object).map(Self::from)
    }
}

/// What accepting a task came to.
pub(super) enum Outcome {
    /// Published and confirmed: `run_at` when it is to run later.
    Queued {
        id: Uuid,
        kind: TaskKind,
        run_at: Option<SystemTime>,
    },
    /// Its idempotency key was used before: the first task's id.
    Existing(Uuid),
}

/// Accepts `new`, with idempotency key `key`, as a request with `headers` asked (its trace):
/// once this returns `Queued`, the broker has confirmed the task.
pub(super) async fn accept(
    state: &AppState,
    new: NewTask,
    key: Option<String>,
    caller: &Caller,
    headers: &HeaderMap,
) -> Result<Outcome> {
    let wait = schedule(new.delay.as_deref(), new.run_at.as_deref())?;
    let scope = caller.idempotency_scope.as_deref();
    let digest = key.as_ref().map(|_| new.digest());
    let indexed = key.as_deref().map(|key| idempotency_index(scope, key));
    let _claim = match (&indexed, &state.tracker) {
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
                Claim::Done(id, Some(first)) if Some(first) != digest => {
                    return Err(ApiError::IdempotencyKeyReused(id));
                }
                Claim::Done(id, _) => return Ok(Outcome::Existing(id)),
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
    let (span, message_headers) = trace_of(headers, &task);
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
        if key.is_some() {
            queued.idempotency_scope = scope.map(str::to_owned);
            queued.request_digest = digest.map(hex::encode);
        }
        queued.idempotency_key = key;
        queued.run_at = run_at;
        queued.expires_at = task.expires_at;
        // Visible on this gateway at once, before the stream has it.
        tracker.apply(&queued, None);
        events.emit(queued);
    }
    Ok(Outcome::Queued {
        id: task.id,
        kind: task.kind,
        run_at,
    })
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
