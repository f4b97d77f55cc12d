//! Reading the events stream: from its first event at start, then following it, applying
//! each event to the view; and reading one result back from its stream entry.

use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::{BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
use offload_common::{
    Broker, Delivered, Event, EventSink, EventType,
    broker::subscribe::{offset_of, stream_offset},
};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::Tracker;

/// Deliveries the follower lets the broker send ahead (streams need a prefetch).
const FOLLOW_PREFETCH: u16 = 100;
/// Longest a result may take to be read back from the stream.
const RESULT_READ_TIMEOUT: Duration = Duration::from_secs(5);

impl Tracker {
    /// Reads the stream from its first event, then follows it, applying every event, until
    /// `shutdown`. Writes a marker through `sink` first, to learn when it has caught up.
    pub async fn follow(self, broker: Broker, sink: EventSink, shutdown: CancellationToken) {
        let Some(stream) = broker.topology().events_stream() else {
            return;
        };
        let mut subscription = broker.subscribe(&stream, FOLLOW_PREFETCH);
        subscription.set_arguments(stream_offset(None));
        let mut next_offset: Option<i64> = None;
        loop {
            let delivered = tokio::select! {
                () = shutdown.cancelled() => break,
                delivered = subscription.next() => delivered,
            };
            let delivery = match delivered {
                Delivered::Message(delivery) => delivery,
                Delivered::Subscribed => {
                    if !self.is_live() {
                        let mut marker = Event::new(EventType::Gateway);
                        marker.marker = Some(self.inner.marker);
                        sink.emit(marker);
                    }
                    continue;
                }
                // The events stream has no gate.
                Delivered::Paused(_) => continue,
                Delivered::Lost(reason) => {
                    tracing::warn!("reading the events stream failed ({reason}); reading on");
                    // Resume after the last event applied, not from the first again.
                    subscription.set_arguments(stream_offset(next_offset));
                    continue;
                }
            };
            let offset = offset_of(&delivery.properties);
            let writer = delivery
                .properties
                .user_id()
                .as_ref()
                .map(lapin::types::ShortString::as_str);
            for event in offload_common::events::decode_batch(&delivery.data) {
                match event {
                    Ok(event)
                        if self
                            .writers()
                            .is_none_or(|writers| writers.believe(writer, event.event)) =>
                    {
                        self.apply(&event, offset);
                    }
                    Ok(event) => tracing::debug!(
                        writer,
                        event = ?event.event,
                        "skipping an event its writer may not write"
                    ),
                    Err(problem) => tracing::debug!("skipping a stream entry: {problem}"),
                }
            }
            if let Some(offset) = offset {
                next_offset = Some(offset + 1);
            }
            let acked = broker
                .within("an ack", delivery.ack(BasicAckOptions::default()))
                .await;
            if let Err(error) = acked {
                tracing::warn!("reading the events stream failed ({error}); reading on shortly");
                subscription.set_arguments(stream_offset(next_offset));
                subscription.restart().await;
            }
            // lapin's consumer is always ready while deliveries are buffered, so catching up
            // on a backlog would never yield: give requests their turn.
            tokio::task::coop::consume_budget().await;
        }
        subscription.close("done following").await;
    }

    /// Reads the result of task `id` back from the stream entry at `offset`.
    pub async fn read_result(broker: &Broker, id: Uuid, offset: i64) -> Option<serde_json::Value> {
        let stream = broker.topology().events_stream()?;
        let link = broker.link()?;
        let read = async {
            let channel = link.connection().create_channel().await.ok()?;
            channel
                .basic_qos(1, BasicQosOptions::default())
                .await
                .ok()?;
            let mut consumer = channel
                .basic_consume(
                    stream.as_str().into(),
                    "".into(),
                    BasicConsumeOptions::default(),
                    stream_offset(Some(offset)),
                )
                .await
                .ok()?;
            let delivery = consumer.next().await?.ok()?;
            let result = offload_common::events::decode_batch(&delivery.data)
                .filter_map(Result::ok)
                .find(|event| {
                    event.id == Some(id)
                        && matches!(event.event, EventType::Succeeded | EventType::Cancelled)
                        && event.result.is_some()
                })
                .and_then(|event| event.result);
            let _ = channel
                .basic_cancel(consumer.tag(), BasicCancelOptions::default())
                .await;
            let _ = channel.close(200, "result read".into()).await;
            result
        };
        tokio::time::timeout(RESULT_READ_TIMEOUT, read)
            .await
            .ok()
            .flatten()
    }
}
