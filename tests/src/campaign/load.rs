//! Concurrent `POST /tasks` at a steady offered rate, recording what each request got.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use reqwest::StatusCode;
use tokio::{task::JoinSet, time::Instant};
use uuid::Uuid;

/// What one request got, in the terms of Jepsen's queue checker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// 202: the gateway promised the task is queued.
    Ok(Uuid),
    /// A definite refusal: the task is certainly not queued.
    Fail,
    /// No answer, a broken connection, or a 503 that says the task *may* be queued.
    Unknown,
}

/// What a cancel of an accepted task got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cancel {
    /// 200 `cancelled`: the gateway promised the task never starts.
    Cancelled,
    /// Recorded, but with no promise (202 while running, 503 `cancel_unconfirmed`, no
    /// answer): the task may run or not.
    Unsure,
}

/// One request.
#[derive(Debug, Clone)]
pub struct Record {
    /// When it was sent.
    pub sent: Instant,
    /// How long its answer took.
    pub took: Duration,
    /// Whether it was a poison task.
    pub poison: bool,
    /// What it got.
    pub outcome: Outcome,
    /// For a task cancelled right after its 202: what the cancel got (`None`: no cancel, or
    /// one certainly not recorded, so the task must run).
    pub cancel: Option<Cancel>,
}

/// How the load is shaped.
#[derive(Debug, Clone)]
pub struct LoadShape {
    /// Concurrent clients, each with its own keep-alive connection.
    pub clients: usize,
    /// Requests per second over all clients.
    pub rate: u32,
    /// Every n-th request of a client is a poison task (`{"kind": "panic"}`).
    pub poison_every: Option<u32>,
    /// With `Some(max_attempts)`, every request is a `flaky` task scripted to fail its first
    /// 0, 1, ... `max_attempts - 1` attempts in turn, or every attempt: those are counted as
    /// poison (they must end dead). Failing "the first `max_attempts`" would not do: a
    /// delivery lost with its connection counts as an attempt (docs/API.md, "Failures and the
    /// dead-letter queue"), so attempt numbers can skip one and such a task could succeed on
    /// attempt `max_attempts + 1`.
    pub scripted_failures: Option<u32>,
    /// The body of every good task.
    pub task: serde_json::Value,
    /// With `Some(body)`, every other good task is this one instead (a second kind).
    pub other_task: Option<serde_json::Value>,
    /// Longest a client waits for one answer before recording it as unknown.
    pub request_timeout: Duration,
    /// With `Some(n)`, every n-th good task is posted to run in 3 s and cancelled as soon as
    /// it is accepted.
    pub cancel_every: Option<u32>,
}

/// Load running in the background until [`Load::stop`].
pub struct Load {
    records: Arc<Mutex<Vec<Record>>>,
    running: Arc<AtomicBool>,
    clients: JoinSet<()>,
    /// The cancels under way, each in a task of its own so that a slow one (a cancel waits
    /// up to 5 s for the workers) does not hold its client's posts back.
    cancels: Arc<Mutex<JoinSet<()>>>,
}

impl Load {
    /// Starts `shape.clients` clients posting to `tasks_url`.
    pub fn start(tasks_url: &str, shape: &LoadShape) -> Self {
        let records = Arc::new(Mutex::new(Vec::new()));
        let running = Arc::new(AtomicBool::new(true));
        let cancels = Arc::new(Mutex::new(JoinSet::new()));
        let mut clients = JoinSet::new();
        let clients_f64 = f64::from(u32::try_from(shape.clients).unwrap_or(u32::MAX));
        let period = Duration::from_secs_f64(clients_f64 / f64::from(shape.rate.max(1)));
        for _ in 0..shape.clients {
            let client = reqwest::Client::builder()
                .timeout(shape.request_timeout)
                .pool_max_idle_per_host(1)
                .build()
                .expect("an HTTP client with a timeout builds");
            clients.spawn(run_client(
                client,
                tasks_url.to_owned(),
                shape.clone(),
                period,
                Arc::clone(&records),
                Arc::clone(&running),
                Arc::clone(&cancels),
            ));
        }
        Self {
            records,
            running,
            clients,
            cancels,
        }
    }

    /// The records so far.
    pub fn records(&self) -> Vec<Record> {
        self.records.lock().expect("records lock").clone()
    }

    /// Stops sending, waits for the requests in flight and returns every record.
    pub async fn stop(mut self) -> Vec<Record> {
        self.running.store(false, Ordering::SeqCst);
        while self.clients.join_next().await.is_some() {}
        let mut cancels = std::mem::take(&mut *self.cancels.lock().expect("cancels lock"));
        while cancels.join_next().await.is_some() {}
        self.records()
    }
}

