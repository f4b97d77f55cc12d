//! `offload-worker` as a real child process. What it did to tasks is read from the queue's
//! events stream ([`EventLog`]), as a user would; its JSON log is kept for the tests of the
//! log itself.

use std::{
    io::{BufRead, BufReader},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{Arc, Mutex},
    time::Duration,
};

use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};
use serde_json::Value;
use uuid::Uuid;

use crate::{EventLog, eventually};

/// How a test worker is started.
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    /// `PREFETCH`.
    pub prefetch: u16,
    /// `SLEEP_UNIT`, e.g. `"20ms"`.
    pub sleep_unit: &'static str,
    /// `SHUTDOWN_GRACE`.
    pub shutdown_grace: &'static str,
    /// `DELIVERY_LIMIT`; must match the queue's.
    pub delivery_limit: u32,
    /// Which binary of this package to run.
    pub binary: &'static str,
    /// More environment variables, e.g. `("HEARTBEAT", "2")`.
    pub env: Vec<(&'static str, String)>,
    /// Follow the queue's events stream, for [`WorkerProcess::started`] and the like. The
    /// fault campaign does not: it reads what its workers' handlers recorded
    /// (docs/RELIABILITY.md says why).
    pub follow_events: bool,
}

impl Default for WorkerOptions {
    fn default() -> Self {
        Self {
            prefetch: 1,
            sleep_unit: "20ms",
            shutdown_grace: "25s",
            delivery_limit: 5,
            binary: "offload-worker-under-test",
            env: Vec::new(),
            follow_events: true,
        }
    }
}

/// A running worker process. Killed when dropped.
pub struct WorkerProcess {
    child: Child,
    /// `<host>-<pid>`, as its events name it.
    name: String,
    events: Option<EventLog>,
    log: Arc<Mutex<Vec<Value>>>,
    /// Its `/metrics`, on the `HTTP_BIND` given to it (a free port unless the test sets one).
    metrics: String,
}

