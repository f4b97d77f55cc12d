//! The consume loops: one per kind the worker runs, each on its kind's queue with a
//! subscription (and so a channel and a prefetch) of its own, at most the kind's concurrency in
//! hand, each delivery run in a task of its own. A kind's loop stops consuming while the kind is
//! paused. On shutdown every loop stops taking more, and the worker drains.

use std::{future::Future, sync::Arc};

use lapin::message::Delivery;
use offload_common::{Broker, Delivered, Event, EventType, Subscription, Supervisor};
use tokio::{
    sync::{OwnedSemaphorePermit, Semaphore},
    task::JoinSet,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    Config, WorkerError,
    acks::Acks,
    attempt::{Context, process},
    forward::Forwarder,
    metrics::KindState,
    settle::{Held, Taken},
};

/// The worker's kinds' loops, and the tasks they have in hand.
pub(crate) struct ConsumeLoop {
    pub(crate) config: Config,
    pub(crate) broker: Broker,
    pub(crate) context: Arc<Context>,
    /// Every task in hand, whatever its kind: a graceful shutdown waits for them.
    pub(crate) tasks: TaskTracker,
    /// Each kind and how many of its tasks the worker holds at once.
    pub(crate) kinds: Vec<(String, u16)>,
}

impl ConsumeLoop {
    /// Consumes until `shutdown` resolves (then drains: `Ok`), or until the broker session
    /// ends with an error retrying cannot fix, or panics.
    pub(crate) async fn run_until(
        self,
        shutdown: impl Future<Output = ()> + Send,
        supervisor: &mut Supervisor,
    ) -> Result<(), WorkerError> {
        let stop = CancellationToken::new();
        let mut loops = JoinSet::new();
        for (kind, concurrency) in &self.kinds {
            let kind_loop = KindLoop {
                queue: self.broker.topology().kind_queue(kind),
                gate: self.broker.topology().gate(kind),
                kind: kind.clone(),
                concurrency: *concurrency,
                broker: self.broker.clone(),
                context: Arc::clone(&self.context),
                tasks: self.tasks.clone(),
            };
            loops.spawn(kind_loop.run(stop.clone()));
        }
        let forwarder = tokio::spawn(Forwarder::new(self.broker.clone()).run(stop.clone()));
        let cancels = tokio::spawn(Arc::clone(&self.context.cancels).follow(
            self.broker.clone(),
            self.context.events.clone(),
            Arc::clone(&self.context.worker),
            stop.clone(),
        ));
        let ended = tokio::select! {
            () = shutdown => Ok(()),
            ended = &mut *supervisor => ended.map_err(WorkerError::from),
            // A kind's loop ends only when stopped; ending otherwise, it panicked.
            Some(joined) = loops.join_next() => Err(WorkerError::Broker(
                offload_common::BrokerError::SessionPanicked(match joined {
                    Ok(_) => "a kind's consume loop ended".to_owned(),
                    Err(error) => error.to_string(),
                }),
            )),
        };
        stop.cancel();
        let _ = forwarder.await;
        let _ = cancels.await;
        let mut subscriptions = Vec::new();
        while let Some(joined) = loops.join_next().await {
            if let Ok(subscription) = joined {
                subscriptions.push(subscription);
            }
        }
        if ended.is_ok() {
            self.drain().await;
        }
        for mut subscription in subscriptions {
            subscription.close("worker shutting down").await;
        }
        if ended.is_ok() {
            tracing::info!("offload-worker stopped");
        }
        ended
    }

    /// Waits for the tasks in hand, at most SHUTDOWN_GRACE; the broker sends nothing more.
    async fn drain(&self) {
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
    }
}

/// How long a kind's loop waits before trying a failed barrier again.
const BARRIER_RETRY: std::time::Duration = std::time::Duration::from_secs(1);

/// One kind's subscription and its bound on tasks in hand.
struct KindLoop {
    kind: String,
    queue: String,
    gate: String,
    concurrency: u16,
    broker: Broker,
    context: Arc<Context>,
    tasks: TaskTracker,
}

