//! Text offload does not control (a handler's error, what a writer puts on the events stream)
//! is bounded wherever it goes: an event, a status, a header, an answer. Each test is a
//! reproduction from the trust review (issue 23), run against a real broker.

use std::time::Duration;

use lapin::BasicProperties;
use offload_api::Config as GatewayConfig;
use offload_common::{Event, EventType, events::encode_batch, text::ERROR_MAX_BYTES};
use offload_tests::{InProcessWorker, TestGateway, TestQueue, amqp_url, eventually};
use reqwest::StatusCode;
use serde_json::{Value, json};

const DEADLINE: Duration = Duration::from_secs(30);

/// A `sleep` task whose payload is a 250,000-character string fails to decode, with serde's
/// error quoting the whole payload. Its status, read by a gateway that replays the stream
/// afresh too, holds at most `ERROR_MAX_BYTES` of it, marked as cut.
#[tokio::test]
async fn an_error_quoting_a_huge_payload_is_cut_in_the_events_and_the_status() {
    let url = amqp_url();
    let queue = TestQueue::declare(&url, "untrusted-error", 5).await;
    let config = GatewayConfig::new(&url, queue.name());
    let gateway = TestGateway::spawn(config.clone()).await;
    let worker_config = offload_worker::Config::new(&url, queue.name());
    let _worker = InProcessWorker::start(
        worker_config.clone(),
        offload_worker::handlers::builtin(&worker_config),
    );

    let huge = "b".repeat(250_000);
    let id = gateway
        .submit(&json!({"kind": "sleep", "payload": huge}))
        .await;
    let error_of = async |gateway: &TestGateway| {
        eventually(DEADLINE, "the task's error in its status", || async {
            let (code, body) = gateway.task(id, "").await;
            (code == StatusCode::OK)
                .then(|| body["error"].as_str().map(str::to_owned))
                .flatten()
        })
        .await
    };
    for error in [error_of(&gateway).await, {
        let fresh = TestGateway::spawn(config.clone()).await;
        fresh.live(DEADLINE).await;
        error_of(&fresh).await
    }] {
        assert!(error.contains("bbbb"), "{error}");
        assert!(
            error.len() <= ERROR_MAX_BYTES + 64 && error.contains("(cut from"),
            "{} bytes: {}…",
            error.len(),
            &error[..200]
        );
    }
}

/// A `worker` event on the stream announcing a 10,000-character kind, as anyone with the
/// broker's credentials can write: the gateway keeps at most 256 bytes of it, and its 422
/// `unknown_kind`, which names the kinds handled, stays short.
#[tokio::test]
async fn a_forged_worker_event_with_a_huge_kind_does_not_swell_answers() {
    let url = amqp_url();
    let queue = TestQueue::declare(&url, "untrusted-kinds", 5).await;
    let gateway = TestGateway::spawn(GatewayConfig::new(&url, queue.name())).await;
    gateway.live(DEADLINE).await;
    let mut forged = Event::new(EventType::Worker);
    forged.worker = Some("w".repeat(10_000));
    forged.kinds = Some(vec!["k".repeat(10_000)]);
    let stream = queue
        .topology()
        .events_stream()
        .expect("events are on by default");
    offload_tests::publish_confirmed(
        queue.connection(),
        "",
        &stream,
        &encode_batch([&forged]),
        BasicProperties::default(),
    )
    .await;

    let answer = eventually(DEADLINE, "the gateway to know the forged kind", || async {
        let response = gateway
            .post_task(&json!({"kind": "nobody-runs-this"}))
            .await;
        let body: Value = response.json().await.ok()?;
        let error = body["error"].as_str()?.to_owned();
        error.contains("kkkk").then_some(error)
    })
    .await;
    assert!(answer.len() < 1_000, "{} bytes", answer.len());
}

