//! Periodic tasks: a schedule fires each tick once however many gateways run, goes on when the
//! gateway firing it dies, follows its `missed` policy when every gateway was down, and lives
//! in the broker.

use std::{
    collections::HashMap,
    time::{Duration, SystemTime},
};

use offload_common::EventType;
use offload_tests::{
    EventLog, GatewayProcess, TestQueue, WorkerOptions, WorkerProcess, amqp_url, eventually,
    free_port,
};
use reqwest::StatusCode;
use serde_json::{Value, json};
use uuid::Uuid;

const DEADLINE: Duration = Duration::from_secs(60);

/// Each tick of `schedule` that made a task, with its task ids and when they were queued.
fn ticks(events: &EventLog, schedule: &str) -> HashMap<SystemTime, Vec<(Uuid, SystemTime)>> {
    let mut ticks: HashMap<SystemTime, Vec<(Uuid, SystemTime)>> = HashMap::new();
    for event in events.events() {
        if event.event == EventType::Queued
            && event.schedule.as_deref() == Some(schedule)
            && let (Some(tick), Some(id)) = (event.tick, event.id)
        {
            ticks.entry(tick).or_default().push((id, event.at));
        }
    }
    ticks
}

fn gateway_env(url: &str, queue: &str) -> Vec<(&'static str, String)> {
    vec![("AMQP_URL", url.to_owned()), ("QUEUE", queue.to_owned())]
}

/// `PUT /schedules/{name}`, once the gateway has read the schedules (503 before).
async fn put(gateway: &GatewayProcess, name: &str, body: &Value) -> (StatusCode, Value) {
    eventually(DEADLINE, "the gateway to take the schedule", || async {
        let response = reqwest::Client::new()
            .put(gateway.url(&format!("/schedules/{name}")))
            .json(body)
            .send()
            .await
            .ok()?;
        let status = response.status();
        let answer: Value = response.json().await.ok()?;
        (answer["code"] != "events_replaying").then_some((status, answer))
    })
    .await
}

/// The pid of the gateway that fires the schedules, from its latest `scheduler` event.
fn leader(events: &EventLog) -> Option<u32> {
    events
        .events()
        .iter()
        .rev()
        .find(|event| event.event == EventType::Scheduler)
        .and_then(|event| event.worker.as_deref()?.rsplit('-').next()?.parse().ok())
}

/// Three gateways, `every: 1s` for 20 s: one task per tick, none twice; the gateway firing
/// them is killed: the next ticks still fire once each, within a second of their time.
#[tokio::test]
async fn every_tick_fires_once_on_three_gateways_and_goes_on_when_its_gateway_dies() {
    let url = amqp_url();
    let queue = TestQueue::declare(&url, "schedules", 5).await;
    let worker = WorkerProcess::start(&url, queue.name(), &WorkerOptions::default()).await;
    let events = EventLog::follow(&url, queue.name());
    let mut gateways = Vec::new();
    for _ in 0..3 {
        gateways.push(GatewayProcess::start(free_port(), &gateway_env(&url, queue.name())).await);
    }
    let body = json!({"task": {"kind": "sleep"}, "every": "1s"});
    let (code, answer) = put(&gateways[0], "tick", &body).await;
    assert_eq!(code, StatusCode::CREATED, "{answer}");
    assert_eq!(answer["next"].as_array().map(Vec::len), Some(3), "{answer}");
    let began = SystemTime::now();
    eventually(Duration::from_secs(40), "20 s of ticks", || async {
        (SystemTime::now() > began + Duration::from_secs(20)).then_some(())
    })
    .await;
    events.sync().await;
    let fired = ticks(&events, "tick");
    let in_window = fired
        .keys()
        .filter(|tick| **tick > began && **tick <= began + Duration::from_secs(20))
        .count();
    assert!((19..=21).contains(&in_window), "{in_window} ticks in 20 s");
    for (tick, tasks) in &fired {
        assert_eq!(tasks.len(), 1, "tick {tick:?} made {tasks:?}");
    }

    let leading = leader(&events).expect("a gateway says it fires the schedules");
    let index = gateways
        .iter()
        .position(|gateway| gateway.pid() == leading)
        .expect("the leader is one of the three");
    let mut dead = gateways.remove(index);
    dead.kill();
    let killed = SystemTime::now();
    eventually(Duration::from_secs(20), "5 s after the kill", || async {
        (SystemTime::now() > killed + Duration::from_secs(5)).then_some(())
    })
    .await;
    events.sync().await;
    let after: Vec<(SystemTime, Vec<(Uuid, SystemTime)>)> = ticks(&events, "tick")
        .into_iter()
        .filter(|(tick, _)| *tick > killed && *tick <= killed + Duration::from_secs(4))
        .collect();
    assert!(
        after.len() >= 4,
        "{} ticks in the 4 s after the kill",
        after.len()
    );
    for (tick, tasks) in &after {
        assert_eq!(tasks.len(), 1, "tick {tick:?} made {tasks:?}");
        let late = tasks[0].1.duration_since(*tick).unwrap_or_default();
        assert!(
            late < Duration::from_secs(1),
            "tick {tick:?} fired {late:?} late"
        );
    }
    assert_ne!(leader(&events), Some(leading), "another gateway leads");
    let status: Value = reqwest::get(gateways[0].url("/schedules/tick"))
        .await
        .expect("answer")
        .json()
        .await
        .expect("JSON");
    assert!(status["last_tick"].is_string(), "{status}");
    assert!(
        !status["recent"].as_array().is_some_and(Vec::is_empty),
        "{status}"
    );
    drop(worker);
}

