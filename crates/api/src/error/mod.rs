//! The gateway's one error type, and its one mapping to HTTP.
//!
//! Every error body is `{"error": "<what went wrong and what to do>", "code": "<stable
//! machine-readable code>"}`. Messages echo at most a short excerpt of what the client sent,
//! and 5xx messages never carry the broker client's text: that goes to the log, once.

mod advice;

use std::time::Duration;

use uuid::Uuid;

use axum::{
    extract::rejection::JsonRejection,
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use serde::Serialize;

use offload_common::PublishError as Broker;

use crate::{publisher::PublishError, scope::Scope};
use advice::excerpt;

/// Everything a request can fail with. Each variant's message tells the client what to do.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The request body could not be read as the JSON we expect.
    #[error(transparent)]
    Json(#[from] JsonRejection),
    /// The announced body is larger than the gateway accepts.
    #[error("the body is larger than this gateway accepts ({limit} bytes, MAX_BODY_BYTES)")]
    BodyTooLarge {
        /// The limit.
        limit: usize,
    },
    /// The query string does not fit the route's parameters (serde's words, cut short).
    #[error("the query string is not valid: {}", excerpt(.0))]
    InvalidQuery(String),
    /// The client took too long to send its body.
    #[error("the request body did not arrive within {}", humantime::format_duration(*.0))]
    BodyTimeout(Duration),
    /// No route at that path.
    #[error("no route for {method} {path}")]
    NotFound {
        /// Request method.
        method: String,
        /// Request path.
        path: String,
    },
    /// The route exists but not with this method.
    #[error("{method} is not allowed on {path}")]
    MethodNotAllowed {
        /// Request method.
        method: String,
        /// Request path.
        path: String,
    },
    /// No API key, or one the gateway does not know.
    #[error("{0}")]
    Unauthorized(&'static str),
    /// The key is known but lacks the scope the route needs.
    #[error("this API key lacks the '{0}' scope")]
    Forbidden(Scope),
    /// A browser login (Basic) on a request that changes something, without the header that
    /// only a script of this origin can add.
    #[error(
        "a request that changes something, with a browser login, lacks the X-Requested-By header"
    )]
    CrossSite,
    /// A request that changes something, which the browser says came from a page of another
    /// origin (`Sec-Fetch-Site`, or else `Origin`).
    #[error("a request that changes something came from a page of another site ({0})")]
    ForeignOrigin(&'static str),
    /// The key has used up its rate.
    #[error("rate limit reached")]
    RateLimited {
        /// Seconds until a request would be let through.
        retry_after: u64,
    },
    /// The Idempotency-Key header is malformed.
    #[error(
        "an idempotency key (the Idempotency-Key header, or a batch task's idempotency_key) must be 1 to 255 printable ASCII characters"
    )]
    InvalidIdempotencyKey,
    /// The Idempotency-Key was used (by this API key) for a request with other fields.
    #[error("this idempotency key was used for a different request, task {0}")]
    IdempotencyKeyReused(Uuid),
    /// `?wait=` is not a duration.
    #[error("?wait= must be a duration such as 30s or 500ms")]
    InvalidWait,
    /// A task of a batch is not one: serde's words for what is wrong with it.
    #[error("the task is not one: {0}")]
    InvalidBatchTask(String),
    /// A batch holds no task, or more than `MAX_BATCH`.
    #[error("a batch holds 1 to {max} tasks (MAX_BATCH); this one holds {count}")]
    BatchSize {
        /// How many it holds.
        count: usize,
        /// `MAX_BATCH`.
        max: usize,
    },
    /// `delay` or `run_at` is malformed, or both are given: which, and what to send.
    #[error("{0}")]
    InvalidSchedule(&'static str),
    /// The task would wait longer than the delay levels can hold.
    #[error("the task would wait {asked}, longer than the longest delay offload holds ({max})")]
    DelayTooLong {
        /// The delay asked for.
        asked: String,
        /// The longest one.
        max: String,
    },
    /// `expires_in` or `expires_at` is malformed, both are given, or the task would expire
    /// before it could start.
    #[error("{0}")]
    InvalidExpiry(&'static str),
    /// No task of that id is known.
    #[error("no task with that id")]
    UnknownTask,
    /// A cancel for a task that has ended otherwise.
    #[error("the task has {status} already")]
    TaskFinished {
        /// How it ended: `succeeded`, `dead` or `expired`.
        status: &'static str,
    },
    /// The cancel is recorded, but not every worker consuming the kind said it had read it in
    /// time.
    #[error("not every worker consuming kind '{kind}' confirmed the cancel in time")]
    CancelUnconfirmed {
        /// The task's kind.
        kind: String,
        /// Seconds the client should wait before asking again.
        retry_after: u32,
    },
    /// A change (a cancel, a schedule's) could not be written on its stream.
    #[error("the change was not recorded: {0}")]
    NotRecorded(Broker, u32),
    /// A schedule that cannot tick, or is named wrong.
    #[error("{0}")]
    InvalidScheduleSpec(crate::schedules::SpecError),
    /// No schedule of that name.
    #[error("no schedule named '{0}'")]
    UnknownSchedule(String),
    /// The most schedules are kept already.
    #[error(
        "there are {} schedules already, the most offload keeps",
        crate::schedules::store::MAX_SCHEDULES
    )]
    TooManySchedules,
    /// No task of that id is in the dead-letter queue.
    #[error("no dead task with that id")]
    DeadTaskNotFound,
    /// An Idempotency-Key was sent to a gateway with events off.
    #[error("Idempotency-Key needs task tracking, which is off on this gateway (EVENTS=off)")]
    IdempotencyOff,
    /// Events are off, so task states are not tracked.
    #[error("task tracking is off on this gateway (EVENTS=off)")]
    TrackingOff,
    /// The gateway is still reading the events stream.
    #[error("this gateway is still reading the events stream")]
    Replaying {
        /// Seconds the client should wait before asking again.
        retry_after: u32,
    },
    /// No worker has registered the task's kind.
    #[error("no worker handles tasks of kind '{kind}'")]
    UnknownKind {
        /// The kind asked for.
        kind: String,
        /// The kinds workers have announced, as far as this gateway knows.
        known: Vec<String>,
    },
    /// `/kinds/{kind}`: no queue of that kind exists.
    #[error("there is no queue for kind '{kind}'")]
    KindNotFound {
        /// The kind asked for.
        kind: String,
        /// The kinds this gateway knows of.
        known: Vec<String>,
    },
    /// The broker did not take the task.
    #[error("the task was not queued: {error}")]
    Unavailable {
        /// Why.
        error: PublishError,
        /// Seconds the client should wait before retrying.
        retry_after: u32,
    },
    /// The gateway serves its maximum of connections.
    #[error("the gateway serves its maximum of connections (MAX_CONNECTIONS)")]
    TooManyConnections {
        /// Seconds the client should wait before retrying.
        retry_after: u32,
    },
    /// A bug: a request handler panicked.
    #[error("a request handler panicked")]
    Internal,
}

