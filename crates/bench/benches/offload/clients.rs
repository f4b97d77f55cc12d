//! Hostile clients: the gateway's memory with every connection held by a slow client; and
//! the memory lines of the report.

use std::{path::Path, time::Duration};

use offload_bench::{
    broker::BenchQueue,
    free_port, http,
    process::{self},
    slow::{self, Attack},
    stats::{self, Line, millis},
};

use crate::GATEWAY;

/// The gateway's memory with every connection it serves held by a slow client, with the
/// default limits: never-ending request heads, then never-ending bodies, each against a
/// fresh gateway; and how fast a connection over the cap is answered meanwhile.
pub(crate) async fn slow_clients(url: &str, queue: &BenchQueue) -> Vec<Line> {
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

/// The memory lines; the worker's only when a worker ran (not with `--only publish`).
pub(crate) fn memory(gateway_peak: u64, worker_peak: Option<u64>) -> Vec<Line> {
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
