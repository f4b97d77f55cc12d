//! The `Handler` trait and the registry that maps task kinds to handlers.

use std::{
    collections::HashMap,
    fmt,
    future::Future,
    pin::Pin,
    sync::Arc,
    time::{Duration, SystemTime},
};

use offload_common::TaskEnvelope;

use crate::RetryPolicy;
use uuid::Uuid;

/// Any error a handler wants to report.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// One delivery of a task, as a handler sees it.
///
/// Delivery is at least once: after a worker crash or a lost connection the same task (same
/// [`Task::id`]) can run again. A handler whose effects must not repeat should record the ids
/// it has completed, or make its effect idempotent.
#[derive(Debug, Clone)]
pub struct Task {
    /// The task id the gateway returned to the client. Stable across redeliveries.
    pub id: Uuid,
    /// The task kind.
    pub kind: String,
    /// The client's payload.
    pub payload: serde_json::Value,
    /// When the gateway accepted the task.
    pub submitted_at: SystemTime,
    /// How many times the broker delivered this copy of the task before (0 on its first
    /// delivery): more than 0 after a worker crash or a lost connection.
    pub previous_deliveries: u64,
    /// Which attempt this is, 1 for the first: failed attempts and redeliveries both count.
    pub attempt: u32,
}

impl Task {
    pub(crate) fn new(envelope: TaskEnvelope, previous_deliveries: u64, attempt: u32) -> Self {
        Self {
            id: envelope.id,
            kind: envelope.kind.into(),
            payload: envelope.payload,
            submitted_at: envelope.submitted_at,
            previous_deliveries,
            attempt,
        }
    }
}

/// Runs tasks of one kind. Implement it in one file, register it with one line.
///
/// ```
/// use offload_worker::{Handler, HandlerError, Task};
///
/// struct Resize;
///
/// impl Handler for Resize {
///     const KIND: &'static str = "resize";
///     /// What GET /tasks/{id} shows as the task's result; `()` for none.
///     type Output = serde_json::Value;
///
///     async fn handle(&self, task: Task) -> Result<Self::Output, HandlerError> {
///         let Some(url) = task.payload.get("url").and_then(|v| v.as_str()) else {
///             return Err(HandlerError::permanent("payload.url must be a string"));
///         };
///         // ... fetch and resize `url`; `?` on any error retries the task ...
///         Ok(serde_json::json!({"thumbnail": format!("{url}.small")}))
///     }
/// }
///
/// let registry = offload_worker::Registry::default().register(Resize);
/// ```
pub trait Handler: Send + Sync + 'static {
    /// The task kind this handler runs (1-64 characters of `a-z 0-9 _ . -`).
    const KIND: &'static str;

    /// The task's result, kept on the events stream and shown by GET /tasks/{id}: any
    /// `Serialize` type, `()` for none. Larger than `RESULT_MAX_BYTES` as JSON, it is dropped
    /// (the task still succeeds, and its status says why the result is missing).
    type Output: serde::Serialize + Send + 'static;

    /// Runs one task. `Ok` acks it. An error, or a panic, counts as a failed attempt: a
    /// [retryable](HandlerError::from) failure is tried again after a backoff delay (or the
    /// one the handler asked for, [`HandlerError::retry_after`]) until its last attempt, and
    /// then dead-lettered; a [permanent](HandlerError::permanent) one is dead-lettered at
    /// once.
    fn handle(&self, task: Task)
    -> impl Future<Output = Result<Self::Output, HandlerError>> + Send;

    /// This kind's own retry policy; `None` (the default) takes the worker's `MAX_ATTEMPTS`,
    /// `RETRY_BASE` and `RETRY_MAX`.
    fn retry_policy(&self) -> Option<RetryPolicy> {
        None
    }
}

/// Why a handler failed, and whether (and when) trying again could help.
pub struct HandlerError {
    source: BoxError,
    retry: bool,
    retry_after: Option<Duration>,
}

