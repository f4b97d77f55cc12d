//! The task envelope: what the gateway publishes and a worker receives.
//!
//! The body of every message is this envelope as JSON. It carries a version number so that a
//! worker can refuse (and dead-letter) an envelope it does not understand instead of guessing.

use std::{fmt, time::SystemTime};

use lapin::{
    BasicProperties,
    types::{AMQPValue, FieldTable, ShortString},
};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The envelope version this build writes and reads.
pub const ENVELOPE_VERSION: u32 = 1;

/// The AMQP `delivery_mode` that makes a message persistent.
const PERSISTENT: u8 = 2;

/// A task as it travels on the queue.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskEnvelope {
    /// Envelope format version, [`ENVELOPE_VERSION`].
    pub v: u32,
    /// Unique id, assigned by the gateway and returned to the client.
    pub id: Uuid,
    /// Which handler runs the task.
    pub kind: TaskKind,
    /// Handler-specific input, any JSON value.
    pub payload: serde_json::Value,
    /// When the gateway accepted the task.
    #[serde(with = "rfc3339")]
    pub submitted_at: SystemTime,
    /// A task not started by then never starts: it ends `expired`.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "optional_rfc3339"
    )]
    pub expires_at: Option<SystemTime>,
}

impl TaskEnvelope {
    /// A new task with a fresh id, submitted now.
    pub fn new(kind: TaskKind, payload: serde_json::Value) -> Self {
        Self {
            v: ENVELOPE_VERSION,
            id: Uuid::new_v4(),
            kind,
            payload,
            submitted_at: SystemTime::now(),
            expires_at: None,
        }
    }

    /// Whether the task has expired at `now`: it must not start.
    pub fn is_expired(&self, now: SystemTime) -> bool {
        self.expires_at.is_some_and(|expires_at| now >= expires_at)
    }

    /// The message body.
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("an envelope of a JSON value always serialises")
    }

    /// Reads a message body, refusing anything that is not a version-1 envelope.
    pub fn from_bytes(body: &[u8]) -> Result<Self, DecodeError> {
        #[derive(Deserialize)]
        struct Version {
            v: u32,
        }
        // One parse on the hot path; the version is looked at only to explain a failure.
        match serde_json::from_slice::<Self>(body) {
            Ok(envelope) if envelope.v == ENVELOPE_VERSION => Ok(envelope),
            Ok(envelope) => Err(DecodeError::Version(envelope.v)),
            Err(error) => match serde_json::from_slice::<Version>(body) {
                Ok(version) if version.v != ENVELOPE_VERSION => {
                    Err(DecodeError::Version(version.v))
                }
                _ => Err(DecodeError::Json(error)),
            },
        }
    }

    /// The AMQP properties the message is published with: persistent, JSON, with the task id
    /// as `message_id`, the kind as `type` and the submission time as `timestamp`.
    pub fn properties(&self) -> BasicProperties {
        let timestamp = self
            .submitted_at
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        BasicProperties::default()
            .with_delivery_mode(PERSISTENT)
            .with_content_type("application/json".into())
            .with_message_id(self.id.to_string().into())
            .with_type(self.kind.as_str().into())
            .with_timestamp(timestamp)
            .with_app_id("offload".into())
    }
}

/// Why a message body is not a task this worker can run.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// Not JSON, or not shaped like an envelope.
    #[error("message body is not a task envelope: {0}")]
    Json(#[source] serde_json::Error),
    /// An envelope from a newer (or older) offload.
    #[error(
        "task envelope version {0} is not supported (this worker reads version {ENVELOPE_VERSION})"
    )]
    Version(u32),
}

/// A task kind: 1 to 64 characters of `a-z 0-9 _ . -`. Names the handler that runs the task.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct TaskKind(String);

impl TaskKind {
    /// Longest kind accepted.
    pub const MAX_LEN: usize = 64;

    /// The kind as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Why a kind was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`kind` must be 1 to 64 characters of a-z, 0-9, '_', '.' and '-' (got {0:?})")]
pub struct InvalidKind(String);

impl TryFrom<String> for TaskKind {
    type Error = InvalidKind;

