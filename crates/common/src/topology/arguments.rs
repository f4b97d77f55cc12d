//! The arguments each queue and stream is declared with, all explicit: a queue's arguments
//! cannot change once declared, so what the broker holds is exactly what is written here.

use lapin::types::{AMQPValue, FieldTable, LongString};

use super::{EventsRetention, Topology};

impl Topology {
    /// Adds the replica count under `argument`, if one is set.
    pub(super) fn replicate(&self, args: &mut FieldTable, argument: &str) {
        if let Some(replicas) = self.replicas {
            args.insert(argument.into(), AMQPValue::LongLongInt(i64::from(replicas)));
        }
    }

    /// The arguments of delay level `level`, all explicit: a quorum queue whose messages
    /// expire after 2^level seconds and are dead-lettered, at least once, to the next level
    /// down, or from level 0 to the work queue.
    pub fn delay_queue_arguments(&self, level: u32) -> FieldTable {
        let mut args = FieldTable::default();
        args.insert("x-queue-type".into(), text("quorum"));
        args.insert(
            "x-message-ttl".into(),
            AMQPValue::LongLongInt((1_i64 << level) * 1000),
        );
        if level == 0 {
            // The message keeps its routing key, whose last words are its kind.
            args.insert("x-dead-letter-exchange".into(), text(&self.due_exchange()));
        } else {
            args.insert(
                "x-dead-letter-exchange".into(),
                text(&self.delay_level(level - 1)),
            );
        }
        args.insert("x-dead-letter-strategy".into(), text("at-least-once"));
        args.insert("x-overflow".into(), text("reject-publish"));
        self.replicate(&mut args, QUORUM_REPLICAS);
        args
    }

    /// The arguments of a kind's queue, all explicit.
    pub fn kind_queue_arguments(&self) -> FieldTable {
        let mut args = FieldTable::default();
        args.insert("x-queue-type".into(), text("quorum"));
        args.insert(
            "x-delivery-limit".into(),
            AMQPValue::LongLongInt(i64::from(self.delivery_limit)),
        );
        args.insert(
            "x-dead-letter-exchange".into(),
            text(&self.dead_letter_exchange()),
        );
        args.insert("x-dead-letter-routing-key".into(), text(&self.queue));
        // at-least-once dead-lettering: the broker keeps a message until the dead-letter queue
        // has confirmed it, so a crash between the two queues loses nothing. RabbitMQ requires
        // reject-publish overflow for it.
        args.insert("x-dead-letter-strategy".into(), text("at-least-once"));
        args.insert("x-overflow".into(), text("reject-publish"));
        if let Some(max_length) = self.max_length {
            args.insert(
                "x-max-length".into(),
                AMQPValue::LongLongInt(i64::from(max_length)),
            );
        }
        args.insert(LEADER_LOCATOR.into(), text("balanced"));
        self.replicate(&mut args, QUORUM_REPLICAS);
        args
    }

    /// The arguments of a kind's gate: a quorum queue (replicated, so a node's loss does not
    /// read as a pause) that nothing can be published to.
    pub fn gate_arguments(&self) -> FieldTable {
        let mut args = FieldTable::default();
        args.insert("x-queue-type".into(), text("quorum"));
        args.insert("x-max-length".into(), AMQPValue::LongLongInt(0));
        args.insert("x-overflow".into(), text("reject-publish"));
        args.insert(LEADER_LOCATOR.into(), text("balanced"));
        self.replicate(&mut args, QUORUM_REPLICAS);
        args
    }

    /// The arguments of the dead-letter queue, all explicit.
    pub fn dead_letter_queue_arguments(&self) -> FieldTable {
        let mut args = FieldTable::default();
        args.insert("x-queue-type".into(), text("quorum"));
        args.insert(
            "x-max-length".into(),
            AMQPValue::LongLongInt(i64::from(self.dead_max_length)),
        );
        args.insert("x-overflow".into(), text("drop-head"));
        self.replicate(&mut args, QUORUM_REPLICAS);
        args
    }

    /// The events stream's arguments, all explicit.
    pub(super) fn stream_arguments(&self, retention: EventsRetention) -> FieldTable {
        let mut args = FieldTable::default();
        args.insert("x-queue-type".into(), text("stream"));
        // RabbitMQ's own unit syntax: whole seconds.
        args.insert(
            "x-max-age".into(),
            text(&format!("{}s", retention.max_age.as_secs().max(1))),
        );
        args.insert(
            "x-max-length-bytes".into(),
            AMQPValue::LongLongInt(i64::try_from(retention.max_bytes).unwrap_or(i64::MAX)),
        );
        self.replicate(&mut args, STREAM_REPLICAS);
        args
    }
}

