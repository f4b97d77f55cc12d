//! The gateway's HTTP contract: every status, its content type and its body.

use std::{net::TcpListener, time::Duration};

use lapin::{options::QueueDeleteOptions, types::ShortString};
use offload_api::Config;
use offload_tests::{TestGateway, TestQueue, amqp_url, declare_kinds, eventually};
use reqwest::{Response, StatusCode, header};
use serde_json::{Value, json};

/// Asserts `response` is a JSON error with `status` and `code`, and returns its message.
async fn assert_json_error(response: Response, status: StatusCode, code: &str) -> String {
    assert_eq!(response.status(), status);
    assert_eq!(
        response.headers()[header::CONTENT_TYPE],
        "application/json",
        "errors are JSON"
    );
    let body: Value = response.json().await.expect("a JSON body");
    let message = body["error"]
        .as_str()
        .expect("an `error` string")
        .to_owned();
    assert!(!message.is_empty());
    assert_eq!(body["code"], code, "{body}");
    assert_eq!(
        body.as_object().map(serde_json::Map::len),
        Some(2),
        "only `error` and `code`: {body}"
    );
    message
}

#[tokio::test]
async fn an_accepted_task_is_on_the_queue_persistent_with_its_id_and_kind() {
    let url = amqp_url();
    let queue = TestQueue::declare(&url, "accept", 5).await;
    let gateway = TestGateway::start(&url, queue.name()).await;

    let response = gateway
        .post_task(&json!({"kind": "sleep", "payload": {"message": "Hello world..."}}))
        .await;

    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let location = response.headers()[header::LOCATION]
        .to_str()
        .expect("ASCII")
        .to_owned();
    let body: Value = response.json().await.expect("JSON");
    let id = body["id"].as_str().expect("an id").to_owned();
    assert_eq!(body, json!({"id": id, "kind": "sleep", "status": "queued"}));
    assert_eq!(location, format!("/tasks/{id}"));

    let message = queue.take_ready().await.expect("the task is on the queue");
    let properties = &message.delivery.properties;
    assert_eq!(*properties.delivery_mode(), Some(2), "persistent");
    assert_eq!(
        properties.message_id().as_ref().map(ShortString::as_str),
        Some(id.as_str())
    );
    assert_eq!(
        properties.kind().as_ref().map(ShortString::as_str),
        Some("sleep")
    );
    assert_eq!(
        properties.content_type().as_ref().map(ShortString::as_str),
        Some("application/json")
    );
    assert!(properties.timestamp().is_some_and(|t| t > 0));
    let envelope: Value = serde_json::from_slice(&message.delivery.data).expect("JSON body");
    assert_eq!(envelope["v"], 1);
    assert_eq!(envelope["id"], id.as_str());
    assert_eq!(envelope["kind"], "sleep");
    assert_eq!(envelope["payload"], json!({"message": "Hello world..."}));
    assert!(
        envelope["submitted_at"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z'))
    );
    gateway.stop().await;
}

#[tokio::test]
async fn numbers_in_the_payload_reach_the_queue_exactly_as_sent() {
    let url = amqp_url();
    let queue = TestQueue::declare(&url, "numbers", 5).await;
    let gateway = TestGateway::start(&url, queue.name()).await;
    // Beyond u64, beyond f64's precision, and a decimal that binary floats cannot hold.
    let numbers = "[123456789012345678901234567890,0.1,1e+400,-4.2269348438353843e-196]";

    let response = gateway
        .post_raw(
            format!(r#"{{"kind":"sum","payload":{numbers}}}"#),
            Some("application/json"),
        )
        .await;

    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let message = queue.take_ready().await.expect("queued");
    let body = String::from_utf8(message.delivery.data).expect("UTF-8 JSON");
    assert!(
        body.contains(&format!(r#""payload":{numbers}"#)),
        "the payload's numbers changed on the way: {body}"
    );
    gateway.stop().await;
}

#[tokio::test]
async fn payload_is_optional_and_defaults_to_null() {
    let url = amqp_url();
    let queue = TestQueue::declare(&url, "no-payload", 5).await;
    let gateway = TestGateway::start(&url, queue.name()).await;

    let response = gateway.post_task(&json!({"kind": "report.daily"})).await;

    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let message = queue.take_ready().await.expect("queued");
    let envelope: Value = serde_json::from_slice(&message.delivery.data).expect("JSON");
    assert_eq!(envelope["payload"], Value::Null);
    gateway.stop().await;
}

/// Every status and code of a bad request is checked without a broker
/// (crates/api/tests/http_surface.rs); here, that none of them queues anything.
#[tokio::test]
async fn bad_requests_get_a_json_error_and_queue_nothing() {
    let url = amqp_url();
    let queue = TestQueue::declare(&url, "errors", 5).await;
    let mut config = Config::new(&url, queue.name());
    config.max_body_bytes = 1024;
    let gateway = TestGateway::spawn(config).await;
    let json_type = Some("application/json");

    for (body, content_type, status, code) in [
        (
            "{\"kind\": ".to_owned(),
            json_type,
            StatusCode::BAD_REQUEST,
            "invalid_json",
        ),
        (
            json!({"kind": "sleep"}).to_string(),
            Some("text/plain"),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
        ),
        (
            json!({"kind": "sleep", "payload": "x".repeat(2048)}).to_string(),
            json_type,
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
        ),
        (
            json!({"kind": "sleep", "priority": 1}).to_string(),
            json_type,
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_task",
        ),
    ] {
        assert_json_error(gateway.post_raw(body, content_type).await, status, code).await;
    }

    assert_eq!(queue.ready().await, 0, "no bad request queued anything");
    gateway.stop().await;
}

#[tokio::test]
async fn health_is_ok_while_connected() {
    let url = amqp_url();
    let queue = TestQueue::declare(&url, "health", 5).await;
    let gateway = TestGateway::start(&url, queue.name()).await;

    let response = gateway.health().await;

    assert_eq!(response.status(), StatusCode::OK);
    let body: Value = response.json().await.expect("JSON");
    assert_eq!(body["status"], "ok", "{body}");
    assert_eq!(body["broker"], "connected", "{body}");
    assert!(
        body["events"] == "replaying" || body["events"] == "live",
        "{body}"
    );
    gateway.live(Duration::from_secs(30)).await;
    gateway.stop().await;
}

#[tokio::test]
async fn broker_unreachable_means_503_with_retry_after_never_202() {
    // A port nobody listens on.
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let gateway = TestGateway::start(
        &format!("amqp://guest:guest@127.0.0.1:{port}/%2f"),
        "unreachable",
    )
    .await;

    let health = gateway.health().await;
    assert_eq!(health.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(health.headers().contains_key(header::RETRY_AFTER));
    let body: Value = health.json().await.expect("JSON");
    assert_eq!(body["broker"], "disconnected");

    let response = gateway.post_task(&json!({"kind": "sleep"})).await;
    assert_eq!(response.headers()[header::RETRY_AFTER], "1");
    let message = assert_json_error(
        response,
        StatusCode::SERVICE_UNAVAILABLE,
        "broker_unavailable",
    )
    .await;
    assert!(message.contains("not queued"), "{message}");
    gateway.stop().await;
}

#[tokio::test]
async fn a_deleted_queue_is_declared_again_and_never_turns_into_a_202_meanwhile() {
    let url = amqp_url();
    let queue = TestQueue::declare(&url, "vanished", 5).await;
    let gateway = TestGateway::start(&url, queue.name()).await;
    // Someone deletes the queues behind the gateway's back (no worker runs to notice): the
    // dead-letter queue, which the gateway declares, and the `sleep` kind's queue, which its
    // workers do.
    let channel = queue.connection().create_channel().await.expect("channel");
    for deleted in [
        queue.topology().dead_letter_queue(),
        queue.topology().kind_queue("sleep"),
    ] {
        channel
            .queue_delete(deleted.as_str().into(), QueueDeleteOptions::default())
            .await
            .expect("delete a queue");
    }

    // Until the gateway has declared its queues again, a publish comes back unrouted: 503,
    // never a 202 for a task that went nowhere. Then they are back, but not the kind's queue
    // (no worker runs to declare it again): 422 until a worker, or --declare-only, does.
    let response = eventually(
        Duration::from_secs(10),
        "the gateway to declare the queue again",
        || async {
            let response = gateway.post_task(&json!({"kind": "sleep"})).await;
            if response.status() != StatusCode::SERVICE_UNAVAILABLE {
                return Some(response);
            }
            assert!(response.headers().contains_key(header::RETRY_AFTER));
            let message =
                assert_json_error(response, StatusCode::SERVICE_UNAVAILABLE, "queue_missing").await;
            assert!(message.contains("does not exist"), "{message}");
            None
        },
    )
    .await;
    assert_json_error(response, StatusCode::UNPROCESSABLE_ENTITY, "unknown_kind").await;
    declare_kinds(&url, queue.name(), &[]);
    assert_eq!(
        gateway.post_task(&json!({"kind": "sleep"})).await.status(),
        StatusCode::ACCEPTED
    );
    assert_eq!(
        queue.ready().await,
        1,
        "the accepted task is on the kind's new queue"
    );
    // Health follows once the whole topology (delay levels included) is declared again.
    eventually(Duration::from_secs(30), "health to be ok again", || async {
        (gateway.health().await.status() == StatusCode::OK).then_some(())
    })
    .await;
    gateway.stop().await;
}

#[tokio::test]
async fn a_queue_declared_with_other_arguments_stops_startup_with_a_clear_error() {
    let url = amqp_url();
    let queue = TestQueue::declare(&url, "mismatch", 5).await;
    let one_line = |error: &str, argument: &str| {
        assert!(error.contains(queue.name()), "{error}");
        assert!(error.contains(argument), "names the argument: {error}");
        assert!(error.contains("--queue"), "says what to do: {error}");
        assert!(!error.contains('\n'), "one line: {error}");
    };

    // The gateway: the dead-letter queue with another bound.
    let mut config = Config::new(&url, queue.name());
    config.broker.dead_max_length = 7;
    let error = match offload_api::Application::build(config).await {
        Ok(_) => panic!("the gateway must not start on a mismatched queue"),
        Err(error) => error.to_string(),
    };
    one_line(&error, "x-max-length");

    // A worker: its kind's queue with another delivery limit.
    let mut config = offload_worker::Config::new(&url, queue.name());
    config.broker.delivery_limit = 9;
    let registry = offload_worker::Registry::default().register(
        offload_worker::handlers::Sleep::new(Duration::from_millis(1), 1),
    );
    let error = match offload_worker::run(config, registry, std::future::pending()).await {
        Ok(()) => panic!("the worker must not start on a mismatched queue"),
        Err(error) => error.to_string(),
    };
    one_line(&error, "x-delivery-limit");
}

struct Resize;

impl offload_worker::Handler for Resize {
    const KIND: &'static str = "resize";
    type Payload = serde_json::Value;
    type Output = ();

    async fn handle(
        &self,
        _task: offload_worker::Task,
    ) -> Result<(), offload_worker::HandlerError> {
        Ok(())
    }
}

#[tokio::test]
async fn a_kind_no_worker_handles_is_refused_at_the_gate_and_accepted_once_one_has_run() {
    let url = amqp_url();
    let queue = TestQueue::declare(&url, "kinds", 5).await;
    let gateway = TestGateway::start(&url, queue.name()).await;

    let message = assert_json_error(
        gateway.post_task(&json!({"kind": "resize"})).await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "unknown_kind",
    )
    .await;
    assert!(message.contains("'resize'"), "{message}");
    assert_eq!(queue.ready().await, 0, "nothing queued to die");

    // A worker that handles `resize` starts once, and stops: its binding stays, so tasks of
    // that kind are queued while no worker runs.
    let worker = offload_tests::InProcessWorker::start(
        offload_worker::Config::new(&url, queue.name()),
        offload_worker::Registry::default().register(Resize),
    );
    eventually(Duration::from_secs(10), "the worker subscribed", || async {
        (queue.consumers_of("resize").await == 1).then_some(())
    })
    .await;
    worker.stop().await;

    let response = gateway.post_task(&json!({"kind": "resize"})).await;
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    assert_eq!(queue.ready_of("resize").await, 1);
    gateway.stop().await;
}
