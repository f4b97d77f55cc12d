//! The dashboard: `GET /` (scope `read`), one page served from the binary with its script
//! and style, and `GET /dashboard/state`, the JSON it polls. The page asks nothing of any
//! other host (its Content-Security-Policy says so to the browser), and its buttons call the
//! dead-letter API like any client, so a key without `admin` sees them refused.

use axum::{
    extract::State,
    http::{HeaderValue, header},
    middleware,
    response::{IntoResponse, Response},
};
use serde::Serialize;
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};

use crate::{
    AppState,
    auth::{self, Scope},
    history::{History, Sample},
    openapi::KeyErrors,
    status::{TaskView, Totals, Tracker},
};

/// Tasks listed under "Recent tasks".
const RECENT: usize = 20;

/// Schedules listed (the first by name; `GET /schedules` has them all).
const SCHEDULES: usize = 50;

const PAGE: &str = include_str!("../../assets/dashboard.html");
const SCRIPT: &str = include_str!("../../assets/dashboard.js");
const STYLE: &str = include_str!("../../assets/dashboard.css");
const ICON: &str = include_str!("../../assets/favicon.svg");

/// Only this gateway, for everything; no framing by other sites.
const POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'";

pub fn router(state: &AppState) -> OpenApiRouter<AppState> {
    let read = OpenApiRouter::new()
        .routes(routes!(page))
        .routes(routes!(dashboard_state))
        .route_layer(middleware::from_fn_with_state(
            (state.access.clone(), Scope::Read),
            auth::require,
        ));
    // Code, no data: no key needed, so a browser that has not logged in yet still gets them.
    let assets = OpenApiRouter::new()
        .routes(routes!(script))
        .routes(routes!(style))
        .routes(routes!(icon));
    read.merge(assets)
}

/// The dashboard's script.
#[utoipa::path(get, path = "/dashboard.js", tag = "operations",
    responses((status = 200, description = "JavaScript", body = String, content_type = "text/javascript; charset=utf-8")))]
async fn script() -> Response {
    asset("text/javascript; charset=utf-8", SCRIPT)
}

/// The dashboard's style.
#[utoipa::path(get, path = "/dashboard.css", tag = "operations",
    responses((status = 200, description = "CSS", body = String, content_type = "text/css; charset=utf-8")))]
async fn style() -> Response {
    asset("text/css; charset=utf-8", STYLE)
}

/// The dashboard's icon.
#[utoipa::path(get, path = "/favicon.svg", tag = "operations",
    responses((status = 200, description = "SVG", body = String, content_type = "image/svg+xml")))]
async fn icon() -> Response {
    asset("image/svg+xml", ICON)
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    let mut response = ([(header::CONTENT_TYPE, content_type)], body).into_response();
    secure(&mut response);
    response
}

fn secure(response: &mut Response) {
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(POLICY),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    // A new binary may bring a new page: always ask again (answers are small).
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
}

/// The dashboard: one page, for a browser (which asks for the key as a Basic password).
#[utoipa::path(
    get,
    path = "/",
    tag = "operations",
    security((), ("bearer" = []), ("browser" = [])),
    responses(
        (status = 200, description = "The page", body = String, content_type = "text/html; charset=utf-8"),
        KeyErrors,
    ),
)]
async fn page() -> Response {
    asset("text/html; charset=utf-8", PAGE)
}

/// What the dashboard polls.
#[derive(Serialize, ToSchema)]
struct DashboardState {
    /// `connected`, `blocked`, `unroutable` or `disconnected`.
    broker: &'static str,
    /// `live`, `replaying` or `off`.
    events: &'static str,
    /// `ok`, or `timing_out` (see `GET /health`).
    confirms: &'static str,
    /// Tasks published and awaiting the broker's confirm.
    publishes_in_flight: usize,
    /// Each kind whose queue exists: paused or not, its tasks, its workers; `None` when the
    /// broker cannot be asked.
    kinds: Option<Vec<super::kinds::KindView>>,
    /// The task counts now; `None` with EVENTS=off or while replaying.
    totals: Option<Totals>,
    /// The last minutes, oldest first.
    history: Vec<Sample>,
    /// The tasks this gateway saw last, newest first.
    recent: Vec<TaskView>,
    /// The tasks that died last and are still dead, newest first.
    dead: Vec<TaskView>,
    /// The first schedules by name, with their next tick and last task; `None` with
    /// EVENTS=off or while the schedules are read.
    schedules: Option<Vec<super::schedules::ScheduleView>>,
    /// How many schedules there are.
    schedules_total: usize,
}

/// What the dashboard shows, as JSON: broker and events state, ten minutes of samples,
/// recent tasks and recently dead ones.
#[utoipa::path(
    get,
    path = "/dashboard/state",
    tag = "operations",
    security((), ("bearer" = []), ("browser" = [])),
    responses(
        (status = 200, description = "The state", body = DashboardState),
        KeyErrors,
    ),
)]
async fn dashboard_state(State(state): State<AppState>) -> Response {
    let totals = state
        .tracker
        .as_ref()
        .filter(|tracker| tracker.is_live())
        .map(Tracker::totals);
    let (recent, dead) = match &state.tracker {
        None => (Vec::new(), Vec::new()),
        Some(tracker) => (tracker.recent(RECENT), tracker.recent_dead(RECENT)),
    };
    let kinds = super::kinds::kinds(&state).await;
    let (schedules, schedules_total) = match super::schedules::first(&state, SCHEDULES) {
        Some((views, total)) => (Some(views), total),
        None => (None, 0),
    };
    let mut response = axum::Json(DashboardState {
        broker: state.publisher.state().as_str(),
        events: state.events_state(),
        confirms: state.publisher.confirms(),
        publishes_in_flight: state.publisher.in_flight(),
        kinds,
        totals,
        history: state.history.as_ref().map(History::all).unwrap_or_default(),
        recent,
        dead,
        schedules,
        schedules_total,
    })
    .into_response();
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}
