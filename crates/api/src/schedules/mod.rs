//! Periodic tasks: schedules kept in RabbitMQ, fired once per tick by whichever gateway leads.
//!
//! [`spec`] is what a schedule is and when it ticks (pure), [`store`] the schedules as every
//! gateway holds them (folded from the `<QUEUE>.schedules` stream), [`leader`] the election
//! (a single-active-consumer queue holding a token) and the firing.

pub mod file;
pub mod leader;
mod plan;
pub mod spec;
pub mod store;

pub use leader::Scheduler;
pub use spec::{Missed, Schedule, SpecError, Template};
pub use store::{Schedules, Stored};
