//! Which gateway fires the schedules, and the firing.
//!
//! Every gateway consumes `<QUEUE>.scheduler`, a quorum queue with a single active consumer
//! (`x-single-active-consumer`) that holds one message, the token (`x-max-length` 1,
//! `reject-publish`: a second token is refused, so every gateway may offer one when it
//! subscribes). Only the active consumer is sent the token, and it holds it unacknowledged
//! while it leads; when its channel or connection goes (it stops, dies, or is cut off), the
//! broker gives the token to the next consumer, which leads from then on. One leader at a time
//! is the broker's promise; the leader fires each tick, and every tick's task has an id made of
//! the schedule and the tick ([`super::spec::tick_id`]).
//!
//! A new leader starts where the last one stopped, from the events stream: the latest tick
//! each schedule made a task for, and when a leader was last heard of (it writes a `scheduler`
//! event every [`HEARTBEAT`]). A tick due while some gateway ran fires now, late: up to
//! [`GRACE`] after the last leader was last heard of (it died at that moment, or was cut off),
//! and, when this gateway itself already ran then, every tick since (the broker was out of
//! reach: a blip of the broker loses no tick). Ticks due while no gateway ran follow the
//! schedule's `missed` policy: `skip`, or `once` for the latest.
//!
//! A tick's task is published again and again while this gateway leads, for up to
//! [`LATE_LIMIT`] after the tick; its `queued` event, which tells a later leader the tick has
//! fired, likewise. A new term waits for the publishes of the last one to end before it looks
//! at what has fired, so one gateway never fires a tick twice.

use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};

use lapin::{BasicProperties, types::FieldTable};
use offload_common::{Broker, Delivered, Event, EventSink, EventType, Message, TaskEnvelope};
use tokio::{sync::Semaphore, task::JoinSet};
use tokio_util::sync::CancellationToken;

use super::{
    plan::{Plan, catch_up},
    store::{Schedules, Stored},
};
use crate::{
    metrics_registry::Metrics,
    publisher::{PublishError, Publisher},
    status::Tracker,
};

/// How often the leader says it is alive.
pub const HEARTBEAT: Duration = Duration::from_millis(500);
/// How long after a leader was last heard of a tick still counts as due while one ran.
pub const GRACE: Duration = Duration::from_secs(1);
/// Longest wait for the broker to confirm the token.
const TOKEN_CONFIRM: Duration = Duration::from_secs(5);
/// How long after its tick a task is still published, while the broker refuses it: beyond, the
/// tick counts as missed.
pub const LATE_LIMIT: Duration = Duration::from_secs(60);
/// The most late ticks of one schedule a takeover fires (the latest; older ones are missed).
pub const LATE_MAX: usize = 60;
/// The most tick publishes awaiting the broker's confirm at once: a burst of ticks (a thousand
/// schedules of `every: 10s` all tick together) takes this much of the gateway's
/// `MAX_IN_FLIGHT`, and leaves the rest to `POST /tasks`.
pub const TICKS_IN_FLIGHT: usize = 128;
/// The first wait before publishing again; it doubles up to [`RETRY_MAX`].
const RETRY_FIRST: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(2);

/// What the leader needs.
#[derive(Clone)]
pub struct Scheduler {
    pub(crate) broker: Broker,
    pub(crate) schedules: Schedules,
    pub(crate) tracker: Tracker,
    pub(crate) publisher: Arc<Publisher>,
    pub(crate) events: EventSink,
    /// `<host>-<pid>` of this gateway, in its `scheduler` events.
    pub(crate) name: Arc<str>,
    pub(crate) metrics: Arc<Metrics>,
    /// When this gateway started: a tick due since then was due while a gateway ran.
    pub(crate) started: SystemTime,
    /// [`TICKS_IN_FLIGHT`] permits, one held by each tick's publish.
    pub(crate) publishing: Arc<Semaphore>,
}

