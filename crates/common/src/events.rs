//! Lifecycle events: every change in a task's life, as small versioned JSON documents on the
//! `<QUEUE>.events` stream. docs/EVENTS.md is the schema, for other programs reading it.
//!
//! Events travel in batches: one stream message holds one or more events, one JSON document
//! per line (`application/x-ndjson`). [`EventSink`] gathers whatever events are waiting
//! into one publish (group commit), so a busy process pays one broker round trip for many
//! events. An event whose confirm is awaited (a terminal one, before its task's ack) leaves
//! at once; events nobody awaits linger up to [`LINGER`] for company.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime},
};

use futures_util::{StreamExt, stream::FuturesUnordered};
use lapin::BasicProperties;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use crate::{
    Broker, Message, Sent,
    envelope::{optional_rfc3339, rfc3339},
};

/// The event format version this build writes and reads.
pub const EVENTS_VERSION: u32 = 1;
/// The content type of a batch of events.
pub const CONTENT_TYPE: &str = "application/x-ndjson";

/// Most events in one stream message.
const MAX_BATCH: usize = 512;
/// Events waiting to be published; past it, unconfirmed events are dropped (and counted).
const QUEUE_CAPACITY: usize = 16_384;
/// Batches awaiting the broker's confirm at once. Two, not more: the events that come while
/// they are on their way make the next batch, and fewer, larger batches mean fewer stream
/// writes and, in the worker, larger groups of acks to fold (docs/PERFORMANCE.md: 8 in flight
/// drained at 46-55% of raw, 2 at 57-66%).
const MAX_BATCHES_IN_FLIGHT: usize = 2;
/// Longest wait for the broker to confirm a batch.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a batch that nobody awaits (`queued`, `started` events) waits for more events to
/// share its stream message. The broker's cost goes with the number of stream messages, not
/// their size (docs/PERFORMANCE.md); a batch holding an event whose confirm is awaited
/// leaves at once, and takes the lingering ones with it.
const LINGER: Duration = Duration::from_millis(20);

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

struct Pending {
    event: Event,
    /// `None` when nobody waits for the confirm.
    then: Option<Then>,
}

/// Called with whether a pending event's batch was confirmed, on the sink's own task.
type Then = Box<dyn FnOnce(bool) + Send>;

/// Publishes events to the stream in batches. Cheap to clone.
#[derive(Clone)]
pub struct EventSink {
    sender: mpsc::Sender<Pending>,
    dropped: Arc<AtomicU64>,
}

impl EventSink {
    /// Starts the publishing task on `broker`'s session, writing to `stream`. It ends when
    /// every clone of the sink is dropped, after publishing what was given to it.
    pub fn start(broker: Broker, stream: String) -> (Self, tokio::task::JoinHandle<()>) {
        let (sender, receiver) = mpsc::channel(QUEUE_CAPACITY);
        let handle = tokio::spawn(publish_batches(receiver, broker, stream));
        (
            Self {
                sender,
                dropped: Arc::new(AtomicU64::new(0)),
            },
            handle,
        )
    }

    /// Publishes `event` when it can, without waiting: for events whose loss costs only
    /// detail (`queued`, `started`), since the terminal event of the same task is confirmed.
    pub fn emit(&self, mut event: Event) {
        event.bound();
        if self.sender.try_send(Pending { event, then: None }).is_err() {
            let dropped = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
            if dropped.is_power_of_two() {
                tracing::warn!(
                    dropped,
                    "events dropped: the broker is not keeping up or not connected"
                );
            }
        }
    }

    /// Publishes `event` and waits until the broker has confirmed it: `true` once it is on
    /// the stream, `false` if it could not be published.
    pub async fn emit_confirmed(&self, event: Event) -> bool {
        let (confirmed, outcome) = oneshot::channel();
        self.emit_then(event, move |published| {
            let _ = confirmed.send(published);
        })
        .await;
        outcome.await.unwrap_or(false)
    }

    /// Publishes `event` as [`EventSink::emit_confirmed`] does, but instead of waiting, has
    /// the sink call `then` with the outcome once it is known; this returns as soon as the
    /// event is in the sink's queue. `then` runs on the sink's task, between handing out one
    /// batch's confirms and the next: it must be quick, and hand anything slow to a task of
    /// its own. A busy worker uses this to settle a whole batch's tasks from the one wake-up
    /// of its confirm, rather than wake each task to settle its own.
    pub async fn emit_then(&self, mut event: Event, then: impl FnOnce(bool) + Send + 'static) {
        event.bound();
        let pending = Pending {
            event,
            then: Some(Box::new(then)),
        };
        if let Err(mpsc::error::SendError(Pending {
            then: Some(then), ..
        })) = self.sender.send(pending).await
        {
            then(false);
        }
    }
}

async fn publish_batches(mut receiver: mpsc::Receiver<Pending>, broker: Broker, stream: String) {
    // Batches are sent one after the other, in order, so one process's events reach the
    // stream in the order it emitted them; their confirms are awaited concurrently, up to
    // MAX_BATCHES_IN_FLIGHT, so a busy process does not wait a whole round trip per batch.
    let mut confirming = FuturesUnordered::new();
    loop {
        let first = tokio::select! {
            pending = receiver.recv(), if confirming.len() < MAX_BATCHES_IN_FLIGHT => {
                match pending {
                    Some(pending) => pending,
                    None => break,
                }
            }
            Some(()) = confirming.next(), if !confirming.is_empty() => continue,
        };
        let mut batch = Vec::with_capacity(MAX_BATCH);
        let mut awaited = first.then.is_some();
        batch.push(first);
        let linger_until = tokio::time::Instant::now() + LINGER;
        loop {
            while batch.len() < MAX_BATCH {
                match receiver.try_recv() {
                    Ok(pending) => {
                        awaited |= pending.then.is_some();
                        batch.push(pending);
                    }
                    Err(_) => break,
                }
            }
            if awaited || batch.len() >= MAX_BATCH {
                break;
            }
            // Nobody waits for this batch's confirm: wait a moment for more events to share
            // its stream message, still handing out the confirms of earlier batches.
            tokio::select! {
                pending = receiver.recv() => match pending {
                    Some(pending) => {
                        awaited |= pending.then.is_some();
                        batch.push(pending);
                    }
                    None => break,
                },
                Some(()) = confirming.next(), if !confirming.is_empty() => {}
                () = tokio::time::sleep_until(linger_until) => break,
            }
        }
        let body = encode_batch(batch.iter().map(|pending| &pending.event));
        let sent = send(&broker, &stream, &body).await;
        confirming.push(async move {
            let published = match sent {
                Some(sent) => sent.confirmed_within(CONFIRM_TIMEOUT).await.is_ok(),
                None => false,
            };
            for then in batch.into_iter().filter_map(|pending| pending.then) {
                then(published);
            }
        });
    }
    while confirming.next().await.is_some() {}
}

/// Sends one batch: its confirm to await, or `None` if it could not be sent.
async fn send(broker: &Broker, stream: &str, body: &[u8]) -> Option<Sent> {
    let mut properties = BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type(CONTENT_TYPE.into())
        .with_app_id("offload".into());
    // The broker refuses a `user_id` that is not the connection's user, so readers can
    // believe it: who wrote these events (docs/SECURITY.md, "Who writes the events").
    if let Some(user) = broker.user() {
        properties = properties.with_user_id(user.into());
    }
    let send = broker.send(Message::to_queue(stream, body, properties));
    tokio::time::timeout(CONFIRM_TIMEOUT, send).await.ok()?.ok()
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
