//! Round-robin and fair dispatch between workers, and how a worker settles what it is given.

use std::time::Duration;

use offload_tests::{
    TestGateway, TestQueue, WorkerOptions, WorkerProcess, amqp_url, declare_kinds, eventually,
};
use uuid::Uuid;

const DEADLINE: Duration = Duration::from_secs(30);

async fn wait_all_completed(workers: &[&WorkerProcess], ids: &[Uuid]) {
    eventually(DEADLINE, "every task to complete", || async {
        let done: Vec<Uuid> = workers.iter().flat_map(|w| w.completed()).collect();
        ids.iter().all(|id| done.contains(id)).then_some(())
    })
    .await;
}

/// Tutorial 2, "Round-robin dispatching": with two consumers subscribed and no prefetch
/// pressure, the broker hands tasks out in turn, so each worker gets half.
#[tokio::test]
async fn two_workers_share_six_tasks_three_each() {
    let url = amqp_url();
    let queue = TestQueue::declare(&url, "round-robin", 5).await;
    // A prefetch above the number of tasks, so no worker is ever skipped for being busy: what
    // remains is the broker's turn-taking.
    let options = WorkerOptions {
        prefetch: 10,
        ..WorkerOptions::default()
    };
    let first = WorkerProcess::start(&url, queue.name(), &options).await;
    let second = WorkerProcess::start(&url, queue.name(), &options).await;
    eventually(DEADLINE, "both workers to be subscribed", || async {
        (queue.consumers().await == 2).then_some(())
    })
    .await;
    let gateway = TestGateway::start(&url, queue.name()).await;

    let mut ids = Vec::new();
    for _ in 0..6 {
        ids.push(gateway.submit_sleep("task..").await);
    }
    wait_all_completed(&[&first, &second], &ids).await;
    first.sync().await;

    assert_eq!(
        first.completed().len(),
        3,
        "first worker: {:?}",
        first.completed()
    );
    assert_eq!(
        second.completed().len(),
        3,
        "second worker: {:?}",
        second.completed()
    );
    gateway.stop().await;
}

/// Tutorial 2, "Fair dispatch": with prefetch 1 a worker busy on a long task is sent nothing
/// more, so every short task goes to the free worker instead of queueing behind the long one.
#[tokio::test]
async fn short_tasks_go_to_the_free_worker_not_behind_a_long_one() {
    let url = amqp_url();
    let queue = TestQueue::declare(&url, "fair", 5).await;
    let options = WorkerOptions {
        prefetch: 1,
        sleep_unit: "50ms",
        ..WorkerOptions::default()
    };
    let workers = [
        WorkerProcess::start(&url, queue.name(), &options).await,
        WorkerProcess::start(&url, queue.name(), &options).await,
    ];
    eventually(DEADLINE, "both workers to be subscribed", || async {
        (queue.consumers().await == 2).then_some(())
    })
    .await;
    let gateway = TestGateway::start(&url, queue.name()).await;

    // 600 units of 50 ms: the test never waits for it, it only has to outlast the short ones.
    let long = gateway.submit_sleep(&".".repeat(600)).await;
    let busy = eventually(DEADLINE, "a worker to start the long task", || async {
        workers.iter().position(|w| w.started().contains(&long))
    })
    .await;
    let free = 1 - busy;

    let mut short = Vec::new();
    for _ in 0..5 {
        short.push(gateway.submit_sleep("quick.").await);
    }
    wait_all_completed(&[&workers[free]], &short).await;
    workers[busy].sync().await;

    assert!(
        workers[busy].started().iter().all(|id| *id == long),
        "the busy worker was sent nothing but the long task: {:?}",
        workers[busy].started()
    );
    assert!(
        !workers[busy].completed().contains(&long),
        "the long task was still running while the short ones finished"
    );
    gateway.stop().await;
}

/// A worker folds the acks of consecutive deliveries into one `basic.ack` with `multiple`,
/// which settles every delivery of the channel up to its tag. Here long tasks stay in hand
/// while hundreds of short ones after them finish together: a fold that reached past a long
/// task would settle it early, and its own ack later would be refused (an unknown delivery
/// tag closes the channel, and the tasks in hand run again).
#[tokio::test]
async fn acks_folded_together_never_settle_a_task_still_running() {
    let url = amqp_url();
    let queue = TestQueue::declare(&url, "fold-acks", 5).await;
    let name = queue.name().to_owned();
    tokio::task::spawn_blocking(move || declare_kinds(&amqp_url(), &name, &[]))
        .await
        .expect("declare the kinds");
    let gateway = TestGateway::start(&url, queue.name()).await;
    // Queued before the worker starts, so it is handed a hundred at once: a long task first,
    // and the short ones after it finish in groups, their events sharing stream messages.
    let mut ids = Vec::new();
    for i in 0..300 {
        if i % 100 == 0 {
            // 100 units of 20 ms: two seconds, which the short ones around it do not need.
            ids.push(gateway.submit_sleep(&".".repeat(100)).await);
        }
        ids.push(gateway.submit_sleep("quick").await);
    }
    let options = WorkerOptions {
        prefetch: 100,
        sleep_unit: "20ms",
        ..WorkerOptions::default()
    };
    let worker = WorkerProcess::start(&url, queue.name(), &options).await;
    wait_all_completed(&[&worker], &ids).await;
    // A refused ack closes the channel a moment after the long task's ack is sent: tasks
    // posted now would find the worker subscribing again, or run twice.
    let mut after = Vec::new();
    for _ in 0..20 {
        after.push(gateway.submit_sleep("quick").await);
    }
    wait_all_completed(&[&worker], &after).await;
    ids.extend(after);

    worker.sync().await;
    let started = worker.started();
    assert_eq!(started.len(), ids.len(), "every task ran once, none twice");
    // A refused ack would have closed the channel, and the worker would have subscribed again.
    let resubscribed = worker
        .metric(r#"offload_worker_reconnects_total{kind="sleep"}"#)
        .await;
    assert_eq!(resubscribed, Some(0.0), "the channel stayed up");
    gateway.stop().await;
}
