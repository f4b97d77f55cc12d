//! How one event changes one task: the status fold.

use std::sync::Arc;

use offload_common::{DeadReason, Event, EventType};
use tokio::sync::Notify;

use super::{Status, millis};

/// One task, as small as it can be held: a million of them is the default capacity's worth.
/// Times are milliseconds since the epoch (0: not yet), the kind an index into the view's
/// interned kinds, and what few tasks have (a key, waiters) sits behind one pointer.
pub(super) struct Entry {
    pub(super) kind: u32,
    pub(super) status: Status,
    pub(super) reason: Option<DeadReason>,
    /// Cancelled while running: whether the handler stopped.
    pub(super) handler_stopped: Option<bool>,
    /// This gateway accepted it (after it started, so the stream holds nothing older of it).
    pub(super) accepted_here: bool,
    /// A gateway's `queued` event said it was accepted (always, when every writer is
    /// believed): until then it is not shown, so events of workers alone make no task.
    pub(super) vouched: bool,
    /// A `queued` event of it was read: counted once in [`Totals::submitted`], whichever
    /// event came first (a worker's `started` can reach the view before it).
    ///
    /// [`Totals::submitted`]: super::Totals::submitted
    pub(super) queued: bool,
    pub(super) attempts: u32,
    pub(super) submitted_at: u64,
    pub(super) started_at: u64,
    pub(super) finished_at: u64,
    /// While scheduled: when the next attempt is due.
    pub(super) run_at: u64,
    /// Stream offset of the `succeeded` event holding the result; -1: none.
    pub(super) result_offset: i64,
    pub(super) error: Option<Box<str>>,
    pub(super) extra: Option<Box<Extra>>,
}

impl Entry {
    /// A task of kind `kind` (its index) not yet folded any event into: queued, as far as
    /// anyone knows.
    pub(super) fn new(kind: u32, vouched: bool) -> Self {
        Self {
            kind,
            status: Status::Queued,
            reason: None,
            handler_stopped: None,
            accepted_here: false,
            vouched,
            queued: false,
            attempts: 0,
            submitted_at: 0,
            started_at: 0,
            finished_at: 0,
            run_at: 0,
            result_offset: -1,
            error: None,
            extra: None,
        }
    }

    /// Folds one event into the task; the Idempotency-Key to index, if the event brings one.
    pub(super) fn fold(&mut self, event: &Event, offset: Option<i64>) -> Option<String> {
        let mut key_to_index = None;
        // An attempt's end is final: a `started` or `failed` read after it comes from a
        // duplicate delivery (delivery is at least once; after a failover RabbitMQ writes an
        // earlier unconfirmed publish late), and a success is not undone by a duplicate's
        // death. Only `retried` brings a dead task back.
        let ended = match self.status {
            Status::Succeeded | Status::Cancelled | Status::Expired => true,
            Status::Dead => event.event != EventType::Succeeded,
            _ => false,
        };
        let stale = ended
            || event.event == EventType::Failed
                && event
                    .attempt
                    .is_some_and(|attempt| attempt < u64::from(self.attempts));
        if let Some(attempt) = event.attempt {
            self.attempts = self
                .attempts
                .max(u32::try_from(attempt).unwrap_or(u32::MAX));
        }
        let error = || event.error.as_deref().map(Box::from);
        match event.event {
            EventType::Queued => key_to_index = self.queued(event),
            EventType::Started
            | EventType::Failed
            | EventType::Succeeded
            | EventType::Dead
            | EventType::Cancelled
            | EventType::Expired
                if stale => {}
            EventType::Started => {
                self.status = Status::Running;
                self.started_at = millis(event.at);
            }
            EventType::Failed => {
                self.error = error();
                match event.run_at {
                    Some(run_at) => {
                        self.status = Status::Scheduled;
                        self.run_at = millis(run_at);
                    }
                    None => self.status = Status::Queued,
                }
            }
            EventType::Succeeded => {
                self.status = Status::Succeeded;
                self.finished_at = millis(event.at);
                // A note about a dropped result, or nothing.
                self.error = error();
                self.result_offset = offset.filter(|_| event.result.is_some()).unwrap_or(-1);
            }
            EventType::Dead => {
                self.status = Status::Dead;
                self.reason = event.reason;
                self.finished_at = millis(event.at);
                self.error = error();
            }
            EventType::Cancelled => {
                self.status = Status::Cancelled;
                self.finished_at = millis(event.at);
                self.handler_stopped = event.handler_stopped;
                if event.handler_stopped.is_some() {
                    // Cancelled while running: what the attempt ended with.
                    self.error = error();
                    self.result_offset = offset.filter(|_| event.result.is_some()).unwrap_or(-1);
                }
            }
            EventType::Expired => {
                self.status = Status::Expired;
                self.finished_at = millis(event.at);
                if event.error.is_some() {
                    self.error = error();
                }
            }
            // Only a dead task comes back; a `retried` read after its new run began (from
            // another gateway's stream position) changes nothing.
            EventType::Retried if self.status == Status::Dead => {
                self.status = Status::Queued;
                self.reason = None;
                self.error = None;
                self.finished_at = 0;
                self.run_at = 0;
                self.attempts = 0;
            }
            EventType::Retried
            | EventType::Worker
            | EventType::Gateway
            | EventType::Scheduler
            | EventType::CancelSeen => {}
        }
        key_to_index
    }

