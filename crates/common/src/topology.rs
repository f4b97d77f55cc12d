//! The broker topology offload relies on, declared by one idempotent function.
//!
//! ```text
//!   publish, routing key = kind
//!      │
//!      ▼
//!   <QUEUE>.kinds (direct) ──one binding per kind a worker handles──► [QUEUE] ──► workers
//!
//!   to run later: <QUEUE>.later (topic), routing key = the delay's bits then the kind,
//!      one binding per kind a worker handles ──► <QUEUE>.delay.21 (below)
//!                                       (quorum, x-delivery-limit)      │
//!                                   rejected, or delivered more than the limit
//!                                                                       ▼
//!                      <QUEUE>.dlx (direct) ──► [<QUEUE>.dead] (quorum, x-max-length, drop-head)
//!
//!   lifecycle events ──► [<QUEUE>.events] (stream, x-max-age, x-max-length-bytes)
//!
//!   delayed (retries, scheduled tasks), routing key = the delay's bits, most significant first
//!      │
//!      ▼
//!   <QUEUE>.delay.21 (topic) ─bit 21 set─► [<QUEUE>.delay.21] (quorum, TTL 2^21 s) ─expired─┐
//!      │ bit 21 clear                                                                       │
//!      ▼                                                                                    │
//!   <QUEUE>.delay.20 (topic) ◄──────────────────────────────────────────────────────────────┘
//!      ⋮   (each level the same, down to level 0, TTL 1 s)
//!   <QUEUE>.delay.0 (topic) ─bit 0 clear─► [QUEUE]   ◄─expired─ [<QUEUE>.delay.0]
//! ```
//!
//! A delay of d seconds passes through the levels of d's set bits and no others, so each
//! level queue holds messages of one TTL only and never blocks a short delay behind a long
//! one (per-message TTLs expire only at a queue's head). Every hop is at-least-once
//! dead-lettering between quorum queues, so a broker crash loses no delayed task. This is the
//! design of NServiceBus's RabbitMQ transport and of kombu's native delayed delivery.
//!
//! The bindings of `<QUEUE>.kinds` are the registry of kinds: each worker binds the kinds it
//! handles, the bindings are durable and outlive the workers, and a task of a kind nobody
//! bound comes back to the gateway as a mandatory return.
//!
//! Every queue argument is written out, never left to the broker's defaults, because the
//! defaults differ between RabbitMQ 3.10 and 4.x (4.x gives quorum queues a delivery limit of
//! 20 unless told otherwise). The one exception is the replica count, written only when set
//! (`REPLICAS`): RabbitMQ compares it on every declare, so a queue made without it would
//! otherwise refuse every offload that sets it.

use lapin::{
    Channel, Connection, ExchangeKind,
    options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions},
    protocol::{AMQPErrorKind, AMQPSoftError},
    types::{AMQPValue, FieldTable, LongString, ShortString},
};

/// How many delay levels each work queue has: level n holds a task 2^n seconds.
pub const DELAY_LEVELS: u32 = 22;

/// The longest delay the levels can hold: 2^22 - 1 seconds, about 48.5 days.
pub const MAX_DELAY: std::time::Duration = std::time::Duration::from_secs((1 << DELAY_LEVELS) - 1);

/// The routing key that sends a message through the delay levels for `delay`, rounded to
/// the nearest second (a delay under half a second goes straight to the work queue) and
/// capped at [`MAX_DELAY`]: one word per level, `1` or `0`, the longest level first.
pub fn delay_routing_key(delay: std::time::Duration) -> String {
    let seconds = delay_in_levels(delay).as_secs();
    (0..DELAY_LEVELS)
        .rev()
        .map(|level| if seconds >> level & 1 == 1 { "1" } else { "0" })
        .collect::<Vec<_>>()
        .join(".")
}

