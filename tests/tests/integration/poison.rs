//! Messages a worker cannot run are dead-lettered, and the worker carries on.

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use lapin::BasicProperties;
use offload_api::Config as GatewayConfig;
use offload_common::{DeadReason, EventType};
use offload_tests::{
    InProcessWorker, TestGateway, TestQueue, WorkerOptions, WorkerProcess, amqp_url, eventually,
    header_text,
};
use offload_worker::{Handler, HandlerError, Registry, Task};
use serde_json::json;

#[tokio::test]
async fn undecodable_and_unknown_kind_messages_are_dead_lettered_and_the_worker_carries_on() {
    let url = amqp_url();
    let queue = TestQueue::declare(&url, "poison", 5).await;
    let worker = WorkerProcess::start(&url, queue.name(), &WorkerOptions::default()).await;
    let gateway = TestGateway::start(&url, queue.name()).await;

    queue
        .publish_raw(
            "sleep",
            b"\x00\xffnot an envelope",
            BasicProperties::default(),
        )
        .await;
    // The gateway refuses kinds no worker bound; a foreign or older producer may still put
    // one on the queue.
    let unknown = offload_common::TaskEnvelope::new(
        offload_common::TaskKind::try_from("no-such-kind").expect("valid kind"),
        serde_json::Value::Null,
    );
    queue
        .publish_raw("sleep", &unknown.to_bytes(), unknown.properties())
        .await;
    let good = gateway.submit_sleep("after the poison.").await;

    eventually(
        Duration::from_secs(30),
        "the good task to complete",
        || async { worker.completed().contains(&good).then_some(()) },
    )
    .await;
    eventually(
        Duration::from_secs(10),
        "both bad messages in the dead-letter queue",
        || async { (queue.dead().await == 2).then_some(()) },
    )
    .await;
    // offload moves them there itself, saying why in headers of its own.
    let mut reasons = Vec::new();
    for _ in 0..2 {
        let dead = queue.take_dead().await.expect("a dead message");
        reasons.push(header_text(&dead, "x-offload-reason").expect("a reason"));
        assert!(header_text(&dead, "x-offload-error").is_some());
        assert_eq!(
            header_text(&dead, "x-offload-attempts").as_deref(),
            Some("1")
        );
    }
    reasons.sort();
    assert_eq!(reasons, ["no_handler", "undecodable"]);
    let warnings: Vec<String> = worker
        .log()
        .iter()
        .filter(|e| e["level"] == "WARN")
        .filter_map(|e| e["message"].as_str().map(str::to_owned))
        .collect();
    assert!(
        warnings.iter().any(|m| m.contains("not a task envelope")),
        "{warnings:?}"
    );
    assert!(
        warnings
            .iter()
            .any(|m| m.contains("no handler for kind 'no-such-kind'")),
        "{warnings:?}"
    );
    assert_eq!(queue.ready().await, 0);
    gateway.stop().await;
}

#[tokio::test]
async fn a_permanent_failure_is_dead_lettered_at_once() {
    let url = amqp_url();
    let queue = TestQueue::declare(&url, "permanent", 5).await;
    let worker = WorkerProcess::start(&url, queue.name(), &WorkerOptions::default()).await;
    let gateway = TestGateway::start(&url, queue.name()).await;

    // `sleep` treats a message that is not text as input no retry can fix.
    let response = gateway
        .post_task(&json!({"kind": "sleep", "payload": {"message": 42}}))
        .await;
    assert_eq!(response.status(), 202);

    eventually(
        Duration::from_secs(30),
        "the task in the dead-letter queue",
        || async { (queue.dead().await == 1).then_some(()) },
    )
    .await;
    worker.sync().await;
    assert_eq!(worker.started().len(), 1, "tried once, not retried");
    assert!(worker.completed().is_empty());
    let dead = queue.take_dead().await.expect("the dead task");
    assert_eq!(
        header_text(&dead, "x-offload-reason").as_deref(),
        Some("rejected")
    );
    gateway.stop().await;
}

/// Panics on every task, counting attempts.
struct AlwaysPanics(Arc<AtomicUsize>);

impl Handler for AlwaysPanics {
    const KIND: &'static str = "explode";
    type Payload = serde_json::Value;
    type Output = ();

