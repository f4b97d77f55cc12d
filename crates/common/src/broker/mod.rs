//! Broker settings shared by both binaries, and the one way offload opens a connection.
//!
//! [`BrokerArgs`] is flattened into both command lines; [`session`] is the layer both
//! binaries stand on (connect, declare, watch, back off); [`url`] reads and redacts URLs.

pub mod publish;
pub mod session;
pub mod subscribe;
pub mod supervisor;
pub mod url;

use std::{path::PathBuf, time::Duration};

use clap::Args;
use lapin::{
    Connection, ConnectionProperties,
    tcp::{OwnedIdentity, OwnedTLSConfig},
};

pub use crate::topology::DEFAULT_DEAD_MAX_LENGTH;
use crate::topology::{EventsRetention, Topology};
pub use url::{Endpoint, UrlError, redact_url};

/// How to reach RabbitMQ and which queue to use. Flattened into both binaries' command lines.
#[derive(Debug, Clone, Args)]
pub struct BrokerArgs {
    /// AMQP URL of the broker, `amqp://user:password@host:port/vhost` (the default vhost `/` is
    /// written `%2f`), or `amqps://` for TLS. Several URLs separated by commas name the nodes
    /// of a cluster: offload connects to whichever answers and moves on when one fails. The
    /// password is never logged; prefer AMQP_URL_FILE or the environment to the flag, which
    /// `ps` shows.
    #[arg(
        long,
        env = "AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f",
        hide_env_values = true
    )]
    pub amqp_url: String,

    /// A file holding AMQP_URL (trailing white space ignored), so the password need not sit in
    /// the environment. Wins over AMQP_URL when set.
    #[arg(long, env = "AMQP_URL_FILE")]
    pub amqp_url_file: Option<PathBuf>,

    /// PEM file of CA certificates to trust for `amqps://`, besides the system's roots: for a
    /// broker whose certificate a private CA signed.
    #[arg(long, env = "AMQP_CA_FILE")]
    pub amqp_ca_file: Option<PathBuf>,

    /// PEM certificate (chain) presenting this client to an `amqps://` broker that asks for
    /// one. Needs AMQP_CLIENT_KEY_FILE.
    #[arg(long, env = "AMQP_CLIENT_CERT_FILE", requires = "amqp_client_key_file")]
    pub amqp_client_cert_file: Option<PathBuf>,

    /// PEM private key of AMQP_CLIENT_CERT_FILE.
    #[arg(long, env = "AMQP_CLIENT_KEY_FILE", requires = "amqp_client_cert_file")]
    pub amqp_client_key_file: Option<PathBuf>,

    /// Name of the work queue. Its dead-letter exchange and queue are `<QUEUE>.dlx` and
    /// `<QUEUE>.dead`.
    #[arg(long, env = "QUEUE", default_value = "tasks", value_parser = parse_queue_name)]
    pub queue: String,

    /// How many times one copy of a task may take its worker down (a crash, a lost connection)
    /// before it is dead-lettered to `<QUEUE>.dead` (`delivery_limit`): the worker it is then
    /// delivered to does not run it. Also each kind's queue's `x-delivery-limit`, the broker's
    /// backstop. Failed attempts are counted by `MAX_ATTEMPTS` instead.
    #[arg(long, env = "DELIVERY_LIMIT", default_value_t = 5)]
    pub delivery_limit: u32,

    /// Most tasks the work queue holds ready (`x-max-length`); past it new tasks are refused
    /// with 503 instead of piling up. Unset: no limit. Changing it means re-creating the
    /// queue.
    #[arg(long, env = "QUEUE_MAX_LENGTH")]
    pub queue_max_length: Option<u32>,

    /// Most tasks `<QUEUE>.dead` keeps (`x-max-length`, `drop-head`): past it the oldest dead
    /// task is dropped, so a flood of failing tasks cannot fill the broker's disk. Changing it
    /// means re-creating the dead-letter queue.
    #[arg(long, env = "DEAD_MAX_LENGTH", default_value_t = DEFAULT_DEAD_MAX_LENGTH, value_parser = clap::value_parser!(u32).range(1..))]
    pub dead_max_length: u32,

    /// How many cluster nodes hold a copy of each quorum queue and of the events stream
    /// (`x-quorum-initial-group-size`, `x-initial-cluster-size`). Unset: the broker decides
    /// (its `quorum_cluster_size` and stream defaults) and no such argument is
    /// declared. On a cluster set it (3 for three nodes); RabbitMQ checks it on every
    /// declare, so changing it means re-creating the queues (docs/OPERATIONS.md).
    #[arg(long, env = "REPLICAS", value_parser = clap::value_parser!(u32).range(1..))]
    pub replicas: Option<u32>,

    /// Lifecycle events on the `<QUEUE>.events` stream (`on` or `off`): what
    /// GET /tasks/{id} is built from. `off` gives the bare queue.
    #[arg(long, env = "EVENTS", default_value = "on", value_parser = clap::builder::BoolishValueParser::new(), action = clap::ArgAction::Set, hide_possible_values = true)]
    pub events: bool,

    /// How long the events stream keeps events (`x-max-age`), and so how long a task's
    /// status can be asked for.
    #[arg(long, env = "EVENTS_MAX_AGE", default_value = "7days", value_parser = humantime::parse_duration)]
    pub events_max_age: Duration,

    /// Most bytes the events stream keeps (`x-max-length-bytes`); past it the oldest events
    /// go first.
    #[arg(long, env = "EVENTS_MAX_BYTES", default_value_t = DEFAULT_EVENTS_MAX_BYTES)]
    pub events_max_bytes: u64,

    /// AMQP heartbeat interval in seconds; a connection that stays silent for two intervals
    /// is treated as dead. 0 disables heartbeats (not recommended).
    #[arg(long, env = "HEARTBEAT", default_value_t = 10)]
    pub heartbeat: u16,

    /// How long to wait for the TCP connection, TLS and AMQP handshakes with one broker.
    #[arg(long, env = "CONNECT_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    pub connect_timeout: Duration,
}

