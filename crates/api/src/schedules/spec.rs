//! What a schedule is, and its ticks: pure, no broker.
//!
//! `every` ticks are aligned on the epoch (every multiple of the period since 1970-01-01 UTC),
//! so every gateway computes the same ticks whoever made the schedule and whenever it starts.
//! `cron` ticks come from [croner](https://docs.rs/croner), in the schedule's IANA time zone
//! (chrono-tz): a local time that a daylight-saving change skips fires at the first time after
//! the change (02:30 on the night clocks go from 02:00 to 03:00 fires at 03:00), and a local
//! time that occurs twice fires once, at its first occurrence: what cron users expect.

use std::{
    str::FromStr,
    time::{Duration, SystemTime},
};

use chrono::{DateTime, Utc};
use offload_common::TaskKind;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The shortest `every`.
pub const MIN_EVERY: Duration = Duration::from_secs(1);
/// The longest a schedule name may be.
pub const MAX_NAME: usize = 64;

/// One schedule, as stored and as the API shows it: its task, and exactly one of `cron` and
/// `every`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Schedule {
    /// Its name: 1 to 64 characters of `a-z 0-9 _ . -` (from the path of `PUT`).
    #[serde(default)]
    #[schema(example = "nightly-report")]
    pub name: String,
    /// The task each tick makes.
    pub task: Template,
    /// A cron expression: 5 fields, or 6 with seconds first, read in `timezone`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(example = "30 2 * * *")]
    pub cron: Option<String>,
    /// The IANA time zone `cron` is read in; default `UTC`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(example = "Europe/Berlin")]
    pub timezone: Option<String>,
    /// Every this long (`"10s"`, `"1h"`; at least 1 s), aligned on the epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(example = "5m")]
    pub every: Option<String>,
    /// What becomes of ticks missed while no gateway ran: `skip` them (the default, as cron
    /// does), or fire `once` for the latest of them.
    #[serde(default)]
    pub missed: Missed,
}

/// The task a tick makes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Template {
    /// The task kind, as in `POST /tasks`.
    #[schema(value_type = String, example = "report")]
    pub kind: TaskKind,
    /// Its payload.
    #[serde(default)]
    #[schema(value_type = Object)]
    pub payload: serde_json::Value,
    /// Each task expires if not started within this long (`"10m"`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(example = "10m")]
    pub expires_in: Option<String>,
}

/// What becomes of ticks missed while no gateway ran.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Missed {
    /// None of them fires; the schedule goes on from the next tick.
    #[default]
    Skip,
    /// The latest of them fires once, when a gateway is back; never a burst.
    Once,
}

/// Why a schedule was refused; each says what to fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    /// The name is not 1 to 64 characters of `a-z 0-9 _ . -`.
    #[error("a schedule's name must be 1 to 64 characters of a-z, 0-9, '_', '.' and '-'")]
    Name,
    /// The cron expression does not parse.
    #[error("`cron` is not a cron expression (5 fields, or 6 with seconds first): {0}")]
    Cron(String),
    /// The time zone is not an IANA name.
    #[error("`timezone` is not an IANA time zone name such as \"Europe/Berlin\" or \"UTC\"")]
    Timezone,
    /// `every` is not a duration, or under a second.
    #[error("`every` must be a duration of at least 1s, such as \"10s\" or \"1h\"")]
    Every,
    /// Neither or both of `cron` and `every`.
    #[error("give exactly one of `cron` (with an optional `timezone`) and `every`")]
    When,
    /// `expires_in` is not a duration.
    #[error("`task.expires_in` must be a duration such as \"10m\"")]
    Expiry,
}

/// A schedule's ticks, ready to compute.
#[derive(Debug, Clone)]
pub enum Ticks {
    /// Cron, in a time zone.
    Cron(Box<croner::Cron>, chrono_tz::Tz),
    /// A period, aligned on the epoch.
    Every(Duration),
}

impl Schedule {
    /// Checks everything but the kind (which the broker knows), and readies its ticks.
    pub fn ticks(&self) -> Result<Ticks, SpecError> {
        let valid_char = |c: char| matches!(c, 'a'..='z' | '0'..='9' | '_' | '.' | '-');
        if !(1..=MAX_NAME).contains(&self.name.len()) || !self.name.chars().all(valid_char) {
            return Err(SpecError::Name);
        }
        if let Some(expires_in) = &self.task.expires_in {
            humantime::parse_duration(expires_in).map_err(|_| SpecError::Expiry)?;
        }
        match (&self.cron, &self.every) {
            (Some(cron), None) => {
                let parsed = croner::Cron::from_str(cron)
                    .map_err(|error| SpecError::Cron(error.to_string()))?;
                let zone: chrono_tz::Tz = self
                    .timezone
                    .as_deref()
                    .unwrap_or("UTC")
                    .parse()
                    .map_err(|_| SpecError::Timezone)?;
                Ok(Ticks::Cron(Box::new(parsed), zone))
            }
            (None, Some(every)) if self.timezone.is_none() => {
                let period = humantime::parse_duration(every).map_err(|_| SpecError::Every)?;
                if period < MIN_EVERY {
                    return Err(SpecError::Every);
                }
                Ok(Ticks::Every(period))
            }
            _ => Err(SpecError::When),
        }
    }

