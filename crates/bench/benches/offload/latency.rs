//! Open-loop latency of POST /tasks at shares of the sustained rate, 202-to-start end to
//! end, and how late tasks posted with a delay start.

use std::{
    collections::HashMap,
    path::Path,
    time::{Duration, SystemTime},
};

use offload_bench::{
    broker::{self, BenchQueue},
    http, process,
    stats::{Line, millis, percent, percentile, rate},
};
use offload_common::EventType;
use offload_tests::EventLog;

use crate::{Args, DRAIN_DEADLINE, GATEWAY, WORKER, targets::errors};

/// Open-loop latency at each of `shares` of the sustained rate, on a gateway (with `env`) and
/// a queue of their own ([`latency`] says why), deleted afterwards.
pub(crate) async fn latencies(
    args: &Args,
    url: &str,
    sustained: f64,
    shares: &[f64],
    env: &[(&str, &str)],
) -> Result<Vec<Line>, lapin::Error> {
    let queue = BenchQueue::declare(url, "latency").await;
    let port = offload_bench::free_port();
    let gateway = process::start_gateway(Path::new(GATEWAY), url, queue.name(), port, env).await;
    http::wait_until_live(
        &format!("http://127.0.0.1:{port}"),
        None,
        Duration::from_secs(300),
    )
    .await;
    let tasks_url = format!("http://127.0.0.1:{port}/tasks");
    let mut lines = Vec::new();
    for share in shares {
        lines.push(latency(args, url, &queue, &tasks_url, sustained, *share).await?);
    }
    drop(gateway);
    queue.delete();
    Ok(lines)
}

/// Open-loop latency at `share` of the sustained rate; at half of it, beside raw lapin
/// publishing open loop at the same rate (what the broker and this machine allow). `queue`
/// is the latency runs' own, never purged between them: a quorum queue just purged of a run's
/// tasks keeps RabbitMQ busy for a while, and a measurement right after one read a p99 of
/// 90-145 ms where the same gateway on a queue of its own read 5-7 ms (docs/PERFORMANCE.md).
async fn latency(
    args: &Args,
    url: &str,
    queue: &BenchQueue,
    tasks_url: &str,
    sustained: f64,
    share: f64,
) -> Result<Line, lapin::Error> {
    let offered = sustained * share;
    let at_half = (share - 0.5).abs() < f64::EPSILON;
    let mut raw = if at_half {
        eprintln!("raw publishing latency at {} ...", rate(offered));
        broker::publish_open_loop(
            url,
            &queue.kind_queue("sleep"),
            offered,
            args.length,
            args.connections,
        )
        .await?
    } else {
        Vec::new()
    };
    eprintln!("latency at {} ...", rate(offered));
    let mut run = http::open_loop(tasks_url, offered, args.length, args.connections).await;
    let quantiles = |latencies: &mut [Duration], ps: &[f64]| {
        ps.iter()
            .map(|p| percentile(latencies, *p).map_or("-".into(), millis))
            .collect::<Vec<_>>()
            .join(" / ")
    };
    let p99 = percentile(&mut run.latencies, 99.0);
    let p999 = percentile(&mut run.latencies, 99.9);
    Ok(Line {
        measure: format!(
            "latency at {} ({} of sustained): p50 / p99 / p99.9{}",
            rate(offered),
            percent(share),
            if at_half {
                "; ceiling: raw lapin publishing at that rate"
            } else {
                ""
            }
        ),
        offload: quantiles(&mut run.latencies, &[50.0, 99.0, 99.9]),
        ceiling: quantiles(&mut raw, &[50.0, 99.0, 99.9]),
        ratio: errors(&run.errors),
        target: if at_half {
            "p99 < 10 ms, p99.9 < 25 ms"
        } else {
            ""
        }
        .into(),
        met: at_half.then(|| {
            p99.is_some_and(|p| p < Duration::from_millis(10))
                && p999.is_some_and(|p| p < Duration::from_millis(25))
        }),
    })
}

/// 202 to "task started", with one worker at the default prefetch; and the worker's peak
/// memory.
pub(crate) async fn end_to_end(
    args: &Args,
    url: &str,
    queue: &BenchQueue,
    tasks_url: &str,
    offered: f64,
) -> (Option<Line>, u64) {
    eprintln!("end to end at {}: 202 to task started ...", rate(offered));
    let worker = process::start_worker(Path::new(WORKER), url, queue.name(), (1, true), &[]);
    let run = http::open_loop(tasks_url, offered, args.length, args.connections).await;
    let accepted = u64::try_from(run.accepted.len()).unwrap_or(u64::MAX);
    let line = match worker.drained(accepted, DRAIN_DEADLINE).await {
        Some(_) => {
            let events = EventLog::follow(url, queue.name());
            events.sync().await;
            let mut gaps = gaps(&run.accepted, &starts(&events));
            #[allow(clippy::cast_precision_loss)] // counts of a few thousand
            let early =
                gaps.iter().filter(|gap| gap.is_zero()).count() as f64 / gaps.len().max(1) as f64;
            Some(Line {
                ratio: format!("{} started before their 202 arrived", percent(early)),
                ..Line::info(
                    format!("202 to task started at {}: p50 / p99", rate(offered)),
                    [50.0, 99.0]
                        .map(|p| percentile(&mut gaps, p).map_or("-".into(), millis))
                        .join(" / "),
                )
            })
        }
        None => None,
    };
    (line, worker.peak_rss().unwrap_or(0))
}

