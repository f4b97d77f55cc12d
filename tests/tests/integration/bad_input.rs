//! Property tests over bad input: whatever a client sends, the gateway answers 2xx or a JSON
//! 4xx and queues exactly what it accepted; whatever bytes land on the queue, a worker
//! dead-letters what it cannot run and carries on.

use std::{sync::Arc, time::Duration};

use lapin::BasicProperties;
use offload_api::Config as GatewayConfig;
use offload_tests::{TestGateway, TestQueue, WorkerOptions, WorkerProcess, amqp_url, eventually};
use proptest::{
    prelude::*,
    strategy::ValueTree,
    test_runner::{Config, TestCaseError, TestRunner},
};
use reqwest::{Method, StatusCode, header};
use serde_json::{Value, json};

/// Bodies above this get 413; small, so the property covers it cheaply.
const MAX_BODY_BYTES: usize = 1024;

/// Any JSON value, nested a little.
fn json_value() -> BoxedStrategy<Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        ".{0,12}".prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
            prop::collection::btree_map(".{0,8}", inner, 0..4)
                .prop_map(|map| Value::Object(map.into_iter().collect())),
        ]
    })
    .boxed()
}

/// A task body a client might send: valid, or wrong in one of the ways clients are wrong.
fn body() -> impl Strategy<Value = Vec<u8>> {
    // Kinds the test queue has bound (accepted), and any other valid kind (422 unknown_kind).
    let kind = prop_oneof![
        3 => prop::sample::select(offload_tests::TEST_KINDS).prop_map(str::to_owned),
        1 => "[a-z0-9_.-]{1,64}",
    ];
    let valid = (kind, json_value())
        .prop_map(|(kind, payload)| json!({"kind": kind, "payload": payload}).to_string())
        .boxed();
    prop_oneof![
        // Noise.
        prop::collection::vec(any::<u8>(), 0..300),
        // JSON that is rarely a task.
        json_value().prop_map(|v| v.to_string().into_bytes()),
        // A task, truncated anywhere.
        (valid.clone(), any::<prop::sample::Index>()).prop_map(|(text, cut)| {
            let bytes = text.into_bytes();
            let at = cut.index(bytes.len() + 1);
            bytes[..at].to_vec()
        }),
        // A task with a field of the wrong type, or an extra field.
        (json_value(), json_value()).prop_map(|(kind, extra)| {
            json!({"kind": kind, "payload": null, "extra": extra})
                .to_string()
                .into_bytes()
        }),
        // A valid task, which must be queued.
        valid.prop_map(String::into_bytes),
        // Too large.
        (MAX_BODY_BYTES..3 * MAX_BODY_BYTES).prop_map(|n| {
            json!({"kind": "sleep", "payload": "x".repeat(n)})
                .to_string()
                .into_bytes()
        }),
    ]
}

#[derive(Debug, Clone)]
struct Request {
    method: Method,
    path: String,
    content_type: Option<String>,
    body: Vec<u8>,
}

fn request() -> impl Strategy<Value = Request> {
    let method = prop_oneof![
        8 => Just(Method::POST),
        1 => Just(Method::GET),
        1 => Just(Method::PUT),
        1 => Just(Method::DELETE),
        1 => Just(Method::PATCH),
    ];
    let path = prop_oneof![
        8 => Just("/tasks".to_owned()),
        1 => Just("/health".to_owned()),
        1 => "/[a-z/%.]{0,12}",
    ];
    let content_type = prop_oneof![
        4 => Just(Some("application/json".to_owned())),
        1 => Just(Some("application/json; charset=utf-8".to_owned())),
        1 => Just(Some("text/plain".to_owned())),
        1 => Just(None),
        1 => "[ -~]{0,24}".prop_map(Some),
    ];
    (method, path, content_type, body()).prop_map(|(method, path, content_type, body)| Request {
        method,
        path,
        content_type,
        body,
    })
}

/// Sends `request`; fails the case on a 5xx or a 4xx that is not our JSON error. Returns
/// whether the task was accepted.
async fn check(gateway: &TestGateway, request: Request) -> Result<bool, TestCaseError> {
    let mut builder = gateway
        .client()
        .request(request.method.clone(), gateway.url(&request.path))
        .body(request.body);
    if let Some(content_type) = &request.content_type {
        builder = builder.header(header::CONTENT_TYPE, content_type);
    }
    let response = builder
        .send()
        .await
        .map_err(|e| TestCaseError::fail(format!("no answer: {e}")))?;
    let status = response.status();
    prop_assert!(
        !status.is_server_error(),
        "{status} for {} {}",
        request.method,
        request.path
    );
    if status.is_client_error() {
        let content_type = response.headers().get(header::CONTENT_TYPE).cloned();
        prop_assert_eq!(
            content_type.as_ref().and_then(|v| v.to_str().ok()),
            Some("application/json")
        );
        let body: Value = response
            .json()
            .await
            .map_err(|e| TestCaseError::fail(format!("{status} without a JSON body: {e}")))?;
        prop_assert!(
            body["error"].as_str().is_some_and(|m| !m.is_empty()),
            "{body}"
        );
    }
    Ok(status == StatusCode::ACCEPTED)
}

