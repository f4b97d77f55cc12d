//! The fault campaign: load on a real gateway and real workers, one fault at a time, then a
//! check that every task that got a 202 ran. In the spirit of Jepsen's queue checker.
//!
//! Each scenario gets a private RabbitMQ node, a [`FaultyProxy`] in front of it, a gateway
//! process and two worker processes (prefetch 4). Load runs throughout; the fault is
//! injected once the queue is warm and healed after a while; load goes on until 202s are
//! back, then the workers drain and the checker compares what was promised with what ran.
//!
//! The cluster scenarios run on a [`PrivateCluster`] instead: three nodes, each in a network
//! namespace of its own behind two proxies (one for the gateway, one for the workers, so the
//! campaign knows which node the gateway uses), every process given all three addresses.

mod load;
mod report;

use std::{
    collections::{HashMap, HashSet},
    time::{Duration, SystemTime},
};

use lapin::{Connection, ConnectionProperties, options::QueueDeclareOptions, types::FieldTable};
use tokio::time::Instant;
use uuid::Uuid;

pub use load::{Load, LoadShape, Outcome, Record};
pub use report::{Row, markdown, table};

use crate::{
    FaultyProxy, GatewayProcess, PrivateBroker, PrivateCluster, WorkerOptions, WorkerProcess,
    cluster::NODES, eventually, free_port,
};

/// The settings every scenario runs offload with: shorter than the defaults so that a fault
/// is noticed, and healed, within a campaign of a few minutes.
const CONFIRM_TIMEOUT: &str = "2s";
/// The same, as a duration, for the checker.
pub(crate) const CONFIRM_TIMEOUT_SECS: Duration = Duration::from_secs(2);
const HEARTBEAT: &str = "2";
const CONNECT_TIMEOUT: &str = "2s";
const DELIVERY_LIMIT: u32 = 2;
const WORKERS: usize = 2;
const PREFETCH: u16 = 4;
/// How long load runs after 202s have resumed.
const AFTER_RECOVERY: Duration = Duration::from_secs(2);
/// Longest the campaign waits for a step (recovery, drain) before calling the scenario failed.
const STEP_DEADLINE: Duration = Duration::from_secs(60);
/// Every request must be answered within the confirm timeout; this much more is allowed for
/// the HTTP exchange and scheduling on a busy machine (two cores running the load, the
/// gateway, two workers and, in the cluster scenarios, three RabbitMQ nodes, one of them
/// booting: an answer once took 2.85 s there).
pub(crate) const ANSWER_SLACK: Duration = Duration::from_secs(1);
/// On a cluster, 202s must be back this soon after the queue has a new leader (or the node
/// the gateway lost is back): the bound. Before the gateway renewed its publishing
/// channel on a nack, one run in ten of `cluster-leader-kill` took 3.5 s and a partition once
/// 5 s: RabbitMQ 3.10 nacks a channel that first published while the leader was down until
/// that node is back (docs/RELIABILITY.md).
pub(crate) const CLUSTER_RECOVERY: Duration = Duration::from_secs(2);
/// How many nodes hold each queue in the cluster scenarios (`REPLICAS`).
const CLUSTER_REPLICAS: &str = "3";

/// One fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// `kill -9` of the broker, then started again on the same data.
    BrokerKill,
    /// `rabbitmqctl stop_app` then `start_app`: every connection closed by the broker.
    BrokerRestart,
    /// SIGSTOP for longer than the confirm timeout, then SIGCONT.
    BrokerPause,
    /// Every connection closed and new ones refused, then healed.
    NetworkCut,
    /// No byte moves on any connection for longer than two heartbeats, then healed.
    NetworkHang,
    /// Every connection aborted with a TCP RST.
    NetworkReset,
    /// `kill -9` of a worker with tasks in hand; a replacement is started.
    WorkerKill,
    /// `kill -9` of the gateway under load; it is started again.
    GatewayKill,
    /// One task in 20 panics its handler on every attempt.
    PoisonTask,
    /// The broker's memory alarm raised, then cleared.
    MemoryAlarm,
    /// Every task fails a scripted number of times (retried through the delay levels) while
    /// the broker restarts.
    RetriesRestart,
    /// Cluster: `kill -9` of the node holding the work queue's leader, started again.
    ClusterLeaderKill,
    /// Cluster: a node holding a follower stopped (`rabbitmqctl stop`) and started again.
    ClusterFollowerRestart,
    /// Cluster: the leader's node cut off from the other two (inter-node links down), then
    /// joined again.
    ClusterPartition,
    /// Cluster: every node stopped and started again, one at a time.
    ClusterRollingRestart,
    /// Cluster: `kill -9` of the node the gateway is connected to.
    ClusterGatewayNodeKill,
}

