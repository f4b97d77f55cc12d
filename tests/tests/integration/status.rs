//! What happened to my task: lifecycle events on the stream, GET /tasks/{id}, waiting,
//! results, and events off (idempotency keys: `idempotency.rs`). Real tasks on the real
//! broker reach each status.

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use lapin::{
    BasicProperties,
    options::{QueueDeclareOptions, QueueDeleteOptions},
    types::{AMQPValue, FieldTable},
};
use offload_api::Config as GatewayConfig;
use offload_tests::{
    FaultyProxy, InProcessWorker, TestGateway, TestQueue, WorkerOptions, WorkerProcess, amqp_url,
    eventually, handlers::AlwaysFails,
};
use offload_worker::{Handler, HandlerError, Registry, Task};
use reqwest::StatusCode;
use serde_json::{Value, json};
use uuid::Uuid;

const DEADLINE: Duration = Duration::from_secs(30);

/// Answers with a result: the payload's `n`, doubled.
struct Double;

impl Handler for Double {
    const KIND: &'static str = "count";
    type Payload = serde_json::Value;
    type Output = Value;

    async fn handle(&self, task: Task) -> Result<Value, HandlerError> {
        let n = task.payload["n"].as_i64().unwrap_or(0);
        Ok(json!({"doubled": n * 2}))
    }
}

/// Fails its first attempt of every task, then succeeds.
struct FailsOnce(Arc<AtomicUsize>);

impl Handler for FailsOnce {
    const KIND: &'static str = "explode";
    type Payload = serde_json::Value;
    type Output = ();

    async fn handle(&self, task: Task) -> Result<(), HandlerError> {
        self.0.fetch_add(1, Ordering::SeqCst);
        if task.attempt == 1 {
            return Err("first attempts fail".into());
        }
        Ok(())
    }
}

fn registry() -> Registry {
    Registry::default()
        .register(Double)
        .register(FailsOnce(Arc::new(AtomicUsize::new(0))))
        .register(AlwaysFails)
}

#[tokio::test]
async fn each_status_is_reached_by_a_real_task_and_a_new_gateway_rebuilds_them() {
    const LIMIT: u32 = 1;
    let url = amqp_url();
    let queue = TestQueue::declare(&url, "status", LIMIT).await;
    let mut config = GatewayConfig::new(&url, queue.name());
    config.broker.delivery_limit = LIMIT;
    let gateway = TestGateway::spawn(config.clone()).await;

    // Queued, visible at once from the gateway that accepted it, before any worker runs.
    let doubled = gateway
        .submit(&json!({"kind": "count", "payload": {"n": 21}}))
        .await;
    let (code, body) = gateway.task(doubled, "").await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(body["status"], "queued", "{body}");
    assert_eq!(body["kind"], "count");
    assert!(body["submitted_at"].is_string(), "{body}");

    let retried = gateway.submit(&json!({"kind": "explode"})).await;
    let hopeless = gateway.submit(&json!({"kind": "always-fails"})).await;
    // A message that is not a task, with an id a client could know.
    let garbage = Uuid::new_v4();
    queue
        .publish_raw(
            "count",
            b"not an envelope",
            BasicProperties::default().with_message_id(garbage.to_string().into()),
        )
        .await;

    let mut worker_config = offload_worker::Config::new(&url, queue.name());
    worker_config.broker.delivery_limit = LIMIT;
    worker_config.max_attempts = 2;
    worker_config.retry_base = Duration::ZERO;
    let worker = InProcessWorker::start(worker_config, registry());

    let body = gateway.finished(doubled, DEADLINE).await;
    assert_eq!(body["status"], "succeeded", "{body}");
    assert_eq!(body["result"], json!({"doubled": 42}));
    assert_eq!(body["attempts"], 1);
    assert!(
        body["started_at"].is_string() && body["finished_at"].is_string(),
        "{body}"
    );

    let body = gateway.finished(retried, DEADLINE).await;
    assert_eq!(body["status"], "succeeded", "{body}");
    assert_eq!(body["attempts"], 2, "failed once, then succeeded: {body}");

    let body = gateway.finished(hopeless, DEADLINE).await;
    assert_eq!(body["status"], "dead", "{body}");
    assert_eq!(body["reason"], "max_attempts", "{body}");
    assert_eq!(body["error"], AlwaysFails::ERROR, "{body}");

    let body = gateway.finished(garbage, DEADLINE).await;
    assert_eq!(body["status"], "dead", "{body}");
    assert_eq!(body["reason"], "undecodable", "{body}");

    // A gateway started after all this rebuilds the same statuses from the stream.
    let late = TestGateway::spawn(config).await;
    for (id, expected) in [
        (doubled, "succeeded"),
        (retried, "succeeded"),
        (hopeless, "dead"),
        (garbage, "dead"),
    ] {
        let body = eventually(DEADLINE, "the late gateway to know the task", || async {
            let (code, body) = late.task(id, "").await;
            (code == StatusCode::OK).then_some(body)
        })
        .await;
        assert_eq!(body["status"], expected, "{body}");
    }
    let (_, body) = late.task(doubled, "").await;
    assert_eq!(
        body["result"],
        json!({"doubled": 42}),
        "results come back from the stream"
    );

    worker.stop().await;
    late.stop().await;
    gateway.stop().await;
}