/// Every gateway down for 5 ticks, then one back: `skip` fires none of them but, at most, the
/// one due within a second of the last gateway's end; `once` fires the latest of them, once.
#[tokio::test]
async fn ticks_missed_while_every_gateway_was_down_follow_the_missed_policy() {
    let url = amqp_url();
    let queue = TestQueue::declare(&url, "schedules-missed", 5).await;
    let worker = WorkerProcess::start(&url, queue.name(), &WorkerOptions::default()).await;
    let events = EventLog::follow(&url, queue.name());
    let env = gateway_env(&url, queue.name());
    let mut gateway = GatewayProcess::start(free_port(), &env).await;
    for (name, missed) in [("skips", "skip"), ("once", "once")] {
        let body = json!({"task": {"kind": "sleep"}, "every": "1s", "missed": missed});
        assert_eq!(put(&gateway, name, &body).await.0, StatusCode::CREATED);
    }
    eventually(DEADLINE, "both schedules firing", || async {
        events.sync().await;
        (!ticks(&events, "skips").is_empty() && !ticks(&events, "once").is_empty()).then_some(())
    })
    .await;
    gateway.kill();
    let down = SystemTime::now();
    eventually(Duration::from_secs(20), "5.5 s with no gateway", || async {
        (SystemTime::now() > down + Duration::from_millis(5500)).then_some(())
    })
    .await;
    let back = SystemTime::now();
    let gateway = GatewayProcess::start(free_port(), &env).await;
    eventually(DEADLINE, "ticks after the return", || async {
        events.sync().await;
        ticks(&events, "skips")
            .keys()
            .any(|tick| *tick > back + Duration::from_secs(2))
            .then_some(())
    })
    .await;
    let gap = |name| {
        ticks(&events, name)
            .into_keys()
            .filter(|tick| *tick > down + Duration::from_secs(1) && *tick < back)
            .count()
    };
    assert_eq!(gap("skips"), 0, "skip fires nothing missed");
    assert_eq!(gap("once"), 1, "once fires the latest missed tick, once");
    let metrics = reqwest::get(gateway.url("/metrics"))
        .await
        .expect("answer")
        .text()
        .await
        .expect("text");
    let missed = metrics
        .lines()
        .find(|line| line.starts_with("offload_schedule_ticks_missed_total{schedule=\"skips\"}"))
        .and_then(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .unwrap_or(0.0);
    assert!(
        missed >= 3.0,
        "the skipped ticks are counted: {missed}\n{metrics}"
    );
    drop((gateway, worker));
}

/// Schedules live in the broker: after a restart of every gateway and of the broker, they are
/// still there and fire.
#[tokio::test]
async fn schedules_outlive_a_restart_of_the_broker_and_of_every_gateway() {
    let mut broker = offload_tests::PrivateBroker::start().await;
    let url = broker.url();
    let queue = format!("offload-test-schedules-durable-{}", Uuid::new_v4().simple());
    let env = gateway_env(&url, &queue);
    let worker = WorkerProcess::start(&url, &queue, &WorkerOptions::default()).await;
    let mut gateway = GatewayProcess::start(free_port(), &env).await;
    let body =
        json!({"task": {"kind": "sleep"}, "cron": "*/2 * * * * *", "timezone": "Europe/Berlin"});
    assert_eq!(put(&gateway, "durable", &body).await.0, StatusCode::CREATED);
    gateway.kill();
    broker.stop().await;
    broker.start_again().await;
    let gateway = GatewayProcess::start(free_port(), &env).await;
    let listed: Value = eventually(DEADLINE, "the schedules read back", || async {
        let response = reqwest::get(gateway.url("/schedules")).await.ok()?;
        (response.status() == StatusCode::OK).then_some(())?;
        response.json().await.ok()
    })
    .await;
    assert_eq!(listed["schedules"][0]["name"], "durable", "{listed}");
    let events = EventLog::follow(&url, &queue);
    let back = SystemTime::now();
    eventually(DEADLINE, "a tick after the restart", || async {
        events.sync().await;
        ticks(&events, "durable")
            .keys()
            .any(|tick| *tick > back)
            .then_some(())
    })
    .await;
    drop((gateway, worker));
}

/// What cannot tick is refused with a code that says what to fix; a kind no worker runs as
/// `POST /tasks` refuses it.
#[tokio::test]
async fn bad_schedules_are_refused_with_what_to_fix() {
    let url = amqp_url();
    let queue = TestQueue::declare(&url, "schedules-bad", 5).await;
    let gateway = GatewayProcess::start(free_port(), &gateway_env(&url, queue.name())).await;
    offload_tests::declare_kinds(&url, queue.name(), &[]);
    for (name, body, code) in [
        (
            "a",
            json!({"task": {"kind": "sleep"}, "cron": "61 * * * *"}),
            "invalid_cron",
        ),
        (
            "a",
            json!({"task": {"kind": "sleep"}, "cron": "* * * * *", "timezone": "Mars/Base"}),
            "invalid_timezone",
        ),
        (
            "a",
            json!({"task": {"kind": "sleep"}, "every": "10ms"}),
            "invalid_every",
        ),
        ("a", json!({"task": {"kind": "sleep"}}), "cron_or_every"),
        (
            "Bad Name",
            json!({"task": {"kind": "sleep"}, "every": "1s"}),
            "invalid_schedule_name",
        ),
        (
            "a",
            json!({"task": {"kind": "nobody-runs-this"}, "every": "1s"}),
            "unknown_kind",
        ),
    ] {
        let (status, answer) = put(&gateway, name, &body).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}: {answer}");
        assert_eq!(answer["code"], code, "{body}: {answer}");
    }
    let missing = reqwest::get(gateway.url("/schedules/none"))
        .await
        .expect("answer");
    assert_eq!(missing.status(), StatusCode::NOT_FOUND);
}

