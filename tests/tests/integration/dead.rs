//! The dead-letter queue as an API: dead tasks listed newest first with their reason, shown
//! with their payload, retried (confirmed on the work queue before they leave `.dead`, once
//! even when asked twice at once) and discarded; reading needs `read`, changing `admin`.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use offload_api::Config as GatewayConfig;
use offload_tests::{InProcessWorker, TestGateway, TestQueue, amqp_url, eventually};
use offload_worker::{Handler, HandlerError, Registry, Task};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use uuid::Uuid;

const DEADLINE: Duration = Duration::from_secs(30);
const ADMIN: &str = "ops-key";
const READER: &str = "reader-key";

/// Fails permanently while `broken`, then succeeds; counts successes per task.
struct Switch {
    broken: Arc<AtomicBool>,
    done: Arc<Mutex<HashMap<Uuid, usize>>>,
}

impl Handler for Switch {
    const KIND: &'static str = "count";
    type Payload = serde_json::Value;
    type Output = ();

    async fn handle(&self, task: Task) -> Result<(), HandlerError> {
        if self.broken.load(Ordering::SeqCst) {
            return Err(HandlerError::permanent("the downstream is broken"));
        }
        *self
            .done
            .lock()
            .expect("done lock")
            .entry(task.id)
            .or_insert(0) += 1;
        Ok(())
    }
}

struct Rig {
    gateway: TestGateway,
    queue: TestQueue,
    worker: InProcessWorker,
    broken: Arc<AtomicBool>,
    done: Arc<Mutex<HashMap<Uuid, usize>>>,
}

impl Rig {
    async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    async fn start_with(shape: impl FnOnce(&mut GatewayConfig)) -> Self {
        let url = amqp_url();
        let queue = TestQueue::declare(&url, "dead-api", 5).await;
        let mut config = GatewayConfig::new(&url, queue.name());
        config.api_keys = Some(format!("{ADMIN}=submit+read+admin,{READER}=read"));
        shape(&mut config);
        let gateway = TestGateway::spawn(config).await;
        let broken = Arc::new(AtomicBool::new(true));
        let done = Arc::new(Mutex::new(HashMap::new()));
        let worker = InProcessWorker::start(
            offload_worker::Config::new(&url, queue.name()),
            Registry::default().register(Switch {
                broken: Arc::clone(&broken),
                done: Arc::clone(&done),
            }),
        );
        Self {
            gateway,
            queue,
            worker,
            broken,
            done,
        }
    }

