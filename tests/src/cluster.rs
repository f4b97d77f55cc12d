//! A three-node RabbitMQ cluster of the test's own, each node in a network namespace of its
//! own, so that the links between nodes can be cut while clients still reach every node.
//!
//! ```text
//!   root namespace (gateway, workers, proxies)
//!      │ 10.N.1.0/24        │ 10.N.2.0/24        │ 10.N.3.0/24      client links (veth)
//!   [node 1] ──── m12 ──── [node 2] ──── m23 ──── [node 3]
//!      └───────────────────── m13 ──────────────────┘               inter-node links (veth)
//! ```
//!
//! Each namespace has its own loopback, epmd and standard ports (5672, 25672), and its own
//! hosts file (`/etc/netns/<namespace>/hosts`, which `ip netns exec` mounts over
//! `/etc/hosts`): there, the other nodes' names resolve to their ends of the inter-node
//! links, so Erlang distribution runs over those links only and cutting them partitions the
//! cluster without touching client traffic. No forwarding between namespaces: a cut link is
//! a cut path. Needs root and `ip` (iproute2).

use std::{
    fmt::Write as _,
    net::Ipv4Addr,
    process::{Command, Stdio},
    time::Duration,
};

use crate::{PrivateBroker, broker::Placement, eventually, free_port};

/// How many nodes.
pub const NODES: usize = 3;

/// Erlang's inter-node tick: a peer silent for about this long is down. RabbitMQ's default is
/// 60 s; short here so that a partition is noticed within a campaign scenario.
pub const NET_TICKTIME: Duration = Duration::from_secs(6);

/// The pause between two questions asked with RabbitMQ's command-line tools, while waiting
/// for something that takes seconds.
const CLI_PAUSE: Duration = Duration::from_millis(500);

/// The namespaces, links and hosts files of one cluster. Removed on drop.
struct Network {
    id: u16,
    subnet: u8,
}

impl Network {
    fn create() -> Self {
        // Unique among clusters alive at once (ports are), and among leftovers of a run that
        // was killed before it could clean up.
        let id = free_port();
        let network = Self {
            id,
            subnet: u8::try_from(id % 200).expect("below 200") + 20,
        };
        for i in 1..=NODES {
            let ns = network.namespace(i);
            ip(&["netns", "add", &ns]);
            ip(&["-n", &ns, "link", "set", "lo", "up"]);
            let host_end = format!("ofl{id}c{i}");
            ip(&[
                "link", "add", &host_end, "type", "veth", "peer", "name", "c", "netns", &ns,
            ]);
            ip(&[
                "addr",
                "add",
                &format!("{}/24", network.client_gateway(i)),
                "dev",
                &host_end,
            ]);
            ip(&["link", "set", &host_end, "up"]);
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{}/24", network.client_address(i)),
                "dev",
                "c",
            ]);
            ip(&["-n", &ns, "link", "set", "c", "up"]);
        }
        for (i, j) in Self::pairs() {
            let link = Self::link(i, j);
            let (a, b) = (network.namespace(i), network.namespace(j));
            ip(&[
                "-n", &a, "link", "add", &link, "type", "veth", "peer", "name", &link, "netns", &b,
            ]);
            for (k, ns) in [(i, &a), (j, &b)] {
                ip(&[
                    "-n",
                    ns,
                    "addr",
                    "add",
                    &format!("{}/24", network.mesh_address(i, j, k)),
                    "dev",
                    &link,
                ]);
                ip(&["-n", ns, "link", "set", &link, "up"]);
            }
        }
        for i in 1..=NODES {
            let mut hosts = String::from("127.0.0.1 localhost\n");
            for j in 1..=NODES {
                let address = if i == j {
                    Ipv4Addr::LOCALHOST
                } else {
                    network.mesh_address(i.min(j), i.max(j), j)
                };
                let _ = writeln!(hosts, "{address} {}", network.host(j));
            }
            let dir = format!("/etc/netns/{}", network.namespace(i));
            std::fs::create_dir_all(&dir).expect("create /etc/netns/<namespace>");
            std::fs::write(format!("{dir}/hosts"), hosts).expect("write the namespace's hosts");
        }
        network
    }

    fn pairs() -> impl Iterator<Item = (usize, usize)> {
        (1..=NODES).flat_map(|i| (i + 1..=NODES).map(move |j| (i, j)))
    }

    fn namespace(&self, i: usize) -> String {
        format!("ofl{}n{i}", self.id)
    }

    fn host(&self, i: usize) -> String {
        format!("ofl{}h{i}", self.id)
    }

    fn link(i: usize, j: usize) -> String {
        format!("m{i}{j}")
    }

    fn client_gateway(&self, i: usize) -> Ipv4Addr {
        Ipv4Addr::new(10, self.subnet, u8::try_from(i).expect("few nodes"), 1)
    }

    fn client_address(&self, i: usize) -> Ipv4Addr {
        Ipv4Addr::new(10, self.subnet, u8::try_from(i).expect("few nodes"), 2)
    }

    /// Node `k`'s end of the link between nodes `i` < `j`.
    fn mesh_address(&self, i: usize, j: usize, k: usize) -> Ipv4Addr {
        let link = u8::try_from(100 + 10 * i + j).expect("few nodes");
        Ipv4Addr::new(10, self.subnet, link, u8::try_from(k).expect("few nodes"))
    }

    /// Takes node `i`'s links to every other node down (`up` false) or up again.
    fn set_links_of(&self, i: usize, up: bool) {
        for (a, b) in Self::pairs().filter(|&(a, b)| a == i || b == i) {
            let state = if up { "up" } else { "down" };
            for ns in [self.namespace(a), self.namespace(b)] {
                ip(&["-n", &ns, "link", "set", &Self::link(a, b), state]);
            }
        }
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        for i in 1..=NODES {
            let ns = self.namespace(i);
            // epmd (and anything else left) keeps a namespace alive after its name is gone.
            if let Ok(output) = Command::new("ip").args(["netns", "pids", &ns]).output() {
                for pid in String::from_utf8_lossy(&output.stdout).split_whitespace() {
                    if let Ok(pid) = pid.parse() {
                        let _ = nix::sys::signal::kill(
                            nix::unistd::Pid::from_raw(pid),
                            nix::sys::signal::Signal::SIGKILL,
                        );
                    }
                }
            }
            let _ = Command::new("ip")
                .args(["netns", "del", &ns])
                .stderr(Stdio::null())
                .status();
            let _ = std::fs::remove_dir_all(format!("/etc/netns/{ns}"));
        }
    }
}

