//! `POST /tasks`: accept a task, publish it, answer 202 once the broker has confirmed it.

use axum::{
    Router,
    extract::State,
    http::{HeaderValue, StatusCode, header},
    middleware,
    response::{IntoResponse, Response},
    routing::post,
};
use offload_common::{TaskEnvelope, TaskKind};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::Json;
use crate::{
    AppState,
    auth::{self, Scope},
    error::{ApiError, Result},
    publisher::PublishError,
};

pub fn router(state: &AppState) -> Router<AppState> {
    Router::new()
        .route("/tasks", post(submit))
        .route_layer(middleware::from_fn_with_state(
            (state.access.clone(), Scope::Submit),
            auth::require,
        ))
}

/// What a client sends: a JSON object, nothing else.
#[derive(Deserialize)]
#[serde(try_from = "serde_json::Map<String, serde_json::Value>")]
struct NewTask {
    kind: TaskKind,
    payload: serde_json::Value,
}

/// The object's fields. Read through [`NewTask`] because serde's derived deserializer would
/// also take an array (`["sleep"]`) for a struct, and a task is only ever an object.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewTaskFields {
    kind: TaskKind,
    #[serde(default)]
    payload: serde_json::Value,
}

impl TryFrom<serde_json::Map<String, serde_json::Value>> for NewTask {
    type Error = serde_json::Error;

    fn try_from(object: serde_json::Map<String, serde_json::Value>) -> Result<Self, Self::Error> {
        let NewTaskFields { kind, payload } =
            serde_json::from_value(serde_json::Value::Object(object))?;
        Ok(Self { kind, payload })
    }
}

/// What a client gets back.
#[derive(Serialize)]
struct Accepted<'a> {
    id: Uuid,
    kind: &'a str,
    status: &'static str,
}

async fn submit(State(state): State<AppState>, Json(new): Json<NewTask>) -> Result<Response> {
    let task = TaskEnvelope::new(new.kind, new.payload);
    state
        .publisher
        .publish(&task)
        .await
        .map_err(|error| match error {
            PublishError::UnknownKind => ApiError::UnknownKind {
                kind: task.kind.to_string(),
                known: Vec::new(),
            },
            error => ApiError::Unavailable {
                error,
                retry_after: state.retry_after_secs,
            },
        })?;
    tracing::debug!(task_id = %task.id, kind = %task.kind, "task queued");
    let location = HeaderValue::try_from(format!("/tasks/{}", task.id))
        .expect("a UUID path is a valid header value");
    let body = Json(Accepted {
        id: task.id,
        kind: task.kind.as_str(),
        status: "queued",
    });
    Ok((StatusCode::ACCEPTED, [(header::LOCATION, location)], body).into_response())
}