/// Default for `--events-max-bytes`: 1 GiB.
pub const DEFAULT_EVENTS_MAX_BYTES: u64 = 1 << 30;
/// Default for `--events-max-age`: 7 days.
pub const DEFAULT_EVENTS_MAX_AGE: Duration = Duration::from_secs(7 * 24 * 3600);

impl BrokerArgs {
    /// Settings for a broker at `amqp_url` and a work queue named `queue`, every other
    /// setting at its default. Handy in tests and embedding code.
    pub fn new(amqp_url: impl Into<String>, queue: impl Into<String>) -> Self {
        Self {
            amqp_url: amqp_url.into(),
            amqp_url_file: None,
            amqp_ca_file: None,
            amqp_client_cert_file: None,
            amqp_client_key_file: None,
            queue: queue.into(),
            delivery_limit: 5,
            queue_max_length: None,
            dead_max_length: DEFAULT_DEAD_MAX_LENGTH,
            replicas: None,
            events: true,
            events_max_age: DEFAULT_EVENTS_MAX_AGE,
            events_max_bytes: DEFAULT_EVENTS_MAX_BYTES,
            heartbeat: 10,
            connect_timeout: Duration::from_secs(5),
        }
    }

    /// The topology these settings describe.
    pub fn topology(&self) -> Topology {
        Topology::new(self.queue.clone(), self.delivery_limit)
            .with_max_length(self.queue_max_length)
            .with_dead_max_length(self.dead_max_length)
            .with_replicas(self.replicas)
            .with_events(self.events.then_some(EventsRetention {
                max_age: self.events_max_age,
                max_bytes: self.events_max_bytes,
            }))
    }

