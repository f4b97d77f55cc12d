//! Everything one scenario runs on: the broker (a node or a cluster) behind proxies, the
//! gateway and worker processes; what they completed and what is dead.

use std::{
    collections::{HashMap, HashSet},
    time::Duration,
};

use lapin::{Connection, ConnectionProperties, options::QueueDeclareOptions, types::FieldTable};
use uuid::Uuid;

use super::{
    CLUSTER_REPLICAS, CONFIRM_TIMEOUT, CONNECT_TIMEOUT, DELIVERY_LIMIT, Fault, HEARTBEAT,
    MAX_ATTEMPTS, PREFETCH, STEP_DEADLINE, WORKERS,
};
use crate::{
    FaultyProxy, GatewayProcess, PrivateBroker, PrivateCluster, WorkerOptions, WorkerProcess,
    eventually, free_port,
};

/// The broker side of a scenario.
pub(super) enum Brokers {
    /// One node behind one proxy, which gateway and workers share.
    Single {
        node: PrivateBroker,
        proxy: FaultyProxy,
    },
    /// Three nodes, each behind a proxy for the gateway and one for the workers.
    Cluster {
        cluster: PrivateCluster,
        gateway_proxies: Vec<FaultyProxy>,
        /// Kept for their connections; the workers' URL names them.
        _worker_proxies: Vec<FaultyProxy>,
    },
}

