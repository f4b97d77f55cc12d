//! `offload-worker` with one more kind, `panic`, whose handler panics on every attempt: the
//! poison task of the fault campaign. Everything else is the shipped worker.

use std::process::ExitCode;

use clap::Parser;
use offload_worker::{Config, Handler, HandlerError, Task, handlers};

/// Panics on every task it is given.
struct Panics;

impl Handler for Panics {
    const KIND: &'static str = "panic";

    async fn handle(&self, task: Task) -> Result<(), HandlerError> {
        panic!(
            "poison task {}: this handler panics on every attempt",
            task.id
        );
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let config = Config::parse();
    config.log.init();
    let registry = handlers::builtin(&config).register(Panics);
    match offload_worker::run(config, registry, offload_common::shutdown::signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("{error}");
            ExitCode::FAILURE
        }
    }
}
