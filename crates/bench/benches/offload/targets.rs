//! HTTP-target tasks: a worker calling a target that answers at once, against both ceilings.

use std::{path::Path, time::Duration};

use offload_bench::{
    broker::{self, BenchQueue},
    process::{self},
    stats::{self, Line, percent, rate},
    target::Target,
};

use crate::{Args, DRAIN_DEADLINE, TARGET_FLOOR, WORKER};

/// The medians of the HTTP-target drains' rounds.
struct Drains {
    /// Raw lapin consume-and-ack, tasks per second.
    raw: f64,
    /// The target alone under as many callers as the prefetch, calls per second.
    alone: f64,
    /// `target-floor`: tasks per second, and its CPU per task in microseconds.
    floor: (f64, f64),
    /// The worker: tasks per second, and its CPU per task in microseconds.
    offload: (f64, f64),
}

/// At what prefetch the drains run.
const PREFETCH: u16 = 100;

/// HTTP-target tasks: one worker at prefetch 100 calling a target that answers at once,
/// beside the target alone under 100 callers, the raw consume-and-ack ceiling and the floor
/// (`target-floor`: lapin and reqwest, nothing else), medians of `args.rounds`; and the
/// worker's memory with 1,000 calls in flight.
pub(crate) async fn http_targets(
    args: &Args,
    url: &str,
    queue: &BenchQueue,
) -> Result<Vec<Line>, Box<dyn std::error::Error>> {
    const HELD: u16 = 1000;
    let target = Target::start().await;
    let targets = format!("http={}", target.url());
    let env = [("TARGETS", targets.as_str())];
    let kind_queue = queue.kind_queue("http");
    let (mut raw, mut alone, mut floor, mut offload) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for round in 1..=args.rounds {
        eprintln!(
            "HTTP targets, round {round} of {}: {} tasks ...",
            args.rounds, args.tasks
        );
        broker::fill(url, &kind_queue, "http", args.tasks).await?;
        raw.push(broker::drain_ceiling(url, &kind_queue, PREFETCH, args.tasks).await?);
        alone.push(target.alone(usize::from(PREFETCH), args.length).await);
        broker::fill(url, &kind_queue, "http", args.tasks).await?;
        floor.push(target_floor(url, &kind_queue, target.url(), args.tasks).await?);
        broker::fill(url, &kind_queue, "http", args.tasks).await?;
        let worker = process::start_worker(
            Path::new(WORKER),
            url,
            queue.name(),
            (PREFETCH, false),
            &env,
        );
        let drained = worker.drained_with_cpu(args.tasks, DRAIN_DEADLINE).await;
        drop(worker);
        queue.purge().await?;
        offload.push((
            drained.rate(args.tasks),
            drained.cpu_micros_per_task(args.tasks),
        ));
    }
    let drains = Drains {
        raw: stats::median(&mut raw),
        alone: stats::median(&mut alone),
        floor: (
            stats::median_by(&floor, |floor| floor.0),
            stats::median_by(&floor, |floor| floor.1),
        ),
        offload: (
            stats::median_by(&offload, |offload| offload.0),
            stats::median_by(&offload, |offload| offload.1),
        ),
    };
    let mut lines = drains.lines(args.rounds);

    eprintln!("HTTP targets: {HELD} calls in flight ...");
    target.hold(true);
    broker::fill(url, &kind_queue, "http", u64::from(HELD)).await?;
    let worker = process::start_worker(Path::new(WORKER), url, queue.name(), (HELD, false), &env);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while target.in_flight() < u64::from(HELD) && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let in_flight = target.in_flight();
    let peak = worker.peak_rss().unwrap_or(0);
    target.hold(false);
    let _ = worker.drained(u64::from(HELD), DRAIN_DEADLINE).await;
    drop(worker);
    queue.purge().await?;
    lines.push(Line {
        measure: format!("worker peak resident memory, {in_flight} HTTP calls in flight"),
        offload: stats::mib(peak),
        ceiling: String::new(),
        ratio: String::new(),
        target: "< 64 MiB".into(),
        met: Some(in_flight == u64::from(HELD) && peak < 64 * 1024 * 1024),
    });
    Ok(lines)
}

impl Drains {
    /// The report's lines about them.
    fn lines(&self, rounds: u32) -> Vec<Line> {
        let (raw, alone) = (self.raw, self.alone);
        let ((offload, cpu), (floor, floor_cpu)) = (self.offload, self.floor);
        let ceiling = raw.min(alone);
        // What a worker that cost nothing would reach, with the broker's side and the
        // target's side of each task sharing the machine's cores (on a 2-core machine they
        // do).
        let shared = 1.0 / (1.0 / raw + 1.0 / alone);
        vec![
            Line::beside(
                format!(
                    "HTTP-target tasks, one worker, prefetch {PREFETCH}, EVENTS=off (median of {rounds}; ceiling: the lower of raw consume-and-ack {} and the target alone {})",
                    rate(raw),
                    rate(alone)
                ),
                rate(offload),
                rate(ceiling),
                // The target is the next line's: on a machine the broker, the worker and
                // the target share, no worker can reach 70% of the lower ceiling (issue 22).
                percent(offload / ceiling),
            ),
            Line {
                measure: "  the same, against both ceilings' costs added: 1 / (1/raw + 1/alone)"
                    .into(),
                offload: rate(offload),
                ceiling: rate(shared),
                ratio: percent(offload / shared),
                target: ">= 85%".into(),
                met: Some(offload / shared >= 0.85),
            },
            Line::beside(
                "  the same, against the floor: lapin consuming and reqwest calling, nothing else (target-floor)",
                rate(offload),
                rate(floor),
                percent(offload / floor),
            ),
            Line::beside(
                "  the floor against the bound: what lapin, reqwest and the kernel leave on a shared machine",
                rate(floor),
                rate(shared),
                percent(floor / shared),
            ),
            Line::beside(
                "  CPU per task over those drains (median): the worker's; the floor's",
                format!("{cpu:.1} µs"),
                format!("{floor_cpu:.1} µs"),
                format!("{:.2}x", cpu / floor_cpu),
            ),
        ]
    }
}

/// Drains `count` tasks from `queue` with `target-floor` at [`PREFETCH`], calling `target`:
/// its tasks per second and CPU per task in microseconds.
async fn target_floor(
    url: &str,
    queue: &str,
    target: &str,
    count: u64,
) -> Result<(f64, f64), Box<dyn std::error::Error>> {
    // Awaited, not waited on: the target answers from this process's runtime meanwhile.
    let output = tokio::process::Command::new(TARGET_FLOOR)
        .args([
            url,
            queue,
            target,
            &PREFETCH.to_string(),
            &count.to_string(),
        ])
        .stderr(std::process::Stdio::inherit())
        .output()
        .await?;
    let text = String::from_utf8_lossy(&output.stdout);
    let mut figures = text.split_whitespace().map(str::parse::<f64>);
    match (output.status.success(), figures.next(), figures.next()) {
        (true, Some(Ok(rate)), Some(Ok(cpu))) => Ok((rate, cpu)),
        _ => Err(format!("target-floor failed ({}): {text}", output.status).into()),
    }
}

pub(crate) fn errors(errors: &std::collections::BTreeMap<String, u64>) -> String {
    if errors.is_empty() {
        return "0 errors".into();
    }
    let kinds: Vec<String> = errors.iter().map(|(k, n)| format!("{k}: {n}")).collect();
    format!("errors {}", kinds.join(", "))
}