/// The routing key of a task of `kind` to run after `delay`, published to the later
/// exchange: the delay's bits, then the kind, so that it is routed only if a worker bound the
/// kind, and then through the delay levels.
pub fn delayed_task_routing_key(delay: std::time::Duration, kind: &str) -> String {
    format!("{}.{kind}", delay_routing_key(delay))
}

/// The delay the levels will really hold for `delay`: rounded to the nearest second, at
/// most [`MAX_DELAY`].
pub fn delay_in_levels(delay: std::time::Duration) -> std::time::Duration {
    let seconds = (delay.as_millis() + 500) / 1000;
    std::time::Duration::from_secs(
        u64::try_from(seconds)
            .unwrap_or(u64::MAX)
            .min(MAX_DELAY.as_secs()),
    )
}

/// The topic pattern that picks the messages whose bit for `level` is `bit`.
fn level_pattern(level: u32, bit: char) -> String {
    let mut words: Vec<String> = (level + 1..DELAY_LEVELS).map(|_| "*".to_owned()).collect();
    words.push(bit.to_string());
    words.push("#".to_owned());
    words.join(".")
}

/// The work queue, its dead-letter path, the kinds exchange and the events stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    queue: String,
    delivery_limit: u32,
    max_length: Option<u32>,
    dead_max_length: u32,
    kinds: Vec<String>,
    events: Option<EventsRetention>,
    replicas: Option<u32>,
}

/// How long and how much of the events stream RabbitMQ keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventsRetention {
    /// `x-max-age`: events older than this are dropped (a segment at a time).
    pub max_age: std::time::Duration,
    /// `x-max-length-bytes`: past this the oldest segments are dropped.
    pub max_bytes: u64,
}

/// What [`Topology::depth`] counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
pub struct QueueDepth {
    /// Tasks ready on the work queue.
    pub ready: u32,
    /// Consumers (worker subscriptions) of the work queue.
    pub consumers: u32,
    /// Tasks waiting in the delay levels: retries after a failure, and tasks to run later.
    pub scheduled: u64,
    /// Tasks in `<QUEUE>.dead`.
    pub dead: u32,
}

impl Topology {
    /// The topology for work queue `queue`, whose tasks are dead-lettered after being
    /// delivered `delivery_limit` times more than once.
    pub fn new(queue: impl Into<String>, delivery_limit: u32) -> Self {
        Self {
            queue: queue.into(),
            delivery_limit,
            max_length: None,
            dead_max_length: crate::broker::DEFAULT_DEAD_MAX_LENGTH,
            kinds: Vec::new(),
            events: None,
            replicas: None,
        }
    }

    /// Binds these kinds to the work queue when declaring: what a worker does for the kinds
    /// it handles.
    #[must_use]
    pub fn with_kinds<K: Into<String>>(mut self, kinds: impl IntoIterator<Item = K>) -> Self {
        self.kinds = kinds.into_iter().map(Into::into).collect();
        self
    }

    /// Declares the events stream with this retention; `None`: no stream (events off).
    #[must_use]
    pub fn with_events(mut self, retention: Option<EventsRetention>) -> Self {
        self.events = retention;
        self
    }

    /// The kinds this topology binds.
    pub fn kinds(&self) -> &[String] {
        &self.kinds
    }

    /// The exchange tasks are published to, with their kind as routing key.
    pub fn kinds_exchange(&self) -> String {
        format!("{}.kinds", self.queue)
    }

    /// The exchange tasks to run later are published to, with [`delayed_task_routing_key`]:
    /// a topic exchange of its own, so that tasks to run now keep the direct exchange's
    /// cheaper routing.
    pub fn later_exchange(&self) -> String {
        format!("{}.later", self.queue)
    }

    /// The stream of lifecycle events, if events are on.
    pub fn events_stream(&self) -> Option<String> {
        self.events.map(|_| format!("{}.events", self.queue))
    }

