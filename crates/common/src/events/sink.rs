//! [`EventSink`]: a process's events gathered into batches, one stream message each, sent in
//! order with at most two awaiting their confirm.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use futures_util::{StreamExt, stream::FuturesUnordered};
use lapin::BasicProperties;
use tokio::sync::{mpsc, oneshot};

use super::{CONTENT_TYPE, Event, encode_batch};
use crate::{Broker, Message, Sent};

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
