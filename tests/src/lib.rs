//! Test support for offload's integration tests: everything here starts or inspects real
//! things (a RabbitMQ connection, the gateway on port 0, worker processes, a private RabbitMQ
//! node). Nothing is mocked.

pub mod broker;
pub mod campaign;
pub mod cluster;
pub mod events;
pub mod gateway;
pub mod handlers;
pub mod proxy;
pub mod queue;
pub mod table;
pub mod target;
mod tls;
pub mod wait;
pub mod worker;

pub use broker::{PrivateBroker, TlsListener};
pub use cluster::PrivateCluster;
pub use events::EventLog;
pub use gateway::{GatewayProcess, TestGateway};
pub use proxy::FaultyProxy;
pub use queue::{TEST_KINDS, TestQueue, header_text, publish_confirmed, task_id_of};
pub use target::{Example, ExampleTarget};
pub use wait::{eventually, eventually_ok};
pub use worker::{InProcessWorker, WorkerOptions, WorkerProcess, declare_kinds};

/// The broker the tests use: `AMQP_URL`, or the local default.
pub fn amqp_url() -> String {
    std::env::var("AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// The path of a binary built by this package.
///
/// Cargo builds a package's binaries before running its integration tests, into
/// `target/<profile>/`; test executables run from `target/<profile>/deps/`, other binaries of
/// this package from `target/<profile>/` itself.
pub fn binary(name: &str) -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("path of the running executable");
    exe.ancestors()
        .skip(1)
        .take(2)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
        .unwrap_or_else(|| {
            panic!(
                "{name} is not built next to {}; run the tests with `cargo test --workspace`",
                exe.display()
            )
        })
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("bind an ephemeral port")
        .port()
}

/// Sends the log lines of in-process gateways and workers to the test harness, which shows a
/// test's lines only when it fails. `RUST_LOG` overrides the default level.
pub fn show_logs_of_failed_tests() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let filter = tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,lapin=warn"));
        // Another subscriber may already be set by the test binary; then that one wins.
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_test_writer()
            .try_init();
    });
}

/// Serves `app` on a loopback port in this process (targets, collectors, receivers the tests
/// stand up); `http://<the address>`. It stops with the test's runtime.
pub async fn serve_locally(app: axum::Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind a loopback port");
    let addr = listener
        .local_addr()
        .expect("a bound listener has an address");
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}")
}
