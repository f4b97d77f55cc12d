//! Publishing with a publisher confirm: the one way anything in offload puts a message on the
//! broker (a task, a retry's or a dead task's copy, a batch of events).
//!
//! [`Broker::send`] writes the message on the session's confirm-mode channel and hands back
//! the confirm to await ([`Sent::confirmed`]); [`Broker::publish_confirmed`] does both within
//! one deadline. Every answer of the broker comes back as one [`PublishError`] that callers
//! map, and the session is told what it must know on the way: a nack renews the publishing
//! channel ([`Broker::report_nack`]), and a return from a destination the topology declares
//! has the session declare it again ([`Broker::report_unroutable`]).

use std::time::Duration;

use lapin::{
    BasicProperties, Confirmation, PublisherConfirm, options::BasicPublishOptions,
    types::ShortString,
};

use super::session::{Broker, Link};

/// One message to publish: persistent delivery and headers are the caller's, in `properties`.
/// Always published `mandatory`, so an unroutable message comes back instead of vanishing.
pub struct Message<'a> {
    /// The exchange; `""` is the default exchange, which routes to the queue named by the key.
    pub exchange: ShortString,
    /// The routing key.
    pub routing_key: ShortString,
    /// The body.
    pub body: &'a [u8],
    /// The properties (delivery mode, ids, headers).
    pub properties: BasicProperties,
    /// What a return means.
    pub returns: Returns,
}

/// What it means when the broker returns a message unrouted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Returns {
    /// The destination is part of the declared topology: a return means it is gone, and the
    /// session declares the topology again.
    TopologyGone,
    /// The routing key may simply have no binding (a task of a kind no worker bound): the
    /// caller decides what the return means.
    MaybeUnbound,
}

impl<'a> Message<'a> {
    /// A message for the queue named `queue`, through the default exchange.
    pub fn to_queue(queue: &str, body: &'a [u8], properties: BasicProperties) -> Self {
        Self::to_exchange("", queue, body, properties)
    }

    /// A message for `exchange` with `routing_key`; a return means the topology is gone
    /// unless [`Message::maybe_unbound`] says otherwise.
    pub fn to_exchange(
        exchange: &str,
        routing_key: &str,
        body: &'a [u8],
        properties: BasicProperties,
    ) -> Self {
        Self {
            exchange: exchange.into(),
            routing_key: routing_key.into(),
            body,
            properties,
            returns: Returns::TopologyGone,
        }
    }

    /// Leaves what a return means to the caller ([`Returns::MaybeUnbound`]).
    #[must_use]
    pub fn maybe_unbound(mut self) -> Self {
        self.returns = Returns::MaybeUnbound;
        self
    }
}

/// Why a publish is not confirmed. Every variant means "not on the queue as far as we know";
/// all but [`PublishError::Timeout`] mean it certainly is not.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// No live connection to the broker right now.
    #[error("not connected to RabbitMQ")]
    Disconnected,
    /// The broker refused the message (a queue at its length limit, or a leader moving).
    #[error("RabbitMQ refused the message (nack: the queue is full, or its leader is moving)")]
    Nacked,
    /// The broker could not route the message; its reply text.
    #[error("RabbitMQ returned the message unrouted ({0})")]
    Returned(String),
    /// No confirm came in time; the message may or may not be queued.
    #[error("RabbitMQ did not confirm within {}", humantime::format_duration(*.0))]
    Timeout(Duration),
    /// The channel failed while publishing (typically the connection dropped).
    #[error("publishing failed: {0}")]
    Channel(#[from] lapin::Error),
}

/// A message written to the broker, its confirm still to come. Holds the [`Link`] it went on,
/// so the channel stays open until the confirm is settled.
pub struct Sent {
    broker: Broker,
    link: Link,
    confirm: PublisherConfirm,
    returns: Returns,
}

impl Broker {
    /// Writes `message` on the session's publishing channel. Fails at once when disconnected.
    /// The frames are written in the order of the calls, so messages sent one after the other
    /// reach their queue in that order.
    pub async fn send(&self, message: Message<'_>) -> Result<Sent, PublishError> {
        let link = self.link().ok_or(PublishError::Disconnected)?;
        let confirm = link
            .publisher()
            .basic_publish(
                message.exchange,
                message.routing_key,
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                message.body,
                message.properties,
            )
            .await?;
        Ok(Sent {
            broker: self.clone(),
            link,
            confirm,
            returns: message.returns,
        })
    }

    /// Sends `message` and waits for the broker's confirm, all within `timeout`: `Ok` means
    /// the broker has it, nothing else does.
    pub async fn publish_confirmed(
        &self,
        message: Message<'_>,
        timeout: Duration,
    ) -> Result<(), PublishError> {
        let publish = async { self.send(message).await?.confirmed().await };
        tokio::time::timeout(timeout, publish)
            .await
            .unwrap_or(Err(PublishError::Timeout(timeout)))
    }
}

impl Sent {
    /// The broker's answer, told to the session where it must act on it (see the module's
    /// documentation). Unbounded: wrap it in a timeout, or use [`Sent::confirmed_within`].
    pub async fn confirmed(self) -> Result<(), PublishError> {
        let answer = self.confirm.await?;
        match answer {
            Confirmation::Ack(None) => Ok(()),
            Confirmation::Ack(Some(returned)) => {
                if self.returns == Returns::TopologyGone {
                    self.broker.report_unroutable();
                }
                Err(PublishError::Returned(returned.reply_text.to_string()))
            }
            // NotRequested cannot happen (the channel is put in confirm mode before it is
            // handed out); were it to, it is no confirm, so it is not a success.
            Confirmation::Nack(_) | Confirmation::NotRequested => {
                self.broker.report_nack(&self.link);
                Err(PublishError::Nacked)
            }
        }
    }

    /// [`Sent::confirmed`], waiting at most `timeout`.
    pub async fn confirmed_within(self, timeout: Duration) -> Result<(), PublishError> {
        tokio::time::timeout(timeout, self.confirmed())
            .await
            .unwrap_or(Err(PublishError::Timeout(timeout)))
    }

    /// The link the message went on.
    pub fn link(&self) -> &Link {
        &self.link
    }
}
