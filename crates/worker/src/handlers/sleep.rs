//! `sleep`: the RabbitMQ tutorial's task. One unit of work per `.` in `payload.message`, at
//! most `SLEEP_MAX_UNITS` of them.

use std::time::Duration;

use serde::Deserialize;

use crate::{Handler, HandlerError, Task};

/// A `sleep` task's payload: `{"message": "Hello..."}`; no payload, or no message, is zero
/// work.
#[derive(Debug, Default, Deserialize)]
pub struct SleepPayload {
    /// One unit of work per `.`.
    #[serde(default)]
    pub message: Option<String>,
}

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
    fn work(&self, payload: Option<&SleepPayload>) -> Result<Duration, HandlerError> {
        let dots = payload
            .and_then(|payload| payload.message.as_deref())
            .map_or(0, |message| message.matches('.').count());
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
    type Payload = Option<SleepPayload>;
    type Output = ();

    async fn handle(&self, task: Task<Self::Payload>) -> Result<(), HandlerError> {
        let work = self.work(task.payload.as_ref())?;
        // A zero-length sleep still waits for the timer's next tick (a millisecond), which
        // would cap a worker at about a thousand empty tasks a second.
        if !work.is_zero() {
            tracing::debug!(task_id = %task.id, work = %humantime::format_duration(work), "sleeping");
            tokio::select! {
                () = tokio::time::sleep(work) => {}
                () = task.cancelled() => {
                    return Err(HandlerError::permanent("cancelled: stopped sleeping"));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn payload(json: serde_json::Value) -> Result<Option<SleepPayload>, String> {
        serde_json::from_value(json).map_err(|e| e.to_string())
    }

    #[test]
    fn one_unit_per_dot() {
        let sleep = Sleep::new(Duration::from_millis(10), 60);
        let work = |json| {
            let payload = payload(json).expect("fits");
            sleep.work(payload.as_ref()).map_err(|e| e.to_string())
        };
        assert_eq!(
            work(json!({"message": "Hello..."})),
            Ok(Duration::from_millis(30))
        );
        assert_eq!(work(json!({"message": "no dots"})), Ok(Duration::ZERO));
        assert_eq!(work(json!(null)), Ok(Duration::ZERO));
        assert_eq!(work(json!({})), Ok(Duration::ZERO));
    }

    #[test]
    fn payloads_that_do_not_fit_are_refused_by_serde() {
        let error = payload(json!({"message": 3})).expect_err("numbers are refused");
        assert!(error.contains("expected a string"), "{error}");
        let error = payload(json!("not an object")).expect_err("a string is refused");
        assert!(error.contains("invalid type"), "{error}");
    }

    #[test]
    fn more_than_the_maximum_is_a_permanent_failure() {
        let sleep = Sleep::new(Duration::from_millis(10), 3);
        let work = |message: &str| {
            sleep.work(Some(&SleepPayload {
                message: Some(message.to_owned()),
            }))
        };
        assert_eq!(
            work("...").map_err(|e| e.to_string()),
            Ok(Duration::from_millis(30))
        );
        let error = work("....").expect_err("four is over three");
        assert!(!error.is_retryable());
        assert!(error.to_string().contains("SLEEP_MAX_UNITS"), "{error}");
    }
}
