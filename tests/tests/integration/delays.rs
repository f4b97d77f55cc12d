//! The delay levels: a message published through them reaches the work queue after its
//! delay, short delays never wait behind long ones, and a restart of the broker loses none;
//! tasks posted with a `delay` or a `run_at` wait there, `scheduled`, and run on time.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use lapin::{BasicProperties, Connection, ConnectionProperties};
use offload_common::{BrokerArgs, topology::delayed_task_routing_key};
use offload_tests::{
    InProcessWorker, PrivateBroker, TestGateway, TestQueue, amqp_url, eventually, publish_confirmed,
};
use offload_worker::{Handler, HandlerError, Registry, Task};
use reqwest::StatusCode;
use serde_json::{Value, json};

/// Publishes `body` into the delay levels of `exchange` for `delay`, and waits for the
/// confirm: from then on the broker holds it.
async fn publish_delayed(connection: &Connection, exchange: &str, body: &[u8], delay: Duration) {
    publish_confirmed(
        connection,
        exchange,
        &delayed_task_routing_key(delay, "sleep"),
        body,
        BasicProperties::default().with_delivery_mode(2),
    )
    .await;
}

#[tokio::test]
async fn each_delay_reaches_its_kinds_queue_on_time_and_a_long_one_blocks_no_short_one() {
    let queue = TestQueue::declare(&amqp_url(), "delays", 5).await;
    let exchange = queue.topology().delay_exchange();
    let began = Instant::now();
    // The long one first: were it at the head of the same queue, it would hold the others.
    for (body, seconds) in [("three", 3), ("one", 1), ("now", 0), ("two", 2)] {
        publish_delayed(
            queue.connection(),
            &exchange,
            body.as_bytes(),
            Duration::from_secs(seconds),
        )
        .await;
    }
    let mut arrivals = Vec::new();
    while arrivals.len() < 4 {
        let message = eventually(Duration::from_secs(10), "the next delayed message", || {
            queue.take_ready()
        })
        .await;
        let body = String::from_utf8(message.delivery.data).expect("text");
        arrivals.push((body, began.elapsed()));
    }
    let order: Vec<&str> = arrivals.iter().map(|(body, _)| body.as_str()).collect();
    assert_eq!(order, ["now", "one", "two", "three"], "{arrivals:?}");
    for ((_, took), seconds) in arrivals.iter().zip([0, 1, 2, 3]) {
        let asked = Duration::from_secs(seconds);
        // Never early; late by at most the broker's expiry and dead-lettering work (measured
        // at about 50 ms a level here) plus this test's 25 ms polling.
        assert!(*took >= asked, "{seconds} s delay arrived after {took:?}");
        assert!(
            *took < asked + Duration::from_millis(800),
            "{seconds} s delay arrived after {took:?}"
        );
    }
}

#[tokio::test]
async fn delayed_messages_survive_a_broker_restart() {
    let mut broker = PrivateBroker::start().await;
    let url = broker.url();
    let name = format!(
        "offload-test-delay-restart-{}",
        uuid::Uuid::new_v4().simple()
    );
    let topology = BrokerArgs::new(&url, &name)
        .topology()
        .with_kinds(["sleep"]);
    let sleep = topology.kind_queue("sleep");
    {
        let connection = Connection::connect(&url, ConnectionProperties::default())
            .await
            .expect("connect");
        topology.declare(&connection).await.expect("declare");
        for seconds in [1, 3, 6] {
            let body = seconds.to_string();
            publish_delayed(
                &connection,
                &topology.delay_exchange(),
                body.as_bytes(),
                Duration::from_secs(seconds),
            )
            .await;
        }
        let _ = connection.close(200, "restarting the broker".into()).await;
    }
    broker.stop().await;
    broker.start_again().await;

    let connection = Connection::connect(&url, ConnectionProperties::default())
        .await
        .expect("connect again");
    let channel = connection.create_channel().await.expect("channel");
    // At-least-once dead-lettering may deliver a message twice across the restart (a level
    // that had copied it on but not yet settled it when the node stopped): duplicates are
    // allowed, as they are everywhere in offload; a missing message is not.
    let mut arrived = std::collections::BTreeSet::new();
    while arrived.len() < 3 {
        let message = eventually(Duration::from_secs(60), "every delayed message", || async {
            channel
                .basic_get(
                    sleep.as_str().into(),
                    lapin::options::BasicGetOptions { no_ack: true },
                )
                .await
                .ok()
                .flatten()
        })
        .await;
        arrived.insert(String::from_utf8(message.delivery.data).expect("text"));
    }
    assert_eq!(arrived.into_iter().collect::<Vec<_>>(), ["1", "3", "6"]);
}

/// Records when each task started.
struct Stamps(Arc<Mutex<Vec<(uuid::Uuid, Instant)>>>);

