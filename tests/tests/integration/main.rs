//! offload's integration tests: the RabbitMQ tutorial's experiments, each a test that fails if
//! the property it names breaks, run against a real broker, a real gateway and real worker
//! processes. Each test uses queues of its own and deletes them.

mod access;
mod bad_input;
mod batch;
mod broker_session;
mod cancel;
mod cancel_targets;
mod cluster;
mod dashboard;
mod dead;
mod delays;
mod dispatch;
mod durability;
mod hostile;
mod http;
mod idempotency;
mod kinds;
mod logging;
mod metrics;
mod monitoring;
mod openapi;
mod poison;
mod redelivery;
mod resilience;
mod retries;
mod rust_handlers;
mod schedules;
mod shutdown;
mod status;
mod targets;
mod traces;
mod untrusted;
mod walkthrough;