    /// Reads the URL list and the TLS files: everything needed to connect, checked once at
    /// start so that a typo stops the process with one clear line instead of a retry loop.
    pub fn connector(&self) -> Result<Connector, BrokerError> {
        let list = match &self.amqp_url_file {
            Some(path) => read(path, "AMQP_URL_FILE")?,
            None => self.amqp_url.clone(),
        };
        let endpoints = url::parse_list(&list)?;
        let read_bytes = |path: &PathBuf, setting: &'static str| {
            std::fs::read(path).map_err(|source| BrokerError::File {
                setting,
                path: path.clone(),
                source,
            })
        };
        let cert_chain = self
            .amqp_ca_file
            .as_ref()
            .map(|path| read(path, "AMQP_CA_FILE"))
            .transpose()?;
        let identity = match (&self.amqp_client_cert_file, &self.amqp_client_key_file) {
            (Some(cert), Some(key)) => Some(OwnedIdentity::PKCS8 {
                pem: read_bytes(cert, "AMQP_CLIENT_CERT_FILE")?,
                key: read_bytes(key, "AMQP_CLIENT_KEY_FILE")?,
            }),
            _ => None,
        };
        Ok(Connector {
            // Processes started together spread over the nodes instead of all piling onto
            // the first one.
            next: std::process::id() as usize % endpoints.len(),
            endpoints,
            tls: OwnedTLSConfig {
                identity,
                cert_chain,
            },
            heartbeat: self.heartbeat,
            connect_timeout: self.connect_timeout,
        })
    }
}

fn read(path: &PathBuf, setting: &'static str) -> Result<String, BrokerError> {
    std::fs::read_to_string(path)
        .map(|text| text.trim().to_owned())
        .map_err(|source| BrokerError::File {
            setting,
            path: path.clone(),
            source,
        })
}

/// Opens connections to the first broker of the list that answers.
pub struct Connector {
    endpoints: Vec<Endpoint>,
    next: usize,
    tls: OwnedTLSConfig,
    heartbeat: u16,
    connect_timeout: Duration,
}

impl Connector {
    /// The configured brokers, passwords redacted, for log lines.
    pub fn describe(&self) -> String {
        self.endpoints
            .iter()
            .map(Endpoint::redacted)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The broker user every URL of the list logs in as (`guest` where a URL names none), to
    /// write as each message's `user_id`; `None` when they differ, or when one logs in with
    /// a client certificate (EXTERNAL), whose user the broker takes from the certificate.
    pub fn user(&self) -> Option<String> {
        let mut users = self.endpoints.iter().map(|endpoint| {
            let uri = endpoint.uri();
            match uri.query.auth_mechanism {
                Some(lapin::uri::SASLMechanism::External) => None,
                _ => Some(uri.authority.userinfo.username.clone()),
            }
        });
        let first = users.next()??;
        users
            .all(|user| user.as_ref() == Some(&first))
            .then_some(first)
    }

    /// How long one connection attempt may take; also the bound on any single exchange with
    /// the broker that a supervisor waits on.
    pub fn timeout(&self) -> Duration {
        self.connect_timeout
    }

    /// Connects to one broker of the list, trying each in turn, starting after the one used
    /// last. Returns the connection and the (redacted) URL it reached; on failure the error of
    /// the last broker tried, after a warning line for each of the others.
    pub async fn connect(
        &mut self,
        connection_name: &str,
    ) -> Result<(Connection, String), BrokerError> {
        let count = self.endpoints.len();
        let mut last_error = None;
        for attempt in 0..count {
            let endpoint = self.endpoints[(self.next + attempt) % count].clone();
            match self.connect_to(&endpoint, connection_name).await {
                Ok(connection) => {
                    self.next = (self.next + attempt + 1) % count;
                    return Ok((connection, endpoint.redacted().to_owned()));
                }
                Err(error) => {
                    if count > 1 && attempt + 1 < count {
                        tracing::warn!("{error}; trying the next broker");
                    }
                    last_error = Some(error);
                }
            }
        }
        self.next = (self.next + 1) % count;
        Err(last_error.expect("the endpoint list is never empty, so one attempt was made"))
    }

    async fn connect_to(
        &self,
        endpoint: &Endpoint,
        connection_name: &str,
    ) -> Result<Connection, BrokerError> {
        let mut uri = endpoint.uri().clone();
        // Settings given in the URL's query win over the flags, as users of other AMQP
        // clients expect.
        uri.query.heartbeat.get_or_insert(self.heartbeat);
        let timeout_ms = u64::try_from(self.connect_timeout.as_millis()).unwrap_or(u64::MAX);
        uri.query.connection_timeout.get_or_insert(timeout_ms);
        let properties =
            ConnectionProperties::default().with_connection_name(connection_name.into());
        let runtime = lapin::runtime::default_runtime().map_err(|source| BrokerError::Connect {
            url: endpoint.redacted().to_owned(),
            advice: "",
            source,
        })?;
        // An amqp:// URL never negotiates TLS; an amqps:// one always does (lapin is built with
        // rustls), so there is no plaintext fallback to worry about.
        let connect =
            Connection::connect_uri_with_config(uri, properties, self.tls.clone(), runtime);
        // The URI's connection_timeout covers the TCP connect; this bounds the TLS and AMQP
        // handshakes as well, so a broker that accepts the socket but never answers cannot
        // hang us.
        match tokio::time::timeout(self.connect_timeout, connect).await {
            Ok(Ok(connection)) => Ok(connection),
            Ok(Err(source)) => Err(BrokerError::Connect {
                url: endpoint.redacted().to_owned(),
                advice: advice(endpoint, &source),
                source,
            }),
            Err(_) => Err(BrokerError::ConnectTimeout {
                url: endpoint.redacted().to_owned(),
                timeout: self.connect_timeout,
            }),
        }
    }
}

/// What to do about a failed connection, where the error alone would leave a user guessing.
fn advice(endpoint: &Endpoint, error: &lapin::Error) -> &'static str {
    let text = error.to_string();
    if endpoint.is_tls() {
        if text.contains("InvalidContentType") || text.contains("CorruptMessage") {
            return " (the TLS handshake failed: is that port a TLS listener? RabbitMQ's is 5671; use amqp:// for a plaintext port)";
        }
        if text.contains("UnknownIssuer") || text.contains("certificate") {
            return " (the broker's certificate is not trusted: point AMQP_CA_FILE at the CA that signed it)";
        }
    }
    if matches!(error.kind(), lapin::ErrorKind::ProtocolError(_)) && text.contains("ACCESS_REFUSED")
    {
        return " (the user name or password was refused)";
    }
    ""
}

