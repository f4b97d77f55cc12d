//! Schedules: `PUT /schedules/{name}`, `DELETE /schedules/{name}`, `POST
//! /schedules/{name}/pause` and `/resume` (scope `admin`); `GET /schedules` and `GET
//! /schedules/{name}` (scope `read`). Kept in RabbitMQ (`crate::schedules`), fired once per tick
//! by whichever gateway leads.

use std::time::SystemTime;

use axum::{
    extract::{Path, State},
    http::StatusCode,
    middleware,
    response::{IntoResponse, Response},
};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};
use uuid::Uuid;

use super::Json;
use crate::{
    AppState,
    auth::{self, Scope},
    error::{ApiError, ErrorBody, Result},
    openapi::KeyErrors,
    schedules::{Missed, Schedule, Schedules, Stored, Template, store::Change},
    status::{Status, TaskView},
};

/// How many next ticks an answer lists.
const NEXT: usize = 3;

pub fn router(state: &AppState) -> OpenApiRouter<AppState> {
    let read = OpenApiRouter::new()
        .routes(routes!(list))
        .routes(routes!(show))
        .route_layer(middleware::from_fn_with_state(
            (state.access.clone(), Scope::Read),
            auth::require,
        ));
    let admin = OpenApiRouter::new()
        .routes(routes!(put, delete))
        .routes(routes!(pause))
        .routes(routes!(resume))
        .route_layer(middleware::from_fn_with_state(
            (state.access.clone(), Scope::Admin),
            auth::require,
        ));
    read.merge(admin)
}

/// A schedule as `PUT` takes it: its task, and exactly one of `cron` and `every`.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct ScheduleBody {
    /// The task each tick makes: its `kind`, `payload` and optional `expires_in`.
    task: Template,
    /// A cron expression: 5 fields, or 6 with seconds first.
    #[serde(default)]
    #[schema(example = "30 2 * * *")]
    cron: Option<String>,
    /// The IANA time zone `cron` is read in (default UTC).
    #[serde(default)]
    #[schema(example = "Europe/Berlin")]
    timezone: Option<String>,
    /// Every this long, at least 1 s (`"10s"`, `"1h"`).
    #[serde(default)]
    #[schema(example = "10s")]
    every: Option<String>,
    /// Ticks missed while no gateway ran: `skip` (default) or `once`.
    #[serde(default)]
    missed: Missed,
}

/// A schedule and where it stands.
#[derive(Serialize, ToSchema)]
pub(crate) struct ScheduleView {
    #[serde(flatten)]
    schedule: Schedule,
    /// Whether it is paused (it makes no tasks).
    paused: bool,
    /// Its next ticks (none while paused).
    #[schema(value_type = Vec<String>)]
    next: Vec<String>,
    /// The latest tick that made a task, as this gateway knows.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(format = DateTime)]
    last_tick: Option<String>,
    /// The task of its latest tick, as this gateway knows.
    #[serde(skip_serializing_if = "Option::is_none")]
    last_task: Option<TickTask>,
    /// The tasks its latest ticks made, newest first (`GET /schedules/{name}` only).
    #[serde(skip_serializing_if = "Option::is_none")]
    recent: Option<Vec<TickTask>>,
}

/// One tick's task.
#[derive(Serialize, ToSchema)]
pub(crate) struct TickTask {
    /// The task id (made of the schedule and the tick).
    id: Uuid,
    /// The tick.
    #[schema(format = DateTime)]
    tick: Option<String>,
    /// Where the task stands.
    status: Status,
}

/// Every schedule.
#[derive(Serialize, ToSchema)]
struct ScheduleList {
    schedules: Vec<ScheduleView>,
}

fn rfc3339(time: SystemTime) -> String {
    humantime::format_rfc3339_millis(time).to_string()
}

fn view(state: &AppState, stored: Stored, with_recent: bool) -> ScheduleView {
    let tracker = state.tracker.as_ref();
    let name = stored.schedule.name.clone();
    let next = if stored.paused {
        Vec::new()
    } else {
        stored
            .ticks
            .upcoming(SystemTime::now().max(stored.since), NEXT)
            .into_iter()
            .map(rfc3339)
            .collect()
    };
    let tasks = tracker.map(|t| t.schedule_tasks(&name)).unwrap_or_default();
    let tick_task = |task: &TaskView| TickTask {
        id: task.id,
        tick: task.tick.map(rfc3339),
        status: task.status,
    };
    ScheduleView {
        paused: stored.paused,
        next,
        last_tick: tracker.and_then(|t| t.last_tick(&name)).map(rfc3339),
        last_task: tasks.first().map(tick_task),
        recent: with_recent.then(|| tasks.iter().map(tick_task).collect()),
        schedule: stored.schedule,
    }
}

