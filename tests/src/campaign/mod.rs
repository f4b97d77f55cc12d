//! The fault campaign: load on a real gateway and real workers, one fault at a time, then a
//! check that every task that got a 202 ran. In the spirit of Jepsen's queue checker.
//!
//! Each scenario gets a private RabbitMQ node, a [`FaultyProxy`] in front of it, a gateway
//! process and two worker processes (prefetch 4). Load runs throughout; the fault is
//! injected once the queue is warm and healed after a while; load goes on until 202s are
//! back, then the workers drain and the checker compares what was promised with what ran.
//!
//! The cluster scenarios run on a [`PrivateCluster`] instead: three nodes, each in a network
//! namespace of its own behind two proxies (one for the gateway, one for the workers, so the
//! campaign knows which node the gateway uses), every process given all three addresses.

mod diagnose;
mod fault;
mod inject;
mod load;
mod report;
mod rig;
mod ticks;

use std::{
    collections::{HashMap, HashSet},
    time::Duration,
};

use tokio::time::Instant;
use uuid::Uuid;

pub use fault::Fault;
pub use load::{Cancel, Load, LoadShape, Outcome, Record};
pub use report::{Row, markdown, table};
pub use ticks::Ticks;

use crate::{GatewayProcess, eventually};

/// The settings every scenario runs offload with: shorter than the defaults so that a fault
/// is noticed, and healed, within a campaign of a few minutes.
const CONFIRM_TIMEOUT: &str = "2s";
/// The same, as a duration, for the checker.
pub(crate) const CONFIRM_TIMEOUT_SECS: Duration = Duration::from_secs(2);
const HEARTBEAT: &str = "2";
const CONNECT_TIMEOUT: &str = "2s";
/// A copy may take three workers down: as many runs as the limit of 2 allowed before a worker
/// dead-lettered the copy it would run a third time.
const DELIVERY_LIMIT: u32 = 3;
/// Attempts of a task that fails (poison tasks fail every one).
const MAX_ATTEMPTS: u32 = 3;
const WORKERS: usize = 2;
const PREFETCH: u16 = 4;
/// How long load runs after 202s have resumed.
const AFTER_RECOVERY: Duration = Duration::from_secs(2);
/// Longest the campaign waits for a step (recovery, drain) before calling the scenario failed.
const STEP_DEADLINE: Duration = Duration::from_secs(60);
/// Every request must be answered within the confirm timeout; this much more is allowed for
/// the HTTP exchange and scheduling on a busy machine (two cores running the load, the
/// gateway, two workers and, in the cluster scenarios, three RabbitMQ nodes, one of them
/// booting: an answer once took 2.85 s there).
pub(crate) const ANSWER_SLACK: Duration = Duration::from_secs(1);
/// On a cluster, 202s must be back this soon after the queue has a new leader (or the node
/// the gateway lost is back): the bound. Before the gateway renewed its publishing
/// channel on a nack, one run in ten of `cluster-leader-kill` took 3.5 s and a partition once
/// 5 s: RabbitMQ 3.10 nacks a channel that first published while the leader was down until
/// that node is back (docs/RELIABILITY.md).
pub(crate) const CLUSTER_RECOVERY: Duration = Duration::from_secs(2);
/// How many nodes hold each queue in the cluster scenarios (`REPLICAS`).
const CLUSTER_REPLICAS: &str = "3";

use rig::Rig;

