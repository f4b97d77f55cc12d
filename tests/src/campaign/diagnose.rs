//! What a failed row needs explained: the workers' log lines of lost tasks, every queue of
//! the scenario holding messages, each node's warnings and errors.

use std::time::Duration;

use uuid::Uuid;

use super::Rig;
use super::rig::Brokers;
use crate::PrivateCluster;

impl Rig {
    /// Prints what a failed row needs explained: what the workers logged of the first tasks
    /// `lost`, every queue of the scenario holding messages (on a cluster, as each node sees
    /// the queues it leads, and its channels holding deliveries) and each node's warnings
    /// and errors.
    pub(super) async fn diagnose(&self, lost: &[Uuid]) {
        for id in lost.iter().take(3) {
            let id = id.to_string();
            let mut logged = false;
            for (w, worker) in self.workers.iter().enumerate() {
                for event in worker
                    .log()
                    .iter()
                    .filter(|event| event["span"]["task_id"] == id.as_str())
                {
                    logged = true;
                    eprintln!(
                        "  lost {id}, worker {w}: {} {}",
                        event["timestamp"], event["message"]
                    );
                }
            }
            if !logged {
                eprintln!("  lost {id}: no worker logged anything of it");
            }
        }
        let nodes = match &self.brokers {
            Brokers::Single { node, .. } => {
                let queues = node
                    .tool_output(
                        "rabbitmqctl",
                        &[
                            "list_queues",
                            "--quiet",
                            "name",
                            "messages",
                            "messages_unacknowledged",
                        ],
                    )
                    .await
                    .unwrap_or_default();
                for line in queues.lines().filter(|line| line.starts_with(&self.queue)) {
                    if line.split_whitespace().skip(1).any(|count| count != "0") {
                        eprintln!("  queue: {line}");
                    }
                }
                std::slice::from_ref(node)
            }
            Brokers::Cluster { cluster, .. } => {
                self.diagnose_cluster(cluster).await;
                cluster.nodes()
            }
        };
        for (i, node) in nodes.iter().enumerate() {
            let lines =
                node.log_lines(|line| line.contains("[warning]") || line.contains("[error]"));
            for line in &lines[lines.len().saturating_sub(40)..] {
                eprintln!("  node {i} log: {line}");
            }
        }
    }

    /// On a cluster: each node's own queues (those it leads) holding messages, its channels
    /// holding unacknowledged deliveries, and the work queue's Raft members. Each question is
    /// bounded, since a node cut off from its peers can keep a command waiting.
    pub(super) async fn diagnose_cluster(&self, cluster: &PrivateCluster) {
        const LIMIT: Duration = Duration::from_secs(15);
        for (i, node) in cluster.nodes().iter().enumerate() {
            let ask = |program: &'static str, args: &'static [&'static str]| {
                tokio::time::timeout(LIMIT, node.tool_output(program, args))
            };
            let queues = ask(
                "rabbitmqctl",
                &[
                    "list_queues",
                    "--local",
                    "--quiet",
                    "--no-table-headers",
                    "name",
                    "messages_ready",
                    "messages_unacknowledged",
                    "consumers",
                ],
            )
            .await;
            match queues {
                Ok(Some(queues)) => {
                    for line in queues.lines().filter(|line| line.starts_with(&self.queue)) {
                        eprintln!("  node {i} leads: {line}");
                    }
                }
                _ => eprintln!("  node {i}: no answer to list_queues"),
            }
            let channels = ask(
                "rabbitmqctl",
                &[
                    "list_channels",
                    "--quiet",
                    "--no-table-headers",
                    "pid",
                    "messages_unacknowledged",
                    "consumer_count",
                ],
            )
            .await;
            if let Ok(Some(channels)) = channels {
                for line in channels.lines() {
                    if line.split_whitespace().nth(1).is_some_and(|n| n != "0") {
                        eprintln!("  node {i} channel: {line}");
                    }
                }
            }
        }
        if let Some(node) = cluster.nodes().first() {
            let status = tokio::time::timeout(
                LIMIT,
                node.tool_output("rabbitmq-queues", &["quorum_status", &self.queue]),
            )
            .await;
            if let Ok(Some(status)) = status {
                for line in status.lines() {
                    eprintln!("  quorum status: {line}");
                }
            }
        }
    }
}