impl Handler for Stamps {
    const KIND: &'static str = "count";
    type Payload = serde_json::Value;
    type Output = ();

    async fn handle(&self, task: Task) -> Result<(), HandlerError> {
        self.0
            .lock()
            .expect("stamps lock")
            .push((task.id, Instant::now()));
        Ok(())
    }
}

async fn post(gateway: &TestGateway, body: Value) -> (StatusCode, Value) {
    let response = gateway.post_task(&body).await;
    let status = response.status();
    (status, response.json().await.expect("JSON"))
}

#[tokio::test]
async fn a_task_posted_with_a_delay_or_a_time_is_scheduled_then_runs_on_time() {
    let url = amqp_url();
    let queue = TestQueue::declare(&url, "scheduled", 5).await;
    let gateway = TestGateway::start(&url, queue.name()).await;
    let stamps = Arc::new(Mutex::new(Vec::new()));
    let worker = InProcessWorker::start(
        offload_worker::Config::new(&url, queue.name()),
        Registry::default().register(Stamps(Arc::clone(&stamps))),
    );

    let posted = Instant::now();
    let (status, delayed) = post(&gateway, json!({"kind": "count", "delay": "2s"})).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{delayed}");
    assert_eq!(delayed["status"], "scheduled");
    assert!(delayed["run_at"].is_string(), "{delayed}");
    let at = humantime::format_rfc3339_millis(SystemTime::now() + Duration::from_secs(1));
    let (status, timed) = post(&gateway, json!({"kind": "count", "run_at": at.to_string()})).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{timed}");
    let (_, now) = post(&gateway, json!({"kind": "count"})).await;
    assert_eq!(now["status"], "queued");
    assert!(now.get("run_at").is_none(), "{now}");

    let id = |body: &Value| {
        body["id"]
            .as_str()
            .and_then(|id| id.parse().ok())
            .expect("id")
    };
    let body = gateway.task(id(&delayed), "").await.1;
    assert_eq!(body["status"], "scheduled", "{body}");
    assert_eq!(body["run_at"], delayed["run_at"], "{body}");

    let started = |wanted: uuid::Uuid| {
        let stamps = Arc::clone(&stamps);
        async move {
            stamps
                .lock()
                .expect("stamps lock")
                .iter()
                .find(|(id, _)| *id == wanted)
                .map(|(_, at)| *at)
        }
    };
    let delayed_start = eventually(Duration::from_secs(20), "the delayed task to run", || {
        started(id(&delayed))
    })
    .await;
    let timed_start = eventually(Duration::from_secs(20), "the timed task to run", || {
        started(id(&timed))
    })
    .await;
    let now_start = eventually(Duration::from_secs(20), "the plain task to run", || {
        started(id(&now))
    })
    .await;
    // Never early; late by at most the levels' expiry work (run_at is rounded to the second).
    let took = delayed_start - posted;
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_millis(2_900),
        "{took:?}"
    );
    let took = timed_start - posted;
    assert!(
        took >= Duration::from_millis(500) && took < Duration::from_secs(2),
        "{took:?}"
    );
    assert!(
        now_start - posted < Duration::from_millis(900),
        "the plain task did not wait"
    );
    let body = eventually(
        Duration::from_secs(10),
        "the delayed task's status",
        || async {
            let body = gateway.task(id(&delayed), "").await.1;
            (body["status"] == "succeeded").then_some(body)
        },
    )
    .await;
    assert_eq!(body["run_at"], Value::Null, "{body}");
    worker.stop().await;
    gateway.stop().await;
}

#[tokio::test]
async fn a_bad_or_too_long_schedule_is_refused_with_a_code_and_queues_nothing() {
    let url = amqp_url();
    let queue = TestQueue::declare(&url, "bad-schedule", 5).await;
    let gateway = TestGateway::start(&url, queue.name()).await;
    let cases = [
        (
            json!({"kind": "count", "delay": "100days"}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "delay_too_long",
        ),
        (
            json!({"kind": "count", "run_at": "2999-01-01T00:00:00Z"}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "delay_too_long",
        ),
        (
            json!({"kind": "count", "delay": "soon"}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_schedule",
        ),
        (
            json!({"kind": "count", "run_at": "tomorrow"}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_schedule",
        ),
        (
            json!({"kind": "count", "delay": "1s", "run_at": "2026-01-01T00:00:00Z"}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_schedule",
        ),
        (
            json!({"kind": "no-such-kind", "delay": "1s"}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "unknown_kind",
        ),
    ];
    for (body, expected, code) in cases {
        let (status, answer) = post(&gateway, body.clone()).await;
        assert_eq!(status, expected, "{body}: {answer}");
        assert_eq!(answer["code"], code, "{body}: {answer}");
    }
    // Nothing reached the work queue, now or later (the longest accepted delay here is none).
    assert_eq!(queue.ready().await, 0);
    gateway.stop().await;
}
