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

use lapin::types::FieldTable;
use offload_common::{
    Broker, BrokerState, Message, PublishError as BrokerPublishError, TaskEnvelope,
    topology::delayed_task_routing_key,
};
use tokio::sync::Semaphore;

use crate::metrics_registry::Metrics;

/// Publishes tasks. Cheap to clone; all clones share one connection.
#[derive(Clone)]
pub struct Publisher {
    broker: Broker,
    watch: Arc<ConfirmWatch>,
    /// `<QUEUE>.kinds`: tasks are published there with their kind as routing key.
    exchange: String,
    /// `<QUEUE>.later`: tasks to run later.
    later: String,
    confirm_timeout: Duration,
    in_flight: Arc<Semaphore>,
    max_in_flight: usize,
    metrics: Arc<Metrics>,
    /// The kinds this gateway has published a task of, routed: each has a queue, which the
    /// queues' depth counts.
    routed: Arc<std::sync::RwLock<std::collections::BTreeSet<String>>>,
}

/// Why a task was not accepted by the broker. Every variant means "not confirmed, try again";
/// all but a [`BrokerPublishError::Timeout`] also mean the task is certainly not on the queue.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// The broker has blocked publishers because it is short of memory or disk.
    #[error("RabbitMQ is blocking publishers (memory or disk alarm)")]
    Blocked,
    /// This gateway already has its maximum of publishes awaiting a confirm.
    #[error("this gateway has too many tasks awaiting the broker's confirm (MAX_IN_FLIGHT)")]
    Overloaded,
    /// The message could not be routed: no worker has bound its kind.
    #[error("no worker has registered the kind")]
    UnknownKind,
    /// Not confirmed by the broker: disconnected, nacked, returned because the queue is gone,
    /// timed out, or the channel failed.
    #[error(transparent)]
    Broker(#[from] BrokerPublishError),
}

impl From<lapin::Error> for PublishError {
    fn from(error: lapin::Error) -> Self {
        Self::Broker(BrokerPublishError::Channel(error))
    }
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
            exchange: broker.topology().kinds_exchange(),
            later: broker.topology().later_exchange(),
            broker,
            confirm_timeout,
            in_flight: Arc::new(Semaphore::new(max_in_flight as usize)),
            max_in_flight: max_in_flight as usize,
            metrics,
            watch: Arc::new(ConfirmWatch::new(confirm_timeout)),
            routed: Arc::default(),
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

    /// The kinds this gateway has published a task of, sorted.
    pub fn kinds(&self) -> Vec<String> {
        self.routed
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .cloned()
            .collect()
    }

    /// Remembers that a task of `kind` was routed (a read lock but for a kind's first task).
    fn routed(&self, kind: &str) {
        let known = self
            .routed
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .contains(kind);
        if !known {
            self.routed
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .insert(kind.to_owned());
        }
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
        if self.broker.is_blocked() {
            return Err(PublishError::Blocked);
        }
        let body = task.to_bytes();
        let mut properties = task.properties();
        if !headers.inner().is_empty() {
            properties = properties.with_headers(headers);
        }
        // Either exchange routes only the kinds workers bound, so an unbound kind comes back
        // as a return whether it is to run now or later.
        let message = match delay {
            None => Message::to_exchange(&self.exchange, task.kind.as_str(), &body, properties),
            Some(delay) => Message::to_exchange(
                &self.later,
                &delayed_task_routing_key(delay, task.kind.as_str()),
                &body,
                properties,
            ),
        }
        .maybe_unbound();
        let began = Instant::now();
        let published = self
            .broker
            .publish_confirmed(message, self.confirm_timeout)
            .await;
        if let Err(BrokerPublishError::Disconnected) = published {
            // Failed without asking the broker anything: no answer, and no silence either.
            return Err(BrokerPublishError::Disconnected.into());
        }
        let answered = !matches!(published, Err(BrokerPublishError::Timeout(_)));
        if answered {
            self.metrics.confirmed(began.elapsed());
        }
        self.watch.answered(answered, self.watch.epoch.elapsed());
        match published {
            Ok(()) => {
                self.routed(task.kind.as_str());
                Ok(())
            }
            Err(BrokerPublishError::Returned(text)) => {
                // Either nobody bound this kind, or the queue (and so every binding) is gone.
                // Only the failure path pays for asking which.
                if let Some(link) = self.broker.link()
                    && let Ok(true) = self.broker.topology().exists(link.connection()).await
                {
                    return Err(PublishError::UnknownKind);
                }
                self.broker.report_unroutable();
                Err(BrokerPublishError::Returned(text).into())
            }
            Err(error) => Err(error.into()),
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
