//! The gateway's metrics registry: what it counts, encoded in the Prometheus text format
//! for `GET /metrics` (`routes/metrics.rs`, which also holds the layer that counts requests).
//!
//! Label sets are bounded: a route is one of the router's path templates (or `unmatched`), a
//! method one of the standard ones (or `other`), a status one of the codes the gateway sends,
//! a refusal one of its error codes, a kind one the workers bound (the gateway refuses the
//! others). No task id is ever a label.

use std::time::Duration;

use offload_common::{BrokerState, QueueDepth};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    route: String,
    method: &'static str,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CodeLabel {
    code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: String,
}

/// A schedule's name: operator-made, at most `schedules::store::MAX_SCHEDULES` of them.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ScheduleLabel {
    schedule: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: &'static str,
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
#[allow(non_camel_case_types)] // label values, written as Prometheus users read them
enum QueuePart {
    ready,
    scheduled,
    dead,
}

/// `state`, and `kind` for a kind's own queue (the delay levels and the dead-letter queue
/// are every kind's, and have none).
type QueueLabel = Vec<(&'static str, String)>;

fn queue_label(state: QueuePart, kind: Option<&str>) -> QueueLabel {
    let state = match state {
        QueuePart::ready => "ready",
        QueuePart::scheduled => "scheduled",
        QueuePart::dead => "dead",
    };
    let mut label = vec![("state", state.to_owned())];
    label.extend(kind.map(|kind| ("kind", kind.to_owned())));
    label
}

/// The error code of a refusal, left on its response for the metrics layer to count.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Refusal(pub(crate) &'static str);

/// What the gauges show, read at the time of a scrape.
pub(crate) struct Snapshot {
    /// What a publish could do now.
    pub(crate) broker: BrokerState,
    /// Publishes awaiting a confirm.
    pub(crate) in_flight: usize,
    /// Whether the broker has stopped confirming.
    pub(crate) not_confirming: bool,
    /// The queues' depth, if the broker answered in time.
    pub(crate) depth: Option<QueueDepth>,
}

/// Everything the gateway counts.
#[derive(Debug)]
pub(crate) struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    refusals: Family<CodeLabel, Counter>,
    confirm: Histogram,
    in_flight: Gauge,
    connections: Gauge,
    broker: Family<StateLabel, Gauge>,
    submitted: Family<KindLabel, Counter>,
    queue: Family<QueueLabel, Gauge>,
    consumers: Family<KindLabel, Gauge>,
    paused: Family<KindLabel, Gauge>,
    not_confirming: Gauge,
    ticks_fired: Family<ScheduleLabel, Counter>,
    ticks_missed: Family<ScheduleLabel, Counter>,
    tick_late: Histogram,
}

impl Metrics {
    // One registration after the other, each with its help text: long, and flat.
    #[allow(clippy::too_many_lines)]
    pub(crate) fn new() -> Self {
        let mut registry = Registry::with_prefix("offload");
        let requests = Family::<RequestLabels, Counter>::default();
        let refusals = Family::<CodeLabel, Counter>::default();
        // Seconds, from a quarter of a millisecond to the longest CONFIRM_TIMEOUT one would set.
        let confirm = Histogram::new([
            0.000_25, 0.000_5, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
            5.0, 10.0,
        ]);
        let in_flight = Gauge::default();
        let connections = Gauge::default();
        let broker = Family::<StateLabel, Gauge>::default();
        let submitted = Family::<KindLabel, Counter>::default();
        let queue = Family::<QueueLabel, Gauge>::default();
        let consumers = Family::<KindLabel, Gauge>::default();
        let paused = Family::<KindLabel, Gauge>::default();
        let not_confirming = Gauge::default();
        let ticks_fired = Family::<ScheduleLabel, Counter>::default();
        let ticks_missed = Family::<ScheduleLabel, Counter>::default();
        // Seconds, from a millisecond to a minute.
        let tick_late = Histogram::new([
            0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 60.0,
        ]);
        registry.register(
            "schedule_ticks_fired",
            "Ticks that made a task, by schedule (counted by the gateway that fired them)",
            ticks_fired.clone(),
        );
        registry.register(
            "schedule_ticks_missed",
            "Ticks that made no task, by schedule: skipped by its missed policy after no gateway ran, or whose task the broker did not take",
            ticks_missed.clone(),
        );
        registry.register(
            "schedule_tick_late_seconds",
            "How long after its time each tick's task was published",
            tick_late.clone(),
        );
        registry.register(
            "confirms_timing_out",
            "1 while the broker has stopped confirming publishes (several in a row went unanswered within CONFIRM_TIMEOUT) although connected",
            not_confirming.clone(),
        );
        registry.register(
            "http_requests",
            "HTTP requests answered, by route template, method and status",
            requests.clone(),
        );
        registry.register(
            "refusals",
            "Requests refused, by the error's code",
            refusals.clone(),
        );
        registry.register(
            "publish_confirm_seconds",
            "From publishing a task to the broker's confirm (or nack, or return)",
            confirm.clone(),
        );
        registry.register(
            "publishes_in_flight",
            "Publishes awaiting the broker's confirm (at most MAX_IN_FLIGHT)",
            in_flight.clone(),
        );
        registry.register(
            "http_connections",
            "HTTP connections open (at most MAX_CONNECTIONS)",
            connections.clone(),
        );
        registry.register(
            "broker_state",
            "1 for the gateway's state of the broker link, 0 for the others",
            broker.clone(),
        );
        registry.register(
            "tasks_submitted",
            "Tasks accepted (202), by kind",
            submitted.clone(),
        );
        registry.register(
            "queue_messages",
            "Tasks waiting, as the broker counts them at the scrape: ready on each kind's queue (by kind), scheduled in the delay levels, dead",
            queue.clone(),
        );
        registry.register(
            "queue_consumers",
            "Worker subscriptions to each kind's queue, at the scrape",
            consumers.clone(),
        );
        registry.register(
            "kind_paused",
            "1 while the kind is paused (POST /kinds/{kind}/pause), at the scrape",
            paused.clone(),
        );
        Self {
            registry,
            requests,
            refusals,
            confirm,
            in_flight,
            connections,
            broker,
            submitted,
            queue,
            consumers,
            paused,
            not_confirming,
            ticks_fired,
            ticks_missed,
            tick_late,
        }
    }

