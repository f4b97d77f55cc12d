//! `offload-api`: the HTTP gateway. Parses settings, sets up logging, runs until SIGTERM/SIGINT.

use std::process::ExitCode;

use clap::Parser;
use offload_api::{Application, Config};

#[tokio::main]
async fn main() -> ExitCode {
    let config = Config::parse();
    let Ok(telemetry) = config.log.init("offload-api") else {
        return ExitCode::FAILURE;
    };
    let ran = match Application::build(config).await {
        Ok(app) => {
            app.run_until_stopped(offload_common::shutdown::signal())
                .await
        }
        Err(error) => Err(error),
    };
    if let Err(error) = &ran {
        tracing::error!("{error}");
    }
    telemetry.shutdown().await;
    if ran.is_ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