impl Scheduler {
    /// Takes part in the election until `shutdown`, firing the schedules while it leads; on
    /// shutdown its subscription is closed, which hands the token to the next gateway.
    pub async fn run(self, shutdown: CancellationToken) {
        let queue = self.broker.topology().scheduler_queue();
        let mut subscription = self.broker.subscribe(&queue, 1);
        // The publishes of this gateway's ticks, across its terms as leader.
        let mut fires = JoinSet::new();
        loop {
            let delivered = tokio::select! {
                () = shutdown.cancelled() => break,
                delivered = subscription.next() => delivered,
            };
            match delivered {
                Delivered::Subscribed => self.offer_token(&queue).await,
                Delivered::Message(token) => {
                    tracing::info!("this gateway fires the schedules");
                    let term = shutdown.child_token();
                    let ended = tokio::select! {
                        () = shutdown.cancelled() => None,
                        () = self.lead(&term, &mut fires) => None,
                        delivered = subscription.next() => Some(delivered),
                    };
                    // The last term's publishes end (they stop retrying) before anything
                    // looks at what has fired: the next term, or the next leader.
                    term.cancel();
                    while fires.join_next().await.is_some() {}
                    // Never acked: the token goes back to the queue with the channel.
                    drop(token);
                    match ended {
                        None => break,
                        Some(Delivered::Lost(reason)) => {
                            tracing::warn!("no longer firing the schedules: {reason}");
                        }
                        Some(_) => tracing::warn!("no longer firing the schedules"),
                    }
                }
                Delivered::Lost(reason) => {
                    tracing::debug!("the scheduler election was lost ({reason}); joining again");
                }
                Delivered::Paused(_) => {}
            }
        }
        subscription.close("gateway stopping").await;
    }

    /// Puts a token in the queue, unless there is one (the broker refuses a second).
    async fn offer_token(&self, queue: &str) {
        let properties = BasicProperties::default().with_delivery_mode(2);
        let offered = self
            .broker
            .publish_confirmed(
                Message::to_queue(queue, b"token", properties),
                TOKEN_CONFIRM,
            )
            .await;
        if let Err(error) = offered {
            // A nack: the queue holds its token already.
            tracing::debug!("no token offered to the scheduler election: {error}");
        }
    }

    /// Fires the schedules, forever (until dropped: leadership ends), each tick's publish a
    /// task of `fires` that ends with `term`.
    async fn lead(&self, term: &CancellationToken, fires: &mut JoinSet<()>) {
        while !(self.tracker.is_live() && self.schedules.is_live()) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let mut plan = Plan::default();
        let now = SystemTime::now();
        let seen = self.tracker.scheduler_seen();
        for stored in self.schedules.all() {
            let last = self.tracker.last_tick(&stored.schedule.name);
            let (fire, missed) = catch_up(&stored, last, seen, self.started, now);
            for tick in fire {
                self.fire(&stored, tick, term, fires);
            }
            if missed > 0 {
                tracing::info!(schedule = %stored.schedule.name, missed, "ticks missed while no gateway ran");
                self.metrics.ticks_missed(&stored.schedule.name, missed);
            }
            plan.last.insert(stored.schedule.name.clone(), now);
        }
        plan.replan(&self.schedules, now);
        let mut version = self.schedules.version();
        let mut heartbeat = tokio::time::interval(HEARTBEAT);
        loop {
            if self.schedules.version() != version {
                version = self.schedules.version();
                plan.replan(&self.schedules, SystemTime::now());
            }
            let due = plan.next_due();
            let wait = due.map_or(Duration::from_secs(3600), |due| {
                due.duration_since(SystemTime::now()).unwrap_or_default()
            });
            tokio::select! {
                _ = heartbeat.tick() => self.alive(),
                () = self.schedules.changed() => {}
                Some(_) = fires.join_next(), if !fires.is_empty() => {}
                () = tokio::time::sleep(wait) => {
                    for (name, tick) in plan.take_due(SystemTime::now()) {
                        if let Some(stored) = self.schedules.get(&name).filter(|s| !s.paused) {
                            self.fire(&stored, tick, term, fires);
                            plan.after(&stored, tick);
                        }
                    }
                }
            }
        }
    }

    /// A `scheduler` event: the leader is alive.
    fn alive(&self) {
        let mut event = Event::new(EventType::Scheduler);
        event.worker = Some(self.name.to_string());
        self.events.emit(event);
    }