/// Runs one scenario and checks it.
pub async fn run(fault: Fault, shape: &LoadShape) -> Row {
    let (shape, worker_env) = shaped(fault, shape);
    let mut rig = Rig::start(fault, &worker_env).await;
    let load = Load::start(&rig.gateway.url("/tasks"), &shape);

    eventually(STEP_DEADLINE, "the first 202", || {
        let first = load
            .records()
            .iter()
            .any(|r| matches!(r.outcome, Outcome::Ok(_)));
        async move { first.then_some(()) }
    })
    .await;
    let ticking = ticks::listed(&rig.gateway).await;
    if fault.touches_broker_data() {
        // Every quorum queue is made once both workers consume every kind (each worker makes
        // its kinds' queues and gates before it consumes).
        rig.await_workers_consuming().await;
        rig.node().await_raft_metadata_synced().await;
    } else {
        tokio::time::sleep(Duration::from_secs(1)).await;
    }

    let healed = rig.inject(fault).await;
    let recovery = eventually(STEP_DEADLINE, "202s to resume after the fault", || {
        let back = first_ok_since(&load.records(), healed);
        async move { back }
    })
    .await;
    tokio::time::sleep(AFTER_RECOVERY).await;
    let records = load.stop().await;

    let promised: HashSet<Uuid> = records
        .iter()
        .filter(|r| !r.poison && r.cancel.is_none())
        .filter_map(|r| match r.outcome {
            Outcome::Ok(id) => Some(id),
            _ => None,
        })
        .collect();
    let poison_promised = records
        .iter()
        .filter(|r| r.poison && matches!(r.outcome, Outcome::Ok(_)))
        .count();
    let drained = tokio::time::timeout(STEP_DEADLINE, async {
        loop {
            let done = rig.completions();
            let dead = rig.dead_lettered().await.unwrap_or(0) as usize;
            if promised.iter().all(|id| done.contains_key(id)) && dead >= poison_promised {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await
    .is_ok();

    let ticks = ticks::check(&rig, ticking).await;
    let (disagreeing, not_on_stream) = statuses_checked(&rig, &records).await;
    let events_lost = not_on_stream.len();
    let status_wrong = disagreeing.len() - events_lost;
    if !drained || status_wrong > 0 {
        let done = rig.completions();
        let lost: Vec<Uuid> = promised
            .iter()
            .filter(|id| !done.contains_key(id))
            .copied()
            .collect();
        rig.diagnose(&lost).await;
    }
    // Last, so that a log cut to its end still shows them.
    report_disagreeing(&disagreeing, &not_on_stream);
    let completions = rig.completions();
    let cancels = cancelled_and_started(&records, &rig.starts());
    // Each poison task that got a 202 must be in the dead-letter queue, once or (at least
    // once) more; counted by id, so a duplicate cannot stand in for a missing one.
    // Bounded: reading needs the queue's leader, which a quorum queue killed in its first
    // seconds may never get back on RabbitMQ 3.10 (docs/RELIABILITY.md); then none is found.
    let dead = tokio::time::timeout(Duration::from_secs(10), rig.dead_ids())
        .await
        .ok()
        .flatten()
        .unwrap_or_default();
    let poison_dead = records
        .iter()
        .filter_map(|r| match r.outcome {
            Outcome::Ok(id) if r.poison => Some(id),
            _ => None,
        })
        .filter(|id| dead.contains(id))
        .count();
    Row::new(
        fault,
        &records,
        &promised,
        &completions,
        poison_dead,
        poison_promised,
        fault.measures_recovery().then_some(recovery),
        drained,
        status_wrong,
        cancels,
        events_lost,
        ticks,
    )
}

/// The tasks whose status never ended as what happened to them, and which of those have no
/// end on the stream at all. A status that never ended may be the gateway's fault, or the
/// broker's: an attempt's end confirmed to the worker (it acks its task only then) and
/// missing from the stream; reading the stream afresh tells which.
async fn statuses_checked(rig: &Rig, records: &[Record]) -> (Vec<(Uuid, String)>, HashSet<Uuid>) {
    let disagreeing = statuses_disagreeing(&rig.gateway.url(""), records).await;
    let not_on_stream = if disagreeing.is_empty() {
        HashSet::new()
    } else {
        attempts_missing_from_stream(&rig.worker_url, &rig.queue, &disagreeing).await
    };
    (disagreeing, not_on_stream)
}

/// Prints the first few disagreeing tasks, last, so that a log cut to its end still shows them.
fn report_disagreeing(disagreeing: &[(Uuid, String)], not_on_stream: &HashSet<Uuid>) {
    for (id, line) in disagreeing.iter().take(5) {
        let why = if not_on_stream.contains(id) {
            " (its end is not on the stream)"
        } else {
            ""
        };
        eprintln!("{line}{why}");
    }
}

/// Which of the `disagreeing` tasks have no end (`succeeded`, `dead`) on the events stream,
/// read from its first event by a reader of the campaign's own.
async fn attempts_missing_from_stream(
    urls: &str,
    queue: &str,
    disagreeing: &[(Uuid, String)],
) -> HashSet<Uuid> {
    let log = crate::EventLog::follow(urls, queue);
    let read = tokio::time::timeout(STEP_DEADLINE, log.sync()).await;
    if read.is_err() {
        return HashSet::new();
    }
    let attempted: HashSet<Uuid> = log
        .events()
        .iter()
        .filter(|event| {
            matches!(
                event.event,
                offload_common::EventType::Succeeded | offload_common::EventType::Dead
            )
        })
        .filter_map(|event| event.id)
        .collect();
    disagreeing
        .iter()
        .map(|(id, _)| *id)
        .filter(|id| !attempted.contains(id))
        .collect()
}

/// How many tasks a cancel answered 200 `cancelled`, and how many of those some worker
/// started all the same (each of which it reports).
fn cancelled_and_started(records: &[Record], started: &HashSet<Uuid>) -> (usize, usize) {
    let cancelled: Vec<Uuid> = records
        .iter()
        .filter_map(|r| match (&r.outcome, r.cancel) {
            (Outcome::Ok(id), Some(Cancel::Cancelled)) => Some(*id),
            _ => None,
        })
        .collect();
    let broken: Vec<&Uuid> = cancelled.iter().filter(|id| started.contains(id)).collect();
    for id in broken.iter().take(5) {
        eprintln!("task {id}: cancelled (200) and yet started");
    }
    (cancelled.len(), broken.len())
}

/// The load and the workers' settings `fault`'s scenario runs with.
fn shaped(fault: Fault, shape: &LoadShape) -> (LoadShape, Vec<(&'static str, String)>) {
    let mut shape = shape.clone();
    let mut worker_env = Vec::new();
    if fault == Fault::PoisonTask {
        shape.poison_every = Some(20);
    }
    if fault == Fault::TwoKinds {
        shape.other_task = Some(serde_json::json!({"kind": "flaky", "payload": {"fail": 0}}));
    }
    if fault == Fault::RetriesRestart {
        shape.scripted_failures = Some(MAX_ATTEMPTS);
        worker_env.push(("RETRY_BASE", "1s".to_owned()));
        worker_env.push(("RETRY_MAX", "2s".to_owned()));
    }
    (shape, worker_env)
}

/// The tasks that got a 202 but do not end with the status that says what happened to them
/// (`succeeded`, `dead` for poison tasks) on the gateway's GET /tasks/{id}, after giving the
/// view time to catch up: a line for each, with the last answer.
async fn statuses_disagreeing(base: &str, records: &[Record]) -> Vec<(Uuid, String)> {
    let mut waiting: HashMap<Uuid, &'static str> = records
        .iter()
        .filter_map(|r| match r.outcome {
            Outcome::Ok(id) => match r.cancel {
                _ if r.poison => Some((id, "dead")),
                None => Some((id, "succeeded")),
                Some(Cancel::Cancelled) => Some((id, "cancelled")),
                // Either end is right.
                Some(Cancel::Unsure) => None,
            },
            _ => None,
        })
        .collect();
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .expect("an HTTP client with a timeout builds");
    let give_up = Instant::now() + STEP_DEADLINE;
    let mut last_seen: HashMap<Uuid, serde_json::Value> = HashMap::new();
    while !waiting.is_empty() && Instant::now() < give_up {
        let mut agreed = Vec::new();
        for (id, expected) in &waiting {
            let Ok(response) = client.get(format!("{base}/tasks/{id}")).send().await else {
                continue;
            };
            let Ok(body) = response.json::<serde_json::Value>().await else {
                continue;
            };
            if body["status"] == *expected {
                agreed.push(*id);
            } else {
                last_seen.insert(*id, body);
            }
        }
        for id in agreed {
            waiting.remove(&id);
        }
        if !waiting.is_empty() {
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
    waiting
        .iter()
        .map(|(id, expected)| {
            let seen = last_seen.get(id).map(ToString::to_string);
            let line = format!(
                "task {id}: status never became {expected}; last answer: {}",
                seen.as_deref().unwrap_or("none")
            );
            (*id, line)
        })
        .collect()
}

/// How long after `healed` the first request sent then got its 202.
fn first_ok_since(records: &[Record], healed: Instant) -> Option<Duration> {
    records
        .iter()
        .filter(|r| r.sent >= healed && matches!(r.outcome, Outcome::Ok(_)))
        .map(|r| (r.sent + r.took).saturating_duration_since(healed))
        .min()
}
