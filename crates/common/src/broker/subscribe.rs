//! A subscription that heals itself: the one way anything in offload consumes a queue or a
//! stream for long (a worker its work queue, a gateway the events stream).
//!
//! [`Subscription::next`] hands out deliveries, and in between says when the subscription was
//! lost ([`Delivered::Lost`]) and when it was made anew ([`Delivered::Subscribed`]): delivery
//! tags start again on a fresh channel, and a stream reader resumes from an offset of its
//! choosing ([`Subscription::set_arguments`]). Making it anew waits for the session to be
//! connected; a failed attempt has the session check the topology (the queue may be gone) and
//! backs off before the next.
//!
//! A subscription may have a *gate* ([`Subscription::gated`]): a queue it consumes, on the
//! same channel and before the queue itself, whose deletion stops it
//! ([`Delivered::Paused`]). While the gate is gone it subscribes to nothing, and looks for the
//! gate again every [`GATE_POLL`]; a pause thus takes effect as soon as the broker cancels the
//! gate's consumer, and holds for a process that subscribes (or reconnects) meanwhile.

use std::time::Duration;

use futures_util::StreamExt;
use lapin::{
    Channel, Consumer,
    message::Delivery,
    options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions},
    protocol::AMQPSoftError,
    types::{AMQPValue, FieldTable, LongString, ShortString},
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
    /// The gate is gone: the broker sends nothing more. What was delivered is still to be
    /// settled on the channel it came on, which [`Retired`] keeps open until closed (`None`:
    /// the gate was already gone when subscribing, and nothing was delivered). The next call
    /// waits for the gate to be back, then subscribes again.
    Paused(Option<Retired>),
}

/// How often a paused subscription looks for its gate.
pub const GATE_POLL: std::time::Duration = std::time::Duration::from_secs(1);

/// The channel of a paused subscription, kept open for the deliveries still in hand.
pub struct Retired {
    broker: Broker,
    channel: Channel,
}

impl Retired {
    /// Closes the channel: what it delivered and nobody settled goes back to the queue.
    pub async fn close(self) {
        let closing = self.channel.close(200, "paused".into());
        let _ = self.broker.within("closing the channel", closing).await;
    }
}

/// A subscription's channel, its consumer and its gate's consumer.
struct Current {
    channel: Channel,
    consumer: Consumer,
    gate: Option<Consumer>,
}

/// What one attempt to subscribe made. Not boxed: made once per subscription.
#[allow(clippy::large_enum_variant)]
enum Attempt {
    Consuming(Current),
    /// The gate does not exist (the broker closed the channel on saying so).
    GateClosed,
}

/// A consumer of one queue that subscribes again whenever it is lost.
pub struct Subscription {
    broker: Broker,
    queue: ShortString,
    prefetch: u16,
    arguments: FieldTable,
    gate: Option<ShortString>,
    current: Option<Current>,
    delays: Box<dyn Iterator<Item = Duration> + Send>,
    /// The last attempt failed: wait before the next.
    backing_off: bool,
    /// The gate is gone: wait for it before the next attempt.
    paused: bool,
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
            gate: None,
            current: None,
            delays: Box::new(backoff()),
            backing_off: false,
            paused: false,
        }
    }
}

impl Subscription {
    /// The `basic.consume` arguments of the next subscription (a stream's `x-stream-offset`).
    pub fn set_arguments(&mut self, arguments: FieldTable) {
        self.arguments = arguments;
    }

    /// Consumes `gate` before the queue, and stops while it is gone (see the module's text).
    #[must_use]
    pub fn gated(mut self, gate: &str) -> Self {
        self.gate = Some(gate.into());
        self
    }