    fn try_from(kind: String) -> Result<Self, Self::Error> {
        let valid_char = |c: char| matches!(c, 'a'..='z' | '0'..='9' | '_' | '.' | '-');
        if (1..=Self::MAX_LEN).contains(&kind.len()) && kind.chars().all(valid_char) {
            Ok(Self(kind))
        } else {
            // Keep the echo short: the offending value may be huge.
            let shown: String = kind.chars().take(Self::MAX_LEN + 1).collect();
            Err(InvalidKind(shown))
        }
    }
}

impl TryFrom<&str> for TaskKind {
    type Error = InvalidKind;

    fn try_from(kind: &str) -> Result<Self, Self::Error> {
        Self::try_from(kind.to_owned())
    }
}

impl From<TaskKind> for String {
    fn from(kind: TaskKind) -> Self {
        kind.0
    }
}

impl fmt::Display for TaskKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// How many times the broker has delivered a message before, from the quorum queue's
/// `x-delivery-count` header, on a delivery the broker flagged `redelivered`. A first
/// delivery counts 0 whatever its headers say: a publisher can write `x-delivery-count`
/// itself, and the broker sets it only when it delivers a message again.
pub fn delivery_count(redelivered: bool, properties: &BasicProperties) -> u64 {
    if redelivered {
        integer_header(properties, "x-delivery-count").unwrap_or(0)
    } else {
        0
    }
}

/// The header offload owns that numbers a task's attempts: a copy of the task published for
/// its next attempt carries that attempt's number (absent: the first). offload counts
/// attempts itself so that retries behave the same on every RabbitMQ version (4.3 stopped
/// counting some redeliveries), and the broker's own count only backs it up for crashes.
pub const ATTEMPT_HEADER: &str = "x-offload-attempt";

/// The attempt a delivered copy of a task starts with: its [`ATTEMPT_HEADER`], or 1.
pub fn first_attempt(properties: &BasicProperties) -> u32 {
    integer_header(properties, ATTEMPT_HEADER)
        .and_then(|n| u32::try_from(n).ok())
        .filter(|n| *n >= 1)
        .unwrap_or(1)
}

/// A header of `properties` as an unsigned integer, whichever integer type it was sent as.
pub fn integer_header(properties: &BasicProperties, name: &str) -> Option<u64> {
    let key: ShortString = name.into();
    match properties.headers().as_ref()?.inner().get(&key)? {
        AMQPValue::LongLongInt(n) => u64::try_from(*n).ok(),
        AMQPValue::LongInt(n) => u64::try_from(*n).ok(),
        AMQPValue::LongUInt(n) => Some(u64::from(*n)),
        AMQPValue::ShortInt(n) => u64::try_from(*n).ok(),
        AMQPValue::ShortUInt(n) => Some(u64::from(*n)),
        _ => None,
    }
}

/// The properties of a copy of a delivered message, to publish as a new message: persistent,
/// without an `expiration` (a copy to `.dead` or to the delay levels must not silently
/// expire there), without the headers the broker set on the delivery (`x-delivery-count`,
/// which a new message must not carry or it would be read as the broker's, and the `x-death`
/// family) or those `drop` picks, and with `extra` set over the rest.
pub fn copy_properties(
    properties: &BasicProperties,
    drop: impl Fn(&str) -> bool,
    extra: &FieldTable,
) -> BasicProperties {
    let broker_set = |name: &str| {
        name == "x-delivery-count"
            || name.starts_with("x-death")
            || name.starts_with("x-first-death")
            || name.starts_with("x-last-death")
    };
    let mut headers = FieldTable::default();
    if let Some(original) = properties.headers() {
        for (key, value) in original.inner() {
            if !broker_set(key.as_str()) && !drop(key.as_str()) {
                headers.insert(key.clone(), value.clone());
            }
        }
    }
    for (key, value) in extra.inner() {
        headers.insert(key.clone(), value.clone());
    }
    without_expiration(properties)
        .with_headers(headers)
        .with_delivery_mode(2)
}

/// `properties` but `expiration` (and the headers, which [`copy_properties`] sets).
fn without_expiration(properties: &BasicProperties) -> BasicProperties {
    let mut copy = BasicProperties::default();
    if let Some(value) = properties.content_type() {
        copy = copy.with_content_type(value.clone());
    }
    if let Some(value) = properties.content_encoding() {
        copy = copy.with_content_encoding(value.clone());
    }
    if let Some(value) = properties.priority() {
        copy = copy.with_priority(*value);
    }
    if let Some(value) = properties.correlation_id() {
        copy = copy.with_correlation_id(value.clone());
    }
    if let Some(value) = properties.reply_to() {
        copy = copy.with_reply_to(value.clone());
    }
    if let Some(value) = properties.message_id() {
        copy = copy.with_message_id(value.clone());
    }
    if let Some(value) = properties.timestamp() {
        copy = copy.with_timestamp(*value);
    }
    if let Some(value) = properties.kind() {
        copy = copy.with_type(value.clone());
    }
    if let Some(value) = properties.user_id() {
        copy = copy.with_user_id(value.clone());
    }
    if let Some(value) = properties.app_id() {
        copy = copy.with_app_id(value.clone());
    }
    if let Some(value) = properties.cluster_id() {
        copy = copy.with_cluster_id(value.clone());
    }
    copy
}

/// RFC 3339 timestamps with millisecond precision, in UTC, for serde's `with`.
pub mod rfc3339 {
    use std::time::SystemTime;

    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    /// Writes `time` as RFC 3339 with milliseconds.
    pub fn serialize<S: Serializer>(time: &SystemTime, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(&humantime::format_rfc3339_millis(*time))
    }

