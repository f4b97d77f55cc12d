//! The view as events build it: states, totals, eviction, claims, waiters.

use super::*;
use crate::status::{Claim, millis};

fn event(event_type: EventType, id: Uuid) -> Event {
    Event::task(event_type, id, "sleep")
}

#[test]
fn a_task_moves_through_its_states() {
    let tracker = Tracker::new(10);
    let id = Uuid::new_v4();
    tracker.accepted(id, "sleep", SystemTime::now(), None);
    assert_eq!(tracker.get(id).map(|t| t.status), Some(Status::Queued));
    let mut started = event(EventType::Started, id);
    started.attempt = Some(1);
    tracker.apply(&started, Some(1));
    assert_eq!(tracker.get(id).map(|t| t.status), Some(Status::Running));
    let mut failed = event(EventType::Failed, id);
    failed.error = Some("boom".into());
    tracker.apply(&failed, Some(2));
    let task = tracker.get(id).expect("known");
    assert_eq!(
        (task.status, task.error.as_deref()),
        (Status::Queued, Some("boom"))
    );
    let mut succeeded = event(EventType::Succeeded, id);
    succeeded.attempt = Some(2);
    succeeded.result = Some(serde_json::json!(42));
    tracker.apply(&succeeded, Some(3));
    let task = tracker.get(id).expect("known");
    assert_eq!(task.status, Status::Succeeded);
    assert_eq!(task.attempts, 2);
    assert_eq!(task.result_offset, Some(3));
}

#[test]
fn a_retry_is_scheduled_and_a_late_failure_does_not_undo_the_next_start() {
    let tracker = Tracker::new(10);
    let id = Uuid::new_v4();
    let mut failed = event(EventType::Failed, id);
    failed.attempt = Some(1);
    failed.retry = Some(true);
    failed.error = Some("busy".into());
    let run_at = SystemTime::now() + Duration::from_secs(10);
    failed.run_at = Some(run_at);
    tracker.apply(&failed, None);
    let task = tracker.get(id).expect("known");
    assert_eq!(task.status, Status::Scheduled);
    assert_eq!(task.run_at.map(millis), Some(millis(run_at)));

    let mut started = event(EventType::Started, id);
    started.attempt = Some(2);
    tracker.apply(&started, None);
    // Attempt 1's event again (read late, from another process): still running.
    tracker.apply(&failed, None);
    let task = tracker.get(id).expect("known");
    assert_eq!(task.status, Status::Running);
    assert_eq!(task.run_at, None, "no run_at unless scheduled");
}

#[test]
fn a_duplicate_delivery_read_after_the_end_does_not_reopen_the_task() {
    let tracker = Tracker::new(10);
    let id = Uuid::new_v4();
    let attempt = |event_type, attempt| {
        let mut event = event(event_type, id);
        event.attempt = Some(attempt);
        event
    };
    let mut succeeded = attempt(EventType::Succeeded, 1);
    succeeded.result = Some(serde_json::json!("first"));
    tracker.apply(&succeeded, Some(7));
    // A duplicate's `started` written late after a failover, its failure, its own end.
    for late in [
        attempt(EventType::Started, 1),
        attempt(EventType::Started, 2),
        attempt(EventType::Failed, 2),
        attempt(EventType::Dead, 2),
        attempt(EventType::Succeeded, 2),
    ] {
        tracker.apply(&late, Some(8));
        let task = tracker.get(id).expect("known");
        assert_eq!(
            task.status,
            Status::Succeeded,
            "after a late {:?}",
            late.event
        );
        assert_eq!(task.result_offset, Some(7), "the first success's result");
    }

    let other = Uuid::new_v4();
    let mut dead = event(EventType::Dead, other);
    dead.attempt = Some(3);
    tracker.apply(&dead, Some(9));
    let mut late = event(EventType::Started, other);
    late.attempt = Some(3);
    tracker.apply(&late, Some(10));
    assert_eq!(tracker.get(other).map(|t| t.status), Some(Status::Dead));
    // A duplicate that did the work: it succeeded after all.
    let mut succeeded = event(EventType::Succeeded, other);
    succeeded.attempt = Some(3);
    tracker.apply(&succeeded, Some(11));
    assert_eq!(
        tracker.get(other).map(|t| t.status),
        Some(Status::Succeeded)
    );
}

#[test]
fn totals_count_a_task_once_recent_tasks_come_newest_first_and_local_ones_are_marked() {
    let tracker = Tracker::new(10);
    let (first, second) = (Uuid::new_v4(), Uuid::new_v4());
    for id in [first, second] {
        // Applied on acceptance, then read back from the stream.
        tracker.accepted(id, "sleep", SystemTime::now(), None);
        tracker.apply(&event(EventType::Queued, id), Some(1));
    }
    tracker.apply(&event(EventType::Started, first), Some(2));
    tracker.apply(&event(EventType::Succeeded, first), Some(3));
    assert_eq!(
        tracker.totals(),
        Totals {
            submitted: 2,
            started: 1,
            succeeded: 1,
            failed: 0,
            dead: 0,
            ..Totals::default()
        }
    );
    let recent: Vec<Uuid> = tracker.recent(5).iter().map(|task| task.id).collect();
    assert_eq!(recent, [second, first]);
    let elsewhere = Uuid::new_v4();
    tracker.apply(&event(EventType::Queued, elsewhere), Some(9));
    assert!(tracker.accepted_here(first) && !tracker.accepted_here(elsewhere));
    assert_eq!(tracker.recent(1).len(), 1);

    tracker.apply(&event(EventType::Dead, second), Some(4));
    let dead: Vec<Uuid> = tracker.recent_dead(5).iter().map(|task| task.id).collect();
    assert_eq!(dead, [second]);
    // Retried: no longer listed as dead.
    tracker.apply(&event(EventType::Retried, second), Some(5));
    assert!(tracker.recent_dead(5).is_empty());
}