    /// A tick of `schedule` made its task, `late` after its time.
    pub(crate) fn tick_fired(&self, schedule: &str, late: Duration) {
        self.ticks_fired
            .get_or_create(&ScheduleLabel {
                schedule: schedule.to_owned(),
            })
            .inc();
        self.tick_late.observe(late.as_secs_f64());
    }

    /// `count` ticks of `schedule` made no task.
    pub(crate) fn ticks_missed(&self, schedule: &str, count: u64) {
        self.ticks_missed
            .get_or_create(&ScheduleLabel {
                schedule: schedule.to_owned(),
            })
            .inc_by(count);
    }

    /// The open-connections gauge, for the server loop to move.
    pub(crate) fn connections(&self) -> Gauge {
        self.connections.clone()
    }

    /// The refusals counter of `code`, for refusals made outside the router.
    pub(crate) fn refused(&self, code: &'static str) {
        self.refusals.get_or_create(&CodeLabel { code }).inc();
    }

    pub(crate) fn confirmed(&self, took: Duration) {
        self.confirm.observe(took.as_secs_f64());
    }

    pub(crate) fn submitted(&self, kind: &str) {
        self.submitted
            .get_or_create(&KindLabel {
                kind: kind.to_owned(),
            })
            .inc();
    }

    /// Counts one answered request to `route` (a path template, or `unmatched`).
    pub(crate) fn request(&self, route: String, method: &'static str, status: u16) {
        self.requests
            .get_or_create(&RequestLabels {
                route,
                method,
                status,
            })
            .inc();
    }

    /// The text of a scrape, with the gauges set from `now`.
    pub(crate) fn encode(&self, now: &Snapshot) -> Result<String, std::fmt::Error> {
        let (broker, depth) = (now.broker, now.depth.as_ref());
        self.in_flight
            .set(i64::try_from(now.in_flight).unwrap_or(i64::MAX));
        self.not_confirming.set(i64::from(now.not_confirming));
        for state in [
            BrokerState::Connected,
            BrokerState::Blocked,
            BrokerState::Unroutable,
            BrokerState::Disconnected,
        ] {
            self.broker
                .get_or_create(&StateLabel {
                    state: state.as_str(),
                })
                .set(i64::from(state == broker));
        }
        if let Some(depth) = depth {
            for (state, count) in [
                (QueuePart::scheduled, depth.scheduled),
                (QueuePart::dead, u64::from(depth.dead)),
            ] {
                self.queue
                    .get_or_create(&queue_label(state, None))
                    .set(i64::try_from(count).unwrap_or(i64::MAX));
            }
            for kind in &depth.kinds {
                self.queue
                    .get_or_create(&queue_label(QueuePart::ready, Some(&kind.kind)))
                    .set(i64::from(kind.ready));
                let label = KindLabel {
                    kind: kind.kind.clone(),
                };
                self.consumers
                    .get_or_create(&label)
                    .set(i64::from(kind.consumers));
                self.paused
                    .get_or_create(&label)
                    .set(i64::from(kind.paused));
            }
        }
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)?;
        Ok(text)
    }
}
