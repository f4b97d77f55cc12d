//! Percentiles, and the table the benchmark prints.

use std::time::Duration;

use offload_tests::table::Align;

/// The `p`-th percentile (0 to 100) of `samples`, nearest rank; `None` when empty.
pub fn percentile(samples: &mut [Duration], p: f64) -> Option<Duration> {
    if samples.is_empty() {
        return None;
    }
    samples.sort_unstable();
    #[allow(
        clippy::cast_precision_loss,
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss
    )] // a rank within a Vec's length, from a fraction in 0..=1
    let rank = ((p / 100.0) * samples.len() as f64).ceil() as usize;
    Some(samples[rank.clamp(1, samples.len()) - 1])
}

/// The median of `samples` (the upper one of an even count); 0 when empty.
pub fn median(samples: &mut [f64]) -> f64 {
    samples.sort_unstable_by(f64::total_cmp);
    samples.get(samples.len() / 2).copied().unwrap_or(0.0)
}

/// The median of one figure of each run.
pub fn median_by<T>(runs: &[T], pick: impl Fn(&T) -> f64) -> f64 {
    let mut values: Vec<f64> = runs.iter().map(pick).collect();
    median(&mut values)
}

/// One line of the report.
#[derive(Debug, Clone)]
pub struct Line {
    /// What is measured.
    pub measure: String,
    /// offload's figure.
    pub offload: String,
    /// The ceiling's figure, if the measure has one.
    pub ceiling: String,
    /// offload / ceiling, or the figure against its target.
    pub ratio: String,
    /// The target.
    pub target: String,
    /// Whether the target is met.
    pub met: Option<bool>,
}

impl Line {
    /// A figure with no ceiling and no target.
    pub fn info(measure: impl Into<String>, offload: impl Into<String>) -> Self {
        Self {
            measure: measure.into(),
            offload: offload.into(),
            ceiling: String::new(),
            ratio: String::new(),
            target: String::new(),
            met: None,
        }
    }

    /// A figure beside a ceiling, with their ratio, and no target.
    pub fn beside(
        measure: impl Into<String>,
        offload: String,
        ceiling: String,
        ratio: String,
    ) -> Self {
        Self {
            measure: measure.into(),
            offload,
            ceiling,
            ratio,
            target: String::new(),
            met: None,
        }
    }
}

/// `n` per second, rounded.
pub fn rate(n: f64) -> String {
    format!("{n:.0}/s")
}

/// A duration in milliseconds with two decimals.
pub fn millis(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

/// Bytes as MiB with one decimal.
pub fn mib(bytes: u64) -> String {
    #[allow(clippy::cast_precision_loss)] // memory sizes are far below 2^52
    let mib = bytes as f64 / (1024.0 * 1024.0);
    format!("{mib:.1} MiB")
}

/// A percentage.
pub fn percent(fraction: f64) -> String {
    format!("{:.0}%", fraction * 100.0)
}

const HEADER: [&str; 6] = ["measure", "offload", "ceiling", "ratio", "target", "met"];

fn cells(line: &Line) -> [String; 6] {
    [
        line.measure.clone(),
        line.offload.clone(),
        line.ceiling.clone(),
        line.ratio.clone(),
        line.target.clone(),
        match line.met {
            Some(true) => "yes".into(),
            Some(false) => "NO".into(),
            None => String::new(),
        },
    ]
}

/// The lines as an aligned plain-text table.
pub fn table(lines: &[Line]) -> String {
    let rows: Vec<[String; 6]> = lines.iter().map(cells).collect();
    offload_tests::table::text(HEADER, &rows, [Align::Left; 6])
}

/// The lines as a Markdown table.
pub fn markdown(lines: &[Line]) -> String {
    let rows: Vec<[String; 6]> = lines.iter().map(cells).collect();
    offload_tests::table::markdown(HEADER, &rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let mut samples: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(
            percentile(&mut samples, 50.0),
            Some(Duration::from_millis(50))
        );
        assert_eq!(
            percentile(&mut samples, 99.0),
            Some(Duration::from_millis(99))
        );
        assert_eq!(
            percentile(&mut samples, 99.9),
            Some(Duration::from_millis(100))
        );
        assert_eq!(
            percentile(&mut samples, 0.0),
            Some(Duration::from_millis(1))
        );
        assert_eq!(percentile(&mut [], 50.0), None);
    }

    #[test]
    fn median_of_unsorted_samples() {
        assert!((median(&mut [3.0, 1.0, 2.0]) - 2.0).abs() < f64::EPSILON);
        assert!((median(&mut [4.0, 1.0]) - 4.0).abs() < f64::EPSILON);
        assert!(median(&mut []).abs() < f64::EPSILON);
    }
}
