//! A RabbitMQ node of the test's own, to stop and start without touching the shared broker.

use std::{
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use crate::eventually;

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
    server: Option<Child>,
}

impl PrivateBroker {
    /// Starts a fresh node and waits until it accepts AMQP connections.
    ///
    /// Needs `rabbitmq-server` installed and root (to run it as the `rabbitmq` user, which
    /// owns the Erlang cookie).
    pub async fn start() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("offload-rabbit-")
            .tempdir()
            .expect("create broker data directory");
        let port = free_port();
        let dist_port = free_port();
        let node = format!("offload-test-{port}@localhost");
        std::fs::write(
            dir.path().join("rabbitmq.conf"),
            format!("listeners.tcp.local = 127.0.0.1:{port}\n"),
        )
        .expect("write rabbitmq.conf");
        std::fs::write(dir.path().join("enabled_plugins"), "[].\n").expect("write enabled_plugins");
        let status = Command::new("chown")
            .args(["-R", &format!("{RABBITMQ_USER}:")])
            .arg(dir.path())
            .status()
            .expect("run chown");
        assert!(
            status.success(),
            "the durability tests start a private RabbitMQ node as the 'rabbitmq' user and need root to hand it a data directory"
        );
        let mut broker = Self {
            dir,
            node,
            port,
            dist_port,
            server: None,
        };
        broker.start_again().await;
        broker
    }

    /// `amqp://guest:guest@127.0.0.1:<port>/%2f`.
    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
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
        let dir = self.path().to_path_buf();
        let server = Command::new("runuser")
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
        let url = self.url();
        eventually(
            Duration::from_secs(60),
            "the private RabbitMQ node to start",
            || {
                let url = url.clone();
                async move {
                    let connection =
                        lapin::Connection::connect(&url, lapin::ConnectionProperties::default())
                            .await
                            .ok()?;
                    let _ = connection.close(200, "ready".into()).await;
                    Some(())
                }
            },
        )
        .await;
    }

    /// Stops the node gracefully (`rabbitmqctl stop`) and waits until it is gone.
    pub async fn stop(&mut self) {
        let status = self.ctl(&["stop"]);
        assert!(status, "rabbitmqctl stop succeeded");
        if let Some(mut server) = self.server.take() {
            let _ = tokio::task::spawn_blocking(move || server.wait()).await;
        }
    }

    /// Runs `rabbitmqctl -n <node> <args>`; true on success.
    pub fn ctl(&self, args: &[&str]) -> bool {
        Command::new("rabbitmqctl")
            .args(["-n", &self.node])
            .args(args)
            .env("HOME", RABBITMQ_HOME)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|status| status.success())
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

/// A port that was free a moment ago.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("bind an ephemeral port")
        .port()
}
