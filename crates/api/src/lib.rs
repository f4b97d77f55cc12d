//! The offload HTTP gateway as a library: [`Application::build`] binds the listener and
//! connects to the broker, [`Application::run_until_stopped`] serves until the shutdown future
//! resolves. The `offload-api` binary is a thin wrapper; tests start the same thing on port 0.

mod auth;
mod config;
mod dead_letters;
mod error;
mod history;
mod metrics_registry;
mod openapi;
mod publisher;
mod routes;
pub mod schedules;
mod scope;
mod server;
mod status;

use std::{future::Future, net::SocketAddr, sync::Arc, time::Duration};

use offload_common::{Broker, BrokerError, EventSink, Supervisor};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use auth::{Access, AccessError, Scope};
pub use config::{
    Config, DEFAULT_CLIENT_TIMEOUT, DEFAULT_CONFIRM_TIMEOUT, DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_CONNECTIONS, DEFAULT_MAX_HEADER_BYTES, DEFAULT_MAX_IN_FLIGHT,
    DEFAULT_RETRY_AFTER_SECS, DEFAULT_STATUS_CAPACITY,
};
pub use error::ApiError;
pub use offload_common::BrokerState;
pub use publisher::{PublishError, Publisher, TIMEOUTS_IN_A_ROW};
pub use status::{Status, TaskView};

/// What every request handler can reach. Cloned for every request (axum's `State`, each
/// middleware's): one reference count, not one for each part (docs/PERFORMANCE.md).
#[derive(Clone)]
pub struct AppState(Arc<Shared>);

impl std::ops::Deref for AppState {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0
    }
}

/// What [`AppState`] holds.
pub struct Shared {
    publisher: Arc<Publisher>,
    /// The view of task states; `None` with EVENTS=off.
    tracker: Option<status::Tracker>,
    /// Where `queued` events go; `None` with EVENTS=off.
    events: Option<EventSink>,
    max_wait: Duration,
    /// `MAX_WAITING` permits, one held by each `GET /tasks/{id}?wait=` that waits.
    waiting: Arc<tokio::sync::Semaphore>,
    access: Access,
    retry_after_secs: u32,
    max_body_bytes: usize,
    max_batch: usize,
    body_timeout: Duration,
    metrics: Arc<metrics_registry::Metrics>,
    /// The dashboard's charts; `None` with DASHBOARD=off.
    history: Option<history::History>,
    /// The schedules; `None` with EVENTS=off.
    schedules: Option<schedules::Schedules>,
    /// The dead-letter queue, scanned one request at a time.
    dead_letters: dead_letters::DeadLetters,
}

impl Shared {
    /// The kinds this gateway knows of: those it published a task of, and those workers
    /// announced (events on), sorted.
    fn kinds(&self) -> Vec<String> {
        let mut kinds = self.publisher.kinds();
        if let Some(tracker) = &self.tracker {
            kinds.extend(tracker.kinds());
        }
        kinds.sort_unstable();
        kinds.dedup();
        kinds
    }

    /// The queues' depth, the known kinds' queues among them; `None` when the broker cannot
    /// be asked.
    async fn depth(&self) -> Option<offload_common::QueueDepth> {
        self.publisher.broker().depth(&self.kinds()).await
    }

    /// Whether task statuses can be read here: `live`, `replaying` (still reading the events
    /// stream) or `off` (EVENTS=off).
    fn events_state(&self) -> &'static str {
        match &self.tracker {
            None => "off",
            Some(tracker) if tracker.is_live() => "live",
            Some(_) => "replaying",
        }
    }
}