#[test]
fn whatever_a_client_sends_the_answer_is_2xx_or_a_json_4xx_and_only_202s_are_queued() {
    let runtime = tokio::runtime::Runtime::new().expect("a runtime");
    let url = amqp_url();
    let (queue, gateway) = runtime.block_on(async {
        let queue = TestQueue::declare(&url, "bad-input", 5).await;
        let mut config = GatewayConfig::new(&url, queue.name());
        config.max_body_bytes = MAX_BODY_BYTES;
        let gateway = TestGateway::spawn(config).await;
        (queue, gateway)
    });
    let gateway = Arc::new(gateway);
    let accepted = std::cell::Cell::new(0_u32);

    let mut runner = TestRunner::new(Config {
        cases: 400,
        failure_persistence: None,
        ..Config::default()
    });
    let result = runner.run(&request(), |request| {
        if runtime.block_on(check(&gateway, request))? {
            accepted.set(accepted.get() + 1);
        }
        Ok(())
    });
    if let Err(failure) = result {
        panic!("{failure}");
    }

    runtime.block_on(async {
        let health = gateway.health().await;
        assert_eq!(health.status(), StatusCode::OK, "the gateway is still well");
        assert!(accepted.get() > 0, "some valid tasks were drawn");
        // The queue's count can trail the last confirm by a moment under load; a task that
        // was not queued would never show up.
        let on_queue = offload_tests::eventually_ok(
            Duration::from_secs(10),
            "exactly the accepted tasks on the queue",
            || async {
                let ready = queue.ready().await;
                if ready == accepted.get() {
                    Ok(())
                } else {
                    Err(format!("{ready} on the queue, {} accepted", accepted.get()))
                }
            },
        );
        on_queue.await;
    });
}

/// Message bodies a worker might find on its queue, none of them a task it can run.
fn poison_body() -> impl Strategy<Value = Vec<u8>> {
    let envelope_like = (
        prop_oneof![
            Just(json!(1)),
            Just(json!(2)),
            Just(json!("1")),
            json_value()
        ],
        prop_oneof![Just(json!(uuid::Uuid::new_v4().to_string())), json_value()],
        prop_oneof![
            Just(json!("no-such-kind")),
            Just(json!("BAD KIND")),
            json_value()
        ],
        json_value(),
        prop_oneof![Just(json!("2026-01-01T00:00:00Z")), json_value()],
    )
        .prop_map(|(v, id, kind, payload, at)| {
            json!({"v": v, "id": id, "kind": kind, "payload": payload, "submitted_at": at})
                .to_string()
                .into_bytes()
        });
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..300),
        json_value().prop_map(|v| v.to_string().into_bytes()),
        envelope_like,
    ]
}

#[tokio::test]
async fn a_worker_dead_letters_any_bytes_it_cannot_run_and_carries_on() {
    const BAD: u32 = 60;
    let url = amqp_url();
    let queue = TestQueue::declare(&url, "any-bytes", 5).await;
    let worker = WorkerProcess::start(&url, queue.name(), &WorkerOptions::default()).await;
    let gateway = TestGateway::start(&url, queue.name()).await;

    let mut runner = TestRunner::default();
    let strategy = poison_body();
    for _ in 0..BAD {
        let body = strategy
            .new_tree(&mut runner)
            .expect("the strategy draws a value")
            .current();
        queue
            .publish_raw("sleep", &body, BasicProperties::default())
            .await;
    }
    let good = gateway.submit_sleep("after the garbage.").await;

    eventually(
        Duration::from_secs(60),
        "the good task to complete after the garbage",
        || async { worker.completed().contains(&good).then_some(()) },
    )
    .await;
    eventually(
        Duration::from_secs(10),
        "every bad message in the dead-letter queue",
        || async { (queue.dead().await == BAD).then_some(()) },
    )
    .await;
    let panics: Vec<Value> = worker
        .log()
        .into_iter()
        .filter(|e| {
            e["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("panic"))
        })
        .collect();
    assert!(panics.is_empty(), "the worker panicked: {panics:?}");
    gateway.stop().await;
}
