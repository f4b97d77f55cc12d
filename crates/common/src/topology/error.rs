//! Why the topology could not be declared, in words that say what to do.

use lapin::{
    protocol::{AMQPErrorKind, AMQPSoftError},
    types::ShortString,
};

/// Why the topology could not be declared.
#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    /// Something of that name exists with other settings. The message is one line that says
    /// what to do.
    #[error(
        "{what} '{name}' already exists with other settings than offload declares ({broker_said}). \
         Drain and delete it (rabbitmqctl delete_queue {name}), or give offload another queue name with --queue / QUEUE"
    )]
    Mismatch {
        /// "queue" or "exchange".
        what: &'static str,
        /// Its name.
        name: String,
        /// The broker's own words.
        broker_said: String,
    },
    /// The broker could not be asked.
    #[error("declaring the queues failed: {0}")]
    Broker(#[source] lapin::Error),
}

impl TopologyError {
    pub(super) fn from_declare(what: &'static str, name: &str, error: lapin::Error) -> Self {
        if let lapin::ErrorKind::ProtocolError(amqp) = error.kind()
            && is_soft(&error, AMQPSoftError::PRECONDITIONFAILED)
        {
            return Self::Mismatch {
                what,
                name: name.to_owned(),
                broker_said: ShortString::as_str(amqp.get_message()).to_owned(),
            };
        }
        Self::Broker(error)
    }
}

/// Whether the broker refused an operation with this channel-level error.
pub fn is_soft(error: &lapin::Error, kind: AMQPSoftError) -> bool {
    matches!(error.kind(), lapin::ErrorKind::ProtocolError(amqp) if *amqp.kind() == AMQPErrorKind::Soft(kind))
}
