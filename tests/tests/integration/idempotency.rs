//! Idempotency keys: one task per key at once and across gateways, scoped to the API key that
//! sent it, and a reuse with another request refused.

use std::{sync::Arc, time::Duration};

use offload_tests::{TestGateway, TestQueue, amqp_url, eventually};
use reqwest::StatusCode;
use serde_json::{Value, json};

const DEADLINE: Duration = Duration::from_secs(30);

#[tokio::test]
async fn one_idempotency_key_makes_one_task_at_once_and_across_gateways() {
    let url = amqp_url();
    let queue = TestQueue::declare(&url, "idempotent", 5).await;
    let gateway = Arc::new(TestGateway::start(&url, queue.name()).await);
    // Until then, a key is refused with `events_replaying`: it could be one not read back yet.
    gateway.live(DEADLINE).await;
    let post = |gateway: Arc<TestGateway>, key: &'static str| async move {
        let response = gateway
            .client()
            .post(gateway.url("/tasks"))
            .header("idempotency-key", key)
            .json(&json!({"kind": "sleep"}))
            .send()
            .await
            .expect("answer");
        let code = response.status();
        let body: Value = response.json().await.expect("JSON");
        (code, body["id"].as_str().map(str::to_owned))
    };

    // Twice at once on one gateway: one task.
    let (first, second) = tokio::join!(
        post(Arc::clone(&gateway), "order-1234"),
        post(Arc::clone(&gateway), "order-1234")
    );
    let mut codes = [first.0, second.0];
    codes.sort();
    assert_eq!(codes, [StatusCode::OK, StatusCode::ACCEPTED]);
    assert_eq!(first.1, second.1, "the same task id");
    assert_eq!(queue.ready().await, 1);

    // On a second gateway, once the first's event is on the stream: the same task.
    let other = Arc::new(TestGateway::start(&url, queue.name()).await);
    let id = first.1.clone().expect("an id");
    eventually(DEADLINE, "the second gateway to know the task", || async {
        let response = other
            .client()
            .get(other.url(&format!("/tasks/{id}")))
            .send()
            .await
            .ok()?;
        (response.status() == StatusCode::OK).then_some(())
    })
    .await;
    let third = post(Arc::clone(&other), "order-1234").await;
    assert_eq!(third, (StatusCode::OK, Some(id)));
    assert_eq!(queue.ready().await, 1, "still one task");

    // A malformed key is refused.
    let response = gateway
        .client()
        .post(gateway.url("/tasks"))
        .header("idempotency-key", "x".repeat(256))
        .json(&json!({"kind": "sleep"}))
        .send()
        .await
        .expect("answer");
    assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY);
}

/// An Idempotency-Key is one task per API key (two callers choosing the same key never get
/// each other's task), and a key reused with another request is refused, on this gateway and
/// on another one that read the first request from the stream, one at a time and in a batch.
#[tokio::test]
async fn idempotency_keys_are_scoped_per_api_key_and_a_reuse_with_another_body_is_refused() {
    let url = amqp_url();
    let queue = TestQueue::declare(&url, "idempotent-scope", 5).await;
    let start = || async {
        let mut config = offload_api::Config::new(&url, queue.name());
        config.api_keys = Some("shop-key,billing-key".into());
        let gateway = Arc::new(TestGateway::spawn(config).await);
        gateway.live(DEADLINE).await;
        gateway
    };
    let gateway = start().await;
    let post = |gateway: Arc<TestGateway>, api_key: &'static str, body: Value| async move {
        let response = gateway
            .client()
            .post(gateway.url("/tasks"))
            .bearer_auth(api_key)
            .header("idempotency-key", "order-1")
            .json(&body)
            .send()
            .await
            .expect("answer");
        let code = response.status();
        let body: Value = response.json().await.expect("JSON");
        (code, body)
    };
    let order = json!({"kind": "sleep", "payload": {"message": "order 1", "lines": 2}});

    let (code, shop) = post(Arc::clone(&gateway), "shop-key", order.clone()).await;
    assert_eq!(code, StatusCode::ACCEPTED, "{shop}");
    // Another API key with the same Idempotency-Key: a task of its own.
    let (code, billing) = post(Arc::clone(&gateway), "billing-key", order.clone()).await;
    assert_eq!(code, StatusCode::ACCEPTED, "{billing}");
    assert_ne!(shop["id"], billing["id"]);
    // The same request again, its payload's fields in another order: the first task.
    let reordered = json!({"payload": {"lines": 2, "message": "order 1"}, "kind": "sleep"});
    let (code, again) = post(Arc::clone(&gateway), "shop-key", reordered).await;
    assert_eq!(
        (code, &again["id"]),
        (StatusCode::OK, &shop["id"]),
        "{again}"
    );
    // Another request under the same key: refused, naming the first task.
    let changed = json!({"kind": "sleep", "payload": {"message": "order 1", "lines": 3}});
    let (code, refused) = post(Arc::clone(&gateway), "shop-key", changed.clone()).await;
    assert_eq!(code, StatusCode::UNPROCESSABLE_ENTITY, "{refused}");
    assert_eq!(refused["code"], "idempotency_key_reused", "{refused}");
    let first = shop["id"].as_str().expect("an id");
    assert!(
        refused["error"]
            .as_str()
            .is_some_and(|error| error.contains(first)),
        "{refused}"
    );
    let delayed =
        json!({"kind": "sleep", "payload": {"message": "order 1", "lines": 2}, "delay": "5s"});
    let (code, _) = post(Arc::clone(&gateway), "shop-key", delayed).await;
    assert_eq!(
        code,
        StatusCode::UNPROCESSABLE_ENTITY,
        "a delay is part of the request"
    );
    assert_eq!(queue.ready().await, 2, "one task per API key");

    // A gateway that learned of the key from the stream knows whose it is and what it asked.
    let other = start().await;
    eventually(DEADLINE, "the second gateway to know the task", || async {
        let (code, body) = post(Arc::clone(&other), "shop-key", order.clone()).await;
        (code == StatusCode::OK && body["id"] == shop["id"]).then_some(())
    })
    .await;
    let (code, refused) = post(Arc::clone(&other), "shop-key", changed.clone()).await;
    assert_eq!(
        (code, &refused["code"]),
        (
            StatusCode::UNPROCESSABLE_ENTITY,
            &json!("idempotency_key_reused")
        )
    );
    let batch = other
        .client()
        .post(other.url("/tasks/batch"))
        .bearer_auth("billing-key")
        .json(&json!({"tasks": [
            {"kind": "sleep", "payload": {"message": "order 1", "lines": 2}, "idempotency_key": "order-1"},
            {"kind": "sleep", "payload": {"message": "other"}, "idempotency_key": "order-1"},
        ]}))
        .send()
        .await
        .expect("answer");
    let batch: Value = batch.json().await.expect("JSON");
    assert_eq!(batch["results"][0]["id"], billing["id"], "{batch}");
    assert_eq!(batch["results"][0]["existing"], true, "{batch}");
    assert_eq!(
        batch["results"][1]["code"], "idempotency_key_reused",
        "{batch}"
    );
    assert_eq!(queue.ready().await, 2, "still one task per API key");
}
