//! Backpressure and recovery: the gateway answers quickly and truthfully when the broker
//! cannot take tasks, and everything resumes by itself when it can again.

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use offload_api::Config as GatewayConfig;
use offload_tests::{
    InProcessWorker, PrivateBroker, TestGateway, TestQueue, WorkerOptions, WorkerProcess, amqp_url,
    declare_kinds, eventually, eventually_ok,
};
use offload_worker::{Handler, HandlerError, Registry, Task};
use reqwest::StatusCode;
use serde_json::{Value, json};

const DEADLINE: Duration = Duration::from_secs(60);

async fn error_of(response: reqwest::Response) -> (StatusCode, String) {
    let status = response.status();
    let body: Value = response.json().await.expect("JSON body");
    (
        status,
        body["error"].as_str().unwrap_or_default().to_owned(),
    )
}

fn private_queue_name(label: &str) -> String {
    format!("offload-test-{label}-{}", uuid::Uuid::new_v4().simple())
}

#[tokio::test]
async fn a_full_queue_turns_into_503_through_the_brokers_nack() {
    let url = amqp_url();
    let queue = TestQueue::declare_with(&url, "full", 5, Some(2)).await;
    let mut config = GatewayConfig::new(&url, queue.name());
    config.broker.queue_max_length = Some(2);
    let gateway = TestGateway::spawn(config).await;

    gateway.submit_sleep("one").await;
    gateway.submit_sleep("two").await;
    // RabbitMQ's quorum queues refuse once the length is over the limit, so one more may
    // get in; the one after that must not.
    let mut accepted = 2;
    let response = loop {
        let response = gateway.post_task(&json!({"kind": "sleep"})).await;
        if response.status() != StatusCode::ACCEPTED {
            break response;
        }
        accepted += 1;
        assert!(accepted <= 3, "the queue took more than its limit plus one");
    };

    assert!(response.headers().contains_key("retry-after"));
    let (status, message) = error_of(response).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(message.contains("nack"), "{message}");
    assert_eq!(
        queue.ready().await,
        accepted,
        "refused tasks were not queued"
    );
    gateway.stop().await;
}

/// The broker's channels: how many are open, and the highest channel number (which grows
/// with every channel a connection opens).
async fn channels(broker: &PrivateBroker) -> (usize, u64) {
    let listed = broker
        .tool_output(
            "rabbitmqctl",
            &["list_channels", "--quiet", "--no-table-headers", "number"],
        )
        .await
        .expect("rabbitmqctl list_channels answers");
    let numbers: Vec<u64> = listed
        .lines()
        .filter_map(|line| line.trim().parse().ok())
        .collect();
    (numbers.len(), numbers.iter().copied().max().unwrap_or(0))
}

/// A full queue nacks every publish, and each nack makes the gateway renew its publishing
/// channel (at most every 200 ms; on a cluster that is how it finds a new leader). A channel
/// it replaced is closed as soon as no confirm is due on it, so a queue that stays full
/// costs channel openings, not a pile of open channels.
#[tokio::test]
async fn a_queue_that_stays_full_does_not_pile_up_open_channels() {
    const RENEWALS: u64 = 10;
    let broker = PrivateBroker::start().await;
    let queue = TestQueue::declare_with(&broker.url(), "stays-full", 5, Some(1)).await;
    let mut config = GatewayConfig::new(broker.url(), queue.name());
    config.broker.queue_max_length = Some(1);
    let gateway = TestGateway::spawn(config).await;
    eventually(DEADLINE, "the queue full", || async {
        let response = gateway.post_task(&json!({"kind": "sleep"})).await;
        (response.status() == StatusCode::SERVICE_UNAVAILABLE).then_some(())
    })
    .await;
    let (open_before, highest_before) = channels(&broker).await;

    eventually(DEADLINE, "the gateway renewing its channel", || async {
        let (status, message) = error_of(gateway.post_task(&json!({"kind": "sleep"})).await).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{message}");
        let (_, highest) = channels(&broker).await;
        (highest >= highest_before + RENEWALS).then_some(())
    })
    .await;

    // Before, each replaced channel stayed open for 30 s.
    eventually_ok(
        Duration::from_secs(10),
        "the replaced channels closed",
        || async {
            let (open, _) = channels(&broker).await;
            if open <= open_before {
                Ok(())
            } else {
                Err(format!("{open} channels open, {open_before} before"))
            }
        },
    )
    .await;
    gateway.stop().await;
}

