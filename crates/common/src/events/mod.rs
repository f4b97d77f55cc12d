//! Lifecycle events: every change in a task's life, as small versioned JSON documents on the
//! `<QUEUE>.events` stream. docs/EVENTS.md is the schema, for other programs reading it.
//!
//! Events travel in batches: one stream message holds one or more events, one JSON document
//! per line (`application/x-ndjson`). [`EventSink`] gathers whatever events are waiting
//! into one publish (group commit), so a busy process pays one broker round trip for many
//! events. An event whose confirm is awaited (a terminal one, before its task's ack) leaves
//! at once; events nobody awaits linger a moment for company (`sink.rs`).

mod sink;

use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

pub use sink::EventSink;

use crate::envelope::{optional_rfc3339, rfc3339};

/// The event format version this build writes and reads.
pub const EVENTS_VERSION: u32 = 1;
/// The content type of a batch of events.
pub const CONTENT_TYPE: &str = "application/x-ndjson";

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventType {
    /// A gateway accepted the task (the broker confirmed it).
    Queued,
    /// A worker started an attempt.
    Started,
    /// An attempt succeeded; terminal.
    Succeeded,
    /// An attempt failed and the task will be tried again (`retry: true`).
    Failed,
    /// The task will not run again: it is in `<QUEUE>.dead`. Terminal.
    Dead,
    /// A dead task was put back on the work queue, with fresh attempts (`POST /dead/.../retry`).
    Retried,
    /// A worker (re)connected and handles `kinds`.
    Worker,
    /// A gateway's marker, written to learn when it has read the stream up to the present
    /// (at its start, and before it answers a cancel).
    Gateway,
    /// The task will not run (again): it was cancelled (`POST /tasks/{id}/cancel`), while
    /// waiting or, with `handler_stopped`, while running. Terminal. Without an `id`, every
    /// waiting task of `kind` submitted at or before `before` (`POST /tasks/cancel?kind=`).
    Cancelled,
    /// The task had not started by its `expires_at`, and never will. Terminal.
    Expired,
    /// The gateway that fires the schedules is alive (every 500 ms while it leads), as
    /// `worker` (its `<host>-<pid>`).
    Scheduler,
    /// A worker has read cancel `cancel`: how many of its `consumers` of `kind` were
    /// subscribed when it did, and whether it was `running` the task. A gateway answers a
    /// cancel once the kind's consumers have all said so.
    CancelSeen,
}

/// Why a task is dead.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum DeadReason {
    /// The handler said a retry cannot help (a permanent failure).
    Rejected,
    /// It failed on its last allowed attempt (`MAX_ATTEMPTS`, or its kind's own).
    MaxAttempts,
    /// The broker delivered it more than `DELIVERY_LIMIT` times without an answer (its
    /// worker crashed or lost its connection each time).
    DeliveryLimit,
    /// The worker that received it has no handler for its kind.
    NoHandler,
    /// The message is not a task envelope this worker can read.
    Undecodable,
}

impl DeadReason {
    /// Its name, as events, dead-letter headers and metrics write it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Rejected => "rejected",
            Self::MaxAttempts => "max_attempts",
            Self::DeliveryLimit => "delivery_limit",
            Self::NoHandler => "no_handler",
            Self::Undecodable => "undecodable",
        }
    }
}

