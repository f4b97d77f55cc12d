//! Broker settings shared by both binaries, and the one way offload opens a connection.

use std::time::Duration;

use clap::Args;
use lapin::{Connection, ConnectionProperties, uri::AMQPUri};

use crate::topology::Topology;

/// How to reach RabbitMQ and which queue to use. Flattened into both binaries' command lines.
#[derive(Debug, Clone, Args)]
pub struct BrokerArgs {
    /// AMQP URL of the broker, `amqp://user:password@host:port/vhost` (the default vhost `/` is
    /// written `%2f`). The password is never logged.
    #[arg(
        long,
        env = "AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f",
        hide_env_values = true
    )]
    pub amqp_url: String,

    /// Name of the work queue. Its dead-letter exchange and queue are `<QUEUE>.dlx` and
    /// `<QUEUE>.dead`.
    #[arg(long, env = "QUEUE", default_value = "tasks", value_parser = parse_queue_name)]
    pub queue: String,

    /// How many times a task may be redelivered after a failed attempt before it is
    /// dead-lettered to `<QUEUE>.dead` (the quorum queue's `x-delivery-limit`).
    #[arg(long, env = "DELIVERY_LIMIT", default_value_t = 5)]
    pub delivery_limit: u32,

    /// Most tasks the work queue holds ready (`x-max-length`); past it new tasks are refused
    /// with 503 instead of piling up. Unset: no limit. Changing it means re-creating the
    /// queue.
    #[arg(long, env = "QUEUE_MAX_LENGTH")]
    pub queue_max_length: Option<u32>,

    /// AMQP heartbeat interval in seconds; a connection that stays silent for two intervals
    /// is treated as dead. 0 disables heartbeats (not recommended).
    #[arg(long, env = "HEARTBEAT", default_value_t = 10)]
    pub heartbeat: u16,

    /// How long to wait for the TCP connection and AMQP handshake with the broker.
    #[arg(long, env = "CONNECT_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    pub connect_timeout: Duration,
}

impl BrokerArgs {
    /// Settings for a broker at `amqp_url` and a work queue named `queue`, every other
    /// setting at its default. Handy in tests and embedding code.
    pub fn new(amqp_url: impl Into<String>, queue: impl Into<String>) -> Self {
        Self {
            amqp_url: amqp_url.into(),
            queue: queue.into(),
            delivery_limit: 5,
            queue_max_length: None,
            heartbeat: 10,
            connect_timeout: Duration::from_secs(5),
        }
    }

    /// The topology these settings describe.
    pub fn topology(&self) -> Topology {
        Topology::new(self.queue.clone(), self.delivery_limit)
            .with_max_length(self.queue_max_length)
    }

    /// The broker URL with its password replaced by `***`, fit for a log line.
    pub fn redacted_url(&self) -> String {
        redact_url(&self.amqp_url)
    }

    /// Opens a connection named `connection_name` (shown in the management UI), with the
    /// configured heartbeat and connect timeout.
    pub async fn connect(&self, connection_name: &str) -> Result<Connection, BrokerError> {
        let mut uri: AMQPUri = self
            .amqp_url
            .parse()
            .map_err(|reason| BrokerError::InvalidUrl {
                url: self.redacted_url(),
                reason,
            })?;
        // Settings given in the URL's query win over the flags, as users of other AMQP
        // clients expect.
        uri.query.heartbeat.get_or_insert(self.heartbeat);
        let timeout_ms = u64::try_from(self.connect_timeout.as_millis()).unwrap_or(u64::MAX);
        uri.query.connection_timeout.get_or_insert(timeout_ms);
        let properties =
            ConnectionProperties::default().with_connection_name(connection_name.into());
        let connect = Connection::connect_uri(uri, properties);
        // The URI's connection_timeout covers the TCP connect; this bounds the AMQP handshake
        // as well, so a broker that accepts the socket but never answers cannot hang us.
        match tokio::time::timeout(self.connect_timeout, connect).await {
            Ok(Ok(connection)) => Ok(connection),
            Ok(Err(source)) => Err(BrokerError::Connect {
                url: self.redacted_url(),
                source,
            }),
            Err(_) => Err(BrokerError::ConnectTimeout {
                url: self.redacted_url(),
                timeout: self.connect_timeout,
            }),
        }
    }
}

/// Why talking to the broker failed.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// The configured URL is not an AMQP URL.
    #[error(
        "AMQP_URL {url} is not a valid AMQP URL ({reason}); expected amqp://user:password@host:5672/%2f"
    )]
    InvalidUrl {
        /// The URL, password redacted.
        url: String,
        /// What the parser said.
        reason: String,
    },
    /// The broker refused or dropped the connection.
    #[error("cannot connect to RabbitMQ at {url}: {source}")]
    Connect {
        /// The URL, password redacted.
        url: String,
        /// The client library's error.
        #[source]
        source: lapin::Error,
    },
    /// The broker did not complete the handshake in time.
    #[error("RabbitMQ at {url} did not answer within {}", humantime::format_duration(*.timeout))]
    ConnectTimeout {
        /// The URL, password redacted.
        url: String,
        /// How long we waited.
        timeout: Duration,
    },
    /// A channel-level operation failed.
    #[error("RabbitMQ channel error: {0}")]
    Channel(#[from] lapin::Error),
    /// The queues exist with other settings, or could not be declared.
    #[error(transparent)]
    Topology(#[from] crate::topology::TopologyError),
}

fn parse_queue_name(name: &str) -> Result<String, String> {
    // AMQP short strings are at most 255 bytes, and we append ".dead" for the dead-letter queue.
    if name.is_empty() || name.len() > 250 {
        return Err("queue name must be 1 to 250 bytes".into());
    }
    if name.starts_with("amq.") {
        return Err("queue names starting with 'amq.' are reserved by RabbitMQ".into());
    }
    Ok(name.to_owned())
}

/// Replaces the password in an AMQP URL with `***`, so the URL can be logged.
///
/// ```
/// assert_eq!(
///     offload_common::redact_url("amqp://app:s3cret@rabbit:5672/%2f"),
///     "amqp://app:***@rabbit:5672/%2f"
/// );
/// ```
pub fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://").map(|i| i + 3) else {
        return url.to_owned();
    };
    let rest = &url[scheme_end..];
    // The userinfo ends at the last '@' before the path; a password may itself contain '@'
    // only percent-encoded, but be generous and take the last one.
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let Some(at) = rest[..authority_end].rfind('@') else {
        return url.to_owned();
    };
    match rest[..at].find(':') {
        Some(colon) => format!(
            "{}{}:***{}",
            &url[..scheme_end],
            &rest[..colon],
            &rest[at..]
        ),
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_password_only() {
        assert_eq!(
            redact_url("amqp://guest:guest@127.0.0.1:5672/%2f"),
            "amqp://guest:***@127.0.0.1:5672/%2f"
        );
        assert_eq!(redact_url("amqps://u:p%40ss@h/vh"), "amqps://u:***@h/vh");
    }

    #[test]
    fn leaves_urls_without_password_alone() {
        assert_eq!(redact_url("amqp://localhost"), "amqp://localhost");
        assert_eq!(redact_url("amqp://user@host/"), "amqp://user@host/");
        assert_eq!(redact_url("not a url"), "not a url");
    }

    #[test]
    fn rejects_reserved_and_empty_queue_names() {
        assert!(parse_queue_name("").is_err());
        assert!(parse_queue_name("amq.foo").is_err());
        assert!(parse_queue_name(&"q".repeat(251)).is_err());
        assert_eq!(parse_queue_name("tasks").as_deref(), Ok("tasks"));
    }
}
