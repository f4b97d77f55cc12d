//! The dead-letter queue as an API, on RabbitMQ alone: list, show, retry and discard the
//! tasks in `<QUEUE>.dead`.
//!
//! Every operation *scans* the queue: a consumer on a channel of its own receives up to
//! `DEAD_SCAN_MAX` messages and holds them unacked, one scan at a time per gateway, so the
//! memory scans take is bounded by that setting. What it acks is gone; when its channel
//! closes, RabbitMQ puts everything else back. A retry publishes the task to the work queue
//! and waits for the broker's confirm before it acks the dead copy, so a gateway killed in
//! the middle leaves the task in both places (it runs again: at least once), never in none.
//! Two requests after the same task cannot both get it: the broker hands a message to one
//! consumer at a time, so the second does not see it and answers 404.

use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};

use futures_util::StreamExt;
use lapin::{
    BasicProperties, Channel,
    message::Delivery,
    options::{
        BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicQosOptions,
        QueueDeclareOptions, QueuePurgeOptions,
    },
    types::{AMQPValue, FieldTable},
};
use offload_common::{
    Broker, Event, EventSink, EventType, Message, PublishError as BrokerPublishError, TaskEnvelope,
    envelope::{copy_properties, integer_header},
};
use serde::Serialize;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use uuid::Uuid;

use crate::{publisher::PublishError, status::time_of};

/// A scan stops waiting for more messages after this long without one.
const SCAN_IDLE: Duration = Duration::from_millis(250);
/// Longest a scan may take, from its channel to its last message.
const SCAN_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest wait for one answer of the broker: the confirm of a task put back on the work
/// queue, a channel, an ack, a purge.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(10);

/// One dead task, as `GET /dead` lists it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct DeadTask {
    /// The task id (`None` for a message that had none).
    pub id: Option<Uuid>,
    /// Its kind, if known.
    pub kind: Option<String>,
    /// Why it is dead: offload's reason (`max_attempts`, `rejected`, `no_handler`,
    /// `undecodable`), or RabbitMQ's when the broker dead-lettered it (`delivery_limit`).
    pub reason: Option<String>,
    /// The last error.
    pub error: Option<String>,
    /// Attempts it had.
    pub attempts: Option<u64>,
    /// When it died.
    #[serde(serialize_with = "crate::status::time")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub died_at: Option<SystemTime>,
    /// Its payload (`GET /dead/{id}` only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub payload: Option<serde_json::Value>,
}

impl DeadTask {
    fn of(delivery: &Delivery, with_payload: bool) -> Self {
        let properties = &delivery.properties;
        let text = |name: &str| match header(properties, name)? {
            AMQPValue::LongString(text) => Some(String::from_utf8_lossy(text.as_bytes()).into()),
            _ => None,
        };
        let envelope = TaskEnvelope::from_bytes(&delivery.data).ok();
        Self {
            id: properties
                .message_id()
                .as_ref()
                .and_then(|id| id.as_str().parse().ok()),
            kind: properties.kind().as_ref().map(ToString::to_string),
            reason: text("x-offload-reason").or_else(|| text("x-first-death-reason")),
            error: text("x-offload-error"),
            attempts: integer_header(properties, "x-offload-attempts"),
            died_at: integer_header(properties, "x-offload-dead-at").and_then(time_of),
            payload: with_payload.then(|| {
                envelope.map_or_else(
                    || serde_json::Value::String(String::from_utf8_lossy(&delivery.data).into()),
                    |envelope| envelope.payload,
                )
            }),
        }
    }
}

/// `request`'s answer, or a timeout's error past [`CONFIRM_TIMEOUT`]: lapin can leave a
/// request pending for good when its connection dies meanwhile (amqp-rs/lapin#409), and a
/// scan holds the gateway's one turn until it ends.
async fn answered<T>(
    request: impl Future<Output = Result<T, lapin::Error>>,
) -> Result<T, PublishError> {
    match tokio::time::timeout(CONFIRM_TIMEOUT, request).await {
        Ok(answer) => Ok(answer?),
        Err(_) => Err(BrokerPublishError::Timeout(CONFIRM_TIMEOUT).into()),
    }
}

fn header<'a>(properties: &'a BasicProperties, name: &str) -> Option<&'a AMQPValue> {
    properties.headers().as_ref()?.inner().get(name)
}

/// The dead-letter queue of one work queue.
#[derive(Clone)]
pub struct DeadLetters {
    broker: Broker,
    /// Most messages one scan reads; a longer queue is listed from its oldest this many.
    scan_max: u16,
    /// One scan at a time.
    scanning: Arc<Semaphore>,
}

