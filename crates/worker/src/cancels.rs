//! Cancels, as this worker knows them: read from the control stream (from the first record
//! kept, so a cancel made while the worker was down still holds), checked before each task
//! starts, and passed to the handler of a task in hand.
//!
//! The promise a gateway makes when it answers a cancel (docs/EVENTS.md) rests on three things
//! done here:
//! - a task starts only after [`Cancels::claim`] has found no cancel for it, and the claim and
//!   the reading of a cancel take the same lock: a cancel read after a task was claimed finds
//!   it in hand, and stops it;
//! - a kind's subscription hands out nothing until a [`Cancels::barrier`] made after it
//!   subscribed has been read back, so it starts with every cancel written before;
//! - on reading a cancel, the worker says so on the events stream (`cancel_seen`): how many of
//!   its subscriptions to the kind's queue could have taken the task, and whether it is
//!   running it. The gateway answers once the kind's consumers have all said so.

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, SystemTime},
};

use lapin::options::BasicAckOptions;
use offload_common::{
    Broker, Delivered, Event, EventSink, EventType, TaskEnvelope,
    broker::subscribe::{offset_of, stream_offset},
    control::{self, Record},
};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Deliveries the control stream's reader lets the broker send ahead.
const FOLLOW_PREFETCH: u16 = 500;
/// The reader acks (a stream's credit) this many deliveries at once, well within the
/// prefetch: one frame per record made reading a long stream at start slow.
const ACK_EVERY: u64 = 200;
/// Longest a barrier waits for its marker to be read back.
const BARRIER_TIMEOUT: Duration = Duration::from_secs(10);
/// A cancel older than this when read is not answered with `cancel_seen`: whoever made it has
/// stopped waiting (a gateway waits at most a few seconds), and a worker catching up on the
/// stream at its start would otherwise answer every cancel kept.
const ANSWER_HORIZON: Duration = Duration::from_secs(60);

/// Whether a delivered task may start.
pub(crate) enum Verdict {
    /// It runs; the claim makes it reachable by a cancel until dropped.
    Run(Claim),
    /// It was cancelled before it started.
    Cancelled,
    /// It was not started by its `expires_at`.
    Expired,
}

/// The cancels this worker has read, and what a cancel can reach. Shared by every kind's loop.
pub(crate) struct Cancels {
    /// The kinds this worker runs: cancels of others are not kept.
    kinds: HashSet<String>,
    /// The broker users whose cancels are honoured; empty: everyone's.
    gateways: HashSet<String>,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Cancelled tasks, and when each was cancelled (forgotten after the stream's retention).
    tasks: HashMap<Uuid, SystemTime>,
    /// Each kind's latest whole-kind cancel: its tasks submitted at or before it are cancelled.
    kinds: HashMap<String, SystemTime>,
    /// Tasks running (or being settled): the token their handler watches, and how many copies
    /// of the task are in hand (a duplicate delivery can run beside the first).
    in_hand: HashMap<Uuid, (CancellationToken, u32)>,
    /// This worker's subscriptions to each kind's queue.
    subscribed: HashMap<String, u32>,
    /// Barriers waiting for their marker.
    markers: HashMap<Uuid, oneshot::Sender<()>>,
    /// Forget old cancels when `tasks` grows past this.
    prune_at: usize,
}

/// A task in hand that a cancel can reach; leaves the hand when dropped.
pub(crate) struct Claim {
    cancels: Arc<Cancels>,
    id: Uuid,
    token: CancellationToken,
}

impl Claim {
    /// The token the task's handler is given: cancelled when the task is.
    pub(crate) fn token(&self) -> CancellationToken {
        self.token.clone()
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        let mut state = self.cancels.state();
        if let Some((_, copies)) = state.in_hand.get_mut(&self.id) {
            *copies -= 1;
            if *copies == 0 {
                state.in_hand.remove(&self.id);
            }
        }
    }
}

/// One of this worker's subscriptions to a kind's queue, counted while held.
pub(crate) struct Subscribed {
    cancels: Arc<Cancels>,
    kind: String,
}

impl Drop for Subscribed {
    fn drop(&mut self) {
        let mut state = self.cancels.state();
        if let Some(count) = state.subscribed.get_mut(&self.kind) {
            *count = count.saturating_sub(1);
        }
    }
}

/// What reading one cancel found, for its `cancel_seen`.
#[derive(Debug, PartialEq, Eq)]
struct Seen {
    cancel: Uuid,
    task: Option<Uuid>,
    kind: String,
    consumers: u32,
    running: bool,
}

impl Cancels {
    /// What a worker running `kinds` knows of cancels: nothing yet.
    pub(crate) fn new<'a>(kinds: impl IntoIterator<Item = &'a str>) -> Self {
        Self {
            kinds: kinds.into_iter().map(str::to_owned).collect(),
            gateways: HashSet::new(),
            state: Mutex::default(),
        }
    }

