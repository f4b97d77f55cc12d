//! Drains: a worker emptying a queue of zero-work tasks, against raw lapin consume-and-ack.

use std::{path::Path, time::Duration};

use offload_bench::{
    broker::{self, BenchQueue},
    process::{self, Worker},
    stats::{self, Line, percent, rate},
};

use crate::{Args, DRAIN_DEADLINE, WORKER};

/// `args.tasks` zero-work tasks drained by raw lapin, then by a worker process, at
/// `prefetch`, with lifecycle events on or off, `args.rounds` times alternating; the medians,
/// the worker's median rate and its peak memory. At prefetch 100 with events, also raw lapin
/// writing the same events as the worker would ([`broker::drain_ceiling_with_events`]).
pub(crate) async fn drain(
    args: &Args,
    url: &str,
    queue: &BenchQueue,
    prefetch: u16,
    events: bool,
) -> Result<(Vec<Line>, f64, u64), lapin::Error> {
    let (mut raw, mut offload, mut peak) = (Vec::new(), Vec::new(), 0);
    let stream = queue
        .topology()
        .events_stream()
        .filter(|_| events && prefetch > 1);
    let mut raw_with_events = Vec::new();
    for round in 1..=args.rounds {
        eprintln!(
            "drain at prefetch {prefetch}, round {round} of {}: {} tasks ...",
            args.rounds, args.tasks
        );
        broker::fill(url, &queue.kind_queue("sleep"), "sleep", args.tasks).await?;
        raw.push(
            broker::drain_ceiling(url, &queue.kind_queue("sleep"), prefetch, args.tasks).await?,
        );
        if let Some(stream) = &stream {
            broker::fill(url, &queue.kind_queue("sleep"), "sleep", args.tasks).await?;
            raw_with_events.push(
                broker::drain_ceiling_with_events(
                    url,
                    &queue.kind_queue("sleep"),
                    stream,
                    prefetch,
                    args.tasks,
                )
                .await?,
            );
        }
        broker::fill(url, &queue.kind_queue("sleep"), "sleep", args.tasks).await?;
        let (worker, drained) =
            drain_with_worker(url, queue.name(), (prefetch, events), &[], args.tasks).await;
        peak = peak.max(worker.peak_rss().unwrap_or(0));
        drop(worker);
        queue.purge().await?;
        offload.push(drained.map_or(0.0, |took| broker::per_second(args.tasks, took)));
    }
    let (raw, offload) = (stats::median(&mut raw), stats::median(&mut offload));
    // With events, every attempt waits for its event's confirm before its ack: at prefetch 1
    // that is one more round trip per task, which no target is set for. At prefetch 100 the
    // confirms are shared by many tasks: 80% of raw (issue 22).
    let target = match (prefetch, events) {
        (1, false) => Some(0.9),
        (1, true) => None,
        (_, false | true) => Some(0.8),
    };
    let line = Line {
        measure: format!(
            "drain, one worker, prefetch {prefetch}, EVENTS={} (median of {})",
            if events { "on" } else { "off" },
            args.rounds
        ),
        offload: rate(offload),
        ceiling: rate(raw),
        ratio: percent(offload / raw),
        target: target.map_or_else(String::new, |t| format!(">= {}", percent(t))),
        met: target.map(|t| offload / raw >= t),
    };
    let mut lines = vec![line];
    if !raw_with_events.is_empty() {
        let with_events = stats::median(&mut raw_with_events);
        lines.push(Line {
            measure: format!(
                "  the same, against raw consume-and-ack writing the same events (confirm before ack), which reached {} of raw",
                percent(with_events / raw)
            ),
            offload: rate(offload),
            ceiling: rate(with_events),
            ratio: percent(offload / with_events),
            target: String::new(),
            met: None,
        });
    }
    Ok((lines, offload, peak))
}

/// A worker at `prefetch` drains `tasks` already queued; the time from its subscription to
/// its last completion.
pub(crate) async fn drain_with_worker(
    url: &str,
    queue: &str,
    (prefetch, events): (u16, bool),
    env: &[(&str, &str)],
    tasks: u64,
) -> (Worker, Option<Duration>) {
    let worker = process::start_worker(Path::new(WORKER), url, queue, (prefetch, events), env);
    let drained = worker.drained(tasks, DRAIN_DEADLINE).await;
    (worker, drained)
}