/// Why the gateway could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The listen address is taken or not ours.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The API key settings are unusable.
    #[error(transparent)]
    Access(#[from] AccessError),
    /// The broker settings are unusable, or the queues exist with other settings.
    #[error(transparent)]
    Broker(#[from] BrokerError),
    /// SCHEDULES_FILE is unusable.
    #[error(transparent)]
    Schedules(#[from] schedules::file::FileError),
}

/// A gateway that is bound and connected (or trying to connect), ready to serve.
pub struct Application {
    listener: TcpListener,
    router: axum::Router,
    limits: server::Limits,
    shutdown: CancellationToken,
    supervisor: Supervisor,
}

impl Application {
    /// Binds `config.bind`, connects to the broker and declares the topology.
    pub async fn build(config: Config) -> Result<Self, StartError> {
        let access = access(&config)?;
        if access.is_open() {
            tracing::warn!(
                "no API keys configured (API_KEYS / API_KEYS_FILE): anyone who reaches this port can submit tasks"
            );
        } else {
            tracing::info!(keys = access.key_count(), "API keys required");
        }
        let from_file = schedules_from_file(&config)?;
        let listener = TcpListener::bind(config.bind)
            .await
            .map_err(|source| StartError::Bind {
                addr: config.bind,
                source,
            })?;
        let shutdown = CancellationToken::new();
        let (broker, supervisor) = Broker::start(
            &config.broker,
            topology(&config),
            "offload-api",
            shutdown.clone(),
        )
        .await?;
        let (router, limits) = assemble(&config, (access, from_file), broker, &shutdown);
        Ok(Self {
            listener,
            router,
            limits,
            shutdown,
            supervisor,
        })
    }

    /// The port actually bound (useful with port 0).
    pub fn port(&self) -> u16 {
        self.local_addr().port()
    }

    /// The address actually bound.
    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound TCP listener has a local address")
    }

    /// The whole HTTP surface, for driving it without a socket (`tower::ServiceExt::oneshot`).
    pub fn router(&self) -> axum::Router {
        self.router.clone()
    }

    /// Serves until `shutdown` resolves, then finishes the requests in flight (each bounded
    /// by the body and confirm timeouts) and closes the broker connection. Also stops, with
    /// an error, if the broker session meets an error retrying cannot fix.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), StartError> {
        tracing::info!(addr = %self.local_addr(), "offload-api listening");
        let Self {
            listener,
            router,
            limits,
            shutdown: session_shutdown,
            mut supervisor,
        } = self;
        let mut fatal = None;
        {
            let serving = server::serve(listener, router, limits, shutdown);
            tokio::pin!(serving);
            tokio::select! {
                () = &mut serving => {}
                ended = &mut supervisor => {
                    // Only an unfixable error ends the session before shutdown.
                    fatal = Some(ended);
                }
            }
        }
        session_shutdown.cancel();
        let ended = match fatal {
            Some(ended) => ended,
            None => (&mut supervisor).await,
        };
        tracing::info!("offload-api stopped");
        // A session that panicked is an error too: a supervisor (compose, Kubernetes) must
        // see a failure and restart the process.
        ended.map_err(Into::into)
    }
}

