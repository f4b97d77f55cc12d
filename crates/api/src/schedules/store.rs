//! The schedules, as every gateway holds them: folded from the `<QUEUE>.schedules` stream (one
//! record per change: put, delete, pause, resume), read from its first record at start and
//! followed. The stream is the store; nothing else remembers a schedule.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{
        Arc, Mutex, MutexGuard, PoisonError,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, SystemTime},
};

use lapin::{BasicProperties, options::BasicAckOptions};
use offload_common::{
    Broker, Delivered, Message, PublishError,
    broker::subscribe::{offset_of, stream_offset},
    envelope,
};
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, oneshot};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::spec::{Schedule, Ticks};

/// The record format version this build writes and reads.
const VERSION: u32 = 1;
/// The largest record read; a larger one is skipped.
const MAX_RECORD_BYTES: usize = 64 * 1024;
/// Longest wait for the broker to confirm a change.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(5);
/// The most schedules kept: their names are metric labels.
pub const MAX_SCHEDULES: usize = 10_000;

/// One change, as the stream holds it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub(crate) enum Change {
    /// A schedule made or replaced.
    Put {
        /// It.
        schedule: Schedule,
        /// When.
        #[serde(with = "envelope::rfc3339")]
        at: SystemTime,
    },
    /// A schedule deleted.
    Delete {
        /// Its name.
        name: String,
    },
    /// A schedule paused: it makes no tasks until resumed.
    Pause {
        /// Its name.
        name: String,
    },
    /// A paused schedule resumed: no tick before `at` counts.
    Resume {
        /// Its name.
        name: String,
        /// When.
        #[serde(with = "envelope::rfc3339")]
        at: SystemTime,
    },
    /// A gateway's marker, to learn when it has read the stream up to the present.
    Marker {
        /// The marker.
        id: Uuid,
    },
}

#[derive(Serialize, Deserialize)]
struct Versioned {
    v: u32,
    #[serde(flatten)]
    change: Change,
}

/// One schedule and what it needs to tick.
#[derive(Debug, Clone)]
pub struct Stored {
    /// The schedule.
    pub schedule: Schedule,
    /// Its ticks.
    pub ticks: Ticks,
    /// Whether it is paused.
    pub paused: bool,
    /// When it was last put: no tick before counts.
    pub since: SystemTime,
}

/// The schedules, shared by the routes, the follower and the leader. Cheap to clone.
#[derive(Clone)]
pub struct Schedules {
    inner: Arc<Inner>,
}

struct Inner {
    all: Mutex<BTreeMap<String, Stored>>,
    /// Told whenever a schedule changes (the leader plans again).
    changed: Notify,
    /// Counts the changes, so that a change between two looks is not missed.
    version: AtomicU64,
    live: AtomicBool,
    markers: Mutex<HashMap<Uuid, oneshot::Sender<()>>>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Each update is one map operation: a panic cannot leave it half done.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Default for Schedules {
    fn default() -> Self {
        Self {
            inner: Arc::new(Inner {
                all: Mutex::new(BTreeMap::new()),
                changed: Notify::new(),
                version: AtomicU64::new(0),
                live: AtomicBool::new(false),
                markers: Mutex::new(HashMap::new()),
            }),
        }
    }
}

impl Schedules {
    /// Every schedule, by name.
    pub fn all(&self) -> Vec<Stored> {
        lock(&self.inner.all).values().cloned().collect()
    }

    /// One schedule.
    pub fn get(&self, name: &str) -> Option<Stored> {
        lock(&self.inner.all).get(name).cloned()
    }

    /// How many there are.
    pub fn len(&self) -> usize {
        lock(&self.inner.all).len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        lock(&self.inner.all).is_empty()
    }

    /// Whether the view has read the stream to its end once.
    pub fn is_live(&self) -> bool {
        self.inner.live.load(Ordering::Relaxed)
    }

    /// How many changes were applied so far.
    pub fn version(&self) -> u64 {
        self.inner.version.load(Ordering::Relaxed)
    }

    /// Resolves at the next change.
    pub async fn changed(&self) {
        self.inner.changed.notified().await;
    }