    async fn handle(&self, _task: Task) -> Result<(), HandlerError> {
        self.0.fetch_add(1, Ordering::SeqCst);
        panic!("this handler always panics");
    }
}

/// Counts completed tasks.
struct Counts(Arc<AtomicUsize>);

impl Handler for Counts {
    const KIND: &'static str = "count";
    type Payload = serde_json::Value;
    type Output = ();

    async fn handle(&self, _task: Task) -> Result<(), HandlerError> {
        self.0.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

#[tokio::test]
async fn a_handler_that_always_panics_is_dead_after_its_last_attempt_and_the_worker_lives_on() {
    const ATTEMPTS: u32 = 3;
    let url = amqp_url();
    let queue = TestQueue::declare(&url, "panics", 5).await;
    let gateway = TestGateway::start(&url, queue.name()).await;
    let attempts = Arc::new(AtomicUsize::new(0));
    let completed = Arc::new(AtomicUsize::new(0));
    let mut worker_config = offload_worker::Config::new(&url, queue.name());
    worker_config.max_attempts = ATTEMPTS;
    worker_config.retry_base = Duration::ZERO;
    let registry = Registry::default()
        .register(AlwaysPanics(Arc::clone(&attempts)))
        .register(Counts(Arc::clone(&completed)));
    let worker = InProcessWorker::start(worker_config, registry);

    let response = gateway.post_task(&json!({"kind": "explode"})).await;
    assert_eq!(response.status(), 202);
    eventually(
        Duration::from_secs(30),
        "the task in the dead-letter queue",
        || async { (queue.dead().await == 1).then_some(()) },
    )
    .await;
    assert_eq!(attempts.load(Ordering::SeqCst), ATTEMPTS as usize);
    let dead = queue.take_dead().await.expect("the dead task");
    assert_eq!(
        header_text(&dead, "x-offload-reason").as_deref(),
        Some("max_attempts")
    );
    assert_eq!(
        header_text(&dead, "x-offload-attempts").as_deref(),
        Some("3")
    );
    let error = header_text(&dead, "x-offload-error").expect("the last error");
    assert!(error.contains("this handler always panics"), "{error}");

    let response = gateway.post_task(&json!({"kind": "count"})).await;
    assert_eq!(response.status(), 202);
    eventually(
        Duration::from_secs(30),
        "the worker to run a good task after the panics",
        || async { (completed.load(Ordering::SeqCst) == 1).then_some(()) },
    )
    .await;

    worker.stop().await;
    gateway.stop().await;
}

/// A task that takes its worker process down every time (an OOM kill, a segfault in native
/// code) must not take down worker after worker: each death returns it to the queue and
/// counts as a delivery, and the worker it reaches after LIMIT deaths dead-letters it without
/// running it, so its status says `dead`, `delivery_limit`, with the attempts that ran.
#[tokio::test]
async fn a_task_that_kills_its_worker_every_time_is_dead_lettered_at_the_delivery_limit() {
    const LIMIT: u32 = 2;
    let url = amqp_url();
    let queue = TestQueue::declare(&url, "crashes", LIMIT).await;
    let mut gateway_config = GatewayConfig::new(&url, queue.name());
    gateway_config.broker.delivery_limit = LIMIT;
    let gateway = TestGateway::spawn(gateway_config).await;
    let options = WorkerOptions {
        delivery_limit: LIMIT,
        binary: "offload-campaign-worker",
        ..WorkerOptions::default()
    };
    let id = gateway.submit(&json!({"kind": "crash"})).await;

    // Like a supervisor (compose's restart policy), start a new worker whenever one dies.
    let mut deaths = 0;
    let survivor = loop {
        let mut worker = WorkerProcess::start(&url, queue.name(), &options).await;
        let died = eventually(
            Duration::from_secs(30),
            "the worker to die on the task, or the task to be dead-lettered",
            || {
                let exited = worker.has_exited();
                let queue = &queue;
                async move {
                    if exited {
                        Some(true)
                    } else {
                        (queue.dead().await == 1).then_some(false)
                    }
                }
            },
        )
        .await;
        let died = died || worker.has_exited();
        if !died {
            break worker;
        }
        deaths += 1;
        assert!(deaths <= LIMIT, "the task killed {deaths} workers");
    };
    assert_eq!(deaths, LIMIT, "one death per allowed delivery");

    let (code, task) = gateway.task(id, "?wait=10s").await;
    assert_eq!(code, 200, "{task}");
    assert_eq!(task["status"], "dead", "{task}");
    assert_eq!(task["reason"], "delivery_limit", "{task}");
    assert_eq!(task["attempts"], LIMIT, "{task}");
    let dead = queue
        .take_dead()
        .await
        .expect("the task in the dead-letter queue");
    assert_eq!(
        header_text(&dead, "x-offload-reason").as_deref(),
        Some("delivery_limit")
    );
    let good = gateway.submit_sleep("after the crashes.").await;
    eventually(
        Duration::from_secs(30),
        "the surviving worker to run a good task",
        || async { survivor.completed().contains(&good).then_some(()) },
    )
    .await;
    gateway.stop().await;
}

/// `x-delivery-count` written by a publisher on a first delivery counts for nothing: the task
/// runs as its first attempt, not as a copy past its delivery limit.
#[tokio::test]
async fn a_forged_delivery_count_on_a_first_delivery_is_not_believed() {
    let url = amqp_url();
    let queue = TestQueue::declare(&url, "forged-count", 5).await;
    let worker = WorkerProcess::start(&url, queue.name(), &WorkerOptions::default()).await;
    let task = offload_common::TaskEnvelope::new(
        "sleep".try_into().expect("a kind"),
        json!({"message": "forged"}),
    );
    let mut headers = lapin::types::FieldTable::default();
    headers.insert(
        "x-delivery-count".into(),
        lapin::types::AMQPValue::LongLongInt(100),
    );
    let properties = BasicProperties::default()
        .with_message_id(task.id.to_string().into())
        .with_headers(headers);
    queue
        .publish_raw("sleep", &task.to_bytes(), properties)
        .await;
    eventually(Duration::from_secs(30), "the task to complete", || async {
        worker.completed().contains(&task.id).then_some(())
    })
    .await;
    let started = worker.start_event(task.id).expect("its start");
    assert_eq!(started.attempt, Some(1));
    assert_eq!(queue.dead().await, 0);
}

/// A flood of tasks that cannot run fills the dead-letter queue only to DEAD_MAX_LENGTH: the
/// oldest dead task is dropped for each new one (`drop-head`).
#[tokio::test]
async fn the_dead_letter_queue_keeps_at_most_dead_max_length_tasks() {
    const BOUND: u32 = 3;
    const FLOOD: usize = 8;
    let url = amqp_url();
    let queue =
        TestQueue::declare_topology(&url, "dead-bound", |t| t.with_dead_max_length(BOUND)).await;
    let options = WorkerOptions {
        env: vec![("DEAD_MAX_LENGTH", BOUND.to_string())],
        ..WorkerOptions::default()
    };
    let worker = WorkerProcess::start(&url, queue.name(), &options).await;

    for n in 0..FLOOD {
        queue
            .publish_raw(
                "sleep",
                format!("not a task {n}").as_bytes(),
                BasicProperties::default(),
            )
            .await;
    }
    let rejected = eventually(
        Duration::from_secs(30),
        "every message dead-lettered",
        || async {
            let count = worker
                .queue_events()
                .iter()
                .filter(|event| {
                    event.event == EventType::Dead
                        && event.reason == Some(DeadReason::Undecodable)
                        && event.worker.as_deref() == Some(worker.name())
                })
                .count();
            (count == FLOOD && queue.ready().await == 0).then_some(count)
        },
    )
    .await;

    assert_eq!(rejected, FLOOD);
    // Dead-lettering is asynchronous: wait for it to settle at the bound, never above.
    eventually(
        Duration::from_secs(10),
        "the dead-letter queue at its bound",
        || async {
            let dead = queue.dead().await;
            assert!(dead <= BOUND, "{dead} dead tasks kept, bound {BOUND}");
            (dead == BOUND).then_some(())
        },
    )
    .await;
    // The newest survive: the last message published is still there.
    let mut kept = Vec::new();
    while let Some(message) = queue.take_dead().await {
        kept.push(String::from_utf8_lossy(&message.delivery.data).into_owned());
    }
    assert!(
        kept.contains(&format!("not a task {}", FLOOD - 1)),
        "{kept:?}"
    );
}
