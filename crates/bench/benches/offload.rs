//! `cargo bench -p offload-bench`: offload against raw lapin on the same broker, in one run.
//! Prints one table and writes `docs/PERFORMANCE.md`.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

use clap::Parser;
use offload_bench::{
    amqp_url,
    broker::{self, BenchQueue},
    free_port, http,
    process::{self, Process},
    slow::{self, Attack},
    stats::{self, Line, millis, percent, percentile, rate},
    target::Target,
};

/// The benchmark. Every figure is measured beside its ceiling in the same run.
#[derive(Debug, Parser)]
#[command(name = "offload-bench")]
#[allow(clippy::struct_excessive_bools)] // command-line switches, each its own flag
struct Args {
    /// How long each throughput and latency measurement runs (after a warm-up of a fifth).
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    length: Duration,

    /// Concurrent HTTP connections, and publishes in flight for the ceiling.
    #[arg(long, default_value_t = 64)]
    connections: usize,

    /// Zero-work tasks queued for each drain measurement.
    #[arg(long, default_value_t = 10_000)]
    tasks: u64,

    /// Throughput and drain measurements alternate the ceiling and offload this many times;
    /// medians are reported.
    #[arg(long, default_value_t = 3)]
    rounds: u32,

    /// Where to write the report; `-` writes none.
    #[arg(long, default_value_os_t = default_report())]
    write: PathBuf,

    /// Measure only the drains (quick, when working on the worker); writes no report.
    #[arg(long)]
    drain_only: bool,

    /// Measure only POST /tasks throughput (quick, when working on the gateway); writes no
    /// report.
    #[arg(long, conflicts_with = "drain_only")]
    publish_only: bool,

    /// Measure only HTTP-target tasks (quick, when working on targets); writes no report.
    #[arg(long, conflicts_with_all = ["drain_only", "publish_only"])]
    targets_only: bool,

    /// Measure only what exporting spans costs (POST /tasks and the drain); writes no report.
    #[arg(long, conflicts_with_all = ["drain_only", "publish_only", "targets_only"])]
    traces_only: bool,

    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

fn default_report() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .expect("the bench crate lives in crates/ of the workspace")
        .join("docs/PERFORMANCE.md")
}