impl Fault {
    /// Every fault, in campaign order.
    pub const ALL: [Fault; 16] = [
        Fault::BrokerKill,
        Fault::BrokerRestart,
        Fault::BrokerPause,
        Fault::NetworkCut,
        Fault::NetworkHang,
        Fault::NetworkReset,
        Fault::WorkerKill,
        Fault::GatewayKill,
        Fault::PoisonTask,
        Fault::MemoryAlarm,
        Fault::RetriesRestart,
        Fault::ClusterLeaderKill,
        Fault::ClusterFollowerRestart,
        Fault::ClusterPartition,
        Fault::ClusterRollingRestart,
        Fault::ClusterGatewayNodeKill,
    ];

    /// Short name, for `--only` and the table.
    pub fn name(self) -> &'static str {
        match self {
            Fault::BrokerKill => "broker-kill",
            Fault::BrokerRestart => "broker-restart",
            Fault::BrokerPause => "broker-pause",
            Fault::NetworkCut => "network-cut",
            Fault::NetworkHang => "network-hang",
            Fault::NetworkReset => "network-reset",
            Fault::WorkerKill => "worker-kill",
            Fault::GatewayKill => "gateway-kill",
            Fault::PoisonTask => "poison-task",
            Fault::MemoryAlarm => "memory-alarm",
            Fault::RetriesRestart => "retries-restart",
            Fault::ClusterLeaderKill => "cluster-leader-kill",
            Fault::ClusterFollowerRestart => "cluster-follower-restart",
            Fault::ClusterPartition => "cluster-partition",
            Fault::ClusterRollingRestart => "cluster-rolling-restart",
            Fault::ClusterGatewayNodeKill => "cluster-gateway-node-kill",
        }
    }

    /// What is done, for the report.
    pub fn description(self) -> &'static str {
        match self {
            Fault::BrokerKill => "broker `kill -9`, 2 s down, started again",
            Fault::BrokerRestart => "`rabbitmqctl stop_app`, 2 s, `start_app`",
            Fault::BrokerPause => "broker SIGSTOP for 4 s (twice the confirm timeout), SIGCONT",
            Fault::NetworkCut => "proxy closes every connection and refuses new ones for 3 s",
            Fault::NetworkHang => "proxy moves no byte for 6 s (three heartbeats)",
            Fault::NetworkReset => "proxy aborts every connection with a TCP RST",
            Fault::WorkerKill => {
                "a worker `kill -9`ed with tasks in hand (prefetch 4), a new one started"
            }
            Fault::GatewayKill => "gateway `kill -9`ed under load, started again after 1 s",
            Fault::PoisonTask => "one task in 20 panics its handler on every attempt",
            Fault::MemoryAlarm => "memory alarm raised for 3 s (`set_vm_memory_high_watermark`)",
            Fault::RetriesRestart => {
                "every task scripted to fail 0, 1 or 2 times or every time (`MAX_ATTEMPTS` 3, retried after 1-2 s through the delay levels; failing every time: dead), broker `stop_app`, 2 s, `start_app`"
            }
            Fault::ClusterLeaderKill => {
                "three nodes: the node holding the queue's leader `kill -9`ed, started again 2 s after a new leader is elected"
            }
            Fault::ClusterFollowerRestart => {
                "three nodes: a node holding a follower `rabbitmqctl stop`ped, 2 s, started again"
            }
            Fault::ClusterPartition => {
                "three nodes: the leader's node cut off from the other two (its inter-node links down; clients still reach it) until 5 s after a new leader is elected, then joined again"
            }
            Fault::ClusterRollingRestart => {
                "three nodes: each in turn `rabbitmqctl stop`ped and started again, the next once the cluster has three nodes running"
            }
            Fault::ClusterGatewayNodeKill => {
                "three nodes: the node the gateway is connected to `kill -9`ed, started again after 2 s"
            }
        }
    }

    /// Whether the scenario runs on a three-node cluster.
    pub fn on_cluster(self) -> bool {
        matches!(
            self,
            Fault::ClusterLeaderKill
                | Fault::ClusterFollowerRestart
                | Fault::ClusterPartition
                | Fault::ClusterRollingRestart
                | Fault::ClusterGatewayNodeKill
        )
    }

    fn touches_broker_data(self) -> bool {
        matches!(self, Fault::BrokerKill)
    }

    fn measures_recovery(self) -> bool {
        !matches!(self, Fault::WorkerKill | Fault::PoisonTask)
    }
}

