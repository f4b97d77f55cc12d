//! HTTP-target tasks: a worker calling a target that answers at once, against both ceilings.

use std::{path::Path, time::Duration};

use offload_bench::{
    broker::{self, BenchQueue},
    process::{self},
    stats::{self, Line, percent, rate},
    target::Target,
};

use crate::{Args, DRAIN_DEADLINE, WORKER};

/// HTTP-target tasks: one worker at prefetch 100 calling a target that answers at once,
/// beside the target alone under 100 callers and the raw consume-and-ack ceiling (medians of
/// `args.rounds`); and the worker's memory with 1,000 calls in flight.
pub(crate) async fn http_targets(
    args: &Args,
    url: &str,
    queue: &BenchQueue,
) -> Result<Vec<Line>, lapin::Error> {
    const PREFETCH: u16 = 100;
    const HELD: u16 = 1000;
    let target = Target::start().await;
    let targets = format!("http={}", target.url());
    let env = [("TARGETS", targets.as_str())];
    let (mut raw, mut alone, mut offload, mut cpu) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for round in 1..=args.rounds {
        eprintln!(
            "HTTP targets, round {round} of {}: {} tasks ...",
            args.rounds, args.tasks
        );
        broker::fill(url, &queue.kind_queue("http"), "http", args.tasks).await?;
        raw.push(
            broker::drain_ceiling(url, &queue.kind_queue("http"), PREFETCH, args.tasks).await?,
        );
        alone.push(target.alone(usize::from(PREFETCH), args.length).await);
        broker::fill(url, &queue.kind_queue("http"), "http", args.tasks).await?;
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
        offload.push(drained.rate(args.tasks));
        cpu.push(drained.cpu_micros_per_task(args.tasks));
    }
    let (raw, alone, offload, cpu) = (
        stats::median(&mut raw),
        stats::median(&mut alone),
        stats::median(&mut offload),
        stats::median(&mut cpu),
    );
    let ceiling = raw.min(alone);
    // What a worker that cost nothing would reach, with the broker's side and the target's
    // side of each task sharing the machine's cores (on a 2-core machine they do).
    let shared = 1.0 / (1.0 / raw + 1.0 / alone);
    let mut lines = vec![
        Line {
            measure: format!(
                "HTTP-target tasks, one worker, prefetch {PREFETCH}, EVENTS=off (median of {}; ceiling: the lower of raw consume-and-ack {} and the target alone {})",
                args.rounds,
                rate(raw),
                rate(alone)
            ),
            offload: rate(offload),
            ceiling: rate(ceiling),
            ratio: percent(offload / ceiling),
            // The target is the next line's: on a machine the broker, the worker and the
            // target share, no worker can reach 70% of the lower ceiling (issue 22).
            target: String::new(),
            met: None,
        },
        Line {
            measure: "  the same, against both ceilings' costs added: 1 / (1/raw + 1/alone)".into(),
            offload: rate(offload),
            ceiling: rate(shared),
            ratio: percent(offload / shared),
            target: ">= 85%".into(),
            met: Some(offload / shared >= 0.85),
        },
        Line {
            measure: "  the worker's CPU per task over those drains (median)".into(),
            offload: format!("{cpu:.1} µs"),
            ceiling: String::new(),
            ratio: String::new(),
            target: String::new(),
            met: None,
        },
    ];

    eprintln!("HTTP targets: {HELD} calls in flight ...");
    target.hold(true);
    broker::fill(url, &queue.kind_queue("http"), "http", u64::from(HELD)).await?;
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

pub(crate) fn errors(errors: &std::collections::BTreeMap<String, u64>) -> String {
    if errors.is_empty() {
        return "0 errors".into();
    }
    let kinds: Vec<String> = errors.iter().map(|(k, n)| format!("{k}: {n}")).collect();
    format!("errors {}", kinds.join(", "))
}
