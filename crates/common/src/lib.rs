//! What the offload gateway and workers share: the task envelope that travels on the queue,
//! the broker topology both sides declare, broker settings, and logging setup.
//!
//! Both binaries and the integration tests go through this crate, so there is exactly one
//! definition of what a task looks like on the wire and of how the queues are declared.

pub mod broker;
pub mod control;
pub mod envelope;
pub mod events;
pub mod shutdown;
pub mod telemetry;
pub mod text;
pub mod topology;
pub mod trace;

pub use broker::{
    BrokerArgs, BrokerError,
    publish::{Message, PublishError, Returns, Sent},
    redact_url,
    session::{Broker, BrokerState, Link},
    subscribe::{Delivered, GATE_POLL, Retired, Subscription},
    supervisor::Supervisor,
};
pub use envelope::{DecodeError, ENVELOPE_VERSION, TaskEnvelope, TaskKind};
pub use events::{DeadReason, Event, EventSink, EventType};
pub use telemetry::{LogArgs, LogFormat};
pub use topology::{KindDepth, QueueDepth, Topology, TopologyError};
