//! The broker session: the one layer both binaries stand on.
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
use futures_util::StreamExt;
use lapin::{Channel, Connection, Event, options::ConfirmSelectOptions};
use tokio::{sync::watch, task::JoinHandle, time::Instant};
use tokio_util::sync::CancellationToken;

use super::{BrokerArgs, BrokerError, Connector};
use crate::topology::{Topology, TopologyError};

/// How often the supervisor looks at the connection's state, as a backstop to its events.
const LIVENESS_CHECK: Duration = Duration::from_millis(250);
/// The bound on declaring the whole topology (two dozen quorum queues when fresh: a quarter
/// of a second on an idle broker, seconds on a busy one) and on a topology check: generous,
/// since its only purpose is that a dead connection cannot stall the supervisor for good.
const DECLARE_TIMEOUT: Duration = Duration::from_secs(30);
/// How often the supervisor checks that the queues still exist.
const TOPOLOGY_CHECK: Duration = Duration::from_secs(3);
/// The shortest time between two topology checks asked for by callers, so a flood of
/// returned publishes cannot turn into a flood of declarations.
const TOPOLOGY_CHECK_MIN_GAP: Duration = Duration::from_secs(1);
/// The shortest time between two renewals of the publishing channel, so a full queue (which
/// nacks every publish) costs a channel five times a second, not one per request.
const RENEW_MIN_GAP: Duration = Duration::from_millis(200);

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
    connection: Arc<Connection>,
    publisher: Channel,
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

struct Shared {
    topology: Topology,
    /// The connect timeout, which bounds every request the session's loops wait on.
    timeout: Duration,
    unroutable: AtomicBool,
    check: tokio::sync::Notify,
    /// The channel a publish was last nacked on, and the signal that one was.
    nacked_on: AtomicU16,
    renew: tokio::sync::Notify,
}

/// The supervisor task, as a future: ends when shutdown is asked for (`Ok`), on an error
/// retrying cannot fix (a topology mismatch before the topology was ever declared), or with
/// [`BrokerError::SessionPanicked`] if it panicked, so that a process whose session died says
/// so in its exit code instead of stopping as if asked to.
pub struct Supervisor(JoinHandle<Result<(), BrokerError>>);

impl Supervisor {
    /// Whether the task has ended (and so awaiting it returns at once).
    pub fn is_finished(&self) -> bool {
        self.0.is_finished()
    }
}

impl From<JoinHandle<Result<(), BrokerError>>> for Supervisor {
    fn from(handle: JoinHandle<Result<(), BrokerError>>) -> Self {
        Self(handle)
    }
}