/// One event. A flat document: which fields are present depends on `type` (docs/EVENTS.md).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Format version, [`EVENTS_VERSION`].
    pub v: u32,
    /// What happened.
    #[serde(rename = "type")]
    pub event: EventType,
    /// When.
    #[serde(with = "rfc3339")]
    pub at: SystemTime,
    /// The task's id (every task event; absent only for an undecodable message without one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<Uuid>,
    /// The task's kind.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// `queued`: when the gateway accepted it.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "optional_rfc3339"
    )]
    pub submitted_at: Option<SystemTime>,
    /// `queued`: the client's Idempotency-Key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    /// `queued` with an `idempotency_key`: whose key it is, a digest of the API key that sent
    /// it (none: the gateway was open). A key is one task per API key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_scope: Option<String>,
    /// `queued` with an `idempotency_key`: a digest of the request's fields, so that the key
    /// reused with another request is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_digest: Option<String>,
    /// `started`, `succeeded`, `failed`, `dead`: the attempt, 1 for the first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt: Option<u64>,
    /// `started`, `succeeded`, `failed`, `dead` (from a worker), `worker`: which worker
    /// (`<host>-<pid>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker: Option<String>,
    /// `succeeded`: how long the attempt took.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
    /// `succeeded`: the handler's result, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<serde_json::Value>,
    /// `failed`, `dead`: the error; `succeeded`: why a result was dropped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// `failed`: whether the task will be tried again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<bool>,
    /// `queued` for a task to run later, and `failed` with `retry`: when the (next) attempt
    /// is due.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "optional_rfc3339"
    )]
    pub run_at: Option<SystemTime>,
    /// `dead`: why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<DeadReason>,
    /// `worker`: the kinds it handles.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kinds: Option<Vec<String>>,
    /// `gateway`: the marker.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub marker: Option<Uuid>,
    /// `queued`: when the task expires if it has not started.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "optional_rfc3339"
    )]
    pub expires_at: Option<SystemTime>,
    /// `cancelled` (a whole kind's): tasks submitted at or before this.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "optional_rfc3339"
    )]
    pub before: Option<SystemTime>,
    /// `cancelled` from a worker: whether the handler stopped when told (it returned an
    /// error), rather than run to its end.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handler_stopped: Option<bool>,
    /// `cancel_seen`, `cancelled`: the cancel's id (its record on the control stream).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cancel: Option<Uuid>,
    /// `cancel_seen`: the worker's subscriptions to the kind's queue when it read the cancel.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consumers: Option<u32>,
    /// `cancel_seen`: whether the worker was running the task.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub running: Option<bool>,
    /// `queued` by a schedule: its name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<String>,
    /// `queued` by a schedule: the tick that made it.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "optional_rfc3339"
    )]
    pub tick: Option<SystemTime>,
}

/// The most bytes of an event's short texts (a kind, a worker's name, a key, a schedule's
/// name); an honest writer's are far shorter (a kind: 64, a key: 255).
const NAME_MAX_BYTES: usize = 256;
/// The most kinds a `worker` event lists.
const KINDS_MAX: usize = 1024;

impl Event {
    /// Cuts every text to its bound ([`crate::text`]): the error to
    /// [`crate::text::ERROR_MAX_BYTES`], names to 256 bytes, a worker's kinds to 1,024 of
    /// them. What a writer sends and what a reader keeps are bounded alike, whoever wrote it.
    pub fn bound(&mut self) {
        use crate::text::{ERROR_MAX_BYTES, bound};
        if let Some(error) = &mut self.error {
            bound(error, ERROR_MAX_BYTES);
        }
        for name in [
            &mut self.kind,
            &mut self.worker,
            &mut self.idempotency_key,
            &mut self.idempotency_scope,
            &mut self.request_digest,
            &mut self.schedule,
        ]
        .into_iter()
        .flatten()
        {
            bound(name, NAME_MAX_BYTES);
        }
        if let Some(kinds) = &mut self.kinds {
            kinds.truncate(KINDS_MAX);
            for kind in kinds {
                bound(kind, NAME_MAX_BYTES);
            }
        }
    }

    /// An event of type `event`, now, every other field empty.
    pub fn new(event: EventType) -> Self {
        Self {
            v: EVENTS_VERSION,
            event,
            at: SystemTime::now(),
            id: None,
            kind: None,
            submitted_at: None,
            idempotency_key: None,
            idempotency_scope: None,
            request_digest: None,
            attempt: None,
            worker: None,
            duration_ms: None,
            result: None,
            error: None,
            retry: None,
            run_at: None,
            reason: None,
            kinds: None,
            marker: None,
            expires_at: None,
            before: None,
            handler_stopped: None,
            cancel: None,
            consumers: None,
            running: None,
            schedule: None,
            tick: None,
        }
    }

