//! The delay levels: a message published through them reaches the work queue after its
//! delay, short delays never wait behind long ones, and a restart of the broker loses none.

use std::time::{Duration, Instant};

use lapin::{
    BasicProperties, Connection, ConnectionProperties,
    options::{BasicPublishOptions, ConfirmSelectOptions},
};
use offload_common::{BrokerArgs, topology::delay_routing_key};
use offload_tests::{PrivateBroker, TestQueue, amqp_url, eventually};

/// Publishes `body` into the delay levels of `exchange` for `delay`, and waits for the
/// confirm: from then on the broker holds it.
async fn publish_delayed(connection: &Connection, exchange: &str, body: &[u8], delay: Duration) {
    let channel = connection.create_channel().await.expect("channel");
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirm mode");
    let confirm = channel
        .basic_publish(
            exchange.into(),
            delay_routing_key(delay).as_str().into(),
            BasicPublishOptions {
                mandatory: true,
                ..BasicPublishOptions::default()
            },
            body,
            BasicProperties::default().with_delivery_mode(2),
        )
        .await
        .expect("publish")
        .await
        .expect("confirm");
    assert!(
        confirm.is_ack() && confirm.take_message().is_none(),
        "routed and confirmed"
    );
    let _ = channel.close(200, "done".into()).await;
}

#[tokio::test]
async fn each_delay_reaches_the_work_queue_on_time_and_a_long_one_blocks_no_short_one() {
    let queue = TestQueue::declare(&amqp_url(), "delays", 5).await;
    let exchange = queue.topology().delay_exchange();
    let began = Instant::now();
    // The long one first: were it at the head of the same queue, it would hold the others.
    for (body, seconds) in [("three", 3), ("one", 1), ("now", 0), ("two", 2)] {
        publish_delayed(
            queue.connection(),
            &exchange,
            body.as_bytes(),
            Duration::from_secs(seconds),
        )
        .await;
    }
    let mut arrivals = Vec::new();
    while arrivals.len() < 4 {
        let message = eventually(Duration::from_secs(10), "the next delayed message", || {
            queue.take_ready()
        })
        .await;
        let body = String::from_utf8(message.delivery.data).expect("text");
        arrivals.push((body, began.elapsed()));
    }
    let order: Vec<&str> = arrivals.iter().map(|(body, _)| body.as_str()).collect();
    assert_eq!(order, ["now", "one", "two", "three"], "{arrivals:?}");
    for ((_, took), seconds) in arrivals.iter().zip([0, 1, 2, 3]) {
        let asked = Duration::from_secs(seconds);
        // Never early; late by at most the broker's expiry and dead-lettering work (measured
        // at about 50 ms a level here) plus this test's 25 ms polling.
        assert!(*took >= asked, "{seconds} s delay arrived after {took:?}");
        assert!(
            *took < asked + Duration::from_millis(800),
            "{seconds} s delay arrived after {took:?}"
        );
    }
}

#[tokio::test]
async fn delayed_messages_survive_a_broker_restart() {
    let mut broker = PrivateBroker::start().await;
    let url = broker.url();
    let name = format!(
        "offload-test-delay-restart-{}",
        uuid::Uuid::new_v4().simple()
    );
    let topology = BrokerArgs::new(&url, &name).topology();
    {
        let connection = Connection::connect(&url, ConnectionProperties::default())
            .await
            .expect("connect");
        topology.declare(&connection).await.expect("declare");
        for seconds in [1, 3, 6] {
            let body = seconds.to_string();
            publish_delayed(
                &connection,
                &topology.delay_exchange(),
                body.as_bytes(),
                Duration::from_secs(seconds),
            )
            .await;
        }
        let _ = connection.close(200, "restarting the broker".into()).await;
    }
    broker.stop().await;
    broker.start_again().await;

    let connection = Connection::connect(&url, ConnectionProperties::default())
        .await
        .expect("connect again");
    let channel = connection.create_channel().await.expect("channel");
    let mut arrived = Vec::new();
    while arrived.len() < 3 {
        let message = eventually(Duration::from_secs(60), "every delayed message", || async {
            channel
                .basic_get(
                    name.as_str().into(),
                    lapin::options::BasicGetOptions { no_ack: true },
                )
                .await
                .ok()
                .flatten()
        })
        .await;
        arrived.push(String::from_utf8(message.delivery.data).expect("text"));
    }
    arrived.sort();
    assert_eq!(arrived, ["1", "3", "6"]);
}
