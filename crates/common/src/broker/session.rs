//! The broker session: the one layer both binaries stand on. This file is its handle
//! ([`Broker`]); `supervisor.rs` is the task that keeps it alive.
//!
//! A background task (the supervisor) owns the connection. It connects to one broker of the
//! configured list, declares the topology, opens a confirm-mode publishing channel and hands
//! the three out through a `watch` channel as a [`Link`]. When the connection dies it
//! withdraws the link, so callers fail fast, and connects again (to the next broker of the
//! list) with jittered exponential backoff.
//!
//! It also heals the topology: every few seconds, and at once when a caller reports a
//! publish returned unrouted or a subscription cancelled by the broker, it checks that the
//! queues exist and declares them again if they do not. Until that succeeds the session
//! reports [`BrokerState::Unroutable`].
//!
//! And it renews the publishing channel when a caller reports a nack. On RabbitMQ 3.10 (the
//! version tested), a channel that first publishes to a quorum queue while the queue's
//! leader is down (right after reconnecting to a cluster that lost a node) keeps sending to
//! the dead leader and has every publish nacked until that node is back, seconds after a new
//! leader took over. A channel opened later finds the new leader and is confirmed.
//!
//! One rule for a topology mismatch (a queue of ours declared by someone else with other
//! arguments): fatal if the process has never declared the topology, since it is then a
//! configuration error retrying cannot fix; after that, logged and retried, since an operator
//! may be mid-way through fixing it.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU16, Ordering},
    },
    time::Duration,
};

use backon::{BackoffBuilder, ExponentialBuilder};
use lapin::{Channel, Connection, options::ConfirmSelectOptions};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::{
    BrokerArgs, BrokerError,
    supervisor::{Supervisor, SupervisorLoop},
};
use crate::topology::{Topology, TopologyError};

/// Waits between connection attempts: from 100 ms, doubling, capped at 500 ms, plus up to as
/// much again of jitter (so processes that lost the same broker do not all come back in the
/// same instant): at most a second between attempts.
pub fn backoff() -> impl Iterator<Item = Duration> + Send {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_millis(500))
        .with_jitter()
        .without_max_times()
        .build()
}

/// What a caller can do with the broker right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BrokerState {
    /// Connected and the queues exist: publishing works.
    Connected,
    /// Connected, but the broker refuses publishes for now (memory or disk alarm).
    Blocked,
    /// Connected, but the queues are missing and could not be declared again yet: publishes
    /// would come back unrouted.
    Unroutable,
    /// No connection.
    Disconnected,
}

impl BrokerState {
    /// The word `/health` uses for this state.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Connected => "connected",
            Self::Blocked => "blocked",
            Self::Unroutable => "unroutable",
            Self::Disconnected => "disconnected",
        }
    }
}

/// A live connection and its confirm-mode publishing channel. Cheap to clone.
#[derive(Clone)]
pub struct Link {
    pub(super) connection: Arc<Connection>,
    pub(super) publisher: Channel,
}

impl Link {
    /// The connection, for opening channels of one's own (a consumer's, say).
    pub fn connection(&self) -> &Connection {
        &self.connection
    }

    /// A channel in confirm mode, shared by everyone publishing through this session;
    /// replaced by a fresh one after a reported nack ([`Broker::report_nack`]). Keep the
    /// `Link` until the confirm of what you published on it is settled: a replaced channel
    /// is closed once no `Link` holds it.
    pub fn publisher(&self) -> &Channel {
        &self.publisher
    }
}

/// A handle on the session. Cheap to clone; all clones share one connection.
#[derive(Clone)]
pub struct Broker {
    link: watch::Receiver<Option<Link>>,
    shared: Arc<Shared>,
}

pub(super) struct Shared {
    pub(super) topology: Topology,
    /// The broker user the session logs in as, if known: what it writes as `user_id`.
    pub(super) user: Option<Arc<str>>,
    /// The connect timeout, which bounds every request the session's loops wait on.
    pub(super) timeout: Duration,
    pub(super) unroutable: AtomicBool,
    pub(super) check: tokio::sync::Notify,
    /// The channel a publish was last nacked on, and the signal that one was.
    pub(super) nacked_on: AtomicU16,
    pub(super) renew: tokio::sync::Notify,
}

impl Broker {
    /// Reads the settings, connects once and declares `topology` (the gateway's is
    /// `args.topology()`; a worker's adds the kinds it handles), then starts the supervisor,
    /// which keeps the session alive until `shutdown` is cancelled.
    ///
    /// An unreachable broker is not an error here: the session starts disconnected and keeps
    /// trying. Unusable settings (a bad URL, an unreadable file) and a topology mismatch are.
    pub async fn start(
        args: &BrokerArgs,
        topology: Topology,
        connection_name: &'static str,
        shutdown: CancellationToken,
    ) -> Result<(Self, Supervisor), BrokerError> {
        let connector = args.connector()?;
        let shared = Arc::new(Shared {
            topology,
            user: connector.user().map(Arc::from),
            timeout: connector.timeout(),
            unroutable: AtomicBool::new(false),
            check: tokio::sync::Notify::new(),
            nacked_on: AtomicU16::new(0),
            renew: tokio::sync::Notify::new(),
        });
        let (sender, receiver) = watch::channel(None);
        let mut supervisor = SupervisorLoop {
            connector,
            connection_name,
            shared: Arc::clone(&shared),
            sender,
            shutdown,
            declared_once: false,
        };
        tracing::info!(
            broker = %supervisor.connector.describe(),
            queue = shared.topology.queue(),
            "connecting to RabbitMQ"
        );
        let first = match supervisor.open().await {
            Ok(opened) => Some(opened),
            Err(error @ BrokerError::Topology(TopologyError::Mismatch { .. })) => {
                return Err(error);
            }
            Err(error) => {
                tracing::warn!("{error}; retrying until the broker is reachable");
                None
            }
        };
        let handle = Supervisor::from(tokio::spawn(supervisor.run(first)));
        Ok((
            Self {
                link: receiver,
                shared,
            },
            handle,
        ))
    }

