//! One attempt at a task: decode the delivery, run its kind's handler within its deadline,
//! and decide what becomes of it (done, retried later through the delay levels, requeued,
//! dead-lettered) and which event says so. Settling the delivery is [`crate::settle`]'s.

use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};

use futures_util::FutureExt;
use lapin::{
    message::Delivery,
    types::{AMQPValue, FieldTable, LongString, ShortString},
};
use offload_common::{
    Broker, DeadReason, DecodeError, Event, EventSink, EventType, TaskEnvelope,
    envelope::{ATTEMPT_HEADER, delivery_count, first_attempt},
    text::{ERROR_MAX_BYTES, bounded},
    topology::{delay_in_levels, delayed_task_routing_key},
};
use tracing::Instrument;

use crate::{
    Registry, RetryPolicy, TASK_LOG, Task,
    cancels::{Cancels, Verdict},
    metrics::Metrics,
    registry::{Completed, HandlerFuture},
    settle::{InPlace, Move, Outcome, Taken, settle},
};

/// What every delivery's processing needs, shared by all of them.
pub(crate) struct Context {
    pub(crate) registry: Arc<Registry>,
    pub(crate) deadline: Duration,
    /// `None` with EVENTS=off.
    pub(crate) events: Option<EventSink>,
    /// `<host>-<pid>`, in `started` and `worker` events.
    pub(crate) worker: Arc<str>,
    pub(crate) delivery_limit: u64,
    pub(crate) result_max_bytes: usize,
    /// Every kind's retry policy, unless its handler has its own.
    pub(crate) policy: RetryPolicy,
    /// Where a task waiting for its next attempt is published.
    pub(crate) delay_exchange: ShortString,
    /// `<QUEUE>.dead`, where offload itself moves a task that will not run again.
    pub(crate) dead_queue: ShortString,
    /// The session, to publish those copies on.
    pub(crate) broker: Broker,
    pub(crate) metrics: Arc<Metrics>,
    /// The cancels read, and the tasks in hand they can reach.
    pub(crate) cancels: Arc<Cancels>,
}

/// Decodes, runs and settles one delivery. Never panics, whatever the bytes or the handler do.
pub(crate) async fn process(delivery: &Delivery, mut taken: Taken, context: Arc<Context>) {
    let envelope = match TaskEnvelope::from_bytes(&delivery.data) {
        Ok(envelope) => envelope,
        Err(error) => return undecodable(delivery, taken, &context, &error).await,
    };
    let previous_deliveries = delivery_count(delivery.redelivered, &delivery.properties);
    // The attempt this copy started with, plus the broker's redeliveries of it (crashes,
    // lost connections).
    let attempt = first_attempt(&delivery.properties)
        .saturating_add(u32::try_from(previous_deliveries).unwrap_or(u32::MAX));
    let claim = match context.cancels.claim(&envelope, SystemTime::now()) {
        Verdict::Run(claim) => claim,
        Verdict::Cancelled => {
            return not_started(delivery, taken, &context, &envelope, EventType::Cancelled).await;
        }
        Verdict::Expired => {
            return not_started(delivery, taken, &context, &envelope, EventType::Expired).await;
        }
    };
    let cancellation = claim.token();
    taken.held.claim = Some(claim);
    let expires_at = envelope.expires_at;
    let task = Task::new(envelope, previous_deliveries, attempt, cancellation.clone());
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
            event.worker = Some(context.worker.to_string());
            event
        };
        if previous_deliveries >= context.delivery_limit && previous_deliveries > 0 {
            // Its worker stopped during each of its last deliveries (a crash, an OOM kill, a
            // lost connection): it is not run again. Dead-lettered here, with a `dead` event,
            // rather than by the broker at its `x-delivery-limit`, which tells nobody: its
            // status would stay `running` or `queued` for ever.
            let mut dead = event(EventType::Dead);
            let ran = attempt.saturating_sub(1).max(1);
            dead.attempt = Some(u64::from(ran));
            dead.reason = Some(DeadReason::DeliveryLimit);
            dead.error = Some(format!(
                "its worker stopped (crashed, or lost the broker) during each of its last {previous_deliveries} deliveries (DELIVERY_LIMIT {}); not run again",
                context.delivery_limit
            ));
            tracing::warn!(target: TASK_LOG, previous_deliveries, "task dead-lettered at the delivery limit");
            let outcome = to_dead(&context, &dead, ran);
            settle(delivery, taken, &context, outcome, dead).await;
            return;
        }
        let policy = context.registry.policy(&kind).unwrap_or(context.policy);
        let running = match context.registry.dispatch(task, context.result_max_bytes) {
            Ok(running) => running,
            Err(task) => {
                tracing::warn!(
                    target: TASK_LOG,
                    known = %context.registry.kinds().join(","),
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
            events.emit(event(EventType::Started));
        }
        let began = std::time::Instant::now();
        let ran = run_handler(running, context.deadline).await;
        context.metrics.ran(&kind, began.elapsed());
        let ending = Ending {
            context: &context,
            delivery,
            kind: &kind,
            attempt,
            policy,
            expires_at,
            took: began.elapsed(),
            event: &event,
        };
        let mut terminal = ending.of(ran, cancellation.is_cancelled());
        terminal.1.at = std::time::SystemTime::now();
        settle(delivery, taken, &context, terminal.0, terminal.1).await;
    }
    .instrument(span)
    .await;
}

/// What an attempt that ran needs to decide what becomes of its task.
struct Ending<'a, E: Fn(EventType) -> Event> {
    context: &'a Context,
    delivery: &'a Delivery,
    kind: &'a str,
    attempt: u32,
    policy: RetryPolicy,
    expires_at: Option<SystemTime>,
    took: Duration,
    /// An event about this attempt.
    event: &'a E,
}

