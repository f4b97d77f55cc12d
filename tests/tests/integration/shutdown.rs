//! Graceful shutdown of a worker.

use std::time::Duration;

use offload_tests::{TestGateway, TestQueue, WorkerOptions, WorkerProcess, amqp_url, eventually};

/// SIGTERM (what `docker stop` sends) in the middle of a task: the worker finishes it, acks
/// it, closes cleanly and exits 0; nothing is left on the queue to run twice.
#[tokio::test]
async fn sigterm_lets_the_task_in_hand_finish_and_exits_zero() {
    let url = amqp_url();
    let queue = TestQueue::declare(&url, "sigterm", 5).await;
    let options = WorkerOptions {
        sleep_unit: "50ms",
        ..WorkerOptions::default()
    };
    let mut worker = WorkerProcess::start(&url, queue.name(), &options).await;
    let gateway = TestGateway::start(&url, queue.name()).await;

    let id = gateway.submit_sleep(&".".repeat(20)).await;
    eventually(
        Duration::from_secs(30),
        "the worker to start the task",
        || async { worker.started().contains(&id).then_some(()) },
    )
    .await;
    worker.terminate();
    let status = worker.wait_exit(Duration::from_secs(30)).await;
    worker.sync().await;

    assert!(status.success(), "worker exited with {status}");
    assert!(
        worker.completed().contains(&id),
        "the task in hand finished"
    );
    // The connection is closed: an unacked task would be back on the queue by now.
    assert_eq!(queue.ready().await, 0, "the task was acked, not requeued");
    assert_eq!(queue.dead().await, 0);
    gateway.stop().await;
}

/// A task that cannot finish within the grace period goes back to the queue; the worker still
/// exits 0 on time.
#[tokio::test]
async fn a_task_outlasting_the_grace_period_goes_back_to_the_queue() {
    let url = amqp_url();
    let queue = TestQueue::declare(&url, "grace", 5).await;
    let options = WorkerOptions {
        sleep_unit: "1s",
        shutdown_grace: "200ms",
        ..WorkerOptions::default()
    };
    let mut worker = WorkerProcess::start(&url, queue.name(), &options).await;
    let gateway = TestGateway::start(&url, queue.name()).await;

    let id = gateway.submit_sleep(&".".repeat(120)).await;
    eventually(
        Duration::from_secs(30),
        "the worker to start the task",
        || async { worker.started().contains(&id).then_some(()) },
    )
    .await;
    worker.terminate();
    let status = worker.wait_exit(Duration::from_secs(30)).await;
    worker.sync().await;

    assert!(status.success(), "worker exited with {status}");
    assert!(!worker.completed().contains(&id));
    eventually(
        Duration::from_secs(10),
        "the task to be back on the queue",
        || async { (queue.ready().await == 1).then_some(()) },
    )
    .await;
    gateway.stop().await;
}
