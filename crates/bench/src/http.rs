//! Load on `POST /tasks`: closed loop for throughput, open loop for latency.

use std::{
    collections::BTreeMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, SystemTime},
};

use reqwest::StatusCode;
use tokio::time::Instant;
use uuid::Uuid;

use crate::broker::{Measured, measure, measure_rate};

/// The task a request submits: zero work, of `kind`.
fn body(kind: &str) -> Vec<u8> {
    format!(r#"{{"kind":"{kind}","payload":{{"message":"bench"}}}}"#).into_bytes()
}

/// A client; with `key`, every request carries `Authorization: Bearer <key>`.
fn client(key: Option<&str>) -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    if let Some(key) = key {
        let value = format!("Bearer {key}")
            .parse()
            .expect("a bench key is a valid header value");
        headers.insert(reqwest::header::AUTHORIZATION, value);
    }
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .default_headers(headers)
        .build()
        .expect("an HTTP client builds")
}

/// Posts one task; its id, or what went wrong (a status code, or the client's error kind).
async fn post(client: &reqwest::Client, url: &str, body: Vec<u8>) -> Result<Uuid, String> {
    let response = client
        .post(url)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .map_err(|e| {
            if e.is_timeout() {
                "timeout".to_owned()
            } else if e.is_connect() {
                "connect".to_owned()
            } else {
                "other".to_owned()
            }
        })?;
    let status = response.status();
    if status != StatusCode::ACCEPTED {
        return Err(status.as_u16().to_string());
    }
    let answer: serde_json::Value = response.json().await.map_err(|_| "body".to_owned())?;
    answer["id"]
        .as_str()
        .and_then(|id| id.parse().ok())
        .ok_or_else(|| "no id".to_owned())
}

/// `connections` clients, each on its own keep-alive connection, posting back to back for
/// `length`, with the API key `key` if given. Returns 202s per second and the number of
/// other answers.
pub async fn throughput(
    url: &str,
    key: Option<&str>,
    connections: usize,
    length: Duration,
) -> (f64, u64) {
    throughput_of(url, key, connections, length, &["sleep"]).await
}

/// [`throughput`], each client posting tasks of `kinds` in turn.
pub async fn throughput_of(
    url: &str,
    key: Option<&str>,
    connections: usize,
    length: Duration,
    kinds: &[&str],
) -> (f64, u64) {
    let (measured, errors) =
        throughput_measured(url, key, connections, length, kinds, || None).await;
    (measured.rate, errors)
}

/// [`throughput_of`], with the CPU time `cpu` reads (the gateway's, so far) per 202 over the
/// same window.
pub async fn throughput_measured(
    url: &str,
    key: Option<&str>,
    connections: usize,
    length: Duration,
    kinds: &[&str],
    cpu: impl Fn() -> Option<Duration>,
) -> (Measured, u64) {
    let bodies: Arc<Vec<Vec<u8>>> = Arc::new(kinds.iter().map(|kind| body(kind)).collect());
    let accepted = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let running = Arc::new(AtomicBool::new(true));
    let mut clients = Vec::new();
    for n in 0..connections {
        let (url, key, accepted, errors, running, bodies) = (
            url.to_owned(),
            key.map(str::to_owned),
            Arc::clone(&accepted),
            Arc::clone(&errors),
            Arc::clone(&running),
            Arc::clone(&bodies),
        );
        clients.push(tokio::spawn(async move {
            // One client each: one connection each, as 64 independent callers would have.
            let client = client(key.as_deref());
            let mut next = n;
            while running.load(Ordering::Relaxed) {
                next = next.wrapping_add(1);
                let body = bodies[next % bodies.len()].clone();
                match post(&client, &url, body).await {
                    Ok(_) => accepted.fetch_add(1, Ordering::Relaxed),
                    Err(_) => errors.fetch_add(1, Ordering::Relaxed),
                };
            }
        }));
    }
    let measured = measure(&accepted, length, cpu).await;
    running.store(false, Ordering::Relaxed);
    for client in clients {
        let _ = client.await;
    }
    (measured, errors.load(Ordering::Relaxed))
}

