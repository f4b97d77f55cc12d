//! HTTP targets, with the real example apps of `examples/` (Flask, Express) as targets: signed
//! calls, round robin over two workers into one app, results, retries after backoff or after
//! `Retry-After`, permanent failures dead with the answer in their reason, timeouts, and the
//! per-target concurrency limit. Rust handlers are `rust_handlers.rs`'s.

use std::{collections::HashMap, io::Write, time::Duration};

use offload_tests::{
    Example, ExampleTarget, InProcessWorker, TestGateway, TestQueue, WorkerOptions, WorkerProcess,
    amqp_url, header_text,
};
use reqwest::StatusCode;
use serde_json::{Value, json};
use uuid::Uuid;

const DEADLINE: Duration = Duration::from_secs(60);
const SECRET: &str = "whsec_integration";
/// One `.` of the tutorial's work, in the examples.
const SECONDS_PER_DOT: f64 = 0.05;

#[tokio::test]
async fn the_python_example_runs_tasks_for_offload() {
    whole_loop(Example::Python).await;
}

#[tokio::test]
async fn the_node_example_runs_tasks_for_offload() {
    whole_loop(Example::Node).await;
}

/// One example app behind three kinds (plain, limited to 2 calls in flight per worker, and
/// cut off after 500 ms), two workers, and every behaviour the answers decide.
async fn whole_loop(example: Example) {
    let target = ExampleTarget::start(example, SECRET, SECONDS_PER_DOT).await;
    refuses_bad_signatures(&target.url()).await;

    let url = amqp_url();
    let queue = TestQueue::declare(&url, &format!("targets-{example:?}").to_lowercase(), 5).await;
    let gateway = TestGateway::start(&url, queue.name()).await;
    let mut file = tempfile::NamedTempFile::new().expect("a temporary file");
    write!(
        file,
        r#"
[targets.work]
url = "{url}"

[targets.limited]
url = "{url}"
concurrency = 2

[targets.hang]
url = "{url}"
timeout = "500ms"
"#,
        url = target.url()
    )
    .expect("write TARGETS_FILE");
    let options = WorkerOptions {
        prefetch: 8,
        env: vec![
            ("TARGETS_FILE", file.path().display().to_string()),
            ("TARGET_SIGNING_SECRET", SECRET.into()),
            ("MAX_ATTEMPTS", "3".into()),
            ("RETRY_BASE", "1s".into()),
        ],
        ..WorkerOptions::default()
    };
    let workers = [
        WorkerProcess::start(&url, queue.name(), &options).await,
        WorkerProcess::start(&url, queue.name(), &options).await,
    ];

    // Submitted together, so the slow ones overlap.
    let flaky = gateway
        .submit(&json!({"kind": "work", "payload": {"message": ".", "fail_attempts": 2}}))
        .await;
    let patient = gateway
        .submit(&json!({"kind": "work", "payload": {"message": "", "fail_attempts": 1, "retry_after": 3}}))
        .await;
    let refused = gateway
        .submit(&json!({"kind": "work", "payload": {"message": 5}}))
        .await;
    let hanging = gateway
        .submit(&json!({"kind": "hang", "payload": {"message": ".".repeat(100)}}))
        .await;
    let mut plain = Vec::new();
    for _ in 0..10 {
        plain.push(
            gateway
                .submit(&json!({"kind": "work", "payload": {"message": "...."}}))
                .await,
        );
    }
    let mut limited = Vec::new();
    for _ in 0..12 {
        limited.push(
            gateway
                .submit(&json!({"kind": "limited", "payload": {"message": "...."}}))
                .await,
        );
    }

    spread_and_bounded(&gateway, &workers, &plain, &limited).await;
    answers_decide(&gateway, &queue, [flaky, patient, refused, hanging]).await;
}

