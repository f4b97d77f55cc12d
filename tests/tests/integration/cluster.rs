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