#[tokio::test]
async fn past_max_in_flight_requests_are_refused_at_once_and_none_hangs() {
    let broker = PrivateBroker::start().await;
    let queue = private_queue_name("in-flight");
    let mut config = GatewayConfig::new(broker.url(), &queue);
    config.max_in_flight = 1;
    config.confirm_timeout = Duration::from_secs(3);
    let gateway = Arc::new(TestGateway::spawn(config).await);
    declare_kinds(&broker.url(), &queue, &[]);

    // Frozen broker: the socket stays open, no confirm ever comes.
    broker.pause();
    let stuck = tokio::spawn({
        let gateway = Arc::clone(&gateway);
        async move { gateway.post_task(&json!({"kind": "sleep"})).await }
    });
    // While that one holds the only slot, the next is refused without waiting.
    let (status, message) = eventually(DEADLINE, "a request refused for MAX_IN_FLIGHT", || async {
        let (status, message) = error_of(gateway.post_task(&json!({"kind": "sleep"})).await).await;
        message
            .contains("MAX_IN_FLIGHT")
            .then_some((status, message))
    })
    .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{message}");

    // The stuck one is answered at the confirm timeout, never 202.
    let (status, message) = error_of(stuck.await.expect("request task")).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(message.contains("did not confirm"), "{message}");
    broker.resume();
}

/// A broker that stops confirming while the connection looks alive (here: frozen; in a
/// cluster, a leaderless quorum queue or a minority partition) makes /health and the metrics
/// say so with a reason after three unanswered publishes, and the first confirm clears it.
#[tokio::test]
async fn a_broker_that_stops_confirming_is_visible_in_health_and_metrics() {
    let broker = PrivateBroker::start().await;
    let queue = private_queue_name("not-confirming");
    let mut config = GatewayConfig::new(broker.url(), &queue);
    config.confirm_timeout = Duration::from_millis(300);
    let gateway = TestGateway::spawn(config).await;
    declare_kinds(&broker.url(), &queue, &[]);
    let metric = || async {
        let text = gateway
            .client()
            .get(gateway.url("/metrics"))
            .send()
            .await
            .expect("answer")
            .text()
            .await
            .expect("text");
        text.lines()
            .find(|line| line.starts_with("offload_confirms_timing_out "))
            .map(str::to_owned)
    };
    assert_eq!(
        metric().await.as_deref(),
        Some("offload_confirms_timing_out 0")
    );

    broker.pause();
    for _ in 0..offload_api::TIMEOUTS_IN_A_ROW {
        let (status, message) = error_of(gateway.post_task(&json!({"kind": "sleep"})).await).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{message}");
    }
    let response = gateway.health().await;
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    let health: Value = response.json().await.expect("JSON");
    assert_eq!(
        health["broker"], "connected",
        "the connection still looks up: {health}"
    );
    assert_eq!(health["confirms"], "timing_out", "{health}");
    assert!(
        health["reason"]
            .as_str()
            .is_some_and(|reason| reason.contains("leader")),
        "{health}"
    );
    assert_eq!(
        metric().await.as_deref(),
        Some("offload_confirms_timing_out 1")
    );

    broker.resume();
    let accepted = eventually(DEADLINE, "a task confirmed again", || async {
        let response = gateway.post_task(&json!({"kind": "sleep"})).await;
        (response.status() == StatusCode::ACCEPTED).then_some(())
    });
    accepted.await;
    let health: Value = gateway.health().await.json().await.expect("JSON");
    assert_eq!(health["confirms"], "ok", "{health}");
    assert_eq!(
        metric().await.as_deref(),
        Some("offload_confirms_timing_out 0")
    );
    gateway.stop().await;
}

#[tokio::test]
async fn a_memory_alarm_blocks_publishing_and_clearing_it_resumes() {
    let broker = PrivateBroker::start().await;
    let queue = private_queue_name("alarm");
    let mut config = GatewayConfig::new(broker.url(), &queue);
    config.confirm_timeout = Duration::from_secs(2);
    let gateway = TestGateway::spawn(config).await;
    declare_kinds(&broker.url(), &queue, &[]);
    gateway.submit_sleep("before the alarm").await;

    broker.memory_alarm(true);
    let message = eventually(DEADLINE, "publishes refused as blocked", || async {
        let (status, message) = error_of(gateway.post_task(&json!({"kind": "sleep"})).await).await;
        assert_ne!(
            status,
            StatusCode::ACCEPTED,
            "no 202 while the broker blocks publishers"
        );
        message.contains("refusing new messages").then_some(message)
    })
    .await;
    assert!(message.contains("memory or disk alarm"), "{message}");
    let health = gateway.health().await;
    assert_eq!(health.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        health.json::<Value>().await.expect("JSON")["broker"],
        "blocked"
    );

    broker.memory_alarm(false);
    eventually(
        DEADLINE,
        "202s to resume after the alarm clears",
        || async {
            let response = gateway.post_task(&json!({"kind": "sleep"})).await;
            (response.status() == StatusCode::ACCEPTED).then_some(())
        },
    )
    .await;
    gateway.stop().await;
}

