//! Taking tasks back: a cancel through any gateway stops a task wherever it is (queued,
//! scheduled, waiting for a retry, running), holds for workers that start later, and is never
//! followed by a start; a whole kind's waiting tasks at once; tasks that expire.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, SystemTime},
};

use futures_util::StreamExt;
use offload_common::EventType;
use offload_tests::{
    EventLog, InProcessWorker, TestGateway, TestQueue, WorkerOptions, WorkerProcess, amqp_url,
    declare_kinds, eventually, eventually_ok, handlers::FailsFirstRun,
};
use offload_worker::{Handler, HandlerError, Registry, Task};
use reqwest::StatusCode;
use serde_json::{Value, json};
use uuid::Uuid;

const DEADLINE: Duration = Duration::from_secs(60);

/// The kinds of `events` about task `id`, in stream order.
fn story(events: &EventLog, id: Uuid) -> Vec<EventType> {
    events
        .events()
        .iter()
        .filter(|event| event.id == Some(id))
        .map(|event| event.event)
        .collect()
}

/// Waits until a worker has met task `id` and dropped it: its `cancelled` (or `expired`)
/// event with a worker's name.
async fn dropped_by_a_worker(events: &EventLog, id: Uuid, why: EventType) {
    eventually_ok(DEADLINE, "a worker to drop the task", || async {
        let dropped = events
            .events()
            .iter()
            .any(|event| event.id == Some(id) && event.event == why && event.worker.is_some());
        // On a timeout, the task's events so far tell a run from a lost event.
        dropped
            .then_some(())
            .ok_or_else(|| format!("its events: {:?}", story(events, id)))
    })
    .await;
}

/// Queued with no worker of its kind running, posted through one gateway and cancelled
/// through another: it ends `cancelled`, and a worker that starts afterwards never starts it
/// (it runs the task posted after it).
#[tokio::test]
async fn a_queued_task_cancelled_through_another_gateway_never_starts_on_a_later_worker() {
    let url = amqp_url();
    let queue = TestQueue::declare(&url, "cancel-queued", 5).await;
    declare_kinds(&url, queue.name(), &[]);
    let events = EventLog::follow(&url, queue.name());
    let posting = TestGateway::start(&url, queue.name()).await;
    let cancelling = TestGateway::start(&url, queue.name()).await;
    cancelling.live(DEADLINE).await;
    let doomed = posting.submit_sleep(".").await;

    let (code, body) = cancelling.cancel(doomed).await;

    assert_eq!(code, StatusCode::OK, "{body}");
    assert_eq!(body["status"], "cancelled", "{body}");
    assert!(body["finished_at"].is_string(), "{body}");
    let (code, again) = posting.cancel(doomed).await;
    assert_eq!(
        (code, &again["status"]),
        (StatusCode::OK, &json!("cancelled"))
    );
    let worker = WorkerProcess::start(&url, queue.name(), &WorkerOptions::default()).await;
    let after = posting.submit_sleep(".").await;
    assert_eq!(
        posting.finished(after, DEADLINE).await["status"],
        "succeeded"
    );
    dropped_by_a_worker(&events, doomed, EventType::Cancelled).await;
    events.sync().await;
    assert!(
        !story(&events, doomed).contains(&EventType::Started),
        "{:?}",
        story(&events, doomed)
    );
    assert_eq!(posting.task(doomed, "").await.1["status"], "cancelled");
    drop(worker);
}

/// Scheduled to run later, and waiting in the delay levels for a retry: a cancel holds until
/// the task comes due, and it never starts (again).
#[tokio::test]
async fn scheduled_tasks_and_tasks_waiting_for_a_retry_never_start_once_cancelled() {
    let url = amqp_url();
    let queue = TestQueue::declare(&url, "cancel-scheduled", 5).await;
    let events = EventLog::follow(&url, queue.name());
    let mut config = offload_worker::Config::new(&url, queue.name());
    config.retry_base = Duration::from_secs(30);
    let worker = InProcessWorker::start(
        config,
        Registry::default()
            .register(offload_worker::handlers::Sleep::new(
                Duration::from_millis(10),
                10,
            ))
            .register(RetriesLater::default()),
    );
    let gateway = TestGateway::start(&url, queue.name()).await;
    gateway.live(DEADLINE).await;
    eventually(DEADLINE, "the worker consuming", || async {
        (queue.consumers_of("retries-later").await > 0).then_some(())
    })
    .await;

    let later = gateway
        .submit(&json!({"kind": "sleep", "payload": {"message": "."}, "delay": "5s"}))
        .await;
    let retrying = gateway.submit(&json!({"kind": "retries-later"})).await;
    eventually(DEADLINE, "the first attempt to fail", || async {
        let (_, body) = gateway.task(retrying, "").await;
        (body["status"] == "scheduled").then_some(())
    })
    .await;

    for id in [later, retrying] {
        let (code, body) = gateway.cancel(id).await;
        assert_eq!(
            (code, &body["status"]),
            (StatusCode::OK, &json!("cancelled")),
            "{body}"
        );
    }
    dropped_by_a_worker(&events, later, EventType::Cancelled).await;
    dropped_by_a_worker(&events, retrying, EventType::Cancelled).await;
    events.sync().await;
    assert!(!story(&events, later).contains(&EventType::Started));
    let starts = story(&events, retrying)
        .iter()
        .filter(|event| **event == EventType::Started)
        .count();
    assert_eq!(starts, 1, "only the first attempt ran");
    worker.stop().await;
}