/// Round robin into one app, each answer's JSON the task's result; and never more calls in
/// flight from one worker than the target's concurrency.
async fn spread_and_bounded(
    gateway: &TestGateway,
    workers: &[WorkerProcess],
    plain: &[Uuid],
    limited: &[Uuid],
) {
    // Round robin into one app, each answer's JSON the task's result.
    for id in plain {
        let status = gateway.finished(*id, DEADLINE).await;
        assert_eq!(status["status"], "succeeded", "{status}");
        assert_eq!(status["result"]["dots"], 4, "{status}");
    }
    workers[0].sync().await;
    let ran_by: Vec<usize> = workers
        .iter()
        .map(|worker| {
            let started = worker.started();
            plain.iter().filter(|id| started.contains(id)).count()
        })
        .collect();
    assert!(
        ran_by.iter().all(|n| *n >= 2) && ran_by.iter().sum::<usize>() == plain.len(),
        "the two workers share the tasks: {ran_by:?}"
    );

    // Concurrency: never more than 2 calls in flight from one worker, and 2 were.
    let mut spans: HashMap<usize, Vec<(f64, f64)>> = HashMap::new();
    for id in limited {
        let status = gateway.finished(*id, DEADLINE).await;
        assert_eq!(status["status"], "succeeded", "{status}");
        let worker = workers
            .iter()
            .position(|worker| worker.started().contains(id))
            .expect("some worker started it");
        let result = &status["result"];
        spans.entry(worker).or_default().push((
            result["started"].as_f64().expect("started"),
            result["finished"].as_f64().expect("finished"),
        ));
    }
    let most = spans.values().map(|spans| most_at_once(spans)).max();
    assert_eq!(most, Some(2), "calls in flight per worker: {spans:?}");
}

/// What the answers decide: backoff, Retry-After, dead at once, timeouts.
async fn answers_decide(
    gateway: &TestGateway,
    queue: &TestQueue,
    [flaky, patient, refused, hanging]: [Uuid; 4],
) {
    // Fails twice (503 without Retry-After), succeeds on its last attempt after the backoff.
    let status = gateway.finished(flaky, DEADLINE).await;
    assert_eq!(status["status"], "succeeded", "{status}");
    assert_eq!(status["attempts"], 3, "{status}");
    let took = elapsed(&status);
    assert!(
        took >= Duration::from_millis(2500),
        "backoff of about 1 s then 2 s: {took:?}"
    );

    // 503 with Retry-After: 3, where the backoff would have been about 1 s.
    let status = gateway.finished(patient, DEADLINE).await;
    assert_eq!(status["status"], "succeeded", "{status}");
    assert_eq!(status["attempts"], 2, "{status}");
    let took = elapsed(&status);
    assert!(
        took >= Duration::from_secs(3) && took < Duration::from_secs(8),
        "Retry-After honoured: {took:?}"
    );

    // 422: dead at once, the answer in its reason.
    let status = gateway.finished(refused, DEADLINE).await;
    assert_eq!(status["status"], "dead", "{status}");
    assert_eq!(status["attempts"], 1, "{status}");
    let error = status["error"].as_str().expect("an error");
    assert!(
        error.contains("422") && error.contains("payload.message must be a string"),
        "{error}"
    );

    // Cut off after 500 ms at each of its three attempts, then dead.
    let status = gateway.finished(hanging, DEADLINE).await;
    assert_eq!(status["status"], "dead", "{status}");
    assert_eq!(status["attempts"], 3, "{status}");
    let error = status["error"].as_str().expect("an error");
    assert!(error.contains("did not answer within 500ms"), "{error}");

    // Both dead tasks are in the dead-letter queue, with offload's reasons.
    let mut reasons = Vec::new();
    while let Some(message) = queue.take_dead().await {
        reasons.push(header_text(&message, "x-offload-reason").unwrap_or_default());
    }
    reasons.sort();
    assert_eq!(reasons, ["max_attempts", "rejected"]);
}

/// The example itself refuses calls without offload's signature.
async fn refuses_bad_signatures(target: &str) {
    let client = reqwest::Client::new();
    let body = json!({"id": Uuid::new_v4(), "kind": "work", "payload": {"message": "."}, "attempt": 1, "submitted_at": "2026-11-29T00:00:00Z"}).to_string();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_secs();
    let good = secret(SECRET).sign(now, body.as_bytes());
    let forged = secret("not the secret").sign(now, body.as_bytes());
    let stale = secret(SECRET).sign(now - 3600, body.as_bytes());
    for (signature, expected) in [
        (Some(good.as_str()), StatusCode::OK),
        (Some(forged.as_str()), StatusCode::UNAUTHORIZED),
        (Some(stale.as_str()), StatusCode::UNAUTHORIZED),
        (None, StatusCode::UNAUTHORIZED),
    ] {
        let mut request = client
            .post(target)
            .header("content-type", "application/json")
            .body(body.clone());
        if let Some(signature) = signature {
            request = request.header("offload-signature", signature);
        }
        let response = request.send().await.expect("the example answers");
        assert_eq!(response.status(), expected, "signature {signature:?}");
    }
}

