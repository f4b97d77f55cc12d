//! The gateway's view of task states, built by reading the events stream: the whole retention
//! window at start, then following it.
//!
//! Bounded: at most `STATUS_CAPACITY` tasks, the oldest forgotten first. Results are not held:
//! the view keeps the stream offset of a task's `succeeded` event and reads the result back
//! from the stream when asked for it. Waiters (`?wait=`) park on a `Notify` per task, so ten
//! thousand of them cost memory, not threads or polling.

//!
//! [`fold`] is how one event changes one task, [`store`] the bounded view and its queries,
//! [`claims`] the Idempotency-Key claims, [`cancels`] what a cancel waits for, [`follow`] the
//! reading of the stream, [`writers`] whose events are believed.

mod cancels;
mod claims;
mod fold;
mod follow;
mod store;
mod tasks;
mod view;
mod writers;

use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};

use offload_common::DeadReason;
use serde::Serialize;
use uuid::Uuid;

pub use cancels::Confirmed;
pub use claims::{Claim, ClaimState};
pub(crate) use fold::idempotency_index;
pub use store::Tracker;
pub use view::Totals;
pub use writers::Writers;

/// Where a task is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// On the queue, waiting for a worker.
    Queued,
    /// Waiting in the delay levels until `run_at` (posted with a delay, or a failed attempt's
    /// backoff), then queued.
    Scheduled,
    /// A worker is running it.
    Running,
    /// Done.
    Succeeded,
    /// It will not run again; it is in the dead-letter queue.
    Dead,
    /// Cancelled: it will not run (again). `handler_stopped` says, for a task cancelled while
    /// running, whether its handler stopped when told.
    Cancelled,
    /// It had not started by its `expires_at`, and never will.
    Expired,
}

impl Status {
    /// Whether the task's life is over (until a redelivery: delivery is at least once).
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            Self::Succeeded | Self::Dead | Self::Cancelled | Self::Expired
        )
    }

    /// Whether it waits to start: queued, or scheduled.
    pub fn is_waiting(self) -> bool {
        matches!(self, Self::Queued | Self::Scheduled)
    }

    /// Its name, as the API writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Scheduled => "scheduled",
            Self::Running => "running",
            Self::Succeeded => "succeeded",
            Self::Dead => "dead",
            Self::Cancelled => "cancelled",
            Self::Expired => "expired",
        }
    }
}

/// What GET /tasks/{id} answers.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct TaskView {
    /// The task id.
    pub id: Uuid,
    /// Its kind.
    #[schema(value_type = String)]
    pub kind: Arc<str>,
    /// Where it is.
    pub status: Status,
    /// Attempts started so far.
    pub attempts: u64,
    /// When the gateway accepted it.
    #[serde(serialize_with = "time")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub submitted_at: Option<SystemTime>,
    /// When its latest attempt started.
    #[serde(serialize_with = "time")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub started_at: Option<SystemTime>,
    /// When it ended: succeeded, died, was cancelled or expired.
    #[serde(serialize_with = "time")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub finished_at: Option<SystemTime>,
    /// While scheduled: when its next attempt is due.
    #[serde(serialize_with = "time")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub run_at: Option<SystemTime>,
    /// When it expires if it has not started, if it was given an expiry.
    #[serde(serialize_with = "time", skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub expires_at: Option<SystemTime>,
    /// Cancelled while running: whether the handler stopped when told (returned an error)
    /// rather than run to its end.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub handler_stopped: Option<bool>,
    /// The schedule whose tick made it, if one did.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub schedule: Option<Arc<str>>,
    /// That tick: when the schedule was due.
    #[serde(serialize_with = "time", skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub tick: Option<SystemTime>,
    /// The latest error, if any.
    #[schema(value_type = Option<String>)]
    pub error: Option<Arc<str>>,
    /// Why it is dead, once dead.
    pub reason: Option<DeadReason>,
    /// The handler's result, once succeeded (read back from the stream).
    pub result: Option<serde_json::Value>,
    /// Stream offset of the `succeeded` event holding the result; not shown.
    #[serde(skip)]
    pub result_offset: Option<i64>,
}

/// An optional time as RFC 3339 with milliseconds, or null (for `serialize_with`).
#[allow(clippy::ref_option)] // serde's serialize_with hands us `&Option<T>`
pub(crate) fn time<S: serde::Serializer>(
    time: &Option<SystemTime>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    match time {
        Some(time) => serializer.collect_str(&humantime::format_rfc3339_millis(*time)),
        None => serializer.serialize_none(),
    }
}

pub(crate) fn millis(time: SystemTime) -> u64 {
    time.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |since| {
            u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
        })
}

/// Milliseconds since the epoch as a time; 0 (not yet) as none.
pub(crate) fn time_of(millis: u64) -> Option<SystemTime> {
    (millis != 0).then(|| SystemTime::UNIX_EPOCH + Duration::from_millis(millis))
}
