//! Handlers written in Rust: a payload that does not fit the handler's type, and
//! `examples/rust-worker`, a crate of its own on the worker library.

use std::time::Duration;

use offload_tests::{
    InProcessWorker, TestGateway, TestQueue, WorkerOptions, WorkerProcess, amqp_url,
};
use serde_json::json;

const DEADLINE: Duration = Duration::from_secs(60);

/// A Rust handler's payload that does not fit its type is dead at once, with serde's message:
/// `sleep` with a string payload used to report success.
#[tokio::test]
async fn a_payload_that_does_not_fit_the_handlers_type_is_dead_with_serdes_message() {
    let url = amqp_url();
    let queue = TestQueue::declare(&url, "payload-type", 5).await;
    let gateway = TestGateway::start(&url, queue.name()).await;
    let config = offload_worker::Config::new(&url, queue.name());
    let _worker =
        InProcessWorker::start(config.clone(), offload_worker::handlers::builtin(&config));
    for (payload, expected) in [
        (json!("not an object"), "invalid type: string"),
        (json!({"message": 123}), "expected a string"),
    ] {
        let id = gateway
            .submit(&json!({"kind": "sleep", "payload": payload}))
            .await;
        let status = gateway.finished(id, DEADLINE).await;
        assert_eq!(status["status"], "dead", "{status}");
        let error = status["error"].as_str().expect("an error");
        assert!(
            error.contains("does not fit kind 'sleep'") && error.contains(expected),
            "{error}"
        );
    }
    let fine = gateway.submit(&json!({"kind": "sleep"})).await;
    assert_eq!(
        gateway.finished(fine, DEADLINE).await["status"],
        "succeeded"
    );
}

/// `examples/rust-worker`: a crate of its own on the worker library, with its own kind beside
/// the built-in ones, configured like `offload-worker`.
#[tokio::test]
async fn the_rust_worker_example_runs_its_own_kind_beside_the_builtin_ones() {
    let url = amqp_url();
    let queue = TestQueue::declare(&url, "rust-example", 5).await;
    let gateway = TestGateway::start(&url, queue.name()).await;
    let _worker = WorkerProcess::start(
        &url,
        queue.name(),
        &WorkerOptions {
            binary: "rust-worker-example-under-test",
            ..WorkerOptions::default()
        },
    )
    .await;
    let reversed = gateway
        .submit(&json!({"kind": "reverse", "payload": {"text": "stressed"}}))
        .await;
    let misfit = gateway
        .submit(&json!({"kind": "reverse", "payload": {"words": "stressed"}}))
        .await;
    let slept = gateway.submit_sleep("..").await;
    let status = gateway.finished(reversed, DEADLINE).await;
    assert_eq!(
        status["result"],
        json!({"reversed": "desserts"}),
        "{status}"
    );
    let status = gateway.finished(misfit, DEADLINE).await;
    assert_eq!(status["status"], "dead", "{status}");
    assert!(
        status["error"]
            .as_str()
            .is_some_and(|error| error.contains("missing field `text`")),
        "{status}"
    );
    assert_eq!(
        gateway.finished(slept, DEADLINE).await["status"],
        "succeeded"
    );
}
