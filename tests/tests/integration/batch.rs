//! `POST /tasks/batch` on a real broker: a thousand tasks in one request, all confirmed, all
//! run; a bad task has its own error and sinks nothing; idempotency keys per task.

use std::time::Duration;

use offload_api::Config as GatewayConfig;
use offload_tests::{InProcessWorker, TestGateway, TestQueue, amqp_url};
use reqwest::StatusCode;
use serde_json::{Value, json};
use uuid::Uuid;

const DEADLINE: Duration = Duration::from_secs(60);

async fn post_batch(gateway: &TestGateway, tasks: &[Value]) -> (StatusCode, Value) {
    let response = gateway
        .client()
        .post(gateway.url("/tasks/batch"))
        .json(&json!({ "tasks": tasks }))
        .send()
        .await
        .expect("the gateway answers");
    let status = response.status();
    (status, response.json().await.expect("a JSON answer"))
}

fn ids(answer: &Value) -> Vec<Option<Uuid>> {
    answer["results"]
        .as_array()
        .expect("results")
        .iter()
        .map(|result| result["id"].as_str().and_then(|id| id.parse().ok()))
        .collect()
}

#[tokio::test]
async fn a_thousand_tasks_in_one_request_are_all_confirmed_and_all_run() {
    let url = amqp_url();
    let queue = TestQueue::declare(&url, "batch-many", 5).await;
    let gateway = TestGateway::spawn(GatewayConfig::new(&url, queue.name())).await;
    let tasks: Vec<Value> = (0..1000)
        .map(|n| json!({"kind": "sleep", "payload": {"message": format!("task {n}")}}))
        .collect();

    let (status, answer) = post_batch(&gateway, &tasks).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["queued"], 1000, "{answer}");
    assert_eq!(answer["refused"], 0, "{answer}");
    let ids: Vec<Uuid> = ids(&answer)
        .into_iter()
        .map(|id| id.expect("an id"))
        .collect();
    // Confirmed before the answer: the broker holds every one, before any worker runs.
    assert_eq!(queue.ready_of("sleep").await, 1000);

    let mut config = offload_worker::Config::new(&url, queue.name());
    config.prefetch = 50;
    config.sleep_unit = Duration::ZERO;
    let _worker =
        InProcessWorker::start(config.clone(), offload_worker::handlers::builtin(&config));
    for id in [ids[0], ids[499], ids[999]] {
        let body = gateway.finished(id, DEADLINE).await;
        assert_eq!(body["status"], "succeeded", "{body}");
    }
    offload_tests::eventually(DEADLINE, "the queue to drain", || async {
        (queue.ready_of("sleep").await == 0).then_some(())
    })
    .await;
    for id in &ids {
        let body = gateway.finished(*id, DEADLINE).await;
        assert_eq!(body["status"], "succeeded", "{body}");
    }
}

#[tokio::test]
async fn a_bad_task_has_its_own_error_and_keys_hold_per_task() {
    let url = amqp_url();
    let queue = TestQueue::declare(&url, "batch-mixed", 5).await;
    let gateway = TestGateway::spawn(GatewayConfig::new(&url, queue.name())).await;
    // Keys are claimed against the status view, which must have read the stream first.
    gateway.live(DEADLINE).await;
    let tasks = [
        json!({"kind": "sleep", "payload": {"message": "first"}, "idempotency_key": "batch-key-1"}),
        json!({"kind": "Not A Kind"}),
        json!({"kind": "nobody-runs-this"}),
        json!({"kind": "sleep", "delay": "90"}),
        json!("a string, not a task"),
        json!({"kind": "sleep", "delay": "30s"}),
        json!({"kind": "sleep", "idempotency_key": ""}),
        json!({"kind": "sleep"}),
    ];

    let (status, answer) = post_batch(&gateway, &tasks).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let results = answer["results"].as_array().expect("results");
    assert_eq!(results.len(), tasks.len(), "one result per task: {answer}");
    let codes: Vec<Option<&str>> = results.iter().map(|r| r["code"].as_str()).collect();
    assert_eq!(
        codes,
        [
            None,
            Some("invalid_task"),
            Some("unknown_kind"),
            Some("invalid_schedule"),
            Some("invalid_task"),
            None,
            Some("invalid_idempotency_key"),
            None,
        ],
        "{answer}"
    );
    assert_eq!(results[0]["status"], "queued");
    assert_eq!(results[5]["status"], "scheduled");
    assert!(results[5]["run_at"].is_string(), "{answer}");
    for refused in [1, 2, 3, 4, 6] {
        let error = results[refused]["error"].as_str().expect("an error");
        assert!(
            !error.is_empty() && results[refused]["id"].is_null(),
            "{answer}"
        );
    }
    assert_eq!(
        (answer["queued"].as_u64(), answer["refused"].as_u64()),
        (Some(3), Some(5))
    );
    // Only the good ones reached the broker: two to run now, one in the delay levels.
    assert_eq!(queue.ready_of("sleep").await, 2);
    let first = ids(&answer)[0].expect("the first task's id");
    let (code, body) = gateway.task(first, "").await;
    assert_eq!(
        (code, body["status"].as_str()),
        (StatusCode::OK, Some("queued"))
    );

    // The same batch again: the keyed task is the first one, nothing new queued for it.
    let (_, again) = post_batch(&gateway, &tasks[..1]).await;
    assert_eq!(again["existing"], 1, "{again}");
    assert_eq!(again["results"][0]["id"], first.to_string());
    assert_eq!(again["results"][0]["existing"], true);
    // Two tasks of one batch with one key: one task.
    let twice = [
        json!({"kind": "sleep", "idempotency_key": "batch-key-2"}),
        json!({"kind": "sleep", "idempotency_key": "batch-key-2"}),
    ];
    let (_, answer) = post_batch(&gateway, &twice).await;
    let ids = ids(&answer);
    assert_eq!(ids[0], ids[1], "{answer}");
    assert_eq!(
        (answer["queued"].as_u64(), answer["existing"].as_u64()),
        (Some(1), Some(1))
    );
    assert_eq!(queue.ready_of("sleep").await, 3);
}
