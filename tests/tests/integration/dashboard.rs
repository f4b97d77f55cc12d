//! The dashboard at `GET /`: served with its safety headers, its state as JSON, and the whole
//! page driven in Debian's Chromium by tests/browser/dashboard.mjs (playwright-core, axe-core).

use std::{path::PathBuf, time::Duration};

use offload_api::Config as GatewayConfig;
use offload_tests::{
    InProcessWorker, TestGateway, TestQueue, amqp_url, eventually, handlers::FailsFirstRun,
};
use reqwest::{StatusCode, header};
use serde_json::{Value, json};

const DEADLINE: Duration = Duration::from_secs(30);
const ADMIN_KEY: &str = "dashboard-admin-key";
const READ_KEY: &str = "dashboard-read-key";

fn keyed(url: &str, queue: &str) -> GatewayConfig {
    let mut config = GatewayConfig::new(url, queue);
    config.api_keys = Some(format!("{ADMIN_KEY},{READ_KEY}=read"));
    config
}

fn worker(url: &str, queue: &str) -> InProcessWorker {
    let mut config = offload_worker::Config::new(url, queue);
    config.max_attempts = 1;
    config.sleep_unit = Duration::from_millis(1);
    let registry = offload_worker::handlers::builtin(&config).register(FailsFirstRun::default());
    InProcessWorker::start(config, registry)
}

/// `GET <url>` with `key` as Bearer: the JSON body, or `None` when there is none.
async fn get_json(client: &reqwest::Client, url: &str, key: &str) -> Option<Value> {
    client
        .get(url)
        .bearer_auth(key)
        .send()
        .await
        .ok()?
        .json()
        .await
        .ok()
}

fn browser_test_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("browser")
}

