//! Publishing tasks with publisher confirms, through the broker session in `common`.
//!
//! The session owns the connection and its confirm-mode channel, and withdraws them when the
//! connection dies, so requests fail fast with 503 while it reconnects. Each request
//! publishes on the shared channel and awaits its own confirm: many publishes are in flight
//! at once, none waits behind another's confirm.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU32, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use lapin::{
    Confirmation,
    options::BasicPublishOptions,
    types::{FieldTable, ShortString},
};
use offload_common::{Broker, BrokerState, TaskEnvelope, topology::delayed_task_routing_key};
use tokio::sync::Semaphore;

use crate::metrics::Metrics;

/// Publishes tasks. Cheap to clone; all clones share one connection.
#[derive(Clone)]
pub struct Publisher {
    broker: Broker,
    watch: Arc<ConfirmWatch>,
    /// `<QUEUE>.kinds`: tasks are published there with their kind as routing key.
    exchange: ShortString,
    /// `<QUEUE>.later`: tasks to run later.
    later: ShortString,
    confirm_timeout: Duration,
    in_flight: Arc<Semaphore>,
    max_in_flight: usize,
    metrics: Arc<Metrics>,
}

/// Why a task was not accepted by the broker. Every variant means "not confirmed, try again";
/// all but [`PublishError::Timeout`] also mean the task is certainly not on the queue.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// No live connection to the broker right now.
    #[error("not connected to RabbitMQ")]
    Disconnected,
    /// The broker has blocked publishers because it is short of memory or disk.
    #[error("RabbitMQ is blocking publishers (memory or disk alarm)")]
    Blocked,
    /// This gateway already has its maximum of publishes awaiting a confirm.
    #[error("this gateway has too many tasks awaiting the broker's confirm (MAX_IN_FLIGHT)")]
    Overloaded,
    /// The broker refused the message (for instance the queue is at its length limit).
    #[error("RabbitMQ refused the task (nack: the queue is full, or its leader is moving)")]
    Nacked,
    /// The message could not be routed: the work queue does not exist.
    #[error("RabbitMQ returned the task unrouted ({0}): the queue does not exist")]
    Returned(String),
    /// The message could not be routed: no worker has bound its kind.
    #[error("no worker has registered the kind")]
    UnknownKind,
    /// No confirm came in time; the task may or may not be queued.
    #[error("RabbitMQ did not confirm the task within {}", humantime::format_duration(*.0))]
    Timeout(Duration),
    /// The channel failed while publishing (typically the connection dropped).
    #[error("publishing failed: {0}")]
    Broker(#[from] lapin::Error),
}

/// Publishes in a row without a confirm after which the broker counts as not confirming.
pub const TIMEOUTS_IN_A_ROW: u32 = 3;

/// The shortest time "not confirming" lasts after the last timeout (a scrape or a health
/// check must be able to see it, however short CONFIRM_TIMEOUT is).
const MIN_HOLD: Duration = Duration::from_secs(15);

/// Counts publishes in a row that got no answer within the confirm timeout.
struct ConfirmWatch {
    in_a_row: AtomicU32,
    /// When the last of them timed out, in milliseconds since `epoch`.
    last_timeout: AtomicU64,
    epoch: Instant,
    /// How long "not confirming" lasts after the last timeout without a new one: a gateway
    /// that says so is sent no more traffic, so it must look again by itself; if the broker
    /// still does not confirm, the next publishes say so again.
    hold: Duration,
}

impl ConfirmWatch {
    fn new(confirm_timeout: Duration) -> Self {
        Self {
            in_a_row: AtomicU32::new(0),
            last_timeout: AtomicU64::new(0),
            epoch: Instant::now(),
            hold: confirm_timeout.saturating_mul(3).max(MIN_HOLD),
        }
    }

    /// One publish ended at `now` (since `epoch`): answered by the broker (ack, nack or
    /// return), or timed out.
    fn answered(&self, by_the_broker: bool, now: Duration) {
        if by_the_broker {
            self.in_a_row.store(0, Ordering::Relaxed);
        } else {
            let now = u64::try_from(now.as_millis()).unwrap_or(u64::MAX);
            self.last_timeout.store(now, Ordering::Relaxed);
            self.in_a_row.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Whether the broker counts as not confirming at `now` (since `epoch`).
    fn not_confirming(&self, now: Duration) -> bool {
        let last = Duration::from_millis(self.last_timeout.load(Ordering::Relaxed));
        self.in_a_row.load(Ordering::Relaxed) >= TIMEOUTS_IN_A_ROW
            && now.saturating_sub(last) < self.hold
    }
}

impl Publisher {
    /// A publisher on `broker`'s session that waits at most `confirm_timeout` for each
    /// confirm and lets at most `max_in_flight` publishes await one at once.
    pub(crate) fn new(
        broker: Broker,
        confirm_timeout: Duration,
        max_in_flight: u32,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            exchange: broker.topology().kinds_exchange().into(),
            later: broker.topology().later_exchange().into(),
            broker,
            confirm_timeout,
            in_flight: Arc::new(Semaphore::new(max_in_flight as usize)),
            max_in_flight: max_in_flight as usize,
            metrics,
            watch: Arc::new(ConfirmWatch::new(confirm_timeout)),
        }
    }

    /// Whether the broker has stopped confirming: [`TIMEOUTS_IN_A_ROW`] publishes in a row
    /// went unanswered, the last of them recently. The connection may look healthy (a
    /// quorum queue without a leader, or a node cut off in a minority partition, still
    /// speaks AMQP); tasks are not being taken.
    pub fn not_confirming(&self) -> bool {
        self.watch.not_confirming(self.watch.epoch.elapsed())
    }

    /// [`Self::not_confirming`] as `/health` and the dashboard say it: `ok` or `timing_out`.
    pub fn confirms(&self) -> &'static str {
        if self.not_confirming() {
            "timing_out"
        } else {
            "ok"
        }
    }

