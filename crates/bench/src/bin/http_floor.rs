//! The floors under any front door built as offload's is, with nothing else in it: no
//! events, status, metrics, logs, keys or limits.
//!
//! - `http-floor <port>`: axum reading a task's JSON and answering 202 with a new id, without
//!   a broker. The benchmark measures its CPU per request beside the gateway's and raw
//!   lapin's per publish (`--only post`): the two together are the least a POST /tasks on
//!   axum and lapin can cost.
//! - `http-floor <port> <amqp-url> <queue>`: the same, publishing each task to `queue` on one
//!   confirm-mode channel (as the gateway does) and answering once the broker confirmed it.
//!   Its rate beside raw lapin's publish ceiling is the most of that ceiling a front door on
//!   axum and lapin reaches on this machine.
//!
//! `GET /health` answers when it listens.

use axum::{
    Json, Router,
    extract::State,
    http::StatusCode,
    routing::{get, post},
};
use lapin::{
    Channel, Connection, ConnectionProperties,
    options::{BasicPublishOptions, ConfirmSelectOptions},
};
use offload_common::{TaskEnvelope, TaskKind};

/// Where tasks go, when the floor publishes them.
#[derive(Clone)]
struct Broker {
    channel: Channel,
    queue: String,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (port, broker) = match args.as_slice() {
        [port] => (port.parse::<u16>()?, None),
        [port, url, queue] => {
            let connection = Connection::connect(url, ConnectionProperties::default()).await?;
            let channel = connection.create_channel().await?;
            channel
                .confirm_select(ConfirmSelectOptions::default())
                .await?;
            // Kept open for the life of the process.
            std::mem::forget(connection);
            let queue = queue.clone();
            (port.parse::<u16>()?, Some(Broker { channel, queue }))
        }
        _ => return Err("usage: http-floor <port> [<amqp-url> <queue>]".into()),
    };
    let app = Router::new()
        .route("/tasks", post(accept))
        .route("/health", get(|| async { "ok" }))
        .with_state(broker);
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    axum::serve(listener, app).await?;
    Ok(())
}

/// Reads the task (a JSON object, parsed whole), publishes it when there is a broker, and
/// answers as the gateway does: 202, its id, the kind and the status.
async fn accept(
    State(broker): State<Option<Broker>>,
    Json(mut task): Json<serde_json::Map<String, serde_json::Value>>,
) -> (StatusCode, Json<serde_json::Value>) {
    let kind = task.get("kind").cloned().unwrap_or_default();
    let id = match broker {
        None => uuid::Uuid::new_v4(),
        Some(broker) => {
            let Some(Ok(kind)) = kind.as_str().map(TaskKind::try_from) else {
                return (StatusCode::BAD_REQUEST, Json(serde_json::Value::Null));
            };
            let payload = task.remove("payload").unwrap_or_default();
            let envelope = TaskEnvelope::new(kind, payload);
            if !publish(&broker, &envelope).await {
                return (
                    StatusCode::SERVICE_UNAVAILABLE,
                    Json(serde_json::Value::Null),
                );
            }
            envelope.id
        }
    };
    (
        StatusCode::ACCEPTED,
        Json(serde_json::json!({
            "id": id,
            "kind": kind,
            "status": "queued",
        })),
    )
}

/// Publishes `envelope` (mandatory, as the gateway publishes a task); whether the broker
/// confirmed it.
async fn publish(broker: &Broker, envelope: &TaskEnvelope) -> bool {
    let published = broker
        .channel
        .basic_publish(
            "".into(),
            broker.queue.as_str().into(),
            BasicPublishOptions {
                mandatory: true,
                ..BasicPublishOptions::default()
            },
            &envelope.to_bytes(),
            envelope.properties(),
        )
        .await;
    match published {
        Ok(confirm) => confirm.await.is_ok_and(|confirm| confirm.is_ack()),
        Err(_) => false,
    }
}