#[tokio::test]
async fn the_page_is_served_from_the_binary_with_a_policy_that_keeps_it_to_this_host() {
    let url = amqp_url();
    let queue = TestQueue::declare(&url, "dashboard-page", 5).await;
    let gateway = TestGateway::spawn(keyed(&url, queue.name())).await;
    let client = gateway.client().clone();

    let refused = client.get(gateway.url("/")).send().await.expect("answer");
    assert_eq!(refused.status(), StatusCode::UNAUTHORIZED);
    let challenges: Vec<_> = refused
        .headers()
        .get_all(header::WWW_AUTHENTICATE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .collect();
    assert!(
        challenges.iter().any(|c| c.starts_with("Basic")),
        "{challenges:?}"
    );

    // The key as the password of a Basic login, as a browser sends it.
    let page = client
        .get(gateway.url("/"))
        .basic_auth("anyone", Some(READ_KEY))
        .send()
        .await
        .expect("answer");
    assert_eq!(page.status(), StatusCode::OK);
    let policy = page.headers()[header::CONTENT_SECURITY_POLICY]
        .to_str()
        .expect("ASCII")
        .to_owned();
    assert!(policy.contains("default-src 'none'") && policy.contains("connect-src 'self'"));
    let html = page.text().await.expect("text");
    assert!(html.contains(r#"<script src="/dashboard.js""#), "{html}");
    for asset in ["/dashboard.js", "/dashboard.css"] {
        let response = client.get(gateway.url(asset)).send().await.expect("answer");
        assert_eq!(response.status(), StatusCode::OK, "{asset} needs no key");
    }

    // A change with a browser login needs the header a form on another site cannot send.
    let forged = client
        .post(gateway.url("/dead/retry"))
        .basic_auth("anyone", Some(ADMIN_KEY))
        .send()
        .await
        .expect("answer");
    assert_eq!(forged.status(), StatusCode::FORBIDDEN);
    let body: Value = forged.json().await.expect("JSON");
    assert_eq!(body["code"], "cross_site_request", "{body}");
    let scripted = client
        .post(gateway.url("/dead/retry"))
        .basic_auth("anyone", Some(ADMIN_KEY))
        .header("x-requested-by", "offload-dashboard")
        .send()
        .await
        .expect("answer");
    assert_eq!(scripted.status(), StatusCode::OK);

    let state_url = gateway.url("/dashboard/state");
    let state = get_json(&client, &state_url, READ_KEY)
        .await
        .expect("the state as JSON");
    assert_eq!(state["broker"], "connected", "{state}");
    for list in ["history", "recent", "dead", "kinds"] {
        assert!(state[list].is_array(), "{list}: {state}");
    }
    // The sampler reads the queues' depth from the broker.
    let sample = eventually(DEADLINE, "a sample with the queues' depth", || async {
        let state = get_json(&client, &state_url, READ_KEY).await?;
        state["history"]
            .as_array()?
            .iter()
            .rev()
            .find(|sample| sample["depth"].is_object() && sample["totals"].is_object())
            .cloned()
    })
    .await;
    assert_eq!(sample["depth"]["ready"], 0, "{sample}");
    gateway.stop().await;

    let mut config = keyed(&url, queue.name());
    config.dashboard = false;
    let gateway = TestGateway::spawn(config).await;
    let response = client
        .get(gateway.url("/"))
        .bearer_auth(READ_KEY)
        .send()
        .await
        .expect("answer");
    assert_eq!(response.status(), StatusCode::NOT_FOUND, "DASHBOARD=off");
    gateway.stop().await;
}

/// The whole page in a real browser: see tests/browser/dashboard.mjs for each step.
#[tokio::test]
async fn in_chromium_counts_move_a_dead_task_is_retried_and_the_page_passes_axe() {
    let dir = browser_test_dir();
    assert!(
        dir.join("node_modules/playwright-core").is_dir(),
        "the browser test's packages are missing: run tests/install-deps.sh"
    );
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    assert!(
        std::path::Path::new(&chromium).exists(),
        "{chromium} is missing: install Debian's chromium package (.ci/run does)"
    );
    let url = amqp_url();
    let queue = TestQueue::declare(&url, "dashboard-browser", 5).await;
    let gateway = TestGateway::spawn(keyed(&url, queue.name())).await;
    let worker = worker(&url, queue.name());
    let screenshots = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/screenshots");

    let run = tokio::process::Command::new("node")
        .arg(dir.join("dashboard.mjs"))
        .env("OFFLOAD_URL", gateway.url(""))
        .env("OFFLOAD_ADMIN_KEY", ADMIN_KEY)
        .env("OFFLOAD_READ_KEY", READ_KEY)
        .env("SCREENSHOTS", &screenshots)
        .env("CHROMIUM", &chromium)
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(180), run)
        .await
        .expect("the browser test ends within 3 minutes")
        .expect("node runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "the browser test failed:\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("all checks passed"), "{stdout}");
    for shot in ["dashboard-desktop.png", "dashboard-phone.png"] {
        let size = std::fs::metadata(screenshots.join(shot)).map_or(0, |m| m.len());
        assert!(size > 10_000, "{shot} is {size} bytes");
    }

    // What the page showed is what the API says.
    let dead = get_json(gateway.client(), &gateway.url("/dead"), ADMIN_KEY)
        .await
        .expect("the dead-letter list as JSON");
    assert_eq!(
        dead["total"],
        json!(0),
        "the retried task left the dead-letter queue"
    );
    worker.stop().await;
    gateway.stop().await;
}

/// How many requests the gateway refused as cross-site, from its metrics.
async fn cross_site_refusals(gateway: &TestGateway) -> Option<f64> {
    let text = gateway
        .client()
        .get(gateway.url("/metrics"))
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    let line = r#"offload_refusals_total{code="cross_site_request"} "#;
    text.lines()
        .find_map(|row| row.strip_prefix(line))
        .map_or(Ok(0.0), str::parse)
        .ok()
}

/// A page of another site, in a real browser, sends what a hostile page can without the
/// gateway's consent (an auto-submitted form, a `no-cors` fetch) to retry the dead tasks of an
/// open gateway (no API keys, so no credentials are even needed): both are refused, and the
/// dead task stays dead.
#[tokio::test]
async fn in_chromium_a_page_of_another_site_changes_nothing_even_without_keys() {
    let dir = browser_test_dir();
    assert!(
        dir.join("node_modules/playwright-core").is_dir(),
        "the browser test's packages are missing: run tests/install-deps.sh"
    );
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    let url = amqp_url();
    let queue = TestQueue::declare(&url, "cross-site", 5).await;
    let gateway = TestGateway::spawn(GatewayConfig::new(&url, queue.name())).await;
    let worker = worker(&url, queue.name());
    // `sleep` refuses a message that is not text: dead at once.
    let dead = gateway
        .submit(&json!({"kind": "sleep", "payload": {"message": 42}}))
        .await;
    eventually(DEADLINE, "the task to be dead", || async {
        let (_, task) = gateway.task(dead, "").await;
        (task["status"] == "dead").then_some(())
    })
    .await;
    let before = cross_site_refusals(&gateway).await.expect("the metrics");

    // Another site: `localhost`, where the gateway is `127.0.0.1`.
    let target = gateway.url("/dead/retry?kind=sleep");
    let page = format!(
        r#"<!doctype html><title>sending</title>
<iframe name="sink" hidden></iframe>
<form method="POST" action="{target}" target="sink"><input name="kind" value="sleep"></form>
<script>
document.forms[0].submit();
fetch("{target}", {{ method: "POST", mode: "no-cors" }})
  .catch(() => {{}})
  .finally(() => {{ document.title = "sent"; }});
</script>"#
    );
    let evil = offload_tests::serve_locally(axum::Router::new().route(
        "/",
        axum::routing::get(move || async move { axum::response::Html(page) }),
    ))
    .await
    .replace("127.0.0.1", "localhost");
    let run = tokio::process::Command::new("node")
        .arg(dir.join("cross_site.mjs"))
        .env("EVIL_URL", &evil)
        .env("CHROMIUM", &chromium)
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(90), run)
        .await
        .expect("the browser ends within 90 s")
        .expect("node runs");
    assert!(
        output.status.success(),
        "the browser failed:\n{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    eventually(DEADLINE, "both requests refused as cross-site", || async {
        let now = cross_site_refusals(&gateway).await?;
        (now >= before + 2.0).then_some(())
    })
    .await;
    let (_, task) = gateway.task(dead, "").await;
    assert_eq!(task["status"], "dead", "{task}");
    assert_eq!(queue.dead().await, 1, "still in the dead-letter queue");
    worker.stop().await;
    gateway.stop().await;
}