/// Every error answer: what went wrong and what to do, and a stable code to program against.
#[derive(Serialize, utoipa::ToSchema)]
pub(crate) struct ErrorBody<'a> {
    /// What went wrong and what to do; the wording may improve.
    error: String,
    /// Stable: `invalid_json`, `invalid_task`, `unsupported_media_type`, `unreadable_body`,
    /// `body_too_large`, `body_timeout`, `invalid_query`, `not_found`, `method_not_allowed`,
    /// `unauthorized`, `forbidden`, `cross_site_request`, `rate_limited`, `unknown_kind`,
    /// `invalid_idempotency_key`, `invalid_wait`, `invalid_schedule`, `delay_too_long`,
    /// `invalid_expiry`, `unknown_task`, `task_finished`, `cancel_unconfirmed`,
    /// `invalid_schedule_name`, `invalid_cron`, `invalid_timezone`, `invalid_every`,
    /// `cron_or_every`, `unknown_schedule`, `too_many_schedules`, `dead_task_not_found`, `tracking_off`, `events_replaying`,
    /// `broker_unavailable`, `broker_blocked`, `overloaded`, `queue_full`, `queue_missing`,
    /// `confirm_timeout`, `too_many_connections`, `internal_error`.
    #[schema(example = "unknown_kind")]
    code: &'a str,
}