/// A scan in progress: the messages read, held unacked until [`Scan::close`].
struct Scan {
    _turn: OwnedSemaphorePermit,
    channel: Channel,
    deliveries: Vec<Delivery>,
    /// More messages were in the queue than the scan read.
    truncated: bool,
}

impl Scan {
    /// Ends the scan: what was not acked goes back to the queue.
    async fn close(self) {
        let _ = answered(self.channel.close(200, "scan done".into())).await;
    }
}

impl DeadLetters {
    /// The dead-letter queue of `broker`'s topology, read `scan_max` messages at a time.
    pub fn new(broker: Broker, scan_max: u16) -> Self {
        Self {
            broker,
            scan_max,
            scanning: Arc::new(Semaphore::new(1)),
        }
    }

    /// Most messages one scan reads.
    pub fn scan_max(&self) -> usize {
        usize::from(self.scan_max)
    }

    fn queue(&self) -> String {
        self.broker.topology().dead_letter_queue()
    }

    /// Up to `limit` dead tasks of `kind` (any if `None`), newest first, after skipping
    /// `offset`; and how many matched in all, and whether the queue held more than a scan
    /// reads.
    pub async fn list(
        &self,
        kind: Option<&str>,
        offset: usize,
        limit: usize,
    ) -> Result<(Vec<DeadTask>, usize, bool), PublishError> {
        let scan = self.scan().await?;
        let mut tasks: Vec<DeadTask> = scan
            .deliveries
            .iter()
            .map(|delivery| DeadTask::of(delivery, false))
            .filter(|task| kind.is_none_or(|kind| task.kind.as_deref() == Some(kind)))
            .collect();
        let truncated = scan.truncated;
        scan.close().await;
        // The queue is oldest first; a task without a time (dead-lettered by the broker
        // itself) keeps its place.
        tasks.reverse();
        tasks.sort_by_key(|task| std::cmp::Reverse(task.died_at));
        let total = tasks.len();
        Ok((
            tasks.into_iter().skip(offset).take(limit).collect(),
            total,
            truncated,
        ))
    }

    /// Dead task `id`, with its payload.
    pub async fn get(&self, id: Uuid) -> Result<Option<DeadTask>, PublishError> {
        let scan = self.scan().await?;
        let found = scan
            .deliveries
            .iter()
            .find(|delivery| has_id(delivery, id))
            .map(|delivery| DeadTask::of(delivery, true));
        scan.close().await;
        Ok(found)
    }

    /// Puts the dead tasks that `pick` picks back on the work queue, with fresh attempts:
    /// each is confirmed on the work queue before it leaves the dead-letter queue, and its
    /// `retried` event (when events are on) confirmed on the stream before that, so no event
    /// of its new run can come before it. Returns how many.
    pub async fn retry(
        &self,
        pick: impl Fn(&Delivery) -> bool,
        events: Option<&EventSink>,
    ) -> Result<usize, PublishError> {
        let scan = self.scan().await?;
        let result = self.retry_picked(&scan, pick, events).await;
        scan.close().await;
        result
    }

    async fn retry_picked(
        &self,
        scan: &Scan,
        pick: impl Fn(&Delivery) -> bool,
        events: Option<&EventSink>,
    ) -> Result<usize, PublishError> {
        let mut retried = 0;
        for delivery in scan.deliveries.iter().filter(|delivery| pick(delivery)) {
            let task = DeadTask::of(delivery, false);
            if let Some(events) = events {
                let mut event = Event::new(EventType::Retried);
                event.id = task.id;
                event.kind.clone_from(&task.kind);
                if !events.emit_confirmed(event).await {
                    return Err(BrokerPublishError::Timeout(CONFIRM_TIMEOUT).into());
                }
            }
            let published = self.put_back(task.kind.as_deref(), delivery).await;
            if let (Err(_), Some(events)) = (&published, events) {
                // It stays dead: say so again, after the `retried` that said otherwise.
                let mut dead = Event::new(EventType::Dead);
                dead.id = task.id;
                dead.kind = task.kind;
                dead.error = task.error;
                events.emit(dead);
            }
            published?;
            answered(delivery.ack(BasicAckOptions::default())).await?;
            retried += 1;
        }
        Ok(retried)
    }

