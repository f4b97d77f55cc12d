//! The consume loop: on the broker session's connection, `basic.qos` and consume; run each
//! delivery; settle it only after its handler finished; subscribe again when the broker goes
//! away; drain on shutdown.

use std::{
    future::Future,
    sync::Arc,
    time::{Duration, SystemTime},
};

use futures_util::{FutureExt, StreamExt};
use lapin::{
    Channel, Confirmation, Consumer,
    message::Delivery,
    options::{
        BasicCancelOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
        BasicRejectOptions,
    },
    types::{AMQPValue, FieldTable, LongString, ShortString},
};
use offload_common::{
    Broker, BrokerError, DeadReason, DecodeError, Event, EventSink, EventType, TaskEnvelope,
    Topology,
    broker::session::{Supervisor, backoff},
    envelope::{ATTEMPT_HEADER, copy_properties, delivery_count, first_attempt},
    topology::{delay_in_levels, delay_routing_key},
};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::{
    sync::CancellationToken,
    task::{TaskTracker, task_tracker::TaskTrackerToken},
};
use tracing::Instrument;

use crate::{
    Config, Registry, RetryPolicy, Task,
    acks::{Acks, Settle},
    handler::{Completed, HandlerFuture},
    metrics::{self, Metrics},
};

/// The log target of every line about one task (started, completed, failed, dead-lettered,
/// not settled), so operators can filter them as a group:
/// `RUST_LOG=info,offload::task=warn` keeps failures and drops the two lines per success.
pub const TASK_LOG: &str = "offload::task";