    /// The next delivery, or news of the subscription. Cancel-safe, but for a subscription
    /// being made or paused when the future is dropped: it is made again on the next call
    /// (a half-made one's channel is closed).
    pub async fn next(&mut self) -> Delivered {
        loop {
            if let Some(current) = &mut self.current {
                let lost = match next_event(current).await {
                    Event::Delivered(delivery) => return Delivered::Message(delivery),
                    Event::Failed(error) => error,
                    Event::Cancelled => {
                        // What deleting the queue does to its consumers, among others.
                        self.broker.check_topology();
                        "the broker cancelled the subscription".to_owned()
                    }
                    Event::GateGone if gate_is_gone(&self.broker, self.gate.clone()).await => {
                        return self.pause().await;
                    }
                    Event::GateGone => "the gate's consumer ended".to_owned(),
                };
                self.close("subscribing again").await;
                return Delivered::Lost(lost);
            }
            if self.paused {
                self.wait_for_gate().await;
            } else if self.backing_off {
                let delay = self.delays.next().unwrap_or(Duration::from_secs(1));
                tokio::time::sleep(delay).await;
            }
            let link = self.broker.connected().await;
            let subscribing = subscribe(
                link.connection(),
                &self.queue,
                self.prefetch,
                &self.arguments,
                self.gate.as_ref(),
            );
            match self.broker.within("the subscription", subscribing).await {
                Ok(Attempt::Consuming(subscribed)) => {
                    self.current = Some(subscribed);
                    self.delays = Box::new(backoff());
                    self.backing_off = false;
                    return Delivered::Subscribed;
                }
                Ok(Attempt::GateClosed) => {
                    self.paused = true;
                    return Delivered::Paused(None);
                }
                Err(error) => {
                    tracing::warn!(queue = %self.queue, "cannot subscribe ({error}); retrying");
                    self.broker.check_topology();
                    self.backing_off = true;
                }
            }
        }
    }

    /// The gate's consumer was cancelled on a channel still open: stop consuming the queue,
    /// keep the channel for the deliveries in hand.
    async fn pause(&mut self) -> Delivered {
        self.paused = true;
        let Some(current) = self.current.take() else {
            return Delivered::Paused(None);
        };
        let cancelling = current
            .channel
            .basic_cancel(current.consumer.tag(), BasicCancelOptions::default());
        if let Err(error) = self.broker.within("pausing", cancelling).await {
            tracing::warn!(queue = %self.queue, "could not cancel the subscription: {error}");
        }
        Delivered::Paused(Some(Retired {
            broker: self.broker.clone(),
            channel: current.channel,
        }))
    }

