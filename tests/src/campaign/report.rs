//! The checker's verdict for one scenario, and the campaign's table.

use std::{
    collections::{HashMap, HashSet},
    time::Duration,
};

use uuid::Uuid;

use super::{
    ANSWER_SLACK, CLUSTER_RECOVERY, CONFIRM_TIMEOUT_SECS, Fault, Outcome, Record, ticks::Ticks,
};
use crate::table::Align;

/// What one scenario measured.
#[derive(Debug, Clone)]
pub struct Row {
    /// The fault.
    pub fault: Fault,
    /// Requests sent.
    pub sent: usize,
    /// 202s.
    pub ok: usize,
    /// Definite refusals.
    pub fail: usize,
    /// Timeouts, resets, and 503s that say the task may be queued.
    pub unknown: usize,
    /// Distinct good tasks that some worker completed.
    pub completed: usize,
    /// Good tasks that got a 202 and never completed. Must be 0.
    pub lost: usize,
    /// Completions beyond the first of a task (at-least-once at work).
    pub duplicates: usize,
    /// Poison tasks that got a 202.
    pub poison: usize,
    /// Messages in the dead-letter queue at the end.
    pub dead_lettered: usize,
    /// The longest any request waited for its answer.
    pub longest_wait: Duration,
    /// From the fault's healing to the first 202 of a request sent after it.
    pub recovery: Option<Duration>,
    /// Whether every promised task completed before the drain deadline.
    pub drained: bool,
    /// Tasks with a 202 whose status (GET /tasks/{id}) did not end as what happened to them
    /// (`succeeded`, or `dead` for a poison task). Must be 0.
    pub status_wrong: usize,
    /// Tasks whose cancel was answered 200 `cancelled`.
    pub cancelled: usize,
    /// Of those, how many some worker started all the same. Must be 0.
    pub cancelled_started: usize,
    /// Tasks whose status never ended because the events of their attempts, confirmed by the
    /// broker to the worker, are not on the stream: lost by the broker, not by offload.
    pub events_lost: usize,
    /// The `every 1s` schedule's ticks: none missed while a gateway ran, none fired twice.
    pub ticks: Ticks,
}

impl Row {
    /// Checks the records against the completions.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        fault: Fault,
        records: &[Record],
        promised: &HashSet<Uuid>,
        completions: &HashMap<Uuid, usize>,
        dead_lettered: usize,
        poison: usize,
        recovery: Option<Duration>,
        drained: bool,
        status_wrong: usize,
        (cancelled, cancelled_started): (usize, usize),
        events_lost: usize,
        ticks: Ticks,
    ) -> Self {
        let count =
            |wanted: fn(&Outcome) -> bool| records.iter().filter(|r| wanted(&r.outcome)).count();
        Self {
            fault,
            sent: records.len(),
            ok: count(|o| matches!(o, Outcome::Ok(_))),
            fail: count(|o| matches!(o, Outcome::Fail)),
            unknown: count(|o| matches!(o, Outcome::Unknown)),
            completed: promised
                .iter()
                .filter(|id| completions.contains_key(id))
                .count(),
            lost: promised
                .iter()
                .filter(|id| !completions.contains_key(id))
                .count(),
            duplicates: completions.values().map(|n| n - 1).sum(),
            poison,
            dead_lettered,
            longest_wait: records.iter().map(|r| r.took).max().unwrap_or_default(),
            recovery,
            drained,
            status_wrong,
            cancelled,
            cancelled_started,
            events_lost,
            ticks,
        }
    }

    /// Whether the scenario kept the promise: nothing lost, every poison task dead-lettered,
    /// every status agrees with what happened, every tick fired once, every request answered
    /// within the confirm timeout, and, on a cluster, 202s back soon after the queue has a new
    /// leader.
    pub fn passed(&self) -> bool {
        self.lost == 0
            && self.ticks.kept()
            && self.cancelled_started == 0
            && self.drained
            && self.dead_lettered == self.poison
            && self.status_wrong == 0
            && self.longest_wait <= CONFIRM_TIMEOUT_SECS + ANSWER_SLACK
            && (!self.fault.on_cluster()
                || self
                    .recovery
                    .is_some_and(|recovery| recovery <= CLUSTER_RECOVERY))
    }
}

const HEADER: [&str; COLUMNS] = [
    "fault",
    "sent",
    "ok",
    "fail",
    "unknown",
    "completed",
    "lost",
    "dup",
    "dead-lettered",
    "cancelled (started)",
    "status wrong",
    "events lost (broker)",
    "ticks (missed, twice)",
    "longest wait",
    "recovery",
    "verdict",
];

const COLUMNS: usize = 16;

fn cells(row: &Row) -> [String; COLUMNS] {
    let millis = |d: Duration| format!("{} ms", d.as_millis());
    [
        row.fault.name().to_owned(),
        row.sent.to_string(),
        row.ok.to_string(),
        row.fail.to_string(),
        row.unknown.to_string(),
        row.completed.to_string(),
        row.lost.to_string(),
        row.duplicates.to_string(),
        format!("{} of {}", row.dead_lettered, row.poison),
        format!("{} ({})", row.cancelled, row.cancelled_started),
        row.status_wrong.to_string(),
        row.events_lost.to_string(),
        format!(
            "{} ({}, {})",
            row.ticks.expected,
            row.ticks.missed,
            row.ticks
                .twice
                .map_or_else(|| "?".to_owned(), |n| n.to_string())
        ),
        millis(row.longest_wait),
        row.recovery.map_or_else(|| "n/a".to_owned(), millis),
        if row.passed() { "ok" } else { "FAILED" }.to_owned(),
    ]
}

/// The rows as an aligned plain-text table, for the terminal.
pub fn table(rows: &[Row]) -> String {
    let cells: Vec<[String; COLUMNS]> = rows.iter().map(cells).collect();
    crate::table::text(HEADER, &cells, [Align::Right; COLUMNS])
}

/// The rows as a Markdown table, with a description column.
pub fn markdown(rows: &[Row]) -> String {
    let mut header = [""; COLUMNS + 1];
    header[..COLUMNS].copy_from_slice(&HEADER);
    header[COLUMNS] = "what is done";
    let cells: Vec<[String; COLUMNS + 1]> = rows
        .iter()
        .map(|row| {
            let mut out: [String; COLUMNS + 1] = Default::default();
            for (slot, cell) in out.iter_mut().zip(cells(row)) {
                *slot = cell;
            }
            row.fault.description().clone_into(&mut out[COLUMNS]);
            out
        })
        .collect();
    crate::table::markdown(header, &cells)
}
