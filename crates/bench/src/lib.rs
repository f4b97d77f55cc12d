//! offload's benchmark: every figure is measured beside a ceiling taken in the same run, on
//! the same broker, and reported as a ratio, because absolute figures on a shared 2-core
//! machine say little. Run it with `cargo bench -p offload-bench`; never as a timed test.
//!
//! - [`broker`]: bench queues, raw lapin publishing (the publish ceiling) and consuming (the
//!   drain ceiling);
//! - [`process`]: the gateway and a worker as child processes, their peak memory, the
//!   worker's log read as it is written;
//! - [`http`]: `POST /tasks` closed-loop (throughput) and open-loop (latency at a rate);
//! - [`slow`]: hostile clients (never-ending heads and bodies) for the memory bound;
//! - [`stats`]: percentiles and the report;
//! - [`target`]: an HTTP target that answers at once, for HTTP-target tasks.

pub mod broker;
pub mod http;
pub mod process;
pub mod slow;
pub mod stats;
pub mod target;

/// The broker the benchmark uses: `AMQP_URL`, or the local default.
pub fn amqp_url() -> String {
    std::env::var("AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("bind an ephemeral port")
        .port()
}