    /// Waits until the gate exists again.
    async fn wait_for_gate(&mut self) {
        let Some(gate) = self.gate.clone() else {
            self.paused = false;
            return;
        };
        loop {
            tokio::time::sleep(GATE_POLL).await;
            let link = self.broker.connected().await;
            let topology = self.broker.topology();
            let looking = topology.exists_named(link.connection(), gate.as_str());
            if let Ok(Ok(true)) = tokio::time::timeout(GATE_POLL * 5, looking).await {
                self.paused = false;
                return;
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
        if let Some(Current {
            channel, consumer, ..
        }) = &self.current
        {
            let cancelling = channel.basic_cancel(consumer.tag(), BasicCancelOptions::default());
            if let Err(error) = self.broker.within("cancelling", cancelling).await {
                tracing::warn!(queue = %self.queue, "could not cancel the subscription: {error}");
            }
        }
    }

    /// Closes the subscription's channel: what it delivered and nobody settled goes back to the
    /// queue.
    pub async fn close(&mut self, reason: &str) {
        if let Some(Current { channel, .. }) = self.current.take() {
            let closing = channel.close(200, reason.into());
            let _ = self.broker.within("closing the channel", closing).await;
        }
    }
}

/// Whether the broker says `gate` does not exist: a gate's consumer also ends with its
/// connection, which is no pause.
async fn gate_is_gone(broker: &Broker, gate: Option<ShortString>) -> bool {
    let (Some(gate), Some(link)) = (gate, broker.link()) else {
        return false;
    };
    let asking = broker
        .topology()
        .exists_named(link.connection(), gate.as_str());
    matches!(
        tokio::time::timeout(GATE_POLL * 5, asking).await,
        Ok(Ok(false))
    )
}

/// What happened on a subscription's channel. Not boxed, as [`Delivered`] is not.
#[allow(clippy::large_enum_variant)]
enum Event {
    Delivered(Delivery),
    Failed(String),
    /// The queue's consumer ended.
    Cancelled,
    /// The gate's consumer ended while the channel stayed open: the gate was deleted.
    GateGone,
}

async fn next_event(current: &mut Current) -> Event {
    loop {
        let from_gate = match &mut current.gate {
            Some(gate) => tokio::select! {
                delivered = current.consumer.next() => return delivered_event(delivered),
                from_gate = gate.next() => from_gate,
            },
            None => return delivered_event(current.consumer.next().await),
        };
        match from_gate {
            // A gate holds nothing (x-max-length 0); anything else it says is ignored.
            Some(Ok(_)) => {}
            Some(Err(error)) => return Event::Failed(error.to_string()),
            None if current.channel.status().connected() => return Event::GateGone,
            None => return Event::Failed("the channel closed".to_owned()),
        }
    }
}

fn delivered_event(delivered: Option<Result<Delivery, lapin::Error>>) -> Event {
    match delivered {
        Some(Ok(delivery)) => Event::Delivered(delivery),
        Some(Err(error)) => Event::Failed(error.to_string()),
        None => Event::Cancelled,
    }
}

/// A channel with `prefetch`, consuming `gate` (if any, without acks) and then `queue` with
/// manual acks.
async fn subscribe(
    connection: &lapin::Connection,
    queue: &ShortString,
    prefetch: u16,
    arguments: &FieldTable,
    gate: Option<&ShortString>,
) -> Result<Attempt, lapin::Error> {
    let channel = connection.create_channel().await?;
    // Until the attempt succeeds: an attempt that fails, or that is dropped (its deadline
    // passed while the broker was slow to answer), must not leave a consumer on an open
    // channel that nobody reads, holding up to `prefetch` deliveries for as long as the
    // connection lives.
    let abandoned = CloseUnlessKept(Some(channel.clone()));
    channel
        .basic_qos(prefetch, BasicQosOptions::default())
        .await?;
    let gate = match gate {
        Some(gate) => {
            let consuming = channel
                .basic_consume(
                    gate.clone(),
                    "".into(),
                    BasicConsumeOptions {
                        no_ack: true,
                        ..BasicConsumeOptions::default()
                    },
                    FieldTable::default(),
                )
                .await;
            match consuming {
                Ok(consumer) => Some(consumer),
                Err(error) if crate::topology::is_soft(&error, AMQPSoftError::NOTFOUND) => {
                    return Ok(Attempt::GateClosed);
                }
                Err(error) => return Err(error),
            }
        }
        None => None,
    };
    let consumer = channel
        .basic_consume(
            queue.clone(),
            "".into(),
            BasicConsumeOptions::default(),
            arguments.clone(),
        )
        .await?;
    abandoned.keep();
    Ok(Attempt::Consuming(Current {
        channel,
        consumer,
        gate,
    }))
}

/// How long closing an abandoned attempt's channel may take.
const ABANDONED_CLOSE: Duration = Duration::from_secs(30);

/// A channel closed when this is dropped, unless [`CloseUnlessKept::keep`] was called.
struct CloseUnlessKept(Option<Channel>);

impl CloseUnlessKept {
    fn keep(mut self) {
        self.0 = None;
    }
}

impl Drop for CloseUnlessKept {
    fn drop(&mut self) {
        let (Some(channel), Ok(runtime)) = (self.0.take(), tokio::runtime::Handle::try_current())
        else {
            return;
        };
        if !channel.status().connected() {
            return;
        }
        runtime.spawn(async move {
            let closing = channel.close(200, "the subscription was not made".into());
            let _ = tokio::time::timeout(ABANDONED_CLOSE, closing).await;
        });
    }
}

/// A stream's `basic.consume` arguments: `x-stream-offset` from `offset`, or from the first
/// message kept.
pub fn stream_offset(offset: Option<i64>) -> FieldTable {
    let mut args = FieldTable::default();
    let value = match offset {
        Some(offset) => AMQPValue::LongLongInt(offset),
        None => AMQPValue::LongString(LongString::from("first")),
    };
    args.insert("x-stream-offset".into(), value);
    args
}

/// The stream offset RabbitMQ puts in each delivery's headers.
pub fn offset_of(properties: &lapin::BasicProperties) -> Option<i64> {
    match properties
        .headers()
        .as_ref()?
        .inner()
        .get("x-stream-offset")?
    {
        AMQPValue::LongLongInt(offset) => Some(*offset),
        AMQPValue::LongInt(offset) => Some(i64::from(*offset)),
        _ => None,
    }
}
