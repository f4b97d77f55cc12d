//! Message durability across a broker restart, on a private RabbitMQ node.

use std::{collections::HashSet, time::Duration};

use offload_tests::{
    PrivateBroker, TestGateway, WorkerOptions, WorkerProcess, declare_kinds, eventually,
};

/// Tutorial 2, "Message durability": tasks accepted with 202, then the broker is stopped and
/// started again; every task is still there and completes.
#[tokio::test]
async fn accepted_tasks_survive_a_broker_restart_and_complete() {
    let mut broker = PrivateBroker::start().await;
    let url = broker.url();
    // The gateway declares the topology; the whole node is thrown away at the end.
    let queue_name = format!("offload-test-durable-{}", uuid::Uuid::new_v4().simple());
    let gateway = TestGateway::start(&url, &queue_name).await;
    // No worker has run yet: register the kind, as an operator would.
    declare_kinds(&url, &queue_name, &[]);
    let mut accepted = HashSet::new();
    for n in 0..10 {
        accepted.insert(gateway.submit_sleep(&format!("task {n}.")).await);
    }
    gateway.stop().await;

    broker.stop().await;
    broker.start_again().await;

    let worker = WorkerProcess::start(&url, &queue_name, &WorkerOptions::default()).await;
    eventually(
        Duration::from_secs(60),
        "every accepted task to complete",
        || async {
            let done: HashSet<_> = worker.completed().into_iter().collect();
            accepted.is_subset(&done).then_some(())
        },
    )
    .await;
}
