//! Acks on one channel, with those of consecutive deliveries folded into one `basic.ack`.
//!
//! With lifecycle events on, tasks finish in groups: their terminal events share one stream
//! message, and that message's confirm lets all of them be acked at once. Sent one by one,
//! each ack is a frame for lapin to write and, on a quorum queue, a Raft command for the
//! broker to log and apply. One `basic.ack` with `multiple` set settles every delivery of the
//! channel up to its tag, so when every delivery in hand up to some tag is being acked, one
//! frame says it all.
//!
//! The catch is the word *every*: `multiple` also settles deliveries that are still running,
//! or that are being requeued or rejected. So [`Acks`] keeps the tags of the deliveries in
//! hand and folds only a run of acks that starts at the lowest of them; a reject leaves that
//! set only once its own frame is sent (frames on a channel reach the broker in order), so no
//! `multiple` can overtake it.
//!
//! Every frame's wait is bounded ([`SETTLE_TIMEOUT`]): lapin can leave the promise of a frame
//! queued as its connection dies pending for good (amqp-rs/lapin#409), and a settle that never
//! returns would hold its task's permit, and so its kind's subscription, forever.
//!
//! No ack waits for company. The first task to ack sends its own frame at once; the acks that
//! arrive while a frame is on its way wait for it, and go together as the next group, sent by
//! a task spawned for that. A worker that settles one task at a time (prefetch 1) thus pays
//! nothing for this. An ack can also be handed over without waiting ([`Settle::ack_then`]):
//! the events sink does so for a whole batch of tasks when its confirm comes.

