//! The gateway's settings: every one a flag that can also come from the environment.

use std::{net::SocketAddr, num::NonZeroU32, path::PathBuf, time::Duration};

use clap::Parser;
use offload_common::{BrokerArgs, LogArgs};

/// offload HTTP gateway: accepts tasks on POST /tasks and publishes them to RabbitMQ,
/// answering 202 only once the broker has confirmed each one.
#[derive(Debug, Clone, Parser)]
#[command(name = "offload-api", version)]
pub struct Config {
    /// Address to listen on. Port 0 picks a free port.
    #[arg(long, env = "BIND", default_value_t = SocketAddr::from(([127, 0, 0, 1], 8080)))]
    pub bind: SocketAddr,

    /// Largest accepted request body, in bytes; larger bodies get 413. A batch is one body.
    #[arg(long, env = "MAX_BODY_BYTES", default_value_t = DEFAULT_MAX_BODY_BYTES)]
    pub max_body_bytes: usize,

    /// Most tasks one `POST /tasks/batch` may hold.
    #[arg(long, env = "MAX_BATCH", default_value_t = DEFAULT_MAX_BATCH, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub max_batch: u32,

    /// How long a connection may take, from its opening or the end of its last response, to
    /// send the next request's complete headers. A slow client (headers a byte a second, or
    /// nothing at all) is disconnected after it; it is also how long an idle keep-alive
    /// connection stays open. `0s` disables it (only behind a proxy that enforces its own).
    #[arg(long, env = "HEADER_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub header_timeout: Duration,

    /// How long a client may take to send a whole request body; past it the request gets 408
    /// and the connection is closed. `0s` disables it (only behind a proxy that enforces its
    /// own).
    #[arg(long, env = "BODY_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub body_timeout: Duration,

    /// Most connections served at once. Past it a new connection gets a 503 and is closed,
    /// so memory and file descriptors stay bounded however many clients connect.
    #[arg(long, env = "MAX_CONNECTIONS", default_value_t = DEFAULT_MAX_CONNECTIONS, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,

    /// Largest request head (request line and headers), in bytes; larger gets 431.
    #[arg(long, env = "MAX_HEADER_BYTES", default_value_t = DEFAULT_MAX_HEADER_BYTES, value_parser = clap::value_parser!(u32).range(1024..))]
    pub max_header_bytes: u32,