/// Tasks asked for in [`SCHEDULED_DELAY`], submitted while plain tasks load the gateway and
/// a worker at `offered` per second: how late each starts after the `run_at` its 202 gave.
pub(crate) async fn scheduled(
    args: &Args,
    url: &str,
    queue: &BenchQueue,
    tasks_url: &str,
    offered: f64,
) -> Option<Line> {
    const COUNT: usize = 40;
    eprintln!(
        "{COUNT} tasks scheduled {} ahead, under load at {} ...",
        humantime::format_duration(SCHEDULED_DELAY),
        rate(offered)
    );
    let _worker = process::start_worker(Path::new(WORKER), url, queue.name(), (1, true), &[]);
    // Plain tasks throughout, until the scheduled ones are due and a little after.
    let (load_url, connections) = (tasks_url.to_owned(), args.connections);
    let load = tokio::spawn(async move {
        http::open_loop(
            &load_url,
            offered,
            SCHEDULED_DELAY + Duration::from_secs(4),
            connections,
        )
        .await
    });
    let client = reqwest::Client::new();
    let mut due = Vec::new();
    for _ in 0..COUNT {
        let response = client
            .post(tasks_url)
            .json(&serde_json::json!({
                "kind": "sleep",
                "delay": humantime::format_duration(SCHEDULED_DELAY).to_string(),
            }))
            .send()
            .await
            .ok()?;
        let body: serde_json::Value = response.json().await.ok()?;
        let id: uuid::Uuid = body["id"].as_str()?.parse().ok()?;
        let run_at = humantime::parse_rfc3339(body["run_at"].as_str()?).ok()?;
        due.push((id, run_at));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = load.await;
    let events = EventLog::follow(url, queue.name());
    let deadline = std::time::Instant::now() + DRAIN_DEADLINE;
    let started = loop {
        let started = starts(&events);
        if due.iter().all(|(id, _)| started.contains_key(id)) {
            break started;
        }
        if std::time::Instant::now() > deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let early = due
        .iter()
        .filter(|(id, run_at)| started[id] < *run_at)
        .count();
    let mut late: Vec<Duration> = due
        .iter()
        .filter_map(|(id, run_at)| started[id].duration_since(*run_at).ok())
        .collect();
    let p99 = percentile(&mut late, 99.0);
    Some(Line {
        ratio: format!("{early} early"),
        target: "0 early, p99 < 1.5 s".into(),
        met: Some(early == 0 && p99.is_some_and(|p99| p99 < Duration::from_millis(1_500))),
        ..Line::info(
            format!(
                "task scheduled {} ahead, under load at {}: start after run_at, p50 / p99 / max",
                humantime::format_duration(SCHEDULED_DELAY),
                rate(offered)
            ),
            [50.0, 99.0, 100.0]
                .map(|p| percentile(&mut late, p).map_or("-".into(), millis))
                .join(" / "),
        )
    })
}

/// How far ahead the benchmark schedules tasks.
pub(crate) const SCHEDULED_DELAY: Duration = Duration::from_secs(10);

/// When each task's (last) attempt started, from the `started` events read so far off the
/// queue's stream. The stream is read after a run, not during it: a reader would load the
/// broker being measured.
fn starts(events: &EventLog) -> HashMap<uuid::Uuid, SystemTime> {
    events
        .events()
        .into_iter()
        .filter(|event| event.event == EventType::Started)
        .filter_map(|event| Some((event.id?, event.at)))
        .collect()
}

/// For each accepted task the worker started, how long after its 202 it started (zero when
/// the worker was first: the broker delivers as soon as the message is queued, and the
/// confirm can reach the gateway after the delivery reaches the worker).
pub(crate) fn gaps(
    accepted: &[(uuid::Uuid, SystemTime)],
    started: &HashMap<uuid::Uuid, SystemTime>,
) -> Vec<Duration> {
    accepted
        .iter()
        .filter_map(|(id, at)| {
            let began = started.get(id)?;
            Some(began.duration_since(*at).unwrap_or(Duration::ZERO))
        })
        .collect()
}
