//! A work queue of the test's own, declared with offload's topology and deleted afterwards.

use lapin::{
    BasicProperties, Connection, ConnectionProperties,
    options::{BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions},
    types::FieldTable,
};
use offload_common::Topology;

/// The kinds a [`TestQueue`] comes with bound: the built-in `sleep` and the kinds of the
/// tests' own handlers.
pub const TEST_KINDS: &[&str] = &[
    "sleep",
    "sum",
    "k",
    "report.daily",
    "always-fails",
    "count",
    "counted",
    "crash",
    "explode",
    "hang",
    "panic",
];

/// Kinds that tests' own workers bind by themselves (their handlers, their targets, the Rust
/// example's): not declared with a [`TestQueue`], but their queues and gates deleted with it.
/// A test whose worker runs a kind of its own adds it here, or leaves queues behind.
const WORKER_KINDS: &[&str] = &[
    "work",
    "limited",
    "echo",
    "closed",
    "flaky",
    "py-work",
    "slow-call",
    "reverse",
    "rejects",
    "resize",
    "retries-later",
    "fails-first-run",
    "stops-when-told",
    "ignores-cancel",
];

/// A uniquely named queue (and its dead-letter queue and exchange). Deleted on drop, so
/// tests can run in parallel against the shared broker and leave nothing behind.
pub struct TestQueue {
    url: String,
    topology: Topology,
    connection: Connection,
}

impl TestQueue {
    /// Declares a fresh queue named `offload-test-<label>-<random>` on the broker at `url`, with
    /// [`TEST_KINDS`] bound.
    pub async fn declare(url: &str, label: &str, delivery_limit: u32) -> Self {
        Self::declare_with(url, label, delivery_limit, None).await
    }

    /// Like [`TestQueue::declare`], with a length limit.
    pub async fn declare_with(
        url: &str,
        label: &str,
        delivery_limit: u32,
        max_length: Option<u32>,
    ) -> Self {
        Self::declare_topology(url, label, |topology| {
            topology
                .with_max_length(max_length)
                .with_delivery_limit(delivery_limit)
        })
        .await
    }