impl<E: Fn(EventType) -> Event> Ending<'_, E> {
    /// How the delivery is settled after `ran`, and the event that says so.
    fn of(&self, ran: Ran, cancelled: bool) -> (Outcome, Event) {
        let event = self.event;
        let took = Some(u64::try_from(self.took.as_millis()).unwrap_or(u64::MAX));
        match ran {
            // Cancelled while it ran: whatever the handler did, no retry follows.
            ran if cancelled => {
                let mut cancelled = event(EventType::Cancelled);
                cancelled.duration_ms = took;
                match ran {
                    Ran::Succeeded(completed) => {
                        cancelled.handler_stopped = Some(false);
                        (cancelled.result, cancelled.error) = (completed.result, completed.note);
                    }
                    Ran::Failed(error, _) | Ran::Rejected(error) => {
                        cancelled.handler_stopped = Some(true);
                        cancelled.error = Some(error);
                    }
                }
                tracing::info!(target: TASK_LOG, stopped = cancelled.handler_stopped, "task cancelled while running");
                (Outcome::Ack, cancelled)
            }
            Ran::Succeeded(completed) => {
                let mut succeeded = event(EventType::Succeeded);
                succeeded.duration_ms = took;
                (succeeded.result, succeeded.error) = (completed.result, completed.note);
                (Outcome::Ack, succeeded)
            }
            Ran::Failed(error, _) if self.policy.is_last(self.attempt) => {
                let mut dead = event(EventType::Dead);
                dead.reason = Some(DeadReason::MaxAttempts);
                dead.error = Some(error);
                (to_dead(self.context, &dead, self.attempt), dead)
            }
            Ran::Failed(error, asked) => {
                let delay = delay_in_levels(
                    asked.unwrap_or_else(|| self.policy.delay_after(self.attempt, fastrand::f64())),
                );
                if let Some(expires_at) = self
                    .expires_at
                    .filter(|at| SystemTime::now() + delay >= *at)
                {
                    // The next attempt would be due after the task expires: it ends now.
                    let mut expired = event(EventType::Expired);
                    expired.expires_at = Some(expires_at);
                    expired.error = Some(error);
                    tracing::info!(target: TASK_LOG, "task failed, and expires before its next attempt would be due");
                    return (Outcome::Ack, expired);
                }
                let mut failed = event(EventType::Failed);
                failed.error = Some(error);
                let later = retry_later(
                    self.context,
                    self.delivery,
                    (self.kind, self.attempt),
                    delay,
                    &mut failed,
                );
                (later, failed)
            }
            Ran::Rejected(error) => {
                let mut dead = event(EventType::Dead);
                dead.reason = Some(DeadReason::Rejected);
                dead.error = Some(error);
                (to_dead(self.context, &dead, self.attempt), dead)
            }
        }
    }
}

/// Settles a task that must not start, cancelled or expired, with its event: the delivery is
/// acked once the event is on the stream, and the task ends there.
async fn not_started(
    delivery: &Delivery,
    taken: Taken,
    context: &Arc<Context>,
    envelope: &TaskEnvelope,
    why: EventType,
) {
    let mut event = Event::task(why, envelope.id, envelope.kind.as_str());
    event.worker = Some(context.worker.to_string());
    event.expires_at = envelope.expires_at.filter(|_| why == EventType::Expired);
    tracing::info!(
        target: TASK_LOG,
        task_id = %envelope.id,
        kind = %envelope.kind,
        "task {}: not starting it",
        if why == EventType::Expired { "expired" } else { "cancelled" }
    );
    settle(delivery, taken, context, Outcome::Ack, event).await;
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
    let error = bounded(&error.to_string(), ERROR_MAX_BYTES).into_owned();
    tracing::warn!(target: TASK_LOG, ?message_id, "{error}; dead-lettering the message");
    let mut dead = Event::new(EventType::Dead);
    dead.id = message_id.and_then(|id| id.parse().ok());
    dead.kind = delivery.properties.kind().as_ref().map(ToString::to_string);
    dead.reason = Some(DeadReason::Undecodable);
    dead.worker = Some(context.worker.to_string());
    dead.error = Some(error);
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
            let text = bounded(&error.to_string(), ERROR_MAX_BYTES).into_owned();
            tracing::warn!(target: TASK_LOG, "task failed: {text}");
            Ran::Failed(text, error.requested_delay())
        }
        Ok(Err(error)) => {
            let text = bounded(&error.to_string(), ERROR_MAX_BYTES).into_owned();
            tracing::warn!(target: TASK_LOG, "task failed permanently: {text}; dead-lettering it");
            Ran::Rejected(text)
        }
        Err(panic) => {
            let message = offload_common::telemetry::panic_message(panic.as_ref());
            let message = bounded(message, ERROR_MAX_BYTES);
            tracing::error!(target: TASK_LOG, "handler panicked: {message}");
            Ran::Failed(format!("the handler panicked: {message}"), None)
        }
    }
}

/// Sends the task through the delay levels, back to its kind's queue, for its next attempt
/// after `delay`, numbered in
/// its attempt header; if that publish fails, it is requeued at once instead (the delivery
/// limit still bounds that). Marks the `failed` event with when the next attempt is due.
fn retry_later(
    context: &Context,
    delivery: &Delivery,
    (kind, attempt): (&str, u32),
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
        // The kind last: the delay's last hop routes it back to the kind's queue.
        routing_key: delayed_task_routing_key(delay, kind).into(),
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
        headers.insert(
            "x-offload-error".into(),
            text(&bounded(error, ERROR_MAX_BYTES)),
        );
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