fn secret(text: &str) -> offload_worker::SigningSecret {
    text.parse().expect("a valid secret")
}

/// Most spans overlapping at one instant.
fn most_at_once(spans: &[(f64, f64)]) -> usize {
    let mut edges: Vec<(f64, i32)> = spans
        .iter()
        .flat_map(|(start, end)| [(*start, 1), (*end, -1)])
        .collect();
    // Ends before starts at the same instant.
    edges.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    let (mut now, mut most) = (0, 0);
    for (_, step) in edges {
        now += step;
        most = most.max(now);
    }
    usize::try_from(most).expect("never negative")
}

/// From submission to the end of the task.
fn elapsed(status: &Value) -> Duration {
    let time = |field: &str| {
        humantime::parse_rfc3339_weak(status[field].as_str().expect("a time")).expect("RFC 3339")
    };
    time("finished_at")
        .duration_since(time("submitted_at"))
        .unwrap_or_default()
}

/// What the echo target received: headers and raw body, per call.
type Calls = std::sync::Arc<std::sync::Mutex<Vec<(axum::http::HeaderMap, axum::body::Bytes)>>>;

/// A target in the test process that records every call and answers what the task's payload
/// asks: `{"status": 302, "location": ..., "json": ..., "text": ...}`.
async fn echo_target() -> (String, Calls) {
    use axum::{
        extract::State,
        http::{HeaderMap, StatusCode as Code, header},
        response::{IntoResponse, Response},
    };
    async fn answer(
        State(calls): State<Calls>,
        headers: HeaderMap,
        body: axum::body::Bytes,
    ) -> Response {
        calls
            .lock()
            .expect("calls lock")
            .push((headers, body.clone()));
        let call: Value = serde_json::from_slice(&body).expect("the worker sends JSON");
        let ask = &call["payload"];
        let status =
            Code::from_u16(u16::try_from(ask["status"].as_u64().unwrap_or(200)).expect("a status"))
                .expect("a valid status");
        let mut response = if let Some(text) = ask["text"].as_str() {
            (status, text.to_owned()).into_response()
        } else {
            (status, axum::Json(ask["json"].clone())).into_response()
        };
        if let Some(location) = ask["location"].as_str() {
            response
                .headers_mut()
                .insert(header::LOCATION, location.parse().expect("a header value"));
        }
        response
    }
    let calls = Calls::default();
    let app = axum::Router::new()
        .route("/capture", axum::routing::post(answer))
        .with_state(std::sync::Arc::clone(&calls));
    (
        format!("{}/capture", offload_tests::serve_locally(app).await),
        calls,
    )
}

