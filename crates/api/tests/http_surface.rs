//! What the gateway answers before it needs a broker: validation, errors, API keys, the
//! OpenAPI document. Driven through the router with `tower::ServiceExt::oneshot`, as axum's
//! own examples are, on a session that never connects (so a request that gets past every
//! check answers 503 `broker_unavailable`, never 202). What needs the broker is tested
//! against a real one in `tests/`.

use std::io::Write;

use axum::{
    Router,
    body::Body,
    http::{HeaderMap, Method, Request, StatusCode, header},
};
use http_body_util::BodyExt;
use offload_api::Config;
use serde_json::{Value, json};
use tower::ServiceExt;

/// A router with `config` as `Config::new` makes it, changed by `change`.
fn router_with(change: impl FnOnce(&mut Config)) -> Router {
    let mut config = Config::new("amqp://guest:guest@127.0.0.1:1/%2f", "http-surface");
    change(&mut config);
    offload_api::router(&config).expect("valid settings")
}

/// The answer to `request`: its status, headers and body as JSON (`Null` if it is not JSON).
async fn call(router: &Router, request: Request<Body>) -> (StatusCode, HeaderMap, Value) {
    let response = router
        .clone()
        .oneshot(request)
        .await
        .expect("the router never fails");
    let (parts, body) = response.into_parts();
    let bytes = body.collect().await.expect("a body").to_bytes();
    let json = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    (parts.status, parts.headers, json)
}

fn post(path: &str, content_type: Option<&str>, body: impl Into<Body>) -> Request<Body> {
    let mut request = Request::builder().method(Method::POST).uri(path);
    if let Some(content_type) = content_type {
        request = request.header(header::CONTENT_TYPE, content_type);
    }
    request.body(body.into()).expect("a valid request")
}

fn post_task(body: &Value) -> Request<Body> {
    post("/tasks", Some("application/json"), body.to_string())
}

fn get(path: &str) -> Request<Body> {
    Request::builder()
        .uri(path)
        .body(Body::empty())
        .expect("a valid request")
}

/// Asserts the answer is a JSON error with `status` and `code` and nothing else; its message.
fn error_of(answer: &(StatusCode, HeaderMap, Value), status: StatusCode, code: &str) -> String {
    let (got, headers, body) = answer;
    assert_eq!(*got, status, "{body}");
    assert_eq!(headers[header::CONTENT_TYPE], "application/json");
    assert_eq!(body["code"], code, "{body}");
    assert_eq!(
        body.as_object().map(serde_json::Map::len),
        Some(2),
        "only `error` and `code`: {body}"
    );
    let message = body["error"]
        .as_str()
        .expect("an `error` string")
        .to_owned();
    assert!(!message.is_empty());
    message
}