fn ip(args: &[&str]) {
    let output = Command::new("ip")
        .args(args)
        .output()
        .expect("run ip (iproute2)");
    assert!(
        output.status.success(),
        "ip {}: {} (the cluster tests need root and iproute2)",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr).trim()
    );
}

/// Three private RabbitMQ nodes clustered from a static peer list, with
/// `cluster_partition_handling = pause_minority`. Everything is removed on drop.
pub struct PrivateCluster {
    // Dropped before the network, whose namespaces they run in.
    nodes: Vec<PrivateBroker>,
    network: Network,
}

impl PrivateCluster {
    /// Starts three nodes together and waits until they form one cluster.
    pub async fn start() -> Self {
        let network = Network::create();
        let mut peers = String::new();
        for i in 1..=NODES {
            let _ = writeln!(
                peers,
                "cluster_formation.classic_config.nodes.{i} = rabbit@{}",
                network.host(i)
            );
        }
        let config = format!(
            "listeners.tcp.default = 5672\n\
             loopback_users = none\n\
             cluster_formation.peer_discovery_backend = classic_config\n\
             {peers}\
             cluster_partition_handling = pause_minority\n\
             net_ticktime = {}\n",
            NET_TICKTIME.as_secs()
        );
        let mut nodes: Vec<PrivateBroker> = (1..=NODES)
            .map(|i| {
                PrivateBroker::spawn_placed(
                    Placement {
                        namespace: network.namespace(i),
                        host: network.host(i),
                        ip: network.client_address(i),
                    },
                    &config,
                )
            })
            .collect();
        for node in &mut nodes {
            node.ready().await;
        }
        let cluster = Self { nodes, network };
        cluster
            .await_running(NODES, Duration::from_secs(60), "the three nodes to cluster")
            .await;
        cluster
    }

    /// The nodes, in order.
    pub fn nodes(&self) -> &[PrivateBroker] {
        &self.nodes
    }

    /// Node `i` (0-based), to stop, kill or start.
    pub fn node_mut(&mut self, i: usize) -> &mut PrivateBroker {
        &mut self.nodes[i]
    }

    /// Cuts node `i` (0-based) off from the other nodes; clients still reach it.
    pub fn isolate(&self, i: usize) {
        self.network.set_links_of(i + 1, false);
    }

    /// Undoes [`PrivateCluster::isolate`].
    pub fn rejoin(&self, i: usize) {
        self.network.set_links_of(i + 1, true);
    }

    /// How many nodes `node` (0-based) sees running in its cluster, itself included.
    async fn running_seen_by(&self, node: usize) -> Option<usize> {
        let out = self.nodes[node]
            .tool_output("rabbitmqctl", &["cluster_status", "--formatter", "json"])
            .await?;
        let status: serde_json::Value = serde_json::from_str(&out).ok()?;
        Some(status["running_nodes"].as_array()?.len())
    }

    /// Waits until some node sees `count` nodes running. Asks every half second: each
    /// question starts an Erlang VM (`rabbitmqctl`), about 0.7 s of a core, and asking
    /// without a pause would take CPU from the gateway under test.
    pub async fn await_running(&self, count: usize, deadline: Duration, what: &str) {
        eventually(deadline, what, || async {
            for node in 0..NODES {
                if self.running_seen_by(node).await == Some(count) {
                    return Some(());
                }
            }
            tokio::time::sleep(CLI_PAUSE).await;
            None
        })
        .await;
    }

    /// The node (0-based) that holds the leader of quorum queue `queue`, asked of every node
    /// but those in `skip` until one answers.
    pub async fn leader_of(&self, queue: &str, skip: &[usize]) -> Option<usize> {
        for (asked, node) in self.nodes.iter().enumerate() {
            if skip.contains(&asked) {
                continue;
            }
            let Some(out) = node
                .tool_output(
                    "rabbitmq-queues",
                    &["quorum_status", queue, "--formatter", "json"],
                )
                .await
            else {
                continue;
            };
            let Ok(members) = serde_json::from_str::<Vec<serde_json::Value>>(&out) else {
                continue;
            };
            let leader = members
                .iter()
                .find(|member| member["Raft State"] == "leader")
                .and_then(|member| member["Node Name"].as_str())?;
            return self.nodes.iter().position(|node| node.node() == leader);
        }
        None
    }

    /// Waits until quorum queue `queue` has a leader on a node other than `not`, and returns
    /// that node (0-based).
    pub async fn await_new_leader(&self, queue: &str, not: usize, deadline: Duration) -> usize {
        eventually(deadline, &format!("a new leader for {queue}"), || async {
            self.leader_of(queue, &[not])
                .await
                .filter(|&leader| leader != not)
        })
        .await
    }
}

impl Drop for PrivateCluster {
    fn drop(&mut self) {
        // Its data is thrown away: no need for a polite stop, node by node.
        for node in &mut self.nodes {
            node.kill_server();
        }
    }
}