    /// The id of the task tick `tick` makes: the same on every gateway, so the tick is known
    /// by its task.
    pub fn task_id(&self, tick: SystemTime) -> Uuid {
        tick_id(&self.name, tick)
    }
}

/// The task id of `schedule`'s tick at `tick` (a UUID v5 of the name and the tick's
/// millisecond).
pub fn tick_id(schedule: &str, tick: SystemTime) -> Uuid {
    let name = format!("{schedule}@{}", millis(tick));
    Uuid::new_v5(&NAMESPACE, name.as_bytes())
}

/// offload's namespace for tick ids.
const NAMESPACE: Uuid = Uuid::from_u128(0x6f66_666c_6f61_6473_6368_6564_756c_6573);

impl Ticks {
    /// The first tick strictly after `after`; `None` if there is none (a cron of a date that
    /// never comes).
    pub fn next_after(&self, after: SystemTime) -> Option<SystemTime> {
        match self {
            Self::Every(period) => {
                let period = period.as_millis().max(1);
                let after = u128::from(millis(after));
                let next = (after / period + 1) * period;
                u64::try_from(next)
                    .ok()
                    .map(|next| SystemTime::UNIX_EPOCH + Duration::from_millis(next))
            }
            Self::Cron(cron, zone) => {
                let after: DateTime<Utc> = after.into();
                let next = cron
                    .find_next_occurrence(&after.with_timezone(zone), false)
                    .ok()?;
                Some(next.with_timezone(&Utc).into())
            }
        }
    }

    /// The latest tick at or before `at` and after `since`; `None` if none.
    pub fn latest_between(&self, since: SystemTime, at: SystemTime) -> Option<SystemTime> {
        let mut latest = None;
        let mut tick = self.next_after(since)?;
        // Bounded: the ticks of a day at one a second, at most (a long outage under `once`
        // looks back no further than the last tick it knows of).
        for _ in 0..86_400 {
            if tick > at {
                break;
            }
            latest = Some(tick);
            tick = self.next_after(tick)?;
        }
        latest
    }

    /// How many ticks fall after `since` and at or before `at`, counted up to `most`.
    pub fn count_between(&self, since: SystemTime, at: SystemTime, most: u64) -> u64 {
        if let Self::Every(period) = self {
            let period = period.as_millis().max(1);
            let (since, at) = (u128::from(millis(since)), u128::from(millis(at)));
            let count = (at / period).saturating_sub(since / period);
            return u64::try_from(count).unwrap_or(u64::MAX).min(most);
        }
        let mut count = 0;
        let mut tick = self.next_after(since);
        while let Some(next) = tick.filter(|next| *next <= at && count < most) {
            count += 1;
            tick = self.next_after(next);
        }
        count
    }

    /// The next `count` ticks after `after`.
    pub fn upcoming(&self, after: SystemTime, count: usize) -> Vec<SystemTime> {
        let mut ticks = Vec::with_capacity(count);
        let mut at = after;
        while ticks.len() < count {
            let Some(next) = self.next_after(at) else {
                break;
            };
            ticks.push(next);
            at = next;
        }
        ticks
    }
}

