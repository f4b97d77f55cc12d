//! What the topology says to the broker: declare it (idempotently), bind a worker's kinds,
//! open and close a kind's gate, move the old layout's bindings off its shared queue, check
//! that it still exists, count what it holds, and delete it.

use lapin::{
    Channel, Connection, ExchangeKind,
    options::{
        ExchangeBindOptions, ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions,
        QueueDeclareOptions, QueueDeleteOptions,
    },
    protocol::AMQPSoftError,
    types::FieldTable,
};

use super::{
    DELAY_LEVELS, Topology, TopologyError,
    delays::{kind_pattern, level_pattern},
    error::is_soft,
};

impl Topology {
    /// Declares the exchanges, the shared queues and this topology's kinds' queues, and binds
    /// them; moves the old layout's bindings off its shared queue if there is one.
    /// Idempotent: declaring what already exists with the same arguments changes nothing.
    /// Uses channels of its own, so a refusal from the broker cannot close a channel the
    /// caller holds.
    pub async fn declare(&self, connection: &Connection) -> Result<(), TopologyError> {
        // The kinds' queues first, one after another: `balanced` gives each new quorum queue's
        // leader to the node that leads the fewest, so queues made in between (a gate, the
        // shared queues) would take turns with them, and the kinds could all land on one node.
        let new = self.declare_kind_queues(connection).await?;
        on_own_channel(connection, async |channel| {
            self.declare_shared(channel).await
        })
        .await?;
        for kind in new {
            on_own_channel(connection, async |channel| {
                self.open_gate_on(channel, kind).await
            })
            .await?;
        }
        self.bind_kinds(connection).await?;
        // Last: only once the new bindings exist may the old ones go.
        if self.exists_named(connection, self.legacy_queue()).await? {
            self.unbind_legacy(connection).await?;
        }
        Ok(())
    }

    /// What every process declares, whatever its kinds.
    async fn declare_shared(&self, channel: &Channel) -> Result<(), TopologyError> {
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
        declare_direct_exchange(channel, &self.kinds_exchange()).await?;
        declare_exchange(channel, &self.later_exchange(), ExchangeKind::Topic).await?;
        declare_exchange(channel, &self.due_exchange(), ExchangeKind::Topic).await?;
        let control = self.control_stream();
        channel
            .queue_declare(control.as_str().into(), durable, self.control_arguments())
            .await
            .map_err(|e| TopologyError::from_declare("stream", &control, e))?;
        if self.schedules {
            let stream = self.schedules_stream();
            channel
                .queue_declare(stream.as_str().into(), durable, self.schedules_arguments())
                .await
                .map_err(|e| TopologyError::from_declare("stream", &stream, e))?;
            let queue = self.scheduler_queue();
            channel
                .queue_declare(queue.as_str().into(), durable, self.scheduler_arguments())
                .await
                .map_err(|e| TopologyError::from_declare("queue", &queue, e))?;
        }
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
        self.declare_delay_levels(channel).await
    }

