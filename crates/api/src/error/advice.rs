//! What an error message tells a client: for each error, what happened and what to do
//! ([`ApiError::message`]), with advice for each way the broker or a body can fail, and
//! short excerpts of what the client sent.

use axum::{extract::rejection::JsonRejection, http::StatusCode};
use offload_common::PublishError as Broker;

use super::ApiError;
use crate::publisher::PublishError;

/// The longest excerpt of client input an error message quotes.
const EXCERPT: usize = 100;

impl ApiError {
    /// The message the client sees: what happened and what to do, nothing internal.
    pub(crate) fn message(&self) -> String {
        match self {
            Self::Json(rejection) => json_advice(rejection),
            Self::BodyTooLarge { .. } => format!(
                "{self}; send a smaller payload, or store large inputs elsewhere and send a reference"
            ),
            Self::BodyTimeout(_) => format!("{self}; send the whole body at once"),
            Self::NotFound { method, path } => format!(
                "no route for {} {}; GET /openapi.json lists every route this gateway serves",
                excerpt(method),
                excerpt(path)
            ),
            Self::MethodNotAllowed { method, path } => format!(
                "{} is not allowed on {}; see the Allow header for the methods that are",
                excerpt(method),
                excerpt(path)
            ),
            Self::Unauthorized(why) => {
                format!("{why}; send the header Authorization: Bearer <API key>")
            }
            Self::Forbidden(scope) => format!(
                "this API key lacks the '{scope}' scope this request needs; use a key that has it"
            ),
            Self::CrossSite => format!(
                "{self}, so it may come from a form on another site; the dashboard sends it, other clients should send Authorization: Bearer <API key>"
            ),
            Self::ForeignOrigin(_) => format!(
                "{self}, which the gateway refuses whether or not API keys are set; use the gateway's own dashboard, or a client that is not a browser page"
            ),
            Self::RateLimited { .. } => {
                "this API key has used up its RATE_LIMIT; retry after the Retry-After delay".into()
            }
            Self::InvalidIdempotencyKey
            | Self::InvalidWait
            | Self::InvalidSchedule(_)
            | Self::InvalidQuery(_) => {
                format!("{self}; fix the request")
            }
            Self::InvalidExpiry(_) => format!("{self}; fix the request"),
            Self::IdempotencyKeyReused(_) => format!(
                "{self} (kind, payload, delay, run_at and expiry are compared); a retry must repeat the first request exactly, and a new task needs a new key"
            ),
            Self::InvalidBatchTask(_) => format!(
                "{}. Expected {{\"kind\": \"<1-64 chars of a-z 0-9 _ . ->\", \"payload\": <any JSON, optional>}}, optionally with \"delay\" or \"run_at\", \"expires_in\" or \"expires_at\", and \"idempotency_key\"",
                excerpt(&self.to_string())
            ),
            Self::BatchSize { .. } => format!("{self}; split it into batches of at most MAX_BATCH"),
            Self::TaskFinished { status } => format!(
                "the task has {status} already, so there is nothing to cancel; GET /tasks/{{id}} shows how it ended"
            ),
            Self::CancelUnconfirmed { kind, .. } => format!(
                "the cancel is recorded, and every worker honours it once it reads it, but not every worker consuming kind '{kind}' confirmed it in time, so this gateway cannot yet promise the task will not start; repeat the request (it is safe to) after the Retry-After delay to learn the outcome"
            ),
            Self::NotRecorded(..) => "the change could not be recorded on the broker, so nothing changed; retry after the Retry-After delay".into(),
            Self::InvalidScheduleSpec(_) => format!("{self}; fix the schedule"),
            Self::UnknownSchedule(_) => format!("{self}; GET /schedules lists them"),
            Self::TooManySchedules => format!("{self}; delete some first"),
            Self::DelayTooLong { .. } => {
                format!("{self}; schedule it nearer, or keep it in your app until nearer the time")
            }
            Self::IdempotencyOff => {
                format!("{self}; send the task without the header, or turn EVENTS on")
            }
            Self::DeadTaskNotFound => "no task with that id is in the dead-letter queue: it was never dead, was retried or discarded already, or is being retried right now by another request".into(),
            Self::UnknownTask => "no task with that id: it was never accepted, or it is older than the events stream keeps (EVENTS_MAX_AGE, EVENTS_MAX_BYTES) or than this gateway remembers (STATUS_CAPACITY)".into(),
            Self::TrackingOff => "task tracking is off on this gateway (EVENTS=off): there is no status to read, and no Idempotency-Key can be honoured; turn EVENTS on".into(),
            Self::Replaying { .. } => "this gateway is still reading the events stream and cannot yet tell where that task (or that Idempotency-Key) stands; retry after the Retry-After delay".into(),
            Self::UnknownKind { kind, known } => {
                let known = if known.is_empty() {
                    "none announced yet".to_owned()
                } else {
                    kinds_excerpt(known)
                };
                format!(
                    "no worker handles tasks of kind '{kind}', so it was not queued. Kinds handled: {known}. \
                     A kind is accepted once a worker that handles it has started (or `offload-worker --declare-only` registered it)"
                )
            }
            Self::KindNotFound { kind, known } => format!(
                "there is no queue for kind '{kind}': no worker that runs it has started (a worker declares its kinds' queues). Kinds known here: {}",
                if known.is_empty() {
                    "none yet".to_owned()
                } else {
                    kinds_excerpt(known)
                }
            ),
            Self::Unavailable { error, .. } => unavailable_advice(error).into(),
            Self::TooManyConnections { .. } => {
                format!("{self}; retry after the Retry-After delay")
            }
            Self::Internal => {
                "internal error in the gateway; the task may not have been queued, retry it".into()
            }
        }
    }
}

