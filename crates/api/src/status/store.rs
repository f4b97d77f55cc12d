//! The view itself: at most `STATUS_CAPACITY` tasks, the oldest forgotten first, kinds
//! interned, and what the routes and the dashboard ask of it.

#[cfg(test)]
use std::time::SystemTime;
use std::{
    collections::{BTreeSet, HashMap, VecDeque},
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use offload_common::{Event, EventType};
use serde::Serialize;
use tokio::sync::Notify;
use uuid::Uuid;

use super::{Status, TaskView, fold::Entry, time_of};

#[derive(Default)]
pub(super) struct View {
    tasks: HashMap<Uuid, Entry>,
    /// Ids in the order they were first seen, to forget the oldest.
    order: VecDeque<Uuid>,
    pub(super) idempotency: HashMap<Box<str>, Uuid>,
    /// Interned kinds, so a million tasks of five kinds hold five strings.
    kinds: Vec<Arc<str>>,
    kind_index: HashMap<Arc<str>, u32>,
    /// Kinds workers announced.
    announced: BTreeSet<String>,
    /// Events applied since this gateway started, for the dashboard's rates.
    totals: Totals,
    /// The tasks that died last, newest at the back, for the dashboard (which must not scan
    /// the dead-letter queue at every poll).
    recent_dead: VecDeque<Uuid>,
}

/// How many dead tasks the view lists without a scan of the dead-letter queue.
const RECENT_DEAD: usize = 50;

/// How many tasks were first seen, and how many events of each kind were applied, since the
/// gateway started (its replay included). Only differences between two readings mean much.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Totals {
    /// Tasks queued (each task once, however many gateways saw it accepted).
    pub submitted: u64,
    /// Attempts started.
    pub started: u64,
    /// Attempts that succeeded.
    pub succeeded: u64,
    /// Attempts that failed and will be tried again.
    pub failed: u64,
    /// Tasks dead-lettered.
    pub dead: u64,
}

impl Totals {
    fn count(&mut self, event: EventType) {
        let counter = match event {
            EventType::Started => &mut self.started,
            EventType::Succeeded => &mut self.succeeded,
            EventType::Failed => &mut self.failed,
            EventType::Dead => &mut self.dead,
            _ => return,
        };
        *counter += 1;
    }
}

impl View {
    fn intern(&mut self, kind: &str) -> u32 {
        if let Some(index) = self.kind_index.get(kind) {
            return *index;
        }
        let index = u32::try_from(self.kinds.len()).unwrap_or(u32::MAX);
        let name: Arc<str> = Arc::from(kind);
        self.kinds.push(Arc::clone(&name));
        self.kind_index.insert(name, index);
        index
    }

    fn task(&self, id: Uuid) -> Option<TaskView> {
        let entry = self.tasks.get(&id)?;
        Some(TaskView {
            id,
            kind: self
                .kinds
                .get(entry.kind as usize)
                .cloned()
                .unwrap_or_else(|| Arc::from("unknown")),
            status: entry.status,
            attempts: u64::from(entry.attempts),
            submitted_at: time_of(entry.submitted_at),
            started_at: time_of(entry.started_at),
            finished_at: time_of(entry.finished_at),
            run_at: time_of(entry.run_at).filter(|_| entry.status == Status::Scheduled),
            error: entry.error.as_deref().map(Arc::from),
            reason: entry.reason,
            result: None,
            result_offset: (entry.result_offset >= 0).then_some(entry.result_offset),
        })
    }
}

/// The view, shared by the follower and every request. Cheap to clone.
#[derive(Clone)]
pub struct Tracker {
    pub(super) inner: Arc<Inner>,
}

pub(super) struct Inner {
    pub(super) view: Mutex<View>,
    pub(super) capacity: usize,
    /// Set once the follower has read this gateway's start marker back: the view is
    /// complete up to the present.
    pub(super) live: AtomicBool,
    pub(super) marker: Uuid,
    /// Keys being submitted on this gateway right now, so two requests with one key at once
    /// make one task.
    pub(super) claims: Mutex<HashMap<String, Arc<Notify>>>,
}

impl Tracker {
    /// An empty view holding at most `capacity` tasks.
    pub fn new(capacity: usize) -> Self {
        Self {
            inner: Arc::new(Inner {
                view: Mutex::new(View::default()),
                capacity: capacity.max(1),
                live: AtomicBool::new(false),
                marker: Uuid::new_v4(),
                claims: Mutex::new(HashMap::new()),
            }),
        }
    }