#[tokio::test]
async fn bad_requests_get_the_right_status_and_a_json_error() {
    let router = router_with(|config| config.max_body_bytes = 1024);
    let json_type = Some("application/json");

    // 400: not JSON at all, or cut short.
    let answer = call(&router, post("/tasks", json_type, "{\"kind\": ")).await;
    let message = error_of(&answer, StatusCode::BAD_REQUEST, "invalid_json");
    assert!(message.contains("not valid JSON"), "{message}");
    let answer = call(&router, post("/tasks", json_type, "kind=sleep")).await;
    error_of(&answer, StatusCode::BAD_REQUEST, "invalid_json");

    // 415: no content type, or the wrong one.
    let body = json!({"kind": "sleep"}).to_string();
    let answer = call(&router, post("/tasks", None, body.clone())).await;
    let message = error_of(
        &answer,
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_media_type",
    );
    assert!(
        message.contains("Content-Type: application/json"),
        "{message}"
    );
    let answer = call(&router, post("/tasks", Some("text/plain"), body)).await;
    error_of(
        &answer,
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_media_type",
    );

    // 413: over the configured limit.
    let big = json!({"kind": "sleep", "payload": "x".repeat(2048)}).to_string();
    let answer = call(&router, post("/tasks", json_type, big)).await;
    let message = error_of(&answer, StatusCode::PAYLOAD_TOO_LARGE, "body_too_large");
    assert!(message.contains("MAX_BODY_BYTES"), "{message}");

    // 422: JSON that is not a task.
    for (body, hint) in [
        (json!({"payload": {}}), "missing field `kind`"),
        (json!({"kind": ""}), "1 to 64 characters"),
        (json!({"kind": "Send Email"}), "1 to 64 characters"),
        (json!({"kind": "k".repeat(65)}), "1 to 64 characters"),
        (json!({"kind": 7}), "invalid type"),
        (
            json!({"kind": "sleep", "priority": 1}),
            "unknown field `priority`",
        ),
        (json!(["sleep"]), "invalid type"),
    ] {
        let answer = call(&router, post_task(&body)).await;
        let message = error_of(&answer, StatusCode::UNPROCESSABLE_ENTITY, "invalid_task");
        assert!(message.contains(hint), "{body} -> {message}");
    }

    // 404 and 405.
    let answer = call(&router, get("/nope")).await;
    let message = error_of(&answer, StatusCode::NOT_FOUND, "not_found");
    assert!(message.contains("GET /openapi.json"), "{message}");
    let answer = call(&router, get("/tasks")).await;
    assert_eq!(answer.1[header::ALLOW], "POST");
    error_of(
        &answer,
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
    );
    let delete_health = Request::builder()
        .method(Method::DELETE)
        .uri("/health")
        .body(Body::empty())
        .expect("a valid request");
    let answer = call(&router, delete_health).await;
    error_of(
        &answer,
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
    );
}

/// Each mistake in a task is named as it was made: a `delay` without its unit is not told it
/// gave both `delay` and `run_at`.
#[tokio::test]
async fn a_bad_delay_or_run_at_is_named_for_what_is_wrong_with_it() {
    let router = router_with(|_| {});
    for (body, hint) in [
        (
            json!({"kind": "sleep", "delay": "90"}),
            "delay must be a duration with its unit",
        ),
        (
            json!({"kind": "sleep", "delay": "abc"}),
            "delay must be a duration with its unit",
        ),
        (
            json!({"kind": "sleep", "delay": "-5s"}),
            "delay must be a duration with its unit",
        ),
        (
            json!({"kind": "sleep", "run_at": "tomorrow"}),
            "run_at must be an RFC 3339 time",
        ),
        (
            json!({"kind": "sleep", "delay": "5s", "run_at": "2030-01-01T00:00:00Z"}),
            "at most one of delay and run_at",
        ),
    ] {
        let answer = call(&router, post_task(&body)).await;
        let message = error_of(
            &answer,
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_schedule",
        );
        assert!(message.contains(hint), "{body} -> {message}");
    }
    // A field that is not a task's is told the fields that are.
    let answer = call(&router, post_task(&json!({"kind": "sleep", "when": "5s"}))).await;
    let message = error_of(&answer, StatusCode::UNPROCESSABLE_ENTITY, "invalid_task");
    assert!(
        message.contains("\"delay\" or \"run_at\"") && message.contains("expires_in"),
        "{message}"
    );
}

