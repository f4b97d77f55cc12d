//! Cancelling a task while an HTTP target works on it: the worker drops the call, and the
//! target sees its connection closed.

use std::time::Duration;

use offload_tests::{TestGateway, TestQueue, WorkerOptions, WorkerProcess, amqp_url, eventually};
use reqwest::StatusCode;
use serde_json::json;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
};

const DEADLINE: Duration = Duration::from_secs(60);

/// An HTTP target's call is aborted: the target sees its connection closed.
#[tokio::test]
async fn cancelling_a_task_running_on_an_http_target_closes_the_call() {
    let url = amqp_url();
    let queue = TestQueue::declare(&url, "cancel-target", 5).await;
    // A target that takes the call, never answers, and reports when the caller hangs up.
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let target = format!("http://{}/run", listener.local_addr().expect("address"));
    let (hung_up, closed) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let (mut connection, _) = listener.accept().await.expect("the worker calls");
        let mut buffer = [0_u8; 4096];
        loop {
            match connection.read(&mut buffer).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
        let _ = connection.shutdown().await;
        let _ = hung_up.send(());
    });
    let worker = WorkerProcess::start(
        &url,
        queue.name(),
        &WorkerOptions {
            env: vec![("TARGETS", format!("slow-call={target}"))],
            ..WorkerOptions::default()
        },
    )
    .await;
    let gateway = TestGateway::start(&url, queue.name()).await;
    gateway.live(DEADLINE).await;
    let id = gateway.submit(&json!({"kind": "slow-call"})).await;
    eventually(DEADLINE, "the call under way", || async {
        (gateway.task(id, "").await.1["status"] == "running").then_some(())
    })
    .await;

    let (code, body) = gateway.cancel(id).await;

    assert_eq!(code, StatusCode::OK, "{body}");
    assert_eq!(body["status"], "cancelled");
    assert_eq!(body["handler_stopped"], true);
    assert!(
        body["error"]
            .as_str()
            .is_some_and(|error| error.contains("aborted")),
        "{body}"
    );
    tokio::time::timeout(Duration::from_secs(5), closed)
        .await
        .expect("the target sees the connection closed")
        .expect("the target reports");
    drop(worker);
}

/// The Python example target: a task it works on for a minute is cancelled; the worker drops
/// the call at once, and the task ends `cancelled`, stopped, long before the target would have
/// answered.
#[tokio::test]
async fn cancelling_a_task_on_the_python_target_aborts_the_call() {
    const SECRET: &str = "whsec_cancel";
    let url = amqp_url();
    let queue = TestQueue::declare(&url, "cancel-python", 5).await;
    let target =
        offload_tests::ExampleTarget::start(offload_tests::Example::Python, SECRET, 1.0).await;
    let worker = WorkerProcess::start(
        &url,
        queue.name(),
        &WorkerOptions {
            env: vec![
                ("TARGETS", format!("py-work={}", target.url())),
                ("TARGET_SIGNING_SECRET", SECRET.into()),
            ],
            ..WorkerOptions::default()
        },
    )
    .await;
    let gateway = TestGateway::start(&url, queue.name()).await;
    gateway.live(DEADLINE).await;
    let id = gateway
        .submit(&json!({"kind": "py-work", "payload": {"message": ".".repeat(60)}}))
        .await;
    eventually(DEADLINE, "the call under way", || async {
        (gateway.task(id, "").await.1["status"] == "running").then_some(())
    })
    .await;

    let asked = std::time::Instant::now();
    let (code, body) = gateway.cancel(id).await;

    assert_eq!(code, StatusCode::OK, "{body}");
    assert_eq!(body["status"], "cancelled", "{body}");
    assert_eq!(body["handler_stopped"], true, "{body}");
    assert!(
        body["error"]
            .as_str()
            .is_some_and(|error| error.contains("aborted")),
        "{body}"
    );
    assert!(
        asked.elapsed() < Duration::from_secs(5),
        "{:?}",
        asked.elapsed()
    );
    drop(worker);
}
