//! Traces: a client's `traceparent` is continued by the gateway, travels with the task, and
//! the worker's spans (the wait in the queue, each attempt) join the same trace, exported with
//! OTLP to a collector; a retry is a new span linked to the first attempt, and calls to an
//! HTTP target carry the attempt's `traceparent`. Real processes, a real OTLP/HTTP receiver.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{
    extract::State,
    http::{HeaderMap, StatusCode as Code},
    response::IntoResponse,
};
use offload_tests::{
    GatewayProcess, TestQueue, WorkerOptions, WorkerProcess, amqp_url, eventually, free_port,
    serve_locally,
};
use reqwest::StatusCode;
use serde_json::{Value, json};

const DEADLINE: Duration = Duration::from_secs(30);
const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CLIENT_SPAN: &str = "00f067aa0ba902b7";

/// One span as the collector received it.
#[derive(Debug, Clone)]
struct Span {
    service: String,
    name: String,
    trace: String,
    id: String,
    parent: String,
    links: Vec<String>,
}

type Spans = Arc<Mutex<Vec<Span>>>;

/// An OTLP/HTTP receiver (JSON encoding) on a loopback port: `http://127.0.0.1:<port>`.
async fn collector() -> (String, Spans) {
    async fn receive(State(spans): State<Spans>, body: axum::Json<Value>) -> impl IntoResponse {
        let text = |value: &Value| value.as_str().unwrap_or_default().to_owned();
        let mut received = spans.lock().expect("spans lock");
        for resource in body["resourceSpans"].as_array().into_iter().flatten() {
            let service = resource["resource"]["attributes"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|attribute| attribute["key"] == "service.name")
                .map(|attribute| text(&attribute["value"]["stringValue"]))
                .unwrap_or_default();
            for scope in resource["scopeSpans"].as_array().into_iter().flatten() {
                for span in scope["spans"].as_array().into_iter().flatten() {
                    received.push(Span {
                        service: service.clone(),
                        name: text(&span["name"]),
                        trace: text(&span["traceId"]).to_lowercase(),
                        id: text(&span["spanId"]).to_lowercase(),
                        parent: text(&span["parentSpanId"]).to_lowercase(),
                        links: span["links"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .map(|link| text(&link["spanId"]).to_lowercase())
                            .collect(),
                    });
                }
            }
        }
        axum::Json(json!({}))
    }
    let spans = Spans::default();
    let app = axum::Router::new()
        .route("/v1/traces", axum::routing::post(receive))
        .with_state(Arc::clone(&spans));
    (serve_locally(app).await, spans)
}

type Calls = Arc<Mutex<Vec<HeaderMap>>>;

/// A target that answers 503 (retry at once) to a first attempt and 200 to the rest.
async fn flaky_target() -> (String, Calls) {
    async fn answer(State(calls): State<Calls>, headers: HeaderMap) -> impl IntoResponse {
        let first = headers["offload-attempt"] == "1";
        calls.lock().expect("calls lock").push(headers);
        if first {
            (Code::SERVICE_UNAVAILABLE, [("retry-after", "0")]).into_response()
        } else {
            axum::Json(json!({"ok": true})).into_response()
        }
    }
    let calls = Calls::default();
    let app = axum::Router::new()
        .route("/work", axum::routing::post(answer))
        .with_state(Arc::clone(&calls));
    (format!("{}/work", serve_locally(app).await), calls)
}

fn otlp_env(collector: &str) -> Vec<(&'static str, String)> {
    vec![
        ("OTEL_EXPORTER_OTLP_ENDPOINT", collector.to_owned()),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json".to_owned()),
        ("OTEL_BSP_SCHEDULE_DELAY", "100".to_owned()),
    ]
}

/// The parent span id in a `traceparent` (`00-<trace>-<parent>-<flags>`), and the trace id.
fn split_traceparent(value: &str) -> (String, String) {
    let parts: Vec<&str> = value.split('-').collect();
    assert_eq!(parts.len(), 4, "{value}");
    (parts[1].to_owned(), parts[2].to_owned())
}

#[tokio::test]
async fn one_trace_holds_the_request_the_wait_in_the_queue_and_each_attempt() {
    let url = amqp_url();
    let queue = TestQueue::declare(&url, "traces", 5).await;
    let (collector, spans) = collector().await;
    let (target, calls) = flaky_target().await;
    let mut gateway_env = otlp_env(&collector);
    gateway_env.extend([
        ("AMQP_URL", url.clone()),
        ("QUEUE", queue.name().to_owned()),
    ]);
    let gateway = GatewayProcess::start(free_port(), &gateway_env).await;
    let mut env = otlp_env(&collector);
    env.push(("TARGETS", format!("flaky={target}")));
    let options = WorkerOptions {
        env,
        ..WorkerOptions::default()
    };
    let _worker = WorkerProcess::start(&url, queue.name(), &options).await;

    let client = reqwest::Client::new();
    let accepted: Value = client
        .post(gateway.url("/tasks"))
        .header("traceparent", format!("00-{TRACE}-{CLIENT_SPAN}-01"))
        .json(&json!({"kind": "flaky"}))
        .send()
        .await
        .expect("answer")
        .json()
        .await
        .expect("JSON");
    let id = accepted["id"].as_str().expect("an id").to_owned();
    let status: Value = client
        .get(gateway.url(&format!("/tasks/{id}?wait=30s")))
        .send()
        .await
        .expect("answer")
        .json()
        .await
        .expect("JSON");
    assert_eq!(status["status"], "succeeded", "{status}");
    assert_eq!(status["attempts"], 2, "{status}");

    // The gateway's span continues the client's trace.
    let request = eventually(DEADLINE, "the gateway's span", || async {
        spans
            .lock()
            .expect("spans lock")
            .iter()
            .find(|span| span.service == "offload-api" && span.name == "POST /tasks")
            .cloned()
    })
    .await;
    assert_eq!(
        (request.trace.as_str(), request.parent.as_str()),
        (TRACE, CLIENT_SPAN)
    );

    // Each attempt, and each wait in the queue, is a child of the request, in its trace.
    let (attempts, waits) = eventually(DEADLINE, "the worker's spans", || async {
        let spans = spans.lock().expect("spans lock");
        let of = |name: &str| -> Vec<Span> {
            spans
                .iter()
                .filter(|span| span.service == "offload-worker" && span.name == name)
                .cloned()
                .collect()
        };
        let (attempts, waits) = (of("task"), of("wait in queue"));
        (attempts.len() == 2 && waits.len() == 2).then_some((attempts, waits))
    })
    .await;
    for span in attempts.iter().chain(&waits) {
        assert_eq!(span.trace, TRACE, "{span:?}");
        assert_eq!(span.parent, request.id, "{span:?}");
    }
    // The retry is a new span, linked to the first attempt.
    let linked: Vec<&Span> = attempts
        .iter()
        .filter(|span| !span.links.is_empty())
        .collect();
    assert_eq!(linked.len(), 1, "{attempts:?}");
    let first = attempts
        .iter()
        .find(|span| span.links.is_empty())
        .expect("the first attempt");
    assert_eq!(linked[0].links, std::slice::from_ref(&first.id));

    // The target heard each attempt's span as its parent.
    let calls = calls.lock().expect("calls lock").clone();
    assert_eq!(calls.len(), 2);
    for headers in &calls {
        let traceparent = headers["traceparent"].to_str().expect("ASCII");
        let (trace, parent) = split_traceparent(traceparent);
        assert_eq!(trace, TRACE);
        assert!(
            attempts.iter().any(|span| span.id == parent),
            "{traceparent} is not an attempt's span: {attempts:?}"
        );
    }
}

/// Without an OTLP endpoint nothing is recorded, and a client's `traceparent` still travels
/// with the task unchanged (here: to the message's headers).
#[tokio::test]
async fn without_export_a_clients_traceparent_still_travels_with_the_task() {
    let url = amqp_url();
    let queue = TestQueue::declare(&url, "traces-off", 5).await;
    let gateway = offload_tests::TestGateway::start(&url, queue.name()).await;
    let traceparent = format!("00-{TRACE}-{CLIENT_SPAN}-01");
    let response = gateway
        .client()
        .post(gateway.url("/tasks"))
        .header("traceparent", &traceparent)
        .json(&json!({"kind": "sleep"}))
        .send()
        .await
        .expect("answer");
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let message = queue.take_ready().await.expect("the task is on the queue");
    assert_eq!(
        offload_tests::header_text(&message, "traceparent").as_deref(),
        Some(traceparent.as_str())
    );
    gateway.stop().await;
}
