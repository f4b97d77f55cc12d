//! The handlers built into `offload-worker`. To add a kind: write a file here implementing
//! [`Handler`](crate::Handler), and add one `.register(...)` line to [`builtin`].

mod sleep;

pub use sleep::{Sleep, SleepPayload};

use crate::{Config, Registry};

/// The registry the `offload-worker` binary runs with.
pub fn builtin(config: &Config) -> Registry {
    Registry::default().register(Sleep::new(config.sleep_unit, config.sleep_max_units))
}