    /// Folds a `queued` event; the Idempotency-Key to index, if it brings one.
    fn queued(&mut self, event: &Event) -> Option<String> {
        if let Some(submitted_at) = event.submitted_at {
            self.submitted_at = millis(submitted_at);
        }
        if let Some(run_at) = event.run_at
            && self.status == Status::Queued
        {
            self.status = Status::Scheduled;
            self.run_at = millis(run_at);
        }
        if let Some(expires_at) = event.expires_at {
            self.extra.get_or_insert_with(Box::default).expires_at = millis(expires_at);
        }
        if let (Some(schedule), Some(tick)) = (&event.schedule, event.tick) {
            self.extra.get_or_insert_with(Box::default).schedule =
                Some((schedule.as_str().into(), millis(tick)));
        }
        if let Some(key) = &event.idempotency_key {
            let indexed = idempotency_index(event.idempotency_scope.as_deref(), key);
            let extra = self.extra.get_or_insert_with(Box::default);
            extra.idempotency_key = Some(indexed.as_str().into());
            extra.request_digest = event.request_digest.as_deref().and_then(parse_digest);
            return Some(indexed);
        }
        None
    }
}

/// What the view indexes an Idempotency-Key under: the key within its API key's scope. An
/// anonymous key (an open gateway, or an event from before keys were scoped) is itself.
pub(crate) fn idempotency_index(scope: Option<&str>, key: &str) -> String {
    match scope {
        // Keys are printable ASCII: a NUL cannot be part of one.
        Some(scope) => format!("{scope}\0{key}"),
        None => key.to_owned(),
    }
}

/// A request digest as `queued` events carry it: 32 hex digits. Anything else is ignored (no
/// digest: any request may reuse the key, as before digests were written).
pub(crate) fn parse_digest(text: &str) -> Option<[u8; 16]> {
    let mut digest = [0; 16];
    hex::decode_to_slice(text, &mut digest).ok()?;
    Some(digest)
}

#[derive(Default)]
pub(super) struct Extra {
    /// The Idempotency-Key, as indexed ([`idempotency_index`]).
    pub(super) idempotency_key: Option<Box<str>>,
    /// The digest of the request that used the key.
    pub(super) request_digest: Option<[u8; 16]>,
    /// When it expires if not started (milliseconds since the epoch; 0: never).
    pub(super) expires_at: u64,
    /// The schedule and the tick (milliseconds since the epoch) that made it.
    pub(super) schedule: Option<(Box<str>, u64)>,
    pub(super) waiters: Option<Arc<Notify>>,
}