impl KindLoop {
    /// Consumes the kind's queue until `stop`; then asks the broker to send no more, and
    /// returns the subscription, whose channel the deliveries in hand are settled on.
    async fn run(self, stop: CancellationToken) -> Subscription {
        let mut subscription = self
            .broker
            .subscribe(&self.queue, self.concurrency)
            .gated(&self.gate);
        // The worker's own bound on tasks in hand, whatever the broker sends: RabbitMQ 3.8 to
        // 3.10 grant a consumer an extra credit for each task dead-lettered at its delivery
        // limit (rabbitmq-server PR #5609), and after a reconnect the old connection's tasks
        // still run while the new one receives a fresh window.
        let permits = Arc::new(Semaphore::new(usize::from(self.concurrency)));
        // Delivery tags are per channel: a fresh subscription gets fresh acks, and a tracker
        // of its own deliveries, so that a paused subscription's channel closes once they
        // are settled.
        let mut acks = Acks::default();
        let mut on_channel = TaskTracker::new();
        let mut subscriptions = 0_u64;
        // A subscription made again after a pause is no reconnection.
        let mut resuming = false;
        // Counted among the kind's consumers that a cancel must hear from, while subscribed.
        let mut _subscribed = None;
        loop {
            // A permit first, then a delivery: never more than the kind's concurrency in hand.
            let permit = tokio::select! {
                () = stop.cancelled() => break,
                permit = Arc::clone(&permits).acquire_owned() => {
                    permit.expect("the permit semaphore is never closed")
                }
            };
            let delivery = loop {
                let delivered = tokio::select! {
                    () = stop.cancelled() => None,
                    delivered = subscription.next() => Some(delivered),
                };
                let Some(delivered) = delivered else {
                    subscription.cancel().await;
                    self.context
                        .metrics
                        .kind_state(&self.kind, KindState::Connecting);
                    return subscription;
                };
                match delivered {
                    Delivered::Message(delivery) => break delivery,
                    Delivered::Subscribed => {
                        _subscribed = Some(self.context.cancels.subscribed(&self.kind));
                        // Nothing starts before every cancel written so far is known.
                        if !self.barrier(&stop).await {
                            continue;
                        }
                        acks = Acks::default();
                        on_channel = TaskTracker::new();
                        subscriptions += 1;
                        if subscriptions > 1 && !resuming {
                            self.context.metrics.reconnected(&self.kind);
                        }
                        resuming = false;
                        self.subscribed();
                    }
                    Delivered::Lost(reason) => {
                        _subscribed = None;
                        // Tasks already running keep running (and keep their permits); if
                        // their channel is gone their acks fail and the broker redelivers
                        // them: the at-least-once promise.
                        self.context
                            .metrics
                            .kind_state(&self.kind, KindState::Connecting);
                        tracing::warn!(
                            kind = %self.kind,
                            "lost the subscription ({reason}); subscribing again"
                        );
                    }
                    Delivered::Paused(retired) => {
                        _subscribed = None;
                        resuming = true;
                        self.context
                            .metrics
                            .kind_state(&self.kind, KindState::Paused);
                        self.announce();
                        tracing::info!(kind = %self.kind, "the kind is paused: consuming none of its tasks until it is resumed");
                        if let Some(retired) = retired {
                            let in_hand = std::mem::take(&mut on_channel);
                            in_hand.close();
                            tokio::spawn(async move {
                                in_hand.wait().await;
                                retired.close().await;
                            });
                        }
                    }
                }
            };
            self.start(delivery, &acks, permit, &on_channel);
        }
        subscription.cancel().await;
        self.context
            .metrics
            .kind_state(&self.kind, KindState::Connecting);
        subscription
    }

    /// Reads the control stream up to a marker written now, trying again until it can or
    /// `stop`; `false` if stopped first.
    async fn barrier(&self, stop: &CancellationToken) -> bool {
        loop {
            let read = tokio::select! {
                () = stop.cancelled() => return false,
                read = self.context.cancels.barrier(&self.broker) => read,
            };
            match read {
                Ok(()) => return true,
                Err(problem) => {
                    tracing::warn!(kind = %self.kind, "{problem}; not starting tasks until it can");
                    tokio::select! {
                        () = stop.cancelled() => return false,
                        () = tokio::time::sleep(BARRIER_RETRY) => {}
                    }
                }
            }
        }
    }

    /// Says so, in the log, the metrics and (with events on) a `worker` event.
    fn subscribed(&self) {
        self.context
            .metrics
            .kind_state(&self.kind, KindState::Consuming);
        tracing::info!(queue = %self.queue, kind = %self.kind, concurrency = self.concurrency, "consuming");
        self.announce();
    }

    /// With events on, a `worker` event: this worker runs the kind (consuming it or paused),
    /// so that gateways list it.
    fn announce(&self) {
        if let Some(events) = &self.context.events {
            let mut announce = Event::new(EventType::Worker);
            announce.worker = Some(self.context.worker.to_string());
            announce.kinds = Some(vec![self.kind.clone()]);
            events.emit(announce);
        }
    }

    /// Runs one delivery in the background, holding `permit` until it is settled.
    fn start(
        &self,
        delivery: Delivery,
        acks: &Acks,
        permit: OwnedSemaphorePermit,
        on_channel: &TaskTracker,
    ) {
        acks.taken(delivery.delivery_tag);
        let taken = Taken {
            settle: acks.settle(&delivery),
            held: Held {
                _permit: permit,
                _in_hand: self.context.metrics.hold(&self.kind),
                _tracked: self.tasks.token(),
                _on_channel: on_channel.token(),
                claim: None,
            },
        };
        let context = Arc::clone(&self.context);
        tokio::spawn(async move { process(&delivery, taken, context).await });
    }
}
