//! The floor under any front door built as offload's is: axum reading a task's JSON and
//! answering 202 with a new id, and nothing else: no broker, no events, no status. The
//! benchmark measures its CPU per request beside the gateway's and raw lapin's per publish
//! (`--only post`): the two together are the least a POST /tasks on axum and lapin can cost.
//!
//! `http-floor <port>`; `GET /health` answers when it listens.

use axum::{
    Json, Router,
    http::StatusCode,
    routing::{get, post},
};

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let port: u16 = std::env::args()
        .nth(1)
        .and_then(|port| port.parse().ok())
        .ok_or_else(|| std::io::Error::other("usage: http-floor <port>"))?;
    let app = Router::new()
        .route("/tasks", post(accept))
        .route("/health", get(|| async { "ok" }));
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    axum::serve(listener, app).await
}

/// Reads the task (a JSON object, parsed whole) and answers as the gateway does: 202, a new
/// id, the kind and the status.
async fn accept(
    Json(task): Json<serde_json::Map<String, serde_json::Value>>,
) -> (StatusCode, Json<serde_json::Value>) {
    let kind = task.get("kind").cloned().unwrap_or_default();
    (
        StatusCode::ACCEPTED,
        Json(serde_json::json!({
            "id": uuid::Uuid::new_v4(),
            "kind": kind,
            "status": "queued",
        })),
    )
}