    /// Declares the delay levels from the bottom up, so that each level's dead-letter target
    /// exists before anything can expire into it.
    async fn declare_delay_levels(&self, channel: &Channel) -> Result<(), TopologyError> {
        let durable = QueueDeclareOptions::durable();
        for level in 0..DELAY_LEVELS {
            let exchange = self.delay_level(level);
            let queue = self.delay_level_queue(level);
            declare_exchange(channel, &exchange, ExchangeKind::Topic).await?;
            channel
                .queue_declare(
                    queue.as_str().into(),
                    durable,
                    self.delay_queue_arguments(level),
                )
                .await
                .map_err(|e| TopologyError::from_declare("queue", &queue, e))?;
            channel
                .queue_bind(
                    queue.as_str().into(),
                    exchange.as_str().into(),
                    level_pattern(level, '1').as_str().into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(TopologyError::Broker)?;
            let below = if level == 0 {
                self.due_exchange()
            } else {
                self.delay_level(level - 1)
            };
            channel
                .exchange_bind(
                    below.as_str().into(),
                    exchange.as_str().into(),
                    level_pattern(level, '0').as_str().into(),
                    ExchangeBindOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(TopologyError::Broker)?;
        }
        Ok(())
    }

    /// Declares each kind's queue; the kinds whose queue is new, whose gates are to be made (a
    /// kind is paused only by deleting a gate that existed).
    async fn declare_kind_queues(
        &self,
        connection: &Connection,
    ) -> Result<Vec<&str>, TopologyError> {
        let mut new = Vec::new();
        for kind in &self.kinds {
            let queue = self.kind_queue(kind);
            if !self.exists_named(connection, &queue).await? {
                new.push(kind.as_str());
            }
            on_own_channel(connection, async |channel| {
                channel
                    .queue_declare(
                        queue.as_str().into(),
                        QueueDeclareOptions::durable(),
                        self.kind_queue_arguments(),
                    )
                    .await
                    .map_err(|e| TopologyError::from_declare("queue", &queue, e))
            })
            .await?;
        }
        Ok(new)
    }

    /// Declares `kind`'s gate: the kind runs again.
    pub async fn open_gate(
        &self,
        connection: &Connection,
        kind: &str,
    ) -> Result<(), TopologyError> {
        on_own_channel(connection, async |channel| {
            self.open_gate_on(channel, kind).await
        })
        .await
    }

    async fn open_gate_on(&self, channel: &Channel, kind: &str) -> Result<(), TopologyError> {
        let gate = self.gate(kind);
        channel
            .queue_declare(
                gate.as_str().into(),
                QueueDeclareOptions::durable(),
                self.gate_arguments(),
            )
            .await
            .map_err(|e| TopologyError::from_declare("queue", &gate, e))?;
        Ok(())
    }

    /// Deletes `kind`'s gate: every worker consuming the kind stops, and none starts.
    pub async fn close_gate(
        &self,
        connection: &Connection,
        kind: &str,
    ) -> Result<(), TopologyError> {
        on_own_channel(connection, async |channel| {
            channel
                .queue_delete(
                    self.gate(kind).as_str().into(),
                    QueueDeleteOptions::default(),
                )
                .await
                .map_err(TopologyError::Broker)?;
            Ok(())
        })
        .await
    }

    /// Binds the kinds again (idempotent): after a kind's queue was deleted and declared
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

    /// Three bindings a kind: its name on the kinds exchange, to its queue (tasks to run
    /// now); any delay followed by its name on the later exchange, to the top delay level
    /// (tasks to run later), and on the due exchange, to its queue (tasks whose delay is
    /// over). A kind nobody bound comes back unrouted from either of the first two.
    async fn bind_kinds_on(&self, channel: &Channel) -> Result<(), TopologyError> {
        let exchange = self.kinds_exchange();
        for kind in &self.kinds {
            let queue = self.kind_queue(kind);
            let delayed = kind_pattern(kind);
            let bind = |exchange: String, routing_key: &str| {
                channel.queue_bind(
                    queue.as_str().into(),
                    exchange.into(),
                    routing_key.into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
            };
            bind(exchange.clone(), kind)
                .await
                .map_err(TopologyError::Broker)?;
            bind(self.due_exchange(), &delayed)
                .await
                .map_err(TopologyError::Broker)?;
            channel
                .exchange_bind(
                    self.delay_exchange().as_str().into(),
                    self.later_exchange().as_str().into(),
                    delayed.as_str().into(),
                    ExchangeBindOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(TopologyError::Broker)?;
        }
        Ok(())
    }

    /// Takes the old layout's bindings off its shared queue, now that the new ones exist: this
    /// process's kinds on the kinds exchange, and level 0's two ways out (its old queue, and
    /// straight to the shared queue). The old level-0 queue then drains into the shared queue
    /// within its TTL (a second), whose tasks the workers move on. Each on a channel of its
    /// own, since unbinding from a queue that is gone is refused.
    async fn unbind_legacy(&self, connection: &Connection) -> Result<(), TopologyError> {
        let legacy = self.legacy_queue();
        let level_zero = self.delay_level(0);
        let mut bindings = vec![
            (
                self.legacy_level_zero(),
                level_zero.clone(),
                level_pattern(0, '1'),
            ),
            (legacy.to_owned(), level_zero, level_pattern(0, '0')),
        ];
        bindings.extend(
            self.kinds
                .iter()
                .map(|kind| (legacy.to_owned(), self.kinds_exchange(), kind.clone())),
        );
        for (queue, exchange, routing_key) in bindings {
            let unbound = on_own_channel(connection, async |channel| {
                channel
                    .queue_unbind(
                        queue.as_str().into(),
                        exchange.as_str().into(),
                        routing_key.as_str().into(),
                        FieldTable::default(),
                    )
                    .await
                    .map_err(TopologyError::Broker)
            })
            .await;
            match unbound {
                Ok(()) => {}
                Err(TopologyError::Broker(error)) if is_soft(&error, AMQPSoftError::NOTFOUND) => {}
                Err(error) => return Err(error),
            }
        }
        Ok(())
    }

    /// Whether every queue exists (passive declarations, each on a channel of its own, which
    /// the broker closes when a queue is missing). An error means the broker could not be asked.
    pub async fn exists(&self, connection: &Connection) -> Result<bool, TopologyError> {
        for queue in self.queues() {
            if !self.exists_named(connection, &queue).await? {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Whether queue `name` exists.
    pub async fn exists_named(
        &self,
        connection: &Connection,
        name: &str,
    ) -> Result<bool, TopologyError> {
        let channel = connection
            .create_channel()
            .await
            .map_err(TopologyError::Broker)?;
        match channel
            .queue_declare(name.into(), passive(), FieldTable::default())
            .await
        {
            Ok(_) => {
                let _ = channel.close(200, "checked".into()).await;
                Ok(true)
            }
            Err(error) if is_soft(&error, AMQPSoftError::NOTFOUND) => Ok(false),
            Err(error) => Err(TopologyError::Broker(error)),
        }
    }

    /// The queues this topology declares and needs: the kinds' queues, the dead-letter queue
    /// and, with events on, the events stream. (A kind's gate is not one: a gate that is
    /// gone is a paused kind.)
    fn queues(&self) -> impl Iterator<Item = String> {
        self.kinds.iter().map(|kind| self.kind_queue(kind)).chain(
            [
                Some(self.dead_letter_queue()),
                Some(self.control_stream()),
                self.events_stream(),
                self.schedules.then(|| self.schedules_stream()),
                self.schedules.then(|| self.scheduler_queue()),
            ]
            .into_iter()
            .flatten(),
        )
    }

    /// Deletes the queues and exchanges, messages included, and the old layout's shared
    /// queue and level-0 queue if they exist. For tests and tear-down. A deletion the broker
    /// refuses (which closes its channel) does not stop the rest: each goes on a channel that
    /// is open, and the first refusal is returned at the end.
    pub async fn delete(&self, connection: &Connection) -> Result<(), TopologyError> {
        let levels = (0..DELAY_LEVELS).map(|level| self.delay_level_queue(level));
        let gates = self.kinds.iter().map(|kind| self.gate(kind));
        let legacy = [
            self.legacy_queue().to_owned(),
            self.legacy_level_zero(),
            self.schedules_stream(),
            self.scheduler_queue(),
        ];
        let exchanges = [
            self.dead_letter_exchange(),
            self.kinds_exchange(),
            self.later_exchange(),
            self.due_exchange(),
        ];
        let levels_exchanges = (0..DELAY_LEVELS).map(|level| self.delay_level(level));
        let mut channel: Option<Channel> = None;
        let mut first_error = None;
        let queues = self.queues().chain(levels).chain(gates).chain(legacy);
        let doomed = queues.map(|name| (name, true)).chain(
            exchanges
                .into_iter()
                .chain(levels_exchanges)
                .map(|name| (name, false)),
        );
        for (name, is_queue) in doomed {
            let open = match channel.take() {
                Some(open) if open.status().connected() => open,
                _ => match connection.create_channel().await {
                    Ok(open) => open,
                    // No channel can be had: the connection is gone, and so is the rest.
                    Err(error) => return Err(first_error.unwrap_or(TopologyError::Broker(error))),
                },
            };
            // Deleting a queue or an exchange that does not exist is not an error.
            let deleted = if is_queue {
                open.queue_delete(name.as_str().into(), QueueDeleteOptions::default())
                    .await
                    .map(drop)
            } else {
                open.exchange_delete(name.as_str().into(), ExchangeDeleteOptions::default())
                    .await
            };
            if let Err(error) = deleted {
                first_error.get_or_insert(TopologyError::Broker(error));
            }
            channel = Some(open);
        }
        if let Some(open) = channel.filter(|open| open.status().connected()) {
            let _ = open.close(200, "topology deleted".into()).await;
        }
        first_error.map_or(Ok(()), Err)
    }
}

pub(super) fn passive() -> QueueDeclareOptions {
    QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
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