    /// API keys, comma-separated: `key` (every scope) or `key=scope+scope`, scopes being
    /// `submit` (POST /tasks), `read` (status and listings) and `admin` (operator actions).
    /// Clients send `Authorization: Bearer <key>`. Unset (and no API_KEYS_FILE): the gateway
    /// is open to anyone who reaches it.
    #[arg(
        long,
        env = "API_KEYS",
        hide_env_values = true,
        conflicts_with = "api_keys_file"
    )]
    pub api_keys: Option<String>,

    /// A file of API keys, one `key` or `key=scope+scope` per line (blank lines and lines
    /// starting with `#` ignored), so keys need not sit in the environment.
    #[arg(long, env = "API_KEYS_FILE")]
    pub api_keys_file: Option<PathBuf>,

    /// Schedules kept in a TOML file, put at start wherever the stored ones differ
    /// (docs/SCHEDULES.md); a file that does not read stops the gateway.
    #[arg(long, env = "SCHEDULES_FILE")]
    pub schedules_file: Option<PathBuf>,

    /// Requests per second each API key may make (all clients together when no keys are
    /// set); past it 429 with Retry-After. Unset: no limit. /health is never limited.
    #[arg(long, env = "RATE_LIMIT")]
    pub rate_limit: Option<NonZeroU32>,

    /// How many requests a key may make at once above RATE_LIMIT after a quiet spell.
    /// Default: one second's worth, RATE_LIMIT.
    #[arg(long, env = "RATE_LIMIT_BURST", requires = "rate_limit")]
    pub rate_limit_burst: Option<NonZeroU32>,

    /// Most tasks whose state this gateway remembers (read from the events stream); past
    /// it the oldest are forgotten. About 200 bytes each at most, results not included
    /// (docs/PERFORMANCE.md has the measured figure).
    #[arg(long, env = "STATUS_CAPACITY", default_value_t = DEFAULT_STATUS_CAPACITY)]
    pub status_capacity: usize,

    /// `GET /metrics` and the counting behind it (`on` or `off`); off, /metrics is 404 and
    /// requests are not counted (the benchmark compares the two).
    #[arg(long, env = "METRICS", default_value = "on", value_parser = clap::builder::BoolishValueParser::new(), action = clap::ArgAction::Set, hide_possible_values = true)]
    pub metrics: bool,

    /// The dashboard at `GET /` (`on` or `off`); on, the gateway also samples the queues'
    /// depth every 2 s and keeps the last 10 minutes for its charts.
    #[arg(long, env = "DASHBOARD", default_value = "on", value_parser = clap::builder::BoolishValueParser::new(), action = clap::ArgAction::Set, hide_possible_values = true)]
    pub dashboard: bool,

    /// Longest a `GET /tasks/{id}?wait=` may wait for the task to end.
    #[arg(long, env = "MAX_WAIT", default_value = "60s", value_parser = humantime::parse_duration)]
    pub max_wait: Duration,

    /// Most `GET /tasks/{id}?wait=` requests waiting at once; past it, one is answered at once
    /// with where the task stands (the client asks again), so long-polls hold no more than
    /// this many of the `MAX_CONNECTIONS` and never keep `/health` or `POST /tasks` out.
    #[arg(long, env = "MAX_WAITING", default_value_t = DEFAULT_MAX_WAITING, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_waiting: u32,

    /// Broker users that gateways log in as, comma-separated. With `WORKER_USERS`, the status
    /// view believes an event only from a writer whose role writes it (the broker vouches for
    /// each message's `user_id`), and a task is known only once a gateway accepted it. Unset
    /// (both), every writer is believed.
    #[arg(
        long,
        env = "GATEWAY_USERS",
        value_delimiter = ',',
        requires = "worker_users"
    )]
    pub gateway_users: Vec<String>,

    /// Broker users that workers log in as, comma-separated; see `GATEWAY_USERS`.
    #[arg(
        long,
        env = "WORKER_USERS",
        value_delimiter = ',',
        requires = "gateway_users"
    )]
    pub worker_users: Vec<String>,

    /// Most dead tasks one dead-letter request reads (and holds) at once: `GET /dead` lists
    /// the oldest this many, a retry or discard by kind handles this many (repeat it for
    /// more). Dead-letter requests run one at a time, so their memory is at most this many
    /// dead tasks (each at most MAX_BODY_BYTES and its headers). At most 65535.
    #[arg(long, env = "DEAD_SCAN_MAX", default_value_t = DEFAULT_DEAD_SCAN_MAX, value_parser = clap::value_parser!(u16).range(1..))]
    pub dead_scan_max: u16,

    /// How long to wait for the broker to confirm a publish before answering 503.
    #[arg(long, env = "CONFIRM_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    pub confirm_timeout: Duration,

    /// Most publishes this gateway lets await the broker's confirm at once; past it requests
    /// get 503 at once, so memory stays bounded however fast requests arrive.
    #[arg(long, env = "MAX_IN_FLIGHT", default_value_t = DEFAULT_MAX_IN_FLIGHT, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_in_flight: u32,

    /// Seconds a client is told to wait (`Retry-After`) when the gateway answers 503.
    #[arg(long, env = "RETRY_AFTER_SECS", default_value_t = DEFAULT_RETRY_AFTER_SECS)]
    pub retry_after_secs: u32,

    #[command(flatten)]
    #[allow(missing_docs)]
    pub broker: BrokerArgs,

    #[command(flatten)]
    #[allow(missing_docs)]
    pub log: LogArgs,
}