/// The first `limit` schedules by name and how many there are, for the dashboard; `None` when
/// this gateway keeps no schedules or has not read them yet.
pub(crate) fn first(state: &AppState, limit: usize) -> Option<(Vec<ScheduleView>, usize)> {
    let all = schedules(state).ok()?.all();
    let total = all.len();
    let views = all
        .into_iter()
        .take(limit)
        .map(|stored| view(state, stored, false))
        .collect();
    Some((views, total))
}

/// The schedules, once read to the end of their stream; schedules need EVENTS=on.
fn schedules(state: &AppState) -> Result<&Schedules> {
    let schedules = state.schedules.as_ref().ok_or(ApiError::TrackingOff)?;
    if !schedules.is_live() {
        return Err(ApiError::Replaying {
            retry_after: state.retry_after_secs,
        });
    }
    Ok(schedules)
}

fn found(state: &AppState, name: &str) -> Result<Stored> {
    schedules(state)?
        .get(name)
        .ok_or_else(|| ApiError::UnknownSchedule(short(name)))
}

fn short(name: &str) -> String {
    name.chars().take(65).collect()
}

/// Every schedule, with its next tick and its latest.
#[utoipa::path(
    get,
    path = "/schedules",
    tag = "schedules",
    security((), ("bearer" = []), ("browser" = [])),
    responses(
        (status = 200, description = "Every schedule", body = ScheduleList),
        (status = 404, description = "`tracking_off`: schedules need EVENTS=on", body = ErrorBody),
        (status = 503, description = "`events_replaying`: this gateway has not read the schedules yet", body = ErrorBody),
        KeyErrors,
    ),
)]
async fn list(State(state): State<AppState>) -> Result<Response> {
    let all = schedules(&state)?.all();
    let schedules = all
        .into_iter()
        .map(|stored| view(&state, stored, false))
        .collect();
    Ok((StatusCode::OK, Json(ScheduleList { schedules })).into_response())
}

/// One schedule, with its next ticks, its latest and the tasks its latest ticks made.
#[utoipa::path(
    get,
    path = "/schedules/{name}",
    tag = "schedules",
    security((), ("bearer" = []), ("browser" = [])),
    params(("name" = String, Path, description = "The schedule's name")),
    responses(
        (status = 200, description = "The schedule", body = ScheduleView),
        (status = 404, description = "`unknown_schedule`, `tracking_off`", body = ErrorBody),
        (status = 503, description = "`events_replaying`: this gateway has not read the schedules yet", body = ErrorBody),
        KeyErrors,
    ),
)]
async fn show(State(state): State<AppState>, Path(name): Path<String>) -> Result<Response> {
    let stored = found(&state, &name)?;
    Ok((StatusCode::OK, Json(view(&state, stored, true))).into_response())
}

