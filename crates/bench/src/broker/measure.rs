//! Rates and CPU per operation over a window, after a warm-up.

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

/// Counts `counter` over `length` after a warm-up of a fifth of it; returns the rate per
/// second.
pub async fn measure_rate(counter: &AtomicU64, length: Duration) -> f64 {
    measure(counter, length, || None).await.rate
}

/// A rate, and the CPU time a process spent per operation over the same window.
#[derive(Debug, Clone, Copy)]
pub struct Measured {
    /// Operations per second.
    pub rate: f64,
    /// CPU time per operation, if the process's CPU time could be read.
    pub cpu_per_op: Option<Duration>,
}

impl Measured {
    /// The CPU time per operation in microseconds; NaN when it could not be read.
    pub fn cpu_micros(&self) -> f64 {
        self.cpu_per_op
            .map_or(f64::NAN, |cpu| cpu.as_secs_f64() * 1e6)
    }
}

/// Counts `counter` over `length` after a warm-up of a fifth of it, and the CPU time `cpu`
/// reads (a process's, so far) over the same window.
pub async fn measure(
    counter: &AtomicU64,
    length: Duration,
    cpu: impl Fn() -> Option<Duration>,
) -> Measured {
    tokio::time::sleep(length / 5).await;
    let (from, cpu_from) = (counter.load(Ordering::Relaxed), cpu());
    let started = Instant::now();
    tokio::time::sleep(length).await;
    let (to, cpu_to) = (counter.load(Ordering::Relaxed), cpu());
    let count = to - from;
    let cpu_per_op = cpu_from
        .zip(cpu_to)
        .filter(|_| count > 0)
        .map(|(from, to)| to.saturating_sub(from) / u32::try_from(count).unwrap_or(u32::MAX));
    Measured {
        rate: per_second(count, started.elapsed()),
        cpu_per_op,
    }
}

/// `count` over `elapsed`, per second.
pub fn per_second(count: u64, elapsed: Duration) -> f64 {
    #[allow(clippy::cast_precision_loss)] // counts here stay far below 2^52
    let count = count as f64;
    count / elapsed.as_secs_f64()
}
