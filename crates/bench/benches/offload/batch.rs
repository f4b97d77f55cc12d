//! `POST /tasks/batch`: tasks per second through batches of 1,000, against the raw publish
//! ceiling (raw lapin, 64 publishes in flight, confirmed) in the same run, and the gateway's
//! memory meanwhile.

use std::path::Path;

use offload_bench::{
    broker::{self, BenchQueue},
    free_port, http, process,
    stats::{self, Line, mib, percent, rate},
};

use crate::{Args, GATEWAY};

/// Tasks in each batch.
const SIZE: usize = 1000;
/// Clients posting batches at once.
const CLIENTS: usize = 4;

/// Batches of [`SIZE`] from [`CLIENTS`] clients against the raw publish ceiling, alternating,
/// medians of `args.rounds`.
pub(crate) async fn batch_cost(
    args: &Args,
    url: &str,
    queue: &BenchQueue,
) -> Result<Vec<Line>, lapin::Error> {
    let port = free_port();
    let gateway = process::start_gateway(Path::new(GATEWAY), url, queue.name(), port, &[]).await;
    let batch_url = format!("http://127.0.0.1:{port}/tasks/batch");
    let (mut ceilings, mut through_batches, mut refused) = (Vec::new(), Vec::new(), 0);
    for round in 1..=args.rounds {
        eprintln!(
            "publish ceiling and POST /tasks/batch of {SIZE}, round {round} of {} ...",
            args.rounds
        );
        ceilings.push(
            broker::publish_ceiling(
                url,
                &queue.kind_queue("sleep"),
                args.connections,
                args.length,
            )
            .await?,
        );
        queue.purge().await?;
        let (tasks, not) =
            http::batch_throughput(&batch_url, CLIENTS, SIZE, "sleep", args.length).await;
        through_batches.push(tasks);
        refused += not;
        queue.purge().await?;
    }
    let peak = gateway.peak_rss().unwrap_or(0);
    drop(gateway);
    let (ceiling, batched) = (
        stats::median(&mut ceilings),
        stats::median(&mut through_batches),
    );
    Ok(vec![
        Line {
            measure: format!(
                "tasks through POST /tasks/batch of {SIZE}, {CLIENTS} clients, against raw publishing ({} in flight; median of {})",
                args.connections, args.rounds
            ),
            offload: rate(batched),
            ceiling: rate(ceiling),
            ratio: percent(batched / ceiling),
            target: ">= 90%".into(),
            met: Some(batched / ceiling >= 0.9),
        },
        Line::info("  tasks refused in those batches", refused.to_string()),
        Line::info("  the gateway's peak resident memory meanwhile", mib(peak)),
    ])
}
