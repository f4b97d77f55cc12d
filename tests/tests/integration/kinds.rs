//! A queue per kind: each task goes only to a worker that runs its kind, whatever other
//! workers share `QUEUE`; each kind has its own concurrency in a worker; a kind can be paused
//! and resumed on every worker, across restarts; and tasks left in the shared queue of the
//! layout before per-kind queues still run after the upgrade.

use std::{
    collections::HashSet,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use lapin::{
    ExchangeKind,
    options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions},
    types::{AMQPValue, FieldTable, LongString},
};
use offload_tests::{
    Example, ExampleTarget, InProcessWorker, TestGateway, TestQueue, WorkerOptions, WorkerProcess,
    amqp_url, eventually, publish_confirmed,
};
use offload_worker::{Handler, HandlerError, Registry, Task};
use reqwest::StatusCode;
use serde_json::{Value, json};
use uuid::Uuid;

const DEADLINE: Duration = Duration::from_secs(60);
const SECRET: &str = "whsec_kinds";

/// What `--profile targets` runs, and more: a worker with the built-in kinds, a worker with an
/// HTTP target of its own (the Python example), and the Rust example with its own kind, all
/// on one `QUEUE`. Every task runs on a worker that has its kind; none is dead.
#[tokio::test]
async fn on_one_queue_each_task_runs_on_a_worker_that_has_its_kind() {
    let url = amqp_url();
    let queue = TestQueue::declare(&url, "mixed", 5).await;
    let target = ExampleTarget::start(Example::Python, SECRET, 0.01).await;
    let builtin = WorkerProcess::start(&url, queue.name(), &WorkerOptions::default()).await;
    let targets = WorkerProcess::start(
        &url,
        queue.name(),
        &WorkerOptions {
            prefetch: 4,
            env: vec![
                ("TARGETS", format!("py-work={}", target.url())),
                ("TARGET_SIGNING_SECRET", SECRET.into()),
            ],
            ..WorkerOptions::default()
        },
    )
    .await;
    let rust = WorkerProcess::start(
        &url,
        queue.name(),
        &WorkerOptions {
            binary: "rust-worker-example-under-test",
            ..WorkerOptions::default()
        },
    )
    .await;
    let gateway = TestGateway::start(&url, queue.name()).await;

    let mut submitted = Vec::new();
    for n in 0..15 {
        let py = gateway
            .submit(&json!({"kind": "py-work", "payload": {"message": format!("{n}.")}}))
            .await;
        let reverse = gateway
            .submit(&json!({"kind": "reverse", "payload": {"text": format!("task {n}")}}))
            .await;
        let sleep = gateway.submit_sleep(".").await;
        submitted.extend([("py-work", py), ("reverse", reverse), ("sleep", sleep)]);
    }
    for (kind, id) in &submitted {
        let status = gateway.finished(*id, DEADLINE).await;
        assert_eq!(status["status"], "succeeded", "{kind}: {status}");
    }
    let ran_on =
        |worker: &WorkerProcess| -> HashSet<Uuid> { worker.completed().into_iter().collect() };
    let (on_builtin, on_targets, on_rust) = (ran_on(&builtin), ran_on(&targets), ran_on(&rust));
    for (kind, id) in &submitted {
        match *kind {
            "py-work" => assert!(on_targets.contains(id), "py-work ran elsewhere"),
            "reverse" => assert!(on_rust.contains(id), "reverse ran elsewhere"),
            _ => assert!(
                on_builtin.contains(id) || on_targets.contains(id) || on_rust.contains(id),
                "sleep ran nowhere"
            ),
        }
    }
    let dead = builtin
        .queue_events()
        .iter()
        .filter(|event| event.event == offload_common::EventType::Dead)
        .count();
    assert_eq!(dead, 0, "no task died, as no_handler or otherwise");
    assert_eq!(queue.dead().await, 0);
    gateway.stop().await;
}

