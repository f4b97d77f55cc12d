//! The offload worker as a library: consume tasks from the work queue with fair dispatch and
//! manual acks, run each with the [`Handler`] registered for its kind, drain on shutdown.
//!
//! The `offload-worker` binary runs [`run`] with the built-in [`handlers`]. To run your own
//! kinds, write a binary that registers them (`examples/rust-worker` is one, whole); it takes
//! the same flags and environment, HTTP targets included:
//!
//! ```no_run
//! # async fn example() -> Result<(), offload_worker::WorkerError> {
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
//! offload_worker::run(config, registry, offload_worker::shutdown_signal()).await
//! # }
//! ```

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