    /// Applies one change.
    pub(crate) fn apply(&self, change: Change) {
        let mut all = lock(&self.inner.all);
        match change {
            Change::Put { schedule, at } => {
                let Ok(ticks) = schedule.ticks() else {
                    // Checked before it was written; one that does not check now comes from
                    // another writer, or a newer offload.
                    tracing::warn!(schedule = %schedule.name, "skipping a schedule this gateway cannot read");
                    return;
                };
                let paused = all.get(&schedule.name).is_some_and(|old| old.paused);
                if all.len() >= MAX_SCHEDULES && !all.contains_key(&schedule.name) {
                    tracing::warn!(schedule = %schedule.name, "more than {MAX_SCHEDULES} schedules: skipping one");
                    return;
                }
                all.insert(
                    schedule.name.clone(),
                    Stored {
                        schedule,
                        ticks,
                        paused,
                        since: at,
                    },
                );
            }
            Change::Delete { name } => {
                all.remove(&name);
            }
            Change::Pause { name } | Change::Resume { name, .. } if !all.contains_key(&name) => {}
            Change::Pause { name } => {
                if let Some(stored) = all.get_mut(&name) {
                    stored.paused = true;
                }
            }
            Change::Resume { name, at } => {
                if let Some(stored) = all.get_mut(&name) {
                    stored.paused = false;
                    stored.since = stored.since.max(at);
                }
            }
            Change::Marker { id } => {
                drop(all);
                if let Some(read) = lock(&self.inner.markers).remove(&id) {
                    let _ = read.send(());
                }
                return;
            }
        }
        drop(all);
        self.inner.version.fetch_add(1, Ordering::Relaxed);
        self.inner.changed.notify_waiters();
    }

    /// Writes `change` on the stream (confirmed), then applies it here at once.
    pub(crate) async fn write(&self, broker: &Broker, change: Change) -> Result<(), PublishError> {
        publish(broker, &change).await?;
        self.apply(change);
        Ok(())
    }

    /// Reads the stream from its first record, then follows it, until `shutdown`.
    pub async fn follow(self, broker: Broker, shutdown: CancellationToken) {
        let stream = broker.topology().schedules_stream();
        let mut subscription = broker.subscribe(&stream, 500);
        subscription.set_arguments(stream_offset(None));
        let mut next_offset = None;
        let start = Uuid::new_v4();
        loop {
            let delivery = tokio::select! {
                () = shutdown.cancelled() => break,
                delivered = subscription.next() => match delivered {
                    Delivered::Message(delivery) => delivery,
                    Delivered::Subscribed => {
                        if !self.is_live() {
                            Self::write_marker(start, &broker);
                        }
                        continue;
                    }
                    Delivered::Lost(reason) => {
                        tracing::warn!("reading the schedules failed ({reason}); reading on");
                        subscription.set_arguments(stream_offset(next_offset));
                        continue;
                    }
                    Delivered::Paused(_) => continue,
                },
            };
            match decode(&delivery.data) {
                Ok(Change::Marker { id }) if id == start => {
                    self.inner.live.store(true, Ordering::Relaxed);
                    self.inner.changed.notify_waiters();
                }
                Ok(change) => self.apply(change),
                Err(problem) => tracing::debug!("skipping a schedules record: {problem}"),
            }
            if let Some(offset) = offset_of(&delivery.properties) {
                next_offset = Some(offset + 1);
            }
            let acked = broker
                .within("an ack", delivery.ack(BasicAckOptions::default()))
                .await;
            if let Err(error) = acked {
                tracing::warn!("reading the schedules failed ({error}); reading on shortly");
                subscription.set_arguments(stream_offset(next_offset));
                subscription.restart().await;
            }
        }
        subscription.close("done following schedules").await;
    }

    /// Writes this gateway's start marker in the background: the view is live once it reads
    /// it back.
    fn write_marker(start: Uuid, broker: &Broker) {
        let broker = broker.clone();
        tokio::spawn(async move {
            if let Err(error) = publish(&broker, &Change::Marker { id: start }).await {
                tracing::warn!("could not write a marker on the schedules stream: {error}");
            }
        });
    }