    /// Sets the delivery limit: how many times a task is delivered again after a failed
    /// attempt before it is dead-lettered.
    #[must_use]
    pub fn with_delivery_limit(mut self, delivery_limit: u32) -> Self {
        self.delivery_limit = delivery_limit;
        self
    }

    /// How many cluster nodes hold a copy of each quorum queue
    /// (`x-quorum-initial-group-size`) and of the events stream (`x-initial-cluster-size`).
    /// `None` leaves it to the broker's defaults (`quorum_cluster_size` for quorum queues),
    /// and declares no such argument: RabbitMQ checks both on every declare, so queues made
    /// without it stay declarable.
    #[must_use]
    pub fn with_replicas(mut self, replicas: Option<u32>) -> Self {
        self.replicas = replicas;
        self
    }

    /// Adds the replica count under `argument`, if one is set.
    fn replicate(&self, args: &mut FieldTable, argument: &str) {
        if let Some(replicas) = self.replicas {
            args.insert(argument.into(), AMQPValue::LongLongInt(i64::from(replicas)));
        }
    }

    /// Caps the work queue at `max_length` ready tasks (`x-max-length`); past it the broker
    /// refuses publishes with a nack, which the gateway turns into 503. `None`: no cap.
    #[must_use]
    pub fn with_max_length(mut self, max_length: Option<u32>) -> Self {
        self.max_length = max_length;
        self
    }

    /// Caps the dead-letter queue at `max_length` tasks: past it the oldest is dropped.
    ///
    /// `drop-head`, because the dead-letter queue is a dead-letter *target*, and RabbitMQ does
    /// not honour `reject-publish` on a quorum queue that dead-lettering delivers to
    /// (rabbitmq-server issue #8495): with it the queue would grow past its bound anyway.
    #[must_use]
    pub fn with_dead_max_length(mut self, max_length: u32) -> Self {
        self.dead_max_length = max_length;
        self
    }

    /// The work queue the gateway publishes to and workers consume from.
    pub fn queue(&self) -> &str {
        &self.queue
    }

    /// The exchange that dead-lettered tasks are routed through.
    pub fn dead_letter_exchange(&self) -> String {
        format!("{}.dlx", self.queue)
    }

    /// The queue where rejected and exhausted tasks end up, for an operator to inspect.
    pub fn dead_letter_queue(&self) -> String {
        format!("{}.dead", self.queue)
    }

    /// The exchange a delayed message is published to: the top level's, with
    /// [`delay_routing_key`] as routing key.
    pub fn delay_exchange(&self) -> String {
        self.delay_level(DELAY_LEVELS - 1)
    }

    /// Level `level`'s exchange and queue (they share the name).
    fn delay_level(&self, level: u32) -> String {
        format!("{}.delay.{level}", self.queue)
    }

    /// The arguments of delay level `level`, all explicit: a quorum queue whose messages
    /// expire after 2^level seconds and are dead-lettered, at least once, to the next level
    /// down, or from level 0 to the work queue.
    pub fn delay_queue_arguments(&self, level: u32) -> FieldTable {
        let mut args = FieldTable::default();
        args.insert("x-queue-type".into(), text("quorum"));
        args.insert(
            "x-message-ttl".into(),
            AMQPValue::LongLongInt((1_i64 << level) * 1000),
        );
        if level == 0 {
            // The default exchange routes by queue name.
            args.insert("x-dead-letter-exchange".into(), text(""));
            args.insert("x-dead-letter-routing-key".into(), text(&self.queue));
        } else {
            args.insert(
                "x-dead-letter-exchange".into(),
                text(&self.delay_level(level - 1)),
            );
        }
        args.insert("x-dead-letter-strategy".into(), text("at-least-once"));
        args.insert("x-overflow".into(), text("reject-publish"));
        self.replicate(&mut args, QUORUM_REPLICAS);
        args
    }