#[tokio::test]
async fn gateway_and_worker_recover_by_themselves_after_the_broker_is_killed() {
    let mut broker = PrivateBroker::start().await;
    let queue = private_queue_name("crash");
    let gateway = TestGateway::start(&broker.url(), &queue).await;
    let worker = WorkerProcess::start(&broker.url(), &queue, &WorkerOptions::default()).await;
    let before = gateway.submit_sleep("before the crash").await;
    eventually(DEADLINE, "the first task to complete", || async {
        worker.completed().contains(&before).then_some(())
    })
    .await;

    broker.await_raft_metadata_synced().await;
    broker.kill9().await;
    eventually(DEADLINE, "health to report the broker gone", || async {
        let response = gateway.health().await;
        (response.status() == StatusCode::SERVICE_UNAVAILABLE).then_some(())
    })
    .await;
    let (status, _) = error_of(gateway.post_task(&json!({"kind": "sleep"})).await).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);

    broker.start_again().await;
    let task = json!({"kind": "sleep", "payload": {"message": "after the crash."}});
    let after = gateway.submit_once_accepted(&task, DEADLINE).await;
    eventually(
        DEADLINE,
        "the same worker process to run a task again",
        || async { worker.completed().contains(&after).then_some(()) },
    )
    .await;
    let health = gateway.health().await;
    assert_eq!(health.status(), StatusCode::OK);
    gateway.stop().await;

    // The worker told of the crash in its own words, each line JSON with scalar fields: not
    // the AMQP client's lines (`error doing IO ... Error { kind: IOError(..) }`, Rust's
    // debug output), and no debug output of a list (`"[\"sleep\"]"`).
    let log = worker.log();
    let said = |text: &str| {
        log.iter().any(|line| {
            line["message"]
                .as_str()
                .is_some_and(|message| message.contains(text))
        })
    };
    assert!(said("lost the broker connection"), "{log:#?}");
    let debug_output = log.iter().find(|line| {
        let line = line.to_string();
        line.contains("error doing IO") || line.contains("Error {") || line.contains("[\\\"")
    });
    assert!(debug_output.is_none(), "{debug_output:?}");
    let start = log
        .iter()
        .find(|line| line["message"] == "offload-worker starting")
        .expect("the start-up line");
    let kinds = start["kinds"].as_str().expect("kinds as text");
    assert!(kinds.split(',').any(|kind| kind == "sleep"), "{start}");
    assert!(
        start["concurrency"]
            .as_str()
            .expect("text")
            .contains("sleep=1"),
        "{start}"
    );
}

/// Never finishes.
struct Hangs(Arc<AtomicUsize>);

impl Handler for Hangs {
    const KIND: &'static str = "hang";
    type Payload = serde_json::Value;
    type Output = ();

    async fn handle(&self, _task: Task) -> Result<(), HandlerError> {
        self.0.fetch_add(1, Ordering::SeqCst);
        std::future::pending::<()>().await;
        Ok(())
    }
}

#[tokio::test]
async fn a_handler_past_its_deadline_fails_the_attempt_and_ends_dead_lettered() {
    const ATTEMPTS: u32 = 2;
    let url = amqp_url();
    let queue = TestQueue::declare(&url, "deadline", 5).await;
    let gateway = TestGateway::start(&url, queue.name()).await;
    let attempts = Arc::new(AtomicUsize::new(0));
    let mut config = offload_worker::Config::new(&url, queue.name());
    config.max_attempts = ATTEMPTS;
    config.retry_base = Duration::ZERO;
    config.handler_timeout = Duration::from_millis(100);
    let registry = Registry::default().register(Hangs(Arc::clone(&attempts)));
    let worker = InProcessWorker::start(config, registry);

    let response = gateway.post_task(&json!({"kind": "hang"})).await;
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    eventually(DEADLINE, "the task in the dead-letter queue", || async {
        (queue.dead().await == 1).then_some(())
    })
    .await;
    assert_eq!(attempts.load(Ordering::SeqCst), ATTEMPTS as usize);

    worker.stop().await;
    gateway.stop().await;
}
