//! Injecting a scenario's fault, and healing it.

use std::time::Duration;

use tokio::time::Instant;

use super::rig::Brokers;
use super::{Fault, GatewayProcess, Rig, STEP_DEADLINE};
use crate::{PrivateCluster, WorkerProcess, cluster::NODES, eventually};

impl Rig {
    /// Injects `fault` and heals it; returns the moment recovery is measured from: when it
    /// was healed (the broker back, the network whole, the new gateway process launched) or,
    /// on a cluster, when the work queue had a new leader.
    pub(super) async fn inject(&mut self, fault: Fault) -> Instant {
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
            Fault::NetworkReset | Fault::TwoKinds => self.proxy().reset(),
            Fault::WorkerKill => {
                let victim = self.workers[0].pid();
                eventually(STEP_DEADLINE, "a worker with tasks in hand", || {
                    let in_hand = self.has_tasks_in_hand(victim);
                    async move { in_hand.then_some(()) }
                })
                .await;
                self.workers[0].kill();
                let replacement =
                    WorkerProcess::start(&self.worker_url, &self.queue, &self.worker_options).await;
                self.workers.push(replacement);
            }
            Fault::GatewayKill => {
                let killed = std::time::SystemTime::now();
                self.gateway.kill();
                tokio::time::sleep(Duration::from_secs(1)).await;
                let launched = Instant::now();
                self.gateway = GatewayProcess::start(self.gateway_port, &self.env).await;
                self.gateway_down
                    .push((killed, std::time::SystemTime::now()));
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

    pub(super) async fn inject_on_cluster(&mut self, fault: Fault) -> Instant {
        // The load's kind's queue: whose leader the faults are about.
        let queue = format!("{}.kind.sleep", self.queue);
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
        let leader = eventually(STEP_DEADLINE, "the kind's queue's leader", || {
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