    /// Honours cancels only from these broker users (the gateways'); none given: from anyone.
    pub(crate) fn believing(mut self, gateways: impl IntoIterator<Item = String>) -> Self {
        self.gateways = gateways.into_iter().collect();
        self
    }

    /// Whether a record published by broker user `writer` may be applied: markers from
    /// anyone (a barrier waits only for its own), cancels from a gateway.
    fn believe(&self, record: &Record, writer: Option<&str>) -> bool {
        self.gateways.is_empty()
            || matches!(record, Record::Marker { .. })
            || writer.is_some_and(|writer| self.gateways.contains(writer))
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // Every update below is a handful of map operations: a panic in one leaves a state
        // that is still sound to use.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Decides whether `task` may start now; if it may, puts it in hand.
    pub(crate) fn claim(self: &Arc<Self>, task: &TaskEnvelope, now: SystemTime) -> Verdict {
        let mut state = self.state();
        let kind_cancelled = state
            .kinds
            .get(task.kind.as_str())
            .is_some_and(|before| task.submitted_at <= *before);
        if kind_cancelled || state.tasks.contains_key(&task.id) {
            return Verdict::Cancelled;
        }
        if task.is_expired(now) {
            return Verdict::Expired;
        }
        let (token, copies) = state
            .in_hand
            .entry(task.id)
            .or_insert_with(|| (CancellationToken::new(), 0));
        *copies += 1;
        Verdict::Run(Claim {
            cancels: Arc::clone(self),
            id: task.id,
            token: token.clone(),
        })
    }

    /// Counts a subscription to `kind`'s queue until the guard is dropped.
    pub(crate) fn subscribed(self: &Arc<Self>, kind: &str) -> Subscribed {
        *self.state().subscribed.entry(kind.to_owned()).or_default() += 1;
        Subscribed {
            cancels: Arc::clone(self),
            kind: kind.to_owned(),
        }
    }

    /// Writes a marker on the control stream and waits until the reader has read it back:
    /// from then on, every cancel written before this call is known.
    pub(crate) async fn barrier(&self, broker: &Broker) -> Result<(), String> {
        let id = Uuid::new_v4();
        let (read, marker_read) = oneshot::channel();
        self.state().markers.insert(id, read);
        let waited = async {
            broker
                .publish_control(&Record::Marker { id })
                .await
                .map_err(|error| {
                    format!("could not write a marker on the control stream: {error}")
                })?;
            match tokio::time::timeout(BARRIER_TIMEOUT, marker_read).await {
                Ok(Ok(())) => Ok(()),
                _ => Err(format!(
                    "did not read the control stream up to its marker within {}s",
                    BARRIER_TIMEOUT.as_secs()
                )),
            }
        }
        .await;
        self.state().markers.remove(&id);
        waited
    }

    /// Applies one record read at `now`; what to say about it, if anything.
    fn apply(&self, record: Record, now: SystemTime) -> Option<Seen> {
        if record.kind().is_some_and(|kind| !self.kinds.contains(kind)) {
            return None;
        }
        let mut state = self.state();
        let (cancel, task, kind, at) = match record {
            Record::Marker { id } => {
                if let Some(read) = state.markers.remove(&id) {
                    let _ = read.send(());
                }
                return None;
            }
            Record::Cancel { id, task, kind, at } => {
                state.tasks.insert(task, at);
                state.forget_old(now);
                (id, Some(task), kind, at)
            }
            Record::CancelKind {
                id,
                kind,
                before,
                at,
            } => {
                let latest = state.kinds.entry(kind.clone()).or_insert(before);
                *latest = (*latest).max(before);
                (id, None, kind, at)
            }
        };
        let running = task
            .and_then(|task| state.in_hand.get(&task))
            .is_some_and(|(token, _)| {
                token.cancel();
                true
            });
        let consumers = state.subscribed.get(&kind).copied().unwrap_or(0);
        let recent = now.duration_since(at).unwrap_or(Duration::ZERO) < ANSWER_HORIZON;
        (recent && (consumers > 0 || running)).then_some(Seen {
            cancel,
            task,
            kind,
            consumers,
            running,
        })
    }

    /// Reads the control stream from its first record until `stop`, applying each, and says
    /// through `events` (if events are on) which cancels it has read.
    pub(crate) async fn follow(
        self: Arc<Self>,
        broker: Broker,
        events: Option<EventSink>,
        worker: Arc<str>,
        stop: CancellationToken,
    ) {
        let stream = broker.topology().control_stream();
        let mut subscription = broker.subscribe(&stream, FOLLOW_PREFETCH);
        subscription.set_arguments(stream_offset(None));
        let mut next_offset = None;
        let mut unacked = 0_u64;
        loop {
            let delivery = tokio::select! {
                () = stop.cancelled() => break,
                delivered = subscription.next() => match delivered {
                    Delivered::Message(delivery) => delivery,
                    Delivered::Lost(reason) => {
                        tracing::warn!("reading the control stream failed ({reason}); reading on");
                        subscription.set_arguments(stream_offset(next_offset));
                        continue;
                    }
                    Delivered::Subscribed => {
                        unacked = 0;
                        continue;
                    }
                    Delivered::Paused(_) => continue,
                },
            };
            let writer = delivery
                .properties
                .user_id()
                .as_ref()
                .map(lapin::types::ShortString::as_str);
            match Record::from_bytes(&delivery.data) {
                Ok(record) if self.believe(&record, writer) => {
                    if let Some(seen) = self.apply(record, SystemTime::now()) {
                        announce(events.as_ref(), &worker, seen);
                    }
                }
                Ok(_) => tracing::debug!(writer, "skipping a cancel no gateway wrote"),
                Err(problem) => tracing::debug!("skipping a control record: {problem}"),
            }
            if let Some(offset) = offset_of(&delivery.properties) {
                next_offset = Some(offset + 1);
            }
            unacked += 1;
            if unacked < ACK_EVERY {
                continue;
            }
            unacked = 0;
            let acked = broker
                .within("an ack", delivery.ack(BasicAckOptions { multiple: true }))
                .await;
            if let Err(error) = acked {
                tracing::warn!("reading the control stream failed ({error}); reading on shortly");
                subscription.set_arguments(stream_offset(next_offset));
                subscription.restart().await;
            }
        }
        subscription.close("done reading cancels").await;
    }
}

impl State {
    /// Forgets cancels older than the control stream keeps, once there are many.
    fn forget_old(&mut self, now: SystemTime) {
        if self.tasks.len() < self.prune_at.max(1024) {
            return;
        }
        self.tasks
            .retain(|_, at| now.duration_since(*at).unwrap_or(Duration::ZERO) < control::RETENTION);
        self.prune_at = self.tasks.len() * 2;
    }
}

/// Says on the events stream that this worker has read a cancel.
fn announce(events: Option<&EventSink>, worker: &str, seen: Seen) {
    if seen.running {
        tracing::info!(target: crate::TASK_LOG, task_id = seen.task.map(tracing::field::display), "cancelled while running: telling the handler");
    }
    let Some(events) = events else {
        return;
    };
    let mut event = Event::new(EventType::CancelSeen);
    event.id = seen.task;
    event.kind = Some(seen.kind);
    event.worker = Some(worker.to_owned());
    event.cancel = Some(seen.cancel);
    event.consumers = Some(seen.consumers);
    event.running = Some(seen.running);
    events.emit(event);
}

#[cfg(test)]
mod tests {
    use super::*;
    use offload_common::TaskKind;