    /// Makes tick `tick`'s task, in the background: published as `POST /tasks` publishes,
    /// then its `queued` event (confirmed: a later leader reads the tick from it).
    fn fire(
        &self,
        stored: &Stored,
        tick: SystemTime,
        term: &CancellationToken,
        fires: &mut JoinSet<()>,
    ) {
        let schedule = stored.schedule.clone();
        let this = self.clone();
        let term = term.clone();
        fires.spawn(async move {
            let mut task =
                TaskEnvelope::new(schedule.task.kind.clone(), schedule.task.payload.clone());
            task.id = schedule.task_id(tick);
            task.expires_at = schedule
                .task
                .expires_in
                .as_deref()
                .and_then(|within| humantime::parse_duration(within).ok())
                .map(|within| task.submitted_at + within);
            if !this.publish_tick(&schedule.name, tick, &task, &term).await {
                return;
            }
            let late = SystemTime::now().duration_since(tick).unwrap_or_default();
            this.metrics.tick_fired(&schedule.name, late);
            let mut queued = Event::task(EventType::Queued, task.id, task.kind.as_str());
            queued.submitted_at = Some(task.submitted_at);
            queued.expires_at = task.expires_at;
            queued.schedule = Some(schedule.name.clone());
            queued.tick = Some(tick);
            // This gateway's next term reads the tick from its own view; others from the
            // stream, once the event is there.
            this.tracker.apply(&queued, None);
            tokio::spawn(async move { this.record_tick(queued, tick).await });
        });
    }

    /// Publishes a tick's task until the broker confirms it, while this gateway leads and up
    /// to [`LATE_LIMIT`] after the tick; whether it did. A term that ends leaves the tick to the
    /// next one (this gateway's or another's), which fires it late.
    async fn publish_tick(
        &self,
        schedule: &str,
        tick: SystemTime,
        task: &TaskEnvelope,
        term: &CancellationToken,
    ) -> bool {
        let mut wait = RETRY_FIRST;
        loop {
            let published = {
                let _permit = self
                    .publishing
                    .acquire()
                    .await
                    .expect("the ticks' semaphore is never closed");
                self.publisher
                    .publish(task, None, FieldTable::default())
                    .await
            };
            let at = humantime::format_rfc3339_millis(tick);
            let error = match published {
                Ok(()) => return true,
                // A definite answer, as POST /tasks's 422: publishing again changes nothing
                // until a worker of the kind starts.
                Err(PublishError::UnknownKind) => {
                    tracing::warn!(schedule, tick = %at, kind = %task.kind, "a tick made no task: no worker runs its kind");
                    self.metrics.ticks_missed(schedule, 1);
                    return false;
                }
                Err(error) => error,
            };
            if term.is_cancelled() {
                tracing::debug!(schedule, tick = %at, "no longer leading; the next leader fires the tick: {error}");
                return false;
            }
            if SystemTime::now() + wait > tick + LATE_LIMIT {
                tracing::warn!(schedule, tick = %at, "a tick made no task within {LATE_LIMIT:?}: {error}");
                self.metrics.ticks_missed(schedule, 1);
                return false;
            }
            tracing::debug!(schedule, tick = %at, "a tick's task is not published yet: {error}");
            tokio::select! {
                () = term.cancelled() => {}
                () = tokio::time::sleep(wait) => {}
            }
            wait = (wait * 2).min(RETRY_MAX);
        }
    }

    /// Writes a fired tick's `queued` event until the broker confirms it, for up to
    /// [`LATE_LIMIT`] after the tick: without it, a later leader would fire the tick again
    /// (with the same task id). Writing it twice is harmless: the same task, queued once.
    async fn record_tick(&self, queued: Event, tick: SystemTime) {
        let mut wait = RETRY_FIRST;
        while !self.events.emit_confirmed(queued.clone()).await {
            if SystemTime::now() + wait > tick + LATE_LIMIT {
                tracing::warn!(
                    schedule = queued.schedule.as_deref(),
                    "a tick's `queued` event was not confirmed: another leader may fire the tick again"
                );
                return;
            }
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(RETRY_MAX);
        }
    }
}
