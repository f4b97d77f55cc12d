//! Settling a delivery once its attempt is decided: publish the attempt's event (confirmed
//! before the task leaves the queue), move a copy where it goes next (the delay levels, the
//! dead-letter queue), then ack, requeue or reject it, and count the outcome.

use std::{sync::Arc, time::Duration};

use lapin::{
    message::Delivery,
    options::BasicRejectOptions,
    types::{FieldTable, ShortString},
};
use offload_common::{
    DeadReason, Event, EventType, Message, PublishError, Returns, envelope::copy_properties,
};
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::task::task_tracker::TaskTrackerToken;
use tracing::Instrument;

use crate::{
    TASK_LOG,
    acks::Settle,
    attempt::Context,
    metrics::{self, Metrics},
};

/// A delivery in hand: how to settle it, and what it holds until it is settled.
pub(crate) struct Taken {
    pub(crate) settle: Settle,
    pub(crate) held: Held,
}

/// Held from a delivery's arrival until its settling frame is sent, which may be after its
/// task has ended (an ack handed to the events sink).
pub(crate) struct Held {
    /// Its place among its kind's tasks in hand.
    pub(crate) _permit: OwnedSemaphorePermit,
    /// Counted in the `in_hand` gauge.
    pub(crate) _in_hand: metrics::InHand,
    /// A graceful shutdown waits for it.
    pub(crate) _tracked: TaskTrackerToken,
    /// A paused subscription's channel stays open until its deliveries are settled.
    pub(crate) _on_channel: TaskTrackerToken,
    /// The task among those a cancel can reach, once it is decided that it runs.
    pub(crate) claim: Option<crate::cancels::Claim>,
}

/// How a delivery is settled.
pub(crate) enum Outcome {
    /// Done: remove it from the queue.
    Ack,
    /// Deliver it again now (the quorum queue counts these deliveries and dead-letters past
    /// its limit).
    Requeue,
    /// Publish a copy elsewhere (the delay levels, the dead-letter queue) and, once the broker
    /// has confirmed it, ack this one.
    Move(Move),
}

/// Where a copy of the delivery goes.
pub(crate) struct Move {
    pub(crate) exchange: ShortString,
    pub(crate) routing_key: ShortString,
    /// Set on the copy, over the original's own headers.
    pub(crate) headers: FieldTable,
    /// What to do if the copy is not confirmed.
    pub(crate) otherwise: InPlace,
}

/// Settling a delivery without a copy: the fallback when a copy is not confirmed.
#[derive(Clone, Copy)]
pub(crate) enum InPlace {
    /// Deliver it again now.
    Requeue,
    /// Dead-letter it through the broker (`x-death` says only `rejected`).
    Reject,
}

/// Counts how an attempt ended, once its event is on the stream (or events are off).
fn count(
    metrics: &Metrics,
    (event, kind, reason): (EventType, Option<String>, Option<DeadReason>),
) {
    let kind = kind.as_deref().unwrap_or("other");
    match (event, reason) {
        (EventType::Succeeded, _) => metrics.succeeded(kind),
        (EventType::Failed, _) => metrics.retried(kind),
        (EventType::Dead, Some(reason)) => metrics.dead(kind, reason.as_str()),
        (EventType::Cancelled, _) => metrics.cancelled(kind),
        (EventType::Expired, _) => metrics.expired(kind),
        _ => {}
    }
}

/// How long a worker waits for the broker to confirm a copy.
const COPY_CONFIRM_TIMEOUT: Duration = Duration::from_secs(10);

/// Publishes a copy of `delivery` as `to` says and waits for the broker's confirm.
async fn publish_copy(
    delivery: &Delivery,
    context: &Context,
    to: &Move,
) -> Result<(), PublishError> {
    let properties = copy_properties(&delivery.properties, |_| false, &to.headers);
    let message = Message {
        exchange: to.exchange.clone(),
        routing_key: to.routing_key.clone(),
        body: &delivery.data,
        properties,
        // The delay levels and the dead-letter queue are ours: a return means they are gone.
        returns: Returns::TopologyGone,
    };
    context
        .broker
        .publish_confirmed(message, COPY_CONFIRM_TIMEOUT)
        .await
}

/// Publishes the attempt's `event`, and settles the delivery only once the broker has
/// confirmed it: a status that says `running` therefore always means the task has not
/// finished. An event the broker did not confirm turns the outcome into a requeue, so the task
/// runs again (at least once) rather than end without a word on the stream. An ack with
/// events on is left to the events sink, and this returns before it is sent.
pub(crate) async fn settle(
    delivery: &Delivery,
    Taken { settle, held }: Taken,
    context: &Arc<Context>,
    outcome: Outcome,
    event: Event,
) {
    let counted = (event.event, event.kind.clone(), event.reason);
    let outcome = match &context.events {
        Some(events) if matches!(outcome, Outcome::Ack) => {
            // The common case. Rather than wait for the confirm here, hand the ack to the
            // events sink: its confirm settles the whole batch's tasks at once, in as few
            // frames as the fold allows, and this task ends now. Its permit, gauge and
            // shutdown token go with the ack, so none is released before the frame is sent.
            let context = Arc::clone(context);
            let span = tracing::Span::current();
            events
                .emit_then(event, move |published| {
                    if published {
                        count(&context.metrics, counted);
                        settle.ack_then(move |sent| {
                            if let Err(error) = sent {
                                span.in_scope(|| not_settled(&error));
                            }
                            drop(held);
                        });
                    } else {
                        tokio::spawn(
                            async move {
                                not_confirmed();
                                let requeued =
                                    settle.reject(BasicRejectOptions { requeue: true }).await;
                                if let Err(error) = requeued {
                                    not_settled(&error);
                                }
                                drop(held);
                            }
                            .instrument(span),
                        );
                    }
                })
                .await;
            return;
        }
        Some(events) if !events.emit_confirmed(event).await => {
            not_confirmed();
            Outcome::Requeue
        }
        _ => {
            count(&context.metrics, counted);
            outcome
        }
    };
    let in_place = match outcome {
        Outcome::Ack => None,
        Outcome::Requeue => Some(InPlace::Requeue),
        Outcome::Move(to) => match publish_copy(delivery, context, &to).await {
            Ok(()) => None,
            Err(error) => {
                let target = if to.exchange.as_str().is_empty() {
                    to.routing_key.as_str()
                } else {
                    to.exchange.as_str()
                };
                tracing::warn!(
                    target: TASK_LOG,
                    "could not move the task to {target} ({error}); settling it in place"
                );
                Some(to.otherwise)
            }
        },
    };
    let result = match in_place {
        None => settle.ack().await,
        // reject, not nack: from RabbitMQ 4.3 a nack no longer counts toward a quorum queue's
        // delivery limit, so a task that always fails would be retried forever.
        Some(InPlace::Requeue) => settle.reject(BasicRejectOptions { requeue: true }).await,
        Some(InPlace::Reject) => settle.reject(BasicRejectOptions { requeue: false }).await,
    };
    if let Err(error) = result {
        not_settled(&error);
    }
    drop(held);
}

/// Logs, within the task's span, that its event was not confirmed.
fn not_confirmed() {
    tracing::warn!(
        target: TASK_LOG,
        "the task's event was not confirmed by the broker; returning the task to the queue"
    );
}

/// Logs, within the task's span, that its settling frame could not be sent.
fn not_settled(error: &lapin::Error) {
    // The channel is gone; the broker requeues the delivery by itself.
    tracing::warn!(
        target: TASK_LOG,
        "could not settle the delivery ({error}); the broker will redeliver it"
    );
}