/// What to tell a client whose task the broker did not take. Never the broker's own text.
pub(super) fn unavailable_advice(error: &PublishError) -> &'static str {
    match error {
        PublishError::Broker(Broker::Disconnected | Broker::Channel(_)) => {
            "the task was not queued: the gateway has no connection to RabbitMQ right now. Retry after the Retry-After delay"
        }
        PublishError::Blocked => {
            "the task was not queued: RabbitMQ is refusing new messages (memory or disk alarm). Retry after the Retry-After delay"
        }
        PublishError::Overloaded => {
            "the task was not queued: this gateway has too many tasks awaiting the broker's confirm (MAX_IN_FLIGHT). Retry after the Retry-After delay"
        }
        PublishError::Broker(Broker::Nacked) => {
            "the task was not queued: RabbitMQ refused it (nack: the queue is at its length limit, or a cluster is moving its leader after losing a node). Retry after the Retry-After delay"
        }
        // Answered as `UnknownKind` by the route, which knows the kind; never reaches here.
        PublishError::UnknownKind => "the task was not queued: no worker handles its kind",
        PublishError::Broker(Broker::Returned(_)) => {
            "the task was not queued: a queue it needs does not exist right now (it is being declared again). Retry after the Retry-After delay"
        }
        // Without a confirm nobody knows whether the broker kept the task; say so, since a
        // retry may then run it twice (delivery is at least once anyway).
        PublishError::Broker(Broker::Timeout(_)) => {
            "the task may not have been queued: RabbitMQ did not confirm it within CONFIRM_TIMEOUT. Retry after the Retry-After delay; if it was queued after all it runs twice, so handlers should be idempotent"
        }
    }
}

/// Rewords axum's JSON rejections so each says what to send instead.
pub(super) fn json_advice(rejection: &JsonRejection) -> String {
    match rejection {
        JsonRejection::MissingJsonContentType(_) => {
            "send the task as JSON with the header Content-Type: application/json".into()
        }
        JsonRejection::JsonSyntaxError(_) => format!(
            "the body is not valid JSON ({}); send an object like {{\"kind\": \"sleep\", \"payload\": {{\"message\": \"...\"}}}}",
            excerpt(&inner_most(rejection))
        ),
        JsonRejection::JsonDataError(error) => format!(
            "the body does not describe a task: {}. Expected {{\"kind\": \"<1-64 chars of a-z 0-9 _ . ->\", \"payload\": <any JSON, optional>}}, optionally with \"delay\" or \"run_at\", and \"expires_in\" or \"expires_at\" (GET /openapi.json describes each)",
            excerpt(&inner_most(error))
        ),
        JsonRejection::BytesRejection(_) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            "the body is larger than this gateway accepts (MAX_BODY_BYTES); send a smaller payload, or store large inputs elsewhere and send a reference".into()
        }
        _ => "the request body could not be read; send it again".into(),
    }
}

/// serde's message, without axum's "Failed to deserialize..." prefix.
fn inner_most(error: &dyn std::error::Error) -> String {
    let mut current = error;
    while let Some(source) = current.source() {
        current = source;
    }
    current.to_string()
}

/// The most kinds an error names: the kinds come from the events stream, as workers announce
/// them, and an answer stays short whatever it holds.
const KINDS_NAMED: usize = 20;

/// Up to [`KINDS_NAMED`] of `kinds`, each excerpted, and how many more there are.
pub(super) fn kinds_excerpt(kinds: &[String]) -> String {
    let named: Vec<String> = kinds
        .iter()
        .take(KINDS_NAMED)
        .map(|kind| excerpt(kind))
        .collect();
    match kinds.len().saturating_sub(KINDS_NAMED) {
        0 => named.join(", "),
        more => format!(
            "{} and {more} more (GET /kinds lists them)",
            named.join(", ")
        ),
    }
}

/// At most [`EXCERPT`] characters of client input, marked when cut.
pub(super) fn excerpt(text: &str) -> String {
    match text.char_indices().nth(EXCERPT) {
        Some((end, _)) => format!("{}…", &text[..end]),
        None => text.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn excerpts_are_short_and_marked() {
        assert_eq!(excerpt("short"), "short");
        let long = "x".repeat(10_000);
        let cut = excerpt(&long);
        assert_eq!(cut.chars().count(), EXCERPT + 1);
        assert!(cut.ends_with('…'));
        // Never splits a character.
        assert_eq!(excerpt(&"é".repeat(200)).chars().count(), EXCERPT + 1);
    }
}