/// A page of another site cannot change anything, whether or not API keys are set: the
/// browser says where a request comes from (`Sec-Fetch-Site`, or `Origin`), and the gateway
/// refuses it. Clients that are not browser pages send neither, and pass.
#[tokio::test]
async fn requests_a_page_of_another_site_sends_are_refused_without_keys_too() {
    let router = router_with(|_| {});
    let with = |method: Method, path: &str, headers: &[(&str, &str)]| {
        let mut request = Request::builder().method(method).uri(path);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        request
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(json!({"kind": "sleep"}).to_string()))
            .expect("a valid request")
    };
    for headers in [
        &[("sec-fetch-site", "cross-site")][..],
        &[("sec-fetch-site", "same-site")],
        &[
            ("origin", "http://evil.example"),
            ("host", "127.0.0.1:8080"),
        ],
        &[("origin", "null"), ("host", "127.0.0.1:8080")],
    ] {
        for path in [
            "/tasks",
            "/dead/retry?kind=sleep",
            "/tasks/cancel?kind=sleep",
        ] {
            let answer = call(&router, with(Method::POST, path, headers)).await;
            let message = error_of(&answer, StatusCode::FORBIDDEN, "cross_site_request");
            assert!(
                message.contains("another site"),
                "{path} {headers:?}: {message}"
            );
        }
    }
    // The same origin, a page the user typed, and a client that is no browser page: on to
    // the broker, which is not there.
    for headers in [
        &[("sec-fetch-site", "same-origin")][..],
        &[("sec-fetch-site", "none")],
        &[
            ("origin", "http://127.0.0.1:8080"),
            ("host", "127.0.0.1:8080"),
        ],
        &[],
    ] {
        let answer = call(&router, with(Method::POST, "/tasks", headers)).await;
        error_of(
            &answer,
            StatusCode::SERVICE_UNAVAILABLE,
            "broker_unavailable",
        );
    }
    // Reading is never refused for where it comes from.
    let mut read = get("/health");
    read.headers_mut().insert(
        "sec-fetch-site",
        "cross-site".parse().expect("a header value"),
    );
    let (status, _, _) = call(&router, read).await;
    assert_ne!(status, StatusCode::FORBIDDEN);
}

