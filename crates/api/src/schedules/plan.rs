//! What a leader fires: the ticks a new leader catches up on ([`catch_up`]), and the plan
//! of every schedule's next tick ([`Plan`]).

use std::{
    collections::{BTreeSet, HashMap, VecDeque},
    time::{Duration, SystemTime},
};

use super::{
    leader::{GRACE, LATE_MAX},
    store::{Schedules, Stored},
};

/// How far back a new leader looks for the latest tick missed while none ran (`once`).
const LOOK_BACK: Duration = Duration::from_secs(8 * 24 * 3600);

/// The ticks a new leader that started at `started` fires for `stored` at `now`, given the
/// latest tick it made a task for (`last`) and when a leader was last heard of (`seen`); and
/// how many it does not (due while no gateway ran, or beyond [`LATE_MAX`]; counted up to
/// [`COUNTED`]).
pub(super) fn catch_up(
    stored: &Stored,
    last: Option<SystemTime>,
    seen: Option<SystemTime>,
    started: SystemTime,
    now: SystemTime,
) -> (Vec<SystemTime>, u64) {
    if stored.paused {
        return (Vec::new(), 0);
    }
    let from = last.map_or(stored.since, |last| last.max(stored.since));
    let mut fire = VecDeque::new();
    let mut missed = 0;
    let mut outage_from = from;
    if let Some(seen) = seen {
        // Due while a gateway ran: until shortly after the last leader was last heard of, or
        // until now if this gateway already ran then. Each fires, late: the latest LATE_MAX.
        let alive_until = if started <= seen + GRACE {
            now
        } else {
            (seen + GRACE).min(now)
        };
        let start = from.max(seen.checked_sub(GRACE * 4).unwrap_or(seen));
        let mut tick = stored.ticks.next_after(start);
        let mut looked = 0;
        while let Some(at) = tick.filter(|at| *at <= alive_until && looked < COUNTED) {
            looked += 1;
            if at > from {
                fire.push_back(at);
                if fire.len() > LATE_MAX {
                    fire.pop_front();
                    missed += 1;
                }
            }
            tick = stored.ticks.next_after(at);
        }
        outage_from = from.max(alive_until);
    }
    let mut fire = Vec::from(fire);
    // Due while none ran: the policy.
    let start = outage_from.max(now.checked_sub(LOOK_BACK).unwrap_or(outage_from));
    let outage = stored.ticks.count_between(start, now, COUNTED);
    if outage > 0
        && stored.schedule.missed == super::spec::Missed::Once
        && let Some(latest) = stored.ticks.latest_between(start, now)
    {
        fire.push(latest);
        return (fire, missed + outage - 1);
    }
    (fire, missed + outage)
}

/// The most missed ticks a takeover counts (for the metric) of one schedule.
const COUNTED: u64 = 100_000;

/// The next tick of every schedule, in order.
#[derive(Default)]
pub(super) struct Plan {
    due: BTreeSet<(SystemTime, String)>,
    /// Each schedule's latest tick fired (or the time leadership began).
    pub(super) last: HashMap<String, SystemTime>,
}

impl Plan {
    /// Plans every schedule's next tick after what it fired last, or after `now` for one
    /// new to this leader; never before it was last put (a replaced schedule ticks anew), nor
    /// more than [`GRACE`] ago (a resumed schedule skips the ticks of its pause).
    pub(super) fn replan(&mut self, schedules: &Schedules, now: SystemTime) {
        self.due.clear();
        let all = schedules.all();
        self.last
            .retain(|name, _| all.iter().any(|stored| stored.schedule.name == *name));
        for stored in all.iter().filter(|stored| !stored.paused) {
            let last = *self.last.entry(stored.schedule.name.clone()).or_insert(now);
            let from = last
                .max(stored.since)
                .max(now.checked_sub(GRACE).unwrap_or(now));
            if let Some(next) = stored.ticks.next_after(from) {
                self.due.insert((next, stored.schedule.name.clone()));
            }
        }
    }

    pub(super) fn next_due(&self) -> Option<SystemTime> {
        self.due.first().map(|(at, _)| *at)
    }

    /// The ticks due at `now`, taken out of the plan.
    pub(super) fn take_due(&mut self, now: SystemTime) -> Vec<(String, SystemTime)> {
        let mut taken = Vec::new();
        while let Some((at, _)) = self.due.first() {
            if *at > now {
                break;
            }
            let Some((at, name)) = self.due.pop_first() else {
                break;
            };
            taken.push((name, at));
        }
        taken
    }

