//! Idempotency-Key claims: a key already used stands for its task; two requests with one key
//! at once on one gateway make one task.

use std::collections::HashMap;
use std::sync::{Arc, MutexGuard};

use tokio::sync::Notify;
use uuid::Uuid;

use super::Tracker;

/// What an Idempotency-Key stands for, when a request asks.
pub enum Claim {
    /// A task was accepted with this key already, and the digest of that request if known.
    Done(Uuid, Option<[u8; 16]>),
    /// Another request on this gateway is submitting with this key: wait, then ask again.
    Wait(Arc<Notify>),
    /// This request submits; the claim is released when the guard drops.
    Mine(ClaimGuard),
}

/// Whether another request still holds a key's claim.
pub enum ClaimState {
    /// Still being submitted elsewhere on this gateway.
    Pending,
    /// Released: ask again.
    Released,
}

/// Releases an Idempotency-Key claim when dropped.
pub struct ClaimGuard {
    tracker: Tracker,
    key: String,
}

impl Drop for ClaimGuard {
    fn drop(&mut self) {
        if let Some(notify) = self.tracker.claims().remove(&self.key) {
            notify.notify_waiters();
        }
    }
}

impl Tracker {
    pub(super) fn claims(&self) -> MutexGuard<'_, HashMap<String, Arc<Notify>>> {
        self.inner
            .claims
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Claims `key` (as indexed: [`super::idempotency_index`]) for a submission, or says what
    /// it already stands for.
    pub fn claim(&self, key: &str) -> Claim {
        {
            let view = self.view();
            if let Some(id) = view.idempotency.get(key).copied() {
                let digest = view
                    .tasks
                    .get(&id)
                    .and_then(|task| task.extra.as_ref())
                    .and_then(|extra| extra.request_digest);
                return Claim::Done(id, digest);
            }
        }
        let mut claims = self.claims();
        if let Some(notify) = claims.get(key) {
            return Claim::Wait(Arc::clone(notify));
        }
        claims.insert(key.to_owned(), Arc::new(Notify::new()));
        Claim::Mine(ClaimGuard {
            tracker: self.clone(),
            key: key.to_owned(),
        })
    }

    /// Whether `key` is still claimed by a submission on this gateway.
    pub fn claim_state(&self, key: &str) -> ClaimState {
        if self.claims().contains_key(key) {
            ClaimState::Pending
        } else {
            ClaimState::Released
        }
    }
}