/// Counts the tasks of its kind running at once, and the most ever; each task waits for a
/// permit of `release`, which starts with none.
#[derive(Clone)]
struct Slow {
    running: Arc<AtomicUsize>,
    most: Arc<AtomicUsize>,
    release: Arc<tokio::sync::Semaphore>,
}

impl Handler for Slow {
    const KIND: &'static str = "k";
    type Payload = Value;
    type Output = ();

    async fn handle(&self, _task: Task) -> Result<(), HandlerError> {
        let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
        self.most.fetch_max(now, Ordering::SeqCst);
        self.release
            .acquire()
            .await
            .map_err(HandlerError::permanent)?
            .forget();
        self.running.fetch_sub(1, Ordering::SeqCst);
        Ok(())
    }
}

/// Returns at once.
struct Fast;

impl Handler for Fast {
    const KIND: &'static str = "sum";
    type Payload = Value;
    type Output = ();

    async fn handle(&self, _task: Task) -> Result<(), HandlerError> {
        Ok(())
    }
}

/// CONCURRENCY=k=2: never more than two `k` in hand, while `sum` (PREFETCH 8) flows past a
/// backlog of `k` that cannot move.
#[tokio::test]
async fn a_slow_kind_holds_at_most_its_concurrency_and_never_holds_back_another() {
    let url = amqp_url();
    let queue = TestQueue::declare(&url, "concurrency", 5).await;
    let gateway = TestGateway::start(&url, queue.name()).await;
    let slow = Slow {
        running: Arc::default(),
        most: Arc::default(),
        release: Arc::new(tokio::sync::Semaphore::new(0)),
    };
    let mut config = offload_worker::Config::new(&url, queue.name());
    config.prefetch = 8;
    config.concurrency = offload_worker::Concurrency([("k".to_owned(), 2)].into());
    let worker = InProcessWorker::start(
        config,
        Registry::default().register(slow.clone()).register(Fast),
    );

    let held: Vec<Uuid> = submit_many(&gateway, "k", 10).await;
    eventually(DEADLINE, "two k in hand", || async {
        (slow.running.load(Ordering::SeqCst) == 2).then_some(())
    })
    .await;
    let fast: Vec<Uuid> = submit_many(&gateway, "sum", 40).await;
    for id in &fast {
        assert_eq!(gateway.finished(*id, DEADLINE).await["status"], "succeeded");
    }
    assert_eq!(
        slow.most.load(Ordering::SeqCst),
        2,
        "k never past its concurrency"
    );
    assert_eq!(
        queue.ready_of("k").await,
        8,
        "the rest of k waits on its queue"
    );

    // All released at once: all ten run, still never more than two at once.
    slow.release.add_permits(held.len());
    for id in &held {
        assert_eq!(gateway.finished(*id, DEADLINE).await["status"], "succeeded");
    }
    assert_eq!(slow.most.load(Ordering::SeqCst), 2);
    worker.stop().await;
    gateway.stop().await;
}

async fn submit_many(gateway: &TestGateway, kind: &str, count: usize) -> Vec<Uuid> {
    let mut ids = Vec::new();
    for _ in 0..count {
        ids.push(gateway.submit(&json!({"kind": kind})).await);
    }
    ids
}

async fn kind_post(gateway: &TestGateway, kind: &str, action: &str) -> Value {
    let response = gateway
        .client()
        .post(gateway.url(&format!("/kinds/{kind}/{action}")))
        .send()
        .await
        .expect("an answer");
    assert_eq!(response.status(), StatusCode::OK);
    response.json().await.expect("JSON")
}

async fn kind_view(gateway: &TestGateway, kind: &str) -> Value {
    let response = gateway
        .client()
        .get(gateway.url("/kinds"))
        .send()
        .await
        .expect("an answer");
    assert_eq!(response.status(), StatusCode::OK);
    let body: Value = response.json().await.expect("JSON");
    body["kinds"]
        .as_array()
        .and_then(|kinds| kinds.iter().find(|view| view["kind"] == kind).cloned())
        .unwrap_or(Value::Null)
}

