//! The worker's settings: every one a flag that can also come from the environment.

use std::time::Duration;

use clap::Parser;
use offload_common::{BrokerArgs, LogArgs, LogFormat};

use crate::{RetryPolicy, targets::TargetArgs};

/// offload worker: consumes tasks from RabbitMQ with fair dispatch and manual acks, and runs
/// each with the handler registered for its kind.
#[derive(Debug, Clone, Parser)]
#[command(name = "offload-worker", version)]
pub struct Config {
    /// How many tasks this worker holds unacknowledged, and so runs at once (`basic.qos`).
    /// 1 is the tutorial's fair dispatch: a busy worker is sent nothing more.
    #[arg(long, env = "PREFETCH", default_value_t = DEFAULT_PREFETCH, value_parser = clap::value_parser!(u16).range(1..))]
    pub prefetch: u16,

    /// How many tasks of a kind this worker runs at once, per kind: `kind=n` pairs separated
    /// by commas, e.g. `resize=2,send-email=50`. Each kind has a subscription of its own with
    /// this prefetch, so a slow kind never holds back another. A kind not named takes its
    /// target's `concurrency` (TARGETS_FILE), else PREFETCH.
    #[arg(long, env = "CONCURRENCY", default_value = "", value_parser = parse_concurrency)]
    pub concurrency: Concurrency,

    /// Threads running the worker's tasks (the tokio runtime's worker threads). One runs tens
    /// of thousands of tasks a second whose handlers wait (HTTP targets, async Rust); more
    /// cost a busy worker CPU in handing tasks between threads (docs/PERFORMANCE.md). Raise
    /// it for Rust handlers that compute without `tokio::task::spawn_blocking`, so that one
    /// such task does not hold up the others.
    #[arg(long, env = "THREADS", default_value_t = DEFAULT_THREADS, value_parser = clap::value_parser!(u16).range(1..))]
    pub threads: u16,

    /// Duration of one unit of work in the built-in `sleep` kind (one unit per `.` in
    /// `payload.message`), e.g. `1s`, `50ms`.
    #[arg(long, env = "SLEEP_UNIT", default_value = "1s", value_parser = humantime::parse_duration)]
    pub sleep_unit: Duration,

    /// Most units of work one `sleep` task may ask for; more is a permanent failure, so one
    /// request cannot buy hours of a worker's time.
    #[arg(long, env = "SLEEP_MAX_UNITS", default_value_t = DEFAULT_SLEEP_MAX_UNITS)]
    pub sleep_max_units: u32,

    /// Longest a handler may run one task; past it the attempt counts as failed and the task
    /// is retried (or dead after its last attempt). Keep it below the broker's
    /// `consumer_timeout` (30 min by default), which would otherwise close the channel.
    #[arg(long, env = "HANDLER_TIMEOUT", default_value = "10m", value_parser = humantime::parse_duration)]
    pub handler_timeout: Duration,

    /// On SIGTERM/SIGINT, how long tasks in hand may take to finish before the worker exits
    /// anyway; unfinished tasks go back to the queue. Keep it below the container's stop
    /// grace period.
    #[arg(long, env = "SHUTDOWN_GRACE", default_value = "25s", value_parser = humantime::parse_duration)]
    pub shutdown_grace: Duration,

    /// Attempts a task gets in all, the first included, before it is dead-lettered; a kind's
    /// handler may set its own.
    #[arg(long, env = "MAX_ATTEMPTS", default_value_t = RetryPolicy::DEFAULT.max_attempts, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_attempts: u32,

    /// Delay after a task's first failed attempt; it doubles after each further one (with
    /// ±25% jitter), up to RETRY_MAX. Delays are whole seconds: under half a second the task
    /// is queued again at once.
    #[arg(long, env = "RETRY_BASE", default_value = "10s", value_parser = humantime::parse_duration)]
    pub retry_base: Duration,

    /// Longest delay between two attempts.
    #[arg(long, env = "RETRY_MAX", default_value = "2h", value_parser = humantime::parse_duration)]
    pub retry_max: Duration,

    /// Largest result a task may have, as JSON; a larger one is dropped (the task still
    /// succeeds, and its status says so).
    #[arg(long, env = "RESULT_MAX_BYTES", default_value_t = DEFAULT_RESULT_MAX_BYTES)]
    pub result_max_bytes: usize,

    /// Broker users that gateways log in as, comma-separated. Set, this worker honours a
    /// cancel from the control stream only if a gateway's user wrote it (the broker checks
    /// each message's `user_id`); unset, from anyone (docs/SECURITY.md, "Who writes the
    /// events").
    #[arg(long, env = "GATEWAY_USERS", value_delimiter = ',')]
    pub gateway_users: Vec<String>,

    /// Where to serve `/metrics` (Prometheus text format) and `/health` (200 while connected
    /// and consuming), e.g. `0.0.0.0:9090`; unset, no listener. The image sets `0.0.0.0:9090`.
    #[arg(long, env = "HTTP_BIND")]
    pub http_bind: Option<std::net::SocketAddr>,

    /// Declare the queues and bind this worker's kinds, then exit: registers the kinds with
    /// the gateway (which refuses kinds no worker has bound) before any worker runs.
    #[arg(long)]
    pub declare_only: bool,

    #[command(flatten)]
    #[allow(missing_docs)]
    pub targets: TargetArgs,

