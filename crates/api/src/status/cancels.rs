//! What a gateway answering a cancel waits for: each worker consuming the task's kind saying it
//! has read the cancel (`cancel_seen` events), and then the view caught up to the present (a
//! marker of its own read back).

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::Duration,
};

use offload_common::{Event, EventSink, EventType};
use tokio::sync::{Notify, oneshot};
use uuid::Uuid;

use super::Tracker;

/// What workers have said of one cancel.
#[derive(Default)]
pub(crate) struct Heard {
    /// Each worker that said it read the cancel, and how many of its subscriptions to the
    /// kind's queue it had then.
    consumers: HashMap<String, u32>,
    /// Whether one of them was running the task.
    running: bool,
    notify: Arc<Notify>,
}

/// What the workers said, once enough of them have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Confirmed {
    /// A worker was running the task when it read the cancel: its handler has been told.
    pub running: bool,
}

/// Registered before the cancel is written, so no `cancel_seen` is missed; forgets the cancel
/// when dropped.
pub struct CancelWait {
    tracker: Tracker,
    cancel: Uuid,
    notify: Arc<Notify>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Each update is one map operation: a panic between two cannot leave it unsound.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Tracker {
    /// Starts listening for what workers say of cancel `cancel`.
    pub fn await_cancel(&self, cancel: Uuid) -> CancelWait {
        let heard = Heard::default();
        let notify = Arc::clone(&heard.notify);
        lock(&self.inner.cancels).insert(cancel, heard);
        CancelWait {
            tracker: self.clone(),
            cancel,
            notify,
        }
    }

    /// Applies a `cancel_seen` event.
    pub(super) fn cancel_seen(&self, event: &Event) {
        let (Some(cancel), Some(worker)) = (event.cancel, &event.worker) else {
            return;
        };
        let mut cancels = lock(&self.inner.cancels);
        if let Some(heard) = cancels.get_mut(&cancel) {
            heard
                .consumers
                .insert(worker.clone(), event.consumers.unwrap_or(0));
            heard.running |= event.running == Some(true);
            heard.notify.notify_waiters();
        }
    }

    /// Applies one of this gateway's markers.
    pub(super) fn marker_read(&self, marker: Uuid) {
        if let Some(read) = lock(&self.inner.markers).remove(&marker) {
            let _ = read.send(());
        }
    }

    /// Writes a marker and waits until the view has read it back, at most `timeout`: then
    /// the view holds every event written before this call. `false` if it did not.
    pub async fn sync(&self, sink: &EventSink, timeout: Duration) -> bool {
        let id = Uuid::new_v4();
        let (read, marker_read) = oneshot::channel();
        lock(&self.inner.markers).insert(id, read);
        let mut marker = Event::new(EventType::Gateway);
        marker.marker = Some(id);
        let synced = async {
            sink.emit_confirmed(marker).await
                && matches!(tokio::time::timeout(timeout, marker_read).await, Ok(Ok(())))
        };
        let synced = tokio::time::timeout(timeout, synced).await.unwrap_or(false);
        lock(&self.inner.markers).remove(&id);
        synced
    }
}

impl CancelWait {
    /// Waits until workers with `consumers` subscriptions to the kind's queue in all have
    /// said they read the cancel, at most `timeout`; `None` if they had not by then.
    pub async fn confirmed(&self, consumers: u32, timeout: Duration) -> Option<Confirmed> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            // Registered before looking, so a `cancel_seen` in between is not missed.
            notified.as_mut().enable();
            {
                let cancels = lock(&self.tracker.inner.cancels);
                let heard = cancels.get(&self.cancel)?;
                let said: u32 = heard.consumers.values().sum();
                if said >= consumers {
                    return Some(Confirmed {
                        running: heard.running,
                    });
                }
            }
            tokio::time::timeout_at(deadline, notified).await.ok()?;
        }
    }
}

impl Drop for CancelWait {
    fn drop(&mut self) {
        lock(&self.tracker.inner.cancels).remove(&self.cancel);
    }
}
