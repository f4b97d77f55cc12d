//! The floor under any worker of HTTP targets built as offload's is: lapin consuming at a
//! prefetch, each delivery's body POSTed as it is with reqwest, and acked when the target
//! has answered; nothing else: no decoding, no events, no logs, spans or metrics. The
//! benchmark drains the same queue with it beside the worker (`--only targets`): the gap
//! between the two is the worker's own cost, the gap between this and the bound is what
//! lapin, reqwest and the kernel cost on a machine the broker and the target share.
//!
//! `target-floor <amqp-url> <queue> <target-url> <prefetch> <count>`: when `count`
//! deliveries are acked, prints the tasks per second from the subscription to the last
//! ack, and its CPU time per task in microseconds over the same span, and exits.

use std::time::Instant;

use futures_util::StreamExt;
use lapin::{
    Connection, ConnectionProperties,
    options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions},
    types::FieldTable,
};
use offload_bench::{broker::per_second, process::cpu_time_of};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [url, queue, target, prefetch, count] = args.as_slice() else {
        return Err(
            "usage: target-floor <amqp-url> <queue> <target-url> <prefetch> <count>".into(),
        );
    };
    let (prefetch, count): (u16, u64) = (prefetch.parse()?, count.parse()?);
    // As the worker builds its client: no redirects followed, the rest reqwest's defaults.
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()?;
    let connection = Connection::connect(url, ConnectionProperties::default()).await?;
    let channel = connection.create_channel().await?;
    channel
        .basic_qos(prefetch, BasicQosOptions::default())
        .await?;
    let cpu_before = cpu_time_of("self").unwrap_or_default();
    let started = Instant::now();
    let mut consumer = channel
        .basic_consume(
            queue.as_str().into(),
            "bench-target-floor".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let mut calls = futures_util::stream::FuturesUnordered::new();
    let (mut received, mut settled) = (0, 0);
    while settled < count {
        tokio::select! {
            Some(done) = calls.next(), if !calls.is_empty() => {
                let () = done?;
                settled += 1;
            }
            delivery = consumer.next(), if received < count => {
                let Some(delivery) = delivery else { break };
                let delivery = delivery?;
                received += 1;
                let call = client
                    .post(target.as_str())
                    .header(reqwest::header::CONTENT_TYPE, "application/json")
                    .body(delivery.data);
                let acker = delivery.acker;
                calls.push(async move {
                    let answer = call.send().await?.error_for_status()?;
                    let _ = answer.bytes().await?;
                    acker.ack(BasicAckOptions::default()).await?;
                    Ok::<(), Box<dyn std::error::Error>>(())
                });
            }
        }
    }
    let took = started.elapsed();
    let cpu = cpu_time_of("self")
        .unwrap_or_default()
        .saturating_sub(cpu_before);
    #[allow(clippy::cast_precision_loss)] // task counts are far below 2^52
    let per_task = cpu.as_secs_f64() * 1e6 / settled.max(1) as f64;
    println!("{} {per_task:.1}", per_second(settled, took));
    let _ = connection.close(200, "drained".into()).await;
    Ok(())
}
