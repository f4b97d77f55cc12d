//! Counting what the queues hold, as the broker counts it now: the queues' depth (the
//! gateway's metrics, dashboard and `GET /kinds`) and one queue's.

use lapin::{Channel, Connection, protocol::AMQPSoftError, types::FieldTable};

use super::{DELAY_LEVELS, KindDepth, QueueDepth, Topology, declare::passive, error::is_soft};

impl Topology {
    /// How many messages wait in the queues, how many consumers the kinds' queues have and
    /// which of `kinds` are paused, as the broker counts them now (passive declarations). A
    /// kind whose queue does not exist is left out. Messages delivered and not yet
    /// acknowledged are in none of these counts.
    pub async fn depth(
        &self,
        connection: &Connection,
        kinds: &[String],
    ) -> Result<QueueDepth, lapin::Error> {
        let mut counter = Counter::new(connection).await?;
        let mut depth = QueueDepth::default();
        for kind in kinds {
            let Some((ready, consumers)) = counter.count(&self.kind_queue(kind)).await? else {
                continue;
            };
            let paused = counter.count(&self.gate(kind)).await?.is_none();
            depth.ready = depth.ready.saturating_add(ready);
            depth.consumers = depth.consumers.saturating_add(consumers);
            depth.kinds.push(KindDepth {
                kind: kind.clone(),
                ready,
                consumers,
                paused,
            });
        }
        depth.dead = counter
            .count(&self.dead_letter_queue())
            .await?
            .map_or(0, |(ready, _)| ready);
        for level in 0..DELAY_LEVELS {
            if let Some((waiting, _)) = counter.count(&self.delay_level_queue(level)).await? {
                depth.scheduled += u64::from(waiting);
            }
        }
        counter.close().await;
        Ok(depth)
    }

    /// Queue `name`'s ready messages and consumers, as the broker counts them now; `None` if
    /// it does not exist.
    pub async fn count(
        &self,
        connection: &Connection,
        name: &str,
    ) -> Result<Option<(u32, u32)>, lapin::Error> {
        let mut counter = Counter::new(connection).await?;
        let answer = counter.count(name).await;
        counter.close().await;
        answer
    }
}

/// Passive declarations on one channel, opening another after each one the broker refused
/// (which closes the channel).
struct Counter<'a> {
    connection: &'a Connection,
    channel: Channel,
}

impl<'a> Counter<'a> {
    async fn new(connection: &'a Connection) -> Result<Self, lapin::Error> {
        Ok(Self {
            connection,
            channel: connection.create_channel().await?,
        })
    }

    /// `queue`'s ready messages and consumers; `None` if it does not exist.
    async fn count(&mut self, queue: &str) -> Result<Option<(u32, u32)>, lapin::Error> {
        match self
            .channel
            .queue_declare(queue.into(), passive(), FieldTable::default())
            .await
        {
            Ok(declared) => Ok(Some((declared.message_count(), declared.consumer_count()))),
            Err(error) if is_soft(&error, AMQPSoftError::NOTFOUND) => {
                self.channel = self.connection.create_channel().await?;
                Ok(None)
            }
            Err(error) => Err(error),
        }
    }

    async fn close(self) {
        let _ = self.channel.close(200, "counted".into()).await;
    }
}
