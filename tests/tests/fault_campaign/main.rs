//! The fault campaign (`cargo test -p offload-tests --test fault-campaign`): drives load at offload while injecting faults one at a time,
//! then checks that every task that got a 202 ran. Prints a table, writes
//! `docs/RELIABILITY.md`, and exits non-zero if any task was lost or any scenario failed.
//!
//! Needs what the integration tests need: `rabbitmq-server` installed and root (each
//! scenario runs a private RabbitMQ node, or three in network namespaces of their own for
//! the `cluster-*` scenarios; the shared broker is never touched).

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    process::ExitCode,
    time::Duration,
};

use clap::Parser;
use offload_tests::campaign::{self, Fault, LoadShape, Row};

/// Fault campaign for offload: load, one fault at a time, then a check that every task that
/// got a 202 ran.
#[derive(Debug, Parser)]
#[command(name = "fault-campaign")]
struct Args {
    /// Run only these faults (by name, e.g. `broker-kill`); repeatable. Default: all.
    #[arg(long, value_parser = parse_fault)]
    only: Vec<Fault>,

    /// Run the whole list this many times (a longer soak).
    #[arg(long, default_value_t = 1)]
    rounds: u32,

    /// Requests per second offered to the gateway.
    #[arg(long, default_value_t = 100)]
    rate: u32,

    /// Concurrent HTTP clients.
    #[arg(long, default_value_t = 8)]
    clients: usize,

    /// Where to write the report; `-` writes none.
    #[arg(long, default_value_os_t = default_report())]
    write: PathBuf,
}

/// The longest a scenario may take: the cluster ones take up to three minutes (three nodes
/// boot, one or more restart), the others under one.
const SCENARIO_DEADLINE: Duration = Duration::from_secs(8 * 60);

fn default_report() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate lives inside the workspace")
        .join("docs/RELIABILITY.md")
}

fn parse_fault(name: &str) -> Result<Fault, String> {
    Fault::ALL
        .into_iter()
        .find(|fault| fault.name() == name)
        .ok_or_else(|| {
            let names: Vec<_> = Fault::ALL.iter().map(|f| f.name()).collect();
            format!("unknown fault {name:?}; one of {}", names.join(", "))
        })
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let faults = if args.only.is_empty() {
        Fault::ALL.to_vec()
    } else {
        args.only.clone()
    };
    let shape = LoadShape {
        clients: args.clients,
        rate: args.rate,
        poison_every: None,
        scripted_failures: None,
        task: serde_json::json!({"kind": "sleep", "payload": {"message": "..."}}),
        other_task: None,
        request_timeout: Duration::from_secs(10),
        cancel_every: Some(10),
    };

    let started = std::time::Instant::now();
    let mut rows = Vec::new();
    let mut broken = Vec::new();
    for round in 1..=args.rounds {
        for &fault in &faults {
            eprintln!("round {round}: {} ...", fault.name());
            // A task of its own, so that a scenario that panics (a step past its deadline)
            // is reported as failed and the others still run.
            let shape = shape.clone();
            let mut scenario = tokio::spawn(async move { campaign::run(fault, &shape).await });
            // Every step has a deadline of its own; this one catches an await that has none,
            // so that a hang fails one row instead of holding CI to its time limit.
            match tokio::time::timeout(SCENARIO_DEADLINE, &mut scenario).await {
                Ok(Ok(row)) => {
                    eprint!("{}", campaign::table(std::slice::from_ref(&row)));
                    rows.push(row);
                }
                Ok(Err(error)) => broken.push((fault, panic_message(error))),
                Err(_) => {
                    // Dropping the scenario's future kills its processes and nodes.
                    scenario.abort();
                    let _ = scenario.await;
                    broken.push((
                        fault,
                        format!("did not finish within {SCENARIO_DEADLINE:?}"),
                    ));
                }
            }
        }
    }

    println!("{}", campaign::table(&rows));
    for (fault, why) in &broken {
        println!("{}: FAILED: {why}", fault.name());
    }
    let passed = broken.is_empty() && rows.iter().all(Row::passed);
    if args.write.as_os_str() != "-" {
        let report = report(&rows, &broken, &args, started.elapsed());
        if let Err(error) = std::fs::write(&args.write, report) {
            eprintln!("cannot write {}: {error}", args.write.display());
            return ExitCode::FAILURE;
        }
        println!("report written to {}", args.write.display());
    }
    let kept = rows.iter().filter(|row| row.passed()).count();
    println!(
        "fault campaign took {:.0?}; {}",
        started.elapsed(),
        if passed { "nothing lost" } else { "FAILED" }
    );
    // The closing line CI reads, in the plain 'N passed, N failed' form.
    println!(
        "campaign: {kept} passed, {} failed",
        rows.len() + broken.len() - kept
    );
    if passed {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn panic_message(error: tokio::task::JoinError) -> String {
    match error.try_into_panic() {
        Ok(panic) => panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
            .unwrap_or_else(|| "panicked".to_owned()),
        Err(error) => error.to_string(),
    }
}

fn report(rows: &[Row], broken: &[(Fault, String)], args: &Args, took: Duration) -> String {
    let mut failures = String::new();
    for (fault, why) in broken {
        let _ = writeln!(failures, "- **{}** did not finish: {why}", fault.name());
    }
    let date = humantime::format_rfc3339_seconds(std::time::SystemTime::now());
    let cores = std::thread::available_parallelism().map_or(0, std::num::NonZero::get);
    TEMPLATE
        .replace("{table}", &campaign::markdown(rows))
        .replace("{failures}", &failures)
        .replace("{date}", &date.to_string())
        .replace("{cores}", &cores.to_string())
        .replace("{rate}", &args.rate.to_string())
        .replace("{clients}", &args.clients.to_string())
        .replace("{took}", &format!("{took:.0?}"))
}

const TEMPLATE: &str = include_str!("reliability_template.md");
