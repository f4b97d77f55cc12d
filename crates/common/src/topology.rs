//! The broker topology offload relies on, declared by one idempotent function.
//!
//! ```text
//!   publish ──► [QUEUE] (quorum, x-delivery-limit) ──► workers
//!                  │ rejected, or delivered more than the limit
//!                  ▼
//!              <QUEUE>.dlx (direct) ──► [<QUEUE>.dead] (quorum, x-max-length, drop-head)
//! ```
//!
//! Every queue argument is written out, never left to the broker's defaults, because the
//! defaults differ between RabbitMQ 3.10 and 4.x (4.x gives quorum queues a delivery limit of
//! 20 unless told otherwise).

use lapin::{
    Channel, Connection, ExchangeKind,
    options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions},
    protocol::{AMQPErrorKind, AMQPSoftError},
    types::{AMQPValue, FieldTable, LongString, ShortString},
};

/// The work queue and its dead-letter path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    queue: String,
    delivery_limit: u32,
    max_length: Option<u32>,
    dead_max_length: u32,
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
        }
    }

    /// Sets the delivery limit: how many times a task is delivered again after a failed
    /// attempt before it is dead-lettered.
    #[must_use]
    pub fn with_delivery_limit(mut self, delivery_limit: u32) -> Self {
        self.delivery_limit = delivery_limit;
        self
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
        args
    }

    /// Declares the exchange and both queues, and binds them. Idempotent: declaring what
    /// already exists with the same arguments changes nothing. Uses a channel of its own, so a
    /// refusal from the broker cannot close a channel the caller holds.
    pub async fn declare(&self, connection: &Connection) -> Result<(), TopologyError> {
        let channel = connection
            .create_channel()
            .await
            .map_err(TopologyError::Broker)?;
        let result = self.declare_on(&channel).await;
        // After a refusal the broker has closed the channel already; closing again is moot.
        if channel.status().connected() {
            let _ = channel.close(200, "topology declared".into()).await;
        }
        result
    }

    async fn declare_on(&self, channel: &Channel) -> Result<(), TopologyError> {
        let durable = QueueDeclareOptions::durable();
        let dlx = self.dead_letter_exchange();
        let dead = self.dead_letter_queue();
        channel
            .exchange_declare(
                dlx.as_str().into(),
                ExchangeKind::Direct,
                ExchangeDeclareOptions {
                    durable: true,
                    ..ExchangeDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(|e| TopologyError::from_declare("exchange", &dlx, e))?;
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
        Ok(())
    }

    /// Whether both queues exist (passive declarations, on a channel of its own, which the
    /// broker closes when a queue is missing). An error means the broker could not be asked.
    pub async fn exists(&self, connection: &Connection) -> Result<bool, TopologyError> {
        for queue in [self.queue.clone(), self.dead_letter_queue()] {
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

    /// Deletes both queues and the exchange, messages included. For tests and tear-down.
    pub async fn delete(&self, connection: &Connection) -> Result<(), TopologyError> {
        let channel = connection
            .create_channel()
            .await
            .map_err(TopologyError::Broker)?;
        for queue in [self.queue.clone(), self.dead_letter_queue()] {
            channel
                .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                .await
                .map_err(TopologyError::Broker)?;
        }
        channel
            .exchange_delete(
                self.dead_letter_exchange().as_str().into(),
                lapin::options::ExchangeDeleteOptions::default(),
            )
            .await
            .map_err(TopologyError::Broker)?;
        let _ = channel.close(200, "topology deleted".into()).await;
        Ok(())
    }
}

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