/// Kind `retries-later`: the first attempt fails and asks for its retry in 3 s; later ones
/// succeed.
#[derive(Default)]
struct RetriesLater(FailsFirstRun);

impl Handler for RetriesLater {
    const KIND: &'static str = "retries-later";
    type Payload = Value;
    type Output = ();

    async fn handle(&self, task: Task) -> Result<(), HandlerError> {
        self.0
            .handle(task)
            .await
            .map_err(|error| HandlerError::retry_after(error.to_string(), Duration::from_secs(3)))
    }
}

/// Kind `stops-when-told`: waits for its cancel and stops; `ignores-cancel` runs its 2 s to
/// the end whatever it is told, and says whether it was told.
struct StopsWhenTold;

impl Handler for StopsWhenTold {
    const KIND: &'static str = "stops-when-told";
    type Payload = Value;
    type Output = ();

    async fn handle(&self, task: Task) -> Result<(), HandlerError> {
        tokio::select! {
            () = task.cancelled() => Err(HandlerError::permanent("stopped: cancelled")),
            () = tokio::time::sleep(Duration::from_secs(60)) => Ok(()),
        }
    }
}

struct IgnoresCancel(Arc<AtomicBool>);

impl Handler for IgnoresCancel {
    const KIND: &'static str = "ignores-cancel";
    type Payload = Value;
    type Output = Value;

    async fn handle(&self, task: Task) -> Result<Value, HandlerError> {
        tokio::time::sleep(Duration::from_secs(2)).await;
        self.0.store(task.is_cancelled(), Ordering::Relaxed);
        Ok(json!({"told": task.is_cancelled()}))
    }
}

/// Running: a Rust handler that watches its task is told within a second and stops; one that
/// ignores it runs to its end, its result kept; the built-in `sleep` stops at once. All end
/// `cancelled`, none is tried again.
#[tokio::test]
async fn running_handlers_are_told_and_their_tasks_end_cancelled_without_a_retry() {
    let url = amqp_url();
    let queue = TestQueue::declare(&url, "cancel-running", 5).await;
    let events = EventLog::follow(&url, queue.name());
    let told = Arc::new(AtomicBool::new(false));
    let worker = InProcessWorker::start(
        offload_worker::Config::new(&url, queue.name()),
        Registry::default()
            .register(offload_worker::handlers::Sleep::new(
                Duration::from_secs(1),
                100,
            ))
            .register(StopsWhenTold)
            .register(IgnoresCancel(Arc::clone(&told))),
    );
    let gateway = TestGateway::start(&url, queue.name()).await;
    gateway.live(DEADLINE).await;
    eventually(DEADLINE, "the worker consuming", || async {
        (queue.consumers_of("ignores-cancel").await > 0).then_some(())
    })
    .await;
    let sleeping = gateway.submit_sleep(&".".repeat(60)).await;
    let watching = gateway.submit(&json!({"kind": "stops-when-told"})).await;
    let ignoring = gateway.submit(&json!({"kind": "ignores-cancel"})).await;
    for id in [sleeping, watching, ignoring] {
        eventually(DEADLINE, "the task running", || async {
            (gateway.task(id, "").await.1["status"] == "running").then_some(())
        })
        .await;
    }

    for id in [sleeping, watching] {
        let asked = std::time::Instant::now();
        let (code, body) = gateway.cancel(id).await;
        assert_eq!(code, StatusCode::OK, "{body}");
        assert_eq!(body["status"], "cancelled", "{body}");
        assert_eq!(body["handler_stopped"], true, "{body}");
        assert!(
            asked.elapsed() < Duration::from_secs(3),
            "{:?}",
            asked.elapsed()
        );
    }
    let (code, body) = gateway.cancel(ignoring).await;
    assert!(
        matches!(code, StatusCode::OK | StatusCode::ACCEPTED),
        "{code}: {body}"
    );
    let ended = gateway.finished(ignoring, DEADLINE).await;
    assert_eq!(ended["status"], "cancelled", "{ended}");
    assert_eq!(ended["handler_stopped"], false, "{ended}");
    assert_eq!(ended["result"], json!({"told": true}), "{ended}");
    assert!(told.load(Ordering::Relaxed));

    // No attempt follows a cancelled one.
    let after = gateway.submit_sleep("").await;
    assert_eq!(
        gateway.finished(after, DEADLINE).await["status"],
        "succeeded"
    );
    events.sync().await;
    for id in [sleeping, watching, ignoring] {
        let starts = story(&events, id)
            .iter()
            .filter(|event| **event == EventType::Started)
            .count();
        assert_eq!(starts, 1, "{:?}", story(&events, id));
    }
    worker.stop().await;
}