/// `clients` clients, each on its own keep-alive connection, posting batches of `size`
/// zero-work tasks of `kind` to `POST /tasks/batch` (at `batch_url`) back to back for `length`
/// after a warm-up of a fifth. Returns the tasks queued per second and the tasks not queued
/// (refused in a batch's answer, or in a batch that got no 200).
pub async fn batch_throughput(
    batch_url: &str,
    clients: usize,
    size: usize,
    kind: &str,
    length: Duration,
) -> (f64, u64) {
    let task = format!(r#"{{"kind":"{kind}","payload":{{"message":"bench"}}}}"#);
    let body: Arc<Vec<u8>> =
        Arc::new(format!(r#"{{"tasks":[{}]}}"#, vec![task; size].join(",")).into_bytes());
    let queued = Arc::new(AtomicU64::new(0));
    let refused = Arc::new(AtomicU64::new(0));
    let running = Arc::new(AtomicBool::new(true));
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (url, body, queued, refused, running) = (
            batch_url.to_owned(),
            Arc::clone(&body),
            Arc::clone(&queued),
            Arc::clone(&refused),
            Arc::clone(&running),
        );
        tasks.push(tokio::spawn(async move {
            let client = reqwest::Client::builder()
                .timeout(Duration::from_secs(60))
                .build()
                .expect("an HTTP client builds");
            while running.load(Ordering::Relaxed) {
                let answer = client
                    .post(&url)
                    .header("content-type", "application/json")
                    .body(body.as_ref().clone())
                    .send()
                    .await;
                let counts = match answer {
                    Ok(response) if response.status() == StatusCode::OK => response
                        .json::<serde_json::Value>()
                        .await
                        .ok()
                        .and_then(|answer| {
                            Some((answer["queued"].as_u64()?, answer["refused"].as_u64()?))
                        }),
                    _ => None,
                };
                let (ok, not) = counts.unwrap_or((0, size as u64));
                queued.fetch_add(ok, Ordering::Relaxed);
                refused.fetch_add(not, Ordering::Relaxed);
            }
        }));
    }
    let rate = measure_rate(&queued, length).await;
    running.store(false, Ordering::Relaxed);
    for task in tasks {
        let _ = task.await;
    }
    (rate, refused.load(Ordering::Relaxed))
}

/// What an open-loop run saw.
#[derive(Debug, Default)]
pub struct OpenLoop {
    /// Latency of each answered request, from its scheduled send time.
    pub latencies: Vec<Duration>,
    /// Requests that got no 202, by what they got instead.
    pub errors: BTreeMap<String, u64>,
    /// (task id, when its 202 arrived), for the end-to-end measure.
    pub accepted: Vec<(Uuid, SystemTime)>,
}

/// Sends at `rate` per second for `length` over `connections` keep-alive connections, as
/// wrk2 does: each connection has its own schedule, and a request is timed from the moment
/// the schedule said to send it, not from when the connection was free to, so a slow answer
/// cannot hide the requests queued behind it (no coordinated omission). Each sender holds one
/// bare HTTP/1.1 connection (hyper's, no pool), opened before its schedule starts: the same
/// load sent through reqwest clients read a p99 of about 100 ms where this reads under 10 ms
/// against the same gateway, and wrk at that rate 6 ms (docs/PERFORMANCE.md).
pub async fn open_loop(url: &str, rate: f64, length: Duration, connections: usize) -> OpenLoop {
    let (authority, path) = url
        .strip_prefix("http://")
        .and_then(|rest| rest.split_once('/'))
        .map(|(authority, path)| (authority.to_owned(), format!("/{path}")))
        .expect("an http:// URL with a path");
    let results = Arc::new(Mutex::new(OpenLoop::default()));
    let connections_f64 = f64::from(u32::try_from(connections).unwrap_or(u32::MAX));
    // Each connection sends every `period`; together they offer `rate`.
    let period = Duration::from_secs_f64(connections_f64 / rate.max(1.0));
    let mut senders = Vec::new();
    for _ in 0..connections {
        senders.push(open_connection(&authority).await);
    }
    let start = Instant::now();
    let end = start + length;
    let mut tasks = tokio::task::JoinSet::new();
    for (connection, sender) in senders.into_iter().enumerate() {
        let (authority, path, results) = (authority.clone(), path.clone(), Arc::clone(&results));
        // Stagger the connections evenly over one period.
        let offset =
            period.mul_f64(f64::from(u32::try_from(connection).unwrap_or(0)) / connections_f64);
        tasks.spawn(async move {
            let Some(mut sender) = sender else {
                *results
                    .lock()
                    .expect("results lock")
                    .errors
                    .entry("connect".into())
                    .or_insert(0) += 1;
                return;
            };
            let mut scheduled = start + offset;
            while scheduled < end {
                tokio::time::sleep_until(scheduled).await;
                let outcome = post_on(&mut sender, &authority, &path).await;
                let took = scheduled.elapsed();
                let mut results = results.lock().expect("results lock");
                match outcome {
                    Ok(id) => {
                        results.latencies.push(took);
                        results.accepted.push((id, SystemTime::now()));
                    }
                    Err(kind) => *results.errors.entry(kind).or_insert(0) += 1,
                }
                drop(results);
                scheduled += period;
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    std::mem::take(&mut *results.lock().expect("results lock"))
}

type Sender = hyper::client::conn::http1::SendRequest<http_body_util::Full<bytes::Bytes>>;

/// One HTTP/1.1 connection to `authority`, its driver spawned; `None` if it cannot be made.
async fn open_connection(authority: &str) -> Option<Sender> {
    let stream = tokio::net::TcpStream::connect(authority).await.ok()?;
    stream.set_nodelay(true).ok()?;
    let (sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .ok()?;
    tokio::spawn(connection);
    Some(sender)
}

/// Posts one zero-work task on `sender`: its id, or what went wrong.
async fn post_on(sender: &mut Sender, authority: &str, path: &str) -> Result<Uuid, String> {
    use http_body_util::BodyExt;
    sender.ready().await.map_err(|_| "connection".to_owned())?;
    let request = hyper::Request::post(path)
        .header("host", authority)
        .header("content-type", "application/json")
        .body(http_body_util::Full::new(bytes::Bytes::from(body("sleep"))))
        .map_err(|_| "request".to_owned())?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|_| "other".to_owned())?;
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|_| "body".to_owned())?
        .to_bytes();
    if status != StatusCode::ACCEPTED {
        return Err(status.as_u16().to_string());
    }
    let answer: serde_json::Value = serde_json::from_slice(&body).map_err(|_| "body".to_owned())?;
    answer["id"]
        .as_str()
        .and_then(|id| id.parse().ok())
        .ok_or_else(|| "no id".to_owned())
}

/// One GET on a fresh connection: its status and how long the answer took, or `None` if
/// none came within 10 s.
pub async fn time_one_request(url: &str) -> Option<(u16, Duration)> {
    let started = Instant::now();
    let response = client(None).get(url).send().await.ok()?;
    Some((response.status().as_u16(), started.elapsed()))
}

/// `connections` clients each asking `GET <base>/tasks/{id}` back to back for `length`, ids
/// drawn in turn from `ids`. Returns 200s per second and the number of other answers.
pub async fn status_throughput(
    base: &str,
    ids: Arc<Vec<Uuid>>,
    connections: usize,
    length: Duration,
) -> (f64, u64) {
    let answered = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let running = Arc::new(AtomicBool::new(true));
    let mut clients = Vec::new();
    for connection in 0..connections {
        let (base, ids, answered, errors, running) = (
            base.to_owned(),
            Arc::clone(&ids),
            Arc::clone(&answered),
            Arc::clone(&errors),
            Arc::clone(&running),
        );
        clients.push(tokio::spawn(async move {
            let client = client(None);
            let mut next = connection * 7919;
            while running.load(Ordering::Relaxed) {
                let id = ids[next % ids.len()];
                next += connections;
                let ok = client
                    .get(format!("{base}/tasks/{id}"))
                    .send()
                    .await
                    .is_ok_and(|response| response.status() == StatusCode::OK);
                if ok {
                    answered.fetch_add(1, Ordering::Relaxed);
                } else {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    let rate = measure_rate(&answered, length).await;
    running.store(false, Ordering::Relaxed);
    for client in clients {
        let _ = client.await;
    }
    (rate, errors.load(Ordering::Relaxed))
}

/// Polls `GET <base>/tasks/{id}` until it answers 200 (the gateway has read that far), or
/// `deadline` passes; whether it did.
pub async fn wait_for_status(base: &str, id: Uuid, deadline: Duration) -> bool {
    let client = client(None);
    let give_up = Instant::now() + deadline;
    while Instant::now() < give_up {
        if let Ok(response) = client.get(format!("{base}/tasks/{id}")).send().await
            && response.status() == StatusCode::OK
        {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

/// Waits until the gateway at `base` (API key `key`, if it wants one) has read its events
/// stream up to the present: it then answers 404, not 503 (still reading), for an id nobody
/// submitted.
pub async fn wait_until_live(base: &str, key: Option<&str>, deadline: Duration) {
    let client = client(key);
    let give_up = Instant::now() + deadline;
    let probe = format!("{base}/tasks/{}", Uuid::new_v4());
    while Instant::now() < give_up {
        if let Ok(response) = client.get(&probe).send().await
            && response.status() == StatusCode::NOT_FOUND
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
