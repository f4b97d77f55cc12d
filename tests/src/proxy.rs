//! A TCP proxy between offload and the broker that can cut, hang or reset the network on
//! demand, run in process so no root or `tc` is needed.
//!
//! - **cut**: every open connection is closed (FIN) and new ones are refused until healed;
//! - **hang**: connections stay open but no byte moves either way, new ones included, until
//!   healed, as with a dead route or a peer frozen mid-stream;
//! - **reset**: every open connection is aborted with a TCP RST; new ones pass.
//! - **hold after a pattern**: the first connection whose client sends the pattern has it
//!   forwarded, and from then on everything that client sends is swallowed, while the
//!   broker's side still reaches it: a worker then gets its confirm but its ack never
//!   arrives.

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::watch,
    task::JoinHandle,
};

/// What the proxy does to traffic right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Pass,
    Hang,
    Cut,
}

#[derive(Debug, Clone, Copy)]
struct State {
    mode: Mode,
    /// Bumped by [`FaultyProxy::reset`]; a connection opened before the bump is aborted.
    resets: u64,
}

/// Swallows a client's bytes once it has sent a pattern.
#[derive(Default)]
struct Tripwire {
    /// Armed with a pattern; disarmed once a connection trips it.
    pattern: Mutex<Option<Vec<u8>>>,
    tripped: AtomicBool,
}

impl Tripwire {
    /// Whether `seen` (the end of what a client sent so far) trips the armed pattern; if so
    /// the wire is disarmed, so one connection trips it at most.
    fn trips(&self, seen: &[u8]) -> bool {
        let mut pattern = self
            .pattern
            .lock()
            .expect("the tripwire lock is never poisoned");
        let found = pattern
            .as_deref()
            .is_some_and(|pattern| seen.windows(pattern.len()).any(|w| w == pattern));
        if found {
            *pattern = None;
            self.tripped.store(true, Ordering::SeqCst);
        }
        found
    }

    fn longest(&self) -> usize {
        self.pattern
            .lock()
            .expect("the tripwire lock is never poisoned")
            .as_ref()
            .map_or(0, Vec::len)
    }
}

/// A running proxy. Stops (closing every connection) when dropped.
pub struct FaultyProxy {
    addr: SocketAddr,
    state: watch::Sender<State>,
    accept: JoinHandle<()>,
    tripwire: Arc<Tripwire>,
    open: Arc<AtomicUsize>,
}

impl FaultyProxy {
    /// Listens on a free loopback port and forwards every connection to `upstream`.
    pub async fn start(upstream: SocketAddr) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (state, _) = watch::channel(State {
            mode: Mode::Pass,
            resets: 0,
        });
        let tripwire = Arc::new(Tripwire::default());
        let open = Arc::new(AtomicUsize::new(0));
        let accept = tokio::spawn(accept_loop(
            listener,
            upstream,
            state.subscribe(),
            Arc::clone(&tripwire),
            Arc::clone(&open),
        ));
        Ok(Self {
            addr,
            state,
            accept,
            tripwire,
            open,
        })
    }

    /// The proxy's own port, to put in the AMQP URL.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// How many connections pass through the proxy now.
    pub fn open_connections(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }

    /// Closes every connection and refuses new ones until [`FaultyProxy::heal`].
    pub fn cut(&self) {
        self.state.send_modify(|state| state.mode = Mode::Cut);
    }

    /// Stops moving bytes, on open and new connections, until [`FaultyProxy::heal`].
    pub fn hang(&self) {
        self.state.send_modify(|state| state.mode = Mode::Hang);
    }

    /// Aborts every open connection with a TCP RST; new connections pass.
    pub fn reset(&self) {
        self.state.send_modify(|state| state.resets += 1);
    }

    /// Arms the tripwire: the first connection whose client sends `pattern` has those bytes
    /// forwarded, then everything else it sends swallowed (the broker's side still flows).
    pub fn hold_client_after(&self, pattern: &[u8]) {
        *self
            .tripwire
            .pattern
            .lock()
            .expect("the tripwire lock is never poisoned") = Some(pattern.to_vec());
    }

    /// Whether a connection has tripped the wire armed by [`FaultyProxy::hold_client_after`].
    pub fn tripped(&self) -> bool {
        self.tripwire.tripped.load(Ordering::SeqCst)
    }

    /// Back to forwarding everything.
    pub fn heal(&self) {
        self.state.send_modify(|state| state.mode = Mode::Pass);
    }
}

impl Drop for FaultyProxy {
    fn drop(&mut self) {
        self.state.send_modify(|state| state.mode = Mode::Cut);
        self.accept.abort();
    }
}

async fn accept_loop(
    listener: TcpListener,
    upstream: SocketAddr,
    state: watch::Receiver<State>,
    tripwire: Arc<Tripwire>,
    open: Arc<AtomicUsize>,
) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            // Out of file descriptors, say: let it pass rather than spin.
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        if state.borrow().mode == Mode::Cut {
            drop(client);
            continue;
        }
        let (state, tripwire, open) = (state.clone(), Arc::clone(&tripwire), Arc::clone(&open));
        tokio::spawn(async move {
            open.fetch_add(1, Ordering::SeqCst);
            forward(client, upstream, state, tripwire).await;
            open.fetch_sub(1, Ordering::SeqCst);
        });
    }
}

/// Moves bytes both ways until either side closes or a fault ends the connection.
async fn forward(
    mut client: TcpStream,
    upstream: SocketAddr,
    mut state: watch::Receiver<State>,
    tripwire: Arc<Tripwire>,
) {
    let born = state.borrow().resets;
    // A hang that starts before the upstream connection exists hangs the connect too.
    while state.borrow().mode == Mode::Hang {
        if state.changed().await.is_err() {
            return;
        }
    }
    let Ok(Ok(mut server)) =
        tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(upstream)).await
    else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let mut from_client = vec![0_u8; 16 * 1024];
    let mut from_server = vec![0_u8; 16 * 1024];
    // The client's last bytes, so a pattern split over two reads is still seen.
    let mut seen = Vec::new();
    let mut held = false;
    loop {
        let now = *state.borrow_and_update();
        if now.resets != born {
            // SO_LINGER 0 turns the close into a RST.
            let _ = client.set_zero_linger();
            let _ = server.set_zero_linger();
            return;
        }
        match now.mode {
            Mode::Cut => return,
            Mode::Hang => {
                if state.changed().await.is_err() {
                    return;
                }
            }
            Mode::Pass => {
                let moved = tokio::select! {
                    changed = state.changed() => match changed {
                        Ok(()) => continue,
                        Err(_) => return,
                    },
                    read = client.read(&mut from_client) => match read {
                        Ok(0) | Err(_) => return,
                        // Swallowed; still read, so the client's close is noticed.
                        Ok(_) if held => Ok(()),
                        Ok(n) => {
                            let sent = server.write_all(&from_client[..n]).await;
                            let keep = tripwire.longest();
                            if keep > 0 {
                                seen.extend_from_slice(&from_client[..n]);
                                held = tripwire.trips(&seen);
                                let excess = seen.len().saturating_sub(keep);
                                seen.drain(..excess);
                            }
                            sent
                        }
                    },
                    read = server.read(&mut from_server) => match read {
                        Ok(0) | Err(_) => return,
                        Ok(n) => client.write_all(&from_server[..n]).await,
                    },
                };
                if moved.is_err() {
                    return;
                }
            }
        }
    }
}