/// A task that ended cannot be cancelled (409 `task_finished`); unknown ids are 404; bad
/// expiries are refused with `invalid_expiry`.
#[tokio::test]
async fn finished_and_unknown_tasks_and_bad_expiries_get_clear_errors() {
    let url = amqp_url();
    let queue = TestQueue::declare(&url, "cancel-errors", 5).await;
    let worker = WorkerProcess::start(&url, queue.name(), &WorkerOptions::default()).await;
    let gateway = TestGateway::start(&url, queue.name()).await;
    gateway.live(DEADLINE).await;
    let done = gateway.submit_sleep("").await;
    assert_eq!(
        gateway.finished(done, DEADLINE).await["status"],
        "succeeded"
    );

    let (code, body) = gateway.cancel(done).await;
    assert_eq!(
        (code, &body["code"]),
        (StatusCode::CONFLICT, &json!("task_finished")),
        "{body}"
    );
    let (code, body) = gateway.cancel(Uuid::new_v4()).await;
    assert_eq!(
        (code, &body["code"]),
        (StatusCode::NOT_FOUND, &json!("unknown_task"))
    );
    let (code, body) = gateway.post("/tasks/cancel?kind=no-such-kind").await;
    assert_eq!(
        (code, &body["code"]),
        (StatusCode::NOT_FOUND, &json!("unknown_kind"))
    );
    let past = humantime::format_rfc3339(SystemTime::now() - Duration::from_secs(60)).to_string();
    for bad in [
        json!({"kind": "sleep", "expires_in": "soon"}),
        json!({"kind": "sleep", "expires_at": past}),
        json!({"kind": "sleep", "expires_in": "1m", "expires_at": past}),
        json!({"kind": "sleep", "delay": "1h", "expires_in": "1m"}),
    ] {
        let response = gateway.post_task(&bad).await;
        assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY, "{bad}");
        let body: Value = response.json().await.expect("JSON");
        assert_eq!(body["code"], "invalid_expiry", "{bad}: {body}");
    }
    drop(worker);
}

/// Ten thousand waiting tasks of a kind, cancelled at once: the answer counts them within
/// seconds, and none of them starts when a worker comes; a task posted afterwards runs.
#[tokio::test]
async fn a_whole_kinds_waiting_tasks_are_cancelled_at_once() {
    const WAITING: usize = 10_000;
    let url = amqp_url();
    let queue = TestQueue::declare(&url, "cancel-kind", 5).await;
    declare_kinds(&url, queue.name(), &[]);
    let events = EventLog::follow(&url, queue.name());
    let gateway = TestGateway::start(&url, queue.name()).await;
    gateway.live(DEADLINE).await;
    let body = json!({"kind": "sleep"});
    let waiting: Vec<Uuid> = futures_util::stream::iter(0..WAITING)
        .map(|_| gateway.submit(&body))
        .buffer_unordered(32)
        .collect()
        .await;

    let asked = std::time::Instant::now();
    let (code, body) = gateway.post("/tasks/cancel?kind=sleep").await;

    assert_eq!(code, StatusCode::OK, "{body}");
    assert_eq!(body["cancelled"], WAITING, "{body}");
    assert!(
        asked.elapsed() < Duration::from_secs(10),
        "{:?}",
        asked.elapsed()
    );
    let worker = WorkerProcess::start(
        &url,
        queue.name(),
        &WorkerOptions {
            prefetch: 200,
            ..WorkerOptions::default()
        },
    )
    .await;
    let after = gateway.submit_sleep("").await;
    assert_eq!(
        gateway.finished(after, DEADLINE).await["status"],
        "succeeded"
    );
    eventually(DEADLINE, "the kind's queue drained", || async {
        (queue.ready_of("sleep").await == 0).then_some(())
    })
    .await;
    events.sync().await;
    let started: std::collections::HashSet<Uuid> = events
        .events()
        .iter()
        .filter(|event| event.event == EventType::Started)
        .filter_map(|event| event.id)
        .collect();
    assert!(
        waiting.iter().all(|id| !started.contains(id)),
        "a cancelled task started"
    );
    assert_eq!(gateway.task(waiting[0], "").await.1["status"], "cancelled");
    drop(worker);
}

