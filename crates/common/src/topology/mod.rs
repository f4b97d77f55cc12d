//! The broker topology offload relies on, declared by one idempotent function.
//!
//! ```text
//!   publish, routing key = kind
//!      │
//!      ▼
//!   <QUEUE>.kinds (direct) ──one binding per kind──► [<QUEUE>.kind.<kind>] ──► that kind's workers
//!                                                       (quorum, x-delivery-limit; one per kind)
//!   to run later: <QUEUE>.later (topic), routing key =        │ rejected, or delivered more
//!     the delay's bits then the kind ──► <QUEUE>.delay.21     ▼ than the limit
//!                      <QUEUE>.dlx (direct) ──► [<QUEUE>.dead] (quorum, x-max-length, drop-head)
//!
//!   lifecycle events ──► [<QUEUE>.events] (stream, x-max-age, x-max-length-bytes)
//!
//!   delayed (retries, scheduled tasks), routing key = the delay's bits, most significant
//!   first, then the kind
//!      │
//!      ▼
//!   <QUEUE>.delay.21 (topic) ─bit 21 set─► [<QUEUE>.delay.21] (quorum, TTL 2^21 s) ─expired─┐
//!      │ bit 21 clear                                                                       │
//!      ▼                                                                                    │
//!   <QUEUE>.delay.20 (topic) ◄──────────────────────────────────────────────────────────────┘
//!      ⋮   (each level the same, down to level 0, TTL 1 s, whose queue is <QUEUE>.delay.0.due)
//!   <QUEUE>.delay.0 (topic) ─bit 0 clear─► <QUEUE>.due (topic) ◄─expired─ [<QUEUE>.delay.0.due]
//!                                              │ the kind, after the delay's bits
//!                                              ▼
//!                                          [<QUEUE>.kind.<kind>]
//!
//!   [<QUEUE>.gate.<kind>] (quorum, always empty): the kind runs while it exists
//! ```
//!
//! **A queue per kind.** A worker declares and consumes the queues of the kinds it runs and
//! no others, so a task is only ever delivered to a worker that has its kind; each kind's
//! queue is its own Raft group, placed by `x-queue-leader-locator=balanced`, so the leaders of
//! several kinds spread over a cluster's nodes.
//!
//! **The kinds registry.** A kind's bindings on `<QUEUE>.kinds`, `<QUEUE>.later` and
//! `<QUEUE>.due` are made by the workers that run it; they are durable and outlive the
//! workers, and a task of a kind nobody bound comes back to the gateway as a mandatory
//! return.
//!
//! **Pausing a kind** deletes its gate, an empty queue each worker of the kind consumes on
//! the channel it consumes the kind's queue on: the broker cancels those consumers at once,
//! and a worker whose gate is gone stops consuming the kind (tasks in hand finish) until the
//! gate is declared again. A worker subscribing consumes the gate first, so a worker that
//! starts (or reconnects) while the kind is paused does not consume it either. The gate is
//! made with the kind's queue, when that queue is new; a kind's queue without its gate is a
//! paused kind.
//!
//! **Delays** pass through the levels of the delay's set bits and no others, so each level
//! queue holds messages of one TTL only and never blocks a short delay behind a long one
//! (per-message TTLs expire only at a queue's head). Every hop is at-least-once
//! dead-lettering between quorum queues, so a broker crash loses no delayed task. This is the
//! design of NServiceBus's RabbitMQ transport and of kombu's native delayed delivery. The
//! kind rides at the end of the routing key, so that the last hop, `<QUEUE>.due`, routes the
//! task back to its kind's queue.
//!
//! **The layout before per-kind queues** had one work queue, `<QUEUE>`, for every kind.
//! Declaring this topology where that queue exists moves the old bindings off it (see
//! [`declare`]), and workers move what waits in it to the kinds' queues
//! ([`Topology::legacy_queue`]).
//!
//! Every queue argument is written out, never left to the broker's defaults, because the
//! defaults differ between RabbitMQ 3.10 and 4.x (4.x gives quorum queues a delivery limit of
//! 20 unless told otherwise). The one exception is the replica count, written only when set
//! (`REPLICAS`): RabbitMQ compares it on every declare, so a queue made without it would
//! otherwise refuse every offload that sets it.
//!
//! [`delays`] is the arithmetic of the delay levels, [`declare`] what is said to the broker
//! (declare, bind, open and close gates, check, delete), [`count`] what the queues hold,
//! [`error`] how a refusal reads.

mod arguments;
mod count;
mod declare;
mod delays;
mod error;

pub use delays::{
    DELAY_LEVELS, MAX_DELAY, delay_in_levels, delay_routing_key, delayed_task_routing_key,
};
pub use error::{TopologyError, is_soft};