/// Why the worker stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// The settings are unusable, or the queues exist with other settings: retrying cannot
    /// fix it.
    #[error(transparent)]
    Broker(#[from] BrokerError),
    /// TARGETS, TARGETS_FILE or the signing secret is unusable.
    #[error(transparent)]
    Targets(#[from] crate::TargetsError),
    /// HTTP_BIND cannot be listened on.
    #[error("cannot listen on HTTP_BIND {addr}: {source}")]
    Listen {
        /// The address.
        addr: std::net::SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
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
    let session_shutdown = CancellationToken::new();
    let registry = config.targets.register(registry)?;
    // Binding its kinds registers them: the gateway accepts tasks of a kind some worker bound.
    let topology = config.broker.topology().with_kinds(registry.kinds());
    if config.declare_only {
        return declare_only(&config, &topology).await;
    }
    let (broker, supervisor) = Broker::start(
        &config.broker,
        topology,
        "offload-worker",
        session_shutdown.clone(),
    )
    .await?;
    let events = config.broker.events.then(|| {
        let stream = topology_stream(&broker);
        EventSink::start(broker.clone(), stream).0
    });
    let kinds: Vec<String> = registry.kinds().into_iter().map(str::to_owned).collect();
    let metrics = Arc::new(Metrics::new(registry.kinds()));
    let listener_stop = CancellationToken::new();
    // Dropped on every way out of `run`, so the listener stops with the worker.
    let _listener_stop = listener_stop.clone().drop_guard();
    if let Some(bind) = config.http_bind {
        metrics::serve(bind, Arc::clone(&metrics), listener_stop)
            .await
            .map_err(|source| WorkerError::Listen { addr: bind, source })?;
    }
    let context = Arc::new(Context {
        registry: Arc::new(registry),
        deadline: config.handler_timeout,
        events,
        worker: worker_name().into(),
        delivery_limit: u64::from(config.broker.delivery_limit),
        result_max_bytes: config.result_max_bytes,
        policy: config.retry_policy(),
        delay_exchange: broker.topology().delay_exchange().into(),
        dead_queue: broker.topology().dead_letter_queue().into(),
        broker: broker.clone(),
        metrics,
    });
    let worker = Worker {
        broker,
        context,
        tasks: TaskTracker::new(),
        // The worker's own bound on tasks in hand, whatever the broker sends: RabbitMQ 3.8 to
        // 3.10 grant a consumer an extra credit for each task dead-lettered at its delivery
        // limit (rabbitmq-server PR #5609), and after a reconnect the old connection's tasks
        // still run while the new one receives a fresh window.
        permits: Arc::new(Semaphore::new(usize::from(config.prefetch))),
        config,
    };
    tracing::info!(
        queue = worker.broker.topology().queue(),
        prefetch = worker.config.prefetch,
        kinds = ?kinds,
        "offload-worker starting"
    );
    let mut supervisor = supervisor;
    let result = worker.consume_until(shutdown, &mut supervisor).await;
    // Close the connection cleanly before the process exits (unless the session has ended
    // already, and its handle been polled to its end).
    session_shutdown.cancel();
    if !supervisor.is_finished() {
        let _ = supervisor.await;
    }
    result
}

struct Worker {
    config: Config,
    broker: Broker,
    context: Arc<Context>,
    tasks: TaskTracker,
    permits: Arc<Semaphore>,
}

impl Worker {
    async fn consume_until(
        mut self,
        shutdown: impl Future<Output = ()> + Send,
        supervisor: &mut Supervisor,
    ) -> Result<(), WorkerError> {
        let mut shutdown = std::pin::pin!(shutdown);
        let mut delays = backoff();
        let mut subscriptions = 0_u64;
        loop {
            let link = tokio::select! {
                () = &mut shutdown => return Ok(()),
                ended = &mut *supervisor => return fatal(ended),
                link = self.broker.connected() => link,
            };
            let subscribed = self
                .broker
                .within("the subscription", self.subscribe(link.connection()))
                .await;
            let (channel, mut consumer) = match subscribed {
                Ok(subscribed) => subscribed,
                Err(error) => {
                    tracing::warn!("cannot subscribe ({error}); retrying");
                    // The queue may be gone: have the session check.
                    self.broker.check_topology();
                    tokio::select! {
                        () = &mut shutdown => return Ok(()),
                        () = tokio::time::sleep(delays.next().unwrap_or(Duration::from_secs(1))) => {}
                    }
                    continue;
                }
            };
            delays = backoff();
            let acks = Acks::default();
            subscriptions += 1;
            if subscriptions > 1 {
                self.context.metrics.reconnected();
            }
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
                        .map(|k| (*k).to_owned())
                        .collect(),
                );
                events.emit(announce);
            }
            loop {
                // A permit first, then a delivery: never more than PREFETCH tasks in hand.
                let permit = tokio::select! {
                    () = &mut shutdown => {
                        self.drain(&channel, &consumer).await;
                        return Ok(());
                    }
                    permit = Arc::clone(&self.permits).acquire_owned() => {
                        permit.expect("the permit semaphore is never closed")
                    }
                };
                tokio::select! {
                    () = &mut shutdown => {
                        self.drain(&channel, &consumer).await;
                        return Ok(());
                    }
                    delivery = consumer.next() => match delivery {
                        Some(Ok(delivery)) => self.start(delivery, &acks, permit),
                        Some(Err(error)) => {
                            tracing::warn!("lost the subscription ({error}); subscribing again");
                            break;
                        }
                        None => {
                            // What deleting the queue does to its consumers, among others.
                            tracing::warn!("the broker cancelled the subscription; subscribing again");
                            self.broker.check_topology();
                            break;
                        }
                    }
                }
            }
            self.context.metrics.consuming(false);
            // Tasks already running keep running (and keep their permits); if the channel is
            // gone their acks fail and the broker redelivers them: the at-least-once promise.
            let _ = self
                .broker
                .within(
                    "closing the channel",
                    channel.close(200, "subscribing again".into()),
                )
                .await;
        }
    }

    async fn subscribe(
        &self,
        connection: &lapin::Connection,
    ) -> Result<(Channel, Consumer), lapin::Error> {
        let channel = connection.create_channel().await?;
        channel
            .basic_qos(self.config.prefetch, BasicQosOptions::default())
            .await?;
        let consumer = channel
            .basic_consume(
                self.broker.topology().queue().into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        Ok((channel, consumer))
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

    async fn drain(&self, channel: &Channel, consumer: &Consumer) {
        self.context.metrics.consuming(false);
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
        tracing::info!("offload-worker stopped");
    }
}

/// The events stream's name; the topology has one whenever events are on.
fn topology_stream(broker: &Broker) -> String {
    broker
        .topology()
        .events_stream()
        .expect("EVENTS=on declares the events stream")
}

/// `<host>-<pid>`: which worker, in events.
fn worker_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map_or_else(|_| "worker".to_owned(), |name| name.trim().to_owned());
    format!("{host}-{}", std::process::id())
}

/// `--declare-only`: declare the topology with this worker's kinds, and stop.
async fn declare_only(config: &Config, topology: &Topology) -> Result<(), WorkerError> {
    let (connection, url) = config
        .broker
        .connector()?
        .connect("offload-worker --declare-only")
        .await?;
    let declared = topology.declare(&connection).await;
    let _ = connection.close(200, "declared".into()).await;
    declared.map_err(BrokerError::from)?;
    tracing::info!(broker = %url, queue = topology.queue(), kinds = ?topology.kinds(), "declared the queues and bound the kinds");
    Ok(())
}

/// The session ended before shutdown: only an error retrying cannot fix does that.
fn fatal(
    ended: Result<Result<(), BrokerError>, tokio::task::JoinError>,
) -> Result<(), WorkerError> {
    match ended {
        Ok(Err(error)) => Err(error.into()),
        Ok(Ok(())) | Err(_) => Ok(()),
    }
}

/// A delivery in hand: how to settle it, and what it holds until it is settled.
struct Taken {
    settle: Settle,
    held: Held,
}

/// Held from a delivery's arrival until its settling frame is sent, which may be after its
/// task has ended (an ack handed to the events sink).
struct Held {
    /// Its place among the PREFETCH tasks in hand.
    _permit: OwnedSemaphorePermit,
    /// Counted in the `in_hand` gauge.
    _in_hand: metrics::InHand,
    /// A graceful shutdown waits for it.
    _tracked: TaskTrackerToken,
}

/// What every delivery's processing needs, shared by all of them.
struct Context {
    registry: Arc<Registry>,
    deadline: Duration,
    /// `None` with EVENTS=off.
    events: Option<EventSink>,
    /// `<host>-<pid>`, in `started` and `worker` events.
    worker: Arc<str>,
    delivery_limit: u64,
    result_max_bytes: usize,
    /// Every kind's retry policy, unless its handler has its own.
    policy: RetryPolicy,
    /// Where a task waiting for its next attempt is published.
    delay_exchange: ShortString,
    /// `<QUEUE>.dead`, where offload itself moves a task that will not run again.
    dead_queue: ShortString,
    /// The session, to publish those copies on.
    broker: Broker,
    metrics: Arc<Metrics>,
}

/// Decodes, runs and settles one delivery. Never panics, whatever the bytes or the handler do.
async fn process(delivery: &Delivery, taken: Taken, context: Arc<Context>) {
    let envelope = match TaskEnvelope::from_bytes(&delivery.data) {
        Ok(envelope) => envelope,
        Err(error) => return undecodable(delivery, taken, &context, &error).await,
    };
    let previous_deliveries = delivery_count(&delivery.properties);
    // The attempt this copy started with, plus the broker's redeliveries of it (crashes,
    // lost connections).
    let attempt = first_attempt(&delivery.properties)
        .saturating_add(u32::try_from(previous_deliveries).unwrap_or(u32::MAX));
    let task = Task::new(envelope, previous_deliveries, attempt);
    let span = tracing::info_span!("task", task_id = %task.id, kind = %task.kind);
    offload_common::trace::continue_in_worker(
        &span,
        &delivery.properties,
        task.submitted_at,
        attempt,
    );
    async move {
        let (id, kind) = (task.id, task.kind.clone());
        let event = |event_type| {
            let mut event = Event::task(event_type, id, &kind);
            event.attempt = Some(u64::from(attempt));
            event
        };
        let policy = context.registry.policy(&kind).unwrap_or(context.policy);
        let running = match context.registry.dispatch(task, context.result_max_bytes) {
            Ok(running) => running,
            Err(task) => {
                tracing::warn!(
                    target: TASK_LOG,
                    known = ?context.registry.kinds(),
                    "no handler for kind '{}'; dead-lettering the task", task.kind
                );
                let mut dead = event(EventType::Dead);
                dead.reason = Some(DeadReason::NoHandler);
                dead.error = Some(format!(
                    "this worker has no handler for kind '{}'",
                    task.kind
                ));
                let outcome = to_dead(&context, &dead, attempt);
                settle(delivery, taken, &context, outcome, dead).await;
                return;
            }
        };
        tracing::info!(
            target: TASK_LOG,
            previous_deliveries,
            redelivered = delivery.redelivered,
            "task started"
        );
        context.metrics.started(&kind, previous_deliveries > 0);
        if let Some(events) = &context.events {
            let mut started = event(EventType::Started);
            started.worker = Some(context.worker.to_string());
            events.emit(started);
        }
        let began = std::time::Instant::now();
        let ran = run_handler(running, context.deadline).await;
        context.metrics.ran(&kind, began.elapsed());
        let mut terminal = match ran {
            Ran::Succeeded(completed) => {
                let mut succeeded = event(EventType::Succeeded);
                succeeded.duration_ms =
                    Some(u64::try_from(began.elapsed().as_millis()).unwrap_or(u64::MAX));
                (succeeded.result, succeeded.error) = (completed.result, completed.note);
                (Outcome::Ack, succeeded)
            }
            // The backstop for tasks that crash their worker: the broker dead-letters a task
            // requeued on its last allowed delivery.
            Ran::Failed(error, _) if previous_deliveries >= context.delivery_limit => {
                let mut dead = event(EventType::Dead);
                dead.reason = Some(DeadReason::DeliveryLimit);
                dead.error = Some(error);
                (Outcome::Requeue, dead)
            }
            Ran::Failed(error, _) if policy.is_last(attempt) => {
                let mut dead = event(EventType::Dead);
                dead.reason = Some(DeadReason::MaxAttempts);
                dead.error = Some(error);
                (to_dead(&context, &dead, attempt), dead)
            }
            Ran::Failed(error, asked) => {
                let delay = delay_in_levels(
                    asked.unwrap_or_else(|| policy.delay_after(attempt, fastrand::f64())),
                );
                let mut failed = event(EventType::Failed);
                failed.error = Some(error);
                let later = retry_later(&context, delivery, attempt, delay, &mut failed);
                (later, failed)
            }
            Ran::Rejected(error) => {
                let mut dead = event(EventType::Dead);
                dead.reason = Some(DeadReason::Rejected);
                dead.error = Some(error);
                (to_dead(&context, &dead, attempt), dead)
            }
        };
        terminal.1.at = std::time::SystemTime::now();
        settle(delivery, taken, &context, terminal.0, terminal.1).await;
    }
    .instrument(span)
    .await;
}

/// Moves a message that is not a task envelope to the dead-letter queue, with its reason.
async fn undecodable(
    delivery: &Delivery,
    taken: Taken,
    context: &Arc<Context>,
    error: &DecodeError,
) {
    let message_id = delivery
        .properties
        .message_id()
        .as_ref()
        .map(ToString::to_string);
    tracing::warn!(target: TASK_LOG, ?message_id, "{error}; dead-lettering the message");
    let mut dead = Event::new(EventType::Dead);
    dead.id = message_id.and_then(|id| id.parse().ok());
    dead.kind = delivery.properties.kind().as_ref().map(ToString::to_string);
    dead.reason = Some(DeadReason::Undecodable);
    dead.error = Some(error.to_string());
    let outcome = to_dead(context, &dead, 1);
    settle(delivery, taken, context, outcome, dead).await;
}

/// How one attempt ended.
enum Ran {
    Succeeded(Completed),
    /// A retry may help; after the delay the handler asked for, if it did.
    Failed(String, Option<Duration>),
    /// A retry cannot help.
    Rejected(String),
}

/// Runs a handler to its end, its failure, its panic or its deadline.
async fn run_handler(running: HandlerFuture, deadline: Duration) -> Ran {
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
            "task ran past HANDLER_TIMEOUT"
        );
        return Ran::Failed(
            format!(
                "ran past HANDLER_TIMEOUT ({})",
                humantime::format_duration(deadline)
            ),
            None,
        );
    };
    match finished {
        Ok(Ok(result)) => {
            tracing::info!(target: TASK_LOG, "task completed");
            Ran::Succeeded(result)
        }
        Ok(Err(error)) if error.is_retryable() => {
            tracing::warn!(target: TASK_LOG, "task failed: {error}");
            Ran::Failed(error.to_string(), error.requested_delay())
        }
        Ok(Err(error)) => {
            tracing::warn!(target: TASK_LOG, "task failed permanently: {error}; dead-lettering it");
            Ran::Rejected(error.to_string())
        }
        Err(panic) => {
            let message = offload_common::telemetry::panic_message(panic.as_ref()).to_owned();
            tracing::error!(target: TASK_LOG, "handler panicked: {message}");
            Ran::Failed(format!("the handler panicked: {message}"), None)
        }
    }
}

