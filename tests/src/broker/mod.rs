//! A RabbitMQ node of the test's own, to stop and start without touching the shared broker.

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

mod faults;

use crate::{eventually, free_port};

/// The user RabbitMQ runs as on Debian, and whose Erlang cookie `rabbitmqctl` needs.
const RABBITMQ_USER: &str = "rabbitmq";
const RABBITMQ_HOME: &str = "/var/lib/rabbitmq";

/// A private RabbitMQ node with its own name, ports and data directory. Its data survives
/// [`PrivateBroker::stop`] and [`PrivateBroker::start_again`]; everything is removed on drop.
pub struct PrivateBroker {
    dir: tempfile::TempDir,
    node: String,
    port: u16,
    dist_port: u16,
    tls: Option<TlsListener>,
    server: Option<Child>,
    placement: Option<Placement>,
}

/// Where a node of a [`crate::PrivateCluster`] runs: a network namespace of its own, where it
/// has the standard ports, its own epmd, and the address `ip` that clients reach it at.
#[derive(Debug, Clone)]
pub(crate) struct Placement {
    /// The network namespace.
    pub namespace: String,
    /// The host part of the node's name, resolved by each namespace's own hosts file.
    pub host: String,
    /// The node's address for clients, reachable from the root namespace.
    pub ip: std::net::Ipv4Addr,
}

/// A TLS listener of a private node, with the certificates the test made for it.
#[derive(Debug, Clone)]
pub struct TlsListener {
    /// The listener's port.
    pub port: u16,
    /// The CA that signed the server's and the client's certificates, PEM, in a file.
    pub ca_file: PathBuf,
    /// A client certificate the node accepts, PEM, in a file.
    pub client_cert_file: PathBuf,
    /// Its private key, PEM, in a file.
    pub client_key_file: PathBuf,
}

/// Writes a node's `rabbitmq.conf` (`config`) and an empty plugin list into its data
/// directory, and hands the directory to the `rabbitmq` user.
fn write_node_files(dir: &Path, config: &str) {
    std::fs::write(dir.join("rabbitmq.conf"), config).expect("write rabbitmq.conf");
    std::fs::write(dir.join("enabled_plugins"), "[].\n").expect("write enabled_plugins");
    let status = Command::new("chown")
        .args(["-R", &format!("{RABBITMQ_USER}:")])
        .arg(dir)
        .status()
        .expect("run chown");
    assert!(
        status.success(),
        "the tests start private RabbitMQ nodes as the 'rabbitmq' user and need root to hand them a data directory"
    );
}

impl PrivateBroker {
    /// Starts a fresh node and waits until it accepts AMQP connections.
    ///
    /// Needs `rabbitmq-server` installed and root (to run it as the `rabbitmq` user, which
    /// owns the Erlang cookie).
    pub async fn start() -> Self {
        Self::start_with(false).await
    }

    /// Starts a fresh node with a TLS listener too, on certificates made for this test by a
    /// CA of its own (`127.0.0.1` and `localhost`), that requires a client certificate
    /// signed by that CA.
    pub async fn start_with_tls() -> Self {
        Self::start_with(true).await
    }