    pub(super) fn view(&self) -> MutexGuard<'_, View> {
        // A panic while holding the lock leaves a view that is still consistent enough to
        // read: every update below is a handful of field writes.
        self.inner
            .view
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether the view has caught up with the stream.
    pub fn is_live(&self) -> bool {
        self.inner.live.load(Ordering::Relaxed)
    }

    /// How many tasks the view holds.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.view().tasks.len()
    }

    /// The kinds workers have announced, sorted.
    pub fn kinds(&self) -> Vec<String> {
        self.view().announced.iter().cloned().collect()
    }

    /// The counts since this gateway started.
    pub fn totals(&self) -> Totals {
        self.view().totals
    }

    /// The `count` tasks first seen last, newest first.
    pub fn recent(&self, count: usize) -> Vec<TaskView> {
        let view = self.view();
        view.order
            .iter()
            .rev()
            .take(count)
            .filter_map(|id| view.task(*id))
            .collect()
    }

    /// Up to `count` of the tasks that died last and are still dead, newest first.
    pub fn recent_dead(&self, count: usize) -> Vec<TaskView> {
        let view = self.view();
        view.recent_dead
            .iter()
            .rev()
            .filter_map(|id| view.task(*id))
            .filter(|task| task.status == Status::Dead)
            .take(count)
            .collect()
    }

    /// Whether this gateway accepted task `id` itself.
    pub fn accepted_here(&self, id: Uuid) -> bool {
        self.view()
            .tasks
            .get(&id)
            .is_some_and(|task| task.accepted_here)
    }

    /// The task, if the view knows it.
    pub fn get(&self, id: Uuid) -> Option<TaskView> {
        self.view().task(id)
    }

    /// Waits until task `id` is terminal, at most `wait`; the task as it then is.
    pub async fn wait(&self, id: Uuid, wait: Duration) -> Option<TaskView> {
        let notify = {
            let mut view = self.view();
            let task = view.task(id)?;
            if task.status.is_terminal() || wait.is_zero() {
                return Some(task);
            }
            let entry = view.tasks.get_mut(&id)?;
            let extra = entry.extra.get_or_insert_with(Box::default);
            Arc::clone(extra.waiters.get_or_insert_with(|| Arc::new(Notify::new())))
        };
        let notified = notify.notified();
        tokio::pin!(notified);
        // Registered before looking again, so a notification in between is not missed.
        notified.as_mut().enable();
        if !self.get(id).is_some_and(|task| task.status.is_terminal()) {
            let _ = tokio::time::timeout(wait, notified).await;
        }
        self.get(id)
    }

    /// Records a task as the gateway does when it accepts one (its `queued` event, applied
    /// before it is on the stream).
    #[cfg(test)]
    fn accepted(&self, id: Uuid, kind: &str, submitted_at: SystemTime, key: Option<&str>) {
        let mut event = Event::task(EventType::Queued, id, kind);
        event.submitted_at = Some(submitted_at);
        event.idempotency_key = key.map(str::to_owned);
        self.apply(&event, None);
    }

    /// Applies one event read from the stream at `offset` (`None`: not from the stream).
    pub fn apply(&self, event: &Event, offset: Option<i64>) {
        if event.event == EventType::Gateway {
            if event.marker == Some(self.inner.marker) {
                self.inner.live.store(true, Ordering::Relaxed);
            }
            return;
        }
        let mut view = self.view();
        if event.event == EventType::Worker {
            view.announced.extend(event.kinds.iter().flatten().cloned());
            return;
        }
        let Some(id) = event.id else {
            return;
        };
        // Only an undecodable message's `dead` event may lack a kind.
        let kind = event.kind.as_deref().unwrap_or("unknown");
        if !view.tasks.contains_key(&id) {
            let kind = view.intern(kind);
            view.tasks.insert(
                id,
                Entry {
                    kind,
                    status: Status::Queued,
                    reason: None,
                    accepted_here: false,
                    attempts: 0,
                    submitted_at: 0,
                    started_at: 0,
                    finished_at: 0,
                    run_at: 0,
                    result_offset: -1,
                    error: None,
                    extra: None,
                },
            );
            view.order.push_back(id);
            if event.event == EventType::Queued {
                view.totals.submitted += 1;
            }
            self.evict(&mut view);
        }
        view.totals.count(event.event);
        if event.event == EventType::Dead {
            view.recent_dead.retain(|dead| *dead != id);
            if view.recent_dead.len() == RECENT_DEAD {
                view.recent_dead.pop_front();
            }
            view.recent_dead.push_back(id);
        }
        let mut key_to_index = None;
        if let Some(task) = view.tasks.get_mut(&id) {
            task.accepted_here |= offset.is_none() && event.event == EventType::Queued;
            // A failed attempt's event read after the next attempt's start (a retry with no
            // delay can start on another worker first) is history, not the present.
            key_to_index = task.fold(event, offset);
            if event.is_terminal()
                && let Some(waiters) = task.extra.as_mut().and_then(|extra| extra.waiters.take())
            {
                waiters.notify_waiters();
            }
        }
        if let Some(key) = key_to_index {
            view.idempotency.insert(key.into(), id);
        }
    }

    fn evict(&self, view: &mut View) {
        while view.tasks.len() > self.inner.capacity {
            let Some(oldest) = view.order.pop_front() else {
                break;
            };
            if let Some(extra) = view.tasks.remove(&oldest).and_then(|entry| entry.extra) {
                if let Some(key) = extra.idempotency_key {
                    view.idempotency.remove(&key);
                }
                if let Some(waiters) = extra.waiters {
                    waiters.notify_waiters();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::{Claim, millis};

    fn event(event_type: EventType, id: Uuid) -> Event {
        Event::task(event_type, id, "sleep")
    }

    #[test]
    fn a_task_moves_through_its_states() {
        let tracker = Tracker::new(10);
        let id = Uuid::new_v4();
        tracker.accepted(id, "sleep", SystemTime::now(), None);
        assert_eq!(tracker.get(id).map(|t| t.status), Some(Status::Queued));
        let mut started = event(EventType::Started, id);
        started.attempt = Some(1);
        tracker.apply(&started, Some(1));
        assert_eq!(tracker.get(id).map(|t| t.status), Some(Status::Running));
        let mut failed = event(EventType::Failed, id);
        failed.error = Some("boom".into());
        tracker.apply(&failed, Some(2));
        let task = tracker.get(id).expect("known");
        assert_eq!(
            (task.status, task.error.as_deref()),
            (Status::Queued, Some("boom"))
        );
        let mut succeeded = event(EventType::Succeeded, id);
        succeeded.attempt = Some(2);
        succeeded.result = Some(serde_json::json!(42));
        tracker.apply(&succeeded, Some(3));
        let task = tracker.get(id).expect("known");
        assert_eq!(task.status, Status::Succeeded);
        assert_eq!(task.attempts, 2);
        assert_eq!(task.result_offset, Some(3));
    }

    #[test]
    fn a_retry_is_scheduled_and_a_late_failure_does_not_undo_the_next_start() {
        let tracker = Tracker::new(10);
        let id = Uuid::new_v4();
        let mut failed = event(EventType::Failed, id);
        failed.attempt = Some(1);
        failed.retry = Some(true);
        failed.error = Some("busy".into());
        let run_at = SystemTime::now() + Duration::from_secs(10);
        failed.run_at = Some(run_at);
        tracker.apply(&failed, None);
        let task = tracker.get(id).expect("known");
        assert_eq!(task.status, Status::Scheduled);
        assert_eq!(task.run_at.map(millis), Some(millis(run_at)));

        let mut started = event(EventType::Started, id);
        started.attempt = Some(2);
        tracker.apply(&started, None);
        // Attempt 1's event again (read late, from another process): still running.
        tracker.apply(&failed, None);
        let task = tracker.get(id).expect("known");
        assert_eq!(task.status, Status::Running);
        assert_eq!(task.run_at, None, "no run_at unless scheduled");
    }

    #[test]
    fn a_duplicate_delivery_read_after_the_end_does_not_reopen_the_task() {
        let tracker = Tracker::new(10);
        let id = Uuid::new_v4();
        let attempt = |event_type, attempt| {
            let mut event = event(event_type, id);
            event.attempt = Some(attempt);
            event
        };
        let mut succeeded = attempt(EventType::Succeeded, 1);
        succeeded.result = Some(serde_json::json!("first"));
        tracker.apply(&succeeded, Some(7));
        // A duplicate's `started` written late after a failover, its failure, its own end.
        for late in [
            attempt(EventType::Started, 1),
            attempt(EventType::Started, 2),
            attempt(EventType::Failed, 2),
            attempt(EventType::Dead, 2),
            attempt(EventType::Succeeded, 2),
        ] {
            tracker.apply(&late, Some(8));
            let task = tracker.get(id).expect("known");
            assert_eq!(
                task.status,
                Status::Succeeded,
                "after a late {:?}",
                late.event
            );
            assert_eq!(task.result_offset, Some(7), "the first success's result");
        }

        let other = Uuid::new_v4();
        let mut dead = event(EventType::Dead, other);
        dead.attempt = Some(3);
        tracker.apply(&dead, Some(9));
        let mut late = event(EventType::Started, other);
        late.attempt = Some(3);
        tracker.apply(&late, Some(10));
        assert_eq!(tracker.get(other).map(|t| t.status), Some(Status::Dead));
        // A duplicate that did the work: it succeeded after all.
        let mut succeeded = event(EventType::Succeeded, other);
        succeeded.attempt = Some(3);
        tracker.apply(&succeeded, Some(11));
        assert_eq!(
            tracker.get(other).map(|t| t.status),
            Some(Status::Succeeded)
        );
    }

    #[test]
    fn totals_count_a_task_once_recent_tasks_come_newest_first_and_local_ones_are_marked() {
        let tracker = Tracker::new(10);
        let (first, second) = (Uuid::new_v4(), Uuid::new_v4());
        for id in [first, second] {
            // Applied on acceptance, then read back from the stream.
            tracker.accepted(id, "sleep", SystemTime::now(), None);
            tracker.apply(&event(EventType::Queued, id), Some(1));
        }
        tracker.apply(&event(EventType::Started, first), Some(2));
        tracker.apply(&event(EventType::Succeeded, first), Some(3));
        assert_eq!(
            tracker.totals(),
            Totals {
                submitted: 2,
                started: 1,
                succeeded: 1,
                failed: 0,
                dead: 0
            }
        );
        let recent: Vec<Uuid> = tracker.recent(5).iter().map(|task| task.id).collect();
        assert_eq!(recent, [second, first]);
        let elsewhere = Uuid::new_v4();
        tracker.apply(&event(EventType::Queued, elsewhere), Some(9));
        assert!(tracker.accepted_here(first) && !tracker.accepted_here(elsewhere));
        assert_eq!(tracker.recent(1).len(), 1);

        tracker.apply(&event(EventType::Dead, second), Some(4));
        let dead: Vec<Uuid> = tracker.recent_dead(5).iter().map(|task| task.id).collect();
        assert_eq!(dead, [second]);
        // Retried: no longer listed as dead.
        tracker.apply(&event(EventType::Retried, second), Some(5));
        assert!(tracker.recent_dead(5).is_empty());
    }

    #[test]
    fn an_entry_stays_small() {
        // The per-task memory figure in PERFORMANCE.md rests on it.
        assert!(std::mem::size_of::<Entry>() <= 80);
    }

    #[test]
    fn the_oldest_tasks_are_forgotten_past_the_capacity() {
        let tracker = Tracker::new(2);
        let ids: Vec<Uuid> = (0..3).map(|_| Uuid::new_v4()).collect();
        for (n, id) in ids.iter().enumerate() {
            tracker.accepted(*id, "sleep", SystemTime::now(), Some(&format!("key-{n}")));
        }
        assert_eq!(tracker.len(), 2);
        assert!(tracker.get(ids[0]).is_none());
        assert!(
            matches!(tracker.claim("key-0"), Claim::Mine(_)),
            "its key is forgotten too"
        );
        assert!(matches!(tracker.claim("key-2"), Claim::Done(id) if id == ids[2]));
    }

    #[test]
    fn one_key_claimed_twice_at_once_is_one_submission() {
        let tracker = Tracker::new(10);
        let Claim::Mine(guard) = tracker.claim("k") else {
            panic!("the first claim is ours");
        };
        assert!(matches!(tracker.claim("k"), Claim::Wait(_)));
        drop(guard);
        assert!(matches!(tracker.claim("k"), Claim::Mine(_)));
    }

    #[tokio::test]
    async fn a_waiter_wakes_when_the_task_ends() {
        let tracker = Tracker::new(10);
        let id = Uuid::new_v4();
        tracker.accepted(id, "sleep", SystemTime::now(), None);
        let waiting = tokio::spawn({
            let tracker = tracker.clone();
            async move { tracker.wait(id, Duration::from_secs(30)).await }
        });
        tokio::task::yield_now().await;
        tracker.apply(&event(EventType::Dead, id), Some(9));
        let task = tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("woken, not timed out")
            .expect("task")
            .expect("known");
        assert_eq!(task.status, Status::Dead);
    }
}