    /// An event about task `id` of `kind`.
    pub fn task(event: EventType, id: Uuid, kind: &str) -> Self {
        Self {
            id: Some(id),
            kind: Some(kind.to_owned()),
            ..Self::new(event)
        }
    }

    /// Whether this event ends the task's life (until a redelivery, at least once).
    pub fn is_terminal(&self) -> bool {
        matches!(
            self.event,
            EventType::Succeeded | EventType::Dead | EventType::Cancelled | EventType::Expired
        )
    }
}

/// One stream message's body: the events, one JSON document per line.
pub fn encode_batch<'a>(events: impl IntoIterator<Item = &'a Event>) -> Vec<u8> {
    let mut body = Vec::new();
    for event in events {
        serde_json::to_writer(&mut body, event).expect("an event always serialises");
        body.push(b'\n');
    }
    body
}

/// The events of one stream message; a line that is not an event of this version is
/// skipped (and reported), so a newer writer cannot stop an older reader.
pub fn decode_batch(body: &[u8]) -> impl Iterator<Item = Result<Event, String>> + '_ {
    body.split(|byte| *byte == b'\n')
        .filter(|line| !line.is_empty())
        .map(|line| match serde_json::from_slice::<Event>(line) {
            Ok(mut event) if event.v == EVENTS_VERSION => {
                // Whoever wrote it, a reader keeps no more than a writer of offload's would.
                event.bound();
                Ok(event)
            }
            Ok(event) => Err(format!("event version {} is not supported", event.v)),
            Err(error) => Err(format!("not an event: {error}")),
        })
}

#[cfg(test)]
mod tests {
    #[test]
    fn dead_reasons_are_named_as_serde_writes_them() {
        use super::DeadReason::*;
        for reason in [Rejected, MaxAttempts, DeliveryLimit, NoHandler, Undecodable] {
            assert_eq!(
                serde_json::to_value(reason).expect("a reason serializes"),
                reason.as_str()
            );
        }
    }

    use super::*;

    #[test]
    fn a_batch_round_trips_and_skips_what_it_cannot_read() {
        let id = Uuid::new_v4();
        let mut succeeded = Event::task(EventType::Succeeded, id, "sleep");
        succeeded.attempt = Some(2);
        succeeded.result =
            Some(serde_json::json!({"big": 123_456_789_012_345_678_901_234_567_890_u128}));
        let queued = Event {
            submitted_at: Some(SystemTime::now()),
            ..Event::task(EventType::Queued, id, "sleep")
        };
        let mut body = encode_batch([&queued, &succeeded]);
        body.extend_from_slice(
            b"{\"v\":2,\"type\":\"queued\",\"at\":\"2026-01-01T00:00:00Z\"}\nnot json\n",
        );

        let decoded: Vec<_> = decode_batch(&body).collect();

        assert_eq!(decoded.len(), 4);
        let first = decoded[0].as_ref().expect("queued decodes");
        assert_eq!(first.event, EventType::Queued);
        assert!(first.submitted_at.is_some());
        let second = decoded[1].as_ref().expect("succeeded decodes");
        assert_eq!(second.attempt, Some(2));
        assert_eq!(second.result, succeeded.result);
        assert!(decoded[2].is_err() && decoded[3].is_err());
    }

    #[test]
    fn absent_fields_are_left_out_of_the_document() {
        let event = Event::task(EventType::Started, Uuid::nil(), "sleep");
        let text = String::from_utf8(encode_batch([&event])).expect("UTF-8");
        assert!(!text.contains("null"), "{text}");
        assert!(text.contains("\"type\":\"started\""), "{text}");
    }
}
