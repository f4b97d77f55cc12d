//! Schedules: what 1,000 `every: 10s` schedules cost a gateway's POST /tasks, side by side with
//! a gateway without any in the same run, and how late their ticks' tasks are published.
//!
//! `every` is aligned to the epoch, so the 1,000 schedules all tick at once, every ten seconds:
//! the worst burst 1,000 such schedules can make.

use std::{path::Path, time::Duration};

use offload_bench::{
    broker::BenchQueue,
    free_port,
    histogram::Histogram,
    http, process,
    stats::{self, Line, percent, rate},
};

use crate::{Args, GATEWAY};

/// How many schedules the scheduled gateway fires.
const SCHEDULES: usize = 1_000;
/// Their period.
const EVERY: &str = "10s";
const PERIOD: Duration = Duration::from_secs(10);
/// How long the idle gateway's ticks are watched for their lateness: three bursts.
const IDLE: Duration = Duration::from_secs(30);
/// The lateness target: a tick's task published within this of its time, at p99.
const LATE_TARGET: f64 = 0.1;

/// POST /tasks on a gateway firing [`SCHEDULES`] schedules against one with none, each started
/// alone for its run (so neither's ticks run during the other's), alternating, medians: the
/// rates and the gateway's CPU per 202. Then the ticks' lateness, idle and under that load,
/// from the gateway's `offload_schedule_tick_late_seconds` histogram.
pub(crate) async fn schedules_cost(args: &Args, url: &str) -> Result<Vec<Line>, lapin::Error> {
    // Each gateway on a QUEUE of its own: schedules live on `<QUEUE>.schedules`.
    let plain = BenchQueue::declare(url, "plain").await;
    let scheduled = BenchQueue::declare(url, "schedules").await;
    let file = std::env::temp_dir().join(format!("{}.toml", scheduled.name()));
    std::fs::write(&file, schedules_file()).expect("write the benchmark's schedules file");
    let file_env = file.display().to_string();

    let (mut with, mut without) = (Vec::new(), Vec::new());
    let mut loaded = Histogram::default();
    for round in 1..=args.rounds {
        eprintln!(
            "POST /tasks with {SCHEDULES} schedules and without, round {round} of {} ...",
            args.rounds
        );
        // Alternating which goes first: the broker still tidies the queue purged after a run
        // while the next one starts.
        if round % 2 == 1 {
            without.push(posts(args, url, &plain, None).await?.0);
        }
        let (run, late) = posts(args, url, &scheduled, Some(&file_env)).await?;
        with.push(run);
        loaded.add(&late);
        if round % 2 == 0 {
            without.push(posts(args, url, &plain, None).await?.0);
        }
    }
    let idle = idle_lateness(url, &scheduled, &file_env).await;
    let _ = std::fs::remove_file(&file);
    plain.delete();
    scheduled.delete();
    Ok(lines(args, &with, &without, &idle, &loaded))
}

/// POST /tasks for one period of the schedules ([`PERIOD`], so a window holds exactly one burst
/// of ticks) on a gateway of its own on `queue`, with `SCHEDULES_FILE` `schedules` if given
/// (once it fires): the rate and the gateway's CPU per 202; and the lateness of the ticks fired
/// meanwhile.
async fn posts(
    args: &Args,
    url: &str,
    queue: &BenchQueue,
    schedules: Option<&str>,
) -> Result<((f64, f64), Histogram), lapin::Error> {
    let port = free_port();
    let env: Vec<(&str, &str)> = schedules
        .map(|file| ("SCHEDULES_FILE", file))
        .into_iter()
        .collect();
    let gateway = process::start_gateway(Path::new(GATEWAY), url, queue.name(), port, &env).await;
    if schedules.is_some() {
        await_firing(port).await;
    }
    let (cpu_before, late_before) = (gateway.cpu_time().unwrap_or_default(), late(port).await);
    let began = std::time::Instant::now();
    let tasks_url = format!("http://127.0.0.1:{port}/tasks");
    let (rate, _) =
        http::throughput_of(&tasks_url, None, args.connections, PERIOD, &["http"]).await;
    let cpu = gateway
        .cpu_time()
        .unwrap_or_default()
        .saturating_sub(cpu_before);
    let late = late(port).await.since(&late_before);
    // The rate is measured after a warm-up; the CPU over the whole run: per 202, over the
    // 202s of the whole run at the measured rate.
    let posted = rate * began.elapsed().as_secs_f64();
    drop(gateway);
    queue.purge().await?;
    Ok(((rate, cpu.as_secs_f64() * 1e6 / posted.max(1.0)), late))
}

