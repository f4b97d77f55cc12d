//! The consume loop: take deliveries from the work queue's subscription, at most PREFETCH in
//! hand, run each in a task of its own, and on shutdown stop taking more and drain.

use std::{future::Future, sync::Arc};

use lapin::message::Delivery;
use offload_common::{Broker, Delivered, Event, EventType, Subscription, Supervisor};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::task::TaskTracker;

use crate::{
    Config, WorkerError,
    acks::Acks,
    attempt::{Context, process},
    settle::{Held, Taken},
};

/// One worker's subscription to its work queue, and the tasks it has in hand.
pub(crate) struct ConsumeLoop {
    pub(crate) config: Config,
    pub(crate) broker: Broker,
    pub(crate) context: Arc<Context>,
    pub(crate) tasks: TaskTracker,
    /// The worker's own bound on tasks in hand, whatever the broker sends: RabbitMQ 3.8 to
    /// 3.10 grant a consumer an extra credit for each task dead-lettered at its delivery
    /// limit (rabbitmq-server PR #5609), and after a reconnect the old connection's tasks
    /// still run while the new one receives a fresh window.
    pub(crate) permits: Arc<Semaphore>,
}

impl ConsumeLoop {
    /// Consumes until `shutdown` resolves (then drains: `Ok`), or until the broker session
    /// ends with an error retrying cannot fix, or panics.
    pub(crate) async fn run_until(
        self,
        shutdown: impl Future<Output = ()> + Send,
        supervisor: &mut Supervisor,
    ) -> Result<(), WorkerError> {
        let mut shutdown = std::pin::pin!(shutdown);
        let mut subscription = self
            .broker
            .subscribe(self.broker.topology().queue(), self.config.prefetch);
        // Delivery tags are per channel: a fresh subscription gets fresh acks.
        let mut acks = Acks::default();
        let mut subscriptions = 0_u64;
        loop {
            // A permit first, then a delivery: never more than PREFETCH tasks in hand.
            let permit = tokio::select! {
                () = &mut shutdown => {
                    self.drain(&mut subscription).await;
                    return Ok(());
                }
                ended = &mut *supervisor => return ended.map_err(Into::into),
                permit = Arc::clone(&self.permits).acquire_owned() => {
                    permit.expect("the permit semaphore is never closed")
                }
            };
            let delivery = loop {
                let delivered = tokio::select! {
                    () = &mut shutdown => {
                        self.drain(&mut subscription).await;
                        return Ok(());
                    }
                    ended = &mut *supervisor => return ended.map_err(Into::into),
                    delivered = subscription.next() => delivered,
                };
                match delivered {
                    Delivered::Message(delivery) => break delivery,
                    Delivered::Subscribed => {
                        acks = Acks::default();
                        subscriptions += 1;
                        if subscriptions > 1 {
                            self.context.metrics.reconnected();
                        }
                        self.subscribed();
                    }
                    Delivered::Lost(reason) => {
                        // Tasks already running keep running (and keep their permits); if
                        // their channel is gone their acks fail and the broker redelivers
                        // them: the at-least-once promise.
                        self.context.metrics.consuming(false);
                        tracing::warn!("lost the subscription ({reason}); subscribing again");
                    }
                }
            };
            self.start(delivery, &acks, permit);
        }
    }

    /// Says so, in the log, the metrics and (with events on) a `worker` event.
    fn subscribed(&self) {
        self.context.metrics.consuming(true);
        tracing::info!(queue = self.broker.topology().queue(), "consuming");
        if let Some(events) = &self.context.events {
            let mut announce = Event::new(EventType::Worker);
            announce.worker = Some(self.context.worker.to_string());
            announce.kinds = Some(
                self.context
                    .registry
                    .kinds()
                    .iter()
                    .map(|kind| (*kind).to_owned())
                    .collect(),
            );
            events.emit(announce);
        }
    }

    /// Runs one delivery in the background, holding `permit` until it is settled.
    fn start(&self, delivery: Delivery, acks: &Acks, permit: OwnedSemaphorePermit) {
        acks.taken(delivery.delivery_tag);
        let taken = Taken {
            settle: acks.settle(&delivery),
            held: Held {
                _permit: permit,
                _in_hand: self.context.metrics.hold(),
                _tracked: self.tasks.token(),
            },
        };
        let context = Arc::clone(&self.context);
        tokio::spawn(async move { process(&delivery, taken, context).await });
    }

    async fn drain(&self, subscription: &mut Subscription) {
        self.context.metrics.consuming(false);
        // Stop the broker sending more; what it already sent is in `self.tasks` or will be
        // requeued when the channel closes.
        subscription.cancel().await;
        self.tasks.close();
        let grace = self.config.shutdown_grace;
        tracing::info!(
            in_hand = self.tasks.len(),
            grace = %humantime::format_duration(grace),
            "draining: waiting for the tasks in hand to finish"
        );
        if tokio::time::timeout(grace, self.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                unfinished = self.tasks.len(),
                "grace period over; unfinished tasks go back to the queue"
            );
        }
        subscription.close("worker shutting down").await;
        tracing::info!("offload-worker stopped");
    }
}