/// A message published with a per-message `expiration` that dies keeps no expiration in
/// `<QUEUE>.dead`: nothing there expires silently.
#[tokio::test]
async fn a_dead_copy_never_carries_the_expiration_of_the_message() {
    use lapin::options::{BasicGetOptions, BasicNackOptions};

    let url = amqp_url();
    let queue = TestQueue::declare(&url, "untrusted-expiry", 5).await;
    let worker_config = offload_worker::Config::new(&url, queue.name());
    let _worker = InProcessWorker::start(
        worker_config.clone(),
        offload_worker::handlers::builtin(&worker_config),
    );
    let id = uuid::Uuid::new_v4();
    queue
        .publish_raw(
            "sleep",
            b"not an envelope",
            BasicProperties::default()
                .with_message_id(id.to_string().into())
                .with_expiration("600000".into()),
        )
        .await;
    let dead = queue.topology().dead_letter_queue();
    let channel = queue
        .connection()
        .create_channel()
        .await
        .expect("a channel");
    let copy = eventually(DEADLINE, "the message in the dead-letter queue", || async {
        channel
            .basic_get(dead.as_str().into(), BasicGetOptions::default())
            .await
            .ok()
            .flatten()
    })
    .await;
    assert_eq!(
        copy.delivery
            .properties
            .message_id()
            .as_ref()
            .map(ToString::to_string),
        Some(id.to_string())
    );
    assert_eq!(copy.delivery.properties.expiration(), &None);
    copy.delivery
        .nack(BasicNackOptions {
            requeue: true,
            ..BasicNackOptions::default()
        })
        .await
        .expect("put it back");
}

/// With gateways and workers logged in as broker users of their own (`GATEWAY_USERS`,
/// `WORKER_USERS`), a worker's credentials cannot make up a task: a `queued` event they write
/// (with an idempotency key) and a `succeeded` for the same id are not believed, the id stays
/// 404 and the key stays free; and they cannot write as the gateway's user, which the broker
/// itself refuses. Real tasks are believed from both roles.
#[tokio::test]
async fn a_workers_credentials_cannot_make_up_a_task_or_write_as_a_gateway() {
    let broker = offload_tests::PrivateBroker::start().await;
    let (api_url, worker_url) = two_users(&broker);
    let queue = format!("offload-test-writers-{}", uuid::Uuid::new_v4().simple());
    let gateway = gateway_of_its_own_user(&api_url, &queue).await;
    let worker = offload_tests::WorkerProcess::start(
        &worker_url,
        &queue,
        &offload_tests::WorkerOptions::default(),
    )
    .await;
    let real = gateway.submit_sleep("real.").await;
    assert_eq!(
        gateway.finished(real, DEADLINE).await["status"],
        "succeeded"
    );

    // The worker's user writes a task of its own making onto the events stream.
    let connection =
        lapin::Connection::connect(&worker_url, lapin::ConnectionProperties::default())
            .await
            .expect("connect as the worker's user");
    let stream = offload_common::BrokerArgs::new(&worker_url, &queue)
        .topology()
        .events_stream()
        .expect("events on");
    let forged = uuid::Uuid::new_v4();
    let mut queued = Event::task(EventType::Queued, forged, "sleep");
    queued.idempotency_key = Some("order-99".into());
    let mut succeeded = Event::task(EventType::Succeeded, forged, "sleep");
    succeeded.result = Some(json!({"paid": true}));
    let as_user = |user: &str| BasicProperties::default().with_user_id(user.into());
    offload_tests::publish_confirmed(
        &connection,
        "",
        &stream,
        &encode_batch([&queued, &succeeded]),
        as_user("offload-worker"),
    )
    .await;
    // Written as the gateway's user, the broker refuses it (the channel is closed).
    let channel = connection.create_channel().await.expect("a channel");
    let refused = async {
        channel
            .confirm_select(lapin::options::ConfirmSelectOptions::default())
            .await?;
        channel
            .basic_publish(
                "".into(),
                stream.as_str().into(),
                lapin::options::BasicPublishOptions::default(),
                &encode_batch([&queued]),
                as_user("offload-api"),
            )
            .await?
            .await
    }
    .await;
    assert!(
        refused.is_err() || !channel.status().connected(),
        "the broker took a user_id that is not the connection's: {refused:?}"
    );

    // A task posted after the forgery has its worker's events read after it too: once the
    // gateway shows it succeeded, it has read the forged events.
    let after = gateway.submit_sleep("after.").await;
    assert_eq!(
        gateway.finished(after, DEADLINE).await["status"],
        "succeeded"
    );
    let (code, body) = gateway.task(forged, "").await;
    assert_eq!(code, StatusCode::NOT_FOUND, "{body}");
    let response = gateway
        .client()
        .post(gateway.url("/tasks"))
        .header("idempotency-key", "order-99")
        .json(&json!({"kind": "sleep"}))
        .send()
        .await
        .expect("answer");
    assert_eq!(
        response.status(),
        StatusCode::ACCEPTED,
        "the key was never used"
    );
    drop(worker);
    gateway.stop().await;
}

