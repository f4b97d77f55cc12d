//! `cargo bench -p offload-bench`: offload against raw lapin on the same broker, in one run.
//! Prints one table and writes `docs/PERFORMANCE.md`.

use std::{
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use clap::Parser;
use offload_bench::{
    amqp_url,
    broker::BenchQueue,
    free_port,
    process::{self},
    stats::{self, Line},
};

mod batch;
mod cancels;
mod clients;
mod drain;
mod express;
mod kinds;
mod latency;
mod publish;
mod replay;
mod schedules;
mod targets;
mod traces;

use batch::batch_cost;
use cancels::cancel_cost;
use clients::{memory, slow_clients};
use drain::drain;
use express::against_express;
use kinds::{drain_over_kinds, posts_over_kinds};
use latency::{end_to_end, latencies, scheduled};
use publish::{events_cost, hardening, metrics_cost, throughput};
use replay::{replay, worst_case_memory};
use schedules::schedules_cost;
use targets::http_targets;
use traces::{drain_tracing_cost, tracing_cost};

/// The benchmark. Every figure is measured beside its ceiling in the same run.
#[derive(Debug, Parser)]
#[command(name = "offload-bench")]
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

    /// Measure one group only, quick, when working on one part; writes no report: `drain`
    /// (the worker's drains), `publish` (POST /tasks against its ceiling, and what each
    /// feature costs it), `targets` (HTTP-target tasks, beside their floor), `traces` (what
    /// exporting spans costs), `kinds` (four kinds against one), `cancels` (a drain with many
    /// cancels kept against none; with `--baseline`, this build's drain and POST against
    /// another's), `schedules` (POST /tasks with 1,000 schedules firing against none, and
    /// their ticks' lateness), `batch` (tasks through POST /tasks/batch against raw
    /// publishing), `post` (POST /tasks against raw publishing, rate and CPU, beside the HTTP
    /// floors and the Express stack, and its latency at half the sustained rate: the front
    /// door alone; with `--baseline`, also this build's gateway CPU per POST against
    /// another's), `replay` (a fresh gateway reading a million finished tasks, and its
    /// memory).
    #[arg(long, value_enum)]
    only: Option<Group>,

    /// Another build to measure this one against, side by side: a target directory holding
    /// its build of the benchmark's binaries, with the benchmark's profile
    /// (`CARGO_TARGET_DIR=/tmp/base cargo build --profile bench -p offload-bench --bins` in a
    /// checkout of the other commit).
    #[arg(long)]
    baseline: Option<PathBuf>,

    /// With `--only post`: a setting for its gateway, `NAME=value` (repeatable), to measure
    /// the front door with something off (`EVENTS=off`) or on.
    #[arg(long = "gateway-env", value_name = "NAME=value")]
    gateway_env: Vec<String>,

    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

/// A group of measurements, for `--only`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Group {
    Drain,
    Publish,
    Targets,
    Traces,
    Kinds,
    Cancels,
    Schedules,
    Batch,
    /// A gateway's memory per remembered task with the largest events a writer can write.
    WorstCase,
    /// A fresh gateway reading a million finished tasks: how long, its memory per task, its
    /// peak with the default STATUS_CAPACITY, and GET /tasks/{id} throughput.
    Replay,
    /// POST /tasks against raw publishing (rate, CPU per task) and its latency at half the
    /// sustained rate.
    Post,
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

const HTTP_FLOOR: &str = env!("CARGO_BIN_EXE_http-floor");

const TARGET_FLOOR: &str = env!("CARGO_BIN_EXE_target-floor");

const DRAIN_DEADLINE: Duration = Duration::from_secs(300);

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let url = amqp_url();
    let queue = BenchQueue::declare(&url, "run").await;
    let mut lines = Vec::new();
    let only = args.only;
    if let Some(group) = only.filter(|group| !matches!(group, Group::Drain | Group::Publish)) {
        let lines = alone(group, &args, &url, &queue).await?;
        queue.delete();
        println!("{}", stats::table(&lines));
        return Ok(());
    }

    // Drains first: the end-to-end measure runs at a rate one worker can keep up with.
    let mut worker_peak = 0;
    let mut drain_rates = Vec::new();
    let drains = [(1, false), (1, true), (100, false), (100, true)];
    for (prefetch, events) in drains.into_iter().filter(|_| only != Some(Group::Publish)) {
        let (drain_lines, offload_rate, peak) =
            drain(&args, &url, &queue, prefetch, events).await?;
        lines.extend(drain_lines);
        drain_rates.push(offload_rate);
        worker_peak = worker_peak.max(peak);
    }
    if only != Some(Group::Publish) {
        lines.push(drain_tracing_cost(&args, &url, &queue).await?);
    }
    if only == Some(Group::Drain) {
        queue.delete();
        println!("{}", stats::table(&lines));
        return Ok(());
    }

    let port = free_port();
    let gateway = process::start_gateway(Path::new(GATEWAY), &url, queue.name(), port, &[]).await;
    let tasks_url = format!("http://127.0.0.1:{port}/tasks");
    let sustained = throughput(&args, &url, &queue, &gateway, &tasks_url, &mut lines).await?;
    lines.extend(against_express(&args, &url, &queue, &gateway, &tasks_url).await?);
    lines.push(events_cost(&args, &url, &queue, &tasks_url).await?);
    lines.extend(batch_cost(&args, &url, &queue).await?);
    lines.extend(posts_over_kinds(&args, &url, &queue, &gateway, &tasks_url).await?);
    lines.extend(replay(&args, &url, Some(sustained)).await?);
    lines.extend(worst_case_memory(&url).await?);
    lines.push(hardening(&args, &url, &queue).await?);
    lines.push(metrics_cost(&args, &url, &queue).await?);
    lines.push(tracing_cost(&args, &url, &queue).await?);
    lines.extend(slow_clients(&url, &queue).await);
    if only == Some(Group::Publish) {
        queue.delete();
        lines.extend(memory(gateway.peak_rss().unwrap_or(0), None));
        println!("{}", stats::table(&lines));
        return Ok(());
    }
    lines.extend(latencies(&args, &url, sustained, &[0.25, 0.5, 0.75], &[]).await?);
    // Moderate: a quarter of what one worker at the default prefetch drains alone (it
    // shares the two cores with the gateway and the load here).
    // drain_rates[1]: prefetch 1 with events on, as the worker runs by default.
    let (e2e, peak) = end_to_end(&args, &url, &queue, &tasks_url, drain_rates[1] / 4.0).await;
    lines.extend(e2e);
    worker_peak = worker_peak.max(peak);
    lines.extend(scheduled(&args, &url, &queue, &tasks_url, drain_rates[1] / 4.0).await);
    lines.extend(http_targets(&args, &url, &queue).await?);
    lines.extend(drain_over_kinds(&args, &url, &queue).await?);
    lines.extend(cancel_cost(&args, &url, &queue).await?);
    lines.extend(schedules_cost(&args, &url).await?);
    let gateway_peak = gateway.peak_rss().unwrap_or(0);
    drop(gateway);
    queue.delete();
    lines.extend(memory(gateway_peak, Some(worker_peak)));

    println!("{}", stats::table(&lines));
    if args.write.as_os_str() != "-" {
        std::fs::write(&args.write, report(&lines, &args))?;
        println!("report written to {}", args.write.display());
    }
    Ok(())
}

