//! The drain ceiling: raw lapin consume-and-ack, without and with lifecycle events.

use std::time::Instant;

use futures_util::StreamExt;
use lapin::{
    Channel, Connection, ConnectionProperties,
    options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions, ConfirmSelectOptions},
    types::FieldTable,
};
use offload_common::{Event, EventType};

use super::{event_batch_properties, per_second, publish_to};

/// Consumes `count` messages from `queue` at `prefetch`, acking each, with no decoding and
/// no work: the drain ceiling. Acks are sent concurrently, as the worker settles deliveries
/// from their own tasks, so the ceiling is not held back by waiting on each ack in turn.
/// Returns messages per second, from the subscription to the last ack.
pub async fn drain_ceiling(
    url: &str,
    queue: &str,
    prefetch: u16,
    count: u64,
) -> Result<f64, lapin::Error> {
    let connection = Connection::connect(url, ConnectionProperties::default()).await?;
    let started = Instant::now();
    let (_channel, mut consumer) = consume(&connection, queue, prefetch, "bench-ceiling").await?;
    let mut acks = futures_util::stream::FuturesUnordered::new();
    let (mut received, mut acked) = (0, 0);
    while acked < count {
        tokio::select! {
            Some(done) = acks.next(), if !acks.is_empty() => {
                done?;
                acked += 1;
            }
            delivery = consumer.next(), if received < count => {
                let Some(delivery) = delivery else { break };
                let delivery = delivery?;
                received += 1;
                acks.push(async move { delivery.ack(BasicAckOptions::default()).await });
            }
        }
    }
    let rate = per_second(acked, started.elapsed());
    let _ = connection.close(200, "drained".into()).await;
    Ok(rate)
}

/// The drain ceiling with lifecycle events: [`drain_ceiling`]'s consume-and-ack loop keeping
/// offload's promise at no cost of its own. Each delivery adds a `started` and a `succeeded`
/// event to a batch; a batch goes to `stream` as one message whenever fewer than two are
/// awaiting their confirm (as the worker's sink sends them), and once confirmed, its
/// deliveries are settled with one `multiple` ack (as the worker folds them). What is left
/// between this and the worker is the worker's own cost; what lies between this and
/// [`drain_ceiling`] is the broker's cost of the events. Returns messages per second.
pub async fn drain_ceiling_with_events(
    url: &str,
    queue: &str,
    stream: &str,
    prefetch: u16,
    count: u64,
) -> Result<f64, lapin::Error> {
    const IN_FLIGHT: usize = 2;
    let connection = Connection::connect(url, ConnectionProperties::default()).await?;
    let publisher = connection.create_channel().await?;
    publisher
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let properties = event_batch_properties();
    let started = Instant::now();
    let (_channel, mut consumer) =
        consume(&connection, queue, prefetch, "bench-ceiling-events").await?;
    // Confirms are taken in the order the batches were sent, so a `multiple` ack never
    // settles a delivery whose batch is still unconfirmed.
    let mut confirming = futures_util::stream::FuturesOrdered::new();
    let mut batch: Vec<Event> = Vec::new();
    let mut last = None;
    let (mut received, mut acked, mut in_batch) = (0, 0, 0);
    while acked < count {
        tokio::select! {
            Some(done) = confirming.next(), if !confirming.is_empty() => {
                let (newest, tasks): (lapin::Acker, u64) = done?;
                newest.ack(BasicAckOptions { multiple: true }).await?;
                acked += tasks;
            }
            delivery = consumer.next(), if received < count => {
                let Some(delivery) = delivery else { break };
                let delivery = delivery?;
                received += 1;
                let id = uuid::Uuid::new_v4();
                let mut started = Event::task(EventType::Started, id, "sleep");
                started.attempt = Some(1);
                started.worker = Some("bench-ceiling".into());
                let mut succeeded = Event::task(EventType::Succeeded, id, "sleep");
                succeeded.attempt = Some(1);
                succeeded.duration_ms = Some(0);
                batch.extend([started, succeeded]);
                last = Some(delivery.acker);
                in_batch += 1;
            }
        }
        if confirming.len() < IN_FLIGHT
            && let Some(acker) = last.take()
        {
            let body = offload_common::events::encode_batch(&batch);
            batch.clear();
            let confirm = publish_to(&publisher, stream, &body, &properties).await?;
            let tasks = std::mem::take(&mut in_batch);
            confirming.push_back(async move { confirm.await.map(|_| (acker, tasks)) });
        }
    }
    let rate = per_second(acked, started.elapsed());
    let _ = connection.close(200, "drained".into()).await;
    Ok(rate)
}

/// Subscribes to `queue` at `prefetch` on a channel of its own; the channel closes when the
/// returned handle to it is dropped.
async fn consume(
    connection: &Connection,
    queue: &str,
    prefetch: u16,
    tag: &str,
) -> Result<(Channel, lapin::Consumer), lapin::Error> {
    let channel = connection.create_channel().await?;
    channel
        .basic_qos(prefetch, BasicQosOptions::default())
        .await?;
    let consumer = channel
        .basic_consume(
            queue.into(),
            tag.into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    Ok((channel, consumer))
}
