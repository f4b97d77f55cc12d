//! Publishing tasks with publisher confirms, over a connection that heals itself.
//!
//! One background task (the supervisor) owns the connection: it connects, declares the
//! topology, opens a confirm-mode channel and hands it to request handlers through a
//! `watch` channel. When the connection or channel dies it withdraws the channel, so
//! requests fail fast with 503, and reconnects with backoff.
//!
//! Each request publishes on the shared channel and awaits its own confirm: many publishes
//! are in flight at once, none waits behind another's confirm.

use std::time::Duration;

use futures_util::StreamExt;
use lapin::{
    Channel, Confirmation, Connection, Event,
    options::{BasicPublishOptions, ConfirmSelectOptions},
    types::ShortString,
};
use offload_common::{BrokerArgs, BrokerError, TaskEnvelope, Topology, TopologyError};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Shortest and longest wait between reconnection attempts.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// How often the supervisor looks at the channel's state, as a backstop to connection events.
const LIVENESS_CHECK: Duration = Duration::from_millis(250);

/// Publishes tasks. Cheap to clone; all clones share one connection.
#[derive(Clone)]
pub struct Publisher {
    channel: watch::Receiver<Option<Channel>>,
    queue: ShortString,
    confirm_timeout: Duration,
}

/// Why a task was not accepted by the broker. Every variant means "not queued, try again".
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// No live connection to the broker right now.
    #[error("not connected to RabbitMQ")]
    Disconnected,
    /// The broker refused the message (for instance the queue is full).
    #[error("RabbitMQ refused the task (nack)")]
    Nacked,
    /// The message could not be routed to the queue: it does not exist.
    #[error("RabbitMQ returned the task unrouted ({0}): the queue does not exist")]
    Returned(String),
    /// No confirm came in time; the task may or may not be queued.
    #[error("RabbitMQ did not confirm the task within {}", humantime::format_duration(*.0))]
    Timeout(Duration),
    /// The channel failed while publishing (typically the connection dropped).
    #[error("publishing failed: {0}")]
    Broker(#[from] lapin::Error),
}

impl Publisher {
    /// Connects once and declares the topology, then starts the supervisor, which keeps the
    /// connection alive until `shutdown` is cancelled.
    ///
    /// An unreachable broker is not an error here: the gateway starts, reports itself
    /// unhealthy and keeps trying. A queue that exists with other settings is an error,
    /// because retrying cannot fix it.
    pub async fn start(
        broker: BrokerArgs,
        confirm_timeout: Duration,
        shutdown: CancellationToken,
    ) -> Result<(Self, tokio::task::JoinHandle<()>), TopologyError> {
        let (sender, receiver) = watch::channel(None);
        let supervisor = Supervisor {
            topology: broker.topology(),
            broker,
            sender,
            shutdown,
        };
        let first = match supervisor.open().await {
            Ok(open) => Some(open),
            Err(BrokerError::Topology(error @ TopologyError::Mismatch { .. })) => {
                return Err(error);
            }
            Err(error) => {
                tracing::warn!("{error}; the gateway answers 503 until the broker is reachable");
                None
            }
        };
        let publisher = Self {
            channel: receiver,
            queue: supervisor.topology.queue().into(),
            confirm_timeout,
        };
        let handle = tokio::spawn(supervisor.run(first));
        Ok((publisher, handle))
    }

    /// Whether a publish could be attempted now.
    pub fn is_connected(&self) -> bool {
        self.channel
            .borrow()
            .as_ref()
            .is_some_and(|channel| channel.status().connected())
    }

    /// Publishes `task` persistent and mandatory, and waits for the broker's confirm.
    /// `Ok` means the broker has the task on the queue; nothing else does.
    pub async fn publish(&self, task: &TaskEnvelope) -> Result<(), PublishError> {
        let channel = self
            .channel
            .borrow()
            .clone()
            .ok_or(PublishError::Disconnected)?;
        let body = task.to_bytes();
        let publish_and_confirm = async {
            let confirm = channel
                .basic_publish(
                    ShortString::from(""),
                    self.queue.clone(),
                    BasicPublishOptions {
                        mandatory: true,
                        ..BasicPublishOptions::default()
                    },
                    &body,
                    task.properties(),
                )
                .await?;
            confirm.await
        };
        match tokio::time::timeout(self.confirm_timeout, publish_and_confirm).await {
            Err(_) => Err(PublishError::Timeout(self.confirm_timeout)),
            Ok(Err(error)) => Err(PublishError::Broker(error)),
            Ok(Ok(Confirmation::Ack(None))) => Ok(()),
            Ok(Ok(Confirmation::Ack(Some(returned)))) => {
                Err(PublishError::Returned(returned.reply_text.to_string()))
            }
            // NotRequested cannot happen (the channel is put in confirm mode before it is
            // handed out); were it to, it is no confirm, so it is not a success.
            Ok(Ok(Confirmation::Nack(_) | Confirmation::NotRequested)) => Err(PublishError::Nacked),
        }
    }
}

struct Supervisor {
    broker: BrokerArgs,
    topology: Topology,
    sender: watch::Sender<Option<Channel>>,
    shutdown: CancellationToken,
}

impl Supervisor {
    /// Connects, declares the topology and opens a confirm-mode channel.
    async fn open(&self) -> Result<(Connection, Channel), BrokerError> {
        let connection = self.broker.connect("offload-api").await?;
        self.topology.declare(&connection).await?;
        let channel = connection.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        Ok((connection, channel))
    }

    async fn run(self, mut current: Option<(Connection, Channel)>) {
        let mut backoff = BACKOFF_MIN;
        loop {
            if let Some((connection, channel)) = current.take() {
                tracing::info!(
                    broker = %self.broker.redacted_url(),
                    queue = self.topology.queue(),
                    "connected to RabbitMQ"
                );
                backoff = BACKOFF_MIN;
                self.sender.send_replace(Some(channel.clone()));
                let reason = self.watch(&connection, &channel).await;
                self.sender.send_replace(None);
                match reason {
                    None => {
                        let _ = connection.close(200, "gateway shutting down".into()).await;
                        return;
                    }
                    Some(reason) => {
                        tracing::warn!("lost the broker connection ({reason}); reconnecting");
                        // Release the socket now; it may already be gone.
                        let _ = connection.close(320, "reconnecting".into()).await;
                    }
                }
            }
            tokio::select! {
                () = self.shutdown.cancelled() => return,
                () = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
            match self.open().await {
                Ok(open) => current = Some(open),
                Err(error) => tracing::warn!(
                    "{error}; retrying in {}",
                    humantime::format_duration(backoff)
                ),
            }
        }
    }

    /// Waits until the connection or channel fails (`Some(reason)`) or shutdown (`None`).
    async fn watch(&self, connection: &Connection, channel: &Channel) -> Option<String> {
        let mut events = connection.events_listener();
        let mut tick = tokio::time::interval(LIVENESS_CHECK);
        loop {
            tokio::select! {
                () = self.shutdown.cancelled() => return None,
                event = events.next() => match event {
                    Some(Event::Error(error)) => return Some(error.to_string()),
                    Some(_) => {}
                    None => return Some("connection closed".into()),
                },
                _ = tick.tick() => {
                    if !connection.status().connected() || !channel.status().connected() {
                        return Some("channel closed".into());
                    }
                }
            }
        }
    }
}
