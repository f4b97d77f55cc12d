//! What the topology says to the broker: declare it (idempotently), bind a worker's kinds,
//! check that it still exists, count what it holds, and delete it.

use lapin::{
    Channel, Connection, ExchangeKind,
    options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions},
    protocol::AMQPSoftError,
    types::FieldTable,
};

use super::{
    DELAY_LEVELS, QueueDepth, Topology, TopologyError, delays::level_pattern, error::is_soft,
};

impl Topology {
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
