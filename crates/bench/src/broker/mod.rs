//! The ceilings: what raw lapin does on the same broker, queue type and message, with no
//! HTTP and no offload code in the way: publishing (`publish.rs`), consuming (`drain.rs`),
//! and how they are timed (`measure.rs`); here, the benchmark's queues and what fills them.

mod drain;
mod measure;
mod publish;

pub use drain::{drain_ceiling, drain_ceiling_with_events};
pub use measure::{Measured, measure, measure_rate, per_second};
pub use publish::{
    publish_ceiling, publish_ceiling_measured, publish_ceiling_over, publish_open_loop,
};

use futures_util::StreamExt;
use lapin::{
    BasicProperties, Channel, Connection, ConnectionProperties,
    options::{BasicPublishOptions, ConfirmSelectOptions},
};
use offload_common::{Event, EventType, TaskEnvelope, TaskKind, Topology};
use offload_tests::TestQueue;

/// The kinds a [`BenchQueue`] declares: the built-in `sleep`, the target benchmark's `http`,
/// and the kinds the spread-over-kinds runs add.
pub const BENCH_KINDS: [&str; 5] = ["sleep", "http", "http2", "http3", "http4"];

/// A queue of the benchmark's own, with offload's topology: the harness's [`TestQueue`] with
/// [`BENCH_KINDS`] bound, deleted by [`BenchQueue::delete`] (or when dropped).
pub struct BenchQueue(TestQueue);

impl BenchQueue {
    /// Declares `offload-test-bench-<label>-<random>` on the broker at `url`, as the gateway
    /// declares it by default (events on), with the benchmark's kinds bound as a worker would
    /// bind them.
    pub async fn declare(url: &str, label: &str) -> Self {
        let label = format!("bench-{label}");
        Self(
            TestQueue::declare_topology(url, &label, |topology| topology.with_kinds(BENCH_KINDS))
                .await,
        )
    }

    /// `QUEUE`: what its queues are named after.
    pub fn name(&self) -> &str {
        self.0.name()
    }

    /// Its topology (a quorum queue per kind, as offload declares them).
    pub fn topology(&self) -> &Topology {
        self.0.topology()
    }

    /// `kind`'s queue.
    pub fn kind_queue(&self, kind: &str) -> String {
        self.0.topology().kind_queue(kind)
    }

    /// Removes every ready message, so that phases start from the same empty queues.
    pub async fn purge(&self) -> Result<(), lapin::Error> {
        self.0.purge().await
    }

    /// Deletes the queues and the exchanges.
    pub fn delete(self) {
        drop(self);
    }
}

/// A zero-work task of `kind` exactly as the gateway would publish it: its body and
/// properties.
pub fn zero_work_task(kind: &str) -> (Vec<u8>, BasicProperties) {
    let kind = TaskKind::try_from(kind).expect("the benchmark's kinds are valid");
    let task = TaskEnvelope::new(kind, serde_json::json!({"message": "bench"}));
    (task.to_bytes(), task.properties())
}

async fn confirm_channel(url: &str) -> Result<(Connection, Channel), lapin::Error> {
    let connection = Connection::connect(url, ConnectionProperties::default()).await?;
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    Ok((connection, channel))
}

/// Puts `count` zero-work tasks of `kind` on `queue`, confirmed, as fast as the broker takes
/// them.
pub async fn fill(url: &str, queue: &str, kind: &str, count: u64) -> Result<(), lapin::Error> {
    let (connection, channel) = confirm_channel(url).await?;
    let (body, properties) = zero_work_task(kind);
    let mut pending = futures_util::stream::FuturesUnordered::new();
    for _ in 0..count {
        let confirm = publish_to(&channel, queue, &body, &properties).await?;
        pending.push(confirm);
        // Keep a window, not all of them, in flight.
        if pending.len() >= 256 {
            pending.next().await.transpose()?;
        }
    }
    while pending.next().await.transpose()?.is_some() {}
    let _ = connection.close(200, "filled".into()).await;
    Ok(())
}

/// Appends `count` cancels of tasks nobody will ever see to the control stream `stream`, as
/// gateways write them: what a worker reads at its start and holds in memory.
pub async fn fill_control(url: &str, stream: &str, count: u64) -> Result<(), lapin::Error> {
    let (connection, channel) = confirm_channel(url).await?;
    let properties = lapin::BasicProperties::default().with_delivery_mode(2);
    let mut pending = futures_util::stream::FuturesUnordered::new();
    for _ in 0..count {
        let body = offload_common::control::Record::Cancel {
            id: uuid::Uuid::new_v4(),
            task: uuid::Uuid::new_v4(),
            kind: "sleep".into(),
            at: std::time::SystemTime::now(),
        }
        .to_bytes();
        pending.push(publish_to(&channel, stream, &body, &properties).await?);
        if pending.len() >= 256 {
            pending.next().await.transpose()?;
        }
    }
    while pending.next().await.transpose()?.is_some() {}
    let _ = connection.close(200, "filled".into()).await;
    Ok(())
}

/// Publishes `body` straight to `queue` (through the default exchange); the confirm to await.
async fn publish_to(
    channel: &Channel,
    queue: &str,
    body: &[u8],
    properties: &BasicProperties,
) -> Result<lapin::PublisherConfirm, lapin::Error> {
    channel
        .basic_publish(
            "".into(),
            queue.into(),
            BasicPublishOptions::default(),
            body,
            properties.clone(),
        )
        .await
}

/// The properties of a stream message holding a batch of events, as offload writes them.
fn event_batch_properties() -> BasicProperties {
    BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type(offload_common::events::CONTENT_TYPE.into())
}

/// Writes `tasks` finished tasks to `stream` as `succeeded` events, `per_message` to a stream
/// message, as workers would; returns their ids.
pub async fn write_events(
    url: &str,
    stream: &str,
    tasks: usize,
    per_message: usize,
) -> Result<Vec<uuid::Uuid>, lapin::Error> {
    write_events_with(url, stream, tasks, per_message, |id| {
        let mut event = Event::task(EventType::Succeeded, id, "sleep");
        event.attempt = Some(1);
        event.duration_ms = Some(3);
        vec![event]
    })
    .await
}

/// Like [`write_events`], each task's events made by `events_of` from its id.
pub async fn write_events_with(
    url: &str,
    stream: &str,
    tasks: usize,
    per_message: usize,
    events_of: impl Fn(uuid::Uuid) -> Vec<Event>,
) -> Result<Vec<uuid::Uuid>, lapin::Error> {
    let (connection, channel) = confirm_channel(url).await?;
    let ids: Vec<uuid::Uuid> = (0..tasks).map(|_| uuid::Uuid::new_v4()).collect();
    let properties = event_batch_properties();
    let mut pending = futures_util::stream::FuturesUnordered::new();
    for chunk in ids.chunks(per_message.max(1)) {
        let events: Vec<Event> = chunk.iter().flat_map(|id| events_of(*id)).collect();
        let body = offload_common::events::encode_batch(&events);
        let confirm = publish_to(&channel, stream, &body, &properties).await?;
        pending.push(confirm);
        if pending.len() >= 64 {
            pending.next().await.transpose()?;
        }
    }
    while pending.next().await.transpose()?.is_some() {}
    let _ = connection.close(200, "events written".into()).await;
    Ok(ids)
}
