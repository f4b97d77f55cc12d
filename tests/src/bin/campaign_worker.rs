//! `offload-worker` with three more kinds, for the fault campaign and the poison tests:
//! `panic`, whose handler panics on every attempt, `crash`, whose handler takes the whole
//! process down (as an OOM kill or a segfault in native code would), and `flaky`, which fails
//! its first `payload.fail` attempts, beside the shipped worker's `sleep`. `CAMPAIGN_KINDS`
//! (comma-separated), when set, keeps only those of its kinds: a worker of one kind.
//!
//! `CAMPAIGN_RECORD`, when set, names a file every handler appends to, one line per attempt
//! started and per attempt succeeded (`<pid> started <id>`, `<pid> succeeded <id>`): the
//! campaign's witness of the work done, left by the work itself as a user's task leaves its
//! effect, and independent of the worker's log and of the events stream it judges.

use std::{fs::File, io::Write, process::ExitCode, sync::Arc};

use clap::Parser;
use offload_worker::{Config, Handler, HandlerError, RetryPolicy, Task, handlers};
use uuid::Uuid;

/// Panics on every task it is given.
struct Panics;

impl Handler for Panics {
    const KIND: &'static str = "panic";
    type Payload = serde_json::Value;
    type Output = ();

    async fn handle(&self, task: Task) -> Result<(), HandlerError> {
        panic!(
            "poison task {}: this handler panics on every attempt",
            task.id
        );
    }
}

/// Aborts the process on every task it is given.
struct Crashes;

impl Handler for Crashes {
    const KIND: &'static str = "crash";
    type Payload = serde_json::Value;
    type Output = ();

    async fn handle(&self, task: Task) -> Result<(), HandlerError> {
        tracing::error!(task_id = %task.id, "crash task: aborting the worker process");
        std::process::abort();
    }
}

/// Fails the first `payload.fail` attempts of a task, then succeeds: a scripted flaky task.
struct Flaky;

impl Handler for Flaky {
    const KIND: &'static str = "flaky";
    type Payload = serde_json::Value;
    type Output = ();

    async fn handle(&self, task: Task) -> Result<(), HandlerError> {
        let fail = task.payload["fail"].as_u64().unwrap_or(0);
        if u64::from(task.attempt) <= fail {
            return Err(format!("scripted failure {} of {fail}", task.attempt).into());
        }
        Ok(())
    }
}

/// Where the handlers write what they did (`CAMPAIGN_RECORD`).
#[derive(Clone)]
struct Record(Option<Arc<File>>);

impl Record {
    /// Appends `<pid> <what> <id>` in one write: lines of several processes sharing the file
    /// (opened for appending) never interleave. A failed write ends the process, since the
    /// campaign would otherwise count a task done as lost.
    fn write(&self, what: &str, id: Uuid) {
        if let Some(file) = &self.0 {
            let line = format!("{} {what} {id}\n", std::process::id());
            (&**file)
                .write_all(line.as_bytes())
                .expect("append to CAMPAIGN_RECORD");
        }
    }
}

/// `H`, with each attempt's start and success written to the record.
struct Recorded<H>(H, Record);

impl<H: Handler> Handler for Recorded<H> {
    const KIND: &'static str = H::KIND;
    type Payload = H::Payload;
    type Output = H::Output;

    async fn handle(&self, task: Task<H::Payload>) -> Result<H::Output, HandlerError> {
        let id = task.id;
        self.1.write("started", id);
        let outcome = self.0.handle(task).await;
        if outcome.is_ok() {
            self.1.write("succeeded", id);
        }
        outcome
    }

    fn retry_policy(&self) -> Option<RetryPolicy> {
        self.0.retry_policy()
    }
}

fn main() -> ExitCode {
    let config = Config::parse();
    let record = Record(std::env::var_os("CAMPAIGN_RECORD").map(|path| {
        let path = std::path::PathBuf::from(path);
        let file = File::options()
            .create(true)
            .append(true)
            .open(&path)
            .unwrap_or_else(|error| panic!("open CAMPAIGN_RECORD {}: {error}", path.display()));
        Arc::new(file)
    }));
    let sleep = handlers::Sleep::new(config.sleep_unit, config.sleep_max_units);
    let all = offload_worker::Registry::default()
        .register(Recorded(sleep, record.clone()))
        .register(Recorded(Panics, record.clone()))
        .register(Recorded(Crashes, record.clone()))
        .register(Recorded(Flaky, record));
    let registry = match std::env::var("CAMPAIGN_KINDS") {
        Ok(kinds) => all.only(&kinds.split(',').map(str::trim).collect::<Vec<_>>()),
        Err(_) => all,
    };
    offload_worker::block_on(config, registry)
}