    /// Publishes awaiting a confirm now.
    pub fn in_flight(&self) -> usize {
        self.max_in_flight - self.in_flight.available_permits()
    }

    /// The broker session it publishes through.
    pub fn broker(&self) -> &Broker {
        &self.broker
    }

    /// Whether a publish could succeed now.
    pub fn state(&self) -> BrokerState {
        self.broker.state()
    }

    /// Publishes `task` persistent and mandatory to the kinds exchange, with its kind as
    /// routing key (to run after `delay`: to the later exchange, with the delay's bits then
    /// its kind, which routes it through the delay levels), and waits for the broker's
    /// confirm. `Ok` means the broker has the task on
    /// the queue; nothing else does. A task of a kind no worker has bound comes back as a
    /// return: [`PublishError::UnknownKind`].
    ///
    /// Fails at once, without touching the broker, when the gateway is disconnected, the
    /// broker is blocking publishers, or `max_in_flight` publishes already await a confirm;
    /// otherwise within the confirm timeout. `headers` go with the message (trace context).
    pub async fn publish(
        &self,
        task: &TaskEnvelope,
        delay: Option<Duration>,
        headers: FieldTable,
    ) -> Result<(), PublishError> {
        let _permit = self
            .in_flight
            .try_acquire()
            .map_err(|_| PublishError::Overloaded)?;
        let link = self.broker.link().ok_or(PublishError::Disconnected)?;
        if link.connection().status().blocked() {
            return Err(PublishError::Blocked);
        }
        let channel = link.publisher();
        let body = task.to_bytes();
        let mut properties = task.properties();
        if !headers.inner().is_empty() {
            properties = properties.with_headers(headers);
        }
        // Either exchange routes only the kinds workers bound, so an unbound kind comes back
        // as a return whether it is to run now or later.
        let (exchange, routing_key): (ShortString, ShortString) = match delay {
            None => (self.exchange.clone(), task.kind.as_str().into()),
            Some(delay) => (
                self.later.clone(),
                delayed_task_routing_key(delay, task.kind.as_str()).into(),
            ),
        };
        let publish_and_confirm = async {
            let confirm = channel
                .basic_publish(
                    exchange,
                    routing_key,
                    BasicPublishOptions {
                        mandatory: true,
                        ..BasicPublishOptions::default()
                    },
                    &body,
                    properties,
                )
                .await?;
            confirm.await
        };
        let began = Instant::now();
        let answered = tokio::time::timeout(self.confirm_timeout, publish_and_confirm).await;
        if answered.is_ok() {
            self.metrics.confirmed(began.elapsed());
        }
        self.watch
            .answered(answered.is_ok(), self.watch.epoch.elapsed());
        match answered {
            Err(_) => Err(PublishError::Timeout(self.confirm_timeout)),
            Ok(Err(error)) => Err(PublishError::Broker(error)),
            Ok(Ok(Confirmation::Ack(None))) => Ok(()),
            Ok(Ok(Confirmation::Ack(Some(returned)))) => {
                // Either nobody bound this kind, or the queue (and so every binding) is gone.
                // Only the failure path pays for asking which.
                if let Ok(true) = self.broker.topology().exists(link.connection()).await {
                    return Err(PublishError::UnknownKind);
                }
                self.broker.report_unroutable();
                Err(PublishError::Returned(returned.reply_text.to_string()))
            }
            // NotRequested cannot happen (the channel is put in confirm mode before it is
            // handed out); were it to, it is no confirm, so it is not a success.
            Ok(Ok(Confirmation::Nack(_) | Confirmation::NotRequested)) => {
                self.broker.report_nack(&link);
                Err(PublishError::Nacked)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn three_timeouts_in_a_row_until_an_answer_or_the_hold_passes() {
        let at = Duration::from_secs;
        let watch = ConfirmWatch::new(at(5));
        watch.answered(false, at(10));
        watch.answered(false, at(15));
        assert!(!watch.not_confirming(at(15)), "two are not yet a pattern");
        watch.answered(false, at(20));
        assert!(watch.not_confirming(at(20)));
        watch.answered(true, at(21));
        assert!(!watch.not_confirming(at(21)), "one confirm clears it");
        for second in 30..33 {
            watch.answered(false, at(second));
        }
        assert!(watch.not_confirming(at(46)));
        // The hold (three confirm timeouts) passes without a new timeout: look again.
        assert!(!watch.not_confirming(at(47)));
        watch.answered(false, at(50));
        assert!(
            watch.not_confirming(at(50)),
            "and the next timeout says so again"
        );
    }
}
