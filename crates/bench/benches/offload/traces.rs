//! What exporting spans costs, on POST /tasks and on a drain, against a real OTLP/HTTP sink.

use offload_bench::{
    broker::{self, BenchQueue},
    stats::{self, Line, percent, rate},
};

use crate::{Args, drain::drain_with_worker, publish::compare_gateways};

/// POST /tasks on a gateway exporting a span per request (OTLP over HTTP, to a receiver in
/// this process that answers at once) against one without `OTEL_EXPORTER_OTLP_ENDPOINT`,
/// alternating. Every request starts a trace and is sampled: the dearest case.
pub(crate) async fn tracing_cost(
    args: &Args,
    url: &str,
    queue: &BenchQueue,
) -> Result<Line, lapin::Error> {
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
pub(crate) async fn otlp_sink() -> (String, tokio::task::JoinHandle<std::io::Result<()>>) {
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
pub(crate) async fn drain_tracing_cost(
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
            broker::fill(url, &queue.kind_queue("sleep"), "sleep", args.tasks).await?;
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
