//! What a worker's log says about tasks, and how operators can quiet it.

use std::time::Duration;

use offload_tests::{TestGateway, TestQueue, WorkerOptions, WorkerProcess, amqp_url, eventually};
use serde_json::json;

/// `RUST_LOG=info,offload::task=warn` drops the two lines per successful task (the
/// throughput setting, see docs/PERFORMANCE.md) and keeps every failure.
#[tokio::test]
async fn the_task_target_silences_successes_and_keeps_failures() {
    let url = amqp_url();
    let queue = TestQueue::declare(&url, "quiet-log", 5).await;
    let options = WorkerOptions {
        env: vec![("RUST_LOG", "info,offload::task=warn".to_owned())],
        ..WorkerOptions::default()
    };
    let worker = WorkerProcess::start(&url, queue.name(), &options).await;
    let gateway = TestGateway::start(&url, queue.name()).await;

    gateway.submit_sleep("a success.").await;
    // `sleep` refuses a message that is not text: a permanent failure, dead-lettered.
    let failing = gateway
        .post_task(&json!({"kind": "sleep", "payload": {"message": 42}}))
        .await;
    assert_eq!(failing.status(), 202);

    let failure = worker
        .wait_for_message_containing("task failed permanently", Duration::from_secs(30))
        .await;
    assert_eq!(failure["level"], "WARN");
    eventually(Duration::from_secs(10), "both tasks settled", || async {
        (queue.ready().await == 0 && queue.dead().await == 1).then_some(())
    })
    .await;
    let log = worker.log();
    assert!(
        !log.iter()
            .any(|line| line["message"] == "task started" || line["message"] == "task completed"),
        "no per-success lines: {log:?}"
    );
    eventually(
        Duration::from_secs(10),
        "both starts on the stream",
        || async { (worker.started().len() == 2).then_some(()) },
    )
    .await;
    gateway.stop().await;
}