impl Topology {
    /// The control stream's arguments: kept [`crate::control::RETENTION`], in small segments
    /// (retention drops whole segments), and at most [`CONTROL_MAX_BYTES`].
    pub(super) fn control_arguments(&self) -> FieldTable {
        let mut args = FieldTable::default();
        args.insert("x-queue-type".into(), text("stream"));
        args.insert(
            "x-max-age".into(),
            text(&format!("{}s", crate::control::RETENTION.as_secs())),
        );
        args.insert(
            "x-max-length-bytes".into(),
            AMQPValue::LongLongInt(CONTROL_MAX_BYTES),
        );
        args.insert(
            "x-stream-max-segment-size-bytes".into(),
            AMQPValue::LongLongInt(CONTROL_SEGMENT_BYTES),
        );
        self.replicate(&mut args, STREAM_REPLICAS);
        args
    }
}

impl Topology {
    /// The schedules stream's arguments: no age limit (a schedule lives until deleted), at most
    /// [`SCHEDULES_MAX_BYTES`] of changes.
    pub(super) fn schedules_arguments(&self) -> FieldTable {
        let mut args = FieldTable::default();
        args.insert("x-queue-type".into(), text("stream"));
        args.insert(
            "x-max-length-bytes".into(),
            AMQPValue::LongLongInt(SCHEDULES_MAX_BYTES),
        );
        args.insert(
            "x-stream-max-segment-size-bytes".into(),
            AMQPValue::LongLongInt(CONTROL_SEGMENT_BYTES),
        );
        self.replicate(&mut args, STREAM_REPLICAS);
        args
    }

    /// The election queue's arguments: one active consumer, one message (the token) at most.
    pub(super) fn scheduler_arguments(&self) -> FieldTable {
        let mut args = FieldTable::default();
        args.insert("x-queue-type".into(), text("quorum"));
        args.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
        args.insert("x-max-length".into(), AMQPValue::LongLongInt(1));
        args.insert("x-overflow".into(), text("reject-publish"));
        self.replicate(&mut args, QUORUM_REPLICAS);
        args
    }
}

/// The most changes the schedules stream keeps.
const SCHEDULES_MAX_BYTES: i64 = 64 * 1024 * 1024;

/// The most the control stream keeps: a million cancels and more.
const CONTROL_MAX_BYTES: i64 = 512 * 1024 * 1024;
/// The control stream's segment size.
const CONTROL_SEGMENT_BYTES: i64 = 16 * 1024 * 1024;

/// Where a new quorum queue's leader goes: `balanced` (the node with the fewest leaders,
/// while there are few queues) is accepted by RabbitMQ 3.10 and later; `min-masters` is not.
const LEADER_LOCATOR: &str = "x-queue-leader-locator";
/// The quorum queue argument for how many nodes hold a replica.
const QUORUM_REPLICAS: &str = "x-quorum-initial-group-size";
/// The stream argument for how many nodes hold a replica.
const STREAM_REPLICAS: &str = "x-initial-cluster-size";

fn text(value: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(value))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topology::DELAY_LEVELS;

    #[test]
    fn replicas_are_declared_on_every_queue_only_when_set() {
        let retention = EventsRetention {
            max_age: std::time::Duration::from_secs(60),
            max_bytes: 1 << 20,
        };
        let unset = Topology::new("q", 3);
        let set = Topology::new("q", 3).with_replicas(Some(3));
        let quorum = |t: &Topology| {
            vec![
                t.kind_queue_arguments(),
                t.gate_arguments(),
                t.dead_letter_queue_arguments(),
                t.delay_queue_arguments(0),
                t.delay_queue_arguments(DELAY_LEVELS - 1),
            ]
        };
        for args in quorum(&unset) {
            assert!(!args.inner().contains_key(QUORUM_REPLICAS));
        }
        for args in quorum(&set) {
            assert_eq!(
                args.inner().get(QUORUM_REPLICAS),
                Some(&AMQPValue::LongLongInt(3))
            );
        }
        assert!(
            !unset
                .stream_arguments(retention)
                .inner()
                .contains_key(STREAM_REPLICAS)
        );
        assert_eq!(
            set.stream_arguments(retention).inner().get(STREAM_REPLICAS),
            Some(&AMQPValue::LongLongInt(3))
        );
    }
}