/// The broker side of a scenario.
enum Brokers {
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
struct Rig {
    brokers: Brokers,
    gateway: GatewayProcess,
    gateway_port: u16,
    env: Vec<(&'static str, String)>,
    workers: Vec<WorkerProcess>,
    worker_options: WorkerOptions,
    worker_url: String,
    queue: String,
}

/// Proxies in front of `addresses`, and the comma-separated AMQP URL list that names them.
async fn proxies(addresses: &[std::net::SocketAddr]) -> (Vec<FaultyProxy>, String) {
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
    async fn start(fault: Fault, worker_env: &[(&'static str, String)]) -> Self {
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
        let env: Vec<_> = [
            ("AMQP_URL", gateway_url),
            ("QUEUE", queue.clone()),
            ("DELIVERY_LIMIT", DELIVERY_LIMIT.to_string()),
            ("CONFIRM_TIMEOUT", CONFIRM_TIMEOUT.to_owned()),
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
                // Poison tasks die after as many attempts as the delivery limit allows
                // redeliveries; retries go through the delay levels at once (RETRY_BASE 0s).
                .chain([("MAX_ATTEMPTS", (DELIVERY_LIMIT + 1).to_string())])
                .chain(worker_env.iter().cloned())
                .collect(),
        };
        let mut workers = Vec::new();
        for _ in 0..WORKERS {
            workers.push(WorkerProcess::start(&worker_url, &queue, &worker_options).await);
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
        }
    }

    /// The single node, for a single-node fault.
    fn node(&mut self) -> &mut PrivateBroker {
        match &mut self.brokers {
            Brokers::Single { node, .. } => node,
            Brokers::Cluster { .. } => panic!("a single-node fault asked for on a cluster"),
        }
    }

    /// The single node's proxy, for a network fault.
    fn proxy(&self) -> &FaultyProxy {
        match &self.brokers {
            Brokers::Single { proxy, .. } => proxy,
            Brokers::Cluster { .. } => panic!("a single-node fault asked for on a cluster"),
        }
    }

    /// The cluster, for a cluster fault.
    fn cluster(&mut self) -> &mut PrivateCluster {
        match &mut self.brokers {
            Brokers::Cluster { cluster, .. } => cluster,
            Brokers::Single { .. } => panic!("a cluster fault asked for on a single node"),
        }
    }

    /// Direct URLs of the nodes (not through a proxy), for the checker's own questions.
    fn direct_urls(&self) -> Vec<String> {
        match &self.brokers {
            Brokers::Single { node, .. } => vec![node.url()],
            Brokers::Cluster { cluster, .. } => {
                cluster.nodes().iter().map(PrivateBroker::url).collect()
            }
        }
    }

    /// A connection of the checker's own to whichever node answers first.
    async fn direct_connection(&self) -> Option<Connection> {
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

    /// Every completion logged by every worker process this scenario started, killed or not.
    fn completions(&self) -> HashMap<Uuid, usize> {
        let mut counts = HashMap::new();
        for worker in &self.workers {
            for id in worker.completed() {
                *counts.entry(id).or_insert(0) += 1;
            }
        }
        counts
    }

    /// Prints what a failed row needs explained: what the workers logged of the first tasks
    /// `lost`, every queue of the scenario holding messages (on a cluster, as each node sees
    /// the queues it leads, and its channels holding deliveries) and each node's warnings
    /// and errors.
    async fn diagnose(&self, lost: &[Uuid]) {
        for id in lost.iter().take(3) {
            let id = id.to_string();
            for (w, worker) in self.workers.iter().enumerate() {
                for event in worker
                    .log()
                    .iter()
                    .filter(|event| event["span"]["task_id"] == id.as_str())
                {
                    eprintln!(
                        "  lost {id}, worker {w}: {} {}",
                        event["timestamp"], event["message"]
                    );
                }
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
    async fn diagnose_cluster(&self, cluster: &PrivateCluster) {
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

    /// Messages in the dead-letter queue, asked over a connection of the campaign's own.
    async fn dead_lettered(&self) -> Option<u32> {
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
    async fn dead_ids(&self) -> Option<HashSet<Uuid>> {
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

    /// Injects `fault` and heals it; returns the moment recovery is measured from: when it
    /// was healed (the broker back, the network whole, the new gateway process launched) or,
    /// on a cluster, when the work queue had a new leader.
    async fn inject(&mut self, fault: Fault) -> Instant {
        if fault.on_cluster() {
            return self.inject_on_cluster(fault).await;
        }
        match fault {
            Fault::BrokerKill => {
                self.node().kill9().await;
                tokio::time::sleep(Duration::from_secs(2)).await;
                self.node().start_again().await;
            }
            Fault::BrokerRestart | Fault::RetriesRestart => {
                self.node().stop_app();
                tokio::time::sleep(Duration::from_secs(2)).await;
                self.node().start_app();
            }
            Fault::BrokerPause => {
                self.node().pause();
                tokio::time::sleep(Duration::from_secs(4)).await;
                self.node().resume();
            }
            Fault::NetworkCut => {
                self.proxy().cut();
                tokio::time::sleep(Duration::from_secs(3)).await;
                self.proxy().heal();
            }
            Fault::NetworkHang => {
                self.proxy().hang();
                tokio::time::sleep(Duration::from_secs(6)).await;
                self.proxy().heal();
            }
            Fault::NetworkReset => self.proxy().reset(),
            Fault::WorkerKill => {
                let victim = &mut self.workers[0];
                eventually(STEP_DEADLINE, "a worker with tasks in hand", || {
                    let in_hand = victim.started().len() > victim.completed().len();
                    async move { in_hand.then_some(()) }
                })
                .await;
                victim.kill();
                let replacement =
                    WorkerProcess::start(&self.worker_url, &self.queue, &self.worker_options).await;
                self.workers.push(replacement);
            }
            Fault::GatewayKill => {
                self.gateway.kill();
                tokio::time::sleep(Duration::from_secs(1)).await;
                let launched = Instant::now();
                self.gateway = GatewayProcess::start(self.gateway_port, &self.env).await;
                return launched;
            }
            Fault::PoisonTask => {}
            Fault::MemoryAlarm => {
                self.node().memory_alarm(true);
                tokio::time::sleep(Duration::from_secs(3)).await;
                self.node().memory_alarm(false);
            }
            Fault::ClusterLeaderKill
            | Fault::ClusterFollowerRestart
            | Fault::ClusterPartition
            | Fault::ClusterRollingRestart
            | Fault::ClusterGatewayNodeKill => unreachable!("cluster faults return above"),
        }
        Instant::now()
    }

    async fn inject_on_cluster(&mut self, fault: Fault) -> Instant {
        let queue = self.queue.clone();
        // The node the gateway uses, read before anything moves it.
        let gateway_node = match &self.brokers {
            Brokers::Cluster {
                gateway_proxies, ..
            } => gateway_proxies
                .iter()
                .position(|proxy| proxy.open_connections() > 0),
            Brokers::Single { .. } => None,
        };
        let cluster = self.cluster();
        let leader = eventually(STEP_DEADLINE, "the work queue's leader", || {
            cluster.leader_of(&queue, &[])
        })
        .await;
        let all_running = async |cluster: &PrivateCluster| {
            cluster
                .await_running(NODES, STEP_DEADLINE, "three nodes running again")
                .await;
        };
        match fault {
            Fault::ClusterLeaderKill | Fault::ClusterGatewayNodeKill => {
                let victim = if fault == Fault::ClusterLeaderKill {
                    leader
                } else {
                    gateway_node.expect("the gateway is connected to a node")
                };
                cluster.node_mut(victim).kill9().await;
                if victim == leader {
                    cluster
                        .await_new_leader(&queue, leader, STEP_DEADLINE)
                        .await;
                }
                let measured_from = Instant::now();
                tokio::time::sleep(Duration::from_secs(2)).await;
                cluster.node_mut(victim).start_again().await;
                all_running(cluster).await;
                measured_from
            }
            Fault::ClusterFollowerRestart => {
                let follower = (0..NODES)
                    .find(|&node| node != leader)
                    .expect("three nodes have a follower");
                cluster.node_mut(follower).stop().await;
                tokio::time::sleep(Duration::from_secs(2)).await;
                cluster.node_mut(follower).start_again().await;
                let healed = Instant::now();
                all_running(cluster).await;
                healed
            }
            Fault::ClusterPartition => {
                cluster.isolate(leader);
                cluster
                    .await_new_leader(&queue, leader, STEP_DEADLINE)
                    .await;
                let elected = Instant::now();
                tokio::time::sleep(Duration::from_secs(5)).await;
                cluster.rejoin(leader);
                all_running(cluster).await;
                elected
            }
            Fault::ClusterRollingRestart => {
                for node in 0..NODES {
                    cluster.node_mut(node).stop().await;
                    cluster.node_mut(node).start_again().await;
                    all_running(cluster).await;
                }
                Instant::now()
            }
            _ => unreachable!("{} is not a cluster fault", fault.name()),
        }
    }
}

/// Runs one scenario and checks it.
pub async fn run(fault: Fault, shape: &LoadShape) -> Row {
    let mut shape = shape.clone();
    let mut worker_env = Vec::new();
    if fault == Fault::PoisonTask {
        shape.poison_every = Some(20);
    }
    if fault == Fault::RetriesRestart {
        shape.scripted_failures = Some(DELIVERY_LIMIT + 1);
        worker_env.push(("RETRY_BASE", "1s".to_owned()));
        worker_env.push(("RETRY_MAX", "2s".to_owned()));
    }
    let mut rig = Rig::start(fault, &worker_env).await;
    let load = Load::start(&rig.gateway.url("/tasks"), &shape);

    let first_ok = eventually(STEP_DEADLINE, "the first 202", || {
        let first = load
            .records()
            .iter()
            .any(|r| matches!(r.outcome, Outcome::Ok(_)));
        async move { first.then(SystemTime::now) }
    })
    .await;
    if fault.touches_broker_data() {
        rig.node().await_raft_metadata_synced(first_ok).await;
    } else {
        tokio::time::sleep(Duration::from_secs(1)).await;
    }

    let healed = rig.inject(fault).await;
    let recovery = eventually(STEP_DEADLINE, "202s to resume after the fault", || {
        let back = first_ok_since(&load.records(), healed);
        async move { back }
    })
    .await;
    tokio::time::sleep(AFTER_RECOVERY).await;
    let records = load.stop().await;

    let promised: HashSet<Uuid> = records
        .iter()
        .filter(|r| !r.poison)
        .filter_map(|r| match r.outcome {
            Outcome::Ok(id) => Some(id),
            _ => None,
        })
        .collect();
    let poison_promised = records
        .iter()
        .filter(|r| r.poison && matches!(r.outcome, Outcome::Ok(_)))
        .count();
    let drained = tokio::time::timeout(STEP_DEADLINE, async {
        loop {
            let done = rig.completions();
            let dead = rig.dead_lettered().await.unwrap_or(0) as usize;
            if promised.iter().all(|id| done.contains_key(id)) && dead >= poison_promised {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await
    .is_ok();

    let disagreeing = statuses_disagreeing(&rig.gateway.url(""), &records).await;
    let status_wrong = disagreeing.len();
    if !drained || status_wrong > 0 {
        let done = rig.completions();
        let lost: Vec<Uuid> = promised
            .iter()
            .filter(|id| !done.contains_key(id))
            .copied()
            .collect();
        rig.diagnose(&lost).await;
    }
    // Last, so that a log cut to its end still shows them.
    for line in disagreeing.iter().take(5) {
        eprintln!("{line}");
    }
    let completions = rig.completions();
    // Each poison task that got a 202 must be in the dead-letter queue, once or (at least
    // once) more; counted by id, so a duplicate cannot stand in for a missing one.
    // Bounded: reading needs the queue's leader, which a quorum queue killed in its first
    // seconds may never get back on RabbitMQ 3.10 (docs/RELIABILITY.md); then none is found.
    let dead = tokio::time::timeout(Duration::from_secs(10), rig.dead_ids())
        .await
        .ok()
        .flatten()
        .unwrap_or_default();
    let poison_dead = records
        .iter()
        .filter_map(|r| match r.outcome {
            Outcome::Ok(id) if r.poison => Some(id),
            _ => None,
        })
        .filter(|id| dead.contains(id))
        .count();
    Row::new(
        fault,
        &records,
        &promised,
        &completions,
        poison_dead,
        poison_promised,
        fault.measures_recovery().then_some(recovery),
        drained,
        status_wrong,
    )
}

/// The tasks that got a 202 but do not end with the status that says what happened to them
/// (`succeeded`, `dead` for poison tasks) on the gateway's GET /tasks/{id}, after giving the
/// view time to catch up: a line for each, with the last answer.
async fn statuses_disagreeing(base: &str, records: &[Record]) -> Vec<String> {
    let mut waiting: HashMap<Uuid, &'static str> = records
        .iter()
        .filter_map(|r| match r.outcome {
            Outcome::Ok(id) => Some((id, if r.poison { "dead" } else { "succeeded" })),
            _ => None,
        })
        .collect();
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .expect("an HTTP client with a timeout builds");
    let give_up = Instant::now() + STEP_DEADLINE;
    let mut last_seen: HashMap<Uuid, serde_json::Value> = HashMap::new();
    while !waiting.is_empty() && Instant::now() < give_up {
        let mut agreed = Vec::new();
        for (id, expected) in &waiting {
            let Ok(response) = client.get(format!("{base}/tasks/{id}")).send().await else {
                continue;
            };
            let Ok(body) = response.json::<serde_json::Value>().await else {
                continue;
            };
            if body["status"] == *expected {
                agreed.push(*id);
            } else {
                last_seen.insert(*id, body);
            }
        }
        for id in agreed {
            waiting.remove(&id);
        }
        if !waiting.is_empty() {
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
    waiting
        .iter()
        .map(|(id, expected)| {
            let seen = last_seen.get(id).map(ToString::to_string);
            format!(
                "task {id}: status never became {expected}; last answer: {}",
                seen.as_deref().unwrap_or("none")
            )
        })
        .collect()
}

/// How long after `healed` the first request sent then got its 202.
fn first_ok_since(records: &[Record], healed: Instant) -> Option<Duration> {
    records
        .iter()
        .filter(|r| r.sent >= healed && matches!(r.outcome, Outcome::Ok(_)))
        .map(|r| (r.sent + r.took).saturating_duration_since(healed))
        .min()
}
