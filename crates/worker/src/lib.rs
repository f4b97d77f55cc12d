//! The offload worker as a library: consume tasks from the work queue with fair dispatch and
//! manual acks, run each with the [`Handler`] registered for its kind, drain on shutdown.
//!
//! The `offload-worker` binary runs [`block_on`] with the built-in [`handlers`]. To run your own
//! kinds, write a binary that registers them (`examples/rust-worker` is one, whole); it takes
//! the same flags and environment, HTTP targets and span export included:
//!
//! ```no_run
//! # fn example() -> std::process::ExitCode {
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
//! offload_worker::block_on(config, registry)
//! # }
//! ```
//!
//! [`main`] is the same within a runtime of your own, and [`run`] is that without the logging
//! set-up, with a shutdown signal of your choosing.

use std::process::ExitCode;

mod acks;
mod attempt;
mod cancels;
mod config;
mod consume;
mod forward;
pub mod handlers;
mod metrics;
mod registry;
mod retry;
mod run;
mod settle;
mod targets;

pub use config::{
    Concurrency, Config, DEFAULT_HANDLER_TIMEOUT, DEFAULT_PREFETCH, DEFAULT_SHUTDOWN_GRACE,
    DEFAULT_SLEEP_MAX_UNITS, DEFAULT_SLEEP_UNIT, DEFAULT_THREADS,
};
pub use offload_common::shutdown::signal as shutdown_signal;
pub use registry::{BoxError, Handler, HandlerError, Registry, Task};
pub use retry::RetryPolicy;
pub use run::{TASK_LOG, WorkerError, run};
pub use targets::{DEFAULT_TARGET_TIMEOUT, SigningSecret, TargetArgs, TargetsError};

/// What `offload-worker`'s `fn main` does: builds the tokio runtime with `config.threads`
/// threads (`THREADS`), and runs [`main`] on it. Call it from a plain `fn main`, outside any
/// runtime.
pub fn block_on(config: Config, registry: Registry) -> ExitCode {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(usize::from(config.threads))
        .thread_name("offload-worker")
        .enable_all()
        .build();
    match runtime {
        Ok(runtime) => runtime.block_on(main(config, registry)),
        Err(error) => {
            eprintln!("offload-worker: cannot start its runtime: {error}");
            ExitCode::FAILURE
        }
    }
}

/// Sets up logging (and span export, with `OTEL_EXPORTER_OTLP_ENDPOINT`), runs `registry`
/// until SIGTERM or SIGINT, sends the last spans, and says how it went as an exit code. Call
/// it from within a tokio runtime: [`block_on`] builds the one `THREADS` asks for.
pub async fn main(config: Config, registry: Registry) -> ExitCode {
    let Ok(telemetry) = config.log.init("offload-worker") else {
        return ExitCode::FAILURE;
    };
    // On one of the runtime's own threads, not on the thread blocked in `block_on`: each
    // delivery's task then starts on the thread that received it, instead of being handed
    // across threads (docs/PERFORMANCE.md).
    let ran = match tokio::spawn(run(config, registry, shutdown_signal())).await {
        Ok(ran) => ran,
        Err(error) => match error.try_into_panic() {
            Ok(panic) => std::panic::resume_unwind(panic),
            // Cancelled: only when the runtime shuts down under it.
            Err(_) => return ExitCode::FAILURE,
        },
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
