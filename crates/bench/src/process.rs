//! The gateway and a worker as child processes, as they run in production.

use std::{
    io::{BufRead, BufReader},
    path::Path,
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use uuid::Uuid;

/// A child process, killed when dropped.
pub struct Process {
    child: Child,
}

impl Process {
    /// Its peak resident memory so far, in bytes (`VmHWM`).
    pub fn peak_rss(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).ok()?;
        let line = status.lines().find(|line| line.starts_with("VmHWM:"))?;
        let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib * 1024)
    }

    /// The CPU time it has used so far, user and system ([`cpu_time_of`]).
    pub fn cpu_time(&self) -> Option<Duration> {
        cpu_time_of(&self.child.id().to_string())
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The CPU time process `pid` (or `self`) has used so far, user and system, from
/// `/proc/<pid>/stat` in clock ticks of 10 ms: Linux's `USER_HZ` is 100 on every
/// architecture offload builds for.
pub fn cpu_time_of(pid: &str) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // After the command name, which is in parentheses and may hold spaces.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    // utime and stime are the 14th and 15th fields of the line, 12th and 13th here.
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(Duration::from_millis(ticks * 10))
}

/// Starts the gateway binary on `port`, with `env` on top of the defaults, and waits until
/// `/health` answers 200.
pub async fn start_gateway(
    binary: &Path,
    url: &str,
    queue: &str,
    port: u16,
    env: &[(&str, &str)],
) -> Process {
    let child = Command::new(binary)
        .env("AMQP_URL", url)
        .env("QUEUE", queue)
        .env("BIND", format!("127.0.0.1:{port}"))
        .env("LOG_FORMAT", "json")
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start the gateway binary");
    let process = Process { child };
    let client = reqwest::Client::new();
    let health = format!("http://127.0.0.1:{port}/health");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(response) = client.get(&health).send().await
            && response.status().is_success()
        {
            return process;
        }
        assert!(
            Instant::now() < deadline,
            "the gateway did not become healthy within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// What a worker's log has said so far.
#[derive(Default)]
pub struct WorkerLog {
    /// "task completed" lines.
    pub completed: AtomicU64,
    /// When the worker said it was consuming.
    pub consuming: Mutex<Option<Instant>>,
    /// When the last "task completed" line arrived.
    pub last_completed: Mutex<Option<Instant>>,
    /// (task id, when the worker started it), if asked for.
    pub started: Mutex<Vec<(Uuid, SystemTime)>>,
}

/// Starts the worker binary with `prefetch`, lifecycle events on or off and `env` on top,
/// reading its JSON log as it comes. With `record_starts`, every "task started" line is
/// parsed for its task id and timestamp.
pub fn start_worker(
    binary: &Path,
    url: &str,
    queue: &str,
    (prefetch, events): (u16, bool),
    env: &[(&str, &str)],
    record_starts: bool,
) -> (Process, Arc<WorkerLog>) {
    let mut child = Command::new(binary)
        .env("AMQP_URL", url)
        .env("QUEUE", queue)
        .env("PREFETCH", prefetch.to_string())
        .env("EVENTS", if events { "on" } else { "off" })
        .env("LOG_FORMAT", "json")
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start the worker binary");
    let stdout = child.stdout.take().expect("stdout is piped");
    let log = Arc::new(WorkerLog::default());
    let sink = Arc::clone(&log);
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            // Substring tests first: this thread shares two cores with everything measured.
            if line.contains("\"task completed\"") {
                sink.completed.fetch_add(1, Ordering::Relaxed);
                *sink.last_completed.lock().expect("log lock") = Some(Instant::now());
            } else if record_starts && line.contains("\"task started\"") {
                if let Some(start) = parse_start(&line) {
                    sink.started.lock().expect("log lock").push(start);
                }
            } else if line.contains("\"consuming\"") {
                // The first kind's subscription: a worker of several kinds logs one each.
                sink.consuming
                    .lock()
                    .expect("log lock")
                    .get_or_insert_with(Instant::now);
            }
        }
    });
    (Process { child }, log)
}

fn parse_start(line: &str) -> Option<(Uuid, SystemTime)> {
    let event: serde_json::Value = serde_json::from_str(line).ok()?;
    let id = event["span"]["task_id"].as_str()?.parse().ok()?;
    let at = humantime::parse_rfc3339_weak(event["timestamp"].as_str()?).ok()?;
    Some((id, at))
}

impl WorkerLog {
    /// Waits until the worker has completed `count` tasks; returns the time from its
    /// "consuming" line to the last completion.
    pub async fn drained(&self, count: u64, deadline: Duration) -> Option<Duration> {
        let give_up = Instant::now() + deadline;
        while self.completed.load(Ordering::Relaxed) < count {
            if Instant::now() > give_up {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let consuming = (*self.consuming.lock().expect("log lock"))?;
        let last = (*self.last_completed.lock().expect("log lock"))?;
        Some(last.saturating_duration_since(consuming))
    }
}
