//! What the dashboard draws: the queues' depth and the task counts, sampled every
//! [`SAMPLE_EVERY`], the last [`SAMPLES_KEPT`] kept (ten minutes), so a page opened now
//! shows the last minutes.

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, SystemTime},
};

use offload_common::QueueDepth;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::status::{Totals, Tracker};

/// How often the depth is asked of the broker: passive declares of a few dozen queues (the
/// delay levels, and two per kind), nothing the broker notices.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(2);
/// How many samples are kept: ten minutes' worth.
pub const SAMPLES_KEPT: usize = 300;

/// One reading.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Sample {
    /// When, in milliseconds since the epoch.
    pub at: u64,
    /// The queues' depth; `None` when the broker could not be asked.
    pub depth: Option<QueueDepth>,
    /// The task counts; `None` with EVENTS=off, or while the status view is still replaying.
    pub totals: Option<Totals>,
}

/// The last [`SAMPLES_KEPT`] samples. Cheap to clone.
#[derive(Clone, Default)]
pub struct History {
    samples: Arc<Mutex<VecDeque<Sample>>>,
}

impl History {
    fn samples(&self) -> MutexGuard<'_, VecDeque<Sample>> {
        // Each update is one push and a few pops: a panic cannot leave it half done.
        self.samples
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Every sample kept, oldest first.
    pub fn all(&self) -> Vec<Sample> {
        self.samples().iter().cloned().collect()
    }

    fn push(&self, sample: Sample) {
        let mut samples = self.samples();
        samples.push_back(sample);
        while samples.len() > SAMPLES_KEPT {
            samples.pop_front();
        }
    }

    /// Samples every [`SAMPLE_EVERY`] until `shutdown`.
    pub(crate) async fn sample(self, state: crate::AppState, shutdown: CancellationToken) {
        let mut ticks = tokio::time::interval(SAMPLE_EVERY);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = ticks.tick() => {}
            }
            let depth = state.depth().await;
            let totals = state
                .tracker
                .as_ref()
                .filter(|tracker| tracker.is_live())
                .map(Tracker::totals);
            self.push(Sample {
                at: crate::status::millis(SystemTime::now()),
                depth,
                totals,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn history_keeps_the_last_ten_minutes() {
        let history = History::default();
        for at in 0..400 {
            history.push(Sample {
                at,
                depth: None,
                totals: None,
            });
        }
        let samples = history.all();
        assert_eq!(samples.len(), 300);
        assert_eq!(samples.first().map(|sample| sample.at), Some(100));
        assert_eq!(samples.last().map(|sample| sample.at), Some(399));
    }
}
