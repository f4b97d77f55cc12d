//! `/metrics` of the gateway, and of the worker with its `/health` (HTTP_BIND): every metric
//! family moves when its event happens, labels stay bounded (kinds a worker does not run are
//! `other`, paths no route matches `unmatched`), and health follows the subscription.

use std::{collections::HashMap, time::Duration};

use offload_tests::{
    FaultyProxy, InProcessWorker, TestGateway, TestQueue, amqp_url, eventually, free_port,
    handlers::AlwaysFails, publish_confirmed,
};
use offload_worker::{Handler, HandlerError, Task};
use reqwest::StatusCode;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const DEADLINE: Duration = Duration::from_secs(60);

struct Rejects;

impl Handler for Rejects {
    const KIND: &'static str = "rejects";
    type Payload = serde_json::Value;
    type Output = ();

    async fn handle(&self, _task: Task) -> Result<(), HandlerError> {
        Err(HandlerError::permanent("never"))
    }
}

/// Every sample of a scrape, by `name{labels}`.
/// Asserts that the scrape `samples` has series `name` at `value`.
#[track_caller]
fn expect_sample(samples: &HashMap<String, f64>, name: &str, value: f64) {
    assert_eq!(
        samples.get(name).copied(),
        Some(value),
        "{name} in {samples:?}"
    );
}

async fn scrape(base: &str) -> HashMap<String, f64> {
    let response = reqwest::get(format!("{base}/metrics"))
        .await
        .expect("/metrics answers");
    assert_eq!(response.status(), StatusCode::OK);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .is_ok_and(|kind| kind.starts_with("application/openmetrics-text")),
        "{:?}",
        response.headers()
    );
    let text = response.text().await.expect("a body");
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (name, value) = line.rsplit_once(' ')?;
            Some((name.to_owned(), value.parse().ok()?))
        })
        .collect()
}

async fn health(base: &str) -> StatusCode {
    reqwest::get(format!("{base}/health"))
        .await
        .expect("the worker answers /health")
        .status()
}

/// Waits until the sample `name` reads `value`.
async fn reads(base: &str, name: &str, value: f64) {
    eventually(DEADLINE, &format!("{name} to read {value}"), || async {
        (scrape(base).await.get(name).copied() == Some(value)).then_some(())
    })
    .await;
}