impl ApiError {
    /// The HTTP status.
    pub fn status_code(&self) -> StatusCode {
        match self {
            Self::Json(rejection) => rejection.status(),
            Self::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::BodyTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            Self::InvalidQuery(_) => StatusCode::BAD_REQUEST,
            Self::NotFound { .. }
            | Self::UnknownTask
            | Self::DeadTaskNotFound
            | Self::KindNotFound { .. }
            | Self::UnknownSchedule(_)
            | Self::TrackingOff => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            Self::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Self::Forbidden(_) | Self::CrossSite | Self::ForeignOrigin(_) => StatusCode::FORBIDDEN,
            Self::UnknownKind { .. }
            | Self::InvalidIdempotencyKey
            | Self::IdempotencyKeyReused(_)
            | Self::InvalidWait
            | Self::InvalidSchedule(_)
            | Self::InvalidBatchTask(_)
            | Self::BatchSize { .. }
            | Self::DelayTooLong { .. }
            | Self::InvalidExpiry(_)
            | Self::InvalidScheduleSpec(_)
            | Self::TooManySchedules
            | Self::IdempotencyOff => StatusCode::UNPROCESSABLE_ENTITY,
            Self::TaskFinished { .. } => StatusCode::CONFLICT,
            Self::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::Replaying { .. }
            | Self::Unavailable { .. }
            | Self::TooManyConnections { .. }
            | Self::CancelUnconfirmed { .. }
            | Self::NotRecorded(..) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The stable, machine-readable code of this error.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Json(rejection) => match rejection {
                JsonRejection::MissingJsonContentType(_) => "unsupported_media_type",
                JsonRejection::JsonSyntaxError(_) => "invalid_json",
                JsonRejection::JsonDataError(_) => "invalid_task",
                _ if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => "body_too_large",
                _ => "unreadable_body",
            },
            Self::BodyTooLarge { .. } => "body_too_large",
            Self::BodyTimeout(_) => "body_timeout",
            Self::NotFound { .. } => "not_found",
            Self::MethodNotAllowed { .. } => "method_not_allowed",
            Self::Unauthorized(_) => "unauthorized",
            Self::Forbidden(_) => "forbidden",
            Self::CrossSite | Self::ForeignOrigin(_) => "cross_site_request",
            Self::UnknownKind { .. } | Self::KindNotFound { .. } => "unknown_kind",
            Self::InvalidIdempotencyKey => "invalid_idempotency_key",
            Self::IdempotencyKeyReused(_) => "idempotency_key_reused",
            Self::InvalidWait => "invalid_wait",
            Self::InvalidQuery(_) => "invalid_query",
            Self::InvalidSchedule(_) => "invalid_schedule",
            Self::InvalidBatchTask(_) => "invalid_task",
            Self::BatchSize { .. } => "batch_size",
            Self::DelayTooLong { .. } => "delay_too_long",
            Self::UnknownTask => "unknown_task",
            Self::InvalidExpiry(_) => "invalid_expiry",
            Self::TaskFinished { .. } => "task_finished",
            Self::CancelUnconfirmed { .. } => "cancel_unconfirmed",
            Self::NotRecorded(..) => "broker_unavailable",
            Self::InvalidScheduleSpec(error) => {
                use crate::schedules::SpecError;
                match error {
                    SpecError::Name => "invalid_schedule_name",
                    SpecError::Cron(_) => "invalid_cron",
                    SpecError::Timezone => "invalid_timezone",
                    SpecError::Every => "invalid_every",
                    SpecError::When => "cron_or_every",
                    SpecError::Expiry => "invalid_expiry",
                }
            }
            Self::UnknownSchedule(_) => "unknown_schedule",
            Self::TooManySchedules => "too_many_schedules",
            Self::DeadTaskNotFound => "dead_task_not_found",
            Self::TrackingOff | Self::IdempotencyOff => "tracking_off",
            Self::Replaying { .. } => "events_replaying",
            Self::RateLimited { .. } => "rate_limited",
            Self::Unavailable { error, .. } => match error {
                PublishError::Broker(Broker::Disconnected | Broker::Channel(_)) => {
                    "broker_unavailable"
                }
                PublishError::Blocked => "broker_blocked",
                PublishError::Overloaded => "overloaded",
                PublishError::Broker(Broker::Nacked) => "queue_full",
                PublishError::Broker(Broker::Returned(_)) => "queue_missing",
                PublishError::UnknownKind => "unknown_kind",
                PublishError::Broker(Broker::Timeout(_)) => "confirm_timeout",
            },
            Self::TooManyConnections { .. } => "too_many_connections",
            Self::Internal => "internal_error",
        }
    }

