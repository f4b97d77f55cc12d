//! What an error message tells a client: advice for each way the broker or a body can fail,
//! and short excerpts of what the client sent.

use axum::{extract::rejection::JsonRejection, http::StatusCode};
use offload_common::PublishError as Broker;

use crate::publisher::PublishError;

/// The longest excerpt of client input an error message quotes.
const EXCERPT: usize = 100;

/// What to tell a client whose task the broker did not take. Never the broker's own text.
pub(super) fn unavailable_advice(error: &PublishError) -> &'static str {
    match error {
        PublishError::Broker(Broker::Disconnected | Broker::Channel(_)) => {
            "the task was not queued: the gateway has no connection to RabbitMQ right now. Retry after the Retry-After delay"
        }
        PublishError::Blocked => {
            "the task was not queued: RabbitMQ is refusing new messages (memory or disk alarm). Retry after the Retry-After delay"
        }
        PublishError::Overloaded => {
            "the task was not queued: this gateway has too many tasks awaiting the broker's confirm (MAX_IN_FLIGHT). Retry after the Retry-After delay"
        }
        PublishError::Broker(Broker::Nacked) => {
            "the task was not queued: RabbitMQ refused it (nack: the queue is at its length limit, or a cluster is moving its leader after losing a node). Retry after the Retry-After delay"
        }
        // Answered as `UnknownKind` by the route, which knows the kind; never reaches here.
        PublishError::UnknownKind => "the task was not queued: no worker handles its kind",
        PublishError::Broker(Broker::Returned(_)) => {
            "the task was not queued: a queue it needs does not exist right now (it is being declared again). Retry after the Retry-After delay"
        }
        // Without a confirm nobody knows whether the broker kept the task; say so, since a
        // retry may then run it twice (delivery is at least once anyway).
        PublishError::Broker(Broker::Timeout(_)) => {
            "the task may not have been queued: RabbitMQ did not confirm it within CONFIRM_TIMEOUT. Retry after the Retry-After delay; if it was queued after all it runs twice, so handlers should be idempotent"
        }
    }
}

/// Rewords axum's JSON rejections so each says what to send instead.
pub(super) fn json_advice(rejection: &JsonRejection) -> String {
    match rejection {
        JsonRejection::MissingJsonContentType(_) => {
            "send the task as JSON with the header Content-Type: application/json".into()
        }
        JsonRejection::JsonSyntaxError(_) => format!(
            "the body is not valid JSON ({}); send an object like {{\"kind\": \"sleep\", \"payload\": {{\"message\": \"...\"}}}}",
            excerpt(&inner_most(rejection))
        ),
        JsonRejection::JsonDataError(error) => format!(
            "the body does not describe a task: {}. Expected {{\"kind\": \"<1-64 chars of a-z 0-9 _ . ->\", \"payload\": <any JSON, optional>}}, optionally with \"delay\" or \"run_at\", and \"expires_in\" or \"expires_at\" (GET /openapi.json describes each)",
            excerpt(&inner_most(error))
        ),
        JsonRejection::BytesRejection(_) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            "the body is larger than this gateway accepts (MAX_BODY_BYTES); send a smaller payload, or store large inputs elsewhere and send a reference".into()
        }
        _ => "the request body could not be read; send it again".into(),
    }
}

/// serde's message, without axum's "Failed to deserialize..." prefix.
fn inner_most(error: &dyn std::error::Error) -> String {
    let mut current = error;
    while let Some(source) = current.source() {
        current = source;
    }
    current.to_string()
}

/// The most kinds an error names: the kinds come from the events stream, as workers announce
/// them, and an answer stays short whatever it holds.
const KINDS_NAMED: usize = 20;

/// Up to [`KINDS_NAMED`] of `kinds`, each excerpted, and how many more there are.
pub(super) fn kinds_excerpt(kinds: &[String]) -> String {
    let named: Vec<String> = kinds
        .iter()
        .take(KINDS_NAMED)
        .map(|kind| excerpt(kind))
        .collect();
    match kinds.len().saturating_sub(KINDS_NAMED) {
        0 => named.join(", "),
        more => format!(
            "{} and {more} more (GET /kinds lists them)",
            named.join(", ")
        ),
    }
}

/// At most [`EXCERPT`] characters of client input, marked when cut.
pub(super) fn excerpt(text: &str) -> String {
    match text.char_indices().nth(EXCERPT) {
        Some((end, _)) => format!("{}…", &text[..end]),
        None => text.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn excerpts_are_short_and_marked() {
        assert_eq!(excerpt("short"), "short");
        let long = "x".repeat(10_000);
        let cut = excerpt(&long);
        assert_eq!(cut.chars().count(), EXCERPT + 1);
        assert!(cut.ends_with('…'));
        // Never splits a character.
        assert_eq!(excerpt(&"é".repeat(200)).chars().count(), EXCERPT + 1);
    }
}