/// Users `offload-api` and `offload-worker` on `broker`, each allowed everything: their URLs.
fn two_users(broker: &offload_tests::PrivateBroker) -> (String, String) {
    for (user, password) in [("offload-api", "api-pw"), ("offload-worker", "worker-pw")] {
        assert!(broker.ctl(&["add_user", user, password]));
        assert!(broker.ctl(&["set_permissions", "-p", "/", user, ".*", ".*", ".*"]));
    }
    let url_of = |user: &str, password: &str| {
        format!("amqp://{user}:{password}@127.0.0.1:{}/%2f", broker.port())
    };
    (
        url_of("offload-api", "api-pw"),
        url_of("offload-worker", "worker-pw"),
    )
}

/// A gateway logged in as `offload-api`, believing gateways and workers by their users.
async fn gateway_of_its_own_user(api_url: &str, queue: &str) -> TestGateway {
    let mut config = GatewayConfig::new(api_url, queue);
    config.gateway_users = vec!["offload-api".into()];
    config.worker_users = vec!["offload-worker".into()];
    let gateway = TestGateway::spawn(config).await;
    gateway.live(DEADLINE).await;
    gateway
}

/// With `GATEWAY_USERS` set on a worker, a cancel written onto the control stream with a
/// worker's credentials is not honoured: the task it names runs. (Without the setting, the
/// worker would drop it as cancelled.)
#[tokio::test]
async fn a_cancel_no_gateway_wrote_is_not_honoured() {
    let broker = offload_tests::PrivateBroker::start().await;
    let (api_url, worker_url) = two_users(&broker);
    let queue = format!(
        "offload-test-forged-cancel-{}",
        uuid::Uuid::new_v4().simple()
    );
    let gateway = gateway_of_its_own_user(&api_url, &queue).await;
    offload_tests::declare_kinds(&worker_url, &queue, &[]);
    let id = gateway.submit_sleep("not cancelled.").await;

    let connection =
        lapin::Connection::connect(&worker_url, lapin::ConnectionProperties::default())
            .await
            .expect("connect as the worker's user");
    let control = offload_common::BrokerArgs::new(&worker_url, &queue)
        .topology()
        .control_stream();
    let forged = offload_common::control::Record::Cancel {
        id: uuid::Uuid::new_v4(),
        task: id,
        kind: "sleep".into(),
        at: std::time::SystemTime::now(),
    };
    offload_tests::publish_confirmed(
        &connection,
        "",
        &control,
        &forged.to_bytes(),
        BasicProperties::default().with_user_id("offload-worker".into()),
    )
    .await;

    // A worker reads the control stream up to the present before it starts anything.
    let options = offload_tests::WorkerOptions {
        env: vec![("GATEWAY_USERS", "offload-api".to_owned())],
        ..offload_tests::WorkerOptions::default()
    };
    let worker = offload_tests::WorkerProcess::start(&worker_url, &queue, &options).await;
    assert_eq!(gateway.finished(id, DEADLINE).await["status"], "succeeded");
    drop(worker);
    gateway.stop().await;
}