    fn retry_after(&self) -> Option<u64> {
        match self {
            Self::RateLimited { retry_after } => Some(*retry_after),
            Self::Unavailable { retry_after, .. }
            | Self::TooManyConnections { retry_after }
            | Self::Replaying { retry_after }
            | Self::CancelUnconfirmed { retry_after, .. }
            | Self::NotRecorded(_, retry_after) => Some(u64::from(*retry_after)),
            _ => None,
        }
    }

    /// Whether the connection should be closed after this answer: the request's body was
    /// not (or not wholly) read, so the connection cannot carry another request.
    fn closes_connection(&self) -> bool {
        matches!(
            self,
            Self::BodyTooLarge { .. } | Self::BodyTimeout(_) | Self::TooManyConnections { .. }
        )
    }

    /// The JSON body alone, for the one answer written outside the router (too many
    /// connections).
    pub(crate) fn body_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(&ErrorBody {
            error: self.message(),
            code: self.code(),
        })
        .expect("an error body of two strings always serialises")
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status_code();
        if status.is_server_error() {
            // The whole cause chain, broker text included, goes to the log; not to the client.
            tracing::warn!(status = status.as_u16(), code = self.code(), "{self}");
        } else {
            tracing::debug!(status = status.as_u16(), code = self.code(), "{self}");
        }
        let mut response = (
            status,
            axum::Json(ErrorBody {
                error: self.message(),
                code: self.code(),
            }),
        )
            .into_response();
        // For the metrics layer, which counts refusals by code.
        response
            .extensions_mut()
            .insert(crate::metrics_registry::Refusal(self.code()));
        let headers = response.headers_mut();
        if let Some(seconds) = self.retry_after() {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        if self.closes_connection() {
            headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        if matches!(self, Self::Unauthorized(_)) {
            // Programs send `Bearer`; a browser opening the dashboard asks its user for the
            // key as the password of a Basic login (RFC 7617) and sends it on from then on.
            headers.append(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static(r#"Bearer realm="offload""#),
            );
            headers.append(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static(r#"Basic realm="offload", charset="UTF-8""#),
            );
        }
        response
    }
}

/// `Result` with [`ApiError`] as the default error.
pub type Result<T, E = ApiError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_errors_never_quote_the_broker() {
        let error = ApiError::Unavailable {
            error: Broker::Returned("NO_ROUTE secret-broker-text".into()).into(),
            retry_after: 1,
        };
        let body = String::from_utf8(error.body_bytes()).expect("UTF-8");
        assert!(!body.contains("secret-broker-text"), "{body}");
        assert!(body.contains("\"code\":\"queue_missing\""), "{body}");
    }
}