async fn run_client(
    client: reqwest::Client,
    url: String,
    shape: LoadShape,
    period: Duration,
    records: Arc<Mutex<Vec<Record>>>,
    running: Arc<AtomicBool>,
    cancels: Arc<Mutex<JoinSet<()>>>,
) {
    let mut tick = tokio::time::interval(period);
    // A request that took longer than the period is not made up for with a burst.
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let poison_body = serde_json::json!({"kind": "panic"});
    let mut sent_count: u32 = 0;
    while running.load(Ordering::SeqCst) {
        tick.tick().await;
        sent_count = sent_count.wrapping_add(1);
        let (poison, body) = if let Some(max_attempts) = shape.scripted_failures {
            let fail = sent_count % (max_attempts + 1);
            let poison = fail >= max_attempts;
            let fail = if poison { u32::MAX } else { fail };
            let body = serde_json::json!({"kind": "flaky", "payload": {"fail": fail}});
            (poison, body)
        } else {
            let poison = shape
                .poison_every
                .is_some_and(|every| sent_count.is_multiple_of(every));
            let body = match &shape.other_task {
                _ if poison => &poison_body,
                Some(other) if sent_count.is_multiple_of(2) => other,
                _ => &shape.task,
            };
            (poison, body.clone())
        };
        let cancelling = !poison
            && shape.scripted_failures.is_none()
            && shape
                .cancel_every
                .is_some_and(|every| sent_count.is_multiple_of(every));
        let mut body = body;
        if cancelling {
            body["delay"] = "3s".into();
        }
        let sent = Instant::now();
        let outcome = classify(client.post(&url).json(&body).send().await).await;
        let took = sent.elapsed();
        let cancelled = match outcome {
            Outcome::Ok(id) if cancelling => Some(id),
            _ => None,
        };
        let record = Record {
            sent,
            took,
            poison,
            outcome,
            // Until the cancel's answer says otherwise: it may or may not hold.
            cancel: cancelled.map(|_| Cancel::Unsure),
        };
        records.lock().expect("records lock").push(record);
        if let Some(id) = cancelled {
            let (client, url, records) = (client.clone(), url.clone(), Arc::clone(&records));
            cancels.lock().expect("cancels lock").spawn(async move {
                let answer = cancel(&client, &url, id).await;
                let mut records = records.lock().expect("records lock");
                if let Some(record) = records
                    .iter_mut()
                    .find(|record| record.outcome == Outcome::Ok(id))
                {
                    record.cancel = answer;
                }
            });
        }
    }
}

/// Cancels task `id` and says what the answer promised.
async fn cancel(client: &reqwest::Client, tasks_url: &str, id: Uuid) -> Option<Cancel> {
    let Ok(response) = client.post(format!("{tasks_url}/{id}/cancel")).send().await else {
        return Some(Cancel::Unsure);
    };
    let status = response.status();
    let Ok(body) = response.json::<serde_json::Value>().await else {
        return Some(Cancel::Unsure);
    };
    match (status, body["status"].as_str(), body["code"].as_str()) {
        (StatusCode::OK, Some("cancelled"), _) => Some(Cancel::Cancelled),
        // Certainly not recorded (the broker or the stream was away, the gateway does not
        // know the task yet, it had ended): the task runs as any other.
        (
            _,
            _,
            Some("broker_unavailable" | "events_replaying" | "unknown_task" | "task_finished"),
        ) => None,
        _ => Some(Cancel::Unsure),
    }
}

async fn classify(response: reqwest::Result<reqwest::Response>) -> Outcome {
    let response = match response {
        Ok(response) => response,
        // Refused before the request was sent (the gateway is down): certainly not queued.
        Err(error) if error.is_connect() => return Outcome::Fail,
        // Timed out or cut mid-request: nobody knows.
        Err(_) => return Outcome::Unknown,
    };
    let status = response.status();
    let Ok(body) = response.json::<serde_json::Value>().await else {
        return Outcome::Unknown;
    };
    if status == StatusCode::ACCEPTED {
        return body["id"]
            .as_str()
            .and_then(|id| id.parse().ok())
            .map_or(Outcome::Unknown, Outcome::Ok);
    }
    // The one refusal after which the task may be queued all the same.
    let may_be_queued = body["code"] == "confirm_timeout";
    if may_be_queued {
        Outcome::Unknown
    } else {
        Outcome::Fail
    }
}
