//! Message acknowledgment: a task whose worker dies is redelivered and completes.

use std::time::Duration;

use offload_tests::{TestGateway, TestQueue, WorkerOptions, WorkerProcess, amqp_url, eventually};

/// Tutorial 2, "Message acknowledgment": SIGKILL the worker in the middle of a task; because
/// it had not acked, the broker redelivers the task to the other worker, which completes it.
#[tokio::test]
async fn a_task_whose_worker_is_killed_completes_on_the_other_worker() {
    let url = amqp_url();
    let queue = TestQueue::declare(&url, "ack", 5).await;
    let options = WorkerOptions {
        prefetch: 1,
        sleep_unit: "50ms",
        ..WorkerOptions::default()
    };
    let mut workers = [
        WorkerProcess::start(&url, queue.name(), &options).await,
        WorkerProcess::start(&url, queue.name(), &options).await,
    ];
    let gateway = TestGateway::start(&url, queue.name()).await;

    // 40 units of 50 ms: long enough to be killed in the middle of.
    let id = gateway.submit_sleep(&".".repeat(40)).await;
    let victim = eventually(
        Duration::from_secs(30),
        "a worker to start the task",
        || async { workers.iter().position(|w| w.started().contains(&id)) },
    )
    .await;
    assert!(
        !workers[victim].completed().contains(&id),
        "killed mid-task"
    );
    workers[victim].kill();

    let survivor = &workers[1 - victim];
    eventually(
        Duration::from_secs(30),
        "the survivor to complete the task",
        || async { survivor.completed().contains(&id).then_some(()) },
    )
    .await;
    let start = survivor
        .start_event(id)
        .expect("the survivor's start is on the stream");
    assert_eq!(
        start.attempt,
        Some(2),
        "the broker's redelivery counts as the second attempt: {start:?}"
    );
    eventually(Duration::from_secs(10), "the queue to be empty", || async {
        (queue.ready().await == 0 && queue.dead().await == 0).then_some(())
    })
    .await;
    gateway.stop().await;
}