/// The router on `broker`'s session, and the server's limits; starts the session's
/// followers (the events stream, the dashboard's sampling), which stop with `shutdown`.
fn assemble(
    config: &Config,
    (access, from_file): (Access, Vec<schedules::Schedule>),
    broker: Broker,
    shutdown: &CancellationToken,
) -> (axum::Router, server::Limits) {
    let (tracker, events) = match broker.topology().events_stream() {
        Some(stream) => {
            let (sink, _) = EventSink::start(broker.clone(), stream);
            let writers = (!config.gateway_users.is_empty()).then(|| {
                status::Writers::new(config.gateway_users.clone(), config.worker_users.clone())
            });
            if writers.is_none() {
                tracing::info!(
                    "GATEWAY_USERS and WORKER_USERS are unset: the status view believes every writer on the events stream (docs/SECURITY.md)"
                );
            }
            let tracker = status::Tracker::believing(config.status_capacity, writers);
            tokio::spawn(
                tracker
                    .clone()
                    .follow(broker.clone(), sink.clone(), shutdown.clone()),
            );
            (Some(tracker), Some(sink))
        }
        None => (None, None),
    };
    let history = config.dashboard.then(history::History::default);
    let metrics = Arc::new(metrics_registry::Metrics::new());
    let publisher = Publisher::new(
        broker,
        config.confirm_timeout,
        config.max_in_flight,
        Arc::clone(&metrics),
    );
    let publisher = Arc::new(publisher);
    let schedules = match (&tracker, &events) {
        (Some(tracker), Some(events)) => {
            let schedules = schedules::Schedules::default();
            tokio::spawn(
                schedules
                    .clone()
                    .follow(publisher.broker().clone(), shutdown.clone()),
            );
            let leader = schedules::Scheduler {
                broker: publisher.broker().clone(),
                schedules: schedules.clone(),
                tracker: tracker.clone(),
                publisher: Arc::clone(&publisher),
                events: events.clone(),
                name: gateway_name().into(),
                metrics: Arc::clone(&metrics),
                started: std::time::SystemTime::now(),
                publishing: Arc::new(tokio::sync::Semaphore::new(
                    schedules::leader::TICKS_IN_FLIGHT,
                )),
            };
            tokio::spawn(leader.run(shutdown.clone()));
            if !from_file.is_empty() {
                tokio::spawn(
                    schedules
                        .clone()
                        .put_from_file(publisher.broker().clone(), from_file),
                );
            }
            Some(schedules)
        }
        _ => None,
    };
    let dead_letters =
        dead_letters::DeadLetters::new(publisher.broker().clone(), config.dead_scan_max);
    let state = AppState(Arc::new(Shared {
        publisher,
        tracker,
        events,
        max_wait: config.max_wait,
        waiting: Arc::new(tokio::sync::Semaphore::new(config.max_waiting as usize)),
        access,
        retry_after_secs: config.retry_after_secs,
        max_body_bytes: config.max_body_bytes,
        max_batch: config.max_batch as usize,
        body_timeout: config.body_timeout,
        metrics: Arc::clone(&metrics),
        history,
        schedules,
        dead_letters,
    }));
    if let Some(history) = &state.history {
        tokio::spawn(history.clone().sample(state.clone(), shutdown.clone()));
    }
    let limits = server::Limits {
        max_connections: config.max_connections as usize,
        header_timeout: config.header_timeout,
        max_header_bytes: config.max_header_bytes as usize,
        retry_after_secs: config.retry_after_secs,
        drain: config.body_timeout + config.confirm_timeout + Duration::from_secs(1),
        metrics,
    };
    (
        routes::router(state, config.metrics, config.dashboard),
        limits,
    )
}

/// The whole HTTP surface as [`Application::build`] makes it, on a broker session that never
/// connects and without binding a port: for driving what needs no broker (validation, errors,
/// API keys, the OpenAPI document) with `tower::ServiceExt::oneshot`. Publishing answers 503
/// `broker_unavailable`. Call it within a tokio runtime.
pub fn router(config: &Config) -> Result<axum::Router, StartError> {
    let access = access(config)?;
    let broker = Broker::detached(topology(config));
    let from_file = schedules_from_file(config)?;
    Ok(assemble(
        config,
        (access, from_file),
        broker,
        &CancellationToken::new(),
    )
    .0)
}

/// The gateway's topology: with events on, the schedules' stream and election queue too.
fn topology(config: &Config) -> offload_common::Topology {
    let topology = config.broker.topology();
    let schedules = topology.events_stream().is_some();
    topology.with_schedules(schedules)
}

/// The schedules of SCHEDULES_FILE, if set.
fn schedules_from_file(config: &Config) -> Result<Vec<schedules::Schedule>, StartError> {
    match &config.schedules_file {
        Some(path) => Ok(schedules::file::read(path)?),
        None => Ok(Vec::new()),
    }
}

/// `<host>-<pid>`: this gateway, in its `scheduler` events.
fn gateway_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map_or_else(|_| "gateway".to_owned(), |name| name.trim().to_owned());
    format!("{host}-{}", std::process::id())
}

/// The API keys, their scopes and rate limit, as the settings say.
fn access(config: &Config) -> Result<Access, AccessError> {
    Access::from_settings(
        config.api_keys.as_deref(),
        config.api_keys_file.as_deref(),
        config.rate_limit,
        config.rate_limit_burst,
    )
}