impl Future for Supervisor {
    type Output = Result<(), BrokerError>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        context: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        std::pin::Pin::new(&mut self.0).poll(context).map(|joined| {
            joined.unwrap_or_else(|error| {
                Err(BrokerError::SessionPanicked(if error.is_panic() {
                    crate::telemetry::panic_message(error.into_panic().as_ref()).to_owned()
                } else {
                    "its task was cancelled".to_owned()
                }))
            })
        })
    }
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
            timeout: connector.timeout(),
            unroutable: AtomicBool::new(false),
            check: tokio::sync::Notify::new(),
            nacked_on: AtomicU16::new(0),
            renew: tokio::sync::Notify::new(),
        });
        let (sender, receiver) = watch::channel(None);
        let mut supervisor = SessionTask {
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
        let handle = Supervisor(tokio::spawn(supervisor.run(first)));
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

    /// The queues' depth, asked of the broker now; `None` when disconnected or when it does
    /// not answer in time.
    pub async fn depth(&self) -> Option<crate::topology::QueueDepth> {
        let link = self.link()?;
        self.within(
            "counting the queues",
            self.topology().depth(link.connection()),
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
async fn open_publisher(connection: &Connection) -> Result<Channel, BrokerError> {
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    Ok(channel)
}

async fn within<T, E>(
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

struct SessionTask {
    connector: Connector,
    connection_name: &'static str,
    shared: Arc<Shared>,
    sender: watch::Sender<Option<Link>>,
    shutdown: CancellationToken,
    declared_once: bool,
}

impl SessionTask {
    /// Connects, declares the topology and opens a confirm-mode channel.
    async fn open(&mut self) -> Result<Link, BrokerError> {
        let (connection, url) = self.connector.connect(self.connection_name).await?;
        let set_up = async {
            self.shared.topology.declare(&connection).await?;
            open_publisher(&connection).await
        };
        // The supervisor awaits nothing unbounded: a connection that dies mid-setup must not
        // leave it waiting on an answer that never comes.
        let opened = within(DECLARE_TIMEOUT, "the setup of a new connection", set_up).await;
        match opened {
            Ok(publisher) => {
                self.declared_once = true;
                self.shared.unroutable.store(false, Ordering::Relaxed);
                tracing::info!(broker = %url, queue = self.shared.topology.queue(), "connected to RabbitMQ");
                Ok(Link {
                    connection: Arc::new(connection),
                    publisher,
                })
            }
            Err(error) => {
                self.close(&connection, 200, "could not set up").await;
                Err(error)
            }
        }
    }

    async fn run(mut self, mut current: Option<Link>) -> Result<(), BrokerError> {
        let mut delays = backoff();
        loop {
            if let Some(mut link) = current.take() {
                delays = backoff();
                self.sender.send_replace(Some(link.clone()));
                let lost = self.watch(&mut link).await;
                self.sender.send_replace(None);
                match lost {
                    None => {
                        self.close(&link.connection, 200, "shutting down").await;
                        return Ok(());
                    }
                    Some(reason) => {
                        tracing::warn!("lost the broker connection ({reason}); reconnecting");
                        // Release the socket now; it may already be gone.
                        self.close(&link.connection, 320, "reconnecting").await;
                    }
                }
            }
            let delay = delays.next().unwrap_or(Duration::from_secs(1));
            tokio::select! {
                () = self.shutdown.cancelled() => return Ok(()),
                () = tokio::time::sleep(delay) => {}
            }
            match self.open().await {
                Ok(link) => current = Some(link),
                Err(error @ BrokerError::Topology(TopologyError::Mismatch { .. }))
                    if !self.declared_once =>
                {
                    return Err(error);
                }
                Err(error) => tracing::warn!("{error}; retrying"),
            }
        }
    }

    /// Closes `connection`, waiting for the broker's answer no longer than a connect attempt.
    async fn close(&self, connection: &Connection, code: u16, reason: &str) {
        let closing = connection.close(code, reason.into());
        let _ = tokio::time::timeout(self.connector.timeout(), closing).await;
    }

    /// Watches the link until it fails (`Some(reason)`) or shutdown (`None`), healing the
    /// topology and renewing the publishing channel on the way.
    async fn watch(&self, link: &mut Link) -> Option<String> {
        let mut events = link.connection.events_listener();
        let mut liveness = tokio::time::interval(LIVENESS_CHECK);
        let mut periodic = tokio::time::interval(TOPOLOGY_CHECK);
        periodic.reset();
        let mut last_check = Instant::now()
            .checked_sub(TOPOLOGY_CHECK_MIN_GAP)
            .unwrap_or_else(Instant::now);
        let mut last_renewal: Option<Instant> = None;
        loop {
            let may_check = last_check.elapsed() >= TOPOLOGY_CHECK_MIN_GAP;
            let may_renew = last_renewal.is_none_or(|at| at.elapsed() >= RENEW_MIN_GAP);
            tokio::select! {
                () = self.shutdown.cancelled() => return None,
                event = events.next() => match event {
                    // lapin reports a channel's errors here too (a passive declaration of a
                    // missing queue, say); only a dead connection ends the link.
                    Some(Event::Error(error)) if !link.connection.status().connected() => {
                        return Some(error.to_string());
                    }
                    Some(Event::ConnectionBlocked(reason)) => {
                        tracing::warn!(%reason, "RabbitMQ blocked publishing until its alarm clears");
                    }
                    Some(Event::ConnectionUnblocked) => tracing::info!("RabbitMQ unblocked publishing"),
                    Some(_) => {}
                    None => return Some("connection closed".into()),
                },
                _ = liveness.tick() => {
                    if !link.connection.status().connected() || !link.publisher.status().connected() {
                        return Some("channel closed".into());
                    }
                }
                _ = periodic.tick() => {
                    self.heal(&link.connection).await;
                    last_check = Instant::now();
                }
                () = self.shared.check.notified(), if may_check => {
                    self.heal(&link.connection).await;
                    last_check = Instant::now();
                }
                () = self.shared.renew.notified(), if may_renew => {
                    // Nacks of publishes sent on a channel already replaced change nothing.
                    if self.shared.nacked_on.load(Ordering::Relaxed) == link.publisher.id() {
                        self.renew_publisher(link).await;
                        last_renewal = Some(Instant::now());
                    }
                }
            }
        }
    }

    /// Opens a fresh confirm-mode channel and hands it out in place of `link`'s publisher,
    /// which is closed once no confirm can still be due on it.
    async fn renew_publisher(&self, link: &mut Link) {
        let open = open_publisher(&link.connection);
        match within(self.connector.timeout(), "a new publishing channel", open).await {
            Ok(channel) => {
                // The replaced channel closes when its last clone is dropped: every caller
                // holds its `Link` until its confirm is settled, so the channel lives exactly
                // as long as a confirm can still be due on it (a full queue, which nacks at
                // once, thus costs channel openings, not a pile of open channels).
                link.publisher = channel;
                self.sender.send_replace(Some(link.clone()));
                tracing::info!(
                    "RabbitMQ nacked a publish; publishing on a fresh channel, which asks where each queue's leader is now"
                );
            }
            // The connection is failing; the liveness check will notice.
            Err(error) => tracing::warn!("could not open a new publishing channel: {error}"),
        }
    }

    /// [`SessionTask::check`], bounded: a connection that dies mid-check must not stall the
    /// supervisor, which has to notice the loss and reconnect.
    async fn heal(&self, connection: &Connection) {
        let check = async {
            self.check(connection).await;
            Ok::<_, BrokerError>(())
        };
        if let Err(error) = within(DECLARE_TIMEOUT, "the topology check", check).await {
            tracing::warn!("{error}");
        }
    }

    /// Declares the queues again if they are gone, and binds this process's kinds again.
    async fn check(&self, connection: &Connection) {
        let topology = &self.shared.topology;
        // A publish came back unrouted although the main queues may exist: a delay level may
        // be gone, which only declaring everything again repairs.
        let reported = self.shared.unroutable.load(Ordering::Relaxed);
        match topology.exists(connection).await {
            Ok(true) if !reported => {
                // Someone else may have declared the queue anew, without our kinds' bindings.
                if let Err(error) = topology.bind_kinds(connection).await {
                    tracing::warn!("binding this worker's kinds failed: {error}; retrying");
                }
                self.shared.unroutable.store(false, Ordering::Relaxed);
                return;
            }
            Ok(_) => {}
            // The connection is failing; the liveness check will notice.
            Err(_) => return,
        }
        tracing::warn!(
            queue = topology.queue(),
            "queues are gone (deleted by someone?) or a publish came back unrouted; declaring the topology again"
        );
        match topology.declare(connection).await {
            Ok(()) => {
                self.shared.unroutable.store(false, Ordering::Relaxed);
                tracing::info!(queue = topology.queue(), "queues declared again");
            }
            Err(error) => {
                self.shared.unroutable.store(true, Ordering::Relaxed);
                tracing::error!(
                    "{error}; publishes cannot be routed until this is fixed, retrying"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_panicking_supervisor_ends_with_an_error_not_a_clean_stop() {
        let panicked: Supervisor = tokio::spawn(async {
            assert!(!std::hint::black_box(true), "a bug in the session");
            Ok(())
        })
        .into();

        let ended = panicked.await;

        match ended {
            Err(BrokerError::SessionPanicked(message)) => {
                assert!(message.contains("a bug in the session"), "{message}");
            }
            other => panic!("expected SessionPanicked, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_supervisor_that_stops_as_asked_ends_ok() {
        let stopped: Supervisor = tokio::spawn(async { Ok(()) }).into();
        assert!(stopped.await.is_ok());
    }
}