    /// The arguments of the work queue, all explicit.
    pub fn queue_arguments(&self) -> FieldTable {
        let mut args = FieldTable::default();
        args.insert("x-queue-type".into(), text("quorum"));
        args.insert(
            "x-delivery-limit".into(),
            AMQPValue::LongLongInt(i64::from(self.delivery_limit)),
        );
        args.insert(
            "x-dead-letter-exchange".into(),
            text(&self.dead_letter_exchange()),
        );
        args.insert("x-dead-letter-routing-key".into(), text(&self.queue));
        // at-least-once dead-lettering: the broker keeps a message until the dead-letter queue
        // has confirmed it, so a crash between the two queues loses nothing. RabbitMQ requires
        // reject-publish overflow for it.
        args.insert("x-dead-letter-strategy".into(), text("at-least-once"));
        args.insert("x-overflow".into(), text("reject-publish"));
        if let Some(max_length) = self.max_length {
            args.insert(
                "x-max-length".into(),
                AMQPValue::LongLongInt(i64::from(max_length)),
            );
        }
        self.replicate(&mut args, QUORUM_REPLICAS);
        args
    }

    /// The arguments of the dead-letter queue, all explicit.
    pub fn dead_letter_queue_arguments(&self) -> FieldTable {
        let mut args = FieldTable::default();
        args.insert("x-queue-type".into(), text("quorum"));
        args.insert(
            "x-max-length".into(),
            AMQPValue::LongLongInt(i64::from(self.dead_max_length)),
        );
        args.insert("x-overflow".into(), text("drop-head"));
        self.replicate(&mut args, QUORUM_REPLICAS);
        args
    }

    /// The events stream's arguments, all explicit.
    fn stream_arguments(&self, retention: EventsRetention) -> FieldTable {
        let mut args = FieldTable::default();
        args.insert("x-queue-type".into(), text("stream"));
        // RabbitMQ's own unit syntax: whole seconds.
        args.insert(
            "x-max-age".into(),
            text(&format!("{}s", retention.max_age.as_secs().max(1))),
        );
        args.insert(
            "x-max-length-bytes".into(),
            AMQPValue::LongLongInt(i64::try_from(retention.max_bytes).unwrap_or(i64::MAX)),
        );
        self.replicate(&mut args, STREAM_REPLICAS);
        args
    }

    /// Declares the exchange and both queues, and binds them. Idempotent: declaring what
    /// already exists with the same arguments changes nothing. Uses a channel of its own, so a
    /// refusal from the broker cannot close a channel the caller holds.
    pub async fn declare(&self, connection: &Connection) -> Result<(), TopologyError> {
        on_own_channel(connection, async |channel| self.declare_on(channel).await).await
    }

