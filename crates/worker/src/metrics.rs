//! The worker's metrics (Prometheus text format) and health, served on `HTTP_BIND`.
//!
//! Label sets are bounded: a kind label is one of the kinds this worker runs, or `other`
//! (a task of a kind it has no handler for carries whatever kind its sender wrote); a dead
//! reason is one of offload's few reasons. No task id is ever a label.

use std::{
    collections::HashSet,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU8, Ordering},
    },
    time::Duration,
};

use axum::{
    Router,
    extract::State,
    http::{StatusCode, header},
    response::IntoResponse,
    routing::get,
};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};
use tokio_util::sync::CancellationToken;

/// The label of metrics counted per kind.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: String,
}

/// The labels of dead tasks.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DeadLabels {
    kind: String,
    reason: String,
}

/// Seconds, from a millisecond to an hour.
fn duration_buckets() -> Histogram {
    Histogram::new([
        0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
        900.0, 3600.0,
    ])
}

/// Everything the worker counts, and whether it is consuming.
pub(crate) struct Metrics {
    registry: Registry,
    known: HashSet<String>,
    started: Family<KindLabel, Counter>,
    succeeded: Family<KindLabel, Counter>,
    retried: Family<KindLabel, Counter>,
    dead: Family<DeadLabels, Counter>,
    cancelled: Family<KindLabel, Counter>,
    expired: Family<KindLabel, Counter>,
    duration: Family<KindLabel, Histogram, fn() -> Histogram>,
    in_hand: Family<KindLabel, Gauge>,
    consuming: Family<KindLabel, Gauge>,
    paused: Family<KindLabel, Gauge>,
    redeliveries: Counter,
    reconnects: Family<KindLabel, Counter>,
    /// Each kind's subscription: consuming, paused, or neither (connecting).
    states: std::collections::HashMap<String, AtomicU8>,
}

/// Where a kind's subscription is, for `/health`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum KindState {
    /// Not subscribed (yet, or again).
    Connecting = 0,
    /// Consuming its queue.
    Consuming = 1,
    /// Its gate is closed: not consuming, as asked.
    Paused = 2,
}

