//! The kinds: `GET /kinds` (scope `read`) lists each kind's queue; `POST
//! /kinds/{kind}/pause` and `POST /kinds/{kind}/resume` (scope `admin`) stop and start every
//! worker's consumption of one kind. A pause is the kind's gate deleted (see the topology's
//! text): it lives in the broker, so it outlives restarts of gateways, workers and the broker,
//! and holds for workers that start later.

use std::time::Duration;

use axum::{
    extract::{Path, State},
    middleware,
    response::{IntoResponse, Response},
};
use offload_common::{PublishError as BrokerPublishError, TaskKind, TopologyError};
use serde::Serialize;
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};

use crate::{
    AppState,
    auth::{self, Scope},
    error::{ApiError, ErrorBody, Result},
    openapi::{KeyErrors, Unavailable},
    publisher::PublishError,
};

/// How long a pause waits for the workers to stop consuming before it answers.
const PAUSE_SETTLES_WITHIN: Duration = Duration::from_secs(5);

pub fn router(state: &AppState) -> OpenApiRouter<AppState> {
    let read =
        OpenApiRouter::new()
            .routes(routes!(list))
            .route_layer(middleware::from_fn_with_state(
                (state.access.clone(), Scope::Read),
                auth::require,
            ));
    let admin = OpenApiRouter::new()
        .routes(routes!(pause))
        .routes(routes!(resume))
        .route_layer(middleware::from_fn_with_state(
            (state.access.clone(), Scope::Admin),
            auth::require,
        ));
    read.merge(admin)
}

/// Every kind this gateway knows of whose queue exists.
#[derive(Serialize, ToSchema)]
struct KindList {
    kinds: Vec<KindView>,
}

/// One kind, as the broker and this gateway's view count it now.
#[derive(Serialize, ToSchema)]
pub(crate) struct KindView {
    /// The kind.
    #[schema(example = "resize")]
    kind: String,
    /// Whether it is paused: its tasks are accepted and wait, and none starts.
    paused: bool,
    /// Tasks ready on its queue.
    ready: u32,
    /// Workers consuming its queue (a paused kind has none).
    workers: u32,
    /// Tasks waiting in the delay levels (retries, tasks to run later), as far as this
    /// gateway's status view knows; `null` with EVENTS=off.
    scheduled: Option<u64>,
    /// Tasks a worker is running, as far as this gateway's status view knows; `null` with
    /// EVENTS=off.
    in_hand: Option<u64>,
}

/// What a pause or resume did.
#[derive(Serialize, ToSchema)]
struct KindChange {
    /// The kind.
    kind: String,
    /// Whether it is paused now.
    paused: bool,
    /// Workers still consuming it: after a pause, 0 once every worker has stopped (tasks
    /// they already hold still finish); more only if some had not within 5 seconds.
    workers: u32,
}

fn unavailable(state: &AppState) -> impl Fn(PublishError) -> ApiError + '_ {
    |error| ApiError::Unavailable {
        error,
        retry_after: state.retry_after_secs,
    }
}

/// What the dashboard and `GET /kinds` show.
pub(crate) async fn kinds(state: &AppState) -> Option<Vec<KindView>> {
    let depth = state.depth().await?;
    let counts = state
        .tracker
        .as_ref()
        .map(crate::status::Tracker::kind_counts);
    Some(
        depth
            .kinds
            .into_iter()
            .map(|kind| {
                let counted = counts
                    .as_ref()
                    .map(|counts| counts.get(&kind.kind).copied().unwrap_or_default());
                KindView {
                    paused: kind.paused,
                    ready: kind.ready,
                    workers: kind.consumers,
                    scheduled: counted.map(|counted| counted.scheduled),
                    in_hand: counted.map(|counted| counted.running),
                    kind: kind.kind,
                }
            })
            .collect(),
    )
}

/// Lists each kind: paused or not, tasks ready, scheduled and in hand, workers consuming it.
#[utoipa::path(
    get,
    path = "/kinds",
    tag = "kinds",
    security((), ("bearer" = []), ("browser" = [])),
    responses(
        (status = 200, description = "The kinds", body = KindList),
        KeyErrors,
        Unavailable,
    ),
)]
async fn list(State(state): State<AppState>) -> Result<Response> {
    let kinds = kinds(&state)
        .await
        .ok_or_else(|| unavailable(&state)(BrokerPublishError::Disconnected.into()))?;
    Ok(axum::Json(KindList { kinds }).into_response())
}