use std::{
    collections::BTreeSet,
    mem,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use futures_util::future::join_all;
use lapin::{
    Acker,
    message::Delivery,
    options::{BasicAckOptions, BasicRejectOptions},
    types::DeliveryTag,
};
use tokio::sync::oneshot;

/// A channel's acks: note each delivery as it is taken in hand ([`Acks::taken`]), then settle
/// it through [`Acks::settle`].
#[derive(Clone, Default)]
pub(crate) struct Acks {
    state: Arc<Mutex<State>>,
}

#[derive(Default)]
struct State {
    /// The tags of the deliveries taken in hand and not yet settled.
    in_hand: BTreeSet<DeliveryTag>,
    /// Acks that came while a group was being sent.
    waiting: Vec<Waiting>,
    /// Whether a group is being sent.
    sending: bool,
}

/// An ack, and what to do with its outcome (`None` for the sender's own).
struct Waiting {
    tag: DeliveryTag,
    acker: Acker,
    then: Option<Then>,
}

/// Longest wait for a settling frame to be sent. A frame goes out at once on a live
/// connection; one not sent by then is taken as lost with its channel (the broker delivers
/// the task again).
const SETTLE_TIMEOUT: Duration = Duration::from_secs(10);

/// Called with an ack's outcome once its frame is sent: `Ok(false)` if its channel is gone
/// (the broker then delivers it again).
type Then = Box<dyn FnOnce(Result<bool, lapin::Error>) + Send>;

impl Acks {
    /// Notes a delivery taken in hand. Call it in the order of delivery, before the delivery
    /// can be settled.
    pub(crate) fn taken(&self, tag: DeliveryTag) {
        lock(&self.state).in_hand.insert(tag);
    }

    /// How to settle `delivery`, once: it must have been [`Acks::taken`].
    pub(crate) fn settle(&self, delivery: &Delivery) -> Settle {
        Settle {
            acks: self.clone(),
            tag: delivery.delivery_tag,
            acker: delivery.acker.clone(),
        }
    }
}

/// Settles one delivery taken in hand: ack it, or reject it.
pub(crate) struct Settle {
    acks: Acks,
    tag: DeliveryTag,
    acker: Acker,
}

impl Settle {
    /// Acks the delivery, alone or with others; `Ok(false)` if its channel is gone (the broker
    /// then delivers it again).
    pub(crate) async fn ack(self) -> Result<bool, lapin::Error> {
        let state = &self.acks.state;
        let queued = {
            let mut state = lock(state);
            if state.sending {
                let (sent, outcome) = oneshot::channel();
                state.waiting.push(Waiting {
                    tag: self.tag,
                    acker: self.acker.clone(),
                    then: Some(Box::new(move |outcome| {
                        let _ = sent.send(outcome);
                    })),
                });
                Some(outcome)
            } else {
                state.sending = true;
                None
            }
        };
        if let Some(outcome) = queued {
            return outcome.await.unwrap_or(Ok(false));
        }
        let mut sending = Sending {
            state: Arc::clone(state),
            released: false,
        };
        let own = Waiting {
            tag: self.tag,
            acker: self.acker,
            then: None,
        };
        let outcome = send_group(state, vec![own]).await;
        // Whatever came meanwhile goes next, from a task of its own, so this task's caller
        // does not wait for acks other than its own.
        if let Some(group) = sending.next_group() {
            tokio::spawn(send_groups(sending, group));
        }
        outcome.unwrap_or(Ok(false))
    }

    /// Acks the delivery without waiting: it goes with the next group, and `then` is called
    /// with its outcome once its frame is sent, from the task that sends it.
    pub(crate) fn ack_then(self, then: impl FnOnce(Result<bool, lapin::Error>) + Send + 'static) {
        let start = {
            let mut state = lock(&self.acks.state);
            state.waiting.push(Waiting {
                tag: self.tag,
                acker: self.acker,
                then: Some(Box::new(then)),
            });
            !mem::replace(&mut state.sending, true)
        };
        if start {
            let mut sending = Sending {
                state: Arc::clone(&self.acks.state),
                released: false,
            };
            // Taken when the task runs, not now: the acks handed over meanwhile (the rest of
            // an events batch) go in the same group.
            tokio::spawn(async move {
                if let Some(group) = sending.next_group() {
                    send_groups(sending, group).await;
                }
            });
        }
    }

    /// Rejects the delivery (requeued or dead-lettered, as `options` say). Sent at once, on
    /// its own; only then can a folded ack cover its tag.
    pub(crate) async fn reject(self, options: BasicRejectOptions) -> Result<bool, lapin::Error> {
        let rejected = bounded(self.acker.reject(options)).await;
        // Whether or not it was sent: if it was not, the channel is gone and nothing else will
        // be sent on it either.
        lock(&self.acks.state).in_hand.remove(&self.tag);
        rejected
    }
}

/// The right to send, held by one task at a time; given up when dropped, with the acks still
/// waiting answered `Ok(false)` if it is dropped before sending them (only when the runtime
/// shuts down).
struct Sending {
    state: Arc<Mutex<State>>,
    /// Whether the right was given up already.
    released: bool,
}

impl Sending {
    /// The acks that came meanwhile, or `None` (and the right to send given up) if none did.
    fn next_group(&mut self) -> Option<Vec<Waiting>> {
        let mut state = lock(&self.state);
        if state.waiting.is_empty() {
            state.sending = false;
            self.released = true;
            None
        } else {
            Some(mem::take(&mut state.waiting))
        }
    }
}

impl Drop for Sending {
    fn drop(&mut self) {
        if !self.released {
            let waiting = {
                let mut state = lock(&self.state);
                state.sending = false;
                mem::take(&mut state.waiting)
            };
            // Dropping their callbacks (their senders, the tasks' guards) answers them.
            drop(waiting);
        }
    }
}

/// Sends `group`, then each group that came meanwhile, until none did.
async fn send_groups(mut sending: Sending, mut group: Vec<Waiting>) {
    loop {
        send_group(&sending.state, group).await;
        match sending.next_group() {
            Some(next) => group = next,
            None => return,
        }
    }
}

/// Sends `group`'s acks in as few frames as it can, answers those who wait, and returns the
/// outcome for the one ack nobody waits for (the sender's own), if there is one.
async fn send_group(
    state: &Mutex<State>,
    mut group: Vec<Waiting>,
) -> Option<Result<bool, lapin::Error>> {
    group.sort_unstable_by_key(|waiting| waiting.tag);
    let folded = {
        let mut state = lock(state);
        let folded = foldable(&state.in_hand, group.iter().map(|waiting| waiting.tag));
        for waiting in &group {
            state.in_hand.remove(&waiting.tag);
        }
        folded
    };
    let rest = group.split_off(folded);
    let mut own = None;
    let mut answer = |waiting: Waiting, outcome: Result<bool, lapin::Error>| match waiting.then {
        Some(then) => then(outcome),
        None => own = Some(outcome),
    };
    if let Some(last) = group.last() {
        let outcome = bounded(last.acker.ack(BasicAckOptions {
            multiple: folded > 1,
        }))
        .await;
        for waiting in group {
            answer(waiting, outcome.clone());
        }
    }
    let outcomes = join_all(rest.into_iter().map(|waiting| async move {
        let outcome = bounded(waiting.acker.ack(BasicAckOptions::default())).await;
        (waiting, outcome)
    }))
    .await;
    for (waiting, outcome) in outcomes {
        answer(waiting, outcome);
    }
    own
}

/// `frame`'s outcome, or a timeout's error past [`SETTLE_TIMEOUT`].
async fn bounded(
    frame: impl Future<Output = Result<bool, lapin::Error>>,
) -> Result<bool, lapin::Error> {
    tokio::time::timeout(SETTLE_TIMEOUT, frame)
        .await
        .unwrap_or_else(|_| {
            let waited = humantime::format_duration(SETTLE_TIMEOUT);
            Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("the frame was not sent within {waited}"),
            )
            .into())
        })
}

