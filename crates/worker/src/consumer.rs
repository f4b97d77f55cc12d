//! The consume loop: connect, declare, `basic.qos`, consume; run each delivery; ack only after
//! its handler finished; reconnect when the broker goes away; drain on shutdown.

use std::{future::Future, sync::Arc, time::Duration};

use futures_util::{FutureExt, StreamExt};
use lapin::{
    Channel, Connection, Consumer,
    message::Delivery,
    options::{
        BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions,
        BasicQosOptions, BasicRejectOptions,
    },
    types::FieldTable,
};
use offload_common::{
    BrokerError, TaskEnvelope, Topology, TopologyError, envelope::delivery_count,
};
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::{Config, Registry, Task, handler::HandlerFuture};

/// Shortest and longest wait between reconnection attempts; the short cap means consuming
/// again within about a second of the broker's return.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(1);

/// The log target of every line about one task (started, completed, failed, dead-lettered,
/// not settled), so operators can filter them as a group:
/// `RUST_LOG=info,offload::task=warn` keeps failures and drops the two lines per success.
pub const TASK_LOG: &str = "offload::task";

/// Why the worker stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// The queues exist with other settings; retrying cannot fix it.
    #[error(transparent)]
    Topology(#[from] TopologyError),
}

/// Consumes until `shutdown` resolves, then stops taking deliveries, lets the tasks in hand
/// finish within `config.shutdown_grace`, and closes the connection. Tasks still running
/// after the grace period are not acked, so the broker requeues them.
///
/// The broker being unreachable is not an error: the worker keeps reconnecting with backoff.
pub async fn run(
    config: Config,
    registry: Registry,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), WorkerError> {
    let worker = Worker {
        topology: config.broker.topology(),
        registry: Arc::new(registry),
        tasks: TaskTracker::new(),
        config,
    };
    tracing::info!(
        broker = %worker.config.broker.redacted_url(),
        queue = worker.topology.queue(),
        prefetch = worker.config.prefetch,
        kinds = ?worker.registry.kinds(),
        "offload-worker starting"
    );
    let shutdown = std::pin::pin!(shutdown);
    worker.consume_until(shutdown).await
}

struct Worker {
    config: Config,
    topology: Topology,
    registry: Arc<Registry>,
    tasks: TaskTracker,
}

/// A live subscription.
struct Session {
    connection: Connection,
    channel: Channel,
    consumer: Consumer,
}