const GATEWAY: &str = env!("CARGO_BIN_EXE_offload-api-bench");
const WORKER: &str = env!("CARGO_BIN_EXE_offload-worker-bench");
const DRAIN_DEADLINE: Duration = Duration::from_secs(300);

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let url = amqp_url();
    let queue = BenchQueue::declare(&url, "run").await?;
    let mut lines = Vec::new();
    if args.targets_only || args.traces_only {
        if args.targets_only {
            lines.extend(http_targets(&args, &url, &queue).await?);
        } else {
            lines.push(tracing_cost(&args, &url, &queue).await?);
            lines.push(drain_tracing_cost(&args, &url, &queue).await?);
        }
        queue.delete().await;
        println!("{}", stats::table(&lines));
        return Ok(());
    }

    // Drains first: the end-to-end measure runs at a rate one worker can keep up with.
    let mut worker_peak = 0;
    let mut drain_rates = Vec::new();
    let drains = [(1, false), (1, true), (100, false), (100, true)];
    for (prefetch, events) in drains.into_iter().filter(|_| !args.publish_only) {
        let (drain_lines, offload_rate, peak) =
            drain(&args, &url, &queue, prefetch, events).await?;
        lines.extend(drain_lines);
        drain_rates.push(offload_rate);
        worker_peak = worker_peak.max(peak);
    }
    if !args.publish_only {
        lines.push(drain_tracing_cost(&args, &url, &queue).await?);
    }
    if args.drain_only {
        queue.delete().await;
        println!("{}", stats::table(&lines));
        return Ok(());
    }

    let port = free_port();
    let gateway = process::start_gateway(Path::new(GATEWAY), &url, queue.name(), port, &[]).await;
    let tasks_url = format!("http://127.0.0.1:{port}/tasks");
    let sustained = throughput(&args, &url, &queue, &tasks_url, &mut lines).await?;
    lines.push(events_cost(&args, &url, &queue, &tasks_url).await?);
    lines.extend(replay(&args, &url, sustained).await?);
    lines.push(hardening(&args, &url, &queue).await?);
    lines.push(metrics_cost(&args, &url, &queue).await?);
    lines.push(tracing_cost(&args, &url, &queue).await?);
    lines.extend(slow_clients(&url, &queue).await);
    if args.publish_only {
        queue.delete().await;
        lines.extend(memory(gateway.peak_rss().unwrap_or(0), None));
        println!("{}", stats::table(&lines));
        return Ok(());
    }
    for share in [0.25, 0.5, 0.75] {
        lines.push(latency(&args, &queue, &tasks_url, sustained, share).await?);
    }
    // Moderate: a quarter of what one worker at the default prefetch drains alone (it
    // shares the two cores with the gateway and the load here).
    // drain_rates[1]: prefetch 1 with events on, as the worker runs by default.
    let (e2e, peak) = end_to_end(&args, &url, &queue, &tasks_url, drain_rates[1] / 4.0).await;
    lines.extend(e2e);
    worker_peak = worker_peak.max(peak);
    lines.extend(scheduled(&args, &url, &queue, &tasks_url, drain_rates[1] / 4.0).await);
    lines.extend(http_targets(&args, &url, &queue).await?);
    let gateway_peak = gateway.peak_rss().unwrap_or(0);
    drop(gateway);
    queue.delete().await;
    lines.extend(memory(gateway_peak, Some(worker_peak)));

    println!("{}", stats::table(&lines));
    if args.write.as_os_str() != "-" {
        std::fs::write(&args.write, report(&lines, &args))?;
        println!("report written to {}", args.write.display());
    }
    Ok(())
}

/// The raw publish ceiling and the gateway closed-loop, `args.rounds` times alternating;
/// returns the gateway's median rate.
async fn throughput(
    args: &Args,
    url: &str,
    queue: &BenchQueue,
    tasks_url: &str,
    lines: &mut Vec<Line>,
) -> Result<f64, lapin::Error> {
    let (mut ceilings, mut sustained, mut errors) = (Vec::new(), Vec::new(), 0);
    for round in 1..=args.rounds {
        eprintln!(
            "publish ceiling and POST /tasks, {} in flight, round {round} of {} ...",
            args.connections, args.rounds
        );
        ceilings
            .push(broker::publish_ceiling(url, queue.name(), args.connections, args.length).await?);
        queue.purge().await?;
        let (rate, failed) = http::throughput(tasks_url, None, args.connections, args.length).await;
        sustained.push(rate);
        errors += failed;
        queue.purge().await?;
    }
    let (ceiling, sustained) = (stats::median(&mut ceilings), stats::median(&mut sustained));
    let fraction = sustained / ceiling;
    lines.push(Line {
        measure: format!(
            "POST /tasks, {} connections (median of {})",
            args.connections, args.rounds
        ),
        offload: rate(sustained),
        ceiling: rate(ceiling),
        ratio: percent(fraction),
        target: ">= 60%".into(),
        met: Some(fraction >= 0.6),
    });
    lines.push(Line::info("  answers other than 202", errors.to_string()));
    Ok(sustained)
}

/// The cost of lifecycle events on POST /tasks: the default gateway (events on) against one
/// with EVENTS=off, alternating; the medians.
async fn events_cost(
    args: &Args,
    url: &str,
    queue: &BenchQueue,
    tasks_url: &str,
) -> Result<Line, lapin::Error> {
    let off_port = free_port();
    let _off = process::start_gateway(
        Path::new(GATEWAY),
        url,
        queue.name(),
        off_port,
        &[("EVENTS", "off")],
    )
    .await;
    http::wait_until_live(
        &format!("http://127.0.0.1:{off_port}"),
        None,
        Duration::from_secs(300),
    )
    .await;
    let off_url = format!("http://127.0.0.1:{off_port}/tasks");
    compare_posts(
        args,
        queue,
        "POST /tasks with EVENTS=on, against EVENTS=off",
        (tasks_url, None),
        (&off_url, None),
        0.75,
    )
    .await
}

