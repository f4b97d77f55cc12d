//! Clients as an attacker would write them: slow headers, slow and endless bodies, idle
//! connections, a flood of connections, huge announced bodies. The gateway cuts each off
//! within its setting, answers with our JSON where it answers, and keeps serving others.
//!
//! The clients speak raw TCP, since an HTTP library will not misbehave on purpose. Where a
//! client "is slow" it sends a byte at an interval: that is the client's behaviour, not a
//! wait; every assertion waits on a condition with a deadline.

use std::time::{Duration, Instant};

use offload_api::Config;
use offload_tests::{TestGateway, TestQueue, amqp_url};
use reqwest::StatusCode;
use serde_json::Value;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

/// Short settings, so each test takes about a second.
const HEADER_TIMEOUT: Duration = Duration::from_millis(800);
const BODY_TIMEOUT: Duration = Duration::from_millis(800);
/// How long past a timeout the gateway may take to act on it.
const SLACK: Duration = Duration::from_secs(3);

async fn gateway(label: &str, adjust: impl FnOnce(&mut Config)) -> (TestGateway, TestQueue) {
    let url = amqp_url();
    let queue = TestQueue::declare(&url, label, 5).await;
    let mut config = Config::new(&url, queue.name());
    config.header_timeout = HEADER_TIMEOUT;
    config.body_timeout = BODY_TIMEOUT;
    config.max_body_bytes = 1024;
    adjust(&mut config);
    (TestGateway::spawn(config).await, queue)
}

/// Reads until the server closes the connection (or `deadline` passes, which fails the test),
/// and returns everything it sent.
async fn read_until_closed(stream: &mut TcpStream, deadline: Duration) -> String {
    let mut received = Vec::new();
    let mut buffer = [0u8; 4096];
    let give_up = Instant::now() + deadline;
    loop {
        let left = give_up.saturating_duration_since(Instant::now());
        let read = tokio::time::timeout(left, stream.read(&mut buffer))
            .await
            .unwrap_or_else(|_elapsed| {
                panic!(
                    "the gateway held the connection for more than {deadline:?}; it sent {:?}",
                    String::from_utf8_lossy(&received)
                )
            });
        match read {
            Ok(0) | Err(_) => return String::from_utf8_lossy(&received).into_owned(),
            Ok(n) => received.extend_from_slice(&buffer[..n]),
        }
    }
}

/// Sends `bytes` one at a time, `every` apart, until the server closes the connection;
/// returns how long that took.
async fn drip_until_closed(stream: &mut TcpStream, bytes: &[u8], every: Duration) -> Duration {
    let started = Instant::now();
    let mut ticks = tokio::time::interval(every);
    for byte in bytes.iter().cycle() {
        ticks.tick().await;
        if stream.write_all(&[*byte]).await.is_err() {
            break;
        }
        let mut probe = [0u8; 1024];
        if let Ok(Ok(0) | Err(_)) =
            tokio::time::timeout(Duration::from_millis(1), stream.read(&mut probe)).await
        {
            break;
        }
        assert!(
            started.elapsed() < HEADER_TIMEOUT.max(BODY_TIMEOUT) + SLACK,
            "a client dripping bytes was held for {:?}",
            started.elapsed()
        );
    }
    started.elapsed()
}

fn json_body(response: &str) -> Value {
    let body = response.split("\r\n\r\n").nth(1).unwrap_or_default();
    serde_json::from_str(body).unwrap_or_else(|_| panic!("a JSON body in {response:?}"))
}

#[tokio::test]
async fn headers_sent_a_byte_at_a_time_are_cut_off_at_the_header_timeout() {
    let (gateway, _queue) = gateway("slow-headers", |_| {}).await;
    let mut stream = TcpStream::connect(gateway.addr()).await.expect("connect");

    let held = drip_until_closed(
        &mut stream,
        b"POST /tasks HTTP/1.1\r\nHost: x\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
        Duration::from_millis(100),
    )
    .await;

    assert!(held >= HEADER_TIMEOUT / 2, "cut off after {held:?}");
    gateway.stop().await;
}