/// How a delivery is settled.
enum Outcome {
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
struct Move {
    exchange: ShortString,
    routing_key: ShortString,
    /// Set on the copy, over the original's own headers.
    headers: FieldTable,
    /// What to do if the copy is not confirmed.
    otherwise: InPlace,
}

/// Settling a delivery without a copy: the fallback when a copy is not confirmed.
#[derive(Clone, Copy)]
enum InPlace {
    /// Deliver it again now.
    Requeue,
    /// Dead-letter it through the broker (`x-death` says only `rejected`).
    Reject,
}

/// Sends the task through the delay levels for its next attempt after `delay`, numbered in
/// its attempt header; if that publish fails, it is requeued at once instead (the delivery
/// limit still bounds that). Marks the `failed` event with when the next attempt is due.
fn retry_later(
    context: &Context,
    delivery: &Delivery,
    attempt: u32,
    delay: Duration,
    failed: &mut Event,
) -> Outcome {
    failed.retry = Some(true);
    failed.run_at = Some(SystemTime::now() + delay);
    tracing::info!(
        target: TASK_LOG,
        delay = %humantime::format_duration(delay),
        next_attempt = attempt.saturating_add(1),
        "retrying the task after a delay"
    );
    let mut headers = FieldTable::default();
    headers.insert(
        ATTEMPT_HEADER.into(),
        AMQPValue::LongLongInt(i64::from(attempt.saturating_add(1))),
    );
    // Called within the attempt's span: later attempts link to the first one.
    let span = tracing::Span::current();
    if let Some(first) = offload_common::trace::first_attempt_link(&span, &delivery.properties) {
        headers.insert(
            offload_common::trace::FIRST_ATTEMPT_HEADER.into(),
            AMQPValue::LongString(LongString::from(first)),
        );
    }
    Outcome::Move(Move {
        exchange: context.delay_exchange.clone(),
        routing_key: delay_routing_key(delay).into(),
        headers,
        otherwise: InPlace::Requeue,
    })
}

/// Moves a task that will not run again to `<QUEUE>.dead` with offload's reason, last error
/// and attempts in its headers (dead-lettering by the broker could only say `rejected`);
/// if that publish fails, the broker's dead-lettering still takes it there.
fn to_dead(context: &Context, dead: &Event, attempts: u32) -> Outcome {
    let text = |value: &str| AMQPValue::LongString(LongString::from(value));
    let mut headers = FieldTable::default();
    if let Some(reason) = dead.reason {
        headers.insert("x-offload-reason".into(), text(reason.as_str()));
    }
    if let Some(error) = &dead.error {
        headers.insert("x-offload-error".into(), text(truncate(error, 1024)));
    }
    headers.insert(
        "x-offload-attempts".into(),
        AMQPValue::LongLongInt(i64::from(attempts)),
    );
    let dead_at = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |since| {
            i64::try_from(since.as_millis()).unwrap_or(i64::MAX)
        });
    headers.insert("x-offload-dead-at".into(), AMQPValue::LongLongInt(dead_at));
    Outcome::Move(Move {
        exchange: "".into(),
        routing_key: context.dead_queue.clone(),
        headers,
        otherwise: InPlace::Reject,
    })
}

