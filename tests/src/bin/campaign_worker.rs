//! `offload-worker` with three more kinds, for the fault campaign and the poison tests:
//! `panic`, whose handler panics on every attempt, `crash`, whose handler takes the whole
//! process down (as an OOM kill or a segfault in native code would), and `flaky`, which fails
//! its first `payload.fail` attempts. Everything else is the shipped worker. `CAMPAIGN_KINDS`
//! (comma-separated), when set, keeps only those of its kinds: a worker of one kind.

use std::process::ExitCode;

use clap::Parser;
use offload_worker::{Config, Handler, HandlerError, Task, handlers};

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

fn main() -> ExitCode {
    let config = Config::parse();
    let all = handlers::builtin(&config)
        .register(Panics)
        .register(Crashes)
        .register(Flaky);
    let registry = match std::env::var("CAMPAIGN_KINDS") {
        Ok(kinds) => all.only(&kinds.split(',').map(str::trim).collect::<Vec<_>>()),
        Err(_) => all,
    };
    offload_worker::block_on(config, registry)
}
