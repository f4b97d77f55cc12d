//! POST /tasks against the stack teams start from: RabbitMQ's "Work Queues" `new_task.js`
//! behind an Express route, with publisher confirms (`crates/bench/express`), on the same
//! queue, alternating.

use std::{path::Path, process::Command};

use offload_bench::{
    broker::{BenchQueue, Measured},
    free_port, http,
    process::{self, Process},
    stats::{self, Line},
};

use crate::Args;

/// Where the Express stack lives: `npm ci` there installs it (tests/install-deps.sh does).
const EXPRESS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/express");

/// The gateway and the Express stack closed-loop, `args.rounds` times alternating, both
/// publishing to the `sleep` kind's queue: their rates and CPU per request (from `/proc`).
pub(crate) async fn against_express(
    args: &Args,
    url: &str,
    queue: &BenchQueue,
    gateway: &Process,
    tasks_url: &str,
) -> Result<Vec<Line>, Box<dyn std::error::Error>> {
    let measure =
        "POST /tasks against Express + amqplib with confirms (new_task.js behind an Express route)";
    if !Path::new(EXPRESS).join("node_modules").is_dir() {
        return Ok(vec![Line::info(
            measure,
            format!("not measured: run `npm ci --prefix {EXPRESS}` (tests/install-deps.sh does)"),
        )]);
    }
    let port = free_port();
    let mut command = Command::new("node");
    command
        .arg("server.js")
        .arg(port.to_string())
        .current_dir(EXPRESS)
        .env("AMQP_URL", url)
        .env("QUEUE", queue.kind_queue("sleep"));
    let express = process::start_server(command, port).await?;
    let express_url = format!("http://127.0.0.1:{port}/tasks");
    let (mut ours, mut theirs, mut errors) = (Vec::new(), Vec::new(), 0);
    for round in 1..=args.rounds {
        eprintln!(
            "POST /tasks and Express, round {round} of {} ...",
            args.rounds
        );
        for (url, process, into) in [
            (tasks_url, gateway, &mut ours),
            (express_url.as_str(), &express, &mut theirs),
        ] {
            let (measured, failed) = http::throughput_measured(
                url,
                None,
                args.connections,
                args.length,
                &["sleep"],
                || process.cpu_time(),
            )
            .await;
            into.push(measured);
            errors += failed;
            queue.purge().await?;
        }
    }
    let (rate, express_rate) = (
        stats::median_by(&ours, |m| m.rate),
        stats::median_by(&theirs, |m| m.rate),
    );
    let times = rate / express_rate;
    Ok(vec![
        Line {
            measure: format!(
                "{measure}, {} connections (median of {})",
                args.connections, args.rounds
            ),
            offload: stats::rate(rate),
            ceiling: stats::rate(express_rate),
            ratio: format!("{times:.2}x"),
            target: ">= 5x".into(),
            met: Some(times >= 5.0),
        },
        Line::info(
            "  CPU per request: the gateway's, Express's (answers other than 202 in both)",
            format!(
                "{:.1} µs, {:.1} µs ({errors})",
                stats::median_by(&ours, Measured::cpu_micros),
                stats::median_by(&theirs, Measured::cpu_micros)
            ),
        ),
    ])
}
