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

/// What the rounds of [`throughput`] measured, each a run per round.
#[derive(Default)]
struct Rounds {
    /// Raw lapin publishing with confirms.
    ceilings: Vec<Measured>,
    /// The gateway, closed-loop.
    sustained: Vec<Measured>,
    /// `http-floor` without a broker.
    floors: Vec<Measured>,
    /// `http-floor` publishing with lapin.
    publishing: Vec<Measured>,
    /// The gateway's answers other than 202.
    errors: u64,
}

/// Starts `http-floor` on a free port with `args` after the port: its process and its
/// `/tasks` URL.
async fn start_floor(args: &[String]) -> std::io::Result<(Process, String)> {
    let port = free_port();
    let mut command = std::process::Command::new(HTTP_FLOOR);
    command.arg(port.to_string()).args(args);
    let floor = process::start_server(command, port).await?;
    Ok((floor, format!("http://127.0.0.1:{port}/tasks")))
}

/// The raw publish ceiling, the gateway closed-loop and the HTTP floors (`http-floor`: axum
/// answering 202 without a broker, and axum publishing with lapin and nothing else),
/// `args.rounds` times alternating; returns the gateway's median rate. Beside the rates, the
/// CPU each spends per task over the same windows: the raw client's per publish and confirm
/// (this process), the gateway's per POST and the floors' per request (from `/proc`), which
/// the machine's noise moves far less than a rate.
pub(crate) async fn throughput(
    args: &Args,
    url: &str,
    queue: &BenchQueue,
    gateway: &Process,
    tasks_url: &str,
    lines: &mut Vec<Line>,
) -> Result<f64, Box<dyn std::error::Error>> {
    let mut rounds = Rounds::default();
    let (floor, floor_url) = start_floor(&[]).await?;
    let (publishing, publishing_url) =
        start_floor(&[url.to_owned(), queue.kind_queue("sleep")]).await?;
    for round in 1..=args.rounds {
        eprintln!(
            "publish ceiling and POST /tasks, {} in flight, round {round} of {} ...",
            args.connections, args.rounds
        );
        rounds.ceilings.push(
            broker::publish_ceiling_measured(
                url,
                &queue.kind_queue("sleep"),
                args.connections,
                args.length,
            )
            .await?,
        );
        queue.purge().await?;
        let (measured, failed) = post(args, tasks_url, gateway).await;
        rounds.sustained.push(measured);
        rounds.errors += failed;
        queue.purge().await?;
        rounds.floors.push(post(args, &floor_url, &floor).await.0);
        rounds
            .publishing
            .push(post(args, &publishing_url, &publishing).await.0);
        queue.purge().await?;
    }
    drop((floor, publishing));
    let rate = stats::median_by(&rounds.sustained, |m| m.rate);
    lines.extend(rounds.lines(args));
    Ok(rate)
}

/// POST /tasks closed-loop to `url`, served by `process`, for `args.length`.
async fn post(args: &Args, url: &str, process: &Process) -> (Measured, u64) {
    http::throughput_measured(url, None, args.connections, args.length, &["sleep"], || {
        process.cpu_time()
    })
    .await
}

impl Rounds {
    /// The report's lines about them.
    fn lines(&self, args: &Args) -> Vec<Line> {
        let by_rate = |runs: &[Measured]| stats::median_by(runs, |m| m.rate);
        let by_cpu = |runs: &[Measured]| stats::median_by(runs, Measured::cpu_micros);
        let (ceiling, rate, publishing) = (
            by_rate(&self.ceilings),
            by_rate(&self.sustained),
            by_rate(&self.publishing),
        );
        let (raw_cpu, gateway_cpu, floor_cpu, publishing_cpu) = (
            by_cpu(&self.ceilings),
            by_cpu(&self.sustained),
            by_cpu(&self.floors),
            by_cpu(&self.publishing),
        );
        let fraction = rate / ceiling;
        let times = gateway_cpu / raw_cpu;
        vec![
            Line {
                measure: format!(
                    "POST /tasks, {} connections (median of {})",
                    args.connections, args.rounds
                ),
                offload: stats::rate(rate),
                ceiling: stats::rate(ceiling),
                ratio: percent(fraction),
                target: ">= 60%".into(),
                met: Some(fraction >= 0.6),
            },
            Line::info("  answers other than 202", self.errors.to_string()),
            Line::beside(
                "  the floor: axum publishing each task with lapin and answering on its confirm, nothing else (http-floor with a broker)",
                stats::rate(publishing),
                stats::rate(ceiling),
                percent(publishing / ceiling),
            ),
            Line::beside(
                "  POST /tasks against that floor",
                stats::rate(rate),
                stats::rate(publishing),
                percent(rate / publishing),
            ),
            Line::beside(
                "  CPU per request: the gateway's against that floor's",
                format!("{gateway_cpu:.1} µs"),
                format!("{publishing_cpu:.1} µs"),
                format!("{:.2}x", gateway_cpu / publishing_cpu),
            ),
            Line {
                measure: format!(
                    "CPU per task: the gateway's per POST /tasks against raw lapin's per publish and confirm (from /proc, the same windows, median of {})",
                    args.rounds
                ),
                offload: format!("{gateway_cpu:.1} µs"),
                ceiling: format!("{raw_cpu:.1} µs"),
                ratio: format!("{times:.2}x"),
                target: "<= 2.5x".into(),
                met: Some(times <= 2.5),
            },
            Line::info(
                "  the floor: axum answering 202 without a broker, CPU per request ((floor + raw) / raw: the least ratio a front door on axum and lapin can reach; its rate)",
                format!(
                    "{floor_cpu:.1} µs ({:.2}x; {})",
                    (floor_cpu + raw_cpu) / raw_cpu,
                    stats::rate(by_rate(&self.floors))
                ),
            ),
            Line::info(
                "  the gateway's CPU per POST against the floor's plus raw lapin's",
                format!("{:.2}x", gateway_cpu / (floor_cpu + raw_cpu)),
            ),
        ]
    }
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
