//! Handlers the integration tests share.

use offload_worker::{Handler, HandlerError, Task};

/// Kind `always-fails`: every attempt fails, retryably, with [`AlwaysFails::ERROR`].
pub struct AlwaysFails;

impl AlwaysFails {
    /// The error every attempt ends with.
    pub const ERROR: &'static str = "it never works";
}

impl Handler for AlwaysFails {
    const KIND: &'static str = "always-fails";
    type Payload = serde_json::Value;
    type Output = ();

    async fn handle(&self, _task: Task) -> Result<(), HandlerError> {
        Err(Self::ERROR.into())
    }
}

/// Kind `fails-first-run`: the first run of each task fails with [`FailsFirstRun::ERROR`];
/// any later run (a retry, even one with fresh attempts from the dead-letter queue) succeeds.
#[derive(Default)]
pub struct FailsFirstRun {
    seen: std::sync::Mutex<std::collections::HashSet<uuid::Uuid>>,
}

impl FailsFirstRun {
    /// The error of a first run.
    pub const ERROR: &'static str = "the first run fails";
}

impl Handler for FailsFirstRun {
    const KIND: &'static str = "fails-first-run";
    type Payload = serde_json::Value;
    type Output = ();

    async fn handle(&self, task: Task) -> Result<(), HandlerError> {
        let first = self
            .seen
            .lock()
            .expect("no test handler panics while holding the set")
            .insert(task.id);
        if first {
            return Err(Self::ERROR.into());
        }
        Ok(())
    }
}