fn millis(time: SystemTime) -> u64 {
    time.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |since| {
            u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
        })
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;

    use super::*;

    fn schedule(cron: Option<&str>, timezone: Option<&str>, every: Option<&str>) -> Schedule {
        Schedule {
            name: "nightly".into(),
            task: Template {
                kind: TaskKind::try_from("sleep").expect("a kind"),
                payload: serde_json::Value::Null,
                expires_in: None,
            },
            cron: cron.map(str::to_owned),
            timezone: timezone.map(str::to_owned),
            every: every.map(str::to_owned),
            missed: Missed::Skip,
        }
    }

    fn cron(expression: &str, zone: &str) -> Ticks {
        schedule(Some(expression), Some(zone), None)
            .ticks()
            .expect("valid")
    }

    fn berlin(y: i32, mo: u32, d: u32, h: u32, mi: u32) -> SystemTime {
        chrono_tz::Europe::Berlin
            .with_ymd_and_hms(y, mo, d, h, mi, 0)
            .earliest()
            .expect("a local time")
            .with_timezone(&Utc)
            .into()
    }

    fn utc(text: &str) -> SystemTime {
        humantime::parse_rfc3339(text).expect("a time")
    }

    #[test]
    fn every_is_aligned_on_the_epoch_whoever_computes_it() {
        let ticks = schedule(None, None, Some("10s")).ticks().expect("valid");
        assert_eq!(
            ticks.next_after(utc("2026-12-02T10:00:03Z")),
            Some(utc("2026-12-02T10:00:10Z"))
        );
        assert_eq!(
            ticks.next_after(utc("2026-12-02T10:00:10Z")),
            Some(utc("2026-12-02T10:00:20Z")),
            "strictly after"
        );
        assert_eq!(
            ticks.latest_between(utc("2026-12-02T10:00:00Z"), utc("2026-12-02T10:00:35Z")),
            Some(utc("2026-12-02T10:00:30Z"))
        );
        assert_eq!(
            ticks.latest_between(utc("2026-12-02T10:00:30Z"), utc("2026-12-02T10:00:35Z")),
            None
        );
    }

    #[test]
    fn cron_reads_five_or_six_fields_in_its_time_zone() {
        let daily = cron("30 2 * * *", "UTC");
        assert_eq!(
            daily.next_after(utc("2026-12-02T03:00:00Z")),
            Some(utc("2026-12-03T02:30:00Z"))
        );
        let seconds = cron("*/15 * * * * *", "UTC");
        assert_eq!(
            seconds.upcoming(utc("2026-12-02T00:00:01Z"), 2),
            [utc("2026-12-02T00:00:15Z"), utc("2026-12-02T00:00:30Z")]
        );
        let berlin_nine = cron("0 9 * * *", "Europe/Berlin");
        assert_eq!(
            berlin_nine.next_after(utc("2026-12-02T00:00:00Z")),
            Some(utc("2026-12-02T08:00:00Z")),
            "09:00 in Berlin is 08:00 UTC in winter"
        );
    }

    #[test]
    fn daylight_saving_changes_fire_as_cron_users_expect() {
        let night = cron("30 2 * * *", "Europe/Berlin");
        // 2026-03-29: clocks go from 02:00 to 03:00; 02:30 does not exist and fires at 03:00.
        assert_eq!(
            night.next_after(berlin(2026, 3, 28, 12, 0)),
            Some(berlin(2026, 3, 29, 3, 0))
        );
        assert_eq!(
            night.upcoming(berlin(2026, 3, 28, 12, 0), 2)[1],
            berlin(2026, 3, 30, 2, 30)
        );
        // 2026-10-25: clocks go from 03:00 back to 02:00; 02:30 happens twice and fires once.
        let autumn = night.upcoming(berlin(2026, 10, 24, 12, 0), 2);
        assert_eq!(
            autumn[0],
            utc("2026-10-25T00:30:00Z"),
            "the first 02:30 (CEST)"
        );
        assert_eq!(
            autumn[1],
            utc("2026-10-26T01:30:00Z"),
            "then the next day's (CET)"
        );
    }

    #[test]
    fn what_cannot_tick_is_refused_with_what_to_fix() {
        let refused = |cron, timezone, every| {
            schedule(cron, timezone, every)
                .ticks()
                .map(|_| ())
                .expect_err("refused")
        };
        assert!(matches!(
            refused(Some("61 * * * *"), None, None),
            SpecError::Cron(_)
        ));
        assert_eq!(
            refused(Some("0 * * * *"), Some("Mars/Olympus"), None),
            SpecError::Timezone
        );
        assert_eq!(refused(None, None, Some("500ms")), SpecError::Every);
        assert_eq!(refused(None, None, Some("often")), SpecError::Every);
        assert_eq!(refused(None, None, None), SpecError::When);
        assert_eq!(
            refused(Some("* * * * *"), None, Some("1s")),
            SpecError::When
        );
        let mut bad_name = schedule(None, None, Some("1s"));
        bad_name.name = "Nightly Report".into();
        assert_eq!(bad_name.ticks().map(|_| ()), Err(SpecError::Name));
    }

    #[test]
    fn a_ticks_id_is_the_same_everywhere_and_differs_between_ticks() {
        let tick = utc("2026-12-02T10:00:00Z");
        assert_eq!(tick_id("nightly", tick), tick_id("nightly", tick));
        assert_ne!(tick_id("nightly", tick), tick_id("hourly", tick));
        assert_ne!(
            tick_id("nightly", tick),
            tick_id("nightly", tick + Duration::from_secs(1))
        );
    }
}
