//! A subscription that heals itself: the one way anything in offload consumes a queue or a
//! stream for long (a worker its work queue, a gateway the events stream).
//!
//! [`Subscription::next`] hands out deliveries, and in between says when the subscription was
//! lost ([`Delivered::Lost`]) and when it was made anew ([`Delivered::Subscribed`]): delivery
//! tags start again on a fresh channel, and a stream reader resumes from an offset of its
//! choosing ([`Subscription::set_arguments`]). Making it anew waits for the session to be
//! connected; a failed attempt has the session check the topology (the queue may be gone) and
//! backs off before the next.

use std::time::Duration;

use futures_util::StreamExt;
use lapin::{
    Channel, Consumer,
    message::Delivery,
    options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions},
    types::{FieldTable, ShortString},
};

use super::session::{Broker, backoff};

/// What [`Subscription::next`] saw.
// Not boxed: a delivery is moved once, and a box would cost an allocation for each.
#[allow(clippy::large_enum_variant)]
pub enum Delivered {
    /// Subscribed (again) on a fresh channel: its delivery tags start from 1.
    Subscribed,
    /// A message, to be settled on the channel it came on (its `acker`).
    Message(Delivery),
    /// The subscription ended (the reason, for a log line); the next call subscribes again.
    Lost(String),
}

/// A consumer of one queue that subscribes again whenever it is lost.
pub struct Subscription {
    broker: Broker,
    queue: ShortString,
    prefetch: u16,
    arguments: FieldTable,
    current: Option<(Channel, Consumer)>,
    delays: Box<dyn Iterator<Item = Duration> + Send>,
    /// The last attempt failed: wait before the next.
    backing_off: bool,
}

impl Broker {
    /// A subscription to `queue` with `prefetch` unacknowledged messages at most (`basic.qos`
    /// on its own channel) and manual acks. Nothing is sent until the first
    /// [`Subscription::next`].
    pub fn subscribe(&self, queue: &str, prefetch: u16) -> Subscription {
        Subscription {
            broker: self.clone(),
            queue: queue.into(),
            prefetch,
            arguments: FieldTable::default(),
            current: None,
            delays: Box::new(backoff()),
            backing_off: false,
        }
    }
}

impl Subscription {
    /// The `basic.consume` arguments of the next subscription (a stream's `x-stream-offset`).
    pub fn set_arguments(&mut self, arguments: FieldTable) {
        self.arguments = arguments;
    }

    /// The next delivery, or news of the subscription. Cancel-safe, but for a subscription
    /// being made when the future is dropped: it is made again on the next call.
    pub async fn next(&mut self) -> Delivered {
        loop {
            if let Some((_, consumer)) = &mut self.current {
                let lost = match consumer.next().await {
                    Some(Ok(delivery)) => return Delivered::Message(delivery),
                    Some(Err(error)) => error.to_string(),
                    None => {
                        // What deleting the queue does to its consumers, among others.
                        self.broker.check_topology();
                        "the broker cancelled the subscription".to_owned()
                    }
                };
                self.close("subscribing again").await;
                return Delivered::Lost(lost);
            }
            if self.backing_off {
                let delay = self.delays.next().unwrap_or(Duration::from_secs(1));
                tokio::time::sleep(delay).await;
            }
            let link = self.broker.connected().await;
            let subscribing = subscribe(
                link.connection(),
                &self.queue,
                self.prefetch,
                &self.arguments,
            );
            match self.broker.within("the subscription", subscribing).await {
                Ok(subscribed) => {
                    self.current = Some(subscribed);
                    self.delays = Box::new(backoff());
                    self.backing_off = false;
                    return Delivered::Subscribed;
                }
                Err(error) => {
                    tracing::warn!(queue = %self.queue, "cannot subscribe ({error}); retrying");
                    self.broker.check_topology();
                    self.backing_off = true;
                }
            }
        }
    }

    /// Ends the current subscription (its channel is broken, say: an ack failed); the next
    /// call to [`Subscription::next`] makes it anew, after a backoff delay.
    pub async fn restart(&mut self) {
        self.close("subscribing again").await;
        self.backing_off = true;
    }

    /// Asks the broker to send no more (`basic.cancel`), keeping the channel open so that the
    /// deliveries in hand can still be settled; [`Subscription::close`] closes it.
    pub async fn cancel(&mut self) {
        if let Some((channel, consumer)) = &self.current {
            let cancelling = channel.basic_cancel(consumer.tag(), BasicCancelOptions::default());
            if let Err(error) = self.broker.within("cancelling", cancelling).await {
                tracing::warn!(queue = %self.queue, "could not cancel the subscription: {error}");
            }
        }
    }

    /// Closes the subscription's channel: what it delivered and nobody settled goes back to the
    /// queue.
    pub async fn close(&mut self, reason: &str) {
        if let Some((channel, _)) = self.current.take() {
            let closing = channel.close(200, reason.into());
            let _ = self.broker.within("closing the channel", closing).await;
        }
    }
}

/// A channel with `prefetch`, consuming `queue` with manual acks.
async fn subscribe(
    connection: &lapin::Connection,
    queue: &ShortString,
    prefetch: u16,
    arguments: &FieldTable,
) -> Result<(Channel, Consumer), lapin::Error> {
    let channel = connection.create_channel().await?;
    channel
        .basic_qos(prefetch, BasicQosOptions::default())
        .await?;
    let consumer = channel
        .basic_consume(
            queue.clone(),
            "".into(),
            BasicConsumeOptions::default(),
            arguments.clone(),
        )
        .await?;
    Ok((channel, consumer))
}