/// Default for `--max-connections`: with the other defaults, about 150 MiB of memory at
/// worst (see docs/SECURITY.md for the formula).
pub const DEFAULT_MAX_CONNECTIONS: u32 = 512;
/// Default for `--max-header-bytes`: 16 KiB.
pub const DEFAULT_MAX_HEADER_BYTES: u32 = 16 * 1024;
/// Default for `--header-timeout` and `--body-timeout`.
pub const DEFAULT_CLIENT_TIMEOUT: Duration = Duration::from_secs(10);
/// Default for `--status-capacity`.
pub const DEFAULT_STATUS_CAPACITY: usize = 100_000;
/// Default for `--max-wait`.
pub const DEFAULT_MAX_WAIT: Duration = Duration::from_secs(60);
/// Default for `--dead-scan-max`: at most about 250 MiB of dead tasks at the default
/// MAX_BODY_BYTES, a few MiB for tasks of a few KiB.
pub const DEFAULT_DEAD_SCAN_MAX: u16 = 1_000;
/// Default for `--max-waiting`: a quarter of the default `MAX_CONNECTIONS`.
pub const DEFAULT_MAX_WAITING: u32 = 128;
/// Default for `--max-body-bytes`: 256 KiB.
pub const DEFAULT_MAX_BODY_BYTES: usize = 256 * 1024;
/// Default for `--confirm-timeout`.
pub const DEFAULT_CONFIRM_TIMEOUT: Duration = Duration::from_secs(5);
/// Default for `--max-in-flight`.
pub const DEFAULT_MAX_IN_FLIGHT: u32 = 1024;
/// The default `MAX_BATCH`.
pub const DEFAULT_MAX_BATCH: u32 = 1000;
/// Default for `--retry-after-secs`.
pub const DEFAULT_RETRY_AFTER_SECS: u32 = 1;

impl Config {
    /// Settings for a gateway on a free local port, talking to `amqp_url` and publishing to
    /// `queue`, every other setting at its default. For tests and embedding; reads no
    /// environment variables.
    pub fn new(amqp_url: impl Into<String>, queue: impl Into<String>) -> Self {
        Self {
            bind: SocketAddr::from(([127, 0, 0, 1], 0)),
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            header_timeout: DEFAULT_CLIENT_TIMEOUT,
            body_timeout: DEFAULT_CLIENT_TIMEOUT,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_header_bytes: DEFAULT_MAX_HEADER_BYTES,
            api_keys: None,
            api_keys_file: None,
            schedules_file: None,
            rate_limit: None,
            rate_limit_burst: None,
            status_capacity: DEFAULT_STATUS_CAPACITY,
            max_wait: DEFAULT_MAX_WAIT,
            max_waiting: DEFAULT_MAX_WAITING,
            dead_scan_max: DEFAULT_DEAD_SCAN_MAX,
            gateway_users: Vec::new(),
            worker_users: Vec::new(),
            metrics: true,
            dashboard: true,
            confirm_timeout: DEFAULT_CONFIRM_TIMEOUT,
            retry_after_secs: DEFAULT_RETRY_AFTER_SECS,
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
            max_batch: DEFAULT_MAX_BATCH,
            broker: BrokerArgs::new(amqp_url, queue),
            log: LogArgs {
                log_format: offload_common::LogFormat::Text,
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
    fn switches_are_described_as_on_and_off_only() {
        let help = Config::command().render_long_help().to_string();
        assert!(help.contains("(`on` or `off`)"), "{help}");
        assert!(!help.contains("possible values: true, false"), "{help}");
    }

    #[test]
    fn defaults_match_the_constructor() {
        let parsed = Config::try_parse_from(["offload-api", "--bind", "127.0.0.1:0"])
            .expect("defaults parse");
        let built = Config::new(parsed.broker.amqp_url.clone(), parsed.broker.queue.clone());
        assert_eq!(parsed.max_body_bytes, built.max_body_bytes);
        assert_eq!(parsed.confirm_timeout, built.confirm_timeout);
        assert_eq!(parsed.retry_after_secs, built.retry_after_secs);
        assert_eq!(parsed.max_in_flight, built.max_in_flight);
        assert_eq!(parsed.max_batch, built.max_batch);
        assert_eq!(parsed.header_timeout, built.header_timeout);
        assert_eq!(parsed.body_timeout, built.body_timeout);
        assert_eq!(parsed.max_connections, built.max_connections);
        assert_eq!(parsed.max_waiting, built.max_waiting);
        assert_eq!(parsed.dead_scan_max, built.dead_scan_max);
        assert_eq!(parsed.max_header_bytes, built.max_header_bytes);
        assert_eq!(parsed.broker.dead_max_length, built.broker.dead_max_length);
        assert_eq!(parsed.broker.delivery_limit, built.broker.delivery_limit);
        assert_eq!(parsed.broker.heartbeat, built.broker.heartbeat);
        assert_eq!(parsed.broker.connect_timeout, built.broker.connect_timeout);
    }
}