/// Everything one scenario runs on.
pub(super) struct Rig {
    pub(super) brokers: Brokers,
    pub(super) gateway: GatewayProcess,
    pub(super) gateway_port: u16,
    pub(super) env: Vec<(&'static str, String)>,
    pub(super) workers: Vec<WorkerProcess>,
    pub(super) worker_options: WorkerOptions,
    pub(super) worker_url: String,
    pub(super) queue: String,
    /// When the gateway was down: killed, and ready again.
    pub(super) gateway_down: Vec<(std::time::SystemTime, std::time::SystemTime)>,
    /// The record the workers' handlers write (`offload-campaign-worker`'s
    /// `CAMPAIGN_RECORD`).
    record: std::path::PathBuf,
    /// Holds the record and the schedules file the gateway starts with (`super::ticks`).
    _files: tempfile::TempDir,
}

/// Proxies in front of `addresses`, and the comma-separated AMQP URL list that names them.
pub(super) async fn proxies(addresses: &[std::net::SocketAddr]) -> (Vec<FaultyProxy>, String) {
    let mut proxies = Vec::new();
    for &address in addresses {
        proxies.push(FaultyProxy::start(address).await.expect("start a proxy"));
    }
    let urls: Vec<String> = proxies
        .iter()
        .map(|proxy| format!("amqp://guest:guest@127.0.0.1:{}/%2f", proxy.port()))
        .collect();
    (proxies, urls.join(","))
}

impl Rig {
    pub(super) async fn start(fault: Fault, worker_env: &[(&'static str, String)]) -> Self {
        let (brokers, gateway_url, worker_url) = if fault.on_cluster() {
            let cluster = PrivateCluster::start().await;
            let addresses: Vec<_> = cluster.nodes().iter().map(PrivateBroker::addr).collect();
            let (gateway_proxies, gateway_url) = proxies(&addresses).await;
            let (worker_proxies, worker_url) = proxies(&addresses).await;
            let brokers = Brokers::Cluster {
                cluster,
                gateway_proxies,
                _worker_proxies: worker_proxies,
            };
            (brokers, gateway_url, worker_url)
        } else {
            let node = PrivateBroker::start().await;
            let (mut proxies, url) = proxies(&[node.addr()]).await;
            let proxy = proxies.pop().expect("one proxy for one node");
            (Brokers::Single { node, proxy }, url.clone(), url)
        };
        let queue = format!(
            "campaign-{}-{}",
            fault.name(),
            &Uuid::new_v4().simple().to_string()[..8]
        );
        let mut common = vec![
            ("HEARTBEAT", HEARTBEAT.to_owned()),
            ("CONNECT_TIMEOUT", CONNECT_TIMEOUT.to_owned()),
        ];
        if fault.on_cluster() {
            common.push(("REPLICAS", CLUSTER_REPLICAS.to_owned()));
        }
        let files = tempfile::tempdir().expect("a directory for the scenario's files");
        let schedules_file = super::ticks::write_file(files.path());
        let record = files.path().join("record");
        let env: Vec<_> = [
            ("AMQP_URL", gateway_url),
            ("QUEUE", queue.clone()),
            ("DELIVERY_LIMIT", DELIVERY_LIMIT.to_string()),
            ("CONFIRM_TIMEOUT", CONFIRM_TIMEOUT.to_owned()),
            ("SCHEDULES_FILE", schedules_file.display().to_string()),
        ]
        .into_iter()
        .chain(common.iter().cloned())
        .collect();
        let gateway_port = free_port();
        let gateway = GatewayProcess::start(gateway_port, &env).await;
        let worker_options = WorkerOptions {
            prefetch: PREFETCH,
            sleep_unit: "10ms",
            shutdown_grace: "5s",
            delivery_limit: DELIVERY_LIMIT,
            binary: "offload-campaign-worker",
            env: common
                .into_iter()
                // Poison tasks die after MAX_ATTEMPTS; retries go through the delay levels at
                // once (RETRY_BASE 0s).
                .chain([("MAX_ATTEMPTS", MAX_ATTEMPTS.to_string())])
                .chain([("CAMPAIGN_RECORD", record.display().to_string())])
                .chain(worker_env.iter().cloned())
                .collect(),
            // What the workers did is read from their handlers' record (`Rig::completions`).
            follow_events: false,
        };
        let mut workers = Vec::new();
        for n in 0..WORKERS {
            let mut options = worker_options.clone();
            if fault == Fault::TwoKinds {
                // One kind each: a task that reached a worker without its kind would die
                // `no_handler`, and the checker counts every dead task.
                let kinds = if n % 2 == 0 { "sleep" } else { "flaky" };
                options.env.push(("CAMPAIGN_KINDS", kinds.to_owned()));
            }
            workers.push(WorkerProcess::start(&worker_url, &queue, &options).await);
        }
        Self {
            brokers,
            gateway,
            gateway_port,
            env,
            workers,
            worker_options,
            worker_url,
            queue,
            gateway_down: Vec::new(),
            record,
            _files: files,
        }
    }

    /// The single node, for a single-node fault.
    pub(super) fn node(&mut self) -> &mut PrivateBroker {
        match &mut self.brokers {
            Brokers::Single { node, .. } => node,
            Brokers::Cluster { .. } => panic!("a single-node fault asked for on a cluster"),
        }
    }

    /// The single node's proxy, for a network fault.
    pub(super) fn proxy(&self) -> &FaultyProxy {
        match &self.brokers {
            Brokers::Single { proxy, .. } => proxy,
            Brokers::Cluster { .. } => panic!("a single-node fault asked for on a cluster"),
        }
    }

    /// The cluster, for a cluster fault.
    pub(super) fn cluster(&mut self) -> &mut PrivateCluster {
        match &mut self.brokers {
            Brokers::Cluster { cluster, .. } => cluster,
            Brokers::Single { .. } => panic!("a cluster fault asked for on a single node"),
        }
    }

    /// Direct URLs of the nodes (not through a proxy), for the checker's own questions.
    pub(super) fn direct_urls(&self) -> Vec<String> {
        match &self.brokers {
            Brokers::Single { node, .. } => vec![node.url()],
            Brokers::Cluster { cluster, .. } => {
                cluster.nodes().iter().map(PrivateBroker::url).collect()
            }
        }
    }

    /// A connection of the checker's own to whichever node answers first.
    pub(super) async fn direct_connection(&self) -> Option<Connection> {
        for url in self.direct_urls() {
            // Bounded: a node that takes the TCP connection but not the handshake is skipped.
            let connect = Connection::connect(&url, ConnectionProperties::default());
            if let Ok(Ok(connection)) = tokio::time::timeout(Duration::from_secs(5), connect).await
            {
                return Some(connection);
            }
        }
        None
    }

    /// The lines of the workers' record: (process id, `started` or `succeeded`, task id).
    fn recorded(&self) -> Vec<(u32, String, Uuid)> {
        // Absent until a handler first runs.
        let text = std::fs::read_to_string(&self.record).unwrap_or_default();
        text.lines()
            .filter_map(|line| {
                let mut fields = line.split(' ');
                let pid = fields.next()?.parse().ok()?;
                let what = fields.next()?.to_owned();
                let id = fields.next()?.parse().ok()?;
                Some((pid, what, id))
            })
            .collect()
    }

    /// How many attempts of each task succeeded, on every worker process this scenario
    /// started, killed or not, as their handlers recorded it.
    pub(super) fn completions(&self) -> HashMap<Uuid, usize> {
        let mut counts = HashMap::new();
        for (_, what, id) in self.recorded() {
            if what == "succeeded" {
                *counts.entry(id).or_insert(0) += 1;
            }
        }
        counts
    }

    /// Every task whose handler any worker process of this scenario started.
    pub(super) fn starts(&self) -> HashSet<Uuid> {
        self.recorded()
            .into_iter()
            .filter(|(_, what, _)| what == "started")
            .map(|(_, _, id)| id)
            .collect()
    }

    /// Whether the worker process `pid` has started attempts it has not finished.
    pub(super) fn has_tasks_in_hand(&self, pid: u32) -> bool {
        let (mut started, mut succeeded) = (0, 0);
        for (by, what, _) in self.recorded() {
            if by == pid {
                match what.as_str() {
                    "started" => started += 1,
                    _ => succeeded += 1,
                }
            }
        }
        started > succeeded
    }

    /// Returns once every kind's queue of the single node has a consumer of each worker.
    pub(super) async fn await_workers_consuming(&mut self) {
        let prefix = format!("{}.kind.", self.queue);
        let node = self.node();
        eventually(
            STEP_DEADLINE,
            "both workers consuming every kind",
            || async {
                let listed = node
                    .tool_output(
                        "rabbitmqctl",
                        &["list_queues", "--quiet", "name", "consumers"],
                    )
                    .await?;
                let consumers: Vec<usize> = listed
                    .lines()
                    .filter(|line| line.starts_with(&prefix))
                    .filter_map(|line| line.split_whitespace().nth(1)?.parse().ok())
                    .collect();
                (!consumers.is_empty() && consumers.iter().all(|n| *n >= WORKERS)).then_some(())
            },
        )
        .await;
    }

    /// Messages in the dead-letter queue, asked over a connection of the campaign's own.
    pub(super) async fn dead_lettered(&self) -> Option<u32> {
        let connection = self.direct_connection().await?;
        let channel = connection.create_channel().await.ok()?;
        let declared = channel
            .queue_declare(
                format!("{}.dead", self.queue).as_str().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .ok()?;
        let _ = connection.close(200, "counted".into()).await;
        Some(declared.message_count())
    }

    /// The task ids of the messages in the dead-letter queue, each once: at-least-once
    /// delivery may put two copies of one task there (its ack lost in a broker restart after
    /// its dead copy was confirmed). The messages are read unacknowledged and go back to the
    /// queue when the connection closes.
    pub(super) async fn dead_ids(&self) -> Option<HashSet<Uuid>> {
        let connection = self.direct_connection().await?;
        let channel = connection.create_channel().await.ok()?;
        let queue = format!("{}.dead", self.queue);
        let mut ids = HashSet::new();
        while let Some(message) = channel
            .basic_get(
                queue.as_str().into(),
                lapin::options::BasicGetOptions { no_ack: false },
            )
            .await
            .ok()?
        {
            if let Some(id) = crate::queue::task_id_of(&message) {
                ids.insert(id);
            }
        }
        let _ = connection.close(200, "read".into()).await;
        Some(ids)
    }
}