    /// Once the view is live, puts each of `from_file` whose stored definition differs (a
    /// pause stays), trying again while the broker does not take it.
    pub async fn put_from_file(self, broker: Broker, from_file: Vec<Schedule>) {
        while !self.is_live() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        for schedule in from_file {
            if self
                .get(&schedule.name)
                .is_some_and(|stored| stored.schedule == schedule)
            {
                continue;
            }
            let name = schedule.name.clone();
            let change = Change::Put {
                schedule,
                at: SystemTime::now(),
            };
            while let Err(error) = self.write(&broker, change.clone()).await {
                tracing::warn!(schedule = %name, "could not put the file's schedule ({error}); trying again");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            tracing::info!(schedule = %name, "put the schedule of SCHEDULES_FILE");
        }
    }

    /// Writes a marker and waits until the follower has read it, at most `timeout`.
    pub async fn sync(&self, broker: &Broker, timeout: Duration) -> bool {
        let id = Uuid::new_v4();
        let (read, marker_read) = oneshot::channel();
        lock(&self.inner.markers).insert(id, read);
        let synced = async {
            publish(broker, &Change::Marker { id }).await.is_ok()
                && matches!(tokio::time::timeout(timeout, marker_read).await, Ok(Ok(())))
        };
        let synced = tokio::time::timeout(timeout, synced).await.unwrap_or(false);
        lock(&self.inner.markers).remove(&id);
        synced
    }
}

fn decode(body: &[u8]) -> Result<Change, String> {
    if body.len() > MAX_RECORD_BYTES {
        return Err(format!("a record of {} bytes", body.len()));
    }
    match serde_json::from_slice::<Versioned>(body) {
        Ok(versioned) if versioned.v == VERSION => Ok(versioned.change),
        Ok(versioned) => Err(format!("version {} is not read", versioned.v)),
        Err(error) => Err(error.to_string()),
    }
}

async fn publish(broker: &Broker, change: &Change) -> Result<(), PublishError> {
    let body = serde_json::to_vec(&Versioned {
        v: VERSION,
        change: change.clone(),
    })
    .expect("a schedule of strings and JSON always serialises");
    let properties = BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type("application/json".into())
        .with_app_id("offload".into());
    let stream = broker.topology().schedules_stream();
    broker
        .publish_confirmed(
            Message::to_queue(&stream, &body, properties),
            CONFIRM_TIMEOUT,
        )
        .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schedules::spec::{Missed, Template};

    fn every(name: &str, period: &str) -> Schedule {
        Schedule {
            name: name.into(),
            task: Template {
                kind: offload_common::TaskKind::try_from("sleep").expect("a kind"),
                payload: serde_json::Value::Null,
                expires_in: None,
            },
            cron: None,
            timezone: None,
            every: Some(period.into()),
            missed: Missed::Skip,
        }
    }

    #[test]
    fn changes_fold_into_the_schedules_and_a_replaced_one_stays_paused() {
        let schedules = Schedules::default();
        let at = SystemTime::now();
        schedules.apply(Change::Put {
            schedule: every("a", "1s"),
            at,
        });
        schedules.apply(Change::Pause { name: "a".into() });
        schedules.apply(Change::Put {
            schedule: every("a", "2s"),
            at,
        });
        let a = schedules.get("a").expect("kept");
        assert!(a.paused);
        assert_eq!(a.schedule.every.as_deref(), Some("2s"));
        schedules.apply(Change::Resume {
            name: "a".into(),
            at: SystemTime::now(),
        });
        assert!(!schedules.get("a").expect("kept").paused);
        schedules.apply(Change::Delete { name: "a".into() });
        assert!(schedules.get("a").is_none());
        schedules.apply(Change::Pause { name: "a".into() });
        assert_eq!(schedules.len(), 0);
    }

    #[test]
    fn records_round_trip_and_others_are_skipped() {
        let change = Change::Put {
            schedule: every("a", "1s"),
            at: SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000),
        };
        let body = serde_json::to_vec(&Versioned {
            v: VERSION,
            change: change.clone(),
        })
        .expect("serialises");
        assert_eq!(decode(&body), Ok(change));
        assert!(decode(br#"{"v":2,"type":"delete","name":"a"}"#).is_err());
        assert!(decode(b"nonsense").is_err());
    }
}