/// A paused kind: its tasks accepted and none started, through a worker's restart and a
/// gateway's; resumed, they all run.
#[tokio::test]
async fn a_paused_kind_starts_nothing_across_restarts_and_runs_everything_once_resumed() {
    let url = amqp_url();
    let queue = TestQueue::declare(&url, "pause", 5).await;
    let gateway = TestGateway::start(&url, queue.name()).await;
    // `sleep` and `reverse`.
    let options = WorkerOptions {
        binary: "rust-worker-example-under-test",
        ..WorkerOptions::default()
    };
    let worker = WorkerProcess::start(&url, queue.name(), &options).await;

    let paused = kind_post(&gateway, "sleep", "pause").await;
    assert_eq!(
        paused,
        json!({"kind": "sleep", "paused": true, "workers": 0})
    );
    let mut accepted = Vec::new();
    for _ in 0..5 {
        accepted.push(gateway.submit_sleep(".").await);
    }
    let other = gateway
        .submit(&json!({"kind": "reverse", "payload": {"text": "on"}}))
        .await;
    assert_eq!(
        gateway.finished(other, DEADLINE).await["status"],
        "succeeded",
        "another kind runs on"
    );
    let view = kind_view(&gateway, "sleep").await;
    assert_eq!(view["paused"], true, "{view}");
    assert_eq!(view["ready"], 5, "{view}");
    assert_eq!(view["workers"], 0, "{view}");

    // A worker restarted while paused consumes every kind but this one.
    drop(worker);
    let worker = WorkerProcess::start(&url, queue.name(), &options).await;
    eventually(
        DEADLINE,
        "the restarted worker to hold the kind paused",
        || async {
            let paused = worker
                .metric(r#"offload_worker_kind_paused{kind="sleep"}"#)
                .await;
            (paused == Some(1.0)).then_some(())
        },
    )
    .await;
    // And a gateway restarted still reads it paused.
    gateway.stop().await;
    let gateway = TestGateway::start(&url, queue.name()).await;
    gateway.live(DEADLINE).await;
    assert_eq!(kind_view(&gateway, "sleep").await["paused"], true);
    worker.sync().await;
    let started: HashSet<Uuid> = worker
        .queue_events()
        .iter()
        .filter(|event| event.event == offload_common::EventType::Started)
        .filter_map(|event| event.id)
        .collect();
    assert!(
        accepted.iter().all(|id| !started.contains(id)),
        "a paused task started"
    );
    assert_eq!(queue.ready_of("sleep").await, 5);

    let resumed = kind_post(&gateway, "sleep", "resume").await;
    assert_eq!(resumed["paused"], false);
    for id in &accepted {
        assert_eq!(gateway.finished(*id, DEADLINE).await["status"], "succeeded");
    }
    let view = kind_view(&gateway, "sleep").await;
    assert_eq!(view["paused"], false, "{view}");
    assert_eq!(view["workers"], 1, "{view}");

    let missing = gateway
        .client()
        .post(gateway.url("/kinds/no-such-kind/pause"))
        .send()
        .await
        .expect("an answer");
    assert_eq!(missing.status(), StatusCode::NOT_FOUND);
    let body: Value = missing.json().await.expect("JSON");
    assert_eq!(body["code"], "unknown_kind", "{body}");
    gateway.stop().await;
}

fn text(value: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(value))
}

