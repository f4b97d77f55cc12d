//! Retries that back off: a failed attempt waits in the delay levels for its backoff (or the
//! delay its handler asked for), its status says `scheduled` until then, and the attempts are
//! offload's own count.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use offload_tests::{InProcessWorker, TestGateway, TestQueue, amqp_url, eventually};
use offload_worker::{Handler, HandlerError, Registry, RetryPolicy, Task};
use serde_json::{Value, json};

const DEADLINE: Duration = Duration::from_secs(60);

/// Fails its first `failures` attempts, asking for `asked` as the delay if set; records when
/// each attempt started and the attempt number it was told.
struct Flaky {
    failures: u32,
    asked: Option<Duration>,
    starts: Arc<Mutex<Vec<(Instant, u32)>>>,
    policy: Option<RetryPolicy>,
}

impl Handler for Flaky {
    const KIND: &'static str = "count";
    type Payload = serde_json::Value;
    type Output = ();

    async fn handle(&self, task: Task) -> Result<(), HandlerError> {
        self.starts
            .lock()
            .expect("starts lock")
            .push((Instant::now(), task.attempt));
        if task.attempt <= self.failures {
            let error = format!("failure {} of {}", task.attempt, self.failures);
            return Err(match self.asked {
                Some(delay) => HandlerError::retry_after(error, delay),
                None => error.into(),
            });
        }
        Ok(())
    }

    fn retry_policy(&self) -> Option<RetryPolicy> {
        self.policy
    }
}

/// Starts a worker whose `count` handler fails `failures` times, submits one task, checks
/// its status is `scheduled` after the first failure, and returns the attempts' start times
/// and numbers once it has succeeded.
async fn run(
    label: &str,
    failures: u32,
    asked: Option<Duration>,
    policy: Option<RetryPolicy>,
) -> Vec<(Instant, u32)> {
    let url = amqp_url();
    let queue = TestQueue::declare(&url, label, 5).await;
    let gateway = TestGateway::start(&url, queue.name()).await;
    let starts = Arc::new(Mutex::new(Vec::new()));
    let mut config = offload_worker::Config::new(&url, queue.name());
    // The worker-wide default, which the kind's own policy (when set) overrides.
    config.retry_base = Duration::from_secs(30);
    let worker = InProcessWorker::start(
        config,
        Registry::default().register(Flaky {
            failures,
            asked,
            starts: Arc::clone(&starts),
            policy,
        }),
    );
    let response = gateway.post_task(&json!({"kind": "count"})).await;
    let id = response.json::<Value>().await.expect("JSON")["id"]
        .as_str()
        .expect("id")
        .to_owned();

    // Between the first failure and the next attempt the task is scheduled, with a time.
    let scheduled = eventually(DEADLINE, "the task to be scheduled", || async {
        let body = gateway.task(&id, "").await.1;
        (body["status"] == "scheduled").then_some(body)
    })
    .await;
    assert!(scheduled["run_at"].is_string(), "{scheduled}");
    assert_eq!(scheduled["error"], format!("failure 1 of {failures}"));
    let body = eventually(DEADLINE, "the task to succeed", || async {
        let body = gateway.task(&id, "").await.1;
        (body["status"] == "succeeded").then_some(body)
    })
    .await;
    assert_eq!(body["attempts"], failures + 1, "{body}");
    worker.stop().await;
    gateway.stop().await;
    std::mem::take(&mut *starts.lock().expect("starts lock"))
}

/// The gaps between consecutive attempts.
fn gaps(starts: &[(Instant, u32)]) -> Vec<Duration> {
    starts.windows(2).map(|w| w[1].0 - w[0].0).collect()
}

#[tokio::test]
async fn failed_attempts_wait_their_backoff_doubling_from_the_base() {
    let policy = RetryPolicy {
        max_attempts: 5,
        base: Duration::from_secs(1),
        max: Duration::from_secs(60),
    };
    let starts = run("backoff", 2, None, Some(policy)).await;
    let numbers: Vec<u32> = starts.iter().map(|(_, n)| *n).collect();
    assert_eq!(numbers, [1, 2, 3], "offload numbers the attempts");
    // 1 s then 2 s, each ±25% jitter and rounded to the second: 1 s, then 2 or 3 s (1.5 s
    // rounds to 2); late by at most the levels' expiry work and polling.
    let gaps = gaps(&starts);
    assert!(
        gaps[0] >= Duration::from_millis(900) && gaps[0] < Duration::from_millis(1_900),
        "{gaps:?}"
    );
    assert!(
        gaps[1] >= Duration::from_millis(1_900) && gaps[1] < Duration::from_millis(3_900),
        "{gaps:?}"
    );
}

#[tokio::test]
async fn a_delay_the_handler_asks_for_wins_over_the_backoff() {
    // The worker's default backoff would wait 30 s; the handler asks for 2 s.
    let starts = run("retry-after", 1, Some(Duration::from_secs(2)), None).await;
    let gaps = gaps(&starts);
    assert!(
        gaps[0] >= Duration::from_millis(1_900) && gaps[0] < Duration::from_millis(2_900),
        "{gaps:?}"
    );
}
