//! POST /tasks against its ceilings: raw lapin publishing with confirms, and the same
//! gateway with a feature off (events, metrics, the defences).

use std::{path::Path, time::Duration};

use offload_bench::{
    broker::{self, BenchQueue, Measured},
    free_port, http,
    process::{self, Process},
    stats::{self, Line, percent, rate},
};

use crate::{Args, GATEWAY, HTTP_FLOOR};

/// The raw publish ceiling, the gateway closed-loop and the HTTP floor (`http-floor`: axum
/// answering 202 without a broker), `args.rounds` times alternating; returns the gateway's
/// median rate. Beside the rates, the CPU each spends per task over the same windows: the raw
/// client's per publish and confirm (this process), the gateway's per POST and the floor's
/// per request (from `/proc`), which the machine's noise moves far less than a rate.
pub(crate) async fn throughput(
    args: &Args,
    url: &str,
    queue: &BenchQueue,
    gateway: &Process,
    tasks_url: &str,
    lines: &mut Vec<Line>,
) -> Result<f64, Box<dyn std::error::Error>> {
    let (mut ceilings, mut sustained, mut floors, mut errors) =
        (Vec::new(), Vec::new(), Vec::new(), 0);
    let floor_port = free_port();
    let mut command = std::process::Command::new(HTTP_FLOOR);
    command.arg(floor_port.to_string());
    let floor = process::start_server(command, floor_port).await?;
    let floor_url = format!("http://127.0.0.1:{floor_port}/tasks");
    for round in 1..=args.rounds {
        eprintln!(
            "publish ceiling and POST /tasks, {} in flight, round {round} of {} ...",
            args.connections, args.rounds
        );
        ceilings.push(
            broker::publish_ceiling_measured(
                url,
                &queue.kind_queue("sleep"),
                args.connections,
                args.length,
            )
            .await?,
        );
        queue.purge().await?;
        let (measured, failed) = http::throughput_measured(
            tasks_url,
            None,
            args.connections,
            args.length,
            &["sleep"],
            || gateway.cpu_time(),
        )
        .await;
        sustained.push(measured);
        errors += failed;
        queue.purge().await?;
        let (measured, _) = http::throughput_measured(
            &floor_url,
            None,
            args.connections,
            args.length,
            &["sleep"],
            || floor.cpu_time(),
        )
        .await;
        floors.push(measured);
    }
    drop(floor);
    let (ceiling, rate) = (
        stats::median_by(&ceilings, |m| m.rate),
        stats::median_by(&sustained, |m| m.rate),
    );
    let (raw_cpu, gateway_cpu) = (
        stats::median_by(&ceilings, Measured::cpu_micros),
        stats::median_by(&sustained, Measured::cpu_micros),
    );
    let fraction = rate / ceiling;
    lines.push(Line {
        measure: format!(
            "POST /tasks, {} connections (median of {})",
            args.connections, args.rounds
        ),
        offload: stats::rate(rate),
        ceiling: stats::rate(ceiling),
        ratio: percent(fraction),
        target: ">= 60%".into(),
        met: Some(fraction >= 0.6),
    });
    lines.push(Line::info("  answers other than 202", errors.to_string()));
    let times = gateway_cpu / raw_cpu;
    lines.push(Line {
        measure: format!(
            "CPU per task: the gateway's per POST /tasks against raw lapin's per publish and confirm (from /proc, the same windows, median of {})",
            args.rounds
        ),
        offload: format!("{gateway_cpu:.1} µs"),
        ceiling: format!("{raw_cpu:.1} µs"),
        ratio: format!("{times:.2}x"),
        target: "<= 2.5x".into(),
        met: Some(times <= 2.5),
    });
    let floor_cpu = stats::median_by(&floors, Measured::cpu_micros);
    lines.push(Line::info(
        "  the floor: axum answering 202 without a broker, CPU per request ((floor + raw) / raw: the least ratio a front door on axum and lapin can reach; its rate)",
        format!(
            "{floor_cpu:.1} µs ({:.2}x; {})",
            (floor_cpu + raw_cpu) / raw_cpu,
            stats::rate(stats::median_by(&floors, |m| m.rate))
        ),
    ));
    lines.push(Line::info(
        "  the gateway's CPU per POST against the floor's plus raw lapin's",
        format!("{:.2}x", gateway_cpu / (floor_cpu + raw_cpu)),
    ));
    Ok(rate)
}

/// The cost of lifecycle events on POST /tasks: the default gateway (events on) against one
/// with EVENTS=off, alternating; the medians.
pub(crate) async fn events_cost(
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
pub(crate) async fn compare_posts(
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

/// The cost of the gateway's defences: POST /tasks with the client timeouts, an API key and a
/// rate limit (too high to refuse anything) on, against a gateway with all three off,
/// alternating; the medians.
pub(crate) async fn hardening(
    args: &Args,
    url: &str,
    queue: &BenchQueue,
) -> Result<Line, lapin::Error> {
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

/// POST /tasks on a gateway with metrics on (the default: every request counted, confirm
/// latency observed) against one with `METRICS=off`, alternating.
pub(crate) async fn metrics_cost(
    args: &Args,
    url: &str,
    queue: &BenchQueue,
) -> Result<Line, lapin::Error> {
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

/// Two gateways side by side, one with `on` settings (and the API key they need, if any),
/// one with `off`: POST /tasks on each, alternating; the `on` one's share of the `off` one.
pub(crate) async fn compare_gateways(
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
