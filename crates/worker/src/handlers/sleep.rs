//! `sleep`: the RabbitMQ tutorial's task. One unit of work per `.` in `payload.message`, at
//! most `SLEEP_MAX_UNITS` of them.

use std::time::Duration;

use crate::{Handler, HandlerError, Task};

/// Sleeps one unit per `.` in `payload.message`; a task without a message is zero work.
#[derive(Debug, Clone)]
pub struct Sleep {
    unit: Duration,
    max_units: u32,
}

impl Sleep {
    /// A sleep handler whose unit of work lasts `unit`, refusing tasks of more than
    /// `max_units` units.
    pub fn new(unit: Duration, max_units: u32) -> Self {
        Self { unit, max_units }
    }

    /// How long `payload` takes.
    fn work(&self, payload: &serde_json::Value) -> Result<Duration, HandlerError> {
        let dots = match payload.get("message") {
            None | Some(serde_json::Value::Null) => 0,
            Some(serde_json::Value::String(message)) => message.matches('.').count(),
            Some(_) => {
                return Err(HandlerError::permanent(
                    "payload.message must be a string (one unit of work per '.')",
                ));
            }
        };
        let dots = u32::try_from(dots)
            .ok()
            .filter(|dots| *dots <= self.max_units)
            .ok_or_else(|| {
                HandlerError::permanent(format!(
                    "payload.message asks for {dots} units of work; this worker allows at most {} (SLEEP_MAX_UNITS)",
                    self.max_units
                ))
            })?;
        Ok(self.unit * dots)
    }
}

impl Handler for Sleep {
    const KIND: &'static str = "sleep";
    type Output = ();

    async fn handle(&self, task: Task) -> Result<(), HandlerError> {
        let work = self.work(&task.payload)?;
        // A zero-length sleep still waits for the timer's next tick (a millisecond), which
        // would cap a worker at about a thousand empty tasks a second.
        if !work.is_zero() {
            tracing::debug!(task_id = %task.id, work = %humantime::format_duration(work), "sleeping");
            tokio::time::sleep(work).await;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn one_unit_per_dot() {
        let sleep = Sleep::new(Duration::from_millis(10), 60);
        let work = |payload| sleep.work(&payload).map_err(|e| e.to_string());
        assert_eq!(
            work(json!({"message": "Hello..."})),
            Ok(Duration::from_millis(30))
        );
        assert_eq!(work(json!({"message": "no dots"})), Ok(Duration::ZERO));
        assert_eq!(work(json!(null)), Ok(Duration::ZERO));
        assert_eq!(work(json!({})), Ok(Duration::ZERO));
    }

    #[test]
    fn a_message_that_is_not_text_is_a_permanent_failure() {
        let sleep = Sleep::new(Duration::from_millis(10), 60);
        let error = sleep
            .work(&json!({"message": 3}))
            .expect_err("numbers are refused");
        assert!(!error.is_retryable());
    }

    #[test]
    fn more_than_the_maximum_is_a_permanent_failure() {
        let sleep = Sleep::new(Duration::from_millis(10), 3);
        assert_eq!(
            sleep
                .work(&json!({"message": "..."}))
                .map_err(|e| e.to_string()),
            Ok(Duration::from_millis(30))
        );
        let error = sleep
            .work(&json!({"message": "...."}))
            .expect_err("four is over three");
        assert!(!error.is_retryable());
        assert!(error.to_string().contains("SLEEP_MAX_UNITS"), "{error}");
    }
}