/// Makes or replaces a schedule; answers with its next ticks. A replaced schedule keeps its
/// paused state, and ticks from now on.
#[utoipa::path(
    put,
    path = "/schedules/{name}",
    tag = "schedules",
    security((), ("bearer" = []), ("browser" = [])),
    params(("name" = String, Path, description = "1 to 64 characters of `a-z 0-9 _ . -`")),
    request_body = ScheduleBody,
    responses(
        (status = 201, description = "Made", body = ScheduleView),
        (status = 200, description = "Replaced", body = ScheduleView),
        (status = 400, description = "`invalid_json`", body = ErrorBody),
        (status = 404, description = "`tracking_off`: schedules need EVENTS=on", body = ErrorBody),
        (status = 415, description = "`unsupported_media_type`", body = ErrorBody),
        (status = 422, description = "`invalid_task` (the body), `invalid_schedule_name`, `invalid_cron`, `invalid_timezone`, `invalid_every`, `cron_or_every` (exactly one), `invalid_expiry`, `unknown_kind` (no worker runs it), `too_many_schedules`", body = ErrorBody),
        (status = 503, description = "`broker_unavailable`: not stored; `events_replaying`", body = ErrorBody),
        KeyErrors,
    ),
)]
async fn put(
    State(state): State<AppState>,
    Path(name): Path<String>,
    Json(body): Json<ScheduleBody>,
) -> Result<Response> {
    let all = schedules(&state)?;
    let schedule = Schedule {
        name,
        task: body.task,
        cron: body.cron,
        timezone: body.timezone,
        every: body.every,
        missed: body.missed,
    };
    schedule.ticks().map_err(ApiError::InvalidScheduleSpec)?;
    let exists = all.get(&schedule.name).is_some();
    if !exists && all.len() >= crate::schedules::store::MAX_SCHEDULES {
        return Err(ApiError::TooManySchedules);
    }
    if !kind_has_a_queue(&state, schedule.task.kind.as_str()).await? {
        return Err(ApiError::UnknownKind {
            kind: schedule.task.kind.to_string(),
            known: state.kinds(),
        });
    }
    let name = schedule.name.clone();
    all.write(
        state.publisher.broker(),
        Change::Put {
            schedule,
            at: SystemTime::now(),
        },
    )
    .await
    .map_err(|error| ApiError::NotRecorded(error, state.retry_after_secs))?;
    let stored = found(&state, &name)?;
    let code = if exists {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    Ok((code, Json(view(&state, stored, false))).into_response())
}

/// Whether `kind` has a queue (some worker declared it): what `POST /tasks` needs to route.
async fn kind_has_a_queue(state: &AppState, kind: &str) -> Result<bool> {
    let broker = state.publisher.broker();
    let unavailable = || {
        ApiError::NotRecorded(
            offload_common::PublishError::Disconnected,
            state.retry_after_secs,
        )
    };
    let link = broker.link().ok_or_else(unavailable)?;
    let queue = broker.topology().kind_queue(kind);
    let counted = broker
        .within(
            "looking for the kind's queue",
            broker.topology().count(link.connection(), &queue),
        )
        .await
        .map_err(|_| unavailable())?;
    Ok(counted.is_some())
}

/// Deletes a schedule: it makes no more tasks (its tasks already made are untouched).
#[utoipa::path(
    delete,
    path = "/schedules/{name}",
    tag = "schedules",
    security((), ("bearer" = []), ("browser" = [])),
    params(("name" = String, Path, description = "The schedule's name")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 404, description = "`unknown_schedule`, `tracking_off`", body = ErrorBody),
        (status = 503, description = "`broker_unavailable`: not deleted; `events_replaying`", body = ErrorBody),
        KeyErrors,
    ),
)]
async fn delete(State(state): State<AppState>, Path(name): Path<String>) -> Result<Response> {
    let stored = found(&state, &name)?;
    change(
        &state,
        Change::Delete {
            name: stored.schedule.name,
        },
    )
    .await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// Pauses a schedule: no tick makes a task until it is resumed (the ticks in between are
/// skipped).
#[utoipa::path(
    post,
    path = "/schedules/{name}/pause",
    tag = "schedules",
    security((), ("bearer" = []), ("browser" = [])),
    params(("name" = String, Path, description = "The schedule's name")),
    responses(
        (status = 200, description = "Paused", body = ScheduleView),
        (status = 404, description = "`unknown_schedule`, `tracking_off`", body = ErrorBody),
        (status = 503, description = "`broker_unavailable`: not paused; `events_replaying`", body = ErrorBody),
        KeyErrors,
    ),
)]
async fn pause(State(state): State<AppState>, Path(name): Path<String>) -> Result<Response> {
    let stored = found(&state, &name)?;
    change(
        &state,
        Change::Pause {
            name: stored.schedule.name.clone(),
        },
    )
    .await?;
    let stored = found(&state, &name)?;
    Ok((StatusCode::OK, Json(view(&state, stored, false))).into_response())
}

/// Resumes a paused schedule: it ticks again from its next tick.
#[utoipa::path(
    post,
    path = "/schedules/{name}/resume",
    tag = "schedules",
    security((), ("bearer" = []), ("browser" = [])),
    params(("name" = String, Path, description = "The schedule's name")),
    responses(
        (status = 200, description = "Resumed", body = ScheduleView),
        (status = 404, description = "`unknown_schedule`, `tracking_off`", body = ErrorBody),
        (status = 503, description = "`broker_unavailable`: not resumed; `events_replaying`", body = ErrorBody),
        KeyErrors,
    ),
)]
async fn resume(State(state): State<AppState>, Path(name): Path<String>) -> Result<Response> {
    let stored = found(&state, &name)?;
    change(
        &state,
        Change::Resume {
            name: stored.schedule.name.clone(),
            at: SystemTime::now(),
        },
    )
    .await?;
    let stored = found(&state, &name)?;
    Ok((StatusCode::OK, Json(view(&state, stored, false))).into_response())
}

async fn change(state: &AppState, change: Change) -> Result<()> {
    schedules(state)?
        .write(state.publisher.broker(), change)
        .await
        .map_err(|error| ApiError::NotRecorded(error, state.retry_after_secs))
}