#[test]
fn a_task_whose_worker_is_read_before_its_queued_event_is_still_submitted_once() {
    let tracker = Tracker::new(10);
    let id = Uuid::new_v4();
    // The worker ran it before the accepting gateway applied its `queued`: the broker
    // delivered it before the confirm came back.
    tracker.apply(&event(EventType::Started, id), Some(1));
    tracker.apply(&event(EventType::Succeeded, id), Some(2));
    assert_eq!(tracker.totals().submitted, 0, "no gateway has said so yet");
    tracker.accepted(id, "sleep", SystemTime::now(), None);
    // And its `queued` read back from the stream.
    tracker.apply(&event(EventType::Queued, id), Some(3));
    let totals = tracker.totals();
    assert_eq!((totals.submitted, totals.succeeded), (1, 1));
    assert_eq!(tracker.get(id).map(|t| t.status), Some(Status::Succeeded));
    assert!(tracker.accepted_here(id));
}

#[test]
fn an_entry_stays_small() {
    // The per-task memory figure in PERFORMANCE.md rests on it.
    assert!(std::mem::size_of::<Entry>() <= 80);
}

#[test]
fn the_oldest_tasks_are_forgotten_past_the_capacity() {
    let tracker = Tracker::new(2);
    let ids: Vec<Uuid> = (0..3).map(|_| Uuid::new_v4()).collect();
    for (n, id) in ids.iter().enumerate() {
        tracker.accepted(*id, "sleep", SystemTime::now(), Some(&format!("key-{n}")));
    }
    assert_eq!(tracker.len(), 2);
    assert!(tracker.get(ids[0]).is_none());
    assert!(
        matches!(tracker.claim("key-0"), Claim::Mine(_)),
        "its key is forgotten too"
    );
    assert!(matches!(tracker.claim("key-2"), Claim::Done(id, None) if id == ids[2]));
}

#[test]
fn one_key_claimed_twice_at_once_is_one_submission() {
    let tracker = Tracker::new(10);
    let Claim::Mine(guard) = tracker.claim("k") else {
        panic!("the first claim is ours");
    };
    assert!(matches!(tracker.claim("k"), Claim::Wait(_)));
    drop(guard);
    assert!(matches!(tracker.claim("k"), Claim::Mine(_)));
}

#[tokio::test]
async fn a_waiter_wakes_when_the_task_ends() {
    let tracker = Tracker::new(10);
    let id = Uuid::new_v4();
    tracker.accepted(id, "sleep", SystemTime::now(), None);
    let waiting = tokio::spawn({
        let tracker = tracker.clone();
        async move { tracker.wait(id, Duration::from_secs(30)).await }
    });
    tokio::task::yield_now().await;
    tracker.apply(&event(EventType::Dead, id), Some(9));
    let task = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("woken, not timed out")
        .expect("task")
        .expect("known");
    assert_eq!(task.status, Status::Dead);
}

#[test]
fn a_cancel_is_final_and_a_kind_cancel_takes_only_waiting_tasks_submitted_before_it() {
    let tracker = Tracker::new(100);
    let submitted = SystemTime::now();
    let (waiting, running, later) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
    tracker.accepted(waiting, "sleep", submitted, None);
    tracker.accepted(running, "sleep", submitted, None);
    tracker.apply(&event(EventType::Started, running), Some(1));
    tracker.accepted(later, "sleep", submitted + Duration::from_secs(5), None);

    let cancelled = tracker.cancel_kind("sleep", submitted + Duration::from_secs(1), submitted);

    assert_eq!(cancelled, 1);
    let status = |id| tracker.get(id).map(|task| task.status);
    assert_eq!(status(waiting), Some(Status::Cancelled));
    assert_eq!(status(running), Some(Status::Running));
    assert_eq!(status(later), Some(Status::Queued));
    // A duplicate's start, or its end, read after the cancel changes nothing.
    tracker.apply(&event(EventType::Started, waiting), Some(2));
    tracker.apply(&event(EventType::Succeeded, waiting), Some(3));
    assert_eq!(status(waiting), Some(Status::Cancelled));

    let mut stopped = event(EventType::Cancelled, running);
    stopped.handler_stopped = Some(true);
    tracker.apply(&stopped, Some(4));
    let task = tracker.get(running).expect("known");
    assert_eq!(
        (task.status, task.handler_stopped),
        (Status::Cancelled, Some(true))
    );
    assert!(task.finished_at.is_some());
    assert_eq!(tracker.kind_counts()["sleep"].running, 0);
}