/// A task not started by its expiry never starts, and ends `expired`; a retry due after it
/// does not start either.
#[tokio::test]
async fn tasks_that_expire_before_they_start_or_before_their_retry_never_start() {
    let url = amqp_url();
    let queue = TestQueue::declare(&url, "expiry", 5).await;
    declare_kinds(&url, queue.name(), &[]);
    let events = EventLog::follow(&url, queue.name());
    let gateway = TestGateway::start(&url, queue.name()).await;
    gateway.live(DEADLINE).await;
    let expiring = gateway
        .submit(&json!({"kind": "sleep", "expires_in": "1s"}))
        .await;
    let (_, body) = gateway.task(expiring, "").await;
    let expires_at = body["expires_at"]
        .as_str()
        .and_then(|at| humantime::parse_rfc3339_weak(at).ok())
        .expect("the status shows expires_at");
    eventually(DEADLINE, "the expiry to pass", || async {
        (SystemTime::now() > expires_at).then_some(())
    })
    .await;
    let worker = InProcessWorker::start(
        offload_worker::Config::new(&url, queue.name()),
        Registry::default()
            .register(offload_worker::handlers::Sleep::new(
                Duration::from_millis(10),
                10,
            ))
            .register(RetriesLater::default()),
    );
    eventually(DEADLINE, "the worker consuming", || async {
        (queue.consumers_of("retries-later").await > 0).then_some(())
    })
    .await;
    let retrying = gateway
        .submit(&json!({"kind": "retries-later", "expires_in": "1s"}))
        .await;

    for id in [expiring, retrying] {
        let ended = gateway.finished(id, DEADLINE).await;
        assert_eq!(ended["status"], "expired", "{ended}");
    }
    events.sync().await;
    assert!(!story(&events, expiring).contains(&EventType::Started));
    let starts = story(&events, retrying)
        .iter()
        .filter(|event| **event == EventType::Started)
        .count();
    assert_eq!(starts, 1, "{:?}", story(&events, retrying));
    worker.stop().await;
}

/// A cancel lives in the broker: a task cancelled while queued, and one cancelled while it
/// waits to run later, stay cancelled through a restart of the broker and of the worker, and
/// neither starts when the new worker meets it.
#[tokio::test]
async fn a_cancel_outlives_a_broker_restart_and_a_worker_restart() {
    let mut broker = offload_tests::PrivateBroker::start().await;
    let url = broker.url();
    let queue = format!("offload-test-cancel-durable-{}", Uuid::new_v4().simple());
    let events = EventLog::follow(&url, &queue);
    let gateway = TestGateway::start(&url, &queue).await;
    gateway.live(DEADLINE).await;
    let mut worker = WorkerProcess::start(&url, &queue, &WorkerOptions::default()).await;
    let later = gateway
        .submit(&json!({"kind": "sleep", "payload": {"message": "."}, "delay": "4s"}))
        .await;
    let (code, body) = gateway.cancel(later).await;
    assert_eq!(
        (code, &body["status"]),
        (StatusCode::OK, &json!("cancelled")),
        "{body}"
    );
    worker.kill();
    let queued = gateway.submit_sleep(".").await;
    let (code, body) = gateway.cancel(queued).await;
    assert_eq!(
        (code, &body["status"]),
        (StatusCode::OK, &json!("cancelled")),
        "{body}"
    );

    broker.stop().await;
    broker.start_again().await;
    let worker = WorkerProcess::start(&url, &queue, &WorkerOptions::default()).await;

    let after = gateway
        .submit_once_accepted(&json!({"kind": "sleep"}), DEADLINE)
        .await;
    assert_eq!(
        gateway.finished(after, DEADLINE).await["status"],
        "succeeded"
    );
    dropped_by_a_worker(&events, queued, EventType::Cancelled).await;
    dropped_by_a_worker(&events, later, EventType::Cancelled).await;
    events.sync().await;
    for id in [later, queued] {
        assert!(
            !story(&events, id).contains(&EventType::Started),
            "{:?}",
            story(&events, id)
        );
    }
    drop(worker);
}