/// The call for task `done` carries the documented headers, body and signature.
fn assert_documented_call(calls: &Calls, done: Uuid) {
    let (headers, body) = calls
        .lock()
        .expect("calls lock")
        .iter()
        .find(|(headers, _)| headers["offload-task-id"] == done.to_string().as_str())
        .cloned()
        .expect("the call was recorded");
    assert_eq!(headers["offload-attempt"], "1");
    assert_eq!(headers["content-type"], "application/json");
    assert_eq!(headers["x-app-token"], "t0ken");
    let text = std::str::from_utf8(&body).expect("UTF-8");
    assert!(
        text.starts_with(&format!(r#"{{"id":"{done}","kind":"echo","payload":{{"json":{{"ok":true}}}},"attempt":1,"submitted_at":""#)),
        "{text}"
    );
    let signature = headers["offload-signature"].to_str().expect("ASCII");
    let t: u64 = signature
        .strip_prefix("t=")
        .and_then(|rest| rest.split(',').next())
        .and_then(|t| t.parse().ok())
        .expect("t=<unix seconds>");
    assert_eq!(signature, secret(SECRET).sign(t, &body));
}

/// The call as docs/TARGETS.md writes it (body, headers, signature, extra headers from
/// TARGETS_FILE), and every kind of answer read as documented: JSON and other 2xx bodies,
/// results over RESULT_MAX_BYTES, redirects not followed, 4xx dead with the body's start,
/// 5xx and refused connections retried until the last attempt.
#[tokio::test]
async fn calls_are_as_documented_and_every_answer_is_read_as_documented() {
    let (echo, calls) = echo_target().await;
    let url = amqp_url();
    let queue = TestQueue::declare(&url, "echo", 5).await;
    let gateway = TestGateway::start(&url, queue.name()).await;
    let mut file = tempfile::NamedTempFile::new().expect("a temporary file");
    write!(
        file,
        "[targets.echo]\nurl = \"{echo}\"\nheaders = {{ x-app-token = \"t0ken\" }}\n"
    )
    .expect("write TARGETS_FILE");
    let mut config = offload_worker::Config::new(&url, queue.name());
    // Nothing listens there: connections are refused.
    config.targets.targets = format!("closed=http://127.0.0.1:{}/", offload_tests::free_port());
    config.targets.targets_file = Some(file.path().to_owned());
    config.targets.target_signing_secret = Some(secret(SECRET));
    config.max_attempts = 2;
    config.retry_base = Duration::ZERO;
    config.result_max_bytes = 100;
    let _worker = InProcessWorker::start(config, offload_worker::Registry::default());
    // The worker declares and binds every kind it handles before it subscribes to any: one
    // consumer of `echo` means both `closed` and `echo` route.
    offload_tests::eventually(DEADLINE, "the worker to bind its kinds", || async {
        (queue.consumers_of("echo").await >= 1).then_some(())
    })
    .await;

    let echo_task = |payload: Value| json!({"kind": "echo", "payload": payload});
    let done = gateway
        .submit(&echo_task(json!({"json": {"ok": true}})))
        .await;
    let status = gateway.finished(done, DEADLINE).await;
    assert_eq!(status["status"], "succeeded", "{status}");
    assert_eq!(status["result"], json!({"ok": true}), "{status}");
    assert_documented_call(&calls, done);

    let plain = gateway.submit(&echo_task(json!({"text": "fine"}))).await;
    let big = gateway
        .submit(&echo_task(json!({"json": "x".repeat(200)})))
        .await;
    let moved = gateway
        .submit(&echo_task(json!({"status": 302, "location": echo})))
        .await;
    let missing = gateway
        .submit(&echo_task(json!({"status": 404, "text": "no such job"})))
        .await;
    let broken = gateway
        .submit(&echo_task(json!({"status": 500, "text": "boom"})))
        .await;
    let refused = gateway
        .submit(&json!({"kind": "closed", "payload": {}}))
        .await;

    let status = gateway.finished(plain, DEADLINE).await;
    assert_eq!(status["status"], "succeeded", "{status}");
    assert!(
        status["result"].is_null(),
        "a text body is no result: {status}"
    );
    let status = gateway.finished(big, DEADLINE).await;
    assert_eq!(status["status"], "succeeded", "{status}");
    assert!(status["result"].is_null(), "{status}");
    assert!(
        status["error"]
            .as_str()
            .is_some_and(|note| note.contains("RESULT_MAX_BYTES")),
        "{status}"
    );
    for (id, attempts, says) in [
        (moved, 1, "302 Found"),
        (missing, 1, "404 Not Found: no such job"),
        (broken, 2, "500 Internal Server Error: boom"),
        (refused, 2, "onnect"),
    ] {
        let status = gateway.finished(id, DEADLINE).await;
        assert_eq!(status["status"], "dead", "{status}");
        assert_eq!(status["attempts"], attempts, "{status}");
        let error = status["error"].as_str().expect("an error");
        assert!(error.contains(says), "{says:?} in {error}");
    }
    // The redirect was not followed: its dead reason is the 302 itself (followed, it would
    // have been a GET to a POST-only route, a 405), and the target saw one call.
    let calls_for = |id: Uuid| {
        calls
            .lock()
            .expect("calls lock")
            .iter()
            .filter(|(headers, _)| headers["offload-task-id"] == id.to_string().as_str())
            .count()
    };
    assert_eq!(calls_for(moved), 1);
    assert_eq!(calls_for(broken), 2);
}
