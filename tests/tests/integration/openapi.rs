//! `GET /openapi.json`: every operation the gateway serves is in it, each one answers, and
//! what it answers is documented. Schemathesis then checks the live gateway against it
//! (`schemathesis_finds_no_server_error_and_no_answer_outside_the_document`).

use std::{collections::BTreeSet, time::Duration};

use offload_api::Config as GatewayConfig;
use offload_tests::{InProcessWorker, TestGateway, TestQueue, amqp_url};
use reqwest::{Method, StatusCode};
use serde_json::Value;
use uuid::Uuid;

/// Every operation offload serves, by method and path template.
const OPERATIONS: &[(&str, &str)] = &[
    ("get", "/"),
    ("get", "/dashboard.css"),
    ("get", "/dashboard.js"),
    ("get", "/dashboard/state"),
    ("delete", "/dead"),
    ("get", "/dead"),
    ("post", "/dead/retry"),
    ("delete", "/dead/{id}"),
    ("get", "/dead/{id}"),
    ("post", "/dead/{id}/retry"),
    ("get", "/favicon.svg"),
    ("get", "/health"),
    ("get", "/kinds"),
    ("post", "/kinds/{kind}/pause"),
    ("post", "/kinds/{kind}/resume"),
    ("get", "/metrics"),
    ("get", "/openapi.json"),
    ("get", "/schedules"),
    ("delete", "/schedules/{name}"),
    ("get", "/schedules/{name}"),
    ("put", "/schedules/{name}"),
    ("post", "/schedules/{name}/pause"),
    ("post", "/schedules/{name}/resume"),
    ("post", "/tasks"),
    ("post", "/tasks/batch"),
    ("post", "/tasks/cancel"),
    ("get", "/tasks/{id}"),
    ("post", "/tasks/{id}/cancel"),
];

async fn document(gateway: &TestGateway) -> Value {
    let response = gateway
        .client()
        .get(gateway.url("/openapi.json"))
        .send()
        .await
        .expect("answer");
    assert_eq!(response.status(), StatusCode::OK);
    response.json().await.expect("JSON")
}

fn operations(document: &Value) -> BTreeSet<(String, String)> {
    document["paths"]
        .as_object()
        .expect("paths")
        .iter()
        .flat_map(|(path, item)| {
            item.as_object()
                .expect("a path item")
                .keys()
                .map(move |method| (method.clone(), path.clone()))
        })
        .collect()
}

#[tokio::test]
async fn every_operation_is_documented_answers_and_answers_only_as_documented() {
    let url = amqp_url();
    let queue = TestQueue::declare(&url, "openapi", 5).await;
    let gateway = TestGateway::start(&url, queue.name()).await;
    gateway.live(Duration::from_secs(30)).await;
    let document = document(&gateway).await;
    assert_eq!(document["openapi"], "3.1.0");

    let documented = operations(&document);
    let expected: BTreeSet<(String, String)> = OPERATIONS
        .iter()
        .map(|(method, path)| ((*method).to_owned(), (*path).to_owned()))
        .collect();
    assert_eq!(documented, expected);

    for (method, path) in &documented {
        let concrete = path.replace("{id}", &Uuid::new_v4().to_string());
        let method = Method::from_bytes(method.to_uppercase().as_bytes()).expect("a method");
        let mut request = gateway
            .client()
            .request(method.clone(), gateway.url(&concrete));
        if method == Method::POST && path == "/tasks" {
            request = request.json(&serde_json::json!({"kind": "sleep"}));
        }
        let response = request.send().await.expect("answer");
        let status = response.status();
        let body = response.text().await.unwrap_or_default();
        let code = serde_json::from_str::<Value>(&body).map(|body| body["code"].clone());
        // The router's fallbacks answer these: the operation would not be served.
        assert!(
            !matches!(
                code.as_ref().map(Value::as_str),
                Ok(Some("not_found" | "method_not_allowed"))
            ),
            "{method} {concrete}: {status} {body}"
        );
        let answers = &document["paths"][path][method.as_str().to_lowercase()]["responses"];
        assert!(
            answers.get(status.as_str()).is_some(),
            "{method} {path} answered {status}, which its documentation does not list: {body}"
        );
    }
    gateway.stop().await;
}

/// Schemathesis (from PyPI, installed by tests/install-deps.sh) generates requests from the
/// document, valid and not, against a live gateway with a worker: no 5xx, and every answer
/// fits the document (status, content type, headers, body schema).
#[tokio::test]
async fn schemathesis_finds_no_server_error_and_no_answer_outside_the_document() {
    let cli = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("schemathesis/.venv/bin/schemathesis");
    assert!(
        cli.exists(),
        "schemathesis is missing: run tests/install-deps.sh"
    );
    let url = amqp_url();
    let queue = TestQueue::declare(&url, "schemathesis", 5).await;
    let mut config = GatewayConfig::new(&url, queue.name());
    config.api_keys = Some("schemathesis-key".into());
    let gateway = TestGateway::spawn(config).await;
    let mut worker_config = offload_worker::Config::new(&url, queue.name());
    worker_config.sleep_unit = Duration::from_millis(1);
    let worker = InProcessWorker::start(
        worker_config.clone(),
        offload_worker::handlers::builtin(&worker_config),
    );
    gateway.live(Duration::from_secs(30)).await;

    // Its cache goes where it runs: not into the source tree.
    let workdir = tempfile::tempdir().expect("a temporary directory");
    let run = tokio::process::Command::new(&cli)
        .current_dir(workdir.path())
        .args([
            "run",
            &gateway.url("/openapi.json"),
            "--checks",
            "not_a_server_error,status_code_conformance,content_type_conformance,response_headers_conformance,response_schema_conformance",
            "--max-examples",
            "30",
            "--header",
            "Authorization: Bearer schemathesis-key",
            "--seed",
            "1",
            "--no-color",
        ])
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(600), run)
        .await
        .expect("schemathesis ends within 10 minutes")
        .expect("schemathesis runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "schemathesis found problems:\n{stdout}\n{stderr}"
    );
    println!("{stdout}");
    worker.stop().await;
    gateway.stop().await;
}
