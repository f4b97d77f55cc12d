//! The schedule every scenario runs through its fault: `every 1s`, from `SCHEDULES_FILE`, and
//! the check that each of its ticks fired once: none twice, none missed while a gateway ran.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use offload_common::EventType;
use uuid::Uuid;

use super::{Rig, STEP_DEADLINE};
use crate::EventLog;

/// The schedule's name.
pub(super) const SCHEDULE: &str = "campaign-tick";
/// How long after a gateway is back its ticks must fire again: the new gateway reads the
/// streams, takes the election's token and catches up.
const TAKEOVER: Duration = Duration::from_secs(3);
/// How long the schedule is watched after the load: a fault late in the load (a gateway
/// killed) still has ticks after it.
const AFTER: Duration = Duration::from_secs(5);

/// Writes the schedules file the gateway starts with into `dir`; its path.
pub(super) fn write_file(dir: &Path) -> PathBuf {
    let path = dir.join("schedules.toml");
    let text = format!(
        "[[schedule]]\nname = \"{SCHEDULE}\"\nevery = \"1s\"\ntask = {{ kind = \"sleep\", payload = {{ message = \"tick\" }} }}\n"
    );
    std::fs::write(&path, text).expect("write the campaign's schedules file");
    path
}

/// When the gateway first lists the schedule (it puts the file's schedules once it has read
/// the stored ones), and a second more for its leader to start: ticks are due from then on.
pub(super) async fn listed(gateway: &crate::GatewayProcess) -> SystemTime {
    let url = gateway.url(&format!("/schedules/{SCHEDULE}"));
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .expect("an HTTP client with a timeout builds");
    crate::eventually(
        STEP_DEADLINE,
        "the gateway to list the schedule",
        || async {
            let response = client.get(&url).send().await.ok()?;
            response.status().is_success().then_some(())
        },
    )
    .await;
    SystemTime::now() + Duration::from_secs(1)
}

/// What the checker found of the schedule's ticks.
#[derive(Debug, Clone, Copy, Default)]
pub struct Ticks {
    /// Ticks due while a gateway ran, from when it listed the schedule to a few seconds after
    /// the load.
    pub expected: usize,
    /// Of those, how many made no task that a worker completed. Must be 0.
    pub missed: usize,
    /// Ticks fired twice: two `queued` events for one tick, of two tasks made (the same task
    /// published again has one `submitted_at`). `None` when the stream could not be read.
    /// Must be 0.
    pub twice: Option<usize>,
}

impl Ticks {
    pub(super) fn kept(&self) -> bool {
        self.missed == 0 && self.twice.unwrap_or(0) == 0
    }
}

/// The whole seconds in `(from, until]` that are not within a time the gateway was down
/// (up to [`TAKEOVER`] after it was back).
fn due(from: SystemTime, until: SystemTime, down: &[(SystemTime, SystemTime)]) -> Vec<SystemTime> {
    let seconds = |time: SystemTime| {
        time.duration_since(SystemTime::UNIX_EPOCH)
            .expect("after 1970")
            .as_secs()
    };
    (seconds(from) + 1..=seconds(until))
        .map(|second| SystemTime::UNIX_EPOCH + Duration::from_secs(second))
        .filter(|tick| {
            !down
                .iter()
                .any(|(stopped, back)| *tick >= *stopped && *tick <= *back + TAKEOVER)
        })
        .collect()
}

/// Checks the ticks due from `from` to [`AFTER`] from now: waits (bounded) for each one's task
/// to be completed by a worker, then reads the events stream for ticks fired twice.
pub(super) async fn check(rig: &Rig, from: SystemTime) -> Ticks {
    let until = SystemTime::now() + AFTER;
    let expected: Vec<(SystemTime, Uuid)> = due(from, until, &rig.gateway_down)
        .into_iter()
        .map(|tick| (tick, offload_api::schedules::spec::tick_id(SCHEDULE, tick)))
        .collect();
    let done = tokio::time::timeout(STEP_DEADLINE, async {
        loop {
            let done = rig.completions();
            if expected.iter().all(|(_, id)| done.contains_key(id)) {
                return done;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await
    .unwrap_or_else(|_| rig.completions());
    let missed: Vec<SystemTime> = expected
        .iter()
        .filter(|(_, id)| !done.contains_key(id))
        .map(|(tick, _)| *tick)
        .collect();
    for tick in missed.iter().take(5) {
        eprintln!(
            "schedule {SCHEDULE}: tick {} made no completed task",
            humantime::format_rfc3339(*tick)
        );
    }
    Ticks {
        expected: expected.len(),
        missed: missed.len(),
        twice: fired_twice(&rig.worker_url, &rig.queue).await,
    }
}

/// How many ticks have `queued` events of two different tasks on the stream (read by a
/// reader of the campaign's own); `None` if it cannot be read.
async fn fired_twice(urls: &str, queue: &str) -> Option<usize> {
    let (urls, queue) = (urls.to_owned(), queue.to_owned());
    // A task of its own: the reader's marker panics if the broker never takes it.
    let read = tokio::spawn(async move {
        let log = EventLog::follow(&urls, &queue);
        log.sync().await;
        log.events()
    });
    let events = tokio::time::timeout(STEP_DEADLINE, read).await.ok()?.ok()?;
    let mut made: BTreeMap<SystemTime, HashSet<Option<SystemTime>>> = BTreeMap::new();
    for event in events.iter().filter(|event| {
        event.event == EventType::Queued && event.schedule.as_deref() == Some(SCHEDULE)
    }) {
        if let Some(tick) = event.tick {
            made.entry(tick).or_default().insert(event.submitted_at);
        }
    }
    let twice: HashMap<_, _> = made.iter().filter(|(_, tasks)| tasks.len() > 1).collect();
    for tick in twice.keys().take(5) {
        eprintln!(
            "schedule {SCHEDULE}: tick {} fired twice",
            humantime::format_rfc3339(**tick)
        );
    }
    Some(twice.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(seconds: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000 + seconds)
    }

    #[test]
    fn the_ticks_due_leave_out_the_gateways_downtime_and_its_takeover() {
        let from = at(10) + Duration::from_millis(300);
        let down = [(at(13) + Duration::from_millis(500), at(15))];
        assert_eq!(
            due(from, at(20), &down),
            [at(11), at(12), at(13), at(19), at(20)]
        );
    }
}
