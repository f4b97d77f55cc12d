//! Whom the view believes: each event's writer, by the broker user that published it.
//!
//! RabbitMQ refuses a message whose `user_id` property is not the publishing connection's
//! user (<https://www.rabbitmq.com/docs/validated-user-id>), and every offload process sets
//! it on the events it writes. So with gateways and workers logged in as users of their own
//! (`GATEWAY_USERS`, `WORKER_USERS`), a reader knows who wrote an event, and believes it only
//! from a writer whose role writes it: a worker's credentials cannot queue a task, retry one or
//! say what a gateway said, and a gateway's cannot report a task's attempts.

use std::collections::HashSet;

use offload_common::EventType;

/// The broker users of gateways and of workers.
#[derive(Debug, Clone)]
pub struct Writers {
    gateways: HashSet<String>,
    workers: HashSet<String>,
}

impl Writers {
    /// Gateways log in as one of `gateways`, workers as one of `workers`.
    pub fn new(
        gateways: impl IntoIterator<Item = String>,
        workers: impl IntoIterator<Item = String>,
    ) -> Self {
        Self {
            gateways: gateways.into_iter().collect(),
            workers: workers.into_iter().collect(),
        }
    }

    /// Whether an event of type `event` published by broker user `user` (none: the message
    /// named no user) is believed.
    pub fn believe(&self, user: Option<&str>, event: EventType) -> bool {
        let Some(user) = user else {
            return false;
        };
        let gateway = self.gateways.contains(user);
        let worker = self.workers.contains(user);
        match event {
            // A task exists once a gateway accepted it.
            EventType::Queued | EventType::Retried | EventType::Gateway | EventType::Scheduler => {
                gateway
            }
            EventType::Started
            | EventType::Succeeded
            | EventType::Failed
            | EventType::Expired
            | EventType::Worker
            | EventType::CancelSeen => worker,
            // Workers end tasks so; a gateway too: a waiting task it cancels, a dead task whose
            // retry failed.
            EventType::Dead | EventType::Cancelled => gateway || worker,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{EventType, Writers};

    #[test]
    fn each_role_is_believed_for_what_it_writes_and_nobody_else_is() {
        let writers = Writers::new(["api".to_owned()], ["worker".to_owned()]);
        assert!(writers.believe(Some("api"), EventType::Queued));
        assert!(!writers.believe(Some("worker"), EventType::Queued));
        assert!(writers.believe(Some("worker"), EventType::Succeeded));
        assert!(!writers.believe(Some("api"), EventType::Succeeded));
        assert!(writers.believe(Some("api"), EventType::Cancelled));
        assert!(writers.believe(Some("worker"), EventType::Dead));
        assert!(!writers.believe(Some("guest"), EventType::Dead));
        assert!(!writers.believe(None, EventType::Dead));
    }
}
