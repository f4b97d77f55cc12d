//! The ceilings: what raw lapin does on the same broker, queue type and message, with no
//! HTTP and no offload code in the way.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use futures_util::StreamExt;
use lapin::{
    BasicProperties, Channel, Connection, ConnectionProperties,
    options::{
        BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
        ConfirmSelectOptions, QueuePurgeOptions,
    },
    types::FieldTable,
};
use offload_common::{Event, EventType, TaskEnvelope, TaskKind, Topology};

/// The kinds a [`BenchQueue`] declares: the built-in `sleep`, the target benchmark's `http`,
/// and the kinds the spread-over-kinds runs add.
pub const BENCH_KINDS: [&str; 5] = ["sleep", "http", "http2", "http3", "http4"];

/// A queue of the benchmark's own, with offload's topology; deleted by [`BenchQueue::delete`].
pub struct BenchQueue {
    /// Its topology (a quorum queue, as offload declares it).
    pub topology: Topology,
    connection: Connection,
}

impl BenchQueue {
    /// Declares `bench-<label>-<random>` on the broker at `url`.
    pub async fn declare(url: &str, label: &str) -> Result<Self, lapin::Error> {
        let name = format!(
            "bench-{label}-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        );
        // As the gateway declares it by default (events on), with the kind the benchmark's
        // tasks use bound as a worker would bind it.
        let topology = offload_common::BrokerArgs::new(url, name)
            .topology()
            .with_kinds(BENCH_KINDS);
        let connection = Connection::connect(url, ConnectionProperties::default()).await?;
        topology
            .declare(&connection)
            .await
            .expect("a fresh bench queue declares");
        Ok(Self {
            topology,
            connection,
        })
    }

    /// `QUEUE`: what its queues are named after.
    pub fn name(&self) -> &str {
        self.topology.queue()
    }

    /// `kind`'s queue.
    pub fn kind_queue(&self, kind: &str) -> String {
        self.topology.kind_queue(kind)
    }

    /// Removes every ready message, so that phases start from the same empty queues.
    pub async fn purge(&self) -> Result<(), lapin::Error> {
        let channel = self.connection.create_channel().await?;
        for kind in BENCH_KINDS {
            channel
                .queue_purge(
                    self.kind_queue(kind).as_str().into(),
                    QueuePurgeOptions::default(),
                )
                .await?;
        }
        let _ = channel.close(200, "purged".into()).await;
        Ok(())
    }

    /// Deletes the queues and the exchange.
    pub async fn delete(self) {
        let _ = self.topology.delete(&self.connection).await;
        let _ = self.connection.close(200, "bench done".into()).await;
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

/// Publishes the same persistent message from `in_flight` concurrent publishers on one
/// confirm-mode channel (as the gateway does), each awaiting its own confirm, for `length`.
/// Returns the confirmed publishes per second.
pub async fn publish_ceiling(
    url: &str,
    queue: &str,
    in_flight: usize,
    length: Duration,
) -> Result<f64, lapin::Error> {
    Ok(
        publish_ceiling_over(url, &[queue.to_owned()], in_flight, length)
            .await?
            .rate,
    )
}

/// [`publish_ceiling`], with this process's CPU time per confirmed publish over the same
/// window: the raw client's cost, which the gateway's CPU per POST is held against.
pub async fn publish_ceiling_measured(
    url: &str,
    queue: &str,
    in_flight: usize,
    length: Duration,
) -> Result<Measured, lapin::Error> {
    publish_ceiling_over(url, &[queue.to_owned()], in_flight, length).await
}

/// [`publish_ceiling`], publisher n publishing to `queues[n % queues.len()]`; with this
/// process's CPU time per confirmed publish.
pub async fn publish_ceiling_over(
    url: &str,
    queues: &[String],
    in_flight: usize,
    length: Duration,
) -> Result<Measured, lapin::Error> {
    let (connection, channel) = confirm_channel(url).await?;
    let (body, properties) = zero_work_task("sleep");
    let confirmed = Arc::new(AtomicU64::new(0));
    let running = Arc::new(AtomicBool::new(true));
    let mut publishers = Vec::new();
    for n in 0..in_flight {
        let channel = channel.clone();
        let body = body.clone();
        let properties = properties.clone();
        let queue = queues[n % queues.len()].clone();
        let confirmed = Arc::clone(&confirmed);
        let running = Arc::clone(&running);
        publishers.push(tokio::spawn(async move {
            while running.load(Ordering::Relaxed) {
                if publish_acked(&channel, &queue, &body, &properties).await? {
                    confirmed.fetch_add(1, Ordering::Relaxed);
                }
            }
            Ok::<_, lapin::Error>(())
        }));
    }
    let measured = measure(&confirmed, length, || crate::process::cpu_time_of("self")).await;
    running.store(false, Ordering::Relaxed);
    for publisher in publishers {
        publisher.await.expect("a publisher task does not panic")?;
    }
    let _ = connection.close(200, "ceiling measured".into()).await;
    Ok(measured)
}

/// Publishes `body` to `queue` (mandatory, as the gateway publishes a task) and awaits its
/// confirm: whether the broker acked it.
async fn publish_acked(
    channel: &Channel,
    queue: &str,
    body: &[u8],
    properties: &BasicProperties,
) -> Result<bool, lapin::Error> {
    let confirm = channel
        .basic_publish(
            "".into(),
            queue.into(),
            BasicPublishOptions {
                mandatory: true,
                ..BasicPublishOptions::default()
            },
            body,
            properties.clone(),
        )
        .await?
        .await?;
    Ok(confirm.is_ack())
}

/// Raw lapin publishing open loop at `rate` for `length`: `in_flight` publishers on one
/// confirm channel, each on its own schedule, each publish timed from when its schedule said
/// to send it to its confirm, as [`crate::http::open_loop`] times POST /tasks. The latency
/// the broker and this machine allow a publisher at that rate, without HTTP or offload.
pub async fn publish_open_loop(
    url: &str,
    queue: &str,
    rate: f64,
    length: Duration,
    in_flight: usize,
) -> Result<Vec<Duration>, lapin::Error> {
    let (connection, channel) = confirm_channel(url).await?;
    let (body, properties) = zero_work_task("sleep");
    let in_flight_f64 = f64::from(u32::try_from(in_flight).unwrap_or(u32::MAX));
    let period = Duration::from_secs_f64(in_flight_f64 / rate.max(1.0));
    let start = tokio::time::Instant::now();
    let end = start + length;
    let latencies = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut publishers = tokio::task::JoinSet::new();
    for n in 0..in_flight {
        let (channel, body, properties) = (channel.clone(), body.clone(), properties.clone());
        let (queue, latencies) = (queue.to_owned(), Arc::clone(&latencies));
        let offset = period.mul_f64(f64::from(u32::try_from(n).unwrap_or(0)) / in_flight_f64);
        publishers.spawn(async move {
            let mut scheduled = start + offset;
            while scheduled < end {
                tokio::time::sleep_until(scheduled).await;
                if publish_acked(&channel, &queue, &body, &properties).await? {
                    latencies
                        .lock()
                        .expect("latencies lock")
                        .push(scheduled.elapsed());
                }
                scheduled += period;
            }
            Ok::<_, lapin::Error>(())
        });
    }
    while let Some(publisher) = publishers.join_next().await {
        publisher.expect("a publisher task does not panic")?;
    }
    let _ = connection.close(200, "open loop measured".into()).await;
    Ok(std::mem::take(
        &mut *latencies.lock().expect("latencies lock"),
    ))
}

/// Counts `counter` over `length` after a warm-up of a fifth of it; returns the rate per
/// second.
pub async fn measure_rate(counter: &AtomicU64, length: Duration) -> f64 {
    measure(counter, length, || None).await.rate
}

/// A rate, and the CPU time a process spent per operation over the same window.
#[derive(Debug, Clone, Copy)]
pub struct Measured {
    /// Operations per second.
    pub rate: f64,
    /// CPU time per operation, if the process's CPU time could be read.
    pub cpu_per_op: Option<Duration>,
}

/// Counts `counter` over `length` after a warm-up of a fifth of it, and the CPU time `cpu`
/// reads (a process's, so far) over the same window.
pub async fn measure(
    counter: &AtomicU64,
    length: Duration,
    cpu: impl Fn() -> Option<Duration>,
) -> Measured {
    tokio::time::sleep(length / 5).await;
    let (from, cpu_from) = (counter.load(Ordering::Relaxed), cpu());
    let started = Instant::now();
    tokio::time::sleep(length).await;
    let (to, cpu_to) = (counter.load(Ordering::Relaxed), cpu());
    let count = to - from;
    let cpu_per_op = cpu_from
        .zip(cpu_to)
        .filter(|_| count > 0)
        .map(|(from, to)| to.saturating_sub(from) / u32::try_from(count).unwrap_or(u32::MAX));
    Measured {
        rate: per_second(count, started.elapsed()),
        cpu_per_op,
    }
}

/// `count` over `elapsed`, per second.
pub fn per_second(count: u64, elapsed: Duration) -> f64 {
    #[allow(clippy::cast_precision_loss)] // counts here stay far below 2^52
    let count = count as f64;
    count / elapsed.as_secs_f64()
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
