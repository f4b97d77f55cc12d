//! The gateway and a worker as child processes, as they run in production.

use std::{
    path::Path,
    process::{Child, Command, Stdio},
    sync::OnceLock,
    time::{Duration, Instant},
};

use offload_tests::GatewayProcess;

/// A process the benchmark measures, killed when dropped: a gateway started by the harness
/// the tests and the campaign use, or a worker or another server started here.
pub enum Process {
    /// The gateway ([`GatewayProcess`] kills it when dropped).
    Gateway(GatewayProcess),
    /// A worker, or a server of [`start_server`]'s.
    Child(Child),
}

impl Process {
    fn pid(&self) -> u32 {
        match self {
            Self::Gateway(gateway) => gateway.pid(),
            Self::Child(child) => child.id(),
        }
    }

    /// Its peak resident memory so far, in bytes (`VmHWM`).
    pub fn peak_rss(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).ok()?;
        let line = status.lines().find(|line| line.starts_with("VmHWM:"))?;
        let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib * 1024)
    }

    /// The CPU time it has used so far, user and system ([`cpu_time_of`]).
    pub fn cpu_time(&self) -> Option<Duration> {
        cpu_time_of(&self.pid().to_string())
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if let Self::Child(child) = self {
            let _ = child.kill();
            let _ = child.wait();
        }
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
/// `/health` answers 200: as the tests start one ([`GatewayProcess::start_binary`]), logging
/// at the shipped default level, `info`.
pub async fn start_gateway(
    binary: &Path,
    url: &str,
    queue: &str,
    port: u16,
    env: &[(&str, &str)],
) -> Process {
    let env: Vec<(&str, String)> = [("AMQP_URL", url), ("QUEUE", queue), ("RUST_LOG", "info")]
        .into_iter()
        .chain(env.iter().copied())
        .map(|(name, value)| (name, value.to_owned()))
        .collect();
    Process::Gateway(GatewayProcess::start_binary(binary, port, &env).await)
}

/// Starts `command`, a server the benchmark loads beside the gateway (`http-floor`, the
/// Express stack), and waits until `GET /health` on `port` answers (at most ten seconds).
pub async fn start_server(mut command: Command, port: u16) -> std::io::Result<Process> {
    let child = command.stdout(Stdio::null()).spawn()?;
    let process = Process::Child(child);
    let health = format!("http://127.0.0.1:{port}/health");
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if reqwest::get(&health)
            .await
            .is_ok_and(|answer| answer.status().is_success())
        {
            return Ok(process);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Err(std::io::Error::other(format!(
        "{} did not answer /health within 10 s",
        command.get_program().display()
    )))
}

/// A worker process, watched through its `/metrics` (`HTTP_BIND`), as an operator would:
/// whether it consumes, and how many tasks it has finished.
pub struct Worker {
    process: Process,
    metrics: String,
    client: reqwest::Client,
    /// When it was first seen consuming.
    consuming: OnceLock<Instant>,
}

/// Starts the worker binary with `prefetch`, lifecycle events on or off and `env` on top.
pub fn start_worker(
    binary: &Path,
    url: &str,
    queue: &str,
    (prefetch, events): (u16, bool),
    env: &[(&str, &str)],
) -> Worker {
    let port = crate::free_port();
    let mut child = Command::new(binary)
        .env("AMQP_URL", url)
        .env("QUEUE", queue)
        .env("PREFETCH", prefetch.to_string())
        .env("EVENTS", if events { "on" } else { "off" })
        .env("HTTP_BIND", format!("127.0.0.1:{port}"))
        .env("LOG_FORMAT", "json")
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start the worker binary");
    // Its log goes down a pipe, as under a container engine, and is read and thrown away: a
    // log to /dev/null would cost the worker less than it does in production.
    let mut stdout = child.stdout.take().expect("stdout is piped");
    std::thread::spawn(move || std::io::copy(&mut stdout, &mut std::io::sink()));
    Worker {
        process: Process::Child(child),
        metrics: format!("http://127.0.0.1:{port}/metrics"),
        client: reqwest::Client::new(),
        consuming: OnceLock::new(),
    }
}

/// What one read of a worker's `/metrics` says.
struct Sample {
    /// Whether any of its kinds is consuming.
    consuming: bool,
    /// Tasks that succeeded, every kind.
    succeeded: u64,
}

impl Sample {
    fn parse(text: &str) -> Self {
        let mut sample = Self {
            consuming: false,
            succeeded: 0,
        };
        for line in text.lines() {
            let value = |name: &str| {
                let rest = line.strip_prefix(name)?.strip_prefix('{')?;
                rest.rsplit_once(' ')?.1.parse::<u64>().ok()
            };
            if let Some(n) = value("offload_worker_tasks_succeeded_total") {
                sample.succeeded += n;
            } else if let Some(n) = value("offload_worker_kind_consuming") {
                sample.consuming |= n > 0;
            }
        }
        sample
    }
}

/// A drain, as [`Worker::drained_with_cpu`] measured it.
#[derive(Debug, Clone, Copy)]
pub struct Drained {
    /// From the worker's first subscription to its last task done; `None` past the deadline.
    pub took: Option<Duration>,
    /// The CPU time the worker spent before it subscribed.
    pub cpu_before: Duration,
    /// The CPU time it spent from then on.
    pub cpu: Duration,
}

impl Drained {
    /// Tasks per second, 0 when it did not finish.
    pub fn rate(&self, tasks: u64) -> f64 {
        self.took
            .map_or(0.0, |took| crate::broker::per_second(tasks, took))
    }

    /// The worker's CPU per task over the drain, in microseconds.
    pub fn cpu_micros_per_task(&self, tasks: u64) -> f64 {
        #[allow(clippy::cast_precision_loss)] // task counts are far below 2^52
        let tasks = tasks.max(1) as f64;
        self.cpu.as_secs_f64() * 1e6 / tasks
    }
}

impl Worker {
    /// Its peak resident memory so far, in bytes.
    pub fn peak_rss(&self) -> Option<u64> {
        self.process.peak_rss()
    }

    /// The CPU time it has used so far, user and system.
    pub fn cpu_time(&self) -> Option<Duration> {
        self.process.cpu_time()
    }

    async fn sample(&self) -> Option<Sample> {
        let response = self.client.get(&self.metrics).send().await.ok()?;
        Some(Sample::parse(&response.text().await.ok()?))
    }

    /// Waits until the worker consumes (the first of its kinds' subscriptions); when it began
    /// to: halfway between the last read that said it did not and the first that said it did,
    /// read every 2 ms.
    pub async fn consuming(&self, deadline: Duration) -> Option<Instant> {
        let give_up = Instant::now() + deadline;
        let mut before = Instant::now();
        while self.consuming.get().is_none() {
            if self.sample().await.is_some_and(|sample| sample.consuming) {
                let _ = self.consuming.set(halfway(before, Instant::now()));
            } else if Instant::now() > give_up {
                return None;
            } else {
                before = Instant::now();
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
        self.consuming.get().copied()
    }

    /// [`Self::drained`], with the CPU time the worker spent before its first subscription
    /// (its start, reading the control stream) and after it, over the drain.
    pub async fn drained_with_cpu(&self, count: u64, deadline: Duration) -> Drained {
        let before = match self.consuming(deadline).await {
            Some(_) => self.cpu_time().unwrap_or_default(),
            None => Duration::ZERO,
        };
        let took = self.drained(count, deadline).await;
        let during = self.cpu_time().unwrap_or_default().saturating_sub(before);
        Drained {
            took,
            cpu_before: before,
            cpu: during,
        }
    }

    /// Waits until the worker has completed `count` tasks; returns the time from its
    /// subscription to when the last was done (halfway between the last read that said it
    /// was not and the first that said it was). It is asked less often while far from done,
    /// so that the asking costs the worker little (a read of `/metrics` is some tens of
    /// microseconds): at most every 50 ms, and every 2 ms near the end.
    pub async fn drained(&self, count: u64, deadline: Duration) -> Option<Duration> {
        let since = self.consuming(deadline).await?;
        let give_up = Instant::now() + deadline;
        let mut before = since;
        loop {
            let done = self.sample().await.map_or(0, |sample| sample.succeeded);
            if done >= count {
                return Some(halfway(before, Instant::now()).saturating_duration_since(since));
            }
            if Instant::now() > give_up {
                return None;
            }
            before = Instant::now();
            // A quarter of what is left at the rate so far.
            #[allow(clippy::cast_precision_loss)] // task counts are far below 2^52
            let left = if done == 0 {
                Duration::from_millis(10)
            } else {
                since
                    .elapsed()
                    .mul_f64((count - done) as f64 / done as f64 / 4.0)
            };
            let wait = left.clamp(Duration::from_millis(2), Duration::from_millis(50));
            tokio::time::sleep(wait).await;
        }
    }
}

/// The instant halfway between `earlier` and `later`.
fn halfway(earlier: Instant, later: Instant) -> Instant {
    earlier + later.saturating_duration_since(earlier) / 2
}

#[cfg(test)]
mod tests {
    use super::Sample;

    #[test]
    fn a_sample_sums_kinds_and_sees_any_consuming() {
        let text = "# HELP offload_worker_tasks_succeeded Tasks that succeeded, by kind\n\
            # TYPE offload_worker_tasks_succeeded counter\n\
            offload_worker_tasks_succeeded_total{kind=\"a\"} 3\n\
            offload_worker_tasks_succeeded_total{kind=\"b\"} 4\n\
            offload_worker_kind_consuming{kind=\"a\"} 0\n\
            offload_worker_kind_consuming{kind=\"b\"} 1\n\
            offload_worker_tasks_started_total{kind=\"a\"} 9\n";
        let sample = Sample::parse(text);
        assert_eq!(sample.succeeded, 7);
        assert!(sample.consuming);
        assert!(!Sample::parse("offload_worker_kind_consuming{kind=\"a\"} 0\n").consuming);
    }
}
