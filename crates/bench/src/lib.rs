//! offload's benchmark: every figure is measured beside a ceiling taken in the same run, on
//! the same broker, and reported as a ratio, because absolute figures on a shared 2-core
//! machine say little. Run it with `cargo bench -p offload-bench`; never as a timed test.
//!
//! - [`broker`]: bench queues (the harness's test queues with the benchmark's kinds), raw
//!   lapin publishing (the publish ceiling) and consuming (the drain ceiling);
//! - [`process`]: the gateway (started by the harness) and a worker as child processes,
//!   their CPU time and peak memory, and the worker's progress read from its `/metrics`;
//! - [`histogram`]: Prometheus histograms read from a process's `/metrics`;
//! - [`http`]: `POST /tasks` closed-loop (throughput) and open-loop (latency at a rate);
//! - [`slow`]: hostile clients (never-ending heads and bodies) for the memory bound;
//! - [`stats`]: percentiles and the report;
//! - [`target`]: an HTTP target that answers at once, for HTTP-target tasks.

pub mod broker;
pub mod histogram;
pub mod http;
pub mod process;
pub mod slow;
pub mod stats;
pub mod target;

/// The broker and ports: the same harness as the tests and the campaign.
pub use offload_tests::{amqp_url, free_port};