impl Worker {
    async fn consume_until(
        &self,
        mut shutdown: std::pin::Pin<&mut (impl Future<Output = ()> + Send)>,
    ) -> Result<(), WorkerError> {
        let mut backoff = BACKOFF_MIN;
        let mut first_attempt = true;
        loop {
            let session = tokio::select! {
                () = &mut shutdown => return Ok(()),
                opened = self.subscribe() => opened,
            };
            let session = match session {
                Ok(session) => session,
                Err(BrokerError::Topology(error @ TopologyError::Mismatch { .. }))
                    if first_attempt =>
                {
                    return Err(error.into());
                }
                Err(error) => {
                    first_attempt = false;
                    tracing::warn!(
                        "{error}; retrying in {}",
                        humantime::format_duration(backoff)
                    );
                    tokio::select! {
                        () = &mut shutdown => return Ok(()),
                        () = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                    continue;
                }
            };
            first_attempt = false;
            backoff = BACKOFF_MIN;
            tracing::info!(queue = self.topology.queue(), "consuming");
            let Session {
                connection,
                channel,
                mut consumer,
            } = session;
            loop {
                tokio::select! {
                    () = &mut shutdown => {
                        self.drain(&connection, &channel, &consumer).await;
                        return Ok(());
                    }
                    delivery = consumer.next() => match delivery {
                        Some(Ok(delivery)) => self.start(delivery),
                        Some(Err(error)) => {
                            tracing::warn!("lost the broker connection ({error}); reconnecting");
                            break;
                        }
                        None => {
                            tracing::warn!("the broker ended the subscription; reconnecting");
                            break;
                        }
                    }
                }
            }
            // Tasks already running keep running; their acks will fail and the broker will
            // redeliver them, which is the at-least-once promise.
            let _ = connection.close(320, "reconnecting".into()).await;
        }
    }

    async fn subscribe(&self) -> Result<Session, BrokerError> {
        let connection = self.config.broker.connect("offload-worker").await?;
        self.topology.declare(&connection).await?;
        let channel = connection.create_channel().await?;
        channel
            .basic_qos(self.config.prefetch, BasicQosOptions::default())
            .await?;
        let consumer = channel
            .basic_consume(
                self.topology.queue().into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        Ok(Session {
            connection,
            channel,
            consumer,
        })
    }

    /// Runs one delivery in the background; `basic.qos` bounds how many run at once.
    fn start(&self, delivery: Delivery) {
        let registry = Arc::clone(&self.registry);
        self.tasks
            .spawn(process(delivery, registry, self.config.handler_timeout));
    }

    async fn drain(&self, connection: &Connection, channel: &Channel, consumer: &Consumer) {
        // Stop the broker sending more; what it already sent is in `self.tasks` or will be
        // requeued when the channel closes.
        if let Err(error) = channel
            .basic_cancel(consumer.tag(), BasicCancelOptions::default())
            .await
        {
            tracing::warn!("could not cancel the subscription: {error}");
        }
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
        let _ = channel.close(200, "worker shutting down".into()).await;
        let _ = connection.close(200, "worker shutting down".into()).await;
        tracing::info!("offload-worker stopped");
    }
}

/// Decodes, runs and settles one delivery. Never panics, whatever the bytes or the handler do.
async fn process(delivery: Delivery, registry: Arc<Registry>, deadline: Duration) {
    let envelope = match TaskEnvelope::from_bytes(&delivery.data) {
        Ok(envelope) => envelope,
        Err(error) => {
            let message_id = delivery
                .properties
                .message_id()
                .as_ref()
                .map(ToString::to_string);
            tracing::warn!(target: TASK_LOG, ?message_id, "{error}; dead-lettering the message");
            settle(&delivery, Outcome::Reject).await;
            return;
        }
    };
    let task = Task::new(envelope, delivery_count(&delivery.properties));
    let span = tracing::info_span!("task", task_id = %task.id, kind = %task.kind);
    async move {
        let previous_deliveries = task.previous_deliveries;
        let running = match registry.dispatch(task) {
            Ok(running) => running,
            Err(task) => {
                tracing::warn!(
                    target: TASK_LOG,
                    known = ?registry.kinds(),
                    "no handler for kind '{}'; dead-lettering the task", task.kind
                );
                settle(&delivery, Outcome::Reject).await;
                return;
            }
        };
        tracing::info!(
            target: TASK_LOG,
            previous_deliveries,
            redelivered = delivery.redelivered,
            "task started"
        );
        let outcome = run_handler(running, deadline).await;
        settle(&delivery, outcome).await;
    }
    .instrument(span)
    .await;
}

/// Runs a handler to its end, its failure, its panic or its deadline.
async fn run_handler(running: HandlerFuture, deadline: Duration) -> Outcome {
    // Run in this delivery's own task, not one more spawned task: a spawn per delivery wakes
    // a parked runtime thread, which the benchmark showed to be a large share of a worker's
    // time. catch_unwind keeps a panicking handler from unwinding through the worker (the
    // handler's state is dropped with it, never looked at again); the timeout drops, and so
    // cancels, a handler past its deadline.
    let guarded = std::panic::AssertUnwindSafe(running).catch_unwind();
    let Ok(finished) = tokio::time::timeout(deadline, guarded).await else {
        tracing::warn!(
            target: TASK_LOG,
            deadline = %humantime::format_duration(deadline),
            "task ran past HANDLER_TIMEOUT; returning it to the queue for another attempt"
        );
        return Outcome::Requeue;
    };
    match finished {
        Ok(Ok(())) => {
            tracing::info!(target: TASK_LOG, "task completed");
            Outcome::Ack
        }
        Ok(Err(error)) if error.is_retryable() => {
            tracing::warn!(
                target: TASK_LOG,
                "task failed: {error}; returning it to the queue for another attempt"
            );
            Outcome::Requeue
        }
        Ok(Err(error)) => {
            tracing::warn!(target: TASK_LOG, "task failed permanently: {error}; dead-lettering it");
            Outcome::Reject
        }
        Err(panic) => {
            tracing::error!(
                target: TASK_LOG,
                "handler panicked: {}; returning the task to the queue",
                offload_common::telemetry::panic_message(panic.as_ref())
            );
            Outcome::Requeue
        }
    }
}

enum Outcome {
    /// Done: remove it from the queue.
    Ack,
    /// Failed: deliver it again (the quorum queue counts attempts and dead-letters at the limit).
    Requeue,
    /// Cannot ever succeed: dead-letter it now.
    Reject,
}

async fn settle(delivery: &Delivery, outcome: Outcome) {
    let acker = &delivery.acker;
    let result = match outcome {
        Outcome::Ack => acker.ack(BasicAckOptions::default()).await,
        Outcome::Requeue => {
            acker
                .nack(BasicNackOptions {
                    requeue: true,
                    ..BasicNackOptions::default()
                })
                .await
        }
        Outcome::Reject => acker.reject(BasicRejectOptions { requeue: false }).await,
    };
    if let Err(error) = result {
        // The channel is gone; the broker requeues the delivery by itself.
        tracing::warn!(
            target: TASK_LOG,
            "could not settle the delivery ({error}); the broker will redeliver it"
        );
    }
}
