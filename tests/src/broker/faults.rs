//! The faults a test does to its private node: a graceful stop, `kill -9`, a freeze, a memory
//! alarm, the application stopped under its clients, its data thrown away.

use super::PrivateBroker;

impl PrivateBroker {
    /// Throws away the stopped node's data (queues, exchanges, bindings, users), as a
    /// broker replaced by a new one with an empty disk.
    pub fn wipe_data(&self) {
        assert!(
            self.server.is_none(),
            "the node's data is wiped only while it is stopped"
        );
        let mnesia = self.path().join("mnesia");
        if mnesia.exists() {
            std::fs::remove_dir_all(&mnesia).expect("remove the node's data directory");
        }
    }

    /// Stops the node gracefully (`rabbitmqctl stop`) and waits until it is gone.
    pub async fn stop(&mut self) {
        // On a blocking thread: stopping a node of a cluster takes seconds.
        let stopped = self.tool_output("rabbitmqctl", &["stop"]).await;
        assert!(stopped.is_some(), "rabbitmqctl stop succeeded");
        if let Some(mut server) = self.server.take() {
            let _ = tokio::task::spawn_blocking(move || server.wait()).await;
        }
    }

    /// Kills the node with SIGKILL, as a crash or an OOM kill would, and waits until it is gone.
    pub async fn kill9(&mut self) {
        self.signal(nix::sys::signal::Signal::SIGKILL);
        if let Some(mut server) = self.server.take() {
            let _ = tokio::task::spawn_blocking(move || server.wait()).await;
        }
    }

    /// Freezes the node (SIGSTOP): sockets stay open, nothing answers.
    pub fn pause(&self) {
        self.signal(nix::sys::signal::Signal::SIGSTOP);
    }

    /// Thaws a paused node (SIGCONT).
    pub fn resume(&self) {
        self.signal(nix::sys::signal::Signal::SIGCONT);
    }

    /// Raises (`true`) or clears the memory alarm, by moving the memory high watermark below
    /// or back above what the node uses.
    pub fn memory_alarm(&self, raised: bool) {
        let watermark = if raised { "0.000001" } else { "0.4" };
        assert!(
            self.ctl(&["set_vm_memory_high_watermark", watermark]),
            "rabbitmqctl set_vm_memory_high_watermark {watermark}"
        );
    }

    /// Stops the application but not the Erlang node (`rabbitmqctl stop_app`): every client
    /// connection is closed by the broker.
    pub fn stop_app(&self) {
        assert!(self.ctl(&["stop_app"]), "rabbitmqctl stop_app");
    }

    /// Starts the application again (`rabbitmqctl start_app`), waiting until it is up.
    pub fn start_app(&self) {
        assert!(self.ctl(&["start_app"]), "rabbitmqctl start_app");
    }

    fn signal(&self, signal: nix::sys::signal::Signal) {
        let pid = self.os_pid().expect("the node wrote its pid file");
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal)
            .unwrap_or_else(|error| panic!("send {signal} to the broker: {error}"));
    }
}
