//! Prometheus histograms read from a process's `/metrics`, for figures the process measures
//! itself (a schedule tick's lateness, say).

/// A Prometheus histogram: cumulative counts by upper bound, and the total.
#[derive(Debug, Default, Clone)]
pub struct Histogram {
    /// (`le`, observations at most `le`), ascending, `+Inf` left out.
    pub buckets: Vec<(f64, u64)>,
    /// How many observations in all.
    pub count: u64,
}

impl Histogram {
    #[must_use]
    /// Reads histogram `name` from Prometheus' text exposition: empty where it is not there.
    pub fn parse(text: &str, name: &str) -> Self {
        let mut histogram = Self::default();
        let (bucket, count) = (format!("{name}_bucket{{le=\""), format!("{name}_count "));
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix(&bucket) {
                let Some((le, count)) = rest.split_once("\"} ") else {
                    continue;
                };
                if let (Ok(le), Ok(count)) = (le.parse::<f64>(), count.trim().parse::<u64>())
                    && le.is_finite()
                {
                    histogram.buckets.push((le, count));
                }
            } else if let Some(total) = line.strip_prefix(&count) {
                histogram.count = total.trim().parse().unwrap_or(0);
            }
        }
        histogram
    }

    /// The observations made since `earlier`.
    #[must_use]
    pub fn since(&self, earlier: &Self) -> Self {
        let before = |le: f64| {
            earlier
                .buckets
                .iter()
                .find(|(bound, _)| (*bound - le).abs() < f64::EPSILON)
                .map_or(0, |(_, n)| *n)
        };
        Self {
            buckets: self
                .buckets
                .iter()
                .map(|(le, n)| (*le, n.saturating_sub(before(*le))))
                .collect(),
            count: self.count.saturating_sub(earlier.count),
        }
    }

    /// Adds `other`'s observations (the same buckets).
    pub fn add(&mut self, other: &Self) {
        if self.buckets.is_empty() {
            self.buckets.clone_from(&other.buckets);
        } else {
            for ((_, mine), (_, theirs)) in self.buckets.iter_mut().zip(&other.buckets) {
                *mine += theirs;
            }
        }
        self.count += other.count;
    }

    /// The share of observations at most `le` (a bucket's bound).
    pub fn within_share(&self, le: f64) -> Option<f64> {
        let (_, n) = self
            .buckets
            .iter()
            .find(|(bound, _)| (*bound - le).abs() < f64::EPSILON)?;
        #[allow(clippy::cast_precision_loss)] // counts far below 2^52
        (self.count > 0).then(|| *n as f64 / self.count as f64)
    }

    /// Whether at least 99% of the observations are at most `le`.
    pub fn p99_at_most(&self, le: f64) -> bool {
        self.within_share(le).is_some_and(|share| share >= 0.99)
    }

    /// The smallest bucket bound that holds 99% of the observations, as `<= N ms`.
    #[allow(clippy::cast_precision_loss)] // counts far below 2^52
    pub fn p99_bound(&self) -> String {
        if self.count == 0 {
            return "no ticks".into();
        }
        self.buckets
            .iter()
            .find(|(_, n)| *n as f64 >= 0.99 * self.count as f64)
            .map_or_else(
                || "over 60 s".into(),
                |(le, _)| format!("<= {:.0} ms", le * 1000.0),
            )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NAME: &str = "offload_schedule_tick_late_seconds";

    #[test]
    fn a_histogram_reads_from_the_exposition_and_tells_its_p99() {
        let text = "\
# TYPE offload_schedule_tick_late_seconds histogram
offload_schedule_tick_late_seconds_sum 1.5
offload_schedule_tick_late_seconds_count 100
offload_schedule_tick_late_seconds_bucket{le=\"0.05\"} 90
offload_schedule_tick_late_seconds_bucket{le=\"0.1\"} 99
offload_schedule_tick_late_seconds_bucket{le=\"+Inf\"} 100
";
        let now = Histogram::parse(text, NAME);
        assert_eq!(now.count, 100);
        assert!(now.p99_at_most(0.1));
        assert!(!now.p99_at_most(0.05));
        assert_eq!(now.p99_bound(), "<= 100 ms");
        let earlier = Histogram {
            buckets: vec![(0.05, 40), (0.1, 49)],
            count: 50,
        };
        let since = now.since(&earlier);
        assert_eq!(since.count, 50);
        assert_eq!(since.within_share(0.1), Some(1.0));
        assert_eq!(since.p99_bound(), "<= 50 ms");
    }
}