    async fn declare_on(&self, channel: &Channel) -> Result<(), TopologyError> {
        let durable = QueueDeclareOptions::durable();
        let dlx = self.dead_letter_exchange();
        let dead = self.dead_letter_queue();
        declare_direct_exchange(channel, &dlx).await?;
        channel
            .queue_declare(
                dead.as_str().into(),
                durable,
                self.dead_letter_queue_arguments(),
            )
            .await
            .map_err(|e| TopologyError::from_declare("queue", &dead, e))?;
        channel
            .queue_bind(
                dead.as_str().into(),
                dlx.as_str().into(),
                self.queue.as_str().into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(TopologyError::Broker)?;
        channel
            .queue_declare(self.queue.as_str().into(), durable, self.queue_arguments())
            .await
            .map_err(|e| TopologyError::from_declare("queue", &self.queue, e))?;
        declare_direct_exchange(channel, &self.kinds_exchange()).await?;
        declare_exchange(channel, &self.later_exchange(), ExchangeKind::Topic).await?;
        if let (Some(stream), Some(retention)) = (self.events_stream(), self.events) {
            channel
                .queue_declare(
                    stream.as_str().into(),
                    durable,
                    self.stream_arguments(retention),
                )
                .await
                .map_err(|e| TopologyError::from_declare("stream", &stream, e))?;
        }
        self.declare_delay_levels(channel).await?;
        self.bind_kinds_on(channel).await
    }

    /// Declares the delay levels from the bottom up, so that each level's dead-letter target
    /// exists before anything can expire into it.
    async fn declare_delay_levels(&self, channel: &Channel) -> Result<(), TopologyError> {
        let durable = QueueDeclareOptions::durable();
        for level in 0..DELAY_LEVELS {
            let name = self.delay_level(level);
            declare_exchange(channel, &name, ExchangeKind::Topic).await?;
            channel
                .queue_declare(
                    name.as_str().into(),
                    durable,
                    self.delay_queue_arguments(level),
                )
                .await
                .map_err(|e| TopologyError::from_declare("queue", &name, e))?;
            let bind = |destination: &str, bit: char| {
                channel.queue_bind(
                    destination.into(),
                    name.as_str().into(),
                    level_pattern(level, bit).as_str().into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
            };
            bind(&name, '1').await.map_err(TopologyError::Broker)?;
            if level == 0 {
                bind(&self.queue, '0')
                    .await
                    .map_err(TopologyError::Broker)?;
            } else {
                channel
                    .exchange_bind(
                        self.delay_level(level - 1).as_str().into(),
                        name.as_str().into(),
                        level_pattern(level, '0').as_str().into(),
                        lapin::options::ExchangeBindOptions::default(),
                        FieldTable::default(),
                    )
                    .await
                    .map_err(TopologyError::Broker)?;
            }
        }
        Ok(())
    }

    /// Binds the kinds again (idempotent): after the work queue was deleted and declared
    /// anew, by this process or another, its bindings are gone.
    pub async fn bind_kinds(&self, connection: &Connection) -> Result<(), TopologyError> {
        if self.kinds.is_empty() {
            return Ok(());
        }
        on_own_channel(connection, async |channel| {
            self.bind_kinds_on(channel).await
        })
        .await
    }

    /// Two bindings a kind: its name on the kinds exchange, to the work queue (tasks to run
    /// now), and any delay followed by its name on the later exchange, to the top delay level
    /// (tasks to run later). Either way a kind nobody bound comes back unrouted.
    async fn bind_kinds_on(&self, channel: &Channel) -> Result<(), TopologyError> {
        let exchange = self.kinds_exchange();
        for kind in &self.kinds {
            channel
                .queue_bind(
                    self.queue.as_str().into(),
                    exchange.as_str().into(),
                    kind.as_str().into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(TopologyError::Broker)?;
            let later = format!("{}.{kind}", vec!["*"; DELAY_LEVELS as usize].join("."));
            channel
                .exchange_bind(
                    self.delay_exchange().as_str().into(),
                    self.later_exchange().as_str().into(),
                    later.as_str().into(),
                    lapin::options::ExchangeBindOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(TopologyError::Broker)?;
        }
        Ok(())
    }

    /// How many messages wait in the queues, and how many consumers the work queue has, as
    /// the broker counts them now (passive declarations on one channel). Messages delivered
    /// and not yet acknowledged are in none of these counts.
    pub async fn depth(&self, connection: &Connection) -> Result<QueueDepth, lapin::Error> {
        let channel = connection.create_channel().await?;
        let passive = QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        };
        let mut depth = QueueDepth::default();
        let work = channel
            .queue_declare(self.queue.as_str().into(), passive, FieldTable::default())
            .await?;
        depth.ready = work.message_count();
        depth.consumers = work.consumer_count();
        depth.dead = channel
            .queue_declare(
                self.dead_letter_queue().as_str().into(),
                passive,
                FieldTable::default(),
            )
            .await?
            .message_count();
        for level in 0..DELAY_LEVELS {
            let waiting = channel
                .queue_declare(
                    self.delay_level(level).as_str().into(),
                    passive,
                    FieldTable::default(),
                )
                .await?
                .message_count();
            depth.scheduled += u64::from(waiting);
        }
        let _ = channel.close(200, "counted".into()).await;
        Ok(depth)
    }

    /// Whether every queue exists (passive declarations, each on a channel of its own, which
    /// the broker closes when a queue is missing). An error means the broker could not be asked.
    pub async fn exists(&self, connection: &Connection) -> Result<bool, TopologyError> {
        for queue in self.queues() {
            let channel = connection
                .create_channel()
                .await
                .map_err(TopologyError::Broker)?;
            let declared = channel
                .queue_declare(
                    queue.as_str().into(),
                    QueueDeclareOptions {
                        passive: true,
                        ..QueueDeclareOptions::default()
                    },
                    FieldTable::default(),
                )
                .await;
            match declared {
                Ok(_) => {
                    let _ = channel.close(200, "checked".into()).await;
                }
                Err(error) if is_soft(&error, AMQPSoftError::NOTFOUND) => return Ok(false),
                Err(error) => return Err(TopologyError::Broker(error)),
            }
        }
        Ok(true)
    }

    /// The queues this topology declares: the work queue, the dead-letter queue and, with
    /// events on, the events stream.
    fn queues(&self) -> impl Iterator<Item = String> {
        [
            Some(self.queue.clone()),
            Some(self.dead_letter_queue()),
            self.events_stream(),
        ]
        .into_iter()
        .flatten()
    }

    /// Deletes the queues and exchanges, messages included. For tests and tear-down.
    pub async fn delete(&self, connection: &Connection) -> Result<(), TopologyError> {
        let channel = connection
            .create_channel()
            .await
            .map_err(TopologyError::Broker)?;
        let levels = (0..DELAY_LEVELS).map(|level| self.delay_level(level));
        for queue in self.queues().chain(levels.clone()) {
            channel
                .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                .await
                .map_err(TopologyError::Broker)?;
        }
        for exchange in [
            self.dead_letter_exchange(),
            self.kinds_exchange(),
            self.later_exchange(),
        ]
        .into_iter()
        .chain(levels)
        {
            channel
                .exchange_delete(
                    exchange.as_str().into(),
                    lapin::options::ExchangeDeleteOptions::default(),
                )
                .await
                .map_err(TopologyError::Broker)?;
        }
        let _ = channel.close(200, "topology deleted".into()).await;
        Ok(())
    }
}

/// Runs `work` on a channel of its own, so that a refusal from the broker (which closes the
/// channel) cannot close a channel the caller holds; closes it afterwards if still open.
async fn on_own_channel<T>(
    connection: &Connection,
    work: impl AsyncFnOnce(&Channel) -> Result<T, TopologyError>,
) -> Result<T, TopologyError> {
    let channel = connection
        .create_channel()
        .await
        .map_err(TopologyError::Broker)?;
    let result = work(&channel).await;
    // After a refusal the broker has closed the channel already; closing again is moot.
    if channel.status().connected() {
        let _ = channel.close(200, "done".into()).await;
    }
    result
}

/// Declares a durable direct exchange.
async fn declare_direct_exchange(channel: &Channel, name: &str) -> Result<(), TopologyError> {
    declare_exchange(channel, name, ExchangeKind::Direct).await
}

/// Declares a durable exchange of `kind`.
async fn declare_exchange(
    channel: &Channel,
    name: &str,
    kind: ExchangeKind,
) -> Result<(), TopologyError> {
    channel
        .exchange_declare(
            name.into(),
            kind,
            ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(|e| TopologyError::from_declare("exchange", name, e))
}

/// The quorum queue argument for how many nodes hold a replica.
const QUORUM_REPLICAS: &str = "x-quorum-initial-group-size";
/// The stream argument for how many nodes hold a replica.
const STREAM_REPLICAS: &str = "x-initial-cluster-size";

fn text(value: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(value))
}

/// Why the topology could not be declared.
#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    /// Something of that name exists with other settings. The message is one line that says
    /// what to do.
    #[error(
        "{what} '{name}' already exists with other settings than offload declares ({broker_said}). \
         Drain and delete it (rabbitmqctl delete_queue {name}), or give offload another queue name with --queue / QUEUE"
    )]
    Mismatch {
        /// "queue" or "exchange".
        what: &'static str,
        /// Its name.
        name: String,
        /// The broker's own words.
        broker_said: String,
    },
    /// The broker could not be asked.
    #[error("declaring the queues failed: {0}")]
    Broker(#[source] lapin::Error),
}

impl TopologyError {
    fn from_declare(what: &'static str, name: &str, error: lapin::Error) -> Self {
        if let lapin::ErrorKind::ProtocolError(amqp) = error.kind()
            && is_soft(&error, AMQPSoftError::PRECONDITIONFAILED)
        {
            return Self::Mismatch {
                what,
                name: name.to_owned(),
                broker_said: ShortString::as_str(amqp.get_message()).to_owned(),
            };
        }
        Self::Broker(error)
    }
}

/// Whether the broker refused an operation with this channel-level error.
pub fn is_soft(error: &lapin::Error, kind: AMQPSoftError) -> bool {
    matches!(error.kind(), lapin::ErrorKind::ProtocolError(amqp) if *amqp.kind() == AMQPErrorKind::Soft(kind))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn replicas_are_declared_on_every_queue_only_when_set() {
        let retention = EventsRetention {
            max_age: std::time::Duration::from_secs(60),
            max_bytes: 1 << 20,
        };
        let unset = Topology::new("q", 3);
        let set = Topology::new("q", 3).with_replicas(Some(3));
        let quorum = |t: &Topology| {
            vec![
                t.queue_arguments(),
                t.dead_letter_queue_arguments(),
                t.delay_queue_arguments(0),
                t.delay_queue_arguments(DELAY_LEVELS - 1),
            ]
        };
        for args in quorum(&unset) {
            assert!(!args.inner().contains_key(QUORUM_REPLICAS));
        }
        for args in quorum(&set) {
            assert_eq!(
                args.inner().get(QUORUM_REPLICAS),
                Some(&AMQPValue::LongLongInt(3))
            );
        }
        assert!(
            !unset
                .stream_arguments(retention)
                .inner()
                .contains_key(STREAM_REPLICAS)
        );
        assert_eq!(
            set.stream_arguments(retention).inner().get(STREAM_REPLICAS),
            Some(&AMQPValue::LongLongInt(3))
        );
    }

    #[test]
    fn a_delay_sets_the_bits_of_its_levels_longest_first() {
        let key = delay_routing_key(Duration::from_secs(5));
        let words: Vec<&str> = key.split('.').collect();
        assert_eq!(words.len(), DELAY_LEVELS as usize);
        assert_eq!(words[words.len() - 3..], ["1", "0", "1"]);
        assert!(words[..words.len() - 3].iter().all(|w| *w == "0"));
    }

    #[test]
    fn delays_round_to_the_second_and_are_capped() {
        let zeros = vec!["0"; DELAY_LEVELS as usize].join(".");
        assert_eq!(delay_routing_key(Duration::from_millis(499)), zeros);
        assert_eq!(
            delay_routing_key(Duration::from_millis(1_500)),
            delay_routing_key(Duration::from_secs(2))
        );
        let ones = vec!["1"; DELAY_LEVELS as usize].join(".");
        assert_eq!(delay_routing_key(MAX_DELAY), ones);
        assert_eq!(delay_routing_key(Duration::from_secs(u64::MAX)), ones);
    }

    #[test]
    fn each_level_looks_at_its_own_word() {
        assert_eq!(level_pattern(DELAY_LEVELS - 1, '1'), "1.#");
        let pattern = level_pattern(0, '0');
        assert_eq!(pattern.matches('*').count(), DELAY_LEVELS as usize - 1);
        assert!(pattern.ends_with(".0.#"));
    }
}
