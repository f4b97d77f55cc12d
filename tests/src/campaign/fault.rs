//! The faults the campaign injects, one per scenario, and what each one is.

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
    /// Two kinds of worker on one queue, each running one kind, tasks of both; every
    /// connection aborted with a TCP RST.
    TwoKinds,
    /// Every task fails a scripted number of times (retried through the delay levels) while
    /// the broker restarts.
    RetriesRestart,
    /// Cluster: `kill -9` of the node holding the `sleep` kind's queue's leader, started again.
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
    pub const ALL: [Fault; 17] = [
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
        Fault::TwoKinds,
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
            Fault::TwoKinds => "two-kinds",
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
            Fault::TwoKinds => {
                "two kinds of worker on one `QUEUE`, one running only `sleep`, the other only `flaky`, tasks of both alternating; the proxy aborts every connection with a TCP RST (none may end `no_handler`)"
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

    pub(super) fn touches_broker_data(self) -> bool {
        matches!(self, Fault::BrokerKill)
    }

    pub(super) fn measures_recovery(self) -> bool {
        !matches!(self, Fault::WorkerKill | Fault::PoisonTask)
    }
}