    /// Declares a fresh queue with the topology `shape` makes of the default one.
    pub async fn declare_topology(
        url: &str,
        label: &str,
        shape: impl FnOnce(Topology) -> Topology,
    ) -> Self {
        let name = format!(
            "offload-test-{label}-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        );
        // As the gateway declares it by default (events on), with the tests' kinds bound as
        // their workers would: tests may submit tasks before their worker has subscribed.
        let topology = shape(
            offload_common::BrokerArgs::new(url, name)
                .topology()
                .with_kinds(TEST_KINDS.iter().copied()),
        );
        let connection = Connection::connect(url, ConnectionProperties::default())
            .await
            .expect(
                "tests need RabbitMQ at AMQP_URL (default amqp://guest:guest@127.0.0.1:5672/%2f)",
            );
        topology
            .declare(&connection)
            .await
            .expect("declare test topology");
        Self {
            url: url.to_owned(),
            topology,
            connection,
        }
    }

    /// `QUEUE`: what its queues are named after.
    pub fn name(&self) -> &str {
        self.topology.queue()
    }

    /// The topology.
    pub fn topology(&self) -> &Topology {
        &self.topology
    }

    /// Removes every ready task from its kinds' queues, so that phases start from the same
    /// empty queues.
    pub async fn purge(&self) -> Result<(), lapin::Error> {
        let channel = self.connection.create_channel().await?;
        for kind in self.topology.kinds() {
            channel
                .queue_purge(
                    self.topology.kind_queue(kind).as_str().into(),
                    lapin::options::QueuePurgeOptions::default(),
                )
                .await?;
        }
        let _ = channel.close(200, "purged".into()).await;
        Ok(())
    }

    /// The test's own connection to the broker.
    pub fn connection(&self) -> &Connection {
        &self.connection
    }

    /// Ready messages and consumers of `queue`; `(0, 0)` if it does not exist (yet).
    pub async fn counts(&self, queue: &str) -> (u32, u32) {
        let channel = self
            .connection
            .create_channel()
            .await
            .expect("open channel");
        let declared = channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await;
        match declared {
            Ok(declared) => {
                let _ = channel.close(200, "done".into()).await;
                (declared.message_count(), declared.consumer_count())
            }
            Err(_) => (0, 0),
        }
    }

    /// Messages ready on the kinds' queues (not counting those delivered and not yet acked).
    pub async fn ready(&self) -> u32 {
        let mut ready = 0;
        for kind in self.topology.kinds() {
            ready += self.counts(&self.topology.kind_queue(kind)).await.0;
        }
        ready
    }

    /// Messages ready on `kind`'s queue.
    pub async fn ready_of(&self, kind: &str) -> u32 {
        self.counts(&self.topology.kind_queue(kind)).await.0
    }

    /// Workers consuming the `sleep` kind (which every test worker runs).
    pub async fn consumers(&self) -> u32 {
        self.consumers_of("sleep").await
    }

    /// Workers consuming `kind`.
    pub async fn consumers_of(&self, kind: &str) -> u32 {
        self.counts(&self.topology.kind_queue(kind)).await.1
    }

    /// Messages in the dead-letter queue.
    pub async fn dead(&self) -> u32 {
        self.counts(&self.topology.dead_letter_queue()).await.0
    }

    /// Takes one message off the dead-letter queue (acked), if there is one.
    pub async fn take_dead(&self) -> Option<lapin::message::BasicGetMessage> {
        self.get(&self.topology.dead_letter_queue()).await
    }

    /// Takes one message off the kinds' queues (acked), if there is one.
    pub async fn take_ready(&self) -> Option<lapin::message::BasicGetMessage> {
        // One channel for every kind: a poll must not cost a channel per kind.
        let channel = self
            .connection
            .create_channel()
            .await
            .expect("open channel");
        let mut taken = None;
        for kind in self.topology.kinds() {
            taken = channel
                .basic_get(
                    self.topology.kind_queue(kind).as_str().into(),
                    BasicGetOptions { no_ack: true },
                )
                .await
                .expect("basic.get");
            if taken.is_some() {
                break;
            }
        }
        let _ = channel.close(200, "done".into()).await;
        taken
    }

    async fn get(&self, queue: &str) -> Option<lapin::message::BasicGetMessage> {
        let channel = self
            .connection
            .create_channel()
            .await
            .expect("open channel");
        let message = channel
            .basic_get(queue.into(), BasicGetOptions { no_ack: true })
            .await
            .expect("basic.get");
        let _ = channel.close(200, "done".into()).await;
        message
    }

    /// Publishes raw bytes straight onto `kind`'s queue, bypassing the gateway: what a buggy
    /// or foreign producer might send.
    pub async fn publish_raw(&self, kind: &str, body: &[u8], properties: BasicProperties) {
        let queue = self.topology.kind_queue(kind);
        publish_confirmed(&self.connection, "", &queue, body, properties).await;
    }
}

/// Publishes `body` (mandatory) on a confirm-mode channel of its own and waits for the
/// broker's confirm: from then on the broker holds it. Panics unless it was routed and
/// confirmed.
pub async fn publish_confirmed(
    connection: &Connection,
    exchange: &str,
    routing_key: &str,
    body: &[u8],
    properties: BasicProperties,
) {
    let channel = connection.create_channel().await.expect("open channel");
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirm mode");
    let confirm = channel
        .basic_publish(
            exchange.into(),
            routing_key.into(),
            BasicPublishOptions {
                mandatory: true,
                ..BasicPublishOptions::default()
            },
            body,
            properties,
        )
        .await
        .expect("publish")
        .await
        .expect("confirm");
    assert!(
        confirm.is_ack() && confirm.take_message().is_none(),
        "publish routed and confirmed"
    );
    let _ = channel.close(200, "done".into()).await;
}

impl Drop for TestQueue {
    fn drop(&mut self) {
        // Async clean-up from a synchronous drop: a thread of its own with its own runtime,
        // so it works whether or not the test's runtime is still running.
        let url = self.url.clone();
        let kinds: Vec<String> = (self.topology.kinds().iter().map(String::as_str))
            .chain(TEST_KINDS.iter().chain(WORKER_KINDS).copied())
            .map(str::to_owned)
            .collect();
        let topology = self.topology.clone().with_kinds(kinds);
        let cleanup = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime for clean-up");
            runtime.block_on(async {
                if let Ok(connection) =
                    Connection::connect(&url, ConnectionProperties::default()).await
                {
                    if let Err(error) = topology.delete(&connection).await {
                        eprintln!("could not delete test queue {}: {error}", topology.queue());
                    }
                    let _ = connection.close(200, "done".into()).await;
                }
            });
        });
        let _ = cleanup.join();
    }
}

/// The task id a message carries as its `message_id`, if it is one.
pub fn task_id_of(message: &lapin::message::BasicGetMessage) -> Option<uuid::Uuid> {
    message
        .delivery
        .properties
        .message_id()
        .as_ref()
        .and_then(|id| id.as_str().parse().ok())
}

/// A header of a message as text (offload's `x-offload-reason`, say), if present.
pub fn header_text(message: &lapin::message::BasicGetMessage, name: &str) -> Option<String> {
    let headers = message.delivery.properties.headers().as_ref()?;
    match headers.inner().get(name)? {
        lapin::types::AMQPValue::LongString(text) => {
            Some(String::from_utf8_lossy(text.as_bytes()).into_owned())
        }
        lapin::types::AMQPValue::LongLongInt(n) => Some(n.to_string()),
        other => Some(format!("{other:?}")),
    }
}