/// Pauses a kind on every worker: its tasks are still accepted (202) and wait; none starts,
/// on any worker, including workers that start later, until it is resumed. Tasks already
/// running finish. Answers once no worker consumes the kind (or after 5 seconds, saying how
/// many still do).
#[utoipa::path(
    post,
    path = "/kinds/{kind}/pause",
    tag = "kinds",
    security((), ("bearer" = []), ("browser" = [])),
    params(("kind" = String, Path, description = "The kind")),
    responses(
        (status = 200, description = "Paused", body = KindChange),
        (status = 404, description = "`unknown_kind`: no queue of that kind", body = ErrorBody),
        KeyErrors,
        Unavailable,
    ),
)]
async fn pause(State(state): State<AppState>, Path(kind): Path<String>) -> Result<Response> {
    let kind = set_gate(&state, &kind, false).await?;
    let deadline = tokio::time::Instant::now() + PAUSE_SETTLES_WITHIN;
    let workers = loop {
        let workers = consumers(&state, &kind).await;
        if workers == 0 || tokio::time::Instant::now() >= deadline {
            break workers;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    Ok(axum::Json(KindChange {
        kind,
        paused: true,
        workers,
    })
    .into_response())
}

/// Resumes a paused kind: every worker that runs it consumes it again within a second or so.
#[utoipa::path(
    post,
    path = "/kinds/{kind}/resume",
    tag = "kinds",
    security((), ("bearer" = []), ("browser" = [])),
    params(("kind" = String, Path, description = "The kind")),
    responses(
        (status = 200, description = "Resumed", body = KindChange),
        (status = 404, description = "`unknown_kind`: no queue of that kind", body = ErrorBody),
        KeyErrors,
        Unavailable,
    ),
)]
async fn resume(State(state): State<AppState>, Path(kind): Path<String>) -> Result<Response> {
    let kind = set_gate(&state, &kind, true).await?;
    let workers = consumers(&state, &kind).await;
    Ok(axum::Json(KindChange {
        kind,
        paused: false,
        workers,
    })
    .into_response())
}

/// Opens (resumes) or closes (pauses) the gate of `kind`, which must have a queue; the kind.
async fn set_gate(state: &AppState, kind: &str, open: bool) -> Result<String> {
    let kind = existing(state, kind).await?;
    let broker = state.publisher.broker();
    let link = broker
        .link()
        .ok_or_else(|| unavailable(state)(BrokerPublishError::Disconnected.into()))?;
    let changed = if open {
        broker.topology().open_gate(link.connection(), &kind).await
    } else {
        broker.topology().close_gate(link.connection(), &kind).await
    };
    changed.map_err(|error| topology_failed(state, error))?;
    tracing::info!(%kind, "kind {}", if open { "resumed" } else { "paused" });
    Ok(kind)
}

/// `kind`, if it is a kind and its queue exists.
async fn existing(state: &AppState, kind: &str) -> Result<String> {
    let not_found = || ApiError::KindNotFound {
        kind: kind.chars().take(TaskKind::MAX_LEN).collect(),
        known: state.kinds(),
    };
    let kind = TaskKind::try_from(kind).map_err(|_| not_found())?;
    let link = state
        .publisher
        .broker()
        .link()
        .ok_or_else(|| unavailable(state)(BrokerPublishError::Disconnected.into()))?;
    let topology = state.publisher.broker().topology();
    let queue = topology.kind_queue(kind.as_str());
    match topology.exists_named(link.connection(), &queue).await {
        Ok(true) => Ok(kind.into()),
        Ok(false) => Err(not_found()),
        Err(error) => Err(topology_failed(state, error)),
    }
}

/// Workers consuming `kind`'s queue now (0 if it cannot be asked).
async fn consumers(state: &AppState, kind: &str) -> u32 {
    let broker = state.publisher.broker();
    let Some(link) = broker.link() else {
        return 0;
    };
    let queue = broker.topology().kind_queue(kind);
    let counting = broker.topology().count(link.connection(), &queue);
    match broker.within("counting a kind's workers", counting).await {
        Ok(Some((_, consumers))) => consumers,
        _ => 0,
    }
}

/// The broker refused or could not be asked: 503, the cause in the gateway's log only.
fn topology_failed(state: &AppState, error: TopologyError) -> ApiError {
    tracing::warn!("a kind's gate could not be read or changed: {error}");
    let error = match error {
        TopologyError::Broker(error) => BrokerPublishError::Channel(error),
        TopologyError::Mismatch { .. } => BrokerPublishError::Disconnected,
    };
    unavailable(state)(error.into())
}
