//! `offload-worker`: consumes tasks and runs the built-in handlers until SIGTERM/SIGINT.

use std::process::ExitCode;

use clap::Parser;
use offload_worker::{Config, handlers};

#[tokio::main]
async fn main() -> ExitCode {
    let config = Config::parse();
    config.log.init();
    let registry = handlers::builtin(&config);
    match offload_worker::run(config, registry, offload_worker::shutdown_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("{error}");
            ExitCode::FAILURE
        }
    }
}