/// The lateness of the ticks a gateway on `queue` with `SCHEDULES_FILE` `file` fires over
/// [`IDLE`], with no other load.
async fn idle_lateness(url: &str, queue: &BenchQueue, file: &str) -> Histogram {
    eprintln!("{SCHEDULES} schedules firing on an idle gateway for {IDLE:?} ...");
    let port = free_port();
    let gateway = process::start_gateway(
        Path::new(GATEWAY),
        url,
        queue.name(),
        port,
        &[("SCHEDULES_FILE", file)],
    )
    .await;
    await_firing(port).await;
    let before = late(port).await;
    tokio::time::sleep(IDLE).await;
    let idle = late(port).await.since(&before);
    drop(gateway);
    idle
}

/// The report's lines: `with` and `without` are (rate, CPU per 202 in µs) of each round.
fn lines(
    args: &Args,
    with: &[(f64, f64)],
    without: &[(f64, f64)],
    idle: &Histogram,
    loaded: &Histogram,
) -> Vec<Line> {
    let (with_rate, without_rate) = (
        stats::median_by(with, |run| run.0),
        stats::median_by(without, |run| run.0),
    );
    let (with_cpu, without_cpu) = (
        stats::median_by(with, |run| run.1),
        stats::median_by(without, |run| run.1),
    );
    vec![
        Line {
            measure: format!(
                "POST /tasks on a gateway firing {SCHEDULES} schedules `every: {EVERY}`, against one with none, {} connections, {PERIOD:?} each (one burst of ticks; median of {})",
                args.connections, args.rounds
            ),
            offload: rate(with_rate),
            ceiling: rate(without_rate),
            ratio: percent(with_rate / without_rate),
            target: ">= 95%".into(),
            met: Some(with_rate / without_rate >= 0.95),
        },
        Line {
            ceiling: format!("{without_cpu:.1} µs"),
            ratio: percent(without_cpu / with_cpu),
            ..Line::info(
                "  gateway CPU per POST, with the schedules against none (ratio: none's over with)",
                format!("{with_cpu:.1} µs"),
            )
        },
        Line {
            ratio: idle
                .within_share(LATE_TARGET)
                .map_or_else(String::new, percent),
            target: ">= 99% within 100 ms".into(),
            met: Some(idle.p99_at_most(LATE_TARGET)),
            ..Line::info(
                format!(
                    "their ticks' tasks published after the tick, p99, idle gateway ({} ticks; ratio: share within 100 ms)",
                    idle.count
                ),
                idle.p99_bound(),
            )
        },
        Line {
            ratio: loaded
                .within_share(LATE_TARGET)
                .map_or_else(String::new, percent),
            ..Line::info(
                format!(
                    "  the same while POST /tasks saturates the gateway ({} ticks)",
                    loaded.count
                ),
                loaded.p99_bound(),
            )
        },
    ]
}

/// [`SCHEDULES`] schedules of `every: EVERY`, as `SCHEDULES_FILE` takes them.
fn schedules_file() -> String {
    use std::fmt::Write as _;
    (0..SCHEDULES).fold(String::new(), |mut file, n| {
        let _ = writeln!(
            file,
            "[[schedule]]\nname = \"bench-{n}\"\nevery = \"{EVERY}\"\ntask = {{ kind = \"sleep\", payload = {{ message = \"tick\" }} }}"
        );
        file
    })
}

/// Waits (at most 60 s) until the gateway on `port` leads and fires: its ticks counted.
async fn await_firing(port: u16) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while late(port).await.count == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the gateway fired no tick within 60 s of its start"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The gateway's `offload_schedule_tick_late_seconds` histogram, from its `/metrics`.
async fn late(port: u16) -> Histogram {
    let url = format!("http://127.0.0.1:{port}/metrics");
    let Ok(response) = reqwest::get(&url).await else {
        return Histogram::default();
    };
    Histogram::parse(
        &response.text().await.unwrap_or_default(),
        "offload_schedule_tick_late_seconds",
    )
}