/// POST /tasks closed loop against gateway `a`, then `b`, `args.rounds` times alternating;
/// the line with `a`'s median as offload and `b`'s as its ceiling.
async fn compare_posts(
    args: &Args,
    queue: &BenchQueue,
    measure: &str,
    a: (&str, Option<&str>),
    b: (&str, Option<&str>),
    target: f64,
) -> Result<Line, lapin::Error> {
    let (mut first, mut second) = (Vec::new(), Vec::new());
    for round in 1..=args.rounds {
        eprintln!("{measure}, round {round} of {} ...", args.rounds);
        for ((url, key), rates) in [(a, &mut first), (b, &mut second)] {
            rates.push(
                http::throughput(url, key, args.connections, args.length)
                    .await
                    .0,
            );
            queue.purge().await?;
        }
    }
    let (first, second) = (stats::median(&mut first), stats::median(&mut second));
    Ok(Line {
        measure: format!("{measure} (median of {})", args.rounds),
        offload: rate(first),
        ceiling: rate(second),
        ratio: percent(first / second),
        target: format!(">= {}", percent(target)),
        met: Some(first / second >= target),
    })
}

/// A stream holding a million finished tasks: how long a fresh gateway takes to read it, its
/// memory per task once it has, and GET /tasks/{id} throughput against the sustained POST
/// rate.
async fn replay(args: &Args, url: &str, post_rate: f64) -> Result<Vec<Line>, lapin::Error> {
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

/// POST /tasks on a gateway with metrics on (the default: every request counted, confirm
/// latency observed) against one with `METRICS=off`, alternating.
async fn metrics_cost(args: &Args, url: &str, queue: &BenchQueue) -> Result<Line, lapin::Error> {
    compare_gateways(
        args,
        url,
        queue,
        "POST /tasks with metrics on, against METRICS=off",
        (&[], None),
        &[("METRICS", "off")],
        0.95,
    )
    .await
}

/// POST /tasks on a gateway exporting a span per request (OTLP over HTTP, to a receiver in
/// this process that answers at once) against one without `OTEL_EXPORTER_OTLP_ENDPOINT`,
/// alternating. Every request starts a trace and is sampled: the dearest case.
async fn tracing_cost(args: &Args, url: &str, queue: &BenchQueue) -> Result<Line, lapin::Error> {
    let (sink, served) = otlp_sink().await;
    let line = compare_gateways(
        args,
        url,
        queue,
        "POST /tasks exporting a span each (OTLP/HTTP), against no export",
        (&[("OTEL_EXPORTER_OTLP_ENDPOINT", sink.as_str())], None),
        &[],
        0.90,
    )
    .await;
    served.abort();
    line
}

/// An OTLP/HTTP receiver in this process that takes every export and answers at once.
async fn otlp_sink() -> (String, tokio::task::JoinHandle<std::io::Result<()>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("a loopback port to bind");
    let sink = format!(
        "http://{}",
        listener
            .local_addr()
            .expect("a bound listener has an address")
    );
    let receiver = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(|| async { axum::http::StatusCode::OK }),
    );
    let served = tokio::spawn(async move { axum::serve(listener, receiver).await });
    (sink, served)
}