    async fn call(&self, method: Method, path: &str, key: &str) -> (StatusCode, Value) {
        let response = self
            .gateway
            .client()
            .request(method, self.gateway.url(path))
            .bearer_auth(key)
            .send()
            .await
            .expect("answer");
        let status = response.status();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// Submits a task, and waits until it is dead.
    async fn dead_task(&self, n: u64) -> Uuid {
        let response = self
            .gateway
            .client()
            .post(self.gateway.url("/tasks"))
            .bearer_auth(ADMIN)
            .json(&json!({"kind": "count", "payload": {"n": n}}))
            .send()
            .await
            .expect("answer");
        assert_eq!(response.status(), StatusCode::ACCEPTED);
        let id = response.json::<Value>().await.expect("JSON")["id"]
            .as_str()
            .and_then(|id| id.parse().ok())
            .expect("id");
        eventually(DEADLINE, "the task to be dead", || async {
            let (_, body) = self
                .call(Method::GET, &format!("/tasks/{id}"), READER)
                .await;
            (body["status"] == "dead").then_some(())
        })
        .await;
        id
    }

    async fn succeeded(&self, id: Uuid) {
        eventually(DEADLINE, "the retried task to succeed", || async {
            let (_, body) = self
                .call(Method::GET, &format!("/tasks/{id}"), READER)
                .await;
            (body["status"] == "succeeded").then_some(())
        })
        .await;
    }

    fn runs(&self, id: Uuid) -> usize {
        self.done
            .lock()
            .expect("done lock")
            .get(&id)
            .copied()
            .unwrap_or(0)
    }
}

#[tokio::test]
async fn dead_tasks_are_listed_shown_retried_once_and_discarded() {
    let rig = Rig::start().await;
    let mut ids = Vec::new();
    for n in 0..3 {
        ids.push(rig.dead_task(n).await);
    }

    // Listed newest first, with offload's reason and the handler's error.
    let (status, list) = rig.call(Method::GET, "/dead", READER).await;
    assert_eq!(status, StatusCode::OK, "{list}");
    assert_eq!(list["total"], 3, "{list}");
    let listed: Vec<String> = list["dead"]
        .as_array()
        .expect("array")
        .iter()
        .map(|task| task["id"].as_str().expect("id").to_owned())
        .collect();
    let newest_first: Vec<String> = ids.iter().rev().map(ToString::to_string).collect();
    assert_eq!(listed, newest_first);
    let first = &list["dead"][0];
    assert_eq!(first["reason"], "rejected", "{first}");
    assert_eq!(first["error"], "the downstream is broken", "{first}");
    assert_eq!(first["kind"], "count", "{first}");
    assert!(first["died_at"].is_string(), "{first}");
    // A listing right after another may miss what that one is still handing back.
    let page = eventually(DEADLINE, "the second page", || async {
        let (_, page) = rig
            .call(Method::GET, "/dead?offset=1&limit=1", READER)
            .await;
        (page["total"] == 3).then_some(page)
    })
    .await;
    assert_eq!(page["dead"][0]["id"], newest_first[1], "{page}");

    // One, with its payload; the listing did not take anything off the queue.
    let (status, shown) = rig
        .call(Method::GET, &format!("/dead/{}", ids[0]), READER)
        .await;
    assert_eq!(status, StatusCode::OK, "{shown}");
    assert_eq!(shown["payload"], json!({"n": 0}));
    eventually(DEADLINE, "every dead task back in .dead", || async {
        (rig.queue.dead().await == 3).then_some(())
    })
    .await;

    // Changing the dead-letter queue needs admin.
    let (status, body) = rig
        .call(Method::POST, &format!("/dead/{}/retry", ids[0]), READER)
        .await;
    assert_eq!(
        (status, body["code"].as_str()),
        (StatusCode::FORBIDDEN, Some("forbidden"))
    );

    // Retried: on the work queue with fresh attempts, off the dead-letter queue.
    rig.broken.store(false, Ordering::SeqCst);
    let (status, body) = rig
        .call(Method::POST, &format!("/dead/{}/retry", ids[0]), ADMIN)
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    rig.succeeded(ids[0]).await;
    let (_, body) = rig
        .call(Method::GET, &format!("/tasks/{}", ids[0]), READER)
        .await;
    assert_eq!(body["attempts"], 1, "fresh attempts: {body}");

    // The same task retried twice at once: one retry wins, the other finds nothing.
    let path = format!("/dead/{}/retry", ids[1]);
    let (a, b) = tokio::join!(
        rig.call(Method::POST, &path, ADMIN),
        rig.call(Method::POST, &path, ADMIN)
    );
    let mut statuses = [a.0, b.0];
    statuses.sort();
    assert_eq!(
        statuses,
        [StatusCode::OK, StatusCode::NOT_FOUND],
        "{a:?} {b:?}"
    );
    rig.succeeded(ids[1]).await;
    assert_eq!(rig.runs(ids[1]), 1, "retried once");

    // Discarded, once.
    let path = format!("/dead/{}", ids[2]);
    let (status, _) = rig.call(Method::DELETE, &path, ADMIN).await;
    assert_eq!(status, StatusCode::OK);
    let (status, body) = rig.call(Method::DELETE, &path, ADMIN).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (StatusCode::NOT_FOUND, Some("dead_task_not_found"))
    );
    eventually(DEADLINE, "the dead-letter queue to be empty", || async {
        (rig.queue.dead().await == 0).then_some(())
    })
    .await;
    assert_eq!(rig.runs(ids[2]), 0);
    assert_eq!(rig.runs(ids[0]), 1);

    rig.worker.stop().await;
    rig.gateway.stop().await;
}

#[tokio::test]
async fn all_dead_tasks_of_a_kind_are_retried_or_purged() {
    let rig = Rig::start().await;
    let retried = [rig.dead_task(1).await, rig.dead_task(2).await];
    rig.broken.store(false, Ordering::SeqCst);
    let (status, body) = rig
        .call(Method::POST, "/dead/retry?kind=other", ADMIN)
        .await;
    assert_eq!(
        (status, body["retried"].as_u64()),
        (StatusCode::OK, Some(0))
    );
    let (status, body) = rig
        .call(Method::POST, "/dead/retry?kind=count", ADMIN)
        .await;
    assert_eq!(
        (status, body["retried"].as_u64()),
        (StatusCode::OK, Some(2)),
        "{body}"
    );
    for id in retried {
        rig.succeeded(id).await;
    }

    rig.broken.store(true, Ordering::SeqCst);
    rig.dead_task(3).await;
    rig.dead_task(4).await;
    let (status, body) = rig.call(Method::DELETE, "/dead", ADMIN).await;
    assert_eq!(
        (status, body["discarded"].as_u64()),
        (StatusCode::OK, Some(2)),
        "{body}"
    );
    eventually(DEADLINE, "the dead-letter queue to be empty", || async {
        (rig.queue.dead().await == 0).then_some(())
    })
    .await;
    rig.worker.stop().await;
    rig.gateway.stop().await;
}