    fn task(kind: &str) -> TaskEnvelope {
        TaskEnvelope::new(
            TaskKind::try_from(kind).expect("a valid kind"),
            serde_json::Value::Null,
        )
    }

    fn cancel(task: &TaskEnvelope, at: SystemTime) -> Record {
        Record::Cancel {
            id: Uuid::new_v4(),
            task: task.id,
            kind: task.kind.to_string(),
            at,
        }
    }

    #[test]
    fn a_cancel_read_before_the_start_stops_it_and_one_read_after_reaches_the_handler() {
        let cancels = Arc::new(Cancels::new(["sleep", "other"]));
        let now = SystemTime::now();
        let waiting = task("sleep");
        cancels.apply(cancel(&waiting, now), now);
        assert!(matches!(cancels.claim(&waiting, now), Verdict::Cancelled));

        let running = task("sleep");
        let Verdict::Run(claim) = cancels.claim(&running, now) else {
            panic!("an uncancelled task runs");
        };
        let _subscribed = cancels.subscribed("sleep");
        let seen = cancels.apply(cancel(&running, now), now).expect("answered");
        assert!(seen.running && seen.consumers == 1, "{seen:?}");
        assert!(claim.token().is_cancelled());
        drop(claim);
        assert!(cancels.state().in_hand.is_empty());
    }