/// The prefetch-100 drain of zero-work tasks (EVENTS=off) by a worker exporting its spans
/// (a wait-in-queue span and an attempt span per task, with its log lines as span events)
/// against the same drain without export; medians of `args.rounds`.
async fn drain_tracing_cost(
    args: &Args,
    url: &str,
    queue: &BenchQueue,
) -> Result<Line, lapin::Error> {
    const PREFETCH: u16 = 100;
    let (sink, served) = otlp_sink().await;
    let exporting = [("OTEL_EXPORTER_OTLP_ENDPOINT", sink.as_str())];
    let (mut off, mut on) = (Vec::new(), Vec::new());
    for round in 1..=args.rounds {
        eprintln!(
            "drain exporting spans against not, round {round} of {}: {} tasks each ...",
            args.rounds, args.tasks
        );
        for (env, rates) in [(&[][..], &mut off), (&exporting[..], &mut on)] {
            broker::fill(url, queue.name(), "sleep", args.tasks).await?;
            let (worker, drained) =
                drain_with_worker(url, queue.name(), (PREFETCH, false), env, args.tasks).await;
            drop(worker);
            queue.purge().await?;
            rates.push(drained.map_or(0.0, |took| broker::per_second(args.tasks, took)));
        }
    }
    served.abort();
    let (off, on) = (stats::median(&mut off), stats::median(&mut on));
    Ok(Line {
        ceiling: rate(off),
        ratio: percent(on / off),
        ..Line::info(
            format!(
                "drain, prefetch {PREFETCH}, EVENTS=off, exporting spans (OTLP/HTTP), against no export (median of {})",
                args.rounds
            ),
            rate(on),
        )
    })
}

/// The cost of the gateway's defences: POST /tasks with the client timeouts, an API key and a
/// rate limit (too high to refuse anything) on, against a gateway with all three off,
/// alternating; the medians.
async fn hardening(args: &Args, url: &str, queue: &BenchQueue) -> Result<Line, lapin::Error> {
    const KEY: &str = "bench-key";
    compare_gateways(
        args,
        url,
        queue,
        "POST /tasks with timeouts, API key and rate limit on, against all off",
        (&[("API_KEYS", KEY), ("RATE_LIMIT", "100000000")], Some(KEY)),
        &[("HEADER_TIMEOUT", "0s"), ("BODY_TIMEOUT", "0s")],
        0.95,
    )
    .await
}

/// Two gateways side by side, one with `on` settings (and the API key they need, if any),
/// one with `off`: POST /tasks on each, alternating; the `on` one's share of the `off` one.
async fn compare_gateways(
    args: &Args,
    url: &str,
    queue: &BenchQueue,
    measure: &str,
    (on, key): (&[(&str, &str)], Option<&str>),
    off: &[(&str, &str)],
    target: f64,
) -> Result<Line, lapin::Error> {
    let (off_port, on_port) = (free_port(), free_port());
    let gateway =
        |port, env| process::start_gateway(Path::new(GATEWAY), url, queue.name(), port, env);
    let (_off_gateway, _on_gateway) = (gateway(off_port, off).await, gateway(on_port, on).await);
    // A new gateway first reads the whole events stream (millions of events by now): measure
    // neither while either is still reading.
    for (port, key) in [(off_port, None), (on_port, key)] {
        http::wait_until_live(
            &format!("http://127.0.0.1:{port}"),
            key,
            Duration::from_secs(300),
        )
        .await;
    }
    let (on_url, off_url) = (
        format!("http://127.0.0.1:{on_port}/tasks"),
        format!("http://127.0.0.1:{off_port}/tasks"),
    );
    compare_posts(
        args,
        queue,
        measure,
        (&on_url, key),
        (&off_url, None),
        target,
    )
    .await
}