impl HandlerError {
    /// A failure that a retry cannot fix (bad input): the task is dead-lettered at once.
    pub fn permanent(error: impl Into<BoxError>) -> Self {
        Self {
            source: error.into(),
            retry: false,
            retry_after: None,
        }
    }

    /// A failure to try again after `delay` rather than after the backoff's own delay (a
    /// service answered 429 with `Retry-After`, say). It still counts as an attempt.
    pub fn retry_after(error: impl Into<BoxError>, delay: Duration) -> Self {
        Self {
            source: error.into(),
            retry: true,
            retry_after: Some(delay),
        }
    }

    /// Whether the task should be tried again.
    pub fn is_retryable(&self) -> bool {
        self.retry
    }

    /// The delay the handler asked for before the next attempt, if any.
    pub fn requested_delay(&self) -> Option<Duration> {
        self.retry_after
    }
}

/// Any error converts into a retryable failure, so `?` works in handlers.
impl<E: Into<BoxError>> From<E> for HandlerError {
    fn from(error: E) -> Self {
        Self {
            source: error.into(),
            retry: true,
            retry_after: None,
        }
    }
}

impl fmt::Display for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.source, f)
    }
}

impl fmt::Debug for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HandlerError")
            .field("source", &self.source)
            .field("retry", &self.retry)
            .field("retry_after", &self.retry_after)
            .finish()
    }
}

/// A handler's run, boxed so handlers of different types share one map; its output as JSON
/// (`None` for none).
pub(crate) type HandlerFuture =
    Pin<Box<dyn Future<Output = Result<Option<serde_json::Value>, HandlerError>> + Send>>;

/// Object-safe face of [`Handler`], so handlers of different types share one map.
trait ErasedHandler: Send + Sync {
    fn call(self: Arc<Self>, task: Task) -> HandlerFuture;
    fn policy(&self) -> Option<RetryPolicy>;
}

impl<H: Handler> ErasedHandler for H {
    fn policy(&self) -> Option<RetryPolicy> {
        self.retry_policy()
    }

    fn call(self: Arc<Self>, task: Task) -> HandlerFuture {
        Box::pin(async move {
            let output = self.handle(task).await?;
            match serde_json::to_value(output) {
                Ok(serde_json::Value::Null) => Ok(None),
                Ok(value) => Ok(Some(value)),
                Err(error) => Err(HandlerError::permanent(format!(
                    "the handler's result cannot be written as JSON: {error}"
                ))),
            }
        })
    }
}

/// The handlers a worker knows, by kind.
#[derive(Clone, Default)]
pub struct Registry {
    handlers: HashMap<&'static str, Arc<dyn ErasedHandler>>,
}

impl Registry {
    /// Adds `handler` for its [`Handler::KIND`], replacing any handler of that kind.
    #[must_use]
    pub fn register<H: Handler>(mut self, handler: H) -> Self {
        debug_assert!(
            offload_common::TaskKind::try_from(H::KIND).is_ok(),
            "handler kind {:?} is not a valid task kind",
            H::KIND
        );
        self.handlers.insert(H::KIND, Arc::new(handler));
        self
    }

    /// The kinds this registry can run, sorted.
    pub fn kinds(&self) -> Vec<&'static str> {
        let mut kinds: Vec<_> = self.handlers.keys().copied().collect();
        kinds.sort_unstable();
        kinds
    }

    /// The retry policy of `kind`'s handler, if it has one of its own.
    pub(crate) fn policy(&self, kind: &str) -> Option<RetryPolicy> {
        self.handlers.get(kind).and_then(|handler| handler.policy())
    }

    /// Starts the handler for `task`'s kind, or gives the task back if there is none.
    pub(crate) fn dispatch(&self, task: Task) -> Result<HandlerFuture, Task> {
        match self.handlers.get(task.kind.as_str()) {
            Some(handler) => Ok(Arc::clone(handler).call(task)),
            None => Err(task),
        }
    }
}

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Registry")
            .field("kinds", &self.kinds())
            .finish()
    }
}
