//! Access control: API keys and scopes, the rate limit, and secrets kept out of logs.

use std::{
    io::Write as _,
    num::NonZeroU32,
    process::{Command, Stdio},
    time::Duration,
};

use offload_api::Config;
use offload_tests::{PrivateBroker, TestGateway, TestQueue, amqp_url, eventually, free_port};
use reqwest::{StatusCode, header};
use serde_json::{Value, json};

async fn code_of(response: reqwest::Response) -> (StatusCode, String) {
    let status = response.status();
    let body: Value = response.json().await.expect("JSON body");
    (status, body["code"].as_str().unwrap_or_default().to_owned())
}

async fn post(gateway: &TestGateway, key: Option<&str>) -> reqwest::Response {
    let mut request = gateway
        .client()
        .post(gateway.url("/tasks"))
        .json(&json!({"kind": "sleep"}));
    if let Some(key) = key {
        request = request.bearer_auth(key);
    }
    request.send().await.expect("answer")
}

#[tokio::test]
async fn keys_and_scopes_decide_who_may_submit_and_health_stays_open() {
    let url = amqp_url();
    let queue = TestQueue::declare(&url, "keys", 5).await;
    let mut keys = tempfile::NamedTempFile::new().expect("keys file");
    writeln!(keys, "# offload keys\nsubmitter-key\n\nreader-key = read").expect("write keys");
    let mut config = Config::new(&url, queue.name());
    config.api_keys_file = Some(keys.path().to_owned());
    let gateway = TestGateway::spawn(config).await;

    assert_eq!(
        code_of(post(&gateway, None).await).await,
        (StatusCode::UNAUTHORIZED, "unauthorized".into())
    );
    assert_eq!(
        code_of(post(&gateway, Some("guessed-key")).await).await,
        (StatusCode::UNAUTHORIZED, "unauthorized".into())
    );
    assert_eq!(
        code_of(post(&gateway, Some("reader-key")).await).await,
        (StatusCode::FORBIDDEN, "forbidden".into())
    );
    assert_eq!(
        post(&gateway, Some("submitter-key")).await.status(),
        StatusCode::ACCEPTED
    );
    assert_eq!(
        queue.ready().await,
        1,
        "only the keyed request queued a task"
    );
    // For load balancers: no key needed.
    assert_eq!(gateway.health().await.status(), StatusCode::OK);
    gateway.stop().await;
}

#[tokio::test]
async fn a_key_past_its_rate_gets_429_with_retry_after_and_others_are_not_held_back() {
    let url = amqp_url();
    let queue = TestQueue::declare(&url, "rate", 5).await;
    let mut config = Config::new(&url, queue.name());
    config.api_keys = Some("busy,quiet".into());
    config.rate_limit = NonZeroU32::new(1);
    config.rate_limit_burst = NonZeroU32::new(2);
    let gateway = TestGateway::spawn(config).await;

    assert_eq!(
        post(&gateway, Some("busy")).await.status(),
        StatusCode::ACCEPTED
    );
    assert_eq!(
        post(&gateway, Some("busy")).await.status(),
        StatusCode::ACCEPTED
    );
    let refused = post(&gateway, Some("busy")).await;
    let retry_after: u64 = refused.headers()[header::RETRY_AFTER]
        .to_str()
        .expect("ASCII")
        .parse()
        .expect("seconds");
    assert!((1..=2).contains(&retry_after), "Retry-After: {retry_after}");
    assert_eq!(
        code_of(refused).await,
        (StatusCode::TOO_MANY_REQUESTS, "rate_limited".into())
    );
    // Another key has its own budget.
    assert_eq!(
        post(&gateway, Some("quiet")).await.status(),
        StatusCode::ACCEPTED
    );
    // And the busy one gets a token back within a second.
    eventually(
        Duration::from_secs(3),
        "a token back for the busy key",
        || async {
            (post(&gateway, Some("busy")).await.status() == StatusCode::ACCEPTED).then_some(())
        },
    )
    .await;
    assert_eq!(queue.ready().await, 4);
    gateway.stop().await;
}

