//! `offload-worker` with two more kinds, for the fault campaign and the poison tests:
//! `panic`, whose handler panics on every attempt, and `crash`, whose handler takes the
//! whole process down (as an OOM kill or a segfault in native code would). Everything else
//! is the shipped worker.

use std::process::ExitCode;

use clap::Parser;
use offload_worker::{Config, Handler, HandlerError, Task, handlers};

/// Panics on every task it is given.
struct Panics;

impl Handler for Panics {
    const KIND: &'static str = "panic";
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
    type Output = ();

    async fn handle(&self, task: Task) -> Result<(), HandlerError> {
        tracing::error!(task_id = %task.id, "crash task: aborting the worker process");
        std::process::abort();
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let config = Config::parse();
    config.log.init();
    let registry = handlers::builtin(&config)
        .register(Panics)
        .register(Crashes);
    match offload_worker::run(config, registry, offload_common::shutdown::signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("{error}");
            ExitCode::FAILURE
        }
    }
}