/// The measurements of `group` alone, one of those `--only` runs by themselves.
async fn alone(
    group: Group,
    args: &Args,
    url: &str,
    queue: &BenchQueue,
) -> Result<Vec<Line>, Box<dyn std::error::Error>> {
    let mut lines = Vec::new();
    match group {
        Group::Targets => lines.extend(http_targets(args, url, queue).await?),
        Group::Traces => {
            lines.push(tracing_cost(args, url, queue).await?);
            lines.push(drain_tracing_cost(args, url, queue).await?);
        }
        Group::Cancels => lines.extend(cancel_cost(args, url, queue).await?),
        Group::Kinds => {
            let port = free_port();
            let gateway =
                process::start_gateway(Path::new(GATEWAY), url, queue.name(), port, &[]).await;
            let tasks_url = format!("http://127.0.0.1:{port}/tasks");
            lines.extend(posts_over_kinds(args, url, queue, &gateway, &tasks_url).await?);
            lines.extend(drain_over_kinds(args, url, queue).await?);
        }
        Group::Schedules => lines.extend(schedules_cost(args, url).await?),
        Group::Batch => lines.extend(batch_cost(args, url, queue).await?),
        Group::WorstCase => lines.extend(worst_case_memory(url).await?),
        Group::Replay => lines.extend(replay(args, url, None).await?),
        Group::Post => {
            let port = free_port();
            let env: Vec<(&str, &str)> = args
                .gateway_env
                .iter()
                .filter_map(|setting| setting.split_once('='))
                .collect();
            let gateway =
                process::start_gateway(Path::new(GATEWAY), url, queue.name(), port, &env).await;
            let tasks_url = format!("http://127.0.0.1:{port}/tasks");
            let sustained = throughput(args, url, queue, &gateway, &tasks_url, &mut lines).await?;
            lines.extend(against_express(args, url, queue, &gateway, &tasks_url).await?);
            drop(gateway);
            lines.extend(latencies(args, url, sustained, &[0.5], &env).await?);
            if let Some(baseline) = &args.baseline {
                lines.extend(cancels::posts_against(args, url, queue, baseline).await?);
            }
        }
        Group::Drain | Group::Publish => {}
    }
    Ok(lines)
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
