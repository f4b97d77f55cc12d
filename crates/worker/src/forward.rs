//! The upgrade from one shared work queue to a queue per kind: where the old layout's queue
//! (`<QUEUE>`) still exists, every worker moves what waits in it to the kinds' queues, each
//! task confirmed on its kind's queue before it leaves the old one. Nothing for an operator
//! to do; the old queue ends empty, and may then be deleted (docs/OPERATIONS.md).
//!
//! A task of a kind whose queue does not exist yet has it declared and bound, as a worker of
//! that kind would: in the old layout it waited for such a worker, and so it does here.

use std::time::Duration;

use lapin::{
    message::Delivery,
    options::{BasicAckOptions, BasicNackOptions, BasicRejectOptions},
    types::{AMQPValue, FieldTable},
};
use offload_common::{
    Broker, BrokerError, Delivered, Message, PublishError, TaskEnvelope, TaskKind,
    envelope::{ATTEMPT_HEADER, copy_properties, delivery_count, first_attempt},
};
use tokio_util::sync::CancellationToken;

/// How many of the old queue's tasks one worker moves at once.
const PREFETCH: u16 = 64;
/// How long the forwarder waits for the broker to confirm a moved task.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(10);

pub(crate) struct Forwarder {
    broker: Broker,
}

impl Forwarder {
    pub(crate) fn new(broker: Broker) -> Self {
        Self { broker }
    }

    /// Moves the old queue's tasks until `stop`, or until the old queue is gone. Returns at
    /// once where there is none.
    pub(crate) async fn run(mut self, stop: CancellationToken) {
        let legacy = self.broker.topology().legacy_queue().to_owned();
        let topology = self.broker.topology().clone();
        // Asked until the broker answers: a connection lost meanwhile is no answer.
        loop {
            let link = tokio::select! {
                () = stop.cancelled() => return,
                link = self.broker.connected() => link,
            };
            match topology.exists_named(link.connection(), &legacy).await {
                Ok(true) => break,
                Ok(false) => return,
                Err(_) => {
                    tokio::select! {
                        () = stop.cancelled() => return,
                        () = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
            }
        }
        tracing::info!(
            queue = %legacy,
            "the shared work queue of offload's layout before per-kind queues exists: moving its tasks to their kinds' queues"
        );
        let mut subscription = self.broker.subscribe(&legacy, PREFETCH);
        loop {
            let delivered = tokio::select! {
                () = stop.cancelled() => break,
                delivered = subscription.next() => delivered,
            };
            match delivered {
                Delivered::Message(delivery) => self.forward(&delivery).await,
                Delivered::Lost(reason) => {
                    let link = self.broker.connected().await;
                    if matches!(
                        topology.exists_named(link.connection(), &legacy).await,
                        Ok(false)
                    ) {
                        tracing::info!(queue = %legacy, "the old shared work queue is gone");
                        break;
                    }
                    tracing::warn!(queue = %legacy, "lost the old queue's subscription ({reason})");
                }
                Delivered::Subscribed | Delivered::Paused(_) => {}
            }
        }
        subscription.close("done moving").await;
    }

    /// Moves one task to its kind's queue: confirmed there, then acked here.
    async fn forward(&mut self, delivery: &Delivery) {
        let Some(kind) = kind_of(delivery) else {
            // Not a task: the broker dead-letters it to `<QUEUE>.dead` (as `rejected`).
            tracing::warn!("a message on the old shared queue is not a task; dead-lettering it");
            let rejecting = delivery.reject(BasicRejectOptions { requeue: false });
            settle(self.broker.within("a reject", rejecting).await);
            return;
        };
        // The attempt it would have started with there, its redeliveries counted: the new
        // queue's delivery count starts again at 0.
        let attempt = first_attempt(&delivery.properties).saturating_add(
            u32::try_from(delivery_count(delivery.redelivered, &delivery.properties)).unwrap_or(0),
        );
        let mut headers = FieldTable::default();
        headers.insert(
            ATTEMPT_HEADER.into(),
            AMQPValue::LongLongInt(i64::from(attempt)),
        );
        let properties = copy_properties(&delivery.properties, |_| false, &headers);
        let queue = self.broker.topology().kind_queue(kind.as_str());
        let broker = self.broker.clone();
        let publish = |properties| {
            let message = Message::to_queue(&queue, &delivery.data, properties).maybe_unbound();
            broker.publish_confirmed(message, CONFIRM_TIMEOUT)
        };
        let mut published = publish(properties.clone()).await;
        if matches!(published, Err(PublishError::Returned(_))) {
            // No queue for the kind yet: declare and bind it as its worker would, then again.
            let link = self.broker.connected().await;
            let topology = self.broker.topology().clone().with_kinds([kind.as_str()]);
            match topology.declare(link.connection()).await {
                Ok(()) => published = publish(properties).await,
                Err(error) => tracing::warn!(%kind, "could not declare the kind's queue: {error}"),
            }
        }
        match published {
            Ok(()) => {
                let acking = delivery.ack(BasicAckOptions::default());
                settle(self.broker.within("an ack", acking).await);
            }
            Err(error) => {
                tracing::warn!(%kind, "could not move a task to its kind's queue ({error}); it stays on the old queue");
                let requeueing = delivery.nack(BasicNackOptions {
                    requeue: true,
                    ..BasicNackOptions::default()
                });
                settle(self.broker.within("a requeue", requeueing).await);
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

/// The task's kind: its `type` property, as the gateway sets it, or else its envelope's.
fn kind_of(delivery: &Delivery) -> Option<TaskKind> {
    if let Some(kind) = delivery.properties.kind()
        && let Ok(kind) = TaskKind::try_from(kind.as_str())
    {
        return Some(kind);
    }
    TaskEnvelope::from_bytes(&delivery.data)
        .ok()
        .map(|envelope| envelope.kind)
}

fn settle(result: Result<bool, BrokerError>) {
    if let Err(error) = result {
        // The channel is gone; the broker redelivers the task by itself.
        tracing::warn!("could not settle a task of the old queue ({error})");
    }
}