#[tokio::test]
async fn worker_metrics_move_with_their_events_and_health_follows_the_subscription() {
    let url = amqp_url();
    let queue = TestQueue::declare(&url, "worker-metrics", 5).await;
    let gateway = TestGateway::start(&url, queue.name()).await;
    let proxy = FaultyProxy::start("127.0.0.1:5672".parse().expect("address"))
        .await
        .expect("proxy");
    let through_proxy = format!("amqp://guest:guest@127.0.0.1:{}/%2f", proxy.port());
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let mut config = offload_worker::Config::new(&through_proxy, queue.name());
    config.http_bind = Some(([127, 0, 0, 1], port).into());
    config.max_attempts = 2;
    config.retry_base = Duration::ZERO;
    config.sleep_unit = Duration::from_millis(100);
    config.prefetch = 4;
    let registry = offload_worker::handlers::builtin(&config)
        .register(AlwaysFails)
        .register(Rejects);
    let _worker = InProcessWorker::start(config, registry);
    eventually(DEADLINE, "the worker to be healthy", || async {
        reqwest::get(format!("{base}/health"))
            .await
            .ok()
            .filter(|response| response.status() == StatusCode::OK)
    })
    .await;

    for message in ["a.", "b.", "c."] {
        gateway.submit_sleep(message).await;
    }
    gateway.submit(&json!({"kind": "always-fails"})).await;
    gateway.submit(&json!({"kind": "rejects"})).await;
    // A kind no worker runs cannot pass the gateway: put it on a kind's queue directly.
    let envelope = offload_common::TaskEnvelope::new(
        offload_common::TaskKind::try_from("nobody-runs-this").expect("a valid kind"),
        json!(null),
    );
    publish_confirmed(
        queue.connection(),
        "",
        &queue.topology().kind_queue("sleep"),
        &envelope.to_bytes(),
        envelope.properties(),
    )
    .await;

    for (name, value) in [
        (r#"offload_worker_tasks_succeeded_total{kind="sleep"}"#, 3.0),
        (
            r#"offload_worker_tasks_dead_total{kind="always-fails",reason="max_attempts"}"#,
            1.0,
        ),
        (
            r#"offload_worker_tasks_dead_total{kind="rejects",reason="rejected"}"#,
            1.0,
        ),
        (
            r#"offload_worker_tasks_dead_total{kind="other",reason="no_handler"}"#,
            1.0,
        ),
    ] {
        reads(&base, name, value).await;
    }
    let samples = scrape(&base).await;
    let sample = |name: &str| samples.get(name).copied();
    for (name, value) in [
        (r#"offload_worker_tasks_started_total{kind="sleep"}"#, 3.0),
        (
            r#"offload_worker_tasks_started_total{kind="always-fails"}"#,
            2.0,
        ),
        (
            r#"offload_worker_tasks_retried_total{kind="always-fails"}"#,
            1.0,
        ),
        (
            r#"offload_worker_task_duration_seconds_count{kind="sleep"}"#,
            3.0,
        ),
    ] {
        expect_sample(&samples, name, value);
    }
    assert!(
        sample(r#"offload_worker_task_duration_seconds_sum{kind="sleep"}"#)
            .is_some_and(|sum| sum >= 0.3),
        "three tasks of 100 ms: {samples:?}"
    );
    for (name, value) in [
        (r#"offload_worker_tasks_in_hand{kind="sleep"}"#, 0.0),
        (r#"offload_worker_kind_consuming{kind="sleep"}"#, 1.0),
        (r#"offload_worker_kind_paused{kind="sleep"}"#, 0.0),
        ("offload_worker_redeliveries_total", 0.0),
        (r#"offload_worker_reconnects_total{kind="sleep"}"#, 0.0),
    ] {
        expect_sample(&samples, name, value);
    }
    assert!(
        samples
            .keys()
            .all(|name| !name.contains("nobody-runs-this")),
        "a kind the worker does not run is never a label"
    );

    broker_taken_away_under_a_task(&base, &gateway, &proxy).await;
}

/// A task in hand; the broker taken away under it: unhealthy, then back, and the task
/// delivered again.
async fn broker_taken_away_under_a_task(base: &str, gateway: &TestGateway, proxy: &FaultyProxy) {
    // A task in hand; the broker taken away under it: unhealthy, then back, and the task
    // delivered again.
    gateway.submit_sleep(&".".repeat(30)).await;
    reads(base, r#"offload_worker_tasks_in_hand{kind="sleep"}"#, 1.0).await;
    proxy.cut();
    eventually(DEADLINE, "/health to say 503", || async {
        (health(base).await == StatusCode::SERVICE_UNAVAILABLE).then_some(())
    })
    .await;
    proxy.heal();
    reads(
        base,
        r#"offload_worker_reconnects_total{kind="sleep"}"#,
        1.0,
    )
    .await;
    eventually(DEADLINE, "/health to say 200 again", || async {
        (health(base).await == StatusCode::OK).then_some(())
    })
    .await;
    reads(base, "offload_worker_redeliveries_total", 1.0).await;
    reads(
        base,
        r#"offload_worker_tasks_succeeded_total{kind="sleep"}"#,
        4.0,
    )
    .await;
    reads(base, r#"offload_worker_tasks_in_hand{kind="sleep"}"#, 0.0).await;
}

#[tokio::test]
async fn gateway_metrics_move_with_their_events() {
    let url = amqp_url();
    let queue = TestQueue::declare(&url, "gateway-metrics", 5).await;
    let proxy = FaultyProxy::start("127.0.0.1:5672".parse().expect("address"))
        .await
        .expect("proxy");
    let through_proxy = format!("amqp://guest:guest@127.0.0.1:{}/%2f", proxy.port());
    let mut config = offload_api::Config::new(&through_proxy, queue.name());
    config.max_connections = 3;
    let gateway = TestGateway::spawn(config).await;
    let base = gateway.url("");

    gateway.submit_sleep("one").await;
    gateway.submit_sleep("two").await;
    gateway
        .submit(&json!({"kind": "sleep", "delay": "1h"}))
        .await;
    let unknown = gateway
        .post_task(&json!({"kind": "nobody-runs-this"}))
        .await;
    assert_eq!(unknown.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let lost = gateway
        .client()
        .get(gateway.url("/no/such/path"))
        .send()
        .await
        .expect("an answer");
    assert_eq!(lost.status(), StatusCode::NOT_FOUND);
    let wrong = gateway
        .client()
        .delete(gateway.url("/tasks"))
        .send()
        .await
        .expect("an answer");
    assert_eq!(wrong.status(), StatusCode::METHOD_NOT_ALLOWED);

    // The counts the broker keeps trail its confirms by a moment.
    for (name, value) in [
        (r#"offload_queue_messages{state="ready",kind="sleep"}"#, 2.0),
        (r#"offload_queue_messages{state="scheduled"}"#, 1.0),
    ] {
        reads(&base, name, value).await;
    }
    let samples = scrape(&base).await;
    let sample = |name: &str| samples.get(name).copied();
    for (name, value) in [
        (r#"offload_tasks_submitted_total{kind="sleep"}"#, 3.0),
        (
            r#"offload_http_requests_total{route="/tasks",method="POST",status="202"}"#,
            3.0,
        ),
        (
            r#"offload_http_requests_total{route="/tasks",method="POST",status="422"}"#,
            1.0,
        ),
        (
            r#"offload_http_requests_total{route="unmatched",method="GET",status="404"}"#,
            1.0,
        ),
    ] {
        expect_sample(&samples, name, value);
    }
    assert_eq!(
        sample(r#"offload_http_requests_total{route="/tasks",method="DELETE",status="405"}"#),
        Some(1.0),
        "{samples:?}"
    );
    for (name, value) in [
        (r#"offload_refusals_total{code="unknown_kind"}"#, 1.0),
        (r#"offload_refusals_total{code="not_found"}"#, 1.0),
        (r#"offload_refusals_total{code="method_not_allowed"}"#, 1.0),
    ] {
        expect_sample(&samples, name, value);
    }
    // Three confirms and one return.
    for (name, value) in [
        ("offload_publish_confirm_seconds_count", 4.0),
        ("offload_publishes_in_flight", 0.0),
    ] {
        expect_sample(&samples, name, value);
    }
    assert!(sample("offload_http_connections").is_some_and(|open| open >= 1.0));
    for (name, value) in [
        (r#"offload_queue_messages{state="dead"}"#, 0.0),
        (r#"offload_queue_consumers{kind="sleep"}"#, 0.0),
        (r#"offload_kind_paused{kind="sleep"}"#, 0.0),
        (r#"offload_broker_state{state="connected"}"#, 1.0),
        (r#"offload_broker_state{state="disconnected"}"#, 0.0),
    ] {
        expect_sample(&samples, name, value);
    }
    assert!(
        samples
            .keys()
            .all(|name| !name.contains("nobody-runs-this") && !name.contains("/no/such")),
        "neither a refused kind nor a client's path is ever a label"
    );

    turned_away_connections_are_counted(&gateway, &base).await;

    // The broker gone: the state says so, and the queue counts are left as they were.
    proxy.cut();
    reads(&base, r#"offload_broker_state{state="disconnected"}"#, 1.0).await;
    let samples = scrape(&base).await;
    assert_eq!(
        samples.get(r#"offload_broker_state{state="connected"}"#),
        Some(&0.0)
    );
}

/// Connections past MAX_CONNECTIONS (3 here) are turned away, and counted.
async fn turned_away_connections_are_counted(gateway: &TestGateway, base: &str) {
    let held: Vec<_> = futures_util::future::join_all(
        (0..3).map(|_| tokio::net::TcpStream::connect(gateway.addr())),
    )
    .await;
    eventually(
        DEADLINE,
        "a connection past the cap to be turned away",
        || async {
            let mut extra = tokio::net::TcpStream::connect(gateway.addr()).await.ok()?;
            extra
                .write_all(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n")
                .await
                .ok()?;
            let mut answer = vec![0; 64];
            let read = extra.read(&mut answer).await.ok()?;
            answer.truncate(read);
            String::from_utf8_lossy(&answer)
                .contains(" 503 ")
                .then_some(())
        },
    )
    .await;
    drop(held);
    // At least the one seen (the test client's idle keep-alive connections hold slots too,
    // so some of the three held may have been turned away as well).
    eventually(
        DEADLINE,
        "the turned-away connection to be counted",
        || async {
            scrape(base)
                .await
                .get(r#"offload_refusals_total{code="too_many_connections"}"#)
                .filter(|count| **count >= 1.0)
                .map(|_| ())
        },
    )
    .await;
}

#[tokio::test]
async fn gateway_metrics_need_the_read_scope_once_keys_exist_and_can_be_off() {
    let url = amqp_url();
    let queue = TestQueue::declare(&url, "metrics-keys", 5).await;
    let mut config = offload_api::Config::new(&url, queue.name());
    config.api_keys = Some("submitter=submit,reader=read".into());
    let gateway = TestGateway::spawn(config).await;
    let get = |key: Option<&'static str>| {
        let mut request = gateway.client().get(gateway.url("/metrics"));
        if let Some(key) = key {
            request = request.bearer_auth(key);
        }
        async move { request.send().await.expect("an answer").status() }
    };
    assert_eq!(get(None).await, StatusCode::UNAUTHORIZED);
    assert_eq!(get(Some("submitter")).await, StatusCode::FORBIDDEN);
    assert_eq!(get(Some("reader")).await, StatusCode::OK);

    // METRICS=off: no /metrics at all.
    let mut config = offload_api::Config::new(&url, queue.name());
    config.metrics = false;
    let quiet = TestGateway::spawn(config).await;
    let response = quiet
        .client()
        .get(quiet.url("/metrics"))
        .send()
        .await
        .expect("an answer");
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
}
