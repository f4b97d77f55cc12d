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
use tokio_util::sync::CancellationToken;

use crate::RetryPolicy;
use uuid::Uuid;

/// Any error a handler wants to report.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// One delivery of a task, as a handler sees it.
///
/// Delivery is at least once: after a worker crash or a lost connection the same task (same
/// [`Task::id`]) can run again. A handler whose effects must not repeat should record the ids
/// it has completed, or make its effect idempotent.
///
/// `P` is the payload's type: a handler's [`Handler::Payload`], or the JSON as sent.
#[derive(Debug, Clone)]
pub struct Task<P = serde_json::Value> {
    /// The task id the gateway returned to the client. Stable across redeliveries.
    pub id: Uuid,
    /// The task kind.
    pub kind: String,
    /// The client's payload.
    pub payload: P,
    /// When the gateway accepted the task.
    pub submitted_at: SystemTime,
    /// How many times the broker delivered this copy of the task before (0 on its first
    /// delivery): more than 0 after a worker crash or a lost connection.
    pub previous_deliveries: u64,
    /// Which attempt this is, 1 for the first: failed attempts and redeliveries both count.
    pub attempt: u32,
    /// Cancelled when the task is (`POST /tasks/{id}/cancel`) while this attempt runs.
    cancellation: CancellationToken,
}

impl<P> Task<P> {
    /// Resolves once the task is cancelled while it runs (`POST /tasks/{id}/cancel`). A
    /// handler that can stop early races its work against it and returns an error; whatever
    /// it returns, a cancelled task is not tried again, and its status is `cancelled`
    /// (`handler_stopped` says whether it returned an error rather than finish).
    ///
    /// ```
    /// use std::time::Duration;
    /// use offload_worker::{HandlerError, Task};
    ///
    /// async fn export(task: Task) -> Result<(), HandlerError> {
    ///     for _chunk in 0..100 {
    ///         tokio::select! {
    ///             () = task.cancelled() => return Err(HandlerError::permanent("cancelled")),
    ///             () = tokio::time::sleep(Duration::from_millis(10)) => {} // one chunk's work
    ///         }
    ///     }
    ///     Ok(())
    /// }
    /// ```
    pub async fn cancelled(&self) {
        self.cancellation.cancelled().await;
    }

    /// Whether the task has been cancelled while it runs: for a handler that checks between
    /// steps rather than waits.
    pub fn is_cancelled(&self) -> bool {
        self.cancellation.is_cancelled()
    }

    /// The cancellation token itself, to hand to code that takes a `CancellationToken`.
    pub fn cancellation_token(&self) -> CancellationToken {
        self.cancellation.clone()
    }
}

impl Task {
    pub(crate) fn new(
        envelope: TaskEnvelope,
        previous_deliveries: u64,
        attempt: u32,
        cancellation: CancellationToken,
    ) -> Self {
        Self {
            id: envelope.id,
            kind: envelope.kind.into(),
            payload: envelope.payload,
            submitted_at: envelope.submitted_at,
            previous_deliveries,
            attempt,
            cancellation,
        }
    }

    /// The same task with its payload read as a `P`.
    fn decode<P: serde::de::DeserializeOwned>(self) -> Result<Task<P>, serde_json::Error> {
        Ok(Task {
            payload: serde_json::from_value(self.payload)?,
            id: self.id,
            kind: self.kind,
            submitted_at: self.submitted_at,
            previous_deliveries: self.previous_deliveries,
            attempt: self.attempt,
            cancellation: self.cancellation,
        })
    }
}

/// Runs tasks of one kind. Implement it in one file, register it with one line.
///
/// ```
/// use offload_worker::{Handler, HandlerError, Task};
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Deserialize)]
/// struct Image {
///     url: String,
/// }
///
/// #[derive(Serialize)]
/// struct Thumbnail {
///     thumbnail: String,
/// }
///
/// struct Resize;
///
/// impl Handler for Resize {
///     const KIND: &'static str = "resize";
///     /// A payload that does not fit is a permanent failure, with serde's message as reason.
///     type Payload = Image;
///     /// What GET /tasks/{id} shows as the task's result; `()` for none.
///     type Output = Thumbnail;
///
///     async fn handle(&self, task: Task<Image>) -> Result<Thumbnail, HandlerError> {
///         // ... fetch and resize `task.payload.url`; `?` on any error retries the task ...
///         Ok(Thumbnail { thumbnail: format!("{}.small", task.payload.url) })
///     }
/// }
///
/// let registry = offload_worker::Registry::default().register(Resize);
/// ```
pub trait Handler: Send + Sync + 'static {
    /// The task kind this handler runs (1-64 characters of `a-z 0-9 _ . -`).
    const KIND: &'static str;

    /// The payload's type, read from the task's JSON before [`Handler::handle`] runs; a
    /// payload that does not fit is a permanent failure (dead-lettered at once) with serde's
    /// message as its reason. `serde_json::Value` takes any payload; `Option<T>` also takes a
    /// task posted without one.
    type Payload: serde::de::DeserializeOwned + Send + 'static;

    /// The task's result, kept on the events stream and shown by GET /tasks/{id}: any
    /// `Serialize` type, `()` for none. Larger than `RESULT_MAX_BYTES` as JSON, it is dropped
    /// (the task still succeeds, and its status says why the result is missing).
    type Output: serde::Serialize + Send + 'static;

    /// Runs one task. `Ok` acks it. An error, or a panic, counts as a failed attempt: a
    /// [retryable](HandlerError::from) failure is tried again after a backoff delay (or the
    /// one the handler asked for, [`HandlerError::retry_after`]) until its last attempt, and
    /// then dead-lettered; a [permanent](HandlerError::permanent) one is dead-lettered at
    /// once.
    fn handle(
        &self,
        task: Task<Self::Payload>,
    ) -> impl Future<Output = Result<Self::Output, HandlerError>> + Send;

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

