//! HTTP targets: task kinds the worker runs by POSTing them to an endpoint of the user's app,
//! whose answer decides what happens (the pattern of Cloud Tasks' HTTP targets).
//!
//! Kinds map to URLs in the worker's own configuration (`TARGETS`, `TARGETS_FILE`), never to
//! a URL taken from a task, so no client can make offload call an address of its choosing.
//!
//! [`config`] reads and checks the settings, [`signing`] signs each call, [`call`] makes it,
//! and [`verdict`] says what the answer means for the task.

mod call;
mod config;
mod signing;
mod verdict;

pub use config::{DEFAULT_TARGET_TIMEOUT, TargetArgs, TargetsError};
pub use signing::SigningSecret;