    /// A session that never connects: every publish fails as [`PublishError::Disconnected`]
    /// at once and [`Broker::connected`] never returns. For serving what needs no broker (a
    /// router driven in tests without a socket, say).
    ///
    /// [`PublishError::Disconnected`]: super::publish::PublishError::Disconnected
    pub fn detached(topology: Topology) -> Self {
        // The sender goes at once: the link stays `None`, and waiters wait for good.
        let (_, receiver) = watch::channel(None);
        Self {
            link: receiver,
            shared: Arc::new(Shared {
                topology,
                user: None,
                timeout: Duration::from_secs(5),
                unroutable: AtomicBool::new(false),
                check: tokio::sync::Notify::new(),
                nacked_on: AtomicU16::new(0),
                renew: tokio::sync::Notify::new(),
            }),
        }
    }

    /// The topology this session declares.
    pub fn topology(&self) -> &Topology {
        &self.shared.topology
    }

    /// The broker user this session logs in as, if its URLs say (see
    /// [`super::Connector::user`]).
    pub fn user(&self) -> Option<&str> {
        self.shared.user.as_deref()
    }

    /// The current link, if connected.
    pub fn link(&self) -> Option<Link> {
        self.link.borrow().clone()
    }

    /// Waits until connected and returns the link. Cancel-safe.
    pub async fn connected(&mut self) -> Link {
        loop {
            if let Some(link) = self.link.borrow_and_update().as_ref()
                && link.connection.status().connected()
            {
                return link.clone();
            }
            if self.link.changed().await.is_err() {
                // The supervisor is gone (shutdown); nothing will connect again.
                std::future::pending::<()>().await;
            }
        }
    }

    /// Awaits `request` to the broker for at most the connect timeout: every exchange that a
    /// loop keeping a subscription alive waits on goes through here, so a connection that
    /// dies without lapin noticing at once cannot stall it.
    pub async fn within<T, E>(
        &self,
        what: &'static str,
        request: impl Future<Output = Result<T, E>>,
    ) -> Result<T, BrokerError>
    where
        E: Into<BrokerError>,
    {
        within(self.shared.timeout, what, request).await
    }

    /// The queues' depth, `kinds`' queues among them, asked of the broker now; `None` when
    /// disconnected or when it does not answer in time.
    pub async fn depth(&self, kinds: &[String]) -> Option<crate::topology::QueueDepth> {
        let link = self.link()?;
        self.within(
            "counting the queues",
            self.topology().depth(link.connection(), kinds),
        )
        .await
        .ok()
    }

    /// Whether the broker is refusing publishes for now (a memory or disk alarm).
    pub fn is_blocked(&self) -> bool {
        self.link
            .borrow()
            .as_ref()
            .is_some_and(|link| link.connection.status().blocked())
    }

    /// What a publish could do now.
    pub fn state(&self) -> BrokerState {
        match self.link.borrow().as_ref() {
            None => BrokerState::Disconnected,
            Some(link) if !link.publisher.status().connected() => BrokerState::Disconnected,
            Some(link) if link.connection.status().blocked() => BrokerState::Blocked,
            Some(_) if self.shared.unroutable.load(Ordering::Relaxed) => BrokerState::Unroutable,
            Some(_) => BrokerState::Connected,
        }
    }

    /// Tells the session that a publish came back unrouted because the queue is gone: it
    /// reports [`BrokerState::Unroutable`] and checks the topology now.
    pub fn report_unroutable(&self) {
        self.shared.unroutable.store(true, Ordering::Relaxed);
        self.shared.check.notify_one();
    }

    /// Asks the session to check the topology now (a subscription was cancelled by the
    /// broker, say, which is what deleting a queue does to its consumers).
    pub fn check_topology(&self) {
        self.shared.check.notify_one();
    }

    /// Tells the session that the broker nacked a publish sent on `link`: if that is still
    /// the current publishing channel, it opens a fresh one, since this one may be sending to
    /// a quorum queue leader that is gone (see the module's documentation). The next
    /// [`Broker::link`] hands it out; publishes already sent keep their channel until they
    /// are answered.
    pub fn report_nack(&self, link: &Link) {
        self.shared
            .nacked_on
            .store(link.publisher.id(), Ordering::Relaxed);
        self.shared.renew.notify_one();
    }
}

/// A new channel on `connection`, in confirm mode: a session's publishing channel.
pub(super) async fn open_publisher(connection: &Connection) -> Result<Channel, BrokerError> {
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    Ok(channel)
}

pub(super) async fn within<T, E>(
    limit: Duration,
    what: &'static str,
    request: impl Future<Output = Result<T, E>>,
) -> Result<T, BrokerError>
where
    E: Into<BrokerError>,
{
    match tokio::time::timeout(limit, request).await {
        Ok(answer) => answer.map_err(Into::into),
        Err(_) => Err(BrokerError::NoAnswer {
            what,
            timeout: limit,
        }),
    }
}
