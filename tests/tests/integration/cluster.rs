//! A three-node cluster: what only several nodes can show. The fault campaign's cluster
//! scenarios measure the same under load; this is the one property each run must keep.

use std::time::Duration;

use offload_tests::{FaultyProxy, PrivateCluster, TestGateway, declare_kinds, eventually};
use reqwest::StatusCode;
use serde_json::json;

const DEADLINE: Duration = Duration::from_secs(60);

/// On RabbitMQ 3.10, a channel that first publishes to a quorum queue while the
/// queue's leader is down keeps sending to that leader: every publish is nacked until its node
/// is back, although a new leader took over long before. A gateway that reconnects when a
/// node dies has a fresh channel at exactly that moment. It renews its channel on a nack, so
/// it is confirmed again once a new leader is known, with the old leader's node still down.
#[tokio::test]
async fn a_fresh_channel_that_met_a_dead_leader_is_replaced_and_confirmed_without_that_node() {
    let mut cluster = PrivateCluster::start().await;
    let mut proxies = Vec::new();
    for node in cluster.nodes() {
        proxies.push(
            FaultyProxy::start(node.addr())
                .await
                .expect("a proxy starts"),
        );
    }
    let urls = proxies
        .iter()
        .map(|proxy| format!("amqp://guest:guest@127.0.0.1:{}/%2f", proxy.port()))
        .collect::<Vec<_>>()
        .join(",");
    let queue = format!("offload-test-leader-lost-{}", uuid::Uuid::new_v4().simple());
    let gateway = TestGateway::start(&urls, &queue).await;
    // Off the runtime: the proxies it connects through run on it.
    let (declare_urls, declare_queue) = (urls.clone(), queue.clone());
    tokio::task::spawn_blocking(move || declare_kinds(&declare_urls, &declare_queue, &[]))
        .await
        .expect("the kinds are declared");
    let task = json!({"kind": "sleep", "payload": {"message": "hello"}});
    gateway.submit_once_accepted(&task, DEADLINE).await;
    // A kind's queue is placed by `x-queue-leader-locator=balanced`, not necessarily beside
    // the gateway: move the gateway to the leader's node.
    let queue = format!("{queue}.kind.sleep");
    let leader = eventually(DEADLINE, "the kind's queue's leader", || {
        cluster.leader_of(&queue, &[])
    })
    .await;
    for (node, proxy) in proxies.iter().enumerate() {
        if node != leader {
            proxy.cut();
        }
    }
    eventually(DEADLINE, "the gateway on the leader's node", || async {
        (proxies[leader].open_connections() > 0
            && gateway.health().await.status() == StatusCode::OK)
            .then_some(())
    })
    .await;
    for proxy in &proxies {
        proxy.heal();
    }

    // The gateway moves to another node (a fresh publishing channel that has not published
    // yet), then the leader's node dies and the gateway publishes at once, before the other
    // nodes have elected a new leader.
    proxies[leader].cut();
    eventually(DEADLINE, "the gateway on another node", || async {
        let elsewhere = proxies
            .iter()
            .enumerate()
            .any(|(node, proxy)| node != leader && proxy.open_connections() > 0);
        (elsewhere && gateway.health().await.status() == StatusCode::OK).then_some(())
    })
    .await;
    cluster.node_mut(leader).kill9().await;
    let accepted = gateway.submit_once_accepted(&task, DEADLINE);
    let elected = cluster.await_new_leader(&queue, leader, DEADLINE);
    let (_, new_leader) = tokio::join!(accepted, elected);
    assert_ne!(new_leader, leader);
    gateway.stop().await;
}

/// Kinds' queues are placed by `x-queue-leader-locator=balanced` (on 3.10.8 as on 4.x: a new
/// quorum queue's leader goes to the node that leads the fewest) and declared one after
/// another, before their gates and the shared queues, so the kinds declared through one node
/// lead on all three, and a workload of several kinds is not bound to one leader's rate.
/// (Declared each with its gate, as before, six kinds all led on one node: kind and gate took
/// turns on the two nodes that led the fewest.)
#[tokio::test]
async fn kinds_declared_through_one_node_lead_on_every_node() {
    const KINDS: [&str; 6] = ["a", "b", "c", "d", "e", "f"];
    let cluster = PrivateCluster::start().await;
    let queue = format!("offload-test-spread-{}", uuid::Uuid::new_v4().simple());
    let url = cluster.nodes()[0].url();
    let topology = offload_common::BrokerArgs::new(&url, queue)
        .topology()
        .with_kinds(KINDS);
    let connection = lapin::Connection::connect(&url, lapin::ConnectionProperties::default())
        .await
        .expect("connect to the first node");
    topology
        .declare(&connection)
        .await
        .expect("the topology declares");
    let mut leaders = Vec::new();
    for kind in KINDS {
        let queue = topology.kind_queue(kind);
        let leader = eventually(DEADLINE, "a kind's queue's leader", || {
            cluster.leader_of(&queue, &[])
        })
        .await;
        leaders.push((kind, leader));
    }
    let nodes: std::collections::HashSet<usize> = leaders.iter().map(|(_, node)| *node).collect();
    assert_eq!(
        nodes.len(),
        3,
        "the kinds' leaders on every node: {leaders:?}"
    );
}