    /// Publishes a copy of the dead `delivery` to its kind's queue and waits for the confirm.
    /// A task of no kind (not a task at all), or of a kind with no queue, comes back unrouted
    /// and stays dead.
    async fn put_back(&self, kind: Option<&str>, delivery: &Delivery) -> Result<(), PublishError> {
        // Fresh attempts: none of what its deaths and attempts wrote.
        let properties = copy_properties(
            &delivery.properties,
            |name| name.starts_with("x-offload-"),
            &FieldTable::default(),
        );
        let queue = self.broker.topology().kind_queue(kind.unwrap_or_default());
        let message = Message::to_queue(&queue, &delivery.data, properties).maybe_unbound();
        match self
            .broker
            .publish_confirmed(message, CONFIRM_TIMEOUT)
            .await
        {
            Ok(()) => Ok(()),
            // No queue for its kind: no worker runs it (or it is no task at all).
            Err(BrokerPublishError::Returned(_)) => Err(PublishError::UnknownKind),
            Err(error) => Err(error.into()),
        }
    }

    /// Discards the dead tasks that `pick` picks. Returns how many.
    pub async fn discard(&self, pick: impl Fn(&Delivery) -> bool) -> Result<usize, PublishError> {
        let scan = self.scan().await?;
        let mut discarded = 0;
        let mut failed = None;
        for delivery in scan.deliveries.iter().filter(|delivery| pick(delivery)) {
            match answered(delivery.ack(BasicAckOptions::default())).await {
                Ok(_) => discarded += 1,
                Err(error) => {
                    failed = Some(error);
                    break;
                }
            }
        }
        scan.close().await;
        failed.map_or(Ok(discarded), Err)
    }

    /// Discards every dead task at once (`queue.purge`). Returns how many.
    pub async fn purge(&self) -> Result<u32, PublishError> {
        let link = self.broker.link().ok_or(BrokerPublishError::Disconnected)?;
        let channel = answered(link.connection().create_channel()).await?;
        let purged = answered(
            channel.queue_purge(self.queue().as_str().into(), QueuePurgeOptions::default()),
        )
        .await;
        let _ = answered(channel.close(200, "purged".into())).await;
        purged
    }

    /// Reads up to `scan_max` messages of the dead-letter queue, holding them unacked, once
    /// no other scan of this gateway runs.
    async fn scan(&self) -> Result<Scan, PublishError> {
        let turn = Arc::clone(&self.scanning)
            .acquire_owned()
            .await
            .expect("the scans' semaphore is never closed");
        let link = self.broker.link().ok_or(BrokerPublishError::Disconnected)?;
        let channel = answered(link.connection().create_channel()).await?;
        let read = tokio::time::timeout(SCAN_TIMEOUT, self.read(&channel)).await;
        match read {
            Ok(Ok((deliveries, truncated))) => Ok(Scan {
                _turn: turn,
                channel,
                deliveries,
                truncated,
            }),
            // Close the channel on every failure: the messages it holds go back to the queue
            // at once instead of when the gateway's connection ends.
            Ok(Err(error)) => {
                let _ = answered(channel.close(200, "scan failed".into())).await;
                Err(error)
            }
            Err(_) => {
                let _ = answered(channel.close(200, "scan timed out".into())).await;
                Err(BrokerPublishError::Timeout(SCAN_TIMEOUT).into())
            }
        }
    }

    /// The reading part of [`DeadLetters::scan`]: the deliveries, and whether there were more.
    async fn read(&self, channel: &Channel) -> Result<(Vec<Delivery>, bool), PublishError> {
        let queue = self.queue();
        let ready = channel
            .queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await?
            .message_count();
        // Not `ready` alone: messages another scan has just released are on their way back
        // and not counted yet. Read until the queue stays quiet for a moment.
        channel
            .basic_qos(self.scan_max, BasicQosOptions::default())
            .await?;
        let mut consumer = channel
            .basic_consume(
                queue.as_str().into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let mut deliveries = Vec::new();
        while deliveries.len() < self.scan_max() {
            match tokio::time::timeout(SCAN_IDLE, consumer.next()).await {
                Ok(Some(Ok(delivery))) => deliveries.push(delivery),
                Ok(Some(Err(error))) => return Err(error.into()),
                Ok(None) | Err(_) => break,
            }
        }
        channel
            .basic_cancel(consumer.tag(), BasicCancelOptions::default())
            .await?;
        let truncated = ready > u32::from(self.scan_max) || deliveries.len() >= self.scan_max();
        Ok((deliveries, truncated))
    }
}

/// Whether `delivery` is task `id`.
pub fn has_id(delivery: &Delivery, id: Uuid) -> bool {
    delivery
        .properties
        .message_id()
        .as_ref()
        .is_some_and(|message_id| Uuid::parse_str(message_id.as_str()).ok() == Some(id))
}

/// Whether `delivery` is a task of `kind`.
pub fn has_kind(delivery: &Delivery, kind: &str) -> bool {
    delivery
        .properties
        .kind()
        .as_ref()
        .is_some_and(|k| k.as_str() == kind)
}