    #[test]
    fn a_kind_cancel_takes_what_was_submitted_before_it_and_nothing_after() {
        let cancels = Arc::new(Cancels::new(["sleep", "other"]));
        let before = task("sleep");
        let now = before.submitted_at + Duration::from_millis(1);
        cancels.apply(
            Record::CancelKind {
                id: Uuid::new_v4(),
                kind: "sleep".into(),
                before: now,
                at: now,
            },
            now,
        );
        let mut after = task("sleep");
        after.submitted_at = now + Duration::from_millis(1);
        assert!(matches!(cancels.claim(&before, now), Verdict::Cancelled));
        assert!(matches!(cancels.claim(&after, now), Verdict::Run(_)));
        assert!(matches!(
            cancels.claim(&task("other"), now),
            Verdict::Run(_)
        ));
    }

    #[test]
    fn old_cancels_and_cancels_of_kinds_not_consumed_are_not_answered() {
        let cancels = Arc::new(Cancels::new(["sleep", "other"]));
        let now = SystemTime::now();
        let a = task("sleep");
        assert_eq!(cancels.apply(cancel(&a, now), now), None, "not subscribed");
        let _subscribed = cancels.subscribed("sleep");
        let old = now - ANSWER_HORIZON - Duration::from_secs(1);
        assert_eq!(cancels.apply(cancel(&a, old), now), None, "too old");
        assert!(cancels.apply(cancel(&a, now), now).is_some());
    }

    #[test]
    fn an_expired_task_does_not_start() {
        let cancels = Arc::new(Cancels::new(["sleep", "other"]));
        let mut expiring = task("sleep");
        let now = SystemTime::now();
        expiring.expires_at = Some(now);
        assert!(matches!(cancels.claim(&expiring, now), Verdict::Expired));
        expiring.expires_at = Some(now + Duration::from_secs(1));
        assert!(matches!(cancels.claim(&expiring, now), Verdict::Run(_)));
    }
}