/// The gateway's memory with every connection it serves held by a slow client, with the
/// default limits: never-ending request heads, then never-ending bodies, each against a
/// fresh gateway; and how fast a connection over the cap is answered meanwhile.
async fn slow_clients(url: &str, queue: &BenchQueue) -> Vec<Line> {
    let cap = offload_api::DEFAULT_MAX_CONNECTIONS as usize;
    let attacks = [
        (
            "never-ending request heads",
            Attack::Header {
                max_header_bytes: offload_api::DEFAULT_MAX_HEADER_BYTES as usize,
            },
        ),
        (
            "never-ending bodies",
            Attack::Body {
                max_body_bytes: offload_api::DEFAULT_MAX_BODY_BYTES,
            },
        ),
    ];
    let mut lines = Vec::new();
    for (name, attack) in attacks {
        eprintln!("{cap} connections sending {name} ...");
        let port = free_port();
        let gateway =
            process::start_gateway(Path::new(GATEWAY), url, queue.name(), port, &[]).await;
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        // A few more than the cap: those are turned away.
        let clients = slow::hold(addr, cap + 32, attack).await;
        // Let the gateway read what it was sent.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let turned_away = http::time_one_request(&format!("http://127.0.0.1:{port}/health")).await;
        let peak = gateway.peak_rss().unwrap_or(0);
        drop(clients);
        lines.push(Line {
            measure: format!(
                "gateway peak memory, {cap} connections (MAX_CONNECTIONS) sending {name}"
            ),
            offload: stats::mib(peak),
            ceiling: String::new(),
            ratio: String::new(),
            target: "< 256 MiB".into(),
            met: Some(peak < 256 * 1024 * 1024),
        });
        lines.push(Line::info(
            "  a new connection meanwhile: answered",
            turned_away.map_or_else(
                || "no answer".into(),
                |(status, took)| format!("{status} in {}", millis(took)),
            ),
        ));
    }
    lines
}

/// Open-loop latency at `share` of the sustained rate.
async fn latency(
    args: &Args,
    queue: &BenchQueue,
    tasks_url: &str,
    sustained: f64,
    share: f64,
) -> Result<Line, lapin::Error> {
    let offered = sustained * share;
    eprintln!("latency at {} ...", rate(offered));
    let mut run = http::open_loop(tasks_url, offered, args.length, args.connections).await;
    queue.purge().await?;
    let p99 = percentile(&mut run.latencies, 99.0);
    let at_half = (share - 0.5).abs() < f64::EPSILON;
    Ok(Line {
        measure: format!(
            "latency at {} ({} of sustained): p50 / p99 / p99.9",
            rate(offered),
            percent(share)
        ),
        offload: [50.0, 99.0, 99.9]
            .map(|p| percentile(&mut run.latencies, p).map_or("-".into(), millis))
            .join(" / "),
        ceiling: String::new(),
        ratio: errors(&run.errors),
        target: if at_half { "p99 < 10 ms" } else { "" }.into(),
        met: at_half.then(|| p99.is_some_and(|p| p < Duration::from_millis(10))),
    })
}