impl WorkerProcess {
    /// Starts a worker on `queue` at `url` and waits until it is consuming.
    pub async fn start(url: &str, queue: &str, options: &WorkerOptions) -> Self {
        let bind = options
            .env
            .iter()
            .find(|(key, _)| *key == "HTTP_BIND")
            .map_or_else(
                || format!("127.0.0.1:{}", crate::free_port()),
                |(_, bind)| bind.clone(),
            );
        let mut child = Command::new(crate::binary(options.binary))
            .env("HTTP_BIND", &bind)
            .env("AMQP_URL", url)
            .env("QUEUE", queue)
            .env("PREFETCH", options.prefetch.to_string())
            .env("SLEEP_UNIT", options.sleep_unit)
            .env("SHUTDOWN_GRACE", options.shutdown_grace)
            .env("DELIVERY_LIMIT", options.delivery_limit.to_string())
            // Tests measure work in many short units.
            .env("SLEEP_MAX_UNITS", "100000")
            // A failed attempt is tried again at once (through the delay levels), unless a
            // test sets a backoff of its own.
            .env("RETRY_BASE", "0s")
            .env("LOG_FORMAT", "json")
            .env("RUST_LOG", "info")
            .envs(options.env.iter().map(|(key, value)| (key, value)))
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start offload-worker");
        let stdout = child.stdout.take().expect("stdout is piped");
        let log = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&log);
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let event = serde_json::from_str(&line)
                    .unwrap_or_else(|_| panic!("worker log line is not JSON: {line}"));
                sink.lock().expect("log lock").push(event);
            }
        });
        let name = format!("{}-{}", hostname(), child.id());
        let events = options.follow_events.then(|| EventLog::follow(url, queue));
        let worker = Self {
            child,
            name,
            events,
            log,
            metrics: format!("http://{bind}/metrics"),
        };
        // Its start-up line, not its `worker` event; or its death. A worker that dies on its
        // first task (a test of crashes: it aborts) may never get that event out, nor the
        // log lines of its last 5 ms (they are written together, docs/OPERATIONS.md).
        let mut worker = worker;
        eventually(
            Duration::from_secs(20),
            "worker to log \"consuming\", or to die on its first task",
            || {
                let done = worker.has_exited()
                    || worker
                        .log()
                        .iter()
                        .any(|line| line["message"] == "consuming");
                async move { done.then_some(()) }
            },
        )
        .await;
        worker
    }

    /// `<host>-<pid>`: the worker's name in events.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The OS process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Every line it logged so far, each a JSON object.
    pub fn log(&self) -> Vec<Value> {
        self.log.lock().expect("log lock").clone()
    }

    fn events(&self) -> &EventLog {
        self.events
            .as_ref()
            .expect("this worker was started with follow_events: false")
    }

    /// Ids of the tasks whose attempts this worker started, in order (from its `started`
    /// events).
    pub fn started(&self) -> Vec<Uuid> {
        self.events().started_by(&self.name)
    }

    /// Ids of the tasks whose attempts succeeded on this worker, in order (from its
    /// `succeeded` events).
    pub fn completed(&self) -> Vec<Uuid> {
        self.events().succeeded_on(&self.name)
    }

    /// This worker's `started` event of task `id`, if any.
    pub fn start_event(&self, id: Uuid) -> Option<offload_common::Event> {
        self.events().start_of(id, &self.name)
    }

    /// Returns once every event on its queue's stream now has been read
    /// ([`EventLog::sync`]): before asserting that it did *not* start or finish a task.
    pub async fn sync(&self) {
        self.events().sync().await;
    }

    /// Every event of its queue's stream so far (every worker's and gateway's).
    pub fn queue_events(&self) -> Vec<offload_common::Event> {
        self.events().events()
    }

    /// Waits until the worker logs an event whose message is `message`.
    pub async fn wait_for_message(&self, message: &str, deadline: Duration) -> Value {
        eventually(deadline, &format!("worker to log {message:?}"), || async {
            self.log()
                .into_iter()
                .find(|event| event["message"] == message)
        })
        .await
    }

    /// Waits until the worker logs an event whose message contains `text`.
    pub async fn wait_for_message_containing(&self, text: &str, deadline: Duration) -> Value {
        eventually(deadline, &format!("worker to log {text:?}"), || async {
            self.log().into_iter().find(|event| {
                event["message"]
                    .as_str()
                    .is_some_and(|message| message.contains(text))
            })
        })
        .await
    }

    /// The value of the series `series` (a metric's name and labels, as its `/metrics` writes
    /// them: `offload_worker_kind_paused{kind="sleep"}`), if it answers and has it.
    pub async fn metric(&self, series: &str) -> Option<f64> {
        let text = reqwest::get(&self.metrics).await.ok()?.text().await.ok()?;
        text.lines()
            .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }

    /// Sends SIGKILL: the process dies at once, acking nothing.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Whether the process has exited (without waiting).
    pub fn has_exited(&mut self) -> bool {
        self.child.try_wait().ok().flatten().is_some()
    }

    /// Sends SIGTERM, as `docker stop` does.
    pub fn terminate(&self) {
        let pid = Pid::from_raw(i32::try_from(self.child.id()).expect("pid fits i32"));
        kill(pid, Signal::SIGTERM).expect("send SIGTERM");
    }

    /// Waits for the process to exit.
    pub async fn wait_exit(&mut self, deadline: Duration) -> ExitStatus {
        let child = &mut self.child;
        eventually(deadline, "worker to exit", || {
            let status = child.try_wait().expect("query child");
            async move { status }
        })
        .await
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A worker running inside the test process, with handlers of the test's own.
pub struct InProcessWorker {
    stop: tokio::sync::oneshot::Sender<()>,
    running: tokio::task::JoinHandle<Result<(), offload_worker::WorkerError>>,
}

impl InProcessWorker {
    /// Starts consuming with `config` and `registry`.
    pub fn start(config: offload_worker::Config, registry: offload_worker::Registry) -> Self {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let running = tokio::spawn(offload_worker::run(config, registry, async {
            let _ = stopped.await;
        }));
        Self { stop, running }
    }

    /// Stops it and asserts that it stopped cleanly.
    pub async fn stop(self) {
        let _ = self.stop.send(());
        self.running
            .await
            .expect("worker task")
            .expect("worker stops cleanly");
    }
}

/// Registers the built-in kinds (`sleep`) for `queue` at `url` the way an operator would
/// before any worker runs: `offload-worker --declare-only`, with `env` on top (say a
/// `DELIVERY_LIMIT` that must match the queue's).
pub fn declare_kinds(url: &str, queue: &str, env: &[(&str, String)]) {
    let output = Command::new(crate::binary("offload-worker-under-test"))
        .arg("--declare-only")
        .env("AMQP_URL", url)
        .env("QUEUE", queue)
        .env("LOG_FORMAT", "json")
        .envs(env.iter().map(|(key, value)| (key, value)))
        .stdin(Stdio::null())
        .output()
        .expect("run offload-worker --declare-only");
    assert!(
        output.status.success(),
        "offload-worker --declare-only failed: {}",
        String::from_utf8_lossy(&output.stdout)
    );
}

/// This machine's name, as a worker reads it for its events.
fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map_or_else(|_| "worker".to_owned(), |name| name.trim().to_owned())
}
