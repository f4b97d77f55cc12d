//! The delay levels' arithmetic: which levels a delay passes through, and the routing keys
//! and topic patterns that send it there.

/// How many delay levels each work queue has: level n holds a task 2^n seconds.
pub const DELAY_LEVELS: u32 = 22;

/// The longest delay the levels can hold: 2^22 - 1 seconds, about 48.5 days.
pub const MAX_DELAY: std::time::Duration = std::time::Duration::from_secs((1 << DELAY_LEVELS) - 1);

/// The routing key that sends a message through the delay levels for `delay`, rounded to
/// the nearest second (a delay under half a second goes straight to the work queue) and
/// capped at [`MAX_DELAY`]: one word per level, `1` or `0`, the longest level first.
pub fn delay_routing_key(delay: std::time::Duration) -> String {
    let seconds = delay_in_levels(delay).as_secs();
    (0..DELAY_LEVELS)
        .rev()
        .map(|level| if seconds >> level & 1 == 1 { "1" } else { "0" })
        .collect::<Vec<_>>()
        .join(".")
}

/// The routing key of a task of `kind` to run after `delay`, published to the later
/// exchange: the delay's bits, then the kind, so that it is routed only if a worker bound the
/// kind, and then through the delay levels.
pub fn delayed_task_routing_key(delay: std::time::Duration, kind: &str) -> String {
    format!("{}.{kind}", delay_routing_key(delay))
}

/// The delay the levels will really hold for `delay`: rounded to the nearest second, at
/// most [`MAX_DELAY`].
pub fn delay_in_levels(delay: std::time::Duration) -> std::time::Duration {
    let seconds = (delay.as_millis() + 500) / 1000;
    std::time::Duration::from_secs(
        u64::try_from(seconds)
            .unwrap_or(u64::MAX)
            .min(MAX_DELAY.as_secs()),
    )
}

/// The topic pattern that picks the delayed tasks of `kind`, whatever their delay: one `*`
/// per level, then the kind (whose own dots make words of their own, matched literally).
pub(super) fn kind_pattern(kind: &str) -> String {
    format!("{}.{kind}", vec!["*"; DELAY_LEVELS as usize].join("."))
}

/// The topic pattern that picks the messages whose bit for `level` is `bit`.
pub(super) fn level_pattern(level: u32, bit: char) -> String {
    let mut words: Vec<String> = (level + 1..DELAY_LEVELS).map(|_| "*".to_owned()).collect();
    words.push(bit.to_string());
    words.push("#".to_owned());
    words.join(".")
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn a_delay_sets_the_bits_of_its_levels_longest_first() {
        let key = delay_routing_key(Duration::from_secs(5));
        let words: Vec<&str> = key.split('.').collect();
        assert_eq!(words.len(), DELAY_LEVELS as usize);
        assert_eq!(words[words.len() - 3..], ["1", "0", "1"]);
        assert!(words[..words.len() - 3].iter().all(|w| *w == "0"));
    }

    #[test]
    fn delays_round_to_the_second_and_are_capped() {
        let zeros = vec!["0"; DELAY_LEVELS as usize].join(".");
        assert_eq!(delay_routing_key(Duration::from_millis(499)), zeros);
        assert_eq!(
            delay_routing_key(Duration::from_millis(1_500)),
            delay_routing_key(Duration::from_secs(2))
        );
        let ones = vec!["1"; DELAY_LEVELS as usize].join(".");
        assert_eq!(delay_routing_key(MAX_DELAY), ones);
        assert_eq!(delay_routing_key(Duration::from_secs(u64::MAX)), ones);
    }

    #[test]
    fn a_kind_pattern_skips_exactly_the_delay_words() {
        let key = delayed_task_routing_key(Duration::from_secs(3), "report.daily");
        let pattern = kind_pattern("report.daily");
        assert_eq!(key.split('.').count(), pattern.split('.').count());
        assert!(pattern.ends_with(".*.report.daily"));
        assert!(!pattern.contains('#'));
    }

    #[test]
    fn each_level_looks_at_its_own_word() {
        assert_eq!(level_pattern(DELAY_LEVELS - 1, '1'), "1.#");
        let pattern = level_pattern(0, '0');
        assert_eq!(pattern.matches('*').count(), DELAY_LEVELS as usize - 1);
        assert!(pattern.ends_with(".0.#"));
    }
}