/// 202 to "task started", with one worker at the default prefetch; and the worker's peak
/// memory.
async fn end_to_end(
    args: &Args,
    url: &str,
    queue: &BenchQueue,
    tasks_url: &str,
    offered: f64,
) -> (Option<Line>, u64) {
    eprintln!("end to end at {}: 202 to task started ...", rate(offered));
    let (worker, log) =
        process::start_worker(Path::new(WORKER), url, queue.name(), (1, true), &[], true);
    let run = http::open_loop(tasks_url, offered, args.length, args.connections).await;
    let accepted = u64::try_from(run.accepted.len()).unwrap_or(u64::MAX);
    let line = match log.drained(accepted, DRAIN_DEADLINE).await {
        Some(_) => {
            let mut gaps = gaps(&run.accepted, &log.started.lock().expect("log lock"));
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
async fn scheduled(
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
    let (_worker, log) =
        process::start_worker(Path::new(WORKER), url, queue.name(), (1, true), &[], true);
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
    let deadline = std::time::Instant::now() + DRAIN_DEADLINE;
    let started = loop {
        let started: HashMap<uuid::Uuid, SystemTime> = log
            .started
            .lock()
            .expect("log lock")
            .iter()
            .copied()
            .collect();
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
const SCHEDULED_DELAY: Duration = Duration::from_secs(10);

/// `args.tasks` zero-work tasks drained by raw lapin, then by a worker process, at
/// `prefetch`, with lifecycle events on or off, `args.rounds` times alternating; the medians,
/// the worker's median rate and its peak memory. At prefetch 100 with events, also raw lapin
/// writing the same events as the worker would ([`broker::drain_ceiling_with_events`]).
async fn drain(
    args: &Args,
    url: &str,
    queue: &BenchQueue,
    prefetch: u16,
    events: bool,
) -> Result<(Vec<Line>, f64, u64), lapin::Error> {
    let (mut raw, mut offload, mut peak) = (Vec::new(), Vec::new(), 0);
    let stream = queue
        .topology
        .events_stream()
        .filter(|_| events && prefetch > 1);
    let mut raw_with_events = Vec::new();
    for round in 1..=args.rounds {
        eprintln!(
            "drain at prefetch {prefetch}, round {round} of {}: {} tasks ...",
            args.rounds, args.tasks
        );
        broker::fill(url, queue.name(), "sleep", args.tasks).await?;
        raw.push(broker::drain_ceiling(url, queue.name(), prefetch, args.tasks).await?);
        if let Some(stream) = &stream {
            broker::fill(url, queue.name(), "sleep", args.tasks).await?;
            raw_with_events.push(
                broker::drain_ceiling_with_events(url, queue.name(), stream, prefetch, args.tasks)
                    .await?,
            );
        }
        broker::fill(url, queue.name(), "sleep", args.tasks).await?;
        let (worker, drained) =
            drain_with_worker(url, queue.name(), (prefetch, events), &[], args.tasks).await;
        peak = peak.max(worker.peak_rss().unwrap_or(0));
        drop(worker);
        queue.purge().await?;
        offload.push(drained.map_or(0.0, |took| broker::per_second(args.tasks, took)));
    }
    let (raw, offload) = (stats::median(&mut raw), stats::median(&mut offload));
    // With events, every attempt waits for its event's confirm before its ack: at prefetch 1
    // that is one more round trip per task, which no target is set for.
    let target = match (prefetch, events) {
        (1, false) => Some(0.9),
        (1, true) => None,
        (_, false) => Some(0.8),
        (_, true) => Some(0.7),
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

/// HTTP-target tasks: one worker at prefetch 100 calling a target that answers at once,
/// beside the target alone under 100 callers and the raw consume-and-ack ceiling (medians of
/// `args.rounds`); and the worker's memory with 1,000 calls in flight.
async fn http_targets(
    args: &Args,
    url: &str,
    queue: &BenchQueue,
) -> Result<Vec<Line>, lapin::Error> {
    const PREFETCH: u16 = 100;
    const HELD: u16 = 1000;
    let target = Target::start().await;
    let targets = format!("http={}", target.url());
    let env = [("TARGETS", targets.as_str())];
    let (mut raw, mut alone, mut offload) = (Vec::new(), Vec::new(), Vec::new());
    for round in 1..=args.rounds {
        eprintln!(
            "HTTP targets, round {round} of {}: {} tasks ...",
            args.rounds, args.tasks
        );
        broker::fill(url, queue.name(), "http", args.tasks).await?;
        raw.push(broker::drain_ceiling(url, queue.name(), PREFETCH, args.tasks).await?);
        alone.push(target.alone(usize::from(PREFETCH), args.length).await);
        broker::fill(url, queue.name(), "http", args.tasks).await?;
        let (worker, log) = process::start_worker(
            Path::new(WORKER),
            url,
            queue.name(),
            (PREFETCH, false),
            &env,
            false,
        );
        let drained = log.drained(args.tasks, DRAIN_DEADLINE).await;
        drop(worker);
        queue.purge().await?;
        offload.push(drained.map_or(0.0, |took| broker::per_second(args.tasks, took)));
    }
    let (raw, alone, offload) = (
        stats::median(&mut raw),
        stats::median(&mut alone),
        stats::median(&mut offload),
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
            target: ">= 70%".into(),
            met: Some(offload / ceiling >= 0.7),
        },
        Line {
            ceiling: rate(shared),
            ratio: percent(offload / shared),
            ..Line::info(
                "  the same, against both ceilings' costs added: 1 / (1/raw + 1/alone)",
                rate(offload),
            )
        },
    ];

    eprintln!("HTTP targets: {HELD} calls in flight ...");
    target.hold(true);
    broker::fill(url, queue.name(), "http", u64::from(HELD)).await?;
    let (worker, log) = process::start_worker(
        Path::new(WORKER),
        url,
        queue.name(),
        (HELD, false),
        &env,
        false,
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while target.in_flight() < u64::from(HELD) && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let in_flight = target.in_flight();
    let peak = worker.peak_rss().unwrap_or(0);
    target.hold(false);
    let _ = log.drained(u64::from(HELD), DRAIN_DEADLINE).await;
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

fn errors(errors: &std::collections::BTreeMap<String, u64>) -> String {
    if errors.is_empty() {
        return "0 errors".into();
    }
    let kinds: Vec<String> = errors.iter().map(|(k, n)| format!("{k}: {n}")).collect();
    format!("errors {}", kinds.join(", "))
}

/// The memory lines; the worker's only when a worker ran (not with `--publish-only`).
fn memory(gateway_peak: u64, worker_peak: Option<u64>) -> Vec<Line> {
    // The gateway remembers up to STATUS_CAPACITY (100,000) tasks' states, and the
    // benchmark submits more than that.
    let mut lines = vec![Line {
        measure: "gateway peak resident memory (its status view full)".into(),
        offload: stats::mib(gateway_peak),
        ceiling: String::new(),
        ratio: String::new(),
        target: "< 64 MiB".into(),
        met: Some(gateway_peak < 64 * 1024 * 1024),
    }];
    lines.extend(worker_peak.map(|peak| Line {
        measure: "worker peak resident memory".into(),
        offload: stats::mib(peak),
        ceiling: String::new(),
        ratio: String::new(),
        target: "< 20 MiB".into(),
        met: Some(peak < 20 * 1024 * 1024),
    }));
    lines
}

/// A worker at `prefetch` drains `tasks` already queued; the time from its subscription to
/// its last completion.
async fn drain_with_worker(
    url: &str,
    queue: &str,
    (prefetch, events): (u16, bool),
    env: &[(&str, &str)],
    tasks: u64,
) -> (Process, Option<Duration>) {
    let (worker, log) = process::start_worker(
        Path::new(WORKER),
        url,
        queue,
        (prefetch, events),
        env,
        false,
    );
    let drained = log.drained(tasks, DRAIN_DEADLINE).await;
    (worker, drained)
}

/// For each accepted task the worker started, how long after its 202 it started (zero when
/// the worker was first: the broker delivers as soon as the message is queued, and the
/// confirm can reach the gateway after the delivery reaches the worker).
fn gaps(
    accepted: &[(uuid::Uuid, SystemTime)],
    started: &[(uuid::Uuid, SystemTime)],
) -> Vec<Duration> {
    let started: HashMap<_, _> = started.iter().copied().collect();
    accepted
        .iter()
        .filter_map(|(id, at)| {
            let began = started.get(id)?;
            Some(began.duration_since(*at).unwrap_or(Duration::ZERO))
        })
        .collect()
}

fn report(lines: &[Line], args: &Args) -> String {
    let date = humantime::format_rfc3339_seconds(SystemTime::now()).to_string();
    let cores = std::thread::available_parallelism().map_or(0, std::num::NonZero::get);
    TEMPLATE
        .replace("{table}", &stats::markdown(lines))
        .replace("{date}", &date)
        .replace("{cores}", &cores.to_string())
        .replace("{connections}", &args.connections.to_string())
        .replace("{tasks}", &args.tasks.to_string())
        .replace(
            "{length}",
            &humantime::format_duration(args.length).to_string(),
        )
}

const TEMPLATE: &str = include_str!("performance_template.md");
