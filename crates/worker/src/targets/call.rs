//! One call of an HTTP target: the task POSTed as JSON, signed and traced, and the answer
//! read, bounded, as the attempt's result or error.

use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};

use reqwest::{
    Url,
    header::{CONTENT_TYPE, HeaderMap},
};
use serde::Serialize;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use super::{
    signing::SigningSecret,
    verdict::{Verdict, judge, retry_after},
};
use crate::{
    HandlerError, RetryPolicy, Task,
    registry::{Completed, ErasedHandler, HandlerFuture},
};

/// How many bytes of a refusing answer's body go into the task's error.
const ERROR_BODY_BYTES: usize = 512;

/// The body of a call, in the order docs/TARGETS.md shows.
#[derive(Serialize)]
struct Call<'a> {
    id: uuid::Uuid,
    kind: &'a str,
    payload: &'a serde_json::Value,
    attempt: u32,
    submitted_at: String,
}

/// A task kind run by POSTing the task to a URL.
pub(crate) struct HttpTarget {
    pub(super) kind: String,
    pub(super) url: Url,
    /// The URL as logs and errors show it: without its query, which may hold a token.
    pub(super) shown: String,
    /// Longest one call may take, answer included.
    pub(super) timeout: Duration,
    /// `concurrency` in TARGETS_FILE: the most tasks of this kind a worker holds at once
    /// (the prefetch of its kind's subscription), whatever PREFETCH says.
    pub(super) concurrency: Option<u16>,
    pub(super) headers: HeaderMap,
    pub(super) client: reqwest::Client,
    pub(super) secret: Option<SigningSecret>,
}

impl HttpTarget {
    pub(crate) fn kind(&self) -> &str {
        &self.kind
    }

    /// POSTs `task` and reads the answer as what happened to it.
    async fn run(&self, task: Task, result_max_bytes: usize) -> Result<Completed, HandlerError> {
        let timeout = self.timeout;
        let body = serde_json::to_vec(&Call {
            id: task.id,
            kind: &task.kind,
            payload: &task.payload,
            attempt: task.attempt,
            submitted_at: humantime::format_rfc3339_millis(task.submitted_at).to_string(),
        })
        .map_err(|error| HandlerError::permanent(format!("cannot write the call: {error}")))?;
        let mut request = self
            .client
            .post(self.url.clone())
            .timeout(timeout)
            .headers(self.headers.clone())
            .header(CONTENT_TYPE, "application/json")
            .header("offload-task-id", task.id.to_string())
            .header("offload-attempt", task.attempt.to_string());
        // The attempt's span, as the parent of whatever the target records.
        if offload_common::trace::exporting() {
            let context = tracing::Span::current().context();
            for (name, value) in offload_common::trace::to_w3c(&context) {
                request = request.header(name, value);
            }
        }
        if let Some(secret) = &self.secret {
            let now = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |since| since.as_secs());
            request = request.header("offload-signature", secret.sign(now, &body));
        }
        let mut response = request
            .body(body)
            .send()
            .await
            .map_err(|error| HandlerError::from(describe(&error, &self.shown, timeout)))?;
        let status = response.status();
        if status.is_success() {
            let is_json = response
                .headers()
                .get(CONTENT_TYPE)
                .and_then(|value| value.to_str().ok())
                .is_some_and(|value| value.contains("json"));
            let (body, complete) = read_at_most(&mut response, result_max_bytes)
                .await
                .map_err(|error| HandlerError::from(describe(&error, &self.shown, timeout)))?;
            if !complete {
                return Ok(Completed::too_large(
                    result_max_bytes.saturating_add(1),
                    result_max_bytes,
                ));
            }
            if !is_json || body.iter().all(u8::is_ascii_whitespace) {
                return Ok(Completed::default());
            }
            return Ok(match serde_json::from_slice(&body) {
                Ok(result) => Completed::bounded(Some(result), result_max_bytes),
                Err(error) => Completed {
                    result: None,
                    note: Some(format!(
                        "the target's answer is not JSON ({error}); no result kept"
                    )),
                },
            });
        }
        let retry_after = retry_after(response.headers());
        let (start, _) = read_at_most(&mut response, ERROR_BODY_BYTES)
            .await
            .unwrap_or_default();
        let error = format!(
            "{} answered {status}{}",
            self.shown,
            match String::from_utf8_lossy(&start).trim() {
                "" => String::new(),
                text => format!(": {text}"),
            }
        );
        Err(match judge(status) {
            Verdict::RetryAfter => match retry_after {
                Some(delay) => HandlerError::retry_after(error, delay),
                None => HandlerError::from(error),
            },
            Verdict::Retry => HandlerError::from(error),
            Verdict::Redirect => HandlerError::permanent(format!(
                "{error} (a redirect, which offload does not follow: point the target at the final URL)"
            )),
            Verdict::Permanent => HandlerError::permanent(error),
        })
    }
}

impl ErasedHandler for HttpTarget {
    fn call(self: Arc<Self>, task: Task, result_max_bytes: usize) -> HandlerFuture {
        Box::pin(async move {
            // A cancel drops the call: reqwest closes its connection, which the target sees
            // as the client going away (docs/TARGETS.md).
            let cancellation = task.cancellation_token();
            tokio::select! {
                answered = self.run(task, result_max_bytes) => answered,
                () = cancellation.cancelled() => Err(HandlerError::permanent(format!(
                    "cancelled: the call to {} was aborted", self.shown
                ))),
            }
        })
    }

    fn policy(&self) -> Option<RetryPolicy> {
        None
    }

    fn concurrency(&self) -> Option<u16> {
        self.concurrency
    }
}

/// Up to `max` bytes of the body; `false` if there was more (the rest is not read).
async fn read_at_most(
    response: &mut reqwest::Response,
    max: usize,
) -> Result<(Vec<u8>, bool), reqwest::Error> {
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await? {
        if body.len() + chunk.len() > max {
            let room = max - body.len();
            body.extend_from_slice(&chunk[..room]);
            return Ok((body, false));
        }
        body.extend_from_slice(&chunk);
    }
    Ok((body, true))
}

/// A failed call in one line: what happened, to which URL (as shown: no query).
fn describe(error: &reqwest::Error, url: &str, timeout: Duration) -> String {
    if error.is_timeout() {
        return format!(
            "{url} did not answer within {} (the target's timeout)",
            humantime::format_duration(timeout)
        );
    }
    // reqwest's own text names the whole URL, query included: say it in our words, with
    // the URL as shown, and the causes' text (which name no URL).
    let what = if error.is_connect() {
        "cannot connect"
    } else if error.is_body() || error.is_decode() {
        "the answer broke off"
    } else {
        "the call failed"
    };
    let mut text = format!("{url}: {what}");
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
