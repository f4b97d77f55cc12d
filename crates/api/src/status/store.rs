//! The tracker: the view (`view.rs`) behind its lock, holding at most `STATUS_CAPACITY` tasks,
//! the oldest forgotten first, and what the routes and the dashboard ask of it.

#[cfg(test)]
use std::time::SystemTime;
use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use offload_common::{Event, EventType};
use tokio::sync::Notify;
use uuid::Uuid;

use super::{
    Status, TaskView,
    fold::Entry,
    time_of,
    view::{KindCounts, RECENT_DEAD, Totals, View},
};

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
    /// Cancels this gateway is answering, and what workers have said of them.
    pub(super) cancels: Mutex<HashMap<Uuid, super::cancels::Heard>>,
    /// Markers this gateway wrote to learn when it has read up to the present.
    pub(super) markers: Mutex<HashMap<Uuid, tokio::sync::oneshot::Sender<()>>>,
    /// Whose events are believed; `None`: everyone's, and any event makes a task known.
    pub(super) writers: Option<super::Writers>,
}

impl Tracker {
    /// An empty view holding at most `capacity` tasks, believing every writer.
    #[cfg(test)]
    pub fn new(capacity: usize) -> Self {
        Self::believing(capacity, None)
    }

    /// An empty view holding at most `capacity` tasks, believing only `writers` (if given):
    /// then a task is known only once a gateway's `queued` event says so.
    pub fn believing(capacity: usize, writers: Option<super::Writers>) -> Self {
        let capacity = capacity.max(1);
        Self {
            inner: Arc::new(Inner {
                view: Mutex::new(View::with_room_for(capacity)),
                capacity,
                live: AtomicBool::new(false),
                marker: Uuid::new_v4(),
                claims: Mutex::new(HashMap::new()),
                cancels: Mutex::new(HashMap::new()),
                markers: Mutex::new(HashMap::new()),
                writers,
            }),
        }
    }

    /// Whose events this view believes (`None`: everyone's).
    pub(super) fn writers(&self) -> Option<&super::Writers> {
        self.inner.writers.as_ref()
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

    /// Each kind's tasks the view holds that are scheduled and running, by kind. Tasks the
    /// view has forgotten (past STATUS_CAPACITY) are not counted.
    pub fn kind_counts(&self) -> HashMap<String, KindCounts> {
        let view = self.view();
        view.kinds
            .iter()
            .zip(&view.by_kind)
            .map(|(kind, counts)| (kind.to_string(), *counts))
            .collect()
    }

    /// The counts since this gateway started.
    pub fn totals(&self) -> Totals {
        self.view().totals
    }

    /// The `count` tasks first seen last, newest first.
    pub fn recent(&self, count: usize) -> Vec<TaskView> {
        let view = self.view();
        view.tasks
            .newest_first()
            .take(count)
            .filter_map(|id| view.task(id))
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
            } else if let Some(marker) = event.marker {
                self.marker_read(marker);
            }
            return;
        }
        if event.event == EventType::CancelSeen {
            self.cancel_seen(event);
            return;
        }
        let mut view = self.view();
        if event.event == EventType::Worker {
            view.announced.extend(event.kinds.iter().flatten().cloned());
            return;
        }
        if event.event == EventType::Scheduler {
            view.scheduler_seen = view.scheduler_seen.max(super::millis(event.at));
            return;
        }
        if let (EventType::Queued, Some(id), Some(schedule), Some(tick)) =
            (event.event, event.id, &event.schedule, event.tick)
        {
            view.ticked(schedule, tick, id);
        }
        let Some(id) = event.id else {
            if event.event == EventType::Cancelled
                && let (Some(kind), Some(before)) = (&event.kind, event.before)
            {
                drop(view);
                self.cancel_kind(kind, before, event.at);
            }
            return;
        };
        // Only an undecodable message's `dead` event may lack a kind.
        let kind = event.kind.as_deref().unwrap_or("unknown");
        if !view.tasks.contains(&id) {
            let kind = view.intern(kind);
            let vouched = self.inner.writers.is_none() || event.event == EventType::Queued;
            view.tasks.push(id, Entry::new(kind, vouched));
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
        let mut moved = None;
        let view = &mut *view;
        if let Some(task) = view.tasks.get_mut(&id) {
            if event.event == EventType::Queued {
                task.accepted_here |= offset.is_none();
                task.vouched = true;
                if !task.queued {
                    task.queued = true;
                    view.totals.submitted += 1;
                }
            }
            let before = task.status;
            // A failed attempt's event read after the next attempt's start (a retry with no
            // delay can start on another worker first) is history, not the present.
            key_to_index = task.fold(event, offset);
            if task.status != before {
                moved = Some((task.kind, before, task.status));
            }
            if event.is_terminal()
                && let Some(waiters) = task.extra.as_mut().and_then(|extra| extra.waiters.take())
            {
                waiters.notify_waiters();
            }
        }
        if let Some(key) = key_to_index {
            view.idempotency.insert(key.into(), id);
        }
        if let Some((kind, before, after)) = moved {
            let counts = view.counts(kind);
            counts.add(before, -1);
            counts.add(after, 1);
        }
    }

    /// The latest tick of schedule `name` that made a task, as far as the view knows.
    pub fn last_tick(&self, name: &str) -> Option<std::time::SystemTime> {
        self.view()
            .schedules
            .get(name)
            .and_then(|(tick, _)| time_of(*tick))
    }

    /// The tasks the latest ticks of schedule `name` made, newest first.
    pub fn schedule_tasks(&self, name: &str) -> Vec<TaskView> {
        let view = self.view();
        view.schedules
            .get(name)
            .map(|(_, recent)| {
                recent
                    .iter()
                    .rev()
                    .filter_map(|id| view.task(*id))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// When the gateway firing the schedules was last heard of.
    pub fn scheduler_seen(&self) -> Option<std::time::SystemTime> {
        time_of(self.view().scheduler_seen)
    }

    /// Cancels every waiting task of `kind` submitted at or before `before` the view holds,
    /// as of `at`; how many.
    pub fn cancel_kind(
        &self,
        kind: &str,
        before: std::time::SystemTime,
        at: std::time::SystemTime,
    ) -> u64 {
        let mut view = self.view();
        let Some(&index) = view.kind_index.get(kind) else {
            return 0;
        };
        let (before, at) = (super::millis(before), super::millis(at));
        let mut cancelled = 0;
        let mut was_scheduled = 0;
        for entry in view.tasks.entries_mut() {
            if entry.kind != index || !entry.status.is_waiting() || entry.submitted_at > before {
                continue;
            }
            if entry.status == Status::Scheduled {
                was_scheduled += 1;
            }
            entry.status = Status::Cancelled;
            entry.finished_at = at;
            if let Some(waiters) = entry.extra.as_mut().and_then(|extra| extra.waiters.take()) {
                waiters.notify_waiters();
            }
            cancelled += 1;
        }
        let counts = view.counts(index);
        counts.scheduled = counts.scheduled.saturating_sub(was_scheduled);
        view.totals.cancelled += cancelled;
        cancelled
    }

    fn evict(&self, view: &mut View) {
        while view.tasks.len() > self.inner.capacity {
            let Some((_, entry)) = view.tasks.pop_oldest() else {
                break;
            };
            view.counts(entry.kind).add(entry.status, -1);
            if let Some(extra) = entry.extra {
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
mod tests;