/// What a finished handler leaves: its result as JSON (`None` for none), or a note saying why
/// there is none.
#[derive(Debug, Default)]
pub(crate) struct Completed {
    pub(crate) result: Option<serde_json::Value>,
    /// Set when the handler's result was dropped (over `RESULT_MAX_BYTES`, say).
    pub(crate) note: Option<String>,
}

impl Completed {
    /// `result`, unless its JSON is over `max_bytes`: then none, and a note saying why.
    pub(crate) fn bounded(result: Option<serde_json::Value>, max_bytes: usize) -> Self {
        let Some(result) = result else {
            return Self::default();
        };
        let size = serde_json::to_vec(&result).map_or(usize::MAX, |json| json.len());
        if size > max_bytes {
            return Self::too_large(size, max_bytes);
        }
        Self {
            result: Some(result),
            note: None,
        }
    }

    /// No result, because the handler's was `size` bytes, over `max_bytes`.
    pub(crate) fn too_large(size: usize, max_bytes: usize) -> Self {
        tracing::warn!(target: crate::TASK_LOG, size, "the task's result is over RESULT_MAX_BYTES; dropping it");
        Self {
            result: None,
            note: Some(format!(
                "the result ({size} bytes of JSON) was over RESULT_MAX_BYTES ({max_bytes}) and was dropped"
            )),
        }
    }
}

/// A handler's run, boxed so handlers of different types share one map.
pub(crate) type HandlerFuture =
    Pin<Box<dyn Future<Output = Result<Completed, HandlerError>> + Send>>;

/// Object-safe face of a handler, so handlers of different types (Rust [`Handler`]s, HTTP
/// targets) share one map.
pub(crate) trait ErasedHandler: Send + Sync {
    /// Runs `task`; a result over `result_max_bytes` of JSON is dropped, with a note.
    fn call(self: Arc<Self>, task: Task, result_max_bytes: usize) -> HandlerFuture;
    fn policy(&self) -> Option<RetryPolicy>;
    /// How many of its tasks a worker runs at once, if the handler says (a target's
    /// `concurrency` in TARGETS_FILE); `None`: the worker's CONCURRENCY or PREFETCH.
    fn concurrency(&self) -> Option<u16> {
        None
    }
}

/// A Rust [`Handler`], behind [`ErasedHandler`].
struct Typed<H>(H);

impl<H: Handler> ErasedHandler for Typed<H> {
    fn policy(&self) -> Option<RetryPolicy> {
        self.0.retry_policy()
    }

    fn call(self: Arc<Self>, task: Task, result_max_bytes: usize) -> HandlerFuture {
        Box::pin(async move {
            let kind = task.kind.clone();
            let task = task.decode::<H::Payload>().map_err(|error| {
                HandlerError::permanent(format!("the payload does not fit kind '{kind}': {error}"))
            })?;
            let output = self.0.handle(task).await?;
            match serde_json::to_value(output) {
                Ok(serde_json::Value::Null) => Ok(Completed::default()),
                Ok(value) => Ok(Completed::bounded(Some(value), result_max_bytes)),
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
    handlers: HashMap<String, Arc<dyn ErasedHandler>>,
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
        self.handlers
            .insert(H::KIND.to_owned(), Arc::new(Typed(handler)));
        self
    }

    /// Adds `handler` for `kind`, replacing any handler of that kind: how handlers that are
    /// not a Rust type per kind (an HTTP target) join the registry.
    #[must_use]
    pub(crate) fn insert(mut self, kind: String, handler: Arc<dyn ErasedHandler>) -> Self {
        self.handlers.insert(kind, handler);
        self
    }

    /// The kinds this registry can run, sorted.
    pub fn kinds(&self) -> Vec<&str> {
        let mut kinds: Vec<_> = self.handlers.keys().map(String::as_str).collect();
        kinds.sort_unstable();
        kinds
    }

    /// Keeps only the handlers of `kinds` (a kind it has not is ignored): one binary, workers
    /// of different kinds.
    #[must_use]
    pub fn only(mut self, kinds: &[&str]) -> Self {
        self.handlers
            .retain(|kind, _| kinds.contains(&kind.as_str()));
        self
    }

    /// How many tasks of `kind` its handler runs at once, if it says.
    pub(crate) fn concurrency(&self, kind: &str) -> Option<u16> {
        self.handlers
            .get(kind)
            .and_then(|handler| handler.concurrency())
    }

    /// The retry policy of `kind`'s handler, if it has one of its own.
    pub(crate) fn policy(&self, kind: &str) -> Option<RetryPolicy> {
        self.handlers.get(kind).and_then(|handler| handler.policy())
    }

    /// Starts the handler for `task`'s kind, or gives the task back if there is none.
    pub(crate) fn dispatch(
        &self,
        task: Task,
        result_max_bytes: usize,
    ) -> Result<HandlerFuture, Task> {
        match self.handlers.get(task.kind.as_str()) {
            Some(handler) => Ok(Arc::clone(handler).call(task, result_max_bytes)),
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
