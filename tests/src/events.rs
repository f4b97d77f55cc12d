//! The events stream of a test queue, read as a user's program would read it: from its first
//! event, following it, through broker restarts and cut connections. Tests learn what
//! happened to tasks here (who started them, who finished them), not from log lines.

use std::{
    collections::HashSet,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use futures_util::StreamExt;
use lapin::{
    Connection, ConnectionProperties,
    options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions},
    types::{AMQPValue, FieldTable, LongString},
};
use offload_common::{Event, EventType, events::decode_batch};
use uuid::Uuid;

/// Stream messages the follower lets the broker send ahead.
const PREFETCH: u16 = 500;
/// Between two attempts to connect or subscribe (the stream may not be declared yet).
const RETRY: Duration = Duration::from_millis(100);
/// Longest wait for one answer of the broker before the connection is given up: lapin can
/// leave a request pending for good when its connection dies meanwhile (amqp-rs/lapin#409),
/// as the tests' proxies make connections do.
const ANSWER: Duration = Duration::from_secs(5);

/// Every event of `<queue>.events` so far, kept by a task that follows the stream until
/// this is dropped.
pub struct EventLog {
    events: Arc<Mutex<Vec<Event>>>,
    follower: tokio::task::JoinHandle<()>,
    /// Where to write a marker ([`EventLog::sync`]): the first URL, and the stream.
    url: String,
    stream: String,
}

impl EventLog {
    /// Follows the events stream of `queue` on the broker at `urls` (one URL, or a cluster's
    /// comma-separated list), from its first event. Returns at once; the stream may not
    /// exist yet (the first worker or gateway declares it).
    pub fn follow(urls: &str, queue: &str) -> Self {
        let events = Arc::new(Mutex::new(Vec::new()));
        let urls: Vec<String> = urls.split(',').map(|url| url.trim().to_owned()).collect();
        let stream = format!("{queue}.events");
        let follower = tokio::spawn(follow(urls.clone(), stream.clone(), Arc::clone(&events)));
        Self {
            events,
            follower,
            url: urls[0].clone(),
            stream,
        }
    }

    /// Returns once every event on the stream now has been read: writes a marker (as a
    /// gateway does at its start) and waits to read it back. Before asserting that something
    /// did *not* happen.
    pub async fn sync(&self) {
        let marker = Uuid::new_v4();
        let mut event = Event::new(EventType::Gateway);
        event.marker = Some(marker);
        let body = offload_common::events::encode_batch([&event]);
        // Bounded: a broker that accepts connections and never answers their handshake (seen
        // on this machine) must fail the test, not hold CI until its own limit.
        let write = async {
            let connection = Connection::connect(&self.url, ConnectionProperties::default())
                .await
                .expect("connect to write a marker");
            crate::publish_confirmed(
                &connection,
                "",
                &self.stream,
                &body,
                lapin::BasicProperties::default().with_delivery_mode(2),
            )
            .await;
            let _ = connection.close(200, "marker written".into()).await;
        };
        tokio::time::timeout(Duration::from_secs(30), write)
            .await
            .expect("the broker takes a marker within 30 s");
        // Looked for from the newest event back, without copying them all at every look: the
        // stream the benchmark fills holds hundreds of thousands of events by its end-to-end
        // measure, which then ran past this deadline.
        crate::eventually(Duration::from_secs(30), "the marker read back", || async {
            self.events
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .iter()
                .rev()
                .any(|event| event.marker == Some(marker))
                .then_some(())
        })
        .await;
    }

