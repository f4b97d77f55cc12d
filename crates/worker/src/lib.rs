//! The offload worker as a library: consume tasks from the work queue with fair dispatch and
//! manual acks, run each with the [`Handler`] registered for its kind, drain on shutdown.
//!
//! The `offload-worker` binary runs [`main`] with the built-in [`handlers`]. To run your own
//! kinds, write a binary that registers them (`examples/rust-worker` is one, whole); it takes
//! the same flags and environment, HTTP targets and span export included:
//!
//! ```no_run
//! # async fn example() -> std::process::ExitCode {
//! # struct MyHandler;
//! # impl offload_worker::Handler for MyHandler {
//! #     const KIND: &'static str = "mine";
//! #     type Payload = serde_json::Value;
//! #     type Output = ();
//! #     async fn handle(&self, _: offload_worker::Task) -> Result<(), offload_worker::HandlerError> { Ok(()) }
//! # }
//! use clap::Parser;
//! let config = offload_worker::Config::parse();
//! let registry = offload_worker::handlers::builtin(&config).register(MyHandler);
//! offload_worker::main(config, registry).await
//! # }
//! ```
//!
//! [`run`] is the same without the logging set-up, with a shutdown signal of your choosing.

mod acks;
mod config;
mod consumer;
mod handler;
pub mod handlers;
mod metrics;
mod retry;
mod targets;

pub use config::{
    Config, DEFAULT_HANDLER_TIMEOUT, DEFAULT_PREFETCH, DEFAULT_SHUTDOWN_GRACE,
    DEFAULT_SLEEP_MAX_UNITS, DEFAULT_SLEEP_UNIT,
};
pub use consumer::{TASK_LOG, WorkerError, run};
pub use handler::{BoxError, Handler, HandlerError, Registry, Task};
pub use offload_common::shutdown::signal as shutdown_signal;
pub use retry::RetryPolicy;
pub use targets::{DEFAULT_TARGET_TIMEOUT, SigningSecret, TargetArgs, TargetsError};

/// What `offload-worker`'s `main` does: sets up logging (and span export, with
/// `OTEL_EXPORTER_OTLP_ENDPOINT`), runs `registry` until SIGTERM or SIGINT, sends the last
/// spans, and says how it went as an exit code. Call it from within the tokio runtime.
pub async fn main(config: Config, registry: Registry) -> std::process::ExitCode {
    let Ok(telemetry) = config.log.init("offload-worker") else {
        return std::process::ExitCode::FAILURE;
    };
    let ran = run(config, registry, shutdown_signal()).await;
    if let Err(error) = &ran {
        tracing::error!("{error}");
    }
    telemetry.shutdown().await;
    if ran.is_ok() {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::FAILURE
    }
}