    /// Reads an RFC 3339 time.
    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<SystemTime, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        humantime::parse_rfc3339_weak(&text).map_err(D::Error::custom)
    }
}

/// `Option<SystemTime>` as an RFC 3339 string, or absent.
pub(crate) mod optional_rfc3339 {
    use std::time::SystemTime;

    use serde::{Deserialize, Deserializer, Serializer};

    #[allow(clippy::ref_option)] // serde's `with` hands us `&Option<T>`
    pub fn serialize<S: Serializer>(
        time: &Option<SystemTime>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        match time {
            Some(time) => super::rfc3339::serialize(time, serializer),
            None => serializer.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<SystemTime>, D::Error> {
        #[derive(Deserialize)]
        struct Wrapped(#[serde(with = "super::rfc3339")] SystemTime);
        Ok(Option::<Wrapped>::deserialize(deserializer)?.map(|Wrapped(time)| time))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_copy_keeps_the_properties_but_an_expiration_and_the_brokers_headers() {
        let mut headers = FieldTable::default();
        headers.insert("x-delivery-count".into(), AMQPValue::LongLongInt(3));
        headers.insert("x-offload-attempt".into(), AMQPValue::LongLongInt(2));
        let original = BasicProperties::default()
            .with_message_id("m-1".into())
            .with_type("sleep".into())
            .with_content_type("application/json".into())
            .with_timestamp(1_800_000_000)
            .with_expiration("60000".into())
            .with_headers(headers);
        let copy = copy_properties(&original, |_| false, &FieldTable::default());
        assert_eq!(copy.expiration(), &None, "a copy never expires by itself");
        assert_eq!(copy.message_id(), original.message_id());
        assert_eq!(copy.kind(), original.kind());
        assert_eq!(copy.content_type(), original.content_type());
        assert_eq!(copy.timestamp(), original.timestamp());
        assert_eq!(copy.delivery_mode(), &Some(2));
        let kept = copy.headers().as_ref().expect("headers");
        assert!(kept.inner().contains_key("x-offload-attempt"));
        assert!(!kept.inner().contains_key("x-delivery-count"));
    }

    #[test]
    fn kinds_follow_the_documented_alphabet() {
        for good in ["sleep", "a", "send-email.v2", "x_y", &"k".repeat(64)] {
            assert!(TaskKind::try_from(good).is_ok(), "{good} should be valid");
        }
        for bad in ["", "Sleep", "has space", "ünï", "a/b", &"k".repeat(65)] {
            assert!(TaskKind::try_from(bad).is_err(), "{bad} should be invalid");
        }
    }

    #[test]
    fn envelope_round_trips_through_bytes() {
        let kind = TaskKind::try_from("sleep").expect("valid kind");
        let task = TaskEnvelope::new(kind, serde_json::json!({"message": "a.b"}));
        let decoded = TaskEnvelope::from_bytes(&task.to_bytes()).expect("decodes");
        // Timestamps are written at millisecond precision.
        assert_eq!(decoded.id, task.id);
        assert_eq!(decoded.kind, task.kind);
        assert_eq!(decoded.payload, task.payload);
        let drift = task
            .submitted_at
            .duration_since(decoded.submitted_at)
            .expect("decoded time is not later");
        assert!(drift.as_millis() < 1);
    }

    #[test]
    fn refuses_other_versions_and_garbage() {
        let body = br#"{"v":2,"id":"00000000-0000-0000-0000-000000000000","kind":"sleep","payload":null,"submitted_at":"2026-01-01T00:00:00Z"}"#;
        assert!(matches!(
            TaskEnvelope::from_bytes(body),
            Err(DecodeError::Version(2))
        ));
        assert!(matches!(
            TaskEnvelope::from_bytes(b"\xff\x00not json"),
            Err(DecodeError::Json(_))
        ));
        assert!(matches!(
            TaskEnvelope::from_bytes(br#"{"v":1,"kind":"BAD"}"#),
            Err(DecodeError::Json(_))
        ));
    }

    #[test]
    fn properties_make_the_message_persistent_and_identifiable() {
        let kind = TaskKind::try_from("sleep").expect("valid kind");
        let task = TaskEnvelope::new(kind, serde_json::Value::Null);
        let props = task.properties();
        assert_eq!(*props.delivery_mode(), Some(2));
        assert_eq!(
            props.message_id().as_ref().map(ShortString::as_str),
            Some(task.id.to_string().as_str())
        );
        assert_eq!(
            props.kind().as_ref().map(ShortString::as_str),
            Some("sleep")
        );
    }

    mod properties {
        use proptest::prelude::*;

        use super::super::*;

        /// Any JSON value, nested a few levels.
        fn json() -> impl Strategy<Value = serde_json::Value> {
            let leaf = prop_oneof![
                Just(serde_json::Value::Null),
                any::<bool>().prop_map(serde_json::Value::from),
                any::<i64>().prop_map(serde_json::Value::from),
                any::<f64>()
                    .prop_filter("JSON has no NaN or infinity", |f| f.is_finite())
                    .prop_map(serde_json::Value::from),
                ".{0,16}".prop_map(serde_json::Value::from),
            ];
            leaf.prop_recursive(3, 32, 4, |inner| {
                prop_oneof![
                    prop::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::from),
                    prop::collection::btree_map(".{0,8}", inner, 0..4)
                        .prop_map(|map| { serde_json::Value::Object(map.into_iter().collect()) }),
                ]
            })
        }

        proptest! {
            #[test]
            fn any_bytes_decode_to_an_envelope_or_an_error_never_a_panic(
                body in prop::collection::vec(any::<u8>(), 0..512)
            ) {
                let _ = TaskEnvelope::from_bytes(&body);
            }

            #[test]
            fn any_json_decodes_to_an_envelope_or_an_error_never_a_panic(value in json()) {
                let _ = TaskEnvelope::from_bytes(value.to_string().as_bytes());
            }

            #[test]
            fn every_valid_task_round_trips(kind in "[a-z0-9_.-]{1,64}", payload in json()) {
                let kind = TaskKind::try_from(kind).expect("the regex draws valid kinds");
                let task = TaskEnvelope::new(kind, payload);
                let decoded = TaskEnvelope::from_bytes(&task.to_bytes()).expect("decodes");
                prop_assert_eq!(decoded.id, task.id);
                prop_assert_eq!(decoded.kind, task.kind);
                prop_assert_eq!(decoded.payload, task.payload);
            }

            #[test]
            fn a_kind_is_accepted_exactly_when_it_fits_the_alphabet(kind in "\\PC{0,70}") {
                let fits = (1..=TaskKind::MAX_LEN).contains(&kind.len())
                    && kind.bytes().all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'_' | b'.' | b'-'));
                prop_assert_eq!(TaskKind::try_from(kind.as_str()).is_ok(), fits);
            }
        }
    }
}
