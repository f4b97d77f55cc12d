//! `offload-api`: the HTTP gateway. Parses settings, sets up logging, runs until SIGTERM/SIGINT.

use std::process::ExitCode;

use clap::Parser;
use offload_api::{Application, Config};

#[tokio::main]
async fn main() -> ExitCode {
    let config = Config::parse();
    config.log.init();
    let app = match Application::build(config).await {
        Ok(app) => app,
        Err(error) => {
            tracing::error!("{error}");
            return ExitCode::FAILURE;
        }
    };
    match app
        .run_until_stopped(offload_common::shutdown::signal())
        .await
    {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("{error}");
            ExitCode::FAILURE
        }
    }
}