impl Metrics {
    /// Metrics for a worker running `kinds`.
    // One registration after the other, each with its help text: long, and flat.
    #[allow(clippy::too_many_lines)]
    pub(crate) fn new<'a>(kinds: impl IntoIterator<Item = &'a str>) -> Self {
        let mut registry = Registry::with_prefix("offload_worker");
        let started = Family::<KindLabel, Counter>::default();
        let succeeded = Family::<KindLabel, Counter>::default();
        let retried = Family::<KindLabel, Counter>::default();
        let dead = Family::<DeadLabels, Counter>::default();
        let cancelled = Family::<KindLabel, Counter>::default();
        let expired = Family::<KindLabel, Counter>::default();
        let duration = Family::<KindLabel, Histogram, fn() -> Histogram>::new_with_constructor(
            duration_buckets,
        );
        let in_hand = Family::<KindLabel, Gauge>::default();
        let consuming = Family::<KindLabel, Gauge>::default();
        let paused = Family::<KindLabel, Gauge>::default();
        let redeliveries = Counter::default();
        let reconnects = Family::<KindLabel, Counter>::default();
        registry.register(
            "tasks_started",
            "Attempts started, by kind",
            started.clone(),
        );
        registry.register(
            "tasks_succeeded",
            "Tasks that succeeded, by kind",
            succeeded.clone(),
        );
        registry.register(
            "tasks_retried",
            "Failed attempts sent to wait for another, by kind",
            retried.clone(),
        );
        registry.register(
            "tasks_dead",
            "Tasks that will not run again, by kind and reason",
            dead.clone(),
        );
        registry.register(
            "tasks_cancelled",
            "Tasks this worker ended as cancelled (skipped, or stopped while running), by kind",
            cancelled.clone(),
        );
        registry.register(
            "tasks_expired",
            "Tasks this worker ended as expired (not started by their expires_at), by kind",
            expired.clone(),
        );
        registry.register(
            "task_duration_seconds",
            "How long attempts ran, by kind (succeeded or failed)",
            duration.clone(),
        );
        registry.register(
            "tasks_in_hand",
            "Deliveries held: running, or being settled, by kind",
            in_hand.clone(),
        );
        registry.register(
            "kind_consuming",
            "1 while the worker consumes the kind's queue",
            consuming.clone(),
        );
        registry.register(
            "kind_paused",
            "1 while the kind is paused (POST /kinds/{kind}/pause)",
            paused.clone(),
        );
        registry.register(
            "redeliveries",
            "Deliveries the broker had delivered before (a worker died or lost its connection)",
            redeliveries.clone(),
        );
        registry.register(
            "reconnects",
            "Times the worker subscribed to a kind's queue again after losing its subscription, by kind",
            reconnects.clone(),
        );
        let known: HashSet<String> = kinds.into_iter().map(str::to_owned).collect();
        // Every kind's series from the start, at zero: a rate over a series that appears
        // with its first task would miss that task.
        for kind in &known {
            let label = KindLabel { kind: kind.clone() };
            drop(started.get_or_create(&label));
            drop(succeeded.get_or_create(&label));
            drop(retried.get_or_create(&label));
            drop(cancelled.get_or_create(&label));
            drop(expired.get_or_create(&label));
            drop(duration.get_or_create(&label));
            drop(in_hand.get_or_create(&label));
            drop(consuming.get_or_create(&label));
            drop(paused.get_or_create(&label));
            drop(reconnects.get_or_create(&label));
        }
        let states = known
            .iter()
            .map(|kind| (kind.clone(), AtomicU8::new(KindState::Connecting as u8)))
            .collect();
        Self {
            registry,
            known,
            started,
            succeeded,
            retried,
            dead,
            cancelled,
            expired,
            duration,
            in_hand,
            consuming,
            paused,
            redeliveries,
            reconnects,
            states,
        }
    }

    /// `kind` as a label: a kind this worker runs, or `other`.
    fn kind(&self, kind: &str) -> KindLabel {
        KindLabel {
            kind: if self.known.contains(kind) {
                kind.to_owned()
            } else {
                "other".to_owned()
            },
        }
    }

    pub(crate) fn started(&self, kind: &str, redelivered: bool) {
        self.started.get_or_create(&self.kind(kind)).inc();
        if redelivered {
            self.redeliveries.inc();
        }
    }

    pub(crate) fn ran(&self, kind: &str, took: Duration) {
        self.duration
            .get_or_create(&self.kind(kind))
            .observe(took.as_secs_f64());
    }

    pub(crate) fn succeeded(&self, kind: &str) {
        self.succeeded.get_or_create(&self.kind(kind)).inc();
    }

    pub(crate) fn retried(&self, kind: &str) {
        self.retried.get_or_create(&self.kind(kind)).inc();
    }

    pub(crate) fn cancelled(&self, kind: &str) {
        self.cancelled.get_or_create(&self.kind(kind)).inc();
    }

    pub(crate) fn expired(&self, kind: &str) {
        self.expired.get_or_create(&self.kind(kind)).inc();
    }

    pub(crate) fn dead(&self, kind: &str, reason: &str) {
        let KindLabel { kind } = self.kind(kind);
        self.dead
            .get_or_create(&DeadLabels {
                kind,
                reason: reason.to_owned(),
            })
            .inc();
    }

    /// A delivery of `kind` taken in hand; the guard gives it back when dropped.
    pub(crate) fn hold(&self, kind: &str) -> InHand {
        let gauge = self.in_hand.get_or_create(&self.kind(kind)).clone();
        gauge.inc();
        InHand(gauge)
    }

    /// Where `kind`'s subscription is now.
    pub(crate) fn kind_state(&self, kind: &str, state: KindState) {
        if let Some(current) = self.states.get(kind) {
            current.store(state as u8, Ordering::Relaxed);
        }
        let label = self.kind(kind);
        self.consuming
            .get_or_create(&label)
            .set(i64::from(state == KindState::Consuming));
        self.paused
            .get_or_create(&label)
            .set(i64::from(state == KindState::Paused));
    }

    /// Every kind consumed or paused: the worker is doing what it is asked.
    fn healthy(&self) -> bool {
        !self.states.is_empty()
            && self
                .states
                .values()
                .all(|state| state.load(Ordering::Relaxed) != KindState::Connecting as u8)
    }

    /// Counts a subscription to `kind`'s queue after the first.
    pub(crate) fn reconnected(&self, kind: &str) {
        self.reconnects.get_or_create(&self.kind(kind)).inc();
    }

    fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)?;
        Ok(text)
    }
}

/// One delivery in hand, counted in `tasks_in_hand` until dropped.
pub(crate) struct InHand(Gauge);

impl Drop for InHand {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Serves `/metrics` and `/health` on `bind` until `stop` is cancelled.
pub(crate) async fn serve(
    bind: SocketAddr,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(bind).await?;
    tracing::info!(addr = %listener.local_addr()?, "serving /metrics and /health");
    let app = Router::new()
        .route("/metrics", get(metrics_text))
        .route("/health", get(health))
        .with_state(metrics);
    tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(async move { stop.cancelled().await })
            .await;
        if let Err(error) = served {
            tracing::warn!("the metrics listener stopped: {error}");
        }
    });
    Ok(())
}

async fn metrics_text(State(metrics): State<Arc<Metrics>>) -> impl IntoResponse {
    match metrics.encode() {
        Ok(text) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            text,
        ),
        Err(_) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            "the metrics could not be written".to_owned(),
        ),
    }
}

/// 200 while the worker consumes each of its kinds (or has paused it, as asked); 503
/// otherwise.
async fn health(State(metrics): State<Arc<Metrics>>) -> impl IntoResponse {
    if metrics.healthy() {
        (
            StatusCode::OK,
            axum::Json(serde_json::json!({"status": "ok", "consuming": true})),
        )
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(serde_json::json!({"status": "unavailable", "consuming": false})),
        )
    }
}
