//! Publishing tasks with publisher confirms, over a connection that heals itself.
//!
//! One background task (the supervisor) owns the connection: it connects, declares the
//! topology, opens a confirm-mode channel and hands it to request handlers through a
//! `watch` channel. When the connection or channel dies it withdraws the channel, so
//! requests fail fast with 503, and reconnects with backoff.
//!
//! Each request publishes on the shared channel and awaits its own confirm: many publishes
//! are in flight at once, none waits behind another's confirm.

use std::{sync::Arc, time::Duration};

use futures_util::StreamExt;
use lapin::{
    Channel, Confirmation, Connection, Event,
    options::{BasicPublishOptions, ConfirmSelectOptions},
    types::ShortString,
};
use offload_common::{BrokerArgs, BrokerError, TaskEnvelope, Topology, TopologyError};
use tokio::sync::{Semaphore, watch};
use tokio_util::sync::CancellationToken;

/// Shortest and longest wait between reconnection attempts. The cap is short so that the
/// gateway is publishing again within about a second of the broker's return.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(1);
/// How often the supervisor looks at the channel's state, as a backstop to connection events.
const LIVENESS_CHECK: Duration = Duration::from_millis(250);

/// Publishes tasks. Cheap to clone; all clones share one connection.
#[derive(Clone)]
pub struct Publisher {
    link: watch::Receiver<Option<Link>>,
    queue: ShortString,
    confirm_timeout: Duration,
    in_flight: Arc<Semaphore>,
}

/// The live connection and its confirm-mode channel.
#[derive(Clone)]
struct Link {
    connection: Arc<Connection>,
    channel: Channel,
}

/// What `/health` reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BrokerState {
    /// Publishing works.
    Connected,
    /// Connected, but the broker refuses publishes for now (memory or disk alarm).
    Blocked,
    /// No connection.
    Disconnected,
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
    #[error("RabbitMQ refused the task (nack; the queue may be full)")]
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
        max_in_flight: u32,
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
            link: receiver,
            queue: supervisor.topology.queue().into(),
            confirm_timeout,
            in_flight: Arc::new(Semaphore::new(max_in_flight as usize)),
        };
        let handle = tokio::spawn(supervisor.run(first));
        Ok((publisher, handle))
    }

    /// Whether a publish could succeed now.
    pub fn state(&self) -> BrokerState {
        match self.link.borrow().as_ref() {
            Some(link) if !link.channel.status().connected() => BrokerState::Disconnected,
            Some(link) if link.connection.status().blocked() => BrokerState::Blocked,
            Some(_) => BrokerState::Connected,
            None => BrokerState::Disconnected,
        }
    }

    /// Publishes `task` persistent and mandatory, and waits for the broker's confirm.
    /// `Ok` means the broker has the task on the queue; nothing else does.
    ///
    /// Fails at once, without touching the broker, when the gateway is disconnected, the
    /// broker is blocking publishers, or `max_in_flight` publishes already await a confirm;
    /// otherwise within the confirm timeout.
    pub async fn publish(&self, task: &TaskEnvelope) -> Result<(), PublishError> {
        let _permit = self
            .in_flight
            .try_acquire()
            .map_err(|_| PublishError::Overloaded)?;
        let channel = {
            let link = self.link.borrow();
            let link = link.as_ref().ok_or(PublishError::Disconnected)?;
            if link.connection.status().blocked() {
                return Err(PublishError::Blocked);
            }
            link.channel.clone()
        };
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
    sender: watch::Sender<Option<Link>>,
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
                let connection = Arc::new(connection);
                tracing::info!(
                    broker = %self.broker.redacted_url(),
                    queue = self.topology.queue(),
                    "connected to RabbitMQ"
                );
                backoff = BACKOFF_MIN;
                self.sender.send_replace(Some(Link {
                    connection: Arc::clone(&connection),
                    channel: channel.clone(),
                }));
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
                    Some(Event::ConnectionBlocked(reason)) => {
                        tracing::warn!(%reason, "RabbitMQ blocked publishing; answering 503 until it unblocks");
                    }
                    Some(Event::ConnectionUnblocked) => tracing::info!("RabbitMQ unblocked publishing"),
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