    /// Every event read so far, in stream order.
    pub fn events(&self) -> Vec<Event> {
        self.events
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The ids of the tasks whose attempts `worker` (`<host>-<pid>`) started, in order, one
    /// per attempt.
    pub fn started_by(&self, worker: &str) -> Vec<Uuid> {
        self.ids(EventType::Started, worker)
    }

    /// The ids of the tasks whose attempts succeeded on `worker`, in order.
    pub fn succeeded_on(&self, worker: &str) -> Vec<Uuid> {
        self.ids(EventType::Succeeded, worker)
    }

    /// The `started` event of `worker`'s first attempt at task `id`.
    pub fn start_of(&self, id: Uuid, worker: &str) -> Option<Event> {
        self.events().into_iter().find(|event| {
            event.event == EventType::Started
                && event.id == Some(id)
                && event.worker.as_deref() == Some(worker)
        })
    }

    fn ids(&self, event_type: EventType, worker: &str) -> Vec<Uuid> {
        self.events()
            .iter()
            .filter(|event| event.event == event_type && event.worker.as_deref() == Some(worker))
            .filter_map(|event| event.id)
            .collect()
    }
}

impl Drop for EventLog {
    fn drop(&mut self) {
        self.follower.abort();
    }
}

/// Reads the stream for good: on any failure, connects again (to the next URL) and reads it
/// again from its first entry, keeping only the events not read before. (Not from an offset:
/// a broker that lost its data makes the stream anew, with offsets from 0 again.)
async fn follow(urls: Vec<String>, stream: String, events: Arc<Mutex<Vec<Event>>>) {
    let mut seen = HashSet::new();
    for url in urls.iter().cycle() {
        // A short heartbeat, so that a connection hung by a fault is given up in seconds.
        let url = if url.contains('?') {
            url.clone()
        } else {
            format!("{url}?heartbeat=2")
        };
        let connecting = Connection::connect(&url, ConnectionProperties::default());
        let Ok(connection) = answered(connecting).await else {
            tokio::time::sleep(RETRY).await;
            continue;
        };
        // Until the connection fails or stalls: subscribe (again, if the stream is not there
        // yet, or the broker cancelled the subscription).
        while connection.status().connected() {
            if let Err(Failed::Stalled) = read(&connection, &stream, &mut seen, &events).await {
                break;
            }
            tokio::time::sleep(RETRY).await;
        }
        let _ = answered(connection.close(200, "following again".into())).await;
    }
}

/// Why reading the stream stopped.
enum Failed {
    /// The broker refused or the channel failed.
    Broker,
    /// The broker did not answer within [`ANSWER`].
    Stalled,
}

/// `request`'s answer, waiting at most [`ANSWER`].
async fn answered<T>(request: impl Future<Output = Result<T, lapin::Error>>) -> Result<T, Failed> {
    match tokio::time::timeout(ANSWER, request).await {
        Ok(answer) => answer.map_err(|_| Failed::Broker),
        Err(_) => Err(Failed::Stalled),
    }
}

/// Subscribes from the first entry and appends every event not `seen` before, until the
/// subscription fails.
async fn read(
    connection: &Connection,
    stream: &str,
    seen: &mut HashSet<Vec<u8>>,
    events: &Mutex<Vec<Event>>,
) -> Result<(), Failed> {
    let channel = answered(connection.create_channel()).await?;
    answered(channel.basic_qos(PREFETCH, BasicQosOptions::default())).await?;
    let mut arguments = FieldTable::default();
    arguments.insert(
        "x-stream-offset".into(),
        AMQPValue::LongString(LongString::from("first")),
    );
    let mut consumer = answered(channel.basic_consume(
        stream.into(),
        "".into(),
        BasicConsumeOptions::default(),
        arguments,
    ))
    .await?;
    while let Some(delivery) = consumer.next().await {
        let delivery = delivery.map_err(|_| Failed::Broker)?;
        let new: Vec<Event> = delivery
            .data
            .split(|byte| *byte == b'\n')
            .filter(|line| !line.is_empty() && seen.insert(line.to_vec()))
            .flat_map(decode_batch)
            .filter_map(Result::ok)
            .collect();
        events
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .extend(new);
        answered(delivery.ack(BasicAckOptions::default())).await?;
    }
    Ok(())
}