/// The gateway binary at its most verbose, given an API key and a list of broker URLs with
/// passwords, through a broker outage so that every URL is tried and logged: no secret
/// reaches a log line.
#[tokio::test]
async fn neither_keys_nor_broker_passwords_reach_the_log() {
    const KEY: &str = "sk-live-9f8e7d6c5b4a";
    const LIVE_PASSWORD: &str = "Sup3r-s3cret-pw";
    const ODD_PASSWORD: &str = "Odd,pa55%2Fw0rd%40x";
    let mut broker = PrivateBroker::start().await;
    assert!(broker.ctl(&["add_user", "offload", LIVE_PASSWORD]));
    assert!(broker.ctl(&["set_permissions", "-p", "/", "offload", ".*", ".*", ".*"]));
    let dead_port = free_port();
    // One URL nobody answers, with a password in the clear, odd characters and all.
    let urls = format!(
        "amqp://offload:{ODD_PASSWORD}@127.0.0.1:{dead_port}/%2f,amqp://offload:{LIVE_PASSWORD}@127.0.0.1:{}/%2f",
        broker.port()
    );
    let port = free_port();
    let log = tempfile::NamedTempFile::new().expect("log file");
    let mut gateway = Command::new(offload_tests::binary("offload-api-under-test"))
        .env("BIND", format!("127.0.0.1:{port}"))
        .env("AMQP_URL", &urls)
        .env("QUEUE", "offload-secrets")
        .env("API_KEYS", format!("{KEY}=submit"))
        .env("LOG_FORMAT", "json")
        .env("RUST_LOG", "trace")
        .stdout(log.reopen().expect("log handle"))
        .stderr(Stdio::null())
        .spawn()
        .expect("start offload-api");
    let client = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{port}");
    let health = || async {
        let response = client.get(format!("{base}/health")).send().await.ok()?;
        Some(response.status())
    };
    eventually(Duration::from_secs(30), "the gateway healthy", || async {
        (health().await? == StatusCode::OK).then_some(())
    })
    .await;
    for key in [KEY, "not-the-key"] {
        let _ = client
            .post(format!("{base}/tasks"))
            .bearer_auth(key)
            .json(&json!({"kind": "sleep"}))
            .send()
            .await
            .expect("answer");
    }
    // The broker goes away: the gateway tries, and logs, every URL of the list.
    broker.stop().await;
    eventually(
        Duration::from_secs(30),
        "both URLs tried and logged",
        || async {
            let written = std::fs::read_to_string(log.path()).ok()?;
            (written.contains(&format!(":{dead_port}/"))
                && written.contains(&format!(":{}/", broker.port())))
            .then_some(())
        },
    )
    .await;
    let _ = gateway.kill();
    let _ = gateway.wait();

    let written = std::fs::read_to_string(log.path()).expect("read log");
    assert!(written.contains("offload:***@"), "URLs are logged redacted");
    for secret in [KEY, "not-the-key", LIVE_PASSWORD, "pa55%2Fw0rd", "Odd,pa55"] {
        assert!(!written.contains(secret), "{secret:?} reached the log");
    }
    // Nor the password's bytes: the AMQP SASL PLAIN response is `\0user\0password`, which a
    // frame logged with Rust's debug output shows as a list of numbers.
    let bytes = |text: &str| {
        text.bytes()
            .map(|byte| byte.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    for secret in [LIVE_PASSWORD, "Odd,pa55"] {
        assert!(
            !written.contains(&bytes(secret)),
            "the bytes of {secret:?} reached the log"
        );
    }
}

/// A URL whose password holds an unencoded `/` cannot be parsed; the gateway refuses to start
/// and says so in one line, without the password.
#[test]
fn an_unparsable_url_stops_the_gateway_without_quoting_its_password() {
    let output = Command::new(offload_tests::binary("offload-api-under-test"))
        .env("BIND", "127.0.0.1:0")
        .env(
            "AMQP_URL",
            "amqp://app:pa55/w0rd@127.0.0.1:5672/%2f,amqp://app:s3cr,et@127.0.0.1:5672/%2f",
        )
        .env("LOG_FORMAT", "json")
        .stdin(Stdio::null())
        .output()
        .expect("run offload-api");

    assert!(!output.status.success());
    let written = String::from_utf8_lossy(&output.stdout);
    assert!(written.contains("not a valid AMQP URL"), "{written}");
    assert!(
        !written.contains("pa55") && !written.contains("w0rd"),
        "{written}"
    );
    assert!(!written.contains("s3cr"), "{written}");
}