    /// Plans `stored`'s tick after `fired`: after now if it fell behind (never a burst).
    pub(super) fn after(&mut self, stored: &Stored, fired: SystemTime) {
        self.last.insert(stored.schedule.name.clone(), fired);
        let from = fired.max(SystemTime::now() - GRACE);
        if let Some(next) = stored.ticks.next_after(from) {
            self.due.insert((next, stored.schedule.name.clone()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schedules::spec::{Missed, Schedule, Template};

    fn every_second(missed: Missed, since: SystemTime) -> Stored {
        let schedule = Schedule {
            name: "s".into(),
            task: Template {
                kind: offload_common::TaskKind::try_from("sleep").expect("a kind"),
                payload: serde_json::Value::Null,
                expires_in: None,
            },
            cron: None,
            timezone: None,
            every: Some("1s".into()),
            missed,
        };
        Stored {
            ticks: schedule.ticks().expect("valid"),
            schedule,
            paused: false,
            since,
        }
    }

    fn at(seconds: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000 + seconds)
    }

    #[test]
    fn a_tick_due_while_a_leader_was_alive_fires_late_and_nothing_earlier_twice() {
        let stored = every_second(Missed::Skip, at(0));
        // The last leader fired tick 10, was heard of at 10.4, died; a new one at 11.2.
        let now = at(11) + Duration::from_millis(200);
        let (ticks, _) = catch_up(
            &stored,
            Some(at(10)),
            Some(at(10) + Duration::from_millis(400)),
            now,
            now,
        );
        assert_eq!(ticks, [at(11)]);
    }

    #[test]
    fn a_gateway_that_ran_through_a_broker_outage_fires_its_ticks_late() {
        // This gateway fired tick 10, was heard of at 10.4, lost the broker until 16.5.
        let (last, seen, now) = (
            Some(at(10)),
            Some(at(10) + Duration::from_millis(400)),
            at(16) + Duration::from_millis(500),
        );
        let stored = every_second(Missed::Skip, at(0));
        let (ticks, missed) = catch_up(&stored, last, seen, at(1), now);
        assert_eq!(ticks, (11..=16).map(at).collect::<Vec<_>>());
        assert_eq!(missed, 0, "a gateway ran all along");
        // A long outage: the latest LATE_MAX fire, the others are missed.
        let now = at(210) + Duration::from_millis(500);
        let (ticks, missed) = catch_up(&stored, last, seen, at(1), now);
        assert_eq!(ticks.len(), LATE_MAX);
        assert_eq!(ticks.first(), Some(&at(211 - 60)));
        assert_eq!(ticks.last(), Some(&at(210)));
        assert_eq!(missed, 200 - 60);
    }

    #[test]
    fn ticks_missed_while_no_gateway_ran_follow_the_policy_never_a_burst() {
        // The last leader fired tick 10 and was heard of at 10.4; nobody ran until 16.5.
        let (last, seen, now) = (
            Some(at(10)),
            Some(at(10) + Duration::from_millis(400)),
            at(16) + Duration::from_millis(500),
        );
        let (skipped, missed) = catch_up(&every_second(Missed::Skip, at(0)), last, seen, now, now);
        assert_eq!(
            skipped,
            [at(11)],
            "only the tick within GRACE of the last heartbeat"
        );
        assert_eq!(missed, 5, "ticks 12 to 16");
        let (once, missed) = catch_up(&every_second(Missed::Once, at(0)), last, seen, now, now);
        assert_eq!(once, [at(11), at(16)], "and the latest missed one, once");
        assert_eq!(missed, 4);
    }

    #[test]
    fn a_resumed_schedule_skips_the_ticks_of_its_pause() {
        let schedules = Schedules::default();
        let stored = every_second(Missed::Skip, at(0));
        schedules.apply(super::super::store::Change::Put {
            schedule: stored.schedule.clone(),
            at: at(0),
        });
        schedules.apply(super::super::store::Change::Pause { name: "s".into() });
        schedules.apply(super::super::store::Change::Resume {
            name: "s".into(),
            at: at(30) + Duration::from_millis(300),
        });
        let mut plan = Plan::default();
        plan.last.insert("s".into(), at(10));
        plan.replan(&schedules, at(30) + Duration::from_millis(300));
        assert_eq!(
            plan.next_due(),
            Some(at(31)),
            "not tick 11, due during the pause"
        );
    }

    #[test]
    fn a_schedule_never_fired_starts_from_when_it_was_put() {
        let stored = every_second(Missed::Once, at(5));
        let now = at(5) + Duration::from_millis(500);
        assert!(catch_up(&stored, None, None, now, now).0.is_empty());
        assert_eq!(
            catch_up(&stored, None, None, at(8), at(8)),
            (vec![at(8)], 2)
        );
    }
}