/// A batch that is not one is refused whole; a batch's tasks are answered one by one, a bad
/// one among good ones with its own error.
#[tokio::test]
async fn a_batch_is_refused_whole_only_for_its_shape_or_size() {
    let router = router_with(|config| config.max_batch = 3);
    let batch = |body: &Value| post("/tasks/batch", Some("application/json"), body.to_string());
    for (body, code) in [
        (json!([{"kind": "sleep"}]), "invalid_task"),
        (json!({"tasks": {"kind": "sleep"}}), "invalid_task"),
        (json!({"tasks": []}), "batch_size"),
        (
            json!({"tasks": [{"kind": "sleep"}, {"kind": "sleep"}, {"kind": "sleep"}, {"kind": "sleep"}]}),
            "batch_size",
        ),
    ] {
        let answer = call(&router, batch(&body)).await;
        let message = error_of(&answer, StatusCode::UNPROCESSABLE_ENTITY, code);
        if code == "batch_size" {
            assert!(message.contains("MAX_BATCH"), "{message}");
        }
    }
    // Without a broker, the good task cannot be queued, and says so; the bad one says why.
    let (status, _, answer) = call(
        &router,
        batch(&json!({"tasks": [{"kind": "sleep"}, {"kind": "sleep", "when": "now"}]})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(
        answer["results"][0]["code"], "broker_unavailable",
        "{answer}"
    );
    assert_eq!(answer["results"][1]["code"], "invalid_task", "{answer}");
    assert!(
        answer["results"][1]["error"]
            .as_str()
            .is_some_and(|error| error.contains("unknown field `when`")),
        "{answer}"
    );
    assert_eq!(
        (answer["queued"].as_u64(), answer["refused"].as_u64()),
        (Some(0), Some(2))
    );
}

#[tokio::test]
async fn a_valid_task_without_a_broker_gets_503_with_retry_after_never_202() {
    let router = router_with(|_| {});

    let answer = call(&router, post_task(&json!({"kind": "sleep"}))).await;

    assert_eq!(answer.1[header::RETRY_AFTER], "1");
    let message = error_of(
        &answer,
        StatusCode::SERVICE_UNAVAILABLE,
        "broker_unavailable",
    );
    assert!(message.contains("not queued"), "{message}");
    let (status, headers, health) = call(&router, get("/health")).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(headers.contains_key(header::RETRY_AFTER));
    assert_eq!(health["broker"], "disconnected");
}

#[tokio::test]
async fn keys_and_scopes_decide_who_gets_past_the_door() {
    let mut keys = tempfile::NamedTempFile::new().expect("keys file");
    writeln!(keys, "# offload keys\nsubmitter-key\n\nreader-key = read").expect("write keys");
    let router = router_with(|config| config.api_keys_file = Some(keys.path().to_owned()));
    let with_key = |key: &str| {
        let mut request = post_task(&json!({"kind": "sleep"}));
        request.headers_mut().insert(
            header::AUTHORIZATION,
            format!("Bearer {key}").parse().expect("a header value"),
        );
        request
    };

    let answer = call(&router, post_task(&json!({"kind": "sleep"}))).await;
    let message = error_of(&answer, StatusCode::UNAUTHORIZED, "unauthorized");
    assert!(message.contains("has none"), "{message}");
    // Refused before its body was read: the connection cannot carry another request, and the
    // answer says so. A request without a body keeps its connection.
    assert_eq!(answer.1[header::CONNECTION], "close");
    let (status, headers, _) =
        call(&router, get("/tasks/00000000-0000-0000-0000-000000000000")).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(!headers.contains_key(header::CONNECTION));
    // A bare key, without `Bearer `: not told it sent none.
    let mut bare = post_task(&json!({"kind": "sleep"}));
    bare.headers_mut().insert(
        header::AUTHORIZATION,
        "submitter-key".parse().expect("a header value"),
    );
    let message = error_of(
        &call(&router, bare).await,
        StatusCode::UNAUTHORIZED,
        "unauthorized",
    );
    assert!(
        message.contains("Authorization header holds no key")
            && message.contains("Authorization: Bearer <API key>"),
        "{message}"
    );
    let answer = call(&router, with_key("guessed-key")).await;
    error_of(&answer, StatusCode::UNAUTHORIZED, "unauthorized");
    let answer = call(&router, with_key("reader-key")).await;
    error_of(&answer, StatusCode::FORBIDDEN, "forbidden");
    // The submitter's key gets past the door, to the broker that is not there.
    let answer = call(&router, with_key("submitter-key")).await;
    error_of(
        &answer,
        StatusCode::SERVICE_UNAVAILABLE,
        "broker_unavailable",
    );
    // For load balancers: no key needed.
    let (status, _, _) = call(&router, get("/health")).await;
    assert_ne!(status, StatusCode::UNAUTHORIZED);
}

/// The paths of the OpenAPI document `router` serves, as `(method, path)`.
async fn documented(router: &Router) -> Vec<(String, String)> {
    let (status, headers, document) = call(router, get("/openapi.json")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers[header::CONTENT_TYPE], "application/json");
    assert_eq!(document["openapi"], "3.1.0", "{document}");
    let paths = document["paths"].as_object().expect("paths");
    paths
        .iter()
        .flat_map(|(path, operations)| {
            operations
                .as_object()
                .into_iter()
                .flat_map(|operations| operations.keys())
                .map(move |method| (method.clone(), path.clone()))
        })
        .collect()
}

/// The document follows the switches: what is off is neither served nor documented.
#[tokio::test]
async fn what_is_switched_off_is_not_documented() {
    let on = documented(&router_with(|_| {})).await;
    let off_router = router_with(|config| {
        config.metrics = false;
        config.dashboard = false;
    });
    let off = documented(&off_router).await;

    for path in ["/metrics", "/", "/dashboard/state"] {
        assert!(
            on.iter().any(|(_, documented)| documented == path),
            "{path} is on by default, and documented"
        );
        assert!(
            !off.iter().any(|(_, documented)| documented == path),
            "{path} is documented though off"
        );
    }
    assert!(off.contains(&("post".to_owned(), "/tasks".to_owned())));
    let (status, _, _) = call(&off_router, get("/metrics")).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "and not served");
}