/// How many of `acks` (ascending, all in `in_hand`) one `multiple` ack can settle: those below
/// the lowest tag in hand that is not being acked.
fn foldable(in_hand: &BTreeSet<DeliveryTag>, acks: impl Iterator<Item = DeliveryTag>) -> usize {
    in_hand
        .iter()
        .zip(acks)
        .take_while(|(held, acked)| **held == *acked)
        .count()
}

fn lock(state: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    // Each change to the state is whole by the time the lock is released, so a panic while
    // holding it (there is no code that can panic there) would leave nothing half done.
    state.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn folds(in_hand: &[DeliveryTag], acks: &[DeliveryTag]) -> usize {
        foldable(&in_hand.iter().copied().collect(), acks.iter().copied())
    }

    #[test]
    fn a_run_from_the_lowest_tag_in_hand_folds() {
        assert_eq!(folds(&[3, 4, 5, 9], &[3, 4, 5]), 3);
        assert_eq!(folds(&[3, 4, 5, 9], &[3, 4, 5, 9]), 4);
    }

    #[test]
    fn a_delivery_still_in_hand_stops_the_fold() {
        // 4 still runs: acking 5 with `multiple` would settle 4 too.
        assert_eq!(folds(&[3, 4, 5], &[3, 5]), 1);
        assert_eq!(folds(&[3, 4, 5], &[4, 5]), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_frame_that_is_never_sent_ends_in_an_error() {
        let never = std::future::pending::<Result<bool, lapin::Error>>();
        let outcome = bounded(never).await;
        assert!(
            matches!(&outcome, Err(error) if error.to_string().contains("not sent within 10s")),
            "{outcome:?}"
        );
        assert!(matches!(bounded(async { Ok(true) }).await, Ok(true)));
    }

    #[test]
    fn tags_already_settled_do_not_stop_the_fold() {
        // 2 was rejected (its frame is sent, so it left the set); 1 and 3 fold over it.
        assert_eq!(folds(&[1, 3], &[1, 3]), 2);
    }
}
