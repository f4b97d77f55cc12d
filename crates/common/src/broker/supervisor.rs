//! The session's supervisor: the background task that owns the connection. It connects,
//! declares the topology, opens the publishing channel and hands them out as a [`Link`];
//! when the connection dies it withdraws the link and connects again with backoff; on the
//! way it heals the topology and renews the publishing channel after a nack (see
//! `session.rs` for why). [`Supervisor`] is its handle, a future of how it ended.

use std::{
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use futures_util::StreamExt;
use lapin::{Connection, Event};
use tokio::{sync::watch, task::JoinHandle, time::Instant};
use tokio_util::sync::CancellationToken;

use super::{
    BrokerError, Connector,
    session::{Link, Shared, backoff, open_publisher, within},
};
use crate::topology::TopologyError;

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

pub(super) struct SupervisorLoop {
    pub(super) connector: Connector,
    pub(super) connection_name: &'static str,
    pub(super) shared: Arc<Shared>,
    pub(super) sender: watch::Sender<Option<Link>>,
    pub(super) shutdown: CancellationToken,
    pub(super) declared_once: bool,
}

impl SupervisorLoop {
    /// Connects, declares the topology and opens a confirm-mode channel.
    pub(super) async fn open(&mut self) -> Result<Link, BrokerError> {
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

    pub(super) async fn run(mut self, mut current: Option<Link>) -> Result<(), BrokerError> {
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

    /// [`SupervisorLoop::check`], bounded: a connection that dies mid-check must not stall the
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
