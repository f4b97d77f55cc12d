//! What cancels cost: a worker's drain with a control stream full of cancels against one with
//! none, and, given another build of offload (`--baseline`: the target directory of a release
//! build of another commit), this build's drain and POST /tasks against that build's, side by
//! side in one run, alternating.

use std::{
    path::{Path, PathBuf},
    time::Instant,
};

use offload_bench::{
    broker::{self, BenchQueue},
    free_port, http,
    process::{self, Process},
    stats::{self, Line, percent, rate},
};

use crate::{Args, DRAIN_DEADLINE, GATEWAY, WORKER};

/// Cancels of other tasks on the control stream for the "full" drain: about a day of a busy
/// deployment's, which every worker reads at its start and holds in memory.
const CANCELS: u64 = 100_000;
/// Tasks in hand: the drain of docs/PERFORMANCE.md at prefetch 100.
const PREFETCH: u16 = 100;

/// One drain: its rate, the worker's CPU per task (µs) from its first subscription on, and
/// the CPU it spent before (ms: its start, reading the control stream); its peak memory goes
/// to `peak`.
async fn drain_once(
    binary: &Path,
    url: &str,
    queue: &BenchQueue,
    (tasks, peak): (u64, &mut u64),
) -> Result<(f64, f64, f64), lapin::Error> {
    broker::fill(url, &queue.kind_queue("sleep"), "sleep", tasks).await?;
    let worker = process::start_worker(binary, url, queue.name(), (PREFETCH, true), &[]);
    let drained = worker.drained_with_cpu(tasks, DRAIN_DEADLINE).await;
    *peak = (*peak).max(worker.peak_rss().unwrap_or(0));
    drop(worker);
    queue.purge().await?;
    Ok((
        drained.rate(tasks),
        drained.cpu_micros_per_task(tasks),
        drained.cpu_before.as_secs_f64() * 1e3,
    ))
}

/// The drains, and with a baseline, POST /tasks of both builds.
pub(crate) async fn cancel_cost(
    args: &Args,
    url: &str,
    queue: &BenchQueue,
) -> Result<Vec<Line>, lapin::Error> {
    let full = BenchQueue::declare(url, "cancels").await;
    broker::fill_control(url, &full.topology().control_stream(), CANCELS).await?;
    let baseline_worker = args
        .baseline
        .as_ref()
        .map(|dir| dir.join("release/offload-worker-bench"));
    let mut runs: [Vec<(f64, f64, f64)>; 3] = Default::default();
    let mut peaks = [0_u64; 3];
    for round in 1..=args.rounds {
        eprintln!(
            "drains with and without {CANCELS} cancels on the control stream, round {round} of {} ...",
            args.rounds
        );
        let [empty, with_cancels, base] = &mut peaks;
        runs[0].push(drain_once(Path::new(WORKER), url, queue, (args.tasks, empty)).await?);
        runs[1].push(drain_once(Path::new(WORKER), url, &full, (args.tasks, with_cancels)).await?);
        if let Some(baseline) = &baseline_worker {
            runs[2].push(drain_once(baseline, url, queue, (args.tasks, base)).await?);
        }
    }
    full.delete();
    let (empty_cpu, full_cpu) = (
        stats::median_by(&runs[0], |r| r.1),
        stats::median_by(&runs[1], |r| r.1),
    );
    let (empty_start, full_start) = (
        stats::median_by(&runs[0], |r| r.2),
        stats::median_by(&runs[1], |r| r.2),
    );
    let mut lines = vec![
        Line {
            measure: format!(
                "worker CPU per task draining (from its first subscription), PREFETCH {PREFETCH}, EVENTS=on, {CANCELS} cancels of other tasks on the control stream against none (median of {}; ratio: none's over theirs)",
                args.rounds
            ),
            offload: format!("{full_cpu:.1} µs"),
            ceiling: format!("{empty_cpu:.1} µs"),
            ratio: percent(empty_cpu / full_cpu),
            target: ">= 95%".into(),
            met: Some(empty_cpu / full_cpu >= 0.95),
        },
        Line {
            ceiling: rate(stats::median_by(&runs[0], |r| r.0)),
            ratio: percent(
                stats::median_by(&runs[1], |r| r.0) / stats::median_by(&runs[0], |r| r.0),
            ),
            ..Line::info(
                "  the drain rates",
                rate(stats::median_by(&runs[1], |r| r.0)),
            )
        },
        Line {
            ceiling: format!("{empty_start:.0} ms"),
            ..Line::info(
                format!(
                    "  the worker's CPU before its first subscription (its start, reading the {CANCELS} cancels)"
                ),
                format!("{full_start:.0} ms"),
            )
        },
        Line {
            ceiling: stats::mib(peaks[0]),
            ..Line::info(
                format!("  the worker's peak memory, with {CANCELS} cancels and with none"),
                stats::mib(peaks[1]),
            )
        },
    ];
    if let Some(baseline) = &args.baseline {
        let base_cpu = stats::median_by(&runs[2], |r| r.1);
        lines.push(Line {
            measure: format!(
                "worker CPU per task draining, PREFETCH {PREFETCH}, EVENTS=on, this build against the baseline build (median of {}; ratio: the baseline's over this build's)",
                args.rounds
            ),
            offload: format!("{empty_cpu:.1} µs"),
            ceiling: format!("{base_cpu:.1} µs"),
            ratio: percent(base_cpu / empty_cpu),
            target: String::new(),
            met: None,
        });
        lines.push(Line {
            ceiling: rate(stats::median_by(&runs[2], |r| r.0)),
            ratio: percent(
                stats::median_by(&runs[0], |r| r.0) / stats::median_by(&runs[2], |r| r.0),
            ),
            ..Line::info(
                "  the drain rates",
                rate(stats::median_by(&runs[0], |r| r.0)),
            )
        });
        lines.extend(posts_against(args, url, queue, baseline).await?);
    }
    Ok(lines)
}

