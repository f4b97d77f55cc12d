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
    eventually_ok(deadline, what, || {
        let checked = check();
        async { checked.await.ok_or("the condition never held") }
    })
    .await
}

/// Polls `check` until it returns `Ok`, and returns that value. Panics with `what` and the
/// last `Err` (what was seen instead) if `deadline` passes first.
pub async fn eventually_ok<T, E, F, Fut>(deadline: Duration, what: &str, mut check: F) -> T
where
    E: std::fmt::Display,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let give_up = tokio::time::Instant::now() + deadline;
    loop {
        match check().await {
            Ok(value) => return value,
            Err(last) => assert!(
                tokio::time::Instant::now() < give_up,
                "timed out after {deadline:?} waiting for {what}; last seen: {last}"
            ),
        }
        tokio::time::sleep(POLL).await;
    }
}
