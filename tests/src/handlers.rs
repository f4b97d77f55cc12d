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