/// The layout before per-kind queues, as it stood: the shared work queue `<QUEUE>` with its
/// arguments, its kinds bound to it, and the old level-0 delay queue dead-lettering to it.
async fn old_layout(queue: &TestQueue, kinds: &[&str]) {
    let name = queue.name();
    let channel = queue.connection().create_channel().await.expect("channel");
    let mut args = FieldTable::default();
    args.insert("x-queue-type".into(), text("quorum"));
    args.insert("x-delivery-limit".into(), AMQPValue::LongLongInt(5));
    args.insert(
        "x-dead-letter-exchange".into(),
        text(&format!("{name}.dlx")),
    );
    args.insert("x-dead-letter-routing-key".into(), text(name));
    args.insert("x-dead-letter-strategy".into(), text("at-least-once"));
    args.insert("x-overflow".into(), text("reject-publish"));
    channel
        .queue_declare(name.into(), QueueDeclareOptions::durable(), args)
        .await
        .expect("the old shared queue");
    for kind in kinds {
        channel
            .queue_bind(
                name.into(),
                format!("{name}.kinds").as_str().into(),
                (*kind).into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("an old kind binding");
    }
    let level_zero = format!("{name}.delay.0");
    let mut args = FieldTable::default();
    args.insert("x-queue-type".into(), text("quorum"));
    args.insert("x-message-ttl".into(), AMQPValue::LongLongInt(1000));
    args.insert("x-dead-letter-exchange".into(), text(""));
    args.insert("x-dead-letter-routing-key".into(), text(name));
    args.insert("x-dead-letter-strategy".into(), text("at-least-once"));
    args.insert("x-overflow".into(), text("reject-publish"));
    channel
        .queue_declare(
            level_zero.as_str().into(),
            QueueDeclareOptions::durable(),
            args,
        )
        .await
        .expect("the old level-0 queue");
    channel
        .exchange_declare(
            level_zero.as_str().into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("the level-0 exchange");
    let _ = channel.close(200, "old layout".into()).await;
}

/// Tasks left in the shared queue (and in the old level-0 delay queue) by the layout before
/// per-kind queues: after the upgrade each runs on a worker that has its kind, the old queue
/// ends empty, and new tasks no longer reach it.
#[tokio::test]
async fn an_upgrade_runs_the_tasks_left_in_the_shared_queue_and_empties_it() {
    let url = amqp_url();
    let queue = TestQueue::declare(&url, "upgrade", 5).await;
    old_layout(&queue, &["sleep", "reverse"]).await;
    let mut left = Vec::new();
    for (kind, payload) in [
        ("sleep", json!({"message": "."})),
        ("reverse", json!({"text": "old"})),
    ]
    .into_iter()
    .cycle()
    .take(6)
    {
        let task = offload_common::TaskEnvelope::new(
            offload_common::TaskKind::try_from(kind).expect("a kind"),
            payload,
        );
        publish_confirmed(
            queue.connection(),
            "",
            queue.name(),
            &task.to_bytes(),
            task.properties(),
        )
        .await;
        left.push(task.id);
    }
    // One waiting out its last second of delay in the old level-0 queue.
    let delayed = offload_common::TaskEnvelope::new(
        offload_common::TaskKind::try_from("sleep").expect("a kind"),
        json!({"message": "."}),
    );
    let level_zero = format!("{}.delay.0", queue.name());
    publish_confirmed(
        queue.connection(),
        "",
        &level_zero,
        &delayed.to_bytes(),
        delayed.properties(),
    )
    .await;
    left.push(delayed.id);

    let gateway = TestGateway::start(&url, queue.name()).await;
    let options = WorkerOptions {
        binary: "rust-worker-example-under-test",
        ..WorkerOptions::default()
    };
    let worker = WorkerProcess::start(&url, queue.name(), &options).await;
    for id in &left {
        assert_eq!(
            gateway.finished(*id, DEADLINE).await["status"],
            "succeeded",
            "a task of the old layout"
        );
    }
    let old = queue.counts(queue.name()).await;
    assert_eq!(old.0, 0, "the old shared queue ends empty");

    // New tasks go to their kinds' queues only: the old bindings are gone.
    let after = gateway.submit_sleep(".").await;
    assert_eq!(
        gateway.finished(after, DEADLINE).await["status"],
        "succeeded"
    );
    worker.sync().await;
    assert_eq!(
        worker
            .queue_events()
            .iter()
            .filter(|event| event.id == Some(after)
                && event.event == offload_common::EventType::Started)
            .count(),
        1,
        "run once, not once per layout"
    );
    assert_eq!(queue.counts(queue.name()).await.0, 0);
    assert_eq!(queue.dead().await, 0);
    gateway.stop().await;
}
