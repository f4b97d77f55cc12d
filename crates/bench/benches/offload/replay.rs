//! How fast a fresh gateway reads the events stream back (its replay at start).

use std::{path::Path, sync::Arc, time::Duration};

use offload_bench::{
    broker::{self, BenchQueue},
    free_port, http,
    process::{self},
    stats::{self, Line, rate},
};

use crate::{Args, GATEWAY};

/// A stream holding a million finished tasks: how long a fresh gateway takes to read it, its
/// memory per task once it has, its peak memory reading them with the default capacity, and
/// GET /tasks/{id} throughput against the sustained POST rate (`None`: not measured, with
/// `--only replay`).
pub(crate) async fn replay(
    args: &Args,
    url: &str,
    post_rate: Option<f64>,
) -> Result<Vec<Line>, lapin::Error> {
    const TASKS: usize = 1_000_000;
    let queue = BenchQueue::declare(url, "replay").await;
    let stream = queue
        .topology()
        .events_stream()
        .expect("the bench queue has the events stream");
    eprintln!("writing {TASKS} events to {stream} ...");
    let ids = broker::write_events(url, &stream, TASKS, 500).await?;

    // A gateway on an empty stream, for its baseline memory.
    let empty = BenchQueue::declare(url, "empty").await;
    let empty_port = free_port();
    let capacity = [("STATUS_CAPACITY", "1000000")];
    let baseline_gateway =
        process::start_gateway(Path::new(GATEWAY), url, empty.name(), empty_port, &capacity).await;
    let baseline = baseline_gateway.peak_rss().unwrap_or(0);
    drop(baseline_gateway);
    empty.delete();

    eprintln!("a fresh gateway reads {TASKS} events ...");
    let port = free_port();
    let started = std::time::Instant::now();
    let gateway =
        process::start_gateway(Path::new(GATEWAY), url, queue.name(), port, &capacity).await;
    let base = format!("http://127.0.0.1:{port}");
    let last = ids.last().copied().expect("events were written");
    let caught_up = http::wait_for_status(&base, last, Duration::from_secs(300)).await;
    let took = started.elapsed();
    let peak = gateway.peak_rss().unwrap_or(0);
    #[allow(clippy::cast_precision_loss)] // memory in bytes and a million tasks
    let per_task = peak.saturating_sub(baseline) as f64 / TASKS as f64;

    eprintln!("GET /tasks/{{id}} throughput ...");
    let (get_rate, get_errors) =
        http::status_throughput(&base, Arc::new(ids), args.connections, args.length).await;
    drop(gateway);

    // The same stream read by a gateway with the default STATUS_CAPACITY: it forgets nine
    // tasks in ten as it goes, so this is its view full and churning, alone.
    eprintln!("a fresh gateway with the default STATUS_CAPACITY reads {TASKS} events ...");
    let port = free_port();
    let gateway = process::start_gateway(Path::new(GATEWAY), url, queue.name(), port, &[]).await;
    let base = format!("http://127.0.0.1:{port}");
    let churned = http::wait_for_status(&base, last, Duration::from_secs(300)).await;
    let churned_peak = gateway.peak_rss().unwrap_or(0);
    drop(gateway);
    queue.delete();
    let mut lines = vec![
        Line::info(
            format!("a fresh gateway reads {TASKS} finished tasks from the stream"),
            if caught_up {
                format!("{:.1} s", took.as_secs_f64())
            } else {
                "did not catch up within 300 s".into()
            },
        ),
        Line::info(
            format!("  its memory per task remembered ({TASKS} tasks, STATUS_CAPACITY={TASKS})"),
            format!("{per_task:.0} B ({} in all)", stats::mib(peak)),
        ),
        Line {
            measure: format!(
                "  the same {TASKS} tasks read with the default STATUS_CAPACITY ({}): its peak memory",
                offload_api::DEFAULT_STATUS_CAPACITY
            ),
            offload: if churned {
                stats::mib(churned_peak)
            } else {
                "did not catch up within 300 s".into()
            },
            ceiling: String::new(),
            ratio: String::new(),
            target: "< 64 MiB".into(),
            met: Some(churned && churned_peak < 64 * 1024 * 1024),
        },
    ];
    let measure = format!(
        "GET /tasks/{{id}}, {} connections, against the sustained POST /tasks rate",
        args.connections
    );
    lines.push(match post_rate {
        Some(post_rate) => {
            let ratio = get_rate / post_rate;
            Line {
                measure,
                offload: rate(get_rate),
                ceiling: rate(post_rate),
                ratio: format!("{ratio:.1}x ({get_errors} other answers)"),
                target: ">= 2x".into(),
                met: Some(ratio >= 2.0),
            }
        }
        None => Line::info(
            measure,
            format!("{} ({get_errors} other answers)", rate(get_rate)),
        ),
    });
    Ok(lines)
}