/// `DEAD_SCAN_MAX` bounds what one request reads: the listing says `truncated`, and a retry
/// by kind takes that many at a time.
#[tokio::test]
async fn one_request_reads_at_most_dead_scan_max_dead_tasks() {
    let rig = Rig::start_with(|config| config.dead_scan_max = 2).await;
    for n in 1..=3 {
        rig.dead_task(n).await;
    }
    let (status, body) = rig.call(Method::GET, "/dead", READER).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["truncated"], true, "{body}");
    assert_eq!(body["dead"].as_array().map(Vec::len), Some(2), "{body}");
    rig.broken.store(false, Ordering::SeqCst);
    let (_, first) = rig
        .call(Method::POST, "/dead/retry?kind=count", ADMIN)
        .await;
    assert_eq!(first["retried"], 2, "{first}");
    let (_, second) = rig
        .call(Method::POST, "/dead/retry?kind=count", ADMIN)
        .await;
    assert_eq!(second["retried"], 1, "{second}");
    rig.worker.stop().await;
    rig.gateway.stop().await;
}

/// Every message of `queue`, taken off it: the task ids.
async fn drain_ids(connection: &lapin::Connection, queue: &str) -> Vec<Uuid> {
    let channel = connection.create_channel().await.expect("channel");
    let mut ids = Vec::new();
    while let Some(message) = channel
        .basic_get(
            queue.into(),
            lapin::options::BasicGetOptions { no_ack: true },
        )
        .await
        .expect("basic.get")
    {
        if let Some(id) = offload_tests::task_id_of(&message) {
            ids.push(id);
        }
    }
    let _ = channel.close(200, "drained".into()).await;
    ids
}

#[tokio::test]
async fn a_gateway_killed_in_the_middle_of_retrying_loses_no_dead_task() {
    const TASKS: usize = 300;
    let url = amqp_url();
    let queue = TestQueue::declare(&url, "dead-kill", 5).await;
    let dead_queue = queue.topology().dead_letter_queue();
    // Dead tasks, as a worker leaves them.
    let mut all = Vec::new();
    for n in 0..TASKS {
        let task = offload_common::TaskEnvelope::new(
            offload_common::TaskKind::try_from("count").expect("kind"),
            json!({"n": n}),
        );
        offload_tests::publish_confirmed(
            queue.connection(),
            "",
            &dead_queue,
            &task.to_bytes(),
            task.properties(),
        )
        .await;
        all.push(task.id);
    }

    let env = [
        ("AMQP_URL", url.clone()),
        ("QUEUE", queue.name().to_owned()),
    ];
    let mut gateway = offload_tests::GatewayProcess::start(offload_tests::free_port(), &env).await;
    let retry = reqwest::Client::new()
        .post(gateway.url("/dead/retry"))
        .send();
    let retrying = tokio::spawn(retry);
    // Kill it once it is under way: some tasks moved, not all.
    eventually(DEADLINE, "the retry to be under way", || async {
        (queue.ready().await >= 10).then_some(())
    })
    .await;
    gateway.kill();
    let _ = retrying.await;

    // Every task is on its kind's queue or still dead; one may be in both (at least once).
    let mut seen = drain_ids(queue.connection(), &queue.topology().kind_queue("count")).await;
    let moved = seen.len();
    // The killed gateway's scan held the rest unacked; they come back as the broker notices.
    let still_dead = Mutex::new(Vec::new());
    eventually(DEADLINE, "the dead-letter queue to settle", || async {
        let ids = drain_ids(queue.connection(), &dead_queue).await;
        let mut still_dead = still_dead.lock().expect("ids lock");
        still_dead.extend(ids);
        (still_dead.len() + moved >= TASKS).then_some(())
    })
    .await;
    let still_dead = still_dead.into_inner().expect("ids lock");
    assert!(moved < TASKS, "killed before the end: {moved} moved");
    seen.extend(still_dead);
    let distinct: std::collections::HashSet<Uuid> = seen.iter().copied().collect();
    assert_eq!(distinct.len(), TASKS, "no task lost");
    assert!(seen.len() - TASKS <= 1, "{} duplicated", seen.len() - TASKS);
    assert!(all.iter().all(|id| distinct.contains(id)));
}