/// A worker that dies after its `succeeded` event is confirmed but before its ack reaches the
/// broker: the status already says `succeeded`, the broker redelivers, the task runs again
/// (at least once), and the stream shows both attempts.
#[tokio::test]
async fn a_worker_killed_between_its_terminal_event_and_its_ack_runs_the_task_again() {
    let url = amqp_url();
    let queue = TestQueue::declare(&url, "ack-lost", 5).await;
    let gateway = TestGateway::start(&url, queue.name()).await;
    let proxy = FaultyProxy::start("127.0.0.1:5672".parse().expect("address"))
        .await
        .expect("proxy");
    let through_proxy = format!("amqp://guest:guest@127.0.0.1:{}/%2f", proxy.port());
    let mut first =
        WorkerProcess::start(&through_proxy, queue.name(), &WorkerOptions::default()).await;

    // The event reaches the broker; everything the worker sends after it (its ack) does not.
    proxy.hold_client_after(br#""type":"succeeded""#);
    let id = gateway.submit_sleep("once or more").await;
    let body = gateway.finished(id, DEADLINE).await;
    assert_eq!(body["status"], "succeeded", "{body}");
    assert_eq!(body["attempts"], 1, "{body}");
    assert!(proxy.tripped(), "the worker's ack was held back");
    first.sync().await;
    assert!(first.completed().contains(&id));
    assert_eq!(
        queue.ready().await,
        0,
        "the task is still in the first worker's hands"
    );

    first.kill();
    let second = WorkerProcess::start(&url, queue.name(), &WorkerOptions::default()).await;
    eventually(
        DEADLINE,
        "the second worker to run the task again",
        || async { second.completed().contains(&id).then_some(()) },
    )
    .await;
    let start = second.start_event(id).expect("its start is on the stream");
    assert_eq!(start.attempt, Some(2), "one earlier delivery: {start:?}");
    let body = eventually(
        DEADLINE,
        "the status to show the second attempt",
        || async {
            let (_, body) = gateway.task(id, "").await;
            (body["attempts"] == 2 && body["status"] == "succeeded").then_some(body)
        },
    )
    .await;
    assert!(body["finished_at"].is_string(), "{body}");
    gateway.stop().await;
}

/// A terminal event the broker refuses does not end the task: its delivery is requeued, never
/// acked, however often it runs, until the queue's delivery limit dead-letters it. The stream
/// is replaced by a queue that refuses every message (the worker's passive checks see a queue
/// of that name and leave it). It is not deleted while the worker may still publish to it: a
/// first version did, and in some runs the broker confirmed an event routed to the queue just
/// as it was deleted, so that task was acked with no event kept.
#[tokio::test]
async fn a_terminal_event_the_broker_refuses_returns_the_task_to_the_queue() {
    let url = amqp_url();
    let queue = TestQueue::declare(&url, "event-refused", 5).await;
    let worker = WorkerProcess::start(&url, queue.name(), &WorkerOptions::default()).await;
    let stream = queue.topology().events_stream().expect("events are on");
    let channel = queue.connection().create_channel().await.expect("channel");
    channel
        .queue_delete(stream.as_str().into(), QueueDeleteOptions::default())
        .await
        .expect("delete the stream");
    let mut refusing = FieldTable::default();
    refusing.insert("x-max-length".into(), AMQPValue::LongLongInt(0));
    refusing.insert(
        "x-overflow".into(),
        AMQPValue::LongString("reject-publish".into()),
    );
    channel
        .queue_declare(
            stream.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            refusing,
        )
        .await
        .expect("declare a queue that refuses every message");
    let _ = channel.close(200, "done".into()).await;

    let task = offload_common::TaskEnvelope::new(
        offload_common::TaskKind::try_from("sleep").expect("valid kind"),
        json!({"message": "instant"}),
    );
    queue
        .publish_raw("sleep", &task.to_bytes(), task.properties())
        .await;
    eventually(
        DEADLINE,
        "the delivery limit to dead-letter the task",
        || async { (queue.dead().await == 1).then_some(()) },
    )
    .await;

    // Each run logs `task completed`, then the refusal, then requeues the task; the copy
    // delivered after DELIVERY_LIMIT such returns is not run, and its `dead` event is refused
    // too, so it goes back once more and the broker's own limit dead-letters it.
    eventually(
        DEADLINE,
        "each run's refusal in the worker's log",
        || async {
            let log = worker.log();
            let refused = log
                .iter()
                .filter(|line| {
                    line["message"].as_str().is_some_and(|message| {
                        message.contains("event was not confirmed by the broker")
                    })
                })
                .count();
            // No event can tell: the stream refuses them all. The log is what is left.
            let id = task.id.to_string();
            let runs = log
                .iter()
                .filter(|line| {
                    line["message"] == "task completed" && line["span"]["task_id"] == id.as_str()
                })
                .count();
            (runs > 1 && refused == runs + 1).then_some(())
        },
    )
    .await;
    assert_eq!(queue.ready().await, 0);
    let dead = queue.take_dead().await.expect("the task, dead-lettered");
    assert_eq!(offload_tests::task_id_of(&dead), Some(task.id));
}

#[tokio::test]
async fn unknown_ids_are_404_and_a_wait_ends_on_time_with_the_current_state() {
    let url = amqp_url();
    let queue = TestQueue::declare(&url, "wait", 5).await;
    let gateway = TestGateway::start(&url, queue.name()).await;

    // Once the gateway has caught up with the stream, an id nobody accepted is 404, never
    // a made-up "pending".
    let (code, body) = eventually(DEADLINE, "a definite answer", || async {
        let answer = gateway.task(Uuid::new_v4(), "").await;
        (answer.0 != StatusCode::SERVICE_UNAVAILABLE).then_some(answer)
    })
    .await;
    assert_eq!(code, StatusCode::NOT_FOUND);
    assert_eq!(body["code"], "unknown_task");

    // No worker runs: a wait ends at its time with the task still queued.
    let id = gateway.submit(&json!({"kind": "sleep"})).await;
    let started = std::time::Instant::now();
    let (code, body) = gateway.task(id, "?wait=300ms").await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(body["status"], "queued");
    assert!(started.elapsed() >= Duration::from_millis(300));

    // A wait that is not a duration says so.
    let (code, body) = gateway.task(id, "?wait=soon").await;
    assert_eq!(code, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(body["code"], "invalid_wait");

    // A waiter is answered as soon as the task ends, not at the end of its wait.
    let waiting = {
        let url = gateway.url(&format!("/tasks/{id}?wait=25s"));
        let client = gateway.client().clone();
        tokio::spawn(async move {
            let started = std::time::Instant::now();
            let body: Value = client.get(url).send().await.ok()?.json().await.ok()?;
            Some((body, started.elapsed()))
        })
    };
    let worker = InProcessWorker::start(
        offload_worker::Config::new(&url, queue.name()),
        offload_worker::handlers::builtin(&offload_worker::Config::new(&url, queue.name())),
    );
    let (body, took) = waiting.await.expect("waiter").expect("an answer");
    assert_eq!(body["status"], "succeeded", "{body}");
    assert!(
        took < Duration::from_secs(20),
        "woken when the task ended: {took:?}"
    );
    worker.stop().await;
    gateway.stop().await;
}

#[tokio::test]
async fn with_events_off_there_is_no_stream_and_status_says_tracking_is_off() {
    let url = amqp_url();
    let queue = TestQueue::declare_topology(&url, "no-events", |t| t.with_events(None)).await;
    let mut config = GatewayConfig::new(&url, queue.name());
    config.broker.events = false;
    let gateway = TestGateway::spawn(config).await;

    let id = gateway.submit(&json!({"kind": "sleep"})).await;
    let (code, body) = gateway.task(id, "").await;
    assert_eq!(code, StatusCode::NOT_FOUND);
    assert_eq!(body["code"], "tracking_off");
    let response = gateway
        .client()
        .post(gateway.url("/tasks"))
        .header("idempotency-key", "k")
        .json(&json!({"kind": "sleep"}))
        .send()
        .await
        .expect("answer");
    assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(queue.ready().await, 1);
    let health: Value = gateway.health().await.json().await.expect("JSON");
    assert_eq!(health["events"], "off", "{health}");
    gateway.stop().await;
}

/// Long-polls have a cap of their own (`MAX_WAITING`): past it, a `?wait=` is answered at
/// once with where the task stands, so waiting clients never hold every connection and keep
/// `/health` and `POST /tasks` out.
#[tokio::test]
async fn long_polls_past_max_waiting_are_answered_at_once() {
    let url = amqp_url();
    let queue = TestQueue::declare(&url, "waiting", 5).await;
    let mut config = GatewayConfig::new(&url, queue.name());
    config.max_waiting = 2;
    let gateway = Arc::new(TestGateway::spawn(config).await);
    gateway.live(DEADLINE).await;
    // No worker: the task stays queued, and every wait for its end lasts its whole length.
    let id = gateway.submit(&json!({"kind": "sleep"})).await;
    let holders: Vec<_> = (0..2)
        .map(|_| {
            let gateway = Arc::clone(&gateway);
            tokio::spawn(async move { gateway.task(id, "?wait=60s").await })
        })
        .collect();
    let quick = reqwest::Client::builder()
        .timeout(Duration::from_secs(3))
        .build()
        .expect("a client");
    let answer = eventually(DEADLINE, "a third long-poll answered at once", || async {
        let response = quick
            .get(gateway.url(&format!("/tasks/{id}?wait=60s")))
            .send()
            .await
            .ok()?;
        response.json::<Value>().await.ok()
    })
    .await;
    assert_eq!(answer["status"], "queued", "{answer}");
    assert_eq!(gateway.health().await.status(), StatusCode::OK);
    for holder in holders {
        holder.abort();
    }
}
