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
/// memory per task once it has, and GET /tasks/{id} throughput against the sustained POST
/// rate.
pub(crate) async fn replay(
    args: &Args,
    url: &str,
    post_rate: f64,
) -> Result<Vec<Line>, lapin::Error> {
    const TASKS: usize = 1_000_000;
    let queue = BenchQueue::declare(url, "replay").await?;
    let stream = queue
        .topology
        .events_stream()
        .expect("the bench queue has the events stream");
    eprintln!("writing {TASKS} events to {stream} ...");
    let ids = broker::write_events(url, &stream, TASKS, 500).await?;

    // A gateway on an empty stream, for its baseline memory.
    let empty = BenchQueue::declare(url, "empty").await?;
    let empty_port = free_port();
    let capacity = [("STATUS_CAPACITY", "1000000")];
    let baseline_gateway =
        process::start_gateway(Path::new(GATEWAY), url, empty.name(), empty_port, &capacity).await;
    let baseline = baseline_gateway.peak_rss().unwrap_or(0);
    drop(baseline_gateway);
    empty.delete().await;

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
    queue.delete().await;
    let ratio = get_rate / post_rate;
    Ok(vec![
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
                "GET /tasks/{{id}}, {} connections, against the sustained POST /tasks rate",
                args.connections
            ),
            offload: rate(get_rate),
            ceiling: rate(post_rate),
            ratio: format!("{ratio:.1}x ({get_errors} other answers)"),
            target: ">= 2x".into(),
            met: Some(ratio >= 2.0),
        },
    ])
}
