//! Waiting on conditions with a deadline, instead of sleeping.

use std::{future::Future, time::Duration};

/// How often conditions are re-checked.
const POLL: Duration = Duration::from_millis(25);

/// Polls `check` until it returns `Some`, and returns that value. Panics with `what` if
/// `deadline` passes first.
pub async fn eventually<T, F, Fut>(deadline: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let give_up = tokio::time::Instant::now() + deadline;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < give_up,
            "timed out after {deadline:?} waiting for {what}"
        );
        tokio::time::sleep(POLL).await;
    }
}