#[tokio::test]
async fn a_connection_that_sends_nothing_is_closed_at_the_header_timeout() {
    let (gateway, _queue) = gateway("silent", |_| {}).await;
    let mut stream = TcpStream::connect(gateway.addr()).await.expect("connect");
    read_until_closed(&mut stream, HEADER_TIMEOUT + SLACK).await;
    gateway.stop().await;
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed_at_the_header_timeout() {
    let (gateway, _queue) = gateway("idle", |_| {}).await;
    let mut stream = TcpStream::connect(gateway.addr()).await.expect("connect");
    stream
        .write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("send");

    let response = read_until_closed(&mut stream, HEADER_TIMEOUT + SLACK).await;

    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    gateway.stop().await;
}

#[tokio::test]
async fn a_body_shorter_than_its_content_length_gets_408_at_the_body_timeout() {
    let (gateway, queue) = gateway("slow-body", |_| {}).await;
    let mut stream = TcpStream::connect(gateway.addr()).await.expect("connect");
    stream
        .write_all(
            b"POST /tasks HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
              Content-Length: 100\r\n\r\n{\"kind\":",
        )
        .await
        .expect("send");

    let response = read_until_closed(&mut stream, BODY_TIMEOUT + SLACK).await;

    assert!(response.starts_with("HTTP/1.1 408"), "{response}");
    assert_eq!(json_body(&response)["code"], "body_timeout");
    assert_eq!(queue.ready().await, 0);
    gateway.stop().await;
}

#[tokio::test]
async fn a_chunked_body_that_never_ends_gets_408_at_the_body_timeout() {
    let (gateway, queue) = gateway("endless-body", |_| {}).await;
    let mut stream = TcpStream::connect(gateway.addr()).await.expect("connect");
    stream
        .write_all(
            b"POST /tasks HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
              Transfer-Encoding: chunked\r\n\r\n",
        )
        .await
        .expect("send");

    // A one-space chunk a byte every 10 ms, for ever: small enough never to reach the size
    // limit before the time limit.
    let held = drip_until_closed(&mut stream, b"1\r\n \r\n", Duration::from_millis(10)).await;

    assert!(held >= BODY_TIMEOUT / 2, "cut off after {held:?}");
    assert_eq!(queue.ready().await, 0);
    gateway.stop().await;
}

#[tokio::test]
async fn an_announced_body_over_the_limit_gets_413_without_100_continue() {
    let (gateway, _queue) = gateway("expect", |_| {}).await;
    let mut stream = TcpStream::connect(gateway.addr()).await.expect("connect");
    stream
        .write_all(
            b"POST /tasks HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
              Content-Length: 1000000000000\r\nExpect: 100-continue\r\n\r\n",
        )
        .await
        .expect("send");

    // Answered at once, well before any timeout, and the connection closed.
    let response = read_until_closed(&mut stream, Duration::from_millis(500)).await;

    assert!(response.starts_with("HTTP/1.1 413"), "{response}");
    assert!(!response.contains("100 Continue"), "{response}");
    assert_eq!(json_body(&response)["code"], "body_too_large");
    gateway.stop().await;
}

#[tokio::test]
async fn a_request_head_over_max_header_bytes_gets_431() {
    let (gateway, _queue) = gateway("big-head", |config| config.max_header_bytes = 8192).await;
    let mut stream = TcpStream::connect(gateway.addr()).await.expect("connect");
    let filler = "a".repeat(16 * 1024);
    // The server may close before reading it all; what matters is what it answers.
    let _ = stream
        .write_all(format!("GET /health HTTP/1.1\r\nHost: x\r\nX-Big: {filler}\r\n\r\n").as_bytes())
        .await;

    let response = read_until_closed(&mut stream, SLACK).await;

    assert!(response.starts_with("HTTP/1.1 431"), "{response}");
    gateway.stop().await;
}

#[tokio::test]
async fn past_max_connections_new_ones_get_503_and_health_answers_once_within_the_cap() {
    let (gateway, _queue) = gateway("cap", |config| {
        config.max_connections = 3;
        // The held connections must outlive the test's checks.
        config.header_timeout = Duration::from_secs(30);
    })
    .await;
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut stream = TcpStream::connect(gateway.addr()).await.expect("connect");
        // Half a request head: the connection is in use.
        stream
            .write_all(b"GET /health HTTP/1.1\r\n")
            .await
            .expect("send");
        held.push(stream);
    }

    // One more is turned away at once, with our JSON and a Retry-After: readable by an
    // ordinary HTTP client, which discards an answer that comes before its request.
    let response = offload_tests::eventually(SLACK, "the fourth connection refused", || async {
        let response = reqwest::Client::new()
            .get(gateway.url("/health"))
            .send()
            .await
            .ok()?;
        (response.status() == StatusCode::SERVICE_UNAVAILABLE).then_some(response)
    })
    .await;
    assert_eq!(response.headers()["retry-after"], "1");
    let body: Value = response.json().await.expect("JSON body");
    assert_eq!(body["code"], "too_many_connections");

    // Back within the cap, a fresh connection is served.
    held.pop();
    let health = offload_tests::eventually(SLACK, "/health once a slot is free", || async {
        let response = gateway
            .client()
            .get(gateway.url("/health"))
            .send()
            .await
            .ok()?;
        (response.status() == StatusCode::OK).then_some(())
    })
    .await;
    let () = health;
    gateway.stop().await;
}

#[tokio::test]
async fn error_bodies_quote_at_most_a_short_excerpt_of_the_request() {
    let (gateway, _queue) = gateway("excerpt", |config| config.max_header_bytes = 64 * 1024).await;
    let long_path = format!("/{}", "p".repeat(20_000));

    let response = gateway
        .client()
        .get(gateway.url(&long_path))
        .send()
        .await
        .expect("answer");

    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    let body = response.text().await.expect("body");
    assert!(body.len() < 512, "{} bytes echoed", body.len());
    gateway.stop().await;
}