/// At most `max` bytes of `text`, cut at a character boundary.
fn truncate(text: &str, max: usize) -> &str {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
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
        _ => {}
    }
}

/// How long a worker waits for the broker to confirm a copy.
const COPY_CONFIRM_TIMEOUT: Duration = Duration::from_secs(10);

/// Publishes a copy of `delivery` as `to` says, persistent and mandatory, and waits for the
/// broker's confirm.
async fn publish_copy(delivery: &Delivery, context: &Context, to: &Move) -> Result<(), String> {
    let link = context.broker.link().ok_or("not connected to RabbitMQ")?;
    let properties = copy_properties(&delivery.properties, |_| false, &to.headers);
    let publish = async {
        link.publisher()
            .basic_publish(
                to.exchange.clone(),
                to.routing_key.clone(),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                &delivery.data,
                properties,
            )
            .await?
            .await
    };
    match tokio::time::timeout(COPY_CONFIRM_TIMEOUT, publish).await {
        Ok(Ok(Confirmation::Ack(None))) => Ok(()),
        Ok(Ok(Confirmation::Ack(Some(_)))) => {
            context.broker.report_unroutable();
            Err(format!("{} returned it unrouted", to.exchange))
        }
        Ok(Ok(_)) => {
            context.broker.report_nack(&link);
            Err("the broker refused it (nack)".into())
        }
        Ok(Err(error)) => Err(error.to_string()),
        Err(_) => Err("no confirm in time".into()),
    }
}

/// Publishes the attempt's `event`, and settles the delivery only once the broker has
/// confirmed it: a status that says `running` therefore always means the task has not
/// finished. An event the broker did not confirm turns the outcome into a requeue, so the task
/// runs again (at least once) rather than end without a word on the stream. An ack with
/// events on is left to the events sink, and this returns before it is sent.
async fn settle(
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
