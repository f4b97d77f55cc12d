//! Starting a worker: read the settings, register the HTTP targets, connect, declare the
//! topology with this worker's kinds, serve `/health` and `/metrics`, and hand over to the
//! consume loop; at the end, close the connection.

use std::sync::Arc;

use offload_common::{Broker, BrokerError, EventSink, Topology};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    Config, Registry,
    attempt::Context,
    cancels::Cancels,
    consume::ConsumeLoop,
    metrics::{self, Metrics},
};

/// The log target of every line about one task (started, completed, failed, dead-lettered,
/// not settled), so operators can filter them as a group:
/// `RUST_LOG=info,offload::task=warn` keeps failures and drops the two lines per success.
pub const TASK_LOG: &str = "offload::task";

/// Why the worker stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// The settings are unusable, or the queues exist with other settings: retrying cannot
    /// fix it.
    #[error(transparent)]
    Broker(#[from] BrokerError),
    /// TARGETS, TARGETS_FILE or the signing secret is unusable.
    #[error(transparent)]
    Targets(#[from] crate::TargetsError),
    /// CONCURRENCY names a kind this worker does not run.
    #[error("{0}")]
    Concurrency(String),
    /// HTTP_BIND cannot be listened on.
    #[error("cannot listen on HTTP_BIND {addr}: {source}")]
    Listen {
        /// The address.
        addr: std::net::SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Consumes until `shutdown` resolves, then stops taking deliveries, lets the tasks in hand
/// finish within `config.shutdown_grace`, and closes the connection. Tasks still running
/// after the grace period are not acked, so the broker requeues them.
///
/// The broker being unreachable is not an error: the worker keeps reconnecting with backoff.
pub async fn run(
    config: Config,
    registry: Registry,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), WorkerError> {
    let session_shutdown = CancellationToken::new();
    let registry = config.targets.register(registry)?;
    // Binding its kinds registers them: the gateway accepts tasks of a kind some worker bound.
    let topology = config.broker.topology().with_kinds(registry.kinds());
    if config.declare_only {
        return declare_only(&config, &topology).await;
    }
    let (broker, supervisor) = Broker::start(
        &config.broker,
        topology,
        "offload-worker",
        session_shutdown.clone(),
    )
    .await?;
    let events = config.broker.events.then(|| {
        let stream = topology_stream(&broker);
        EventSink::start(broker.clone(), stream).0
    });
    let kinds = concurrency(&config, &registry)?;
    let metrics = Arc::new(Metrics::new(registry.kinds()));
    let listener_stop = CancellationToken::new();
    // Dropped on every way out of `run`, so the listener stops with the worker.
    let _listener_stop = listener_stop.clone().drop_guard();
    if let Some(bind) = config.http_bind {
        metrics::serve(bind, Arc::clone(&metrics), listener_stop)
            .await
            .map_err(|source| WorkerError::Listen { addr: bind, source })?;
    }
    let context = Arc::new(Context {
        registry: Arc::new(registry),
        deadline: config.handler_timeout,
        events,
        worker: worker_name().into(),
        delivery_limit: u64::from(config.broker.delivery_limit),
        result_max_bytes: config.result_max_bytes,
        policy: config.retry_policy(),
        delay_exchange: broker.topology().delay_exchange().into(),
        dead_queue: broker.topology().dead_letter_queue().into(),
        broker: broker.clone(),
        metrics,
        cancels: Arc::new(
            Cancels::new(kinds.iter().map(|(kind, _)| kind.as_str()))
                .believing(config.gateway_users.iter().cloned()),
        ),
    });
    // Comma-separated text, not `?kinds`: a JSON log would hold Rust's debug output as a
    // string (`"[(\"sleep\", 1)]"`). Tracing's fields are scalars; arrays need its unstable
    // `valuable` support.
    let names: Vec<&str> = kinds.iter().map(|(kind, _)| kind.as_str()).collect();
    let limits: Vec<String> = kinds
        .iter()
        .map(|(kind, limit)| format!("{kind}={limit}"))
        .collect();
    tracing::info!(
        queue = broker.topology().queue(),
        kinds = %names.join(","),
        concurrency = %limits.join(","),
        "offload-worker starting"
    );
    let worker = ConsumeLoop {
        broker,
        context,
        tasks: TaskTracker::new(),
        kinds,
        config,
    };
    let mut supervisor = supervisor;
    let result = worker.run_until(shutdown, &mut supervisor).await;
    // Close the connection cleanly before the process exits (unless the session has ended
    // already, and its handle been polled to its end).
    session_shutdown.cancel();
    if !supervisor.is_finished() {
        let _ = supervisor.await;
    }
    result
}

/// Each kind and how many of its tasks this worker holds at once: CONCURRENCY, else its
/// target's `concurrency`, else PREFETCH.
fn concurrency(config: &Config, registry: &Registry) -> Result<Vec<(String, u16)>, WorkerError> {
    let kinds = registry.kinds();
    if let Some(unknown) = config
        .concurrency
        .0
        .keys()
        .find(|kind| !kinds.contains(&kind.as_str()))
    {
        return Err(WorkerError::Concurrency(format!(
            "CONCURRENCY names kind '{unknown}', which this worker does not run (it runs {kinds:?})"
        )));
    }
    Ok(kinds
        .iter()
        .map(|kind| {
            let limit = config
                .concurrency
                .0
                .get(*kind)
                .copied()
                .or_else(|| registry.concurrency(kind))
                .unwrap_or(config.prefetch);
            ((*kind).to_owned(), limit)
        })
        .collect())
}

/// The events stream's name; the topology has one whenever events are on.
fn topology_stream(broker: &Broker) -> String {
    broker
        .topology()
        .events_stream()
        .expect("EVENTS=on declares the events stream")
}

/// `<host>-<pid>`: which worker, in events.
fn worker_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map_or_else(|_| "worker".to_owned(), |name| name.trim().to_owned());
    format!("{host}-{}", std::process::id())
}

/// `--declare-only`: declare the topology with this worker's kinds, and stop.
async fn declare_only(config: &Config, topology: &Topology) -> Result<(), WorkerError> {
    let (connection, url) = config
        .broker
        .connector()?
        .connect("offload-worker --declare-only")
        .await?;
    let declared = topology.declare(&connection).await;
    let _ = connection.close(200, "declared".into()).await;
    declared.map_err(BrokerError::from)?;
    tracing::info!(broker = %url, queue = topology.queue(), kinds = %topology.kinds().join(","), "declared the queues and bound the kinds");
    Ok(())
}
