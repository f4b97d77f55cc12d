//! The control stream, `<QUEUE>.control`: cancels, which every worker reads from the first one
//! kept, so that a worker that was down (or not yet started) when a task was cancelled still
//! honours the cancel. It holds no task and no event: cancels, and the markers readers write to
//! learn when they have read up to the present. It is kept [`RETENTION`]: longer than any delay
//! a task can be given, so a cancel outlives every copy of a task that was waiting when it was
//! made.
//!
//! One record per stream message, a small versioned JSON document (docs/EVENTS.md). A record
//! this build cannot read, or one larger than [`MAX_RECORD_BYTES`], is skipped.

use std::time::{Duration, SystemTime};

use lapin::BasicProperties;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::{Broker, Message, PublishError, envelope::rfc3339, topology::MAX_DELAY};

/// The record format version this build writes and reads.
pub const CONTROL_VERSION: u32 = 1;

/// The largest record a reader looks at; a larger one is skipped.
pub const MAX_RECORD_BYTES: usize = 4096;

/// How long the control stream keeps a cancel: the longest delay a task can wait in the delay
/// levels, and a day more for one waiting in its kind's queue.
pub const RETENTION: Duration = Duration::from_secs(MAX_DELAY.as_secs() + 24 * 3600);

/// Longest wait for the broker to confirm a record.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(5);

/// One record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Record {
    /// Task `task` of `kind` must not start; if it is running, its handler is told to stop.
    Cancel {
        /// The cancel's own id, which workers quote when they say they have read it.
        id: Uuid,
        /// The task.
        task: Uuid,
        /// Its kind.
        kind: String,
        /// When it was cancelled.
        #[serde(with = "rfc3339")]
        at: SystemTime,
    },
    /// No task of `kind` submitted at or before `before` may start (tasks running go on).
    CancelKind {
        /// The cancel's own id.
        id: Uuid,
        /// The kind.
        kind: String,
        /// Tasks submitted at or before this are cancelled.
        #[serde(with = "rfc3339")]
        before: SystemTime,
        /// When it was cancelled.
        #[serde(with = "rfc3339")]
        at: SystemTime,
    },
    /// A reader's marker: once it reads its own, it has read everything written before.
    Marker {
        /// The marker.
        id: Uuid,
    },
}

#[derive(Serialize, Deserialize)]
struct Versioned {
    v: u32,
    #[serde(flatten)]
    record: Record,
}

impl Record {
    /// The record as a stream message's body.
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(&Versioned {
            v: CONTROL_VERSION,
            record: self.clone(),
        })
        .expect("a record of strings, ids and times always serialises")
    }

    /// Reads a stream message's body: `Err` says why it is skipped.
    pub fn from_bytes(body: &[u8]) -> Result<Self, String> {
        if body.len() > MAX_RECORD_BYTES {
            return Err(format!(
                "a control record of {} bytes is over the {MAX_RECORD_BYTES} bytes read",
                body.len()
            ));
        }
        match serde_json::from_slice::<Versioned>(body) {
            Ok(versioned) if versioned.v == CONTROL_VERSION => Ok(versioned.record),
            Ok(versioned) => Err(format!(
                "control record version {} is not read",
                versioned.v
            )),
            Err(error) => Err(format!("not a control record: {error}")),
        }
    }

    /// The kind a cancel is about; `None` for a marker.
    pub fn kind(&self) -> Option<&str> {
        match self {
            Self::Cancel { kind, .. } | Self::CancelKind { kind, .. } => Some(kind),
            Self::Marker { .. } => None,
        }
    }
}

impl Broker {
    /// Appends `record` to the control stream and waits for the broker's confirm.
    pub async fn publish_control(&self, record: &Record) -> Result<(), PublishError> {
        let body = record.to_bytes();
        let mut properties = BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type("application/json".into())
            .with_app_id("offload".into());
        // Checked by the broker: workers with GATEWAY_USERS honour only gateways' cancels.
        if let Some(user) = self.user() {
            properties = properties.with_user_id(user.into());
        }
        let stream = self.topology().control_stream();
        self.publish_confirmed(
            Message::to_queue(&stream, &body, properties),
            CONFIRM_TIMEOUT,
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_what_cannot_be_read_is_refused() {
        let cancel = Record::CancelKind {
            id: Uuid::new_v4(),
            kind: "sleep".into(),
            before: SystemTime::UNIX_EPOCH + Duration::from_millis(1_800_000_000_123),
            at: SystemTime::UNIX_EPOCH + Duration::from_millis(1_800_000_000_456),
        };
        assert_eq!(Record::from_bytes(&cancel.to_bytes()), Ok(cancel));
        let text = String::from_utf8(Record::Marker { id: Uuid::nil() }.to_bytes()).expect("UTF-8");
        assert!(
            text.contains("\"type\":\"marker\"") && text.contains("\"v\":1"),
            "{text}"
        );

        let newer = br#"{"v":2,"type":"marker","id":"00000000-0000-0000-0000-000000000000"}"#;
        assert!(Record::from_bytes(newer).is_err());
        assert!(Record::from_bytes(b"not json").is_err());
        let huge = format!(
            r#"{{"v":1,"type":"marker","id":"{}","pad":"{}"}}"#,
            Uuid::nil(),
            "x".repeat(MAX_RECORD_BYTES)
        );
        assert!(Record::from_bytes(huge.as_bytes()).is_err());
    }
}
