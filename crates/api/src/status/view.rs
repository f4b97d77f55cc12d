//! What the view holds: each task's entry, kinds interned, per-kind counts, totals since the
//! gateway started, the latest dead tasks and each schedule's latest ticks. [`super::Tracker`]
//! guards it and answers from it.

use std::{
    collections::{BTreeSet, HashMap, VecDeque},
    sync::Arc,
};

use offload_common::EventType;
use serde::Serialize;
use uuid::Uuid;

use super::{Status, TaskView, tasks::Tasks, time_of};

#[derive(Default)]
pub(super) struct View {
    /// The tasks, in the order first seen, to forget the oldest.
    pub(super) tasks: Tasks,
    pub(super) idempotency: HashMap<Box<str>, Uuid>,
    /// Interned kinds, so a million tasks of five kinds hold five strings.
    pub(super) kinds: Vec<Arc<str>>,
    pub(super) kind_index: HashMap<Arc<str>, u32>,
    /// Kinds workers announced.
    pub(super) announced: BTreeSet<String>,
    /// How many of the view's tasks of each kind (by its index) are scheduled and running.
    pub(super) by_kind: Vec<KindCounts>,
    /// Events applied since this gateway started, for the dashboard's rates.
    pub(super) totals: Totals,
    /// The tasks that died last, newest at the back, for the dashboard (which must not scan
    /// the dead-letter queue at every poll).
    pub(super) recent_dead: VecDeque<Uuid>,
    /// Each schedule's latest tick and the tasks its last ticks made, newest at the back.
    pub(super) schedules: HashMap<Box<str>, (u64, VecDeque<Uuid>)>,
    /// When the gateway firing the schedules was last heard of (ms since the epoch).
    pub(super) scheduler_seen: u64,
}

impl View {
    /// An empty view with room for `capacity` tasks ([`Tasks::with_room_for`]).
    pub(super) fn with_room_for(capacity: usize) -> Self {
        Self {
            tasks: Tasks::with_room_for(capacity),
            ..Self::default()
        }
    }
}

/// How many of the view's tasks of one kind wait in the delay levels and are running.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KindCounts {
    /// Waiting for a later attempt, or posted to run later.
    pub scheduled: u64,
    /// Started and not ended.
    pub running: u64,
}

impl KindCounts {
    pub(super) fn add(&mut self, status: Status, by: i64) {
        let counter = match status {
            Status::Scheduled => &mut self.scheduled,
            Status::Running => &mut self.running,
            _ => return,
        };
        *counter = counter.saturating_add_signed(by);
    }
}

/// How many dead tasks the view lists without a scan of the dead-letter queue.
pub(super) const RECENT_DEAD: usize = 50;
/// How many of each schedule's latest tasks the view keeps.
const RECENT_TICKS: usize = 10;
/// The most schedules the view keeps a history of (names come from events).
const SCHEDULES_KEPT: usize = 10_000;

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
    /// Tasks cancelled.
    pub cancelled: u64,
    /// Tasks that expired before they started.
    pub expired: u64,
}

impl Totals {
    pub(super) fn count(&mut self, event: EventType) {
        let counter = match event {
            EventType::Started => &mut self.started,
            EventType::Succeeded => &mut self.succeeded,
            EventType::Failed => &mut self.failed,
            EventType::Dead => &mut self.dead,
            EventType::Cancelled => &mut self.cancelled,
            EventType::Expired => &mut self.expired,
            _ => return,
        };
        *counter += 1;
    }
}

impl View {
    pub(super) fn intern(&mut self, kind: &str) -> u32 {
        if let Some(index) = self.kind_index.get(kind) {
            return *index;
        }
        let index = u32::try_from(self.kinds.len()).unwrap_or(u32::MAX);
        let name: Arc<str> = Arc::from(kind);
        self.kinds.push(Arc::clone(&name));
        self.kind_index.insert(name, index);
        index
    }

    /// Schedule `name`'s tick at `tick` made task `id`.
    pub(super) fn ticked(&mut self, name: &str, tick: std::time::SystemTime, id: Uuid) {
        if !self.schedules.contains_key(name) && self.schedules.len() >= SCHEDULES_KEPT {
            return;
        }
        let (latest, recent) = self.schedules.entry(name.into()).or_default();
        *latest = (*latest).max(super::millis(tick));
        if !recent.contains(&id) {
            if recent.len() == RECENT_TICKS {
                recent.pop_front();
            }
            recent.push_back(id);
        }
    }

    pub(super) fn counts(&mut self, kind: u32) -> &mut KindCounts {
        let index = kind as usize;
        if self.by_kind.len() <= index {
            self.by_kind.resize(index + 1, KindCounts::default());
        }
        &mut self.by_kind[index]
    }

    pub(super) fn task(&self, id: Uuid) -> Option<TaskView> {
        let entry = self.tasks.get(&id).filter(|entry| entry.vouched)?;
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
            expires_at: entry
                .extra
                .as_ref()
                .and_then(|extra| time_of(extra.expires_at)),
            handler_stopped: entry.handler_stopped,
            schedule: entry
                .extra
                .as_ref()
                .and_then(|extra| extra.schedule.as_ref())
                .map(|(name, _)| Arc::from(&**name)),
            tick: entry
                .extra
                .as_ref()
                .and_then(|extra| extra.schedule.as_ref())
                .and_then(|(_, tick)| time_of(*tick)),
            error: entry.error.as_deref().map(Arc::from),
            reason: entry.reason,
            result: None,
            result_offset: (entry.result_offset >= 0).then_some(entry.result_offset),
        })
    }
}