/// `SCHEDULES_FILE`: its schedules are put when a gateway starts, and fire; a file that does
/// not read stops the gateway with a message naming the entry.
#[tokio::test]
async fn a_schedules_file_is_put_at_start_and_a_bad_one_stops_the_gateway() {
    let url = amqp_url();
    let queue = TestQueue::declare(&url, "schedules-file", 5).await;
    let worker = WorkerProcess::start(&url, queue.name(), &WorkerOptions::default()).await;
    let events = EventLog::follow(&url, queue.name());
    let dir = tempfile::tempdir().expect("a temporary directory");
    let good = dir.path().join("schedules.toml");
    std::fs::write(
        &good,
        "[[schedule]]\nname = \"from-file\"\nevery = \"1s\"\ntask = { kind = \"sleep\" }\n",
    )
    .expect("write the file");
    let mut env = gateway_env(&url, queue.name());
    env.push(("SCHEDULES_FILE", good.display().to_string()));
    let gateway = GatewayProcess::start(free_port(), &env).await;
    let started = SystemTime::now();
    eventually(DEADLINE, "the file's schedule firing", || async {
        events.sync().await;
        ticks(&events, "from-file")
            .keys()
            .any(|tick| *tick > started)
            .then_some(())
    })
    .await;
    drop(gateway);

    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "[[schedule]]\nname = \"broken\"\ncron = \"61 * * * *\"\ntask = { kind = \"sleep\" }\n",
    )
    .expect("write the file");
    let output = std::process::Command::new(offload_tests::binary("offload-api-under-test"))
        .env("AMQP_URL", &url)
        .env("QUEUE", queue.name())
        .env("BIND", format!("127.0.0.1:{}", free_port()))
        .env("SCHEDULES_FILE", &bad)
        .output()
        .expect("run the gateway");
    assert!(
        !output.status.success(),
        "a bad SCHEDULES_FILE must stop the gateway"
    );
    let said = String::from_utf8_lossy(&output.stderr).to_string()
        + &String::from_utf8_lossy(&output.stdout);
    assert!(said.contains("schedule 1 ('broken')"), "{said}");
    drop(worker);
}