/// Why talking to the broker failed.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// The configured URL list is not usable.
    #[error(transparent)]
    Url(#[from] UrlError),
    /// A file named by a setting could not be read.
    #[error("cannot read {setting} {path}: {source}")]
    File {
        /// The setting that names it.
        setting: &'static str,
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The broker refused or dropped the connection.
    #[error("cannot connect to RabbitMQ at {url}: {source}{advice}")]
    Connect {
        /// The URL, password redacted.
        url: String,
        /// A hint for the common mistakes, or empty.
        advice: &'static str,
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
    /// The broker did not answer a request in time (the connection may be dying).
    #[error("RabbitMQ did not answer {what} within {}", humantime::format_duration(*.timeout))]
    NoAnswer {
        /// What was asked.
        what: &'static str,
        /// How long we waited.
        timeout: Duration,
    },
    /// A channel-level operation failed.
    #[error("RabbitMQ channel error: {0}")]
    Channel(#[from] lapin::Error),
    /// The queues exist with other settings, or could not be declared.
    #[error(transparent)]
    Topology(#[from] crate::topology::TopologyError),
    /// The session's supervisor panicked: a bug, and the process is no longer connected.
    #[error("the broker session stopped: it panicked ({0})")]
    SessionPanicked(String),
}

impl BrokerError {
    /// Whether retrying cannot help: the settings themselves are wrong.
    pub fn is_configuration(&self) -> bool {
        matches!(self, Self::Url(_) | Self::File { .. })
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_reserved_and_empty_queue_names() {
        assert!(parse_queue_name("").is_err());
        assert!(parse_queue_name("amq.foo").is_err());
        assert!(parse_queue_name(&"q".repeat(251)).is_err());
        assert_eq!(parse_queue_name("tasks").as_deref(), Ok("tasks"));
    }
}