    async fn start_with(tls: bool) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("offload-rabbit-")
            .tempdir()
            .expect("create broker data directory");
        let port = free_port();
        let dist_port = free_port();
        let node = format!("offload-test-{port}@localhost");
        let mut config = format!("listeners.tcp.local = 127.0.0.1:{port}\n");
        let tls = tls.then(|| {
            let listener = crate::tls::write_certificates(dir.path(), free_port());
            let file = |name: &str| dir.path().join(name).display().to_string();
            let _ = write!(
                config,
                "listeners.ssl.local = 127.0.0.1:{}\n\
                 ssl_options.cacertfile = {}\n\
                 ssl_options.certfile = {}\n\
                 ssl_options.keyfile = {}\n\
                 ssl_options.verify = verify_peer\n\
                 ssl_options.fail_if_no_peer_cert = true\n",
                listener.port,
                file("ca.pem"),
                file("server.pem"),
                file("server.key"),
            );
            listener
        });
        write_node_files(dir.path(), &config);
        let mut broker = Self {
            dir,
            node,
            port,
            dist_port,
            tls,
            server: None,
            placement: None,
        };
        // A fresh node can fail to boot for reasons of the machine's, not of the test's (a
        // port taken between choosing it and binding it): one more try, on new ports.
        if let Err(first) = broker.try_start().await {
            eprintln!("the private RabbitMQ node did not start ({first}); trying new ports");
            broker.kill_server();
            broker.port = free_port();
            broker.dist_port = free_port();
            broker.node = format!("offload-test-{}@localhost", broker.port);
            let config = std::fs::read_to_string(broker.path().join("rabbitmq.conf"))
                .expect("read rabbitmq.conf")
                .replace(
                    &format!("127.0.0.1:{port}\n"),
                    &format!("127.0.0.1:{}\n", broker.port),
                );
            std::fs::write(broker.path().join("rabbitmq.conf"), config)
                .expect("write rabbitmq.conf");
            if let Err(second) = broker.try_start().await {
                panic!("the private RabbitMQ node did not start, twice: {second}");
            }
        }
        broker
    }

    /// A node of a cluster, in its own network namespace with the standard ports and
    /// `config` as its `rabbitmq.conf`; spawned, not waited for (the nodes of a cluster must
    /// boot together to find each other): call [`PrivateBroker::ready`].
    pub(crate) fn spawn_placed(placement: Placement, config: &str) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("offload-rabbit-")
            .tempdir()
            .expect("create broker data directory");
        // Debian's /etc/rabbitmq/rabbitmq-env.conf binds epmd and the inter-node port to
        // 127.0.0.1; a node that other nodes must reach reads an (empty) one of its own.
        std::fs::write(dir.path().join("rabbitmq-env.conf"), "").expect("write rabbitmq-env.conf");
        write_node_files(dir.path(), config);
        let mut broker = Self {
            dir,
            node: format!("rabbit@{}", placement.host),
            port: 5672,
            dist_port: 25672,
            tls: None,
            server: None,
            placement: Some(placement),
        };
        broker.spawn();
        broker
    }

    /// Waits until a node spawned by [`PrivateBroker::spawn_placed`] accepts connections.
    pub(crate) async fn ready(&mut self) {
        if let Err(why) = self.await_connectable().await {
            panic!(
                "the private RabbitMQ node {} did not start: {why}",
                self.node
            );
        }
    }

    /// A command run in the node's network namespace, if it has one.
    fn command(&self, program: &str) -> Command {
        match &self.placement {
            Some(placement) => {
                let mut command = Command::new("ip");
                command.args(["netns", "exec", &placement.namespace, program]);
                command.env(
                    "RABBITMQ_CONF_ENV_FILE",
                    self.path().join("rabbitmq-env.conf"),
                );
                command
            }
            None => Command::new(program),
        }
    }

    pub(crate) fn kill_server(&mut self) {
        if let Some(mut server) = self.server.take() {
            let _ = server.kill();
            let _ = server.wait();
        }
        // rabbitmq-server runs the node as a child: make sure that is gone too.
        if let Some(pid) = self.os_pid() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }

    /// The last lines of the node's log, to say why it did not start.
    fn log_tail(&self) -> String {
        let lines = self.log_lines(|_| true);
        if lines.is_empty() {
            return "no log written".into();
        }
        let start = lines.len().saturating_sub(15);
        lines[start..].join("\n")
    }

    /// The lines of the node's log files that `keep` keeps, in file order.
    pub(crate) fn log_lines(&self, keep: impl Fn(&str) -> bool) -> Vec<String> {
        let Ok(entries) = std::fs::read_dir(self.path().join("log")) else {
            return Vec::new();
        };
        let mut lines = Vec::new();
        for entry in entries.flatten() {
            if let Ok(text) = std::fs::read_to_string(entry.path()) {
                lines.extend(text.lines().filter(|line| keep(line)).map(str::to_owned));
            }
        }
        lines
    }

    /// `amqp://guest:guest@127.0.0.1:<port>/%2f`, or the node's own address in a cluster.
    pub fn url(&self) -> String {
        format!("amqp://guest:guest@{}/%2f", self.addr())
    }

    /// The node's AMQP address, for a proxy in front of it.
    pub fn addr(&self) -> std::net::SocketAddr {
        let ip = self
            .placement
            .as_ref()
            .map_or(std::net::Ipv4Addr::LOCALHOST, |placement| placement.ip);
        (ip, self.port).into()
    }

    /// The TLS listener, for a node started with [`PrivateBroker::start_with_tls`].
    pub fn tls(&self) -> Option<&TlsListener> {
        self.tls.as_ref()
    }

    /// The node's AMQP port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The node's Erlang name.
    pub fn node(&self) -> &str {
        &self.node
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Starts the node (again), on the same data, and waits until it accepts connections.
    pub async fn start_again(&mut self) {
        if let Err(why) = self.try_start().await {
            panic!("the private RabbitMQ node did not start again: {why}");
        }
    }

    /// Starts the node and waits until it accepts connections, at most a minute; else why
    /// not, with the end of its log.
    async fn try_start(&mut self) -> Result<(), String> {
        self.spawn();
        self.await_connectable().await
    }

    /// Launches `rabbitmq-server` for this node, as the `rabbitmq` user.
    fn spawn(&mut self) {
        let dir = self.path().to_path_buf();
        let server = self
            .command("runuser")
            .args(["-u", RABBITMQ_USER, "--", "rabbitmq-server"])
            .env("HOME", RABBITMQ_HOME)
            .env("RABBITMQ_NODENAME", &self.node)
            .env("RABBITMQ_NODE_PORT", self.port.to_string())
            .env("RABBITMQ_DIST_PORT", self.dist_port.to_string())
            .env("RABBITMQ_BASE", &dir)
            .env("RABBITMQ_MNESIA_BASE", dir.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", dir.join("log"))
            .env("RABBITMQ_CONFIG_FILE", dir.join("rabbitmq.conf"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", dir.join("enabled_plugins"))
            .env("RABBITMQ_PID_FILE", dir.join("pid"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start rabbitmq-server (is RabbitMQ installed?)");
        self.server = Some(server);
    }

    /// Waits until the node accepts AMQP connections, at most a minute; else why not, with
    /// the end of its log.
    async fn await_connectable(&mut self) -> Result<(), String> {
        let url = self.url();
        let give_up = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            // Bounded: a node that accepts the TCP connection but never answers the
            // handshake (still booting, or waiting for its peers) would hold it forever.
            let attempt = tokio::time::timeout(
                Duration::from_secs(5),
                lapin::Connection::connect(&url, lapin::ConnectionProperties::default()),
            )
            .await
            .unwrap_or_else(|_| {
                Err(lapin::Error::from(std::io::Error::from(
                    std::io::ErrorKind::TimedOut,
                )))
            });
            match attempt {
                Ok(connection) => {
                    let close = connection.close(200, "ready".into());
                    let _ = tokio::time::timeout(Duration::from_secs(5), close).await;
                    return Ok(());
                }
                Err(error) => {
                    let exited = self
                        .server
                        .as_mut()
                        .and_then(|server| server.try_wait().ok().flatten());
                    if let Some(status) = exited {
                        return Err(format!(
                            "rabbitmq-server exited ({status}); its log ends:\n{}",
                            self.log_tail()
                        ));
                    }
                    if tokio::time::Instant::now() >= give_up {
                        return Err(format!(
                            "no AMQP connection within 60 s ({error}); its log ends:\n{}",
                            self.log_tail()
                        ));
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until the node has written its Raft metadata to disk since the last Raft server
    /// was made: its quorum queues' (Ra system `quorum`), and the stream coordinator's, which
    /// runs the events and control streams (Ra system `coordination`). Call it once every
    /// queue and stream of the test is made.
    ///
    /// RabbitMQ 3.10 writes that metadata (term, vote, last applied index) a few seconds
    /// after the fact: measured here, a queue made at t has its name in `names.dets` at t +
    /// 1 s and its metadata in `meta.dets` at t + 5 s. A quorum queue killed (`kill -9`) in
    /// that window comes back without a leader and never confirms a publish again (offload
    /// answers 503, never 202) until an operator deletes and re-creates it. A node killed
    /// seconds after its first streams were made was seen to keep the events stream "down or
    /// inaccessible" for over a minute after it came back; the stream coordinator's metadata,
    /// written the same way, is the suspect (not measured as the queues' was). Crash tests
    /// wait for both, so they model queues that have been alive for a moment rather than
    /// that broker defect. When a server was made is when its directory's `config` was
    /// written. See docs/RELIABILITY.md.
    pub async fn await_raft_metadata_synced(&self) {
        let system = |name: &str| {
            self.path()
                .join("mnesia")
                .join(&self.node)
                .join(name)
                .join(&self.node)
        };
        let (quorum, coordination) = (system("quorum"), system("coordination"));
        eventually(
            Duration::from_secs(30),
            "RabbitMQ to sync its Raft metadata",
            || {
                // Every test makes quorum queues; a stream only with events or cancels on.
                let synced = synced_since(&quorum).unwrap_or(false)
                    && synced_since(&coordination).unwrap_or(true);
                async move { synced.then_some(()) }
            },
        )
        .await;
    }

    /// Runs `rabbitmqctl -n <node> <args>`; true on success.
    pub fn ctl(&self, args: &[&str]) -> bool {
        self.command("rabbitmqctl")
            .args(["-n", &self.node])
            .args(args)
            .env("HOME", RABBITMQ_HOME)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|status| status.success())
    }

    /// Runs RabbitMQ's `program` (`rabbitmqctl`, `rabbitmq-queues`) against this node with
    /// `args`; its standard output on success. Run on a blocking thread: a node cut off from
    /// its peers can keep a command waiting for seconds.
    pub async fn tool_output(&self, program: &str, args: &[&str]) -> Option<String> {
        let mut command = self.command(program);
        command
            .args(["-n", &self.node])
            .args(args)
            .env("HOME", RABBITMQ_HOME)
            .stdin(Stdio::null())
            .stderr(Stdio::null());
        let output = tokio::task::spawn_blocking(move || command.output())
            .await
            .ok()?
            .ok()?;
        output
            .status
            .success()
            .then(|| String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// The node's OS process id, from its pid file.
    pub fn os_pid(&self) -> Option<i32> {
        std::fs::read_to_string(self.pid_file())
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    fn pid_file(&self) -> PathBuf {
        self.path().join("pid")
    }
}

impl Drop for PrivateBroker {
    fn drop(&mut self) {
        if self.server.is_some() {
            // A paused node cannot be stopped politely.
            if let Some(pid) = self.os_pid() {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGCONT,
                );
            }
            if !self.ctl(&["stop"])
                && let Some(pid) = self.os_pid()
            {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            if let Some(mut server) = self.server.take() {
                let _ = server.wait();
            }
        }
    }
}

/// Whether the Ra system in `dir` wrote its metadata (`meta.dets` and `names.dets`) after its
/// newest server was made; `None` when it has no server yet.
fn synced_since(dir: &Path) -> Option<bool> {
    let modified = |file: &Path| std::fs::metadata(file).and_then(|m| m.modified());
    let last_made = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(|entry| modified(&entry.ok()?.path().join("config")).ok())
        .max()?;
    Some(
        ["meta.dets", "names.dets"]
            .iter()
            .all(|file| modified(&dir.join(file)).is_ok_and(|at| at > last_made)),
    )
}