/// Default for `--dead-max-length`: the most tasks `<QUEUE>.dead` keeps.
pub const DEFAULT_DEAD_MAX_LENGTH: u32 = 100_000;

/// The kinds' queues, their dead-letter path, the exchanges, the delay levels and the events
/// stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    queue: String,
    delivery_limit: u32,
    max_length: Option<u32>,
    dead_max_length: u32,
    kinds: Vec<String>,
    events: Option<EventsRetention>,
    replicas: Option<u32>,
    schedules: bool,
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
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
pub struct QueueDepth {
    /// Tasks ready on the kinds' queues, all kinds together.
    pub ready: u32,
    /// Consumers (worker subscriptions) of the kinds' queues, all kinds together.
    pub consumers: u32,
    /// Tasks waiting in the delay levels: retries after a failure, and tasks to run later.
    pub scheduled: u64,
    /// Tasks in `<QUEUE>.dead`.
    pub dead: u32,
    /// Each kind asked about whose queue exists, in the order asked.
    pub kinds: Vec<KindDepth>,
}

/// One kind's queue, as the broker counts it now.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
pub struct KindDepth {
    /// The kind.
    pub kind: String,
    /// Tasks ready on its queue.
    pub ready: u32,
    /// Workers consuming its queue.
    pub consumers: u32,
    /// Whether it is paused (its gate is gone).
    pub paused: bool,
}

impl Topology {
    /// The topology named after `queue`, whose tasks are dead-lettered after being delivered
    /// `delivery_limit` times more than once.
    pub fn new(queue: impl Into<String>, delivery_limit: u32) -> Self {
        Self {
            queue: queue.into(),
            delivery_limit,
            max_length: None,
            dead_max_length: DEFAULT_DEAD_MAX_LENGTH,
            kinds: Vec::new(),
            events: None,
            replicas: None,
            schedules: false,
        }
    }

    /// Declares these kinds' queues and binds them when declaring: what a worker does for the
    /// kinds it runs.
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

    /// The stream of schedules (the gateway's `schedules`), with schedules on.
    pub fn schedules_stream(&self) -> String {
        format!("{}.schedules", self.queue)
    }

    /// The queue whose single active consumer fires the schedules, with schedules on.
    pub fn scheduler_queue(&self) -> String {
        format!("{}.scheduler", self.queue)
    }

    /// Declares the schedules' stream and election queue too: what a gateway does.
    #[must_use]
    pub fn with_schedules(mut self, schedules: bool) -> Self {
        self.schedules = schedules;
        self
    }

    /// The stream of cancels (`crate::control`): declared whether events are on or not.
    pub fn control_stream(&self) -> String {
        format!("{}.control", self.queue)
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

    /// Caps each kind's queue at `max_length` ready tasks (`x-max-length`); past it the
    /// broker refuses that kind's publishes with a nack, which the gateway turns into 503.
    /// `None`: no cap.
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

    /// `QUEUE`: the name every queue and exchange of this topology is named after.
    pub fn queue(&self) -> &str {
        &self.queue
    }

    /// The queue of `kind`'s tasks, which only workers that run `kind` consume.
    pub fn kind_queue(&self, kind: &str) -> String {
        format!("{}.kind.{kind}", self.queue)
    }

    /// `kind`'s gate: the kind runs while it exists (see the module's text).
    pub fn gate(&self, kind: &str) -> String {
        format!("{}.gate.{kind}", self.queue)
    }

    /// The last hop of a delay: a topic exchange that routes a task that is due to its
    /// kind's queue, by the kind after the delay's bits in its routing key.
    pub fn due_exchange(&self) -> String {
        format!("{}.due", self.queue)
    }

    /// The work queue of the layout before per-kind queues, `<QUEUE>` itself, shared by every
    /// kind. No longer declared: where it still exists, workers move its tasks to their
    /// kinds' queues.
    pub fn legacy_queue(&self) -> &str {
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

    /// Level `level`'s exchange, and its queue above level 0.
    fn delay_level(&self, level: u32) -> String {
        format!("{}.delay.{level}", self.queue)
    }

    /// Level `level`'s queue. Level 0's has a name of its own since its dead-letter target
    /// changed (to [`Topology::due_exchange`]) with the per-kind queues: a queue's arguments
    /// cannot change, and the old one, `<QUEUE>.delay.0`, drains to the legacy queue.
    fn delay_level_queue(&self, level: u32) -> String {
        if level == 0 {
            format!("{}.delay.0.due", self.queue)
        } else {
            self.delay_level(level)
        }
    }

    /// The level-0 queue of the layout before per-kind queues.
    fn legacy_level_zero(&self) -> String {
        self.delay_level(0)
    }
}