    #[command(flatten)]
    #[allow(missing_docs)]
    pub broker: BrokerArgs,

    #[command(flatten)]
    #[allow(missing_docs)]
    pub log: LogArgs,
}

/// `CONCURRENCY`: tasks in hand at once, per kind.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Concurrency(pub std::collections::BTreeMap<String, u16>);

fn parse_concurrency(text: &str) -> Result<Concurrency, String> {
    let mut limits = std::collections::BTreeMap::new();
    for pair in text
        .split(',')
        .map(str::trim)
        .filter(|pair| !pair.is_empty())
    {
        let Some((kind, limit)) = pair.split_once('=') else {
            return Err(format!(
                "{pair:?} is not kind=n (pairs are separated by commas)"
            ));
        };
        let kind =
            offload_common::TaskKind::try_from(kind.trim()).map_err(|error| error.to_string())?;
        let limit: u16 = match limit.trim().parse() {
            Ok(limit) if limit > 0 => limit,
            _ => {
                return Err(format!(
                    "{pair:?}: n must be a whole number from 1 to 65535"
                ));
            }
        };
        if limits.insert(String::from(kind), limit).is_some() {
            return Err(format!("{pair:?}: the kind is named twice"));
        }
    }
    Ok(Concurrency(limits))
}

/// Default for `--prefetch`.
pub const DEFAULT_PREFETCH: u16 = 1;
/// Default for `--threads`.
pub const DEFAULT_THREADS: u16 = 1;
/// Default for `--sleep-unit`.
pub const DEFAULT_SLEEP_UNIT: Duration = Duration::from_secs(1);
/// Default for `--result-max-bytes`: 64 KiB.
pub const DEFAULT_RESULT_MAX_BYTES: usize = 64 * 1024;
/// Default for `--sleep-max-units`.
pub const DEFAULT_SLEEP_MAX_UNITS: u32 = 60;
/// Default for `--handler-timeout`.
pub const DEFAULT_HANDLER_TIMEOUT: Duration = Duration::from_secs(600);
/// Default for `--shutdown-grace`.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(25);

impl Config {
    /// The retry policy of every kind whose handler has none of its own.
    pub fn retry_policy(&self) -> RetryPolicy {
        RetryPolicy {
            max_attempts: self.max_attempts,
            base: self.retry_base,
            max: self.retry_max,
        }
    }

    /// Settings for a worker on `amqp_url` consuming `queue`, every other setting at its
    /// default. For tests and embedding; reads no environment variables.
    pub fn new(amqp_url: impl Into<String>, queue: impl Into<String>) -> Self {
        Self {
            prefetch: DEFAULT_PREFETCH,
            concurrency: Concurrency::default(),
            threads: DEFAULT_THREADS,
            sleep_unit: DEFAULT_SLEEP_UNIT,
            sleep_max_units: DEFAULT_SLEEP_MAX_UNITS,
            handler_timeout: DEFAULT_HANDLER_TIMEOUT,
            shutdown_grace: DEFAULT_SHUTDOWN_GRACE,
            result_max_bytes: DEFAULT_RESULT_MAX_BYTES,
            gateway_users: Vec::new(),
            max_attempts: RetryPolicy::DEFAULT.max_attempts,
            retry_base: RetryPolicy::DEFAULT.base,
            retry_max: RetryPolicy::DEFAULT.max,
            declare_only: false,
            http_bind: None,
            targets: TargetArgs::default(),
            broker: BrokerArgs::new(amqp_url, queue),
            log: LogArgs {
                log_format: LogFormat::Text,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn command_line_is_well_formed() {
        Config::command().debug_assert();
    }

    #[test]
    fn defaults_match_the_constructor() {
        let parsed = Config::try_parse_from(["offload-worker"]).expect("defaults parse");
        let built = Config::new(parsed.broker.amqp_url.clone(), parsed.broker.queue.clone());
        assert_eq!(parsed.prefetch, built.prefetch);
        assert_eq!(parsed.threads, built.threads);
        assert_eq!(parsed.sleep_unit, built.sleep_unit);
        assert_eq!(parsed.sleep_max_units, built.sleep_max_units);
        assert_eq!(parsed.shutdown_grace, built.shutdown_grace);
        assert_eq!(parsed.handler_timeout, built.handler_timeout);
        assert_eq!(parsed.retry_policy(), built.retry_policy());
    }

    #[test]
    fn prefetch_zero_is_refused() {
        assert!(Config::try_parse_from(["offload-worker", "--prefetch", "0"]).is_err());
    }

    #[test]
    fn concurrency_is_per_kind_and_refuses_what_it_cannot_use() {
        let parsed =
            Config::try_parse_from(["offload-worker", "--concurrency", "resize=2, a.b=50"])
                .expect("valid pairs parse");
        assert_eq!(parsed.concurrency.0.get("resize"), Some(&2));
        assert_eq!(parsed.concurrency.0.get("a.b"), Some(&50));
        for bad in [
            "resize", "resize=0", "resize=x", "Resize=2", "a=1,a=2", "a=70000",
        ] {
            assert!(
                Config::try_parse_from(["offload-worker", "--concurrency", bad]).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn threads_zero_is_refused() {
        assert!(Config::try_parse_from(["offload-worker", "--threads", "0"]).is_err());
    }
}
