//! Queues per kind: what spreading the same work over four kinds costs, side by side with one
//! kind in the same run: POST /tasks (one gateway, the same load) and a worker's drain of
//! HTTP-target tasks (the same worker, the same tasks in hand in all).

use std::path::Path;

use offload_bench::{
    broker::{self, BenchQueue},
    http,
    process::{self, Process},
    stats::{self, Line, percent, rate},
    target::Target,
};

use crate::{Args, DRAIN_DEADLINE, WORKER};

/// The four kinds the spread runs use; each has its queue in [`BenchQueue`].
const FOUR: [&str; 4] = ["http", "http2", "http3", "http4"];
/// Tasks in hand in all, one kind or four.
const IN_HAND: u16 = 100;

/// POST /tasks over four kinds against one kind, alternating, medians of `args.rounds`: the
/// gateway's CPU per 202 (from `/proc`, steadier than a rate on a shared machine) and the
/// rates.
pub(crate) async fn posts_over_kinds(
    args: &Args,
    url: &str,
    queue: &BenchQueue,
    gateway: &Process,
    tasks_url: &str,
) -> Result<Vec<Line>, lapin::Error> {
    let (mut four, mut one) = (Vec::new(), Vec::new());
    let (mut raw_four, mut raw_one) = (Vec::new(), Vec::new());
    let queues: Vec<String> = FOUR.iter().map(|kind| queue.kind_queue(kind)).collect();
    for round in 1..=args.rounds {
        eprintln!(
            "POST /tasks over four kinds and over one, round {round} of {} ...",
            args.rounds
        );
        for (queues, rates) in [(&queues[..], &mut raw_four), (&queues[..1], &mut raw_one)] {
            rates.push(
                broker::publish_ceiling_over(url, queues, args.connections, args.length)
                    .await?
                    .rate,
            );
            queue.purge().await?;
        }
        for (kinds, runs) in [(&FOUR[..], &mut four), (&FOUR[..1], &mut one)] {
            let before = gateway.cpu_time().unwrap_or_default();
            let began = std::time::Instant::now();
            let (rate, _) =
                http::throughput_of(tasks_url, None, args.connections, args.length, kinds).await;
            let cpu = gateway
                .cpu_time()
                .unwrap_or_default()
                .saturating_sub(before);
            // The rate is measured after a warm-up; the CPU over the whole run, warm-up
            // included: per 202, over the 202s of the whole run at the measured rate.
            let posts = rate * began.elapsed().as_secs_f64();
            runs.push((rate, cpu.as_secs_f64() * 1e6 / posts.max(1.0)));
            queue.purge().await?;
        }
    }
    let (four_cpu, one_cpu) = (
        stats::median_by(&four, |run| run.1),
        stats::median_by(&one, |run| run.1),
    );
    let (four_rate, one_rate) = (
        stats::median_by(&four, |run| run.0),
        stats::median_by(&one, |run| run.0),
    );
    Ok(vec![
        Line {
            measure: format!(
                "gateway CPU per POST /tasks spread over 4 kinds, against 1 kind, {} connections (median of {}; ratio: 1 kind's over 4 kinds')",
                args.connections, args.rounds
            ),
            offload: format!("{four_cpu:.1} µs"),
            ceiling: format!("{one_cpu:.1} µs"),
            ratio: percent(one_cpu / four_cpu),
            target: ">= 95%".into(),
            met: Some(one_cpu / four_cpu >= 0.95),
        },
        Line {
            ceiling: rate(one_rate),
            ratio: percent(four_rate / one_rate),
            ..Line::info("  the rates, 4 kinds against 1", rate(four_rate))
        },
        Line {
            ceiling: rate(stats::median(&mut raw_one)),
            ratio: percent(stats::median(&mut raw_four) / stats::median(&mut raw_one)),
            ..Line::info(
                "  the broker alone: raw lapin publishing to 4 queues against 1, confirmed",
                rate(stats::median(&mut raw_four)),
            )
        },
    ])
}

/// One worker draining HTTP-target tasks of four kinds against the same worker draining as
/// many of one kind, alternating, medians: with the same settings (PREFETCH 100, so 100 in
/// hand of each kind), and with the same tasks in hand in all (CONCURRENCY 25 of each).
pub(crate) async fn drain_over_kinds(
    args: &Args,
    url: &str,
    queue: &BenchQueue,
) -> Result<Vec<Line>, lapin::Error> {
    let target = Target::start().await;
    let targets = FOUR
        .iter()
        .map(|kind| format!("{kind}={}", target.url()))
        .collect::<Vec<_>>()
        .join(",");
    let each = IN_HAND / 4;
    let concurrency = FOUR
        .iter()
        .map(|kind| format!("{kind}={each}"))
        .collect::<Vec<_>>()
        .join(",");
    // One kind; four kinds at PREFETCH each; four kinds sharing PREFETCH.
    let runs: [(&[&str], Option<&str>); 3] = [
        (&FOUR[..1], None),
        (&FOUR[..], None),
        (&FOUR[..], Some(concurrency.as_str())),
    ];
    let mut rates = [Vec::new(), Vec::new(), Vec::new()];
    for round in 1..=args.rounds {
        eprintln!(
            "a worker draining {} tasks of one kind and of four, round {round} of {} ...",
            args.tasks, args.rounds
        );
        for ((kinds, limits), rates) in runs.iter().zip(&mut rates) {
            let count = args.tasks / kinds.len() as u64;
            for kind in *kinds {
                broker::fill(url, &queue.kind_queue(kind), kind, count).await?;
            }
            let mut env = vec![("TARGETS", targets.as_str())];
            env.extend(limits.map(|limits| ("CONCURRENCY", limits)));
            let worker =
                process::start_worker(Path::new(WORKER), url, queue.name(), (IN_HAND, false), &env);
            let total = count * kinds.len() as u64;
            let drained = worker.drained(total, DRAIN_DEADLINE).await;
            drop(worker);
            queue.purge().await?;
            rates.push(drained.map_or(0.0, |took| broker::per_second(total, took)));
        }
    }
    let [one, four, shared] = rates.map(|mut rates| stats::median(&mut rates));
    Ok(vec![
        Line {
            measure: format!(
                "a worker draining HTTP-target tasks of 4 kinds, against 1 kind, PREFETCH {IN_HAND} (so {IN_HAND} in hand of each kind), EVENTS=off (median of {})",
                args.rounds
            ),
            offload: rate(four),
            ceiling: rate(one),
            ratio: percent(four / one),
            target: ">= 90%".into(),
            met: Some(four / one >= 0.9),
        },
        Line {
            ceiling: rate(one),
            ratio: percent(shared / one),
            ..Line::info(
                format!(
                    "  the same with {IN_HAND} in hand in all (CONCURRENCY {each} of each kind)"
                ),
                rate(shared),
            )
        },
    ])
}
