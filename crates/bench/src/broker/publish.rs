//! The publish ceiling: raw lapin publishing with confirms, closed and open loop.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use lapin::{BasicProperties, Channel, options::BasicPublishOptions};

use super::{Measured, confirm_channel, measure, zero_work_task};

/// Publishes the same persistent message from `in_flight` concurrent publishers on one
/// confirm-mode channel (as the gateway does), each awaiting its own confirm, for `length`.
/// Returns the confirmed publishes per second.
pub async fn publish_ceiling(
    url: &str,
    queue: &str,
    in_flight: usize,
    length: Duration,
) -> Result<f64, lapin::Error> {
    Ok(
        publish_ceiling_over(url, &[queue.to_owned()], in_flight, length)
            .await?
            .rate,
    )
}

/// [`publish_ceiling`], with this process's CPU time per confirmed publish over the same
/// window: the raw client's cost, which the gateway's CPU per POST is held against.
pub async fn publish_ceiling_measured(
    url: &str,
    queue: &str,
    in_flight: usize,
    length: Duration,
) -> Result<Measured, lapin::Error> {
    publish_ceiling_over(url, &[queue.to_owned()], in_flight, length).await
}

/// [`publish_ceiling`], publisher n publishing to `queues[n % queues.len()]`; with this
/// process's CPU time per confirmed publish.
pub async fn publish_ceiling_over(
    url: &str,
    queues: &[String],
    in_flight: usize,
    length: Duration,
) -> Result<Measured, lapin::Error> {
    let (connection, channel) = confirm_channel(url).await?;
    let (body, properties) = zero_work_task("sleep");
    let confirmed = Arc::new(AtomicU64::new(0));
    let running = Arc::new(AtomicBool::new(true));
    let mut publishers = Vec::new();
    for n in 0..in_flight {
        let channel = channel.clone();
        let body = body.clone();
        let properties = properties.clone();
        let queue = queues[n % queues.len()].clone();
        let confirmed = Arc::clone(&confirmed);
        let running = Arc::clone(&running);
        publishers.push(tokio::spawn(async move {
            while running.load(Ordering::Relaxed) {
                if publish_acked(&channel, &queue, &body, &properties).await? {
                    confirmed.fetch_add(1, Ordering::Relaxed);
                }
            }
            Ok::<_, lapin::Error>(())
        }));
    }
    let measured = measure(&confirmed, length, || crate::process::cpu_time_of("self")).await;
    running.store(false, Ordering::Relaxed);
    for publisher in publishers {
        publisher.await.expect("a publisher task does not panic")?;
    }
    let _ = connection.close(200, "ceiling measured".into()).await;
    Ok(measured)
}

/// Publishes `body` to `queue` (mandatory, as the gateway publishes a task) and awaits its
/// confirm: whether the broker acked it.
async fn publish_acked(
    channel: &Channel,
    queue: &str,
    body: &[u8],
    properties: &BasicProperties,
) -> Result<bool, lapin::Error> {
    let confirm = channel
        .basic_publish(
            "".into(),
            queue.into(),
            BasicPublishOptions {
                mandatory: true,
                ..BasicPublishOptions::default()
            },
            body,
            properties.clone(),
        )
        .await?
        .await?;
    Ok(confirm.is_ack())
}

/// Raw lapin publishing open loop at `rate` for `length`: `in_flight` publishers on one
/// confirm channel, each on its own schedule, each publish timed from when its schedule said
/// to send it to its confirm, as [`crate::http::open_loop`] times POST /tasks. The latency
/// the broker and this machine allow a publisher at that rate, without HTTP or offload.
pub async fn publish_open_loop(
    url: &str,
    queue: &str,
    rate: f64,
    length: Duration,
    in_flight: usize,
) -> Result<Vec<Duration>, lapin::Error> {
    let (connection, channel) = confirm_channel(url).await?;
    let (body, properties) = zero_work_task("sleep");
    let in_flight_f64 = f64::from(u32::try_from(in_flight).unwrap_or(u32::MAX));
    let period = Duration::from_secs_f64(in_flight_f64 / rate.max(1.0));
    let start = tokio::time::Instant::now();
    let end = start + length;
    let latencies = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut publishers = tokio::task::JoinSet::new();
    for n in 0..in_flight {
        let (channel, body, properties) = (channel.clone(), body.clone(), properties.clone());
        let (queue, latencies) = (queue.to_owned(), Arc::clone(&latencies));
        let offset = period.mul_f64(f64::from(u32::try_from(n).unwrap_or(0)) / in_flight_f64);
        publishers.spawn(async move {
            let mut scheduled = start + offset;
            while scheduled < end {
                tokio::time::sleep_until(scheduled).await;
                if publish_acked(&channel, &queue, &body, &properties).await? {
                    latencies
                        .lock()
                        .expect("latencies lock")
                        .push(scheduled.elapsed());
                }
                scheduled += period;
            }
            Ok::<_, lapin::Error>(())
        });
    }
    while let Some(publisher) = publishers.join_next().await {
        publisher.expect("a publisher task does not panic")?;
    }
    let _ = connection.close(200, "open loop measured".into()).await;
    Ok(std::mem::take(
        &mut *latencies.lock().expect("latencies lock"),
    ))
}