/// A fresh gateway's memory per remembered task when every task's events carry the most a
/// writer can put in them (docs/SECURITY.md's "at most 2.5 KiB besides its result"): a
/// `queued` event with the longest kind, idempotency key and schedule name, and a `dead` event
/// with an error four times `ERROR_MAX_BYTES` and an over-long worker name, all of which the
/// gateway cuts as it reads them.
pub(crate) async fn worst_case_memory(url: &str) -> Result<Vec<Line>, lapin::Error> {
    const TASKS: usize = 50_000;
    let queue = BenchQueue::declare(url, "worst").await;
    let stream = queue
        .topology()
        .events_stream()
        .expect("the bench queue has the events stream");
    let kind = "k".repeat(64);
    let key = "i".repeat(255);
    let schedule = "s".repeat(300);
    let error = "e".repeat(4 * offload_common::text::ERROR_MAX_BYTES);
    let worker = "w".repeat(300);
    eprintln!("writing {TASKS} worst-case tasks to {stream} ...");
    // One task per stream message, so that what the gateway holds at its peak is its view,
    // not the messages in flight to it (FOLLOW_PREFETCH of them: a measure of its own).
    let ids = broker::write_events_with(url, &stream, TASKS, 1, |id| {
        let mut queued = offload_common::Event::task(offload_common::EventType::Queued, id, &kind);
        queued.submitted_at = Some(std::time::SystemTime::now());
        queued.idempotency_key = Some(key.clone());
        queued.idempotency_scope = Some("0".repeat(32));
        queued.request_digest = Some("f".repeat(32));
        queued.schedule = Some(schedule.clone());
        queued.tick = Some(std::time::SystemTime::now());
        queued.expires_at = Some(std::time::SystemTime::now());
        let mut dead = offload_common::Event::task(offload_common::EventType::Dead, id, &kind);
        dead.attempt = Some(u64::MAX);
        dead.reason = Some(offload_common::DeadReason::MaxAttempts);
        dead.error = Some(error.clone());
        dead.worker = Some(worker.clone());
        vec![queued, dead]
    })
    .await?;

    let empty = BenchQueue::declare(url, "worst-empty").await;
    let capacity = [("STATUS_CAPACITY", "100000")];
    let baseline_gateway = process::start_gateway(
        Path::new(GATEWAY),
        url,
        empty.name(),
        free_port(),
        &capacity,
    )
    .await;
    let baseline = baseline_gateway.peak_rss().unwrap_or(0);
    drop(baseline_gateway);
    empty.delete();

    let port = free_port();
    let gateway =
        process::start_gateway(Path::new(GATEWAY), url, queue.name(), port, &capacity).await;
    let base = format!("http://127.0.0.1:{port}");
    let last = ids.last().copied().expect("events were written");
    let caught_up = http::wait_for_status(&base, last, Duration::from_secs(300)).await;
    let peak = gateway.peak_rss().unwrap_or(0);
    drop(gateway);
    queue.delete();
    #[allow(clippy::cast_precision_loss)] // memory in bytes and tens of thousands of tasks
    let per_task = peak.saturating_sub(baseline) as f64 / TASKS as f64;
    Ok(vec![Line {
        measure: format!(
            "  its memory per task remembered, worst case ({TASKS} tasks: 4 KiB errors, the longest kind, key, schedule and worker)"
        ),
        offload: if caught_up {
            format!("{per_task:.0} B")
        } else {
            "did not catch up within 300 s".into()
        },
        ceiling: "2560 B".into(),
        ratio: format!("{:.2}", per_task / 2560.0),
        target: "<= 2.5 KiB (docs/SECURITY.md)".into(),
        met: Some(caught_up && per_task <= 2560.0),
    }])
}