/// POST /tasks on this build's gateway and on the baseline's, alternating: CPU per 202 and
/// rates.
pub(crate) async fn posts_against(
    args: &Args,
    url: &str,
    queue: &BenchQueue,
    baseline: &Path,
) -> Result<Vec<Line>, lapin::Error> {
    let binaries: [PathBuf; 2] = [
        PathBuf::from(GATEWAY),
        baseline.join("release/offload-api-bench"),
    ];
    let mut gateways: Vec<(Process, String)> = Vec::new();
    for binary in &binaries {
        let port = free_port();
        let gateway = process::start_gateway(binary, url, queue.name(), port, &[]).await;
        gateways.push((gateway, format!("http://127.0.0.1:{port}/tasks")));
    }
    let mut runs: [Vec<(f64, f64)>; 2] = Default::default();
    for round in 1..=args.rounds {
        eprintln!(
            "POST /tasks, this build and the baseline, round {round} of {} ...",
            args.rounds
        );
        for ((gateway, tasks_url), runs) in gateways.iter().zip(&mut runs) {
            let before = gateway.cpu_time().unwrap_or_default();
            let began = Instant::now();
            let (rate, _) =
                http::throughput_of(tasks_url, None, args.connections, args.length, &["sleep"])
                    .await;
            let cpu = gateway
                .cpu_time()
                .unwrap_or_default()
                .saturating_sub(before);
            let posts = rate * began.elapsed().as_secs_f64();
            runs.push((rate, cpu.as_secs_f64() * 1e6 / posts.max(1.0)));
            queue.purge().await?;
        }
    }
    let (this_cpu, base_cpu) = (
        stats::median_by(&runs[0], |r| r.1),
        stats::median_by(&runs[1], |r| r.1),
    );
    Ok(vec![
        Line {
            measure: format!(
                "gateway CPU per POST /tasks, this build against the baseline build, {} connections (median of {}; ratio: the baseline's over this build's)",
                args.connections, args.rounds
            ),
            offload: format!("{this_cpu:.1} µs"),
            ceiling: format!("{base_cpu:.1} µs"),
            ratio: percent(base_cpu / this_cpu),
            target: String::new(),
            met: None,
        },
        Line {
            ceiling: rate(stats::median_by(&runs[1], |r| r.0)),
            ratio: percent(
                stats::median_by(&runs[0], |r| r.0) / stats::median_by(&runs[1], |r| r.0),
            ),
            ..Line::info("  the rates", rate(stats::median_by(&runs[0], |r| r.0)))
        },
    ])
}
